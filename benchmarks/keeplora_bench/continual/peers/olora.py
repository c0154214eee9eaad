"""O-LoRA (Wang et al., "Orthogonal Subspace Learning for Language Model Continual Learning", Findings of EMNLP
2023) as a method of the benchmark (``type: olora``).

What the authors' code (github.com/cmnfriend/O-LoRA: ``src/peft/tuners/lora.py``, ``src/uie_trainer_lora.py``,
``src/run_uie_lora.py``) does, and this module does too:

* one new adapter per task on every target; ``A_t`` Kaiming-uniform (``a = √5``, as ``nn.Linear``), ``B_t = 0``;
  both train. The adapters of earlier tasks are kept (not merged into the weights), frozen, and all of them are
  active at inference with the same ``alpha / r`` scale (no task id);
* the training loss is the task loss plus ``λ₁·L_orth + λ₂·L_2`` with ``L_orth = Σ_layers Σ_{s<t} pen(A_s·A_tᵀ)``
  (the authors stack the earlier ``A_s`` of a layer into one matrix, which gives the same sum) and
  ``L_2 = Σ_layers (‖A_t‖_F + ‖B_t‖_F)`` (``torch.norm`` of each new factor: a norm, not squared). Their scripts
  use ``λ₁ = 0.5``, ``λ₂ = 0`` (the defaults here); a few long-sequence tasks use other values.

Deviations from the authors' code:

* **The orthogonality penalty.** ``orth_penalty: squared`` (default) is ``pen(O) = Σ_jk O_jk²``, the squared
  Frobenius norm the paper writes; the authors' code sums the absolute values ``Σ_jk |O_jk|`` instead, which is
  ``orth_penalty: abs``.
* **Targets, scale, dropout, optimisation.** The shared ``adapter`` config applies (targets, ``r``, ``alpha``; the
  authors adapt T5's or LLaMA's attention query and value with ``alpha = 32``, LoRA dropout 0.1); no dropout here;
  the benchmark's shared training loop (AdamW, the configured epochs, learning rate and schedule; the authors use
  AdamW at a constant 1e-3 for one epoch per task).
* **The logged training loss** includes the penalties (it is the loss that is minimised).

Keys (method entry, or a top-level ``olora:`` section): ``lambda_orth`` (λ₁), ``lambda_l2`` (λ₂), ``orth_penalty``
(``squared`` or ``abs``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..runconfig import PEER_CHOICES
from .adapters import TaskAdapterMethod

ORTH_PENALTIES = PEER_CHOICES["orth_penalty"]


def olora_penalty(
    factors: Sequence[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]],
    lambda_orth: float,
    lambda_l2: float,
    orth_penalty: str = "squared",
) -> torch.Tensor:
    """``λ₁·Σ pen(A_prev·A_tᵀ) + λ₂·Σ (‖A_t‖_F + ‖B_t‖_F)`` over ``factors = [(A_prev, A_t, B_t)]`` per layer.

    ``A_prev`` stacks the earlier tasks' ``A_s`` (``(Σ r_s) × d_in``; None or no rows on the first task); ``pen`` is
    the sum of squares (``squared``) or of absolute values (``abs``) of the entries.
    """
    if orth_penalty not in ORTH_PENALTIES:
        raise ValueError(f"olora_penalty: orth_penalty must be one of {ORTH_PENALTIES}, got {orth_penalty!r}")
    if not factors:
        raise ValueError("olora_penalty: factors is empty (no adapted layer)")
    total = factors[0][1].new_zeros(())
    for previous, a, b in factors:
        if lambda_orth and previous is not None and previous.shape[0]:
            overlap = previous @ a.t()
            total = total + lambda_orth * (overlap.square().sum() if orth_penalty == "squared" else overlap.abs().sum())
        if lambda_l2:
            total = total + lambda_l2 * (torch.linalg.matrix_norm(a) + torch.linalg.matrix_norm(b))
    return total


class OLoRA(TaskAdapterMethod):
    def __init__(self, spec, encoder, seed):
        super().__init__(spec, encoder, seed)
        self.lambda_orth = float(spec["lambda_orth"])
        self.lambda_l2 = float(spec["lambda_l2"])
        self.orth_penalty = spec["orth_penalty"]

    def factors(self) -> list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]:
        """``(A_prev, A_t, B_t)`` per layer: the earlier tasks' A stacked (None on the first task), the newest A, B."""
        return [
            (
                torch.cat(list(layer.lora_A[:-1]), 0) if len(layer.lora_A) > 1 else None,
                layer.lora_A[-1],
                layer.lora_B[-1],
            )
            for layer in self.layers.values()
        ]

    def penalty(self) -> torch.Tensor:
        return olora_penalty(self.factors(), self.lambda_orth, self.lambda_l2, self.orth_penalty)

    def loss_fn(self, task: int):
        task_loss = super().loss_fn(task)

        def fn(model, batch):
            return task_loss(model, batch) + self.penalty()

        return fn

    def begin_task(self, task, data, loader):
        self.attach()
        for layer in self.layers.values():
            a = torch.empty(self.r, layer.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # the authors' (and nn.Linear's) init of A; B = 0
            layer.add_adapter(a, torch.zeros(layer.out_features, self.r))
            layer.lora_A[-1].requires_grad_(True)
            layer.lora_B[-1].requires_grad_(True)

    def parameters(self, task):
        return [p for pair in self.current() for p in pair]

    @torch.no_grad()
    def end_task(self, task, data, loader):
        for a, b in self.current():
            a.requires_grad_(False)
            b.requires_grad_(False)
        overlap = sum(float(olora_penalty([f], 1.0, 0.0, "squared")) for f in self.factors())
        self.info.append({"orthogonality": overlap})  # Σ‖A_s·A_tᵀ‖² of the task just trained
