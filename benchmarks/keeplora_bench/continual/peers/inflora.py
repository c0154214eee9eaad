"""InfLoRA (Liang & Li, "InfLoRA: Interference-Free Low-Rank Adaptation for Continual Learning", CVPR 2024) as a
method of the benchmark (``type: inflora``).

What the authors' code (github.com/liangyanshuo/InfLoRA, ``methods/inflora.py`` and ``models/vit_inflora.py``) does,
and this module does too:

* one new adapter per task on every target, ``W·x + Σ_t B_t·A_t·x``; every adapter stays active at inference (no
  task id) and the adapters of earlier tasks are frozen;
* before training a task, ``C = Σ x·xᵀ / N`` of the target's inputs over the task's training data (the model with
  the earlier adapters, no grad); ``A_t`` (``r × d_in``) = the top-``r`` left singular vectors of
  ``(I − M·Mᵀ)·C`` (``M``: the memory of earlier tasks) transposed and divided by ``√3``. The matrix is the inputs'
  own second moment: it is not multiplied by the frozen weight nor by a random matrix first. ``A_t`` is frozen;
  ``B_t`` starts at zero and is the only adapter factor trained;
* after training, ``C`` again with the trained adapter active, and the memory grows by the GPM rule: the leading
  directions of the residual ``(I − M·Mᵀ)·C`` are appended until the captured fraction reaches the threshold
  ``ε_t = ε_start + (ε_end − ε_start)·t/T`` (task ``t`` counted from 0 of ``T``; the authors' ``lamb``/``lame``, in
  their configs 0.95 (CIFAR-100, DomainNet) or 0.98 (ImageNet-R) to 1.0).

Deviations from the authors' code:

* **Memory representation.** The authors' DualGPM stores the protected basis while it holds at most ``d/2``
  directions and its orthogonal complement afterwards (``remove``/``retain``); both give the same projector, so
  this module always stores the protected basis ``M`` (KeepLoRA's :func:`keeplora.basis.expand_bases`, exact
  ``eigh``; the residual by ``keeplora_kernels.residual_project``). (When the first task alone fills more than
  ``d/2`` directions, the authors' code stores them under the complement's label and then fails its own assertion
  on the complement's size; here the memory may hold any number of directions up to ``d``.)
* **Energy rule.** ``memory_rule: authors`` (default) reproduces the authors' criterion: they apply the GPM rule
  to the SVD of the ``d × d`` moment ``C`` itself, so the energies are the *squared* eigenvalues of ``C`` (the
  eigenpairs of ``(I − MMᵀ)·C²·(I − MMᵀ)``, which is what is handed to ``expand_bases``). ``memory_rule: gpm``
  uses the eigenvalues of ``C`` (GPM on the stacked inputs, KeepLoRA's ε_f rule). On the first task the authors
  keep one direction fewer than the rule reaches (``r = #{cumulative < ε}``, at least 1); here every task uses the
  rule of the later tasks (the first direction count that reaches ε).
* **Degenerate residual.** When ``(I − M·Mᵀ)·C`` has rank below ``r`` the authors' SVD returns arbitrary
  directions for the missing ones, which may lie inside the memory; here every row of ``A_t`` is made orthogonal to
  ``M`` (:func:`keeplora.basis.orthonormalize_against`, random orthogonal directions where a column collapses), and
  when fewer than ``r`` free directions remain the missing rows are zero.
* **Statistics.** The inputs' moments come from KeepLoRA's feature pass
  (:func:`keeplora.statistics.collect_second_moments`): padding tokens are excluded, the forward is the method's
  loss (the texts and the class prompts of the task), fp32 accumulators (KeepLoRA's default), fp64 algebra.
* **Targets, scale, classifier, optimisation.** The shared ``adapter`` config applies (targets, ``r``, the
  ``alpha / r`` scale; the authors adapt only the attention's key and value with scale 1) and the benchmark's
  shared training loop (AdamW, the configured epochs, learning rate and schedule, the model in train mode; the
  authors use Adam with a cosine schedule and train with the network in eval mode, i.e. without dropout) and prompt
  logits of each task's own classes (the authors train a linear classifier per task with ``B`` and predict over
  the concatenated classifiers of every task seen, class-incremental; there is no classifier here).

Keys (method entry, or a top-level ``inflora:`` section): ``feature_energy`` (ε_start, default 0.95),
``feature_energy_end`` (ε_end, default 1.0; equal to ``feature_energy`` for a constant threshold), ``memory_rule``
(``authors`` or ``gpm``); ``num_tasks`` (T) is set from the config's task list.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

import keeplora_kernels as kk
from keeplora.basis import expand_bases, orthonormalize_against
from keeplora.statistics import collect_second_moments

from ..data import seed_from
from ..runconfig import PEER_CHOICES
from .adapters import TaskAdapterMethod

MEMORY_RULES = PEER_CHOICES["memory_rule"]

A_SCALE = 1.0 / math.sqrt(3.0)  # the authors' scale of the designed A


def design_down_projection(
    moment: torch.Tensor, memory: torch.Tensor, r: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """InfLoRA's ``A`` (``r × d``): the top-``r`` left singular vectors of ``(I − M·Mᵀ)·C``, orthogonal to ``M``
    (``d × k``, orthonormal), times ``1/√3``; rows past the ``d − k`` free directions are zero."""
    d, k = memory.shape
    if moment.shape != (d, d):
        raise ValueError(
            f"design_down_projection: moment must be ({d}, {d}) like the memory, got {tuple(moment.shape)}"
        )
    residual = kk.residual_project(moment.to(memory.dtype), memory)
    # its left singular vectors are the eigenvectors of residual·residualᵀ (symmetric: eigh, much faster than svd)
    gram = residual @ residual.t()
    u = torch.linalg.eigh(0.5 * (gram + gram.t())).eigenvectors.flip(-1)
    n = min(r, d - k)
    u = orthonormalize_against(u[:, :n], memory, fill_to=n, generator=generator)
    a = memory.new_zeros(r, d)
    a[: u.shape[1]] = A_SCALE * u.t()
    return a


class InfLoRA(TaskAdapterMethod):
    def __init__(self, spec, encoder, seed):
        super().__init__(spec, encoder, seed)
        self.energy_start = float(spec["feature_energy"])
        self.energy_end = float(spec["feature_energy_end"])
        self.rule = spec["memory_rule"]
        self.num_tasks = int(spec["num_tasks"])
        self.memory: dict[str, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def threshold(self, task: int) -> float:
        """ε_t of the memory update after task ``task`` (counted from 0)."""
        return self.energy_start + (self.energy_end - self.energy_start) * task / self.num_tasks

    def moments(self, task: int, loader) -> dict[str, torch.Tensor]:
        """``Σ x·xᵀ / N`` of every target's inputs over the task's training batches (no grad; fp32 sums, returned in
        fp64)."""
        sums, tokens = collect_second_moments(
            self.model,
            {name: layer.base_layer for name, layer in self.layers.items()},
            loader,
            self.loss_fn(task),
            device=self.device,
            dtype=torch.float32,
            progress=False,
        )
        return {name: c.double() / max(1, tokens[name]) for name, c in sums.items()}

    def setup(self) -> None:
        self.attach()
        if not self.memory:
            self.memory = {
                name: torch.zeros(layer.in_features, 0, dtype=torch.float64, device=self.device)
                for name, layer in self.layers.items()
            }

    def representatives(self, moments: dict[str, torch.Tensor]) -> dict[str, str]:
        """Each target -> the first target with an equal moment and memory: targets that share their input (query,
        key, value) get the same A and the same memory, computed once."""
        out: dict[str, str] = {}
        for name in self.layers:
            c, m = moments[name], self.memory[name]
            out[name] = next(
                (
                    rep
                    for rep in dict.fromkeys(out.values())
                    if moments[rep].shape == c.shape
                    and self.memory[rep].shape == m.shape
                    and torch.equal(moments[rep], c)
                    and torch.equal(self.memory[rep], m)
                ),
                name,
            )
        return out

    def begin_task(self, task, data, loader):
        self.setup()
        moments = self.moments(task, loader)
        reps = self.representatives(moments)
        generator = torch.Generator().manual_seed(seed_from(self.seed, "inflora", task))
        designed = {
            rep: design_down_projection(moments[rep], self.memory[rep], self.r, generator)
            for rep in dict.fromkeys(reps.values())
        }
        for name, layer in self.layers.items():
            layer.add_adapter(designed[reps[name]], torch.zeros(layer.out_features, self.r))
            layer.lora_B[-1].requires_grad_(True)

    def parameters(self, task):
        return [b for _, b in self.current()]

    def end_task(self, task, data, loader):
        for _, b in self.current():
            b.requires_grad_(False)
        moments = self.moments(task, loader)
        reps = self.representatives(moments)
        unique = {rep: moments[rep] for rep in dict.fromkeys(reps.values())}
        if self.rule == "authors":
            unique = {rep: c @ c for rep, c in unique.items()}
        energy = self.threshold(task)
        grown = expand_bases({rep: self.memory[rep] for rep in unique}, unique, energy, method="exact")
        self.memory = {name: grown[reps[name]] for name in self.layers}
        self.info.append(
            {
                "basis_sizes": {name: int(m.shape[1]) for name, m in self.memory.items()},
                "d_in": {name: int(layer.in_features) for name, layer in self.layers.items()},
                "feature_energy": energy,
            }
        )

    def extra_state(self, folder: Path) -> dict:
        return {**super().extra_state(folder), "memory": {n: m.detach().cpu() for n, m in self.memory.items()}}

    def load_extra_state(self, state: dict, folder: Path) -> None:
        super().load_extra_state(state, folder)
        self.memory = {n: m.to(self.device) for n, m in state["memory"].items()}
