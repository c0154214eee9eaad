"""KeepLoRA: the continual-learning task lifecycle on a Hugging Face model.

    kl = KeepLoRA(model, KeepLoRAConfig(target_modules=[...], r=16))
    for task in tasks:
        kl.begin_task(task.loader, loss_fn)          # gradient estimate → A (frozen), B (trained)
        train(kl.trainable_parameters(), ...)        # the user's optimizer, schedule and loss
        kl.end_task(task.loader, loss_fn)            # merge, feature statistics, memory update

Conventions: PyTorch weights are ``d_out × d_in``; every protected basis ``P`` is an orthonormal ``d_in × k`` basis
of the input space; PEFT stores ``A`` as ``lora_A.weight`` (``r × d_in``) and ``B`` as ``lora_B.weight``
(``d_out × r``), so the weight delta is ``scale·lora_B.weight·lora_A.weight``. A target's base weight is always read
as ``d_out × d_in`` through :func:`keeplora.adapters.target_weight` (for a transformers ``Conv1D``, which stores it
``d_in × d_out``, a transposed view, so the in-place merges write the stored weight).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

import keeplora_kernels as kk

from . import checkpoint, distributed, finite
from .adapters import (
    adapters_bypassed,
    attach_adapters,
    check_shapes,
    freeze_adapters,
    resolve_targets,
    target_weight,
    unwrap_model,
)
from .basis import expand_bases, orthonormalize_against, random_residual_directions
from .batching import bounded_batches
from .config import KeepLoRAConfig
from .state import ContinualState, fingerprint
from .statistics import (
    EmptyDataError,
    LossFn,
    collect_feature_sketches,
    collect_second_moments,
    estimate_gradients,
)


def _canonical_signs(a: torch.Tensor) -> torch.Tensor:
    """``a`` with each column's largest-magnitude entry made positive (zero columns unchanged).

    A singular vector's sign is free, and which one an SVD returns can follow the rounding of its input (one process
    against several ranks, a Conv1D's transposed weight against a Linear's): fixing it makes such runs agree exactly.
    It changes no result: B = Aᵀ·Gᵀ flips with A, and training then mirrors exactly (AdamW is sign-equivariant)."""
    pivot = a.gather(0, a.abs().argmax(0, keepdim=True))
    return a * torch.where(pivot < 0, -1.0, 1.0).to(a.dtype)


class KeepLoRAWarning(UserWarning):
    """Something the user should know about the continual state (e.g. a module with no residual directions left)."""


class KeepLoRA:
    """Continual fine-tuning of a transformers model (or a ``PeftModel``) with KeepLoRA.

    Construction resolves the targets, puts PEFT LoRA layers on them (A frozen, B trainable, everything else
    frozen) and computes every target's pre-trained principal subspace; it raises before touching the model when
    the config does not fit it.

    Under ``torch.distributed`` (DDP, FSDP2 ``fully_shard``; see ``docs/distributed.md``) every rank constructs
    KeepLoRA on the bare model before wrapping or sharding it, and calls every method at the same step with its own
    shard of the data: the statistics are summed over the ranks, and bases, A, B and the merged weights are
    bit-identical on all ranks. A model given inside a ``DistributedDataParallel`` wrapper is unwrapped.

    Attributes:
        model: the model, adapted in place.
        config: the :class:`KeepLoRAConfig`.
        layers: ``{module name: PEFT LoRA layer}`` of the targets (names relative to the unwrapped model).
        state: the :class:`~keeplora.state.ContinualState` (bases, task counter, history, B at task start, the
            pre-trained weights' fingerprint); everything KeepLoRA keeps between calls besides the model's tensors.
        bases, tasks_done, in_task, history, initial_fingerprint: the fields of ``state`` of these names. ``bases``:
            ``{module name: P}``, the unified protected basis (``d_in × k``, orthonormal, stats dtype);
            ``in_task``: between begin_task and end_task; ``history``: one dict per finished task (basis sizes,
            adapter ranks, token counts, timings, and ``memory``: per rank the parameter bytes it holds and, on
            CUDA, its peak allocated bytes).
    """

    def __init__(self, model: nn.Module, config: KeepLoRAConfig | None = None):
        self._attach(model, config)

    @classmethod
    def from_state(
        cls,
        model: nn.Module,
        config: KeepLoRAConfig,
        state: ContinualState,
        *,
        weights: Mapping[str, torch.Tensor] | None = None,
        adapters: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> KeepLoRA:
        """KeepLoRA continuing ``state`` on ``model`` instead of starting a new run (no pre-trained bases are
        computed). It keeps a copy of ``state`` on the model's device (``kl.state``); ``state`` is left as it was.

        Args:
            model, config: as for the constructor; ``config`` must be the one the state was made with.
            state: the continual state to continue (e.g. :func:`keeplora.checkpoint.read_state`'s).
            weights: ``{target: W}`` (``d_out × d_in``) written into the target weights; None keeps the model's,
                which must then already carry the state's merged tasks.
            adapters: ``{target: (A r×d_in, B d_out×r)}``, the adapter of the task in progress: required exactly
                when ``state.in_task``.

        Everything is checked before the model is touched. :meth:`load` is this applied to a saved folder.
        """
        kl = cls.__new__(cls)
        kl._attach(model, config, state, weights, adapters)
        return kl

    def _attach(
        self,
        model: nn.Module,
        config: KeepLoRAConfig | None,
        state: ContinualState | None = None,
        weights: Mapping[str, torch.Tensor] | None = None,
        adapters: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        """Check, attach the adapters, then start a new state (``state`` None) or continue ``state``."""
        config = config if config is not None else KeepLoRAConfig()
        if not isinstance(config, KeepLoRAConfig):
            raise TypeError(f"config must be a KeepLoRAConfig, got {type(config).__name__}")
        bare = distributed.unwrap_data_parallel(model)
        names = resolve_targets(bare, config)
        check_shapes(bare, names, config)
        modules = dict(unwrap_model(bare).named_modules())
        distributed.check_wrapping(model, bare, {n: modules[n] for n in names}, config.adapter_name)
        targets = {n: target_weight(modules[n]) for n in names}
        bad = finite.nonfinite(targets, across_ranks=True)
        if bad:
            raise ValueError(
                f"the weights of targets {bad[:4]} ({len(bad)} in all) hold inf or NaN: KeepLoRA cannot "
                "protect or adapt them (load the model's weights again)"
            )
        if state is not None:
            _check_resume(state, {n: tuple(w.shape) for n, w in targets.items()}, config.r, weights, adapters)
        elif weights is not None or adapters is not None:
            raise ValueError("weights and adapters are only accepted with a state to continue")
        model = bare
        self.model = model
        self.config = config
        self.layers = attach_adapters(model, names, config)
        first = target_weight(next(iter(self.layers.values())))
        self.device = first.device
        if state is None:
            initial = fingerprint(checkpoint.target_weights(self.layers))
            self.state = ContinualState(bases=self._pretrained_bases(), initial_fingerprint=initial)
            return
        b_dtypes = {n: layer.lora_B[config.adapter_name].weight.dtype for n, layer in self.layers.items()}
        self.state = state.to(self.device, config.torch_stats_dtype, b_dtypes)
        self.state.bases = {n: self.state.bases[n] for n in self.layers}  # in the targets' order, as computed
        self.state.b_start = {n: self.state.b_start[n] for n in self.layers} if self.state.in_task else {}
        with torch.no_grad():
            for name, layer in self.layers.items():
                if weights is not None:
                    distributed.copy_full_(target_weight(layer), weights[name])
                if adapters is not None:
                    a, b = adapters[name]
                    distributed.copy_full_(layer.lora_A[config.adapter_name].weight, a)
                    distributed.copy_full_(layer.lora_B[config.adapter_name].weight, b)

    # ------------------------------------------------------------------ the state's fields
    @property
    def bases(self) -> dict[str, torch.Tensor]:
        return self.state.bases

    @bases.setter
    def bases(self, value: dict[str, torch.Tensor]) -> None:
        self.state.bases = value

    @property
    def tasks_done(self) -> int:
        return self.state.tasks_done

    @tasks_done.setter
    def tasks_done(self, value: int) -> None:
        self.state.tasks_done = value

    @property
    def in_task(self) -> bool:
        return self.state.in_task

    @in_task.setter
    def in_task(self, value: bool) -> None:
        self.state.in_task = value

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.state.history

    @history.setter
    def history(self, value: list[dict[str, Any]]) -> None:
        self.state.history = value

    @property
    def initial_fingerprint(self) -> dict[str, list[float]]:
        return self.state.initial_fingerprint

    # ------------------------------------------------------------------ public API
    @property
    def adapter_name(self) -> str:
        return self.config.adapter_name

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The B matrices (``lora_B.weight`` of every target): the only parameters KeepLoRA trains."""
        freeze_adapters(self.layers, self.adapter_name)
        return [layer.lora_B[self.adapter_name].weight for layer in self.layers.values()]

    def begin_task(self, dataloader: Iterable[Any], loss_fn: LossFn | None = None) -> dict[str, int]:
        """Start a task: estimate the task gradient of every target weight and initialise its adapter from it.

        Args:
            dataloader: the task's training batches (any iterable; re-iterable if end_task reuses it).
            loss_fn: ``loss_fn(model, batch) -> scalar``; None uses ``model(**batch).loss``.

        Per target: ``G`` = mean over batches of ``∂L/∂W`` (targets only, fp32, on the model's device);
        ``Ĝ = (I − P·Pᵀ)·Gᵀ``; ``A`` = top-r left singular vectors of ``Ĝ`` (orthonormal, ⟂ P);
        ``B = Aᵀ·Ĝ`` (= diag(S_r)·V_rᵀ) and ``W ← W − scale·(A·B)ᵀ`` for ``b_init='gradient'``, ``B = 0`` for 'zero'.
        A target whose basis already spans its whole input space keeps a zero adapter (with a warning).
        Returns ``{module name: adapter rank used}``. On any error nothing is changed.
        """
        if self.state.in_task:
            raise RuntimeError(f"begin_task called during task {self.state.tasks_done + 1}: call end_task first")
        start = time.perf_counter()
        need_gradient = self.config.a_init == "gradient" or self.config.b_init == "gradient"
        grads = None
        if need_gradient:
            grads = self._task_gradients(dataloader, loss_fn)
        else:
            _require_nonempty(dataloader)
        with distributed.failures_shared(f"task {self.state.tasks_done + 1} adapter initialisation"):
            factors = self._adapter_factors(grads)
        grads = None  # the d_out × d_in sums are not needed once A and B exist: free them before W is updated
        synced = distributed.sync_from_rank0([t for pair in factors.values() for t in pair])
        factors = {name: (synced[2 * i], synced[2 * i + 1]) for i, name in enumerate(factors)}
        self._check_init(factors, self.state.tasks_done + 1)
        ranks = {}
        with torch.no_grad():
            for name, (a, b) in factors.items():
                layer = self.layers[name]
                lora_a, lora_b = layer.lora_A[self.adapter_name].weight, layer.lora_B[self.adapter_name].weight
                distributed.copy_full_(lora_a, a.t())
                distributed.copy_full_(lora_b, b.t())
                self.state.b_start[name] = b.t().contiguous().to(device=self.device, dtype=lora_b.dtype)
                if self.config.b_init == "gradient":
                    distributed.add_full_(target_weight(layer), -self.config.scale * (b.t() @ a.t()))
                ranks[name] = int((a.abs().sum(0) > 0).sum())
        freeze_adapters(self.layers, self.adapter_name)
        self.state.in_task = True
        self.state.task_record = {
            "task": self.state.tasks_done + 1,
            "adapter_rank": ranks,
            "seconds_begin": time.perf_counter() - start,
        }
        return ranks

    def _task_gradients(self, dataloader: Iterable[Any], loss_fn: LossFn | None) -> dict[str, torch.Tensor]:
        """begin_task's gradient pass: the mean task gradient ``G`` of every target (``d_out × d_in``)."""
        # between tasks every B is zero (end_task merged and reset it): the pass skips the adapter branch
        bypass = adapters_bypassed(self.layers) if self._adapters_are_zero() else contextlib.nullcontext()
        with bypass:
            return estimate_gradients(
                self.model,
                self.layers,
                dataloader,
                loss_fn,
                device=self.device,
                dtype=self.config.torch_stats_dtype,
                fraction=self.config.grad_data_fraction,
                progress=self.config.progress,
                desc=f"task {self.state.tasks_done + 1} gradient",
                micro_batch_tokens=self.config.grad_micro_batch,
                offload=self.config.grad_offload,
                checkpoint=self.config.grad_checkpoint,
            )

    def _adapters_are_zero(self) -> bool:
        """Whether every target's B is exactly zero on every rank (one host sync)."""
        nonzero = torch.zeros((), device=self.device, dtype=torch.int64)
        for layer in self.layers.values():
            nonzero += distributed.local_tensor(layer.lora_B[self.adapter_name].weight.detach()).count_nonzero()
        distributed.all_reduce_sum([nonzero])
        return int(nonzero.item()) == 0

    def end_task(
        self, dataloader: Iterable[Any], loss_fn: LossFn | None = None, *, export_adapter_to: str | None = None
    ) -> dict[str, int]:
        """Finish the task: merge the adapter into the weights and add the task's feature directions to P.

        Args:
            dataloader: the task's training batches (the feature statistics come from them).
            loss_fn: the task's ``loss_fn(model, batch)``; only its forward pass runs (no grad) unless
                ``memory_source='gradients'``. None calls ``model(**batch)``.
            export_adapter_to: optional folder; the task's adapter is written there first in PEFT's format
                (see :meth:`export_adapter`).

        The feature pass runs with the adapter still active (the same function as the merged model) and each basis
        grows by the energy rule, capped at ``d_in``, before anything is written, so that an error leaves the state
        unchanged; then ``W ← W + scale·(A·B)ᵀ`` and the adapter is reset to zero. Non-finite statistics, grown bases
        or merged weights raise ``FloatingPointError`` naming the targets, with nothing changed. Returns
        ``{module name: columns added}``.
        """
        if not self.state.in_task:
            raise RuntimeError("end_task called without begin_task: there is no task to end")
        start = time.perf_counter()
        if export_adapter_to is not None:
            self.export_adapter(export_adapter_to)
        task = self.state.tasks_done + 1
        moments, tokens = self._task_statistics(dataloader, loss_fn)
        bases = dict(self.state.bases)
        if moments is not None:
            bad = finite.nonfinite(moments)  # summed over the ranks already: every rank decides alike
            if bad:
                raise FloatingPointError(
                    f"task {task}: non-finite memory statistics ({self.config.memory_source}) of {bad[:4]} "
                    f"({len(bad)} targets): their inputs held inf or NaN in end_task's pass over the data; nothing "
                    "was changed"
                )
            with distributed.failures_shared(f"task {task} memory update"):
                grown = expand_bases(
                    self.state.bases,
                    moments,
                    self.config.feature_energy,
                    method=self.config.svd_method,
                    oversample=self.config.svd_oversample,
                    power_iters=self.config.svd_power_iters,
                    seed=self.config.seed + self.state.tasks_done,
                )
            bases = dict(zip(self.layers, distributed.sync_from_rank0([grown[n] for n in self.layers])))
        self._check_merge(bases, task)
        with torch.no_grad():
            for layer in self.layers.values():
                lora_a, lora_b = layer.lora_A[self.adapter_name].weight, layer.lora_B[self.adapter_name].weight
                a, b = distributed.full_tensor(lora_a.detach()), distributed.full_tensor(lora_b.detach())
                distributed.add_full_(target_weight(layer), self.config.scale * (b.float() @ a.float()))
                distributed.local_tensor(lora_a).zero_()
                distributed.local_tensor(lora_b).zero_()
        added = {name: int(bases[name].shape[1] - self.state.bases[name].shape[1]) for name in self.layers}
        self.state.bases = bases
        self.state.b_start.clear()
        self.state.tasks_done += 1
        self.state.in_task = False
        memory = distributed.all_gather_objects(distributed.memory_report(self.model, self.device))
        self.state.history.append(
            {
                **self.state.task_record,
                "added": added,
                "tokens": tokens,
                "basis_size": {n: int(p.shape[1]) for n, p in self.state.bases.items()},
                "memory": memory,
                "seconds_end": time.perf_counter() - start,
            }
        )
        return added

    def _check_init(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], task: int) -> None:
        """Refuse non-finite A, B or re-initialised weights ``W − scale·(A·B)ᵀ`` before anything is written (one
        host sync; A and B are identical on every rank, the weights are checked shard by shard)."""
        flags = {}
        with torch.no_grad():
            for name, (a, b) in factors.items():
                flags[f"{name} (A)"] = finite.all_finite(a)
                flags[f"{name} (B)"] = finite.all_finite(b)
                if self.config.b_init == "gradient":
                    weight = target_weight(self.layers[name])
                    local = distributed.local_tensor(weight.detach())
                    delta = distributed.local_part(
                        (self.config.scale * (b.t() @ a.t()).float()).to(local.device), weight
                    )
                    flags[f"{name} (initialised weight)"] = finite.all_finite((local.float() - delta).to(local.dtype))
        bad = finite.failed(flags, across_ranks=True)
        if bad:
            raise FloatingPointError(
                f"task {task}: non-finite values in {bad[:4]} ({len(bad)} in all) at adapter initialisation (the "
                "task gradient's singular vectors or B = Aᵀ·G hold inf or NaN); nothing was changed"
            )

    def _check_merge(self, bases: dict[str, torch.Tensor], task: int) -> None:
        """Refuse non-finite grown bases or merged weights before anything is written (one host sync for all
        targets; the merged weights are checked shard by shard and the verdicts summed over the ranks)."""
        flags = {}
        with torch.no_grad():
            for name, layer in self.layers.items():
                if bases[name] is not self.state.bases[name]:
                    flags[f"{name} (grown basis)"] = finite.all_finite(bases[name])
                lora_a, lora_b = layer.lora_A[self.adapter_name].weight, layer.lora_B[self.adapter_name].weight
                a, b = distributed.full_tensor(lora_a.detach()), distributed.full_tensor(lora_b.detach())
                weight = target_weight(layer)
                local = distributed.local_tensor(weight.detach())
                delta = distributed.local_part((self.config.scale * (b.float() @ a.float())).to(local.device), weight)
                flags[f"{name} (merged weight)"] = finite.all_finite((local.float() + delta).to(local.dtype))
        bad = finite.failed(flags, across_ranks=True)
        if bad:
            raise FloatingPointError(
                f"task {task}: non-finite values in {bad[:4]} ({len(bad)} in all): the adapter "
                "(B after training) or the memory update holds inf or NaN; nothing was changed"
            )

    def export_adapter(self, directory: str) -> None:
        """Write the current task's adapter in PEFT's format (``PeftModel.from_pretrained`` loads it).

        The exported B is ``B − B_start``, so the adapter is exactly this task's change: loaded onto the model as it
        was before the task (the pre-trained model for task 1; the previous tasks' adapters merged in order after
        that), it reproduces the model after this task.
        """
        if not self.state.in_task:
            raise RuntimeError("export_adapter needs an active task (call it between begin_task and end_task)")
        checkpoint.export_peft_adapter(directory, self.model, self.config, self.layers, self.state.b_start)

    def save(self, directory: str) -> None:
        """Save the whole continual state (config, bases, target weights, task counter, an active adapter)."""
        checkpoint.save_state(directory, self.config, self.state, self.layers)

    @classmethod
    def load(cls, directory: str, model: nn.Module) -> KeepLoRA:
        """Restore a state saved by :meth:`save` into ``model`` (the same pre-trained model, or the saved one)."""
        saved = checkpoint.read_state(directory, model)
        return cls.from_state(model, saved.config, saved.state, weights=saved.weights, adapters=saved.adapters)

    def basis_sizes(self) -> dict[str, int]:
        return self.state.basis_sizes()

    def __repr__(self) -> str:
        sizes = self.basis_sizes()
        mean_k = sum(sizes.values()) / max(1, len(sizes))
        return (
            f"KeepLoRA(targets={len(self.layers)}, r={self.config.r}, tasks_done={self.state.tasks_done}, "
            f"in_task={self.state.in_task}, mean basis size={mean_k:.1f})"
        )

    # ------------------------------------------------------------------ internals
    def _pretrained_bases(self) -> dict[str, torch.Tensor]:
        """Principal input subspace of every target's pre-trained weight, batched per ε_w value, computed
        on every rank and then taken from rank 0 (a sharded weight is gathered first)."""
        by_energy: dict[float, list[str]] = defaultdict(list)
        for name in self.layers:
            by_energy[self.config.weight_energy_for(name)].append(name)
        bases = {}
        with distributed.failures_shared("principal subspaces of the pre-trained weights"):
            for energy, group in by_energy.items():
                biggest = max(target_weight(self.layers[n]).numel() for n in group)
                for names in bounded_batches(group, 8 * biggest):  # the fp64 work copies dominate
                    weights = [distributed.full_tensor(target_weight(self.layers[n]).detach()) for n in names]
                    found = kk.principal_subspace(weights, energy, **self.config.principal_subspace_options())
                    for name, basis in zip(names, found):
                        bases[name] = basis.to(device=self.device, dtype=self.config.torch_stats_dtype).contiguous()
        return dict(zip(self.layers, distributed.sync_from_rank0([bases[n] for n in self.layers])))

    def _adapter_factors(self, grads: dict[str, torch.Tensor] | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{name: (A d_in×r, B r×d_out)}`` in the stats dtype; zero columns/rows where fewer than r exist."""
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed + 7919 * self.state.tasks_done)
        left = self._residual_singular_vectors(grads) if cfg.a_init == "gradient" else {}
        factors = {}
        for name, layer in self.layers.items():
            basis = self.state.bases[name]
            d_in, d_out = layer.in_features, layer.out_features
            a = basis.new_zeros(d_in, cfg.r)
            b = basis.new_zeros(cfg.r, d_out)
            available = d_in - basis.shape[1]
            if available <= 0:
                warnings.warn(
                    f"{name}: the protected basis spans all of R^{d_in}, so the residual gradient is zero; "
                    f"its adapter stays zero for task {self.state.tasks_done + 1}",
                    KeepLoRAWarning,
                    stacklevel=3,
                )
                factors[name] = (a, b)
                continue
            rank = min(cfg.r, available)
            if rank < cfg.r:
                warnings.warn(
                    f"{name}: only {available} residual input directions are left; the adapter uses rank "
                    f"{rank} instead of {cfg.r}",
                    KeepLoRAWarning,
                    stacklevel=3,
                )
            if cfg.a_init == "gradient":
                a[:, :rank] = orthonormalize_against(left[name][:, :rank], basis, fill_to=rank, generator=generator)
            else:
                a[:, :rank] = random_residual_directions(basis, rank, generator)
            a = _canonical_signs(a)
            if cfg.b_init == "gradient":
                # Aᵀ·Ĝ = Aᵀ·Gᵀ − (Aᵀ·P)·(Pᵀ·Gᵀ) = Aᵀ·Gᵀ because A ⟂ P: Ĝ (d_in × d_out) is never formed
                b = a.t() @ grads[name].t()
            factors[name] = (a, b)
        return factors

    def _residual_singular_vectors(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Top left singular vectors of ``Ĝ = (I − P·Pᵀ)·Gᵀ`` per target, batched over same-shaped targets (in
        memory-bounded batches, see :mod:`keeplora.batching`).

        Bases of one shape group are zero-padded to a common width (zero columns do not change ``P·Pᵀ``).
        """
        cfg = self.config
        groups: dict[tuple[int, int], list[str]] = defaultdict(list)
        for name, layer in self.layers.items():
            groups[(layer.in_features, layer.out_features)].append(name)
        out = {}
        item_bytes = torch.finfo(cfg.torch_stats_dtype).bits // 8
        batches = [
            (shape, names)
            for shape, group in groups.items()
            for names in bounded_batches(group, item_bytes * shape[0] * shape[1])
        ]
        for (d_in, d_out), names in batches:
            rank = min(cfg.r, d_in, d_out)
            width = max(self.state.bases[n].shape[1] for n in names)
            padded = torch.zeros(len(names), d_in, width, device=self.device, dtype=cfg.torch_stats_dtype)
            for i, n in enumerate(names):
                padded[i, :, : self.state.bases[n].shape[1]] = self.state.bases[n]
            grads_t = torch.stack([grads[n].t() for n in names])
            randomized = cfg.svd_method == "randomized" or (
                cfg.svd_method == "auto" and 4 * (rank + cfg.svd_oversample) <= min(d_in, d_out)
            )
            if randomized:
                u, _, _ = kk.rsvd(
                    grads_t,
                    rank,
                    oversample=cfg.svd_oversample,
                    power_iters=cfg.svd_power_iters,
                    project_out=padded,
                    seed=cfg.seed + self.state.tasks_done,
                )
            else:
                u = torch.linalg.svd(kk.residual_project(grads_t, padded), full_matrices=False)[0][..., :rank]
            for i, n in enumerate(names):
                out[n] = u[i].to(cfg.torch_stats_dtype)
        return out

    def _task_statistics(self, dataloader, loss_fn) -> tuple[dict[str, torch.Tensor] | None, dict[str, int]]:
        """Second moments for the memory update (features or post-task gradients); None when ε_f = 0.

        ``feature_stat='official-sketch'``: ``S·Sᵀ`` of the authors' sketch ``S`` (see
        :func:`~keeplora.statistics.collect_feature_sketches`), whose eigenpairs are the left singular vectors of
        ``S`` with ``σ²``, so that the energy rule and everything after it are those of the second moment.
        """
        cfg = self.config
        if cfg.feature_energy == 0:
            _require_nonempty(dataloader)
            return None, {}
        if cfg.memory_source == "features" and cfg.feature_stat == "official-sketch":
            sketches, tokens = collect_feature_sketches(
                self.model,
                self.layers,
                dataloader,
                loss_fn,
                device=self.device,
                dtype=cfg.torch_stats_dtype,
                progress=cfg.progress,
            )
            return {name: s @ s.t() for name, s in sketches.items()}, tokens
        if cfg.memory_source == "features":
            return collect_second_moments(
                self.model,
                self.layers,
                dataloader,
                loss_fn,
                device=self.device,
                dtype=cfg.torch_stats_dtype,
                progress=cfg.progress,
            )
        grads = estimate_gradients(
            self.model,
            self.layers,
            dataloader,
            loss_fn,
            device=self.device,
            dtype=cfg.torch_stats_dtype,
            progress=cfg.progress,
            desc=f"task {self.state.tasks_done + 1} memory gradient",
            micro_batch_tokens=cfg.grad_micro_batch,
            offload=cfg.grad_offload,
            checkpoint=cfg.grad_checkpoint,
        )
        return {name: g.t() @ g for name, g in grads.items()}, {}


def _require_nonempty(dataloader: Iterable[Any]) -> None:
    """Raise ``EmptyDataError`` when the dataloader (of every rank, under ``torch.distributed``) yields nothing."""
    found = False
    with distributed.failures_shared("dataloader check"):
        for _ in dataloader:
            found = True
            break
    if not any(distributed.all_gather_objects(found)):
        raise EmptyDataError("the dataloader yielded no batch")


def _check_resume(
    state: ContinualState,
    shapes: dict[str, tuple[int, int]],
    r: int,
    weights: Mapping[str, torch.Tensor] | None,
    adapters: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None,
) -> None:
    """Raise before the model is touched unless ``state``, ``weights`` and ``adapters`` fit targets
    ``{name: (d_out, d_in)}`` with adapter rank ``r`` (see :meth:`KeepLoRA.from_state`)."""
    if not isinstance(state, ContinualState):
        raise TypeError(f"state must be a keeplora.state.ContinualState, got {type(state).__name__}")
    state.check(shapes, r)
    if state.in_task and adapters is None:
        raise ValueError(
            "state.in_task is True, so adapters (every target's (A, B) of the task in progress) are required"
        )
    if adapters is not None and not state.in_task:
        raise ValueError("adapters are only accepted for a state in a task (state.in_task is False)")
    for argument, given in (("weights", weights), ("adapters", adapters)):
        if given is not None and sorted(given) != sorted(shapes):
            raise ValueError(
                f"{argument} must cover exactly the targets {sorted(shapes)[:4]} ({len(shapes)}), got "
                f"{sorted(given)[:4]} ({len(given)})"
            )
    tensors = {}
    for name, (d_out, d_in) in shapes.items():
        if weights is not None:
            tensors[f"weights[{name!r}]"] = (weights[name], (d_out, d_in))
        if adapters is not None:
            a, b = adapters[name]
            tensors[f"adapters[{name!r}][0] (A)"] = (a, (r, d_in))
            tensors[f"adapters[{name!r}][1] (B)"] = (b, (d_out, r))
    for what, (t, shape) in tensors.items():
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or not t.is_floating_point():
            got = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{what} must be a floating-point tensor of shape {shape}, got {got}")
