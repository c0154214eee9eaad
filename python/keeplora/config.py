"""KeepLoRAConfig: every knob of the algorithm, validated once in ``__post_init__``.

Field ``metadata["help"]`` is the documentation (PEFT's convention). Defaults follow the paper and the authors'
CLIP run (r=16, alpha=1, ε_f=0.99, B initialised from the gradient); see docs/benchmark.md and the README.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

_STATS_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _choice(name: str, value: Any, accepted: Sequence[Any]) -> None:
    if value not in accepted:
        raise ValueError(f"KeepLoRAConfig.{name} must be one of {list(accepted)}, got {value!r}")


def _fraction(name: str, value: Any, *, allow_zero: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (0.0 <= value <= 1.0)
    if not ok or (not allow_zero and value == 0):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"KeepLoRAConfig.{name} must be a number in {interval}, got {value!r}")


@dataclass
class KeepLoRAConfig:
    target_modules: str | list[str] | None = field(
        default=None,
        metadata={
            "help": (
                "Modules to adapt. A list of names matched like PEFT does (a module is a target when its full name "
                "equals an entry or ends with '.' + entry, e.g. 'query' or 'attention.output.dense'), or one string "
                "used as a regular expression that must match the full module name. None: the targets of an existing "
                "PEFT adapter, else PEFT's default targets for the model type. Targets must be torch.nn.Linear or "
                "transformers Conv1D (GPT-2 family; exact types: other layers, quantized linears included, are "
                "refused)."
            )
        },
    )
    r: int = field(
        default=16, metadata={"help": "LoRA rank (columns of the frozen A). Must not exceed any target's d_in."}
    )
    alpha: float = field(default=1.0, metadata={"help": "LoRA alpha; the adapter scale is s = alpha / r."})
    weight_energy: float | dict[str, float] = field(
        default=0.85,
        metadata={
            "help": (
                "ε_w: fraction of each pre-trained weight's energy ‖W‖_F² whose principal input directions are "
                "protected. A number for all targets, or {regex: number} per group (first pattern found by re.search "
                "in the module name wins, e.g. {'vision_model': 0.85, 'text_model': 0.2}); every target must match a "
                "pattern. 0 disables pre-trained protection (ablation)."
            )
        },
    )
    feature_energy: float = field(
        default=0.99,
        metadata={
            "help": (
                "ε_f: after each task, input-feature directions are added to the protected basis until it captures "
                "this fraction of the task's feature energy (GPM rule). 0 disables the task memory (ablation)."
            )
        },
    )
    b_init: str = field(
        default="gradient",
        metadata={
            "help": (
                "'gradient' (authors' CLIP code): B = diag(S_r)·V_rᵀ of the residual gradient and the same amount is "
                "subtracted from W so the function is unchanged; 'zero' (authors' LLaVA code): B = 0."
            )
        },
    )
    a_init: str = field(
        default="gradient",
        metadata={
            "help": (
                "'gradient' (KeepLoRA): A = top-r left singular vectors of the residual gradient; 'random' (ablation): "
                "A = r random orthonormal directions inside the residual subspace."
            )
        },
    )
    grad_data_fraction: float = field(
        default=1.0,
        metadata={
            "help": (
                "Fraction of the task's batches, evenly spaced, used for the gradient estimate in begin_task "
                "(authors: 1.0 for CLIP, 0.2 for LLaVA)."
            )
        },
    )
    grad_micro_batch: int = field(
        default=4096,
        metadata={
            "help": (
                "Tokens per micro-batch of the gradient passes (begin_task's, and end_task's with "
                "memory_source='gradients'): a batch is split by rows into parts of at most this many tokens (rows × "
                "sequence length, at least one row), which bounds the activations the pass keeps for backward. Only "
                "where the split is exact: the model's own loss (loss_fn=None) of a transformers causal LM, masked LM "
                "or token classifier (a mean over the labels that are not -100; each part is weighted by its share of "
                "those labels); batches of a user loss_fn are never split. 0 disables."
            )
        },
    )
    grad_offload: bool = field(
        default=False,
        metadata={
            "help": (
                "Keep the activations saved for backward in host memory (pinned on CUDA) during the gradient passes "
                "(as grad_micro_batch): device memory then holds about one layer's working set besides the "
                "accumulators, at the cost of copying every saved activation to the host and back. For batches that "
                "micro-batching cannot split (one long sequence, or a user loss_fn)."
            )
        },
    )
    grad_checkpoint: bool = field(
        default=False,
        metadata={
            "help": (
                "Run the model's repeated blocks (its decoder or encoder layers) under activation checkpointing during "
                "the gradient passes (as grad_micro_batch): the pass keeps each block's inputs instead of its "
                "activations and recomputes one block at a time in the backward, at the cost of one more forward "
                "(grad_offload instead copies every saved activation to the host and back). The same gradient sums; "
                "for batches that micro-batching cannot split (one long sequence, or a user loss_fn)."
            )
        },
    )
    memory_source: str = field(
        default="features",
        metadata={
            "help": (
                "'features' (default): a statistic of each target's inputs over real tokens (feature_stat: the exact "
                "second moment Σ x·xᵀ by default); "
                "'gradients' (authors' LLaVA pipeline): the post-task gradient Gᵀ of the task data."
            )
        },
    )
    feature_stat: str = field(
        default="second-moment",
        metadata={
            "help": (
                "The task statistic of memory_source='features': 'second-moment' (default): the exact Σ x·xᵀ over "
                "every real token; 'official-sketch' (the authors' CLIP code, kept for comparison): the sketch "
                "S = Σ_b X_bᵀ / N_tokens (d_in × tokens per batch; token j of every batch lands in column j, a "
                "shorter batch is zero-padded, padding tokens are zeroed and not counted), whose left singular vectors "
                "with σ² feed the same energy rule "
                "(the moment S·Sᵀ). Not accepted with memory_source='gradients'."
            )
        },
    )
    weight_subspace_side: str | None = field(
        default=None,
        metadata={
            "help": (
                "Which singular vectors of each pre-trained weight W (d_out × d_in) form the protected input basis: "
                "'input' (paper; the authors' LLaVA code): right singular vectors; 'output' (the authors' CLIP code): "
                "left singular vectors, applied on the input side, so square weights only. None: from weight_subspace."
            )
        },
    )
    weight_energy_rule: str | None = field(
        default=None,
        metadata={
            "help": (
                "How ε_w picks the number p of directions from the cumulative energies c_p: 'inclusive' (paper): the "
                "smallest p with c_p ≥ ε_w; 'strict' (the authors' CLIP and LLaVA code): max(#{p : c_p < ε_w}, 1), "
                "usually one direction less. None: from weight_subspace. Reproducing the authors: CLIP (MTIL) = "
                "'output' + 'strict' (weight_subspace='official-clip'); LLaVA (MCITlib) = 'input' + 'strict'."
            )
        },
    )
    weight_subspace: str = field(
        default="input",
        metadata={
            "help": (
                "Shorthand kept for saved configs: 'input' (default): weight_subspace_side='input' with "
                "weight_energy_rule='inclusive' unless those are set; 'official-clip': the authors' CLIP code, "
                "weight_subspace_side='output' with weight_energy_rule='strict'. After validation it reads "
                "'official-clip' exactly for that combination and 'input' otherwise."
            )
        },
    )
    stats_dtype: str = field(
        default="float32",
        metadata={
            "help": (
                "dtype of the gradient and feature accumulators and of the protected bases: 'float32' or 'float64'."
            )
        },
    )
    svd_method: str = field(
        default="auto",
        metadata={
            "help": (
                "Factorisations of the residual gradient (adapter init) and of the feature second moments (memory "
                "update): 'exact' (torch.linalg.svd / eigh), 'randomized' (batched randomized SVD with svd_oversample "
                "and svd_power_iters), 'auto' (adapter init: randomized when r + oversample ≤ min(d_in, d_out) / 4; "
                "memory update: randomized for inputs of 2048 features or more)."
            )
        },
    )
    svd_oversample: int = field(default=8, metadata={"help": "Extra sketch columns of the randomized SVD."})
    svd_power_iters: int = field(default=4, metadata={"help": "Power iterations of the randomized SVD."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter branch's input (PEFT's)."})
    adapter_name: str = field(default="default", metadata={"help": "Name of the PEFT adapter KeepLoRA owns."})
    seed: int = field(default=0, metadata={"help": "Seed of the randomized SVD sketches and of a_init='random'."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars over the data passes."})

    def __post_init__(self) -> None:
        tm = self.target_modules
        if tm is not None:
            if isinstance(tm, str):
                if not tm:
                    raise ValueError("KeepLoRAConfig.target_modules must not be an empty string")
                try:
                    re.compile(tm)
                except re.error as exc:
                    raise ValueError(
                        f"KeepLoRAConfig.target_modules is not a valid regular expression: {exc}"
                    ) from None
            elif isinstance(tm, (list, tuple, set)) and tm and all(isinstance(t, str) and t for t in tm):
                self.target_modules = list(tm)
            else:
                raise ValueError(
                    "KeepLoRAConfig.target_modules must be None, a regex string or a non-empty list of "
                    f"module names, got {tm!r}"
                )
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"KeepLoRAConfig.r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            raise ValueError(f"KeepLoRAConfig.alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.weight_energy, Mapping):
            if not self.weight_energy:
                raise ValueError("KeepLoRAConfig.weight_energy must not be an empty mapping")
            for pattern, value in self.weight_energy.items():
                try:
                    re.compile(pattern)
                except (re.error, TypeError) as exc:
                    raise ValueError(
                        f"KeepLoRAConfig.weight_energy key {pattern!r} is not a valid regular expression: {exc}"
                    ) from None
                _fraction(f"weight_energy[{pattern!r}]", value)
            self.weight_energy = dict(self.weight_energy)
        else:
            _fraction("weight_energy", self.weight_energy)
        _fraction("feature_energy", self.feature_energy)
        _fraction("grad_data_fraction", self.grad_data_fraction, allow_zero=False)
        _fraction("lora_dropout", self.lora_dropout)
        _choice("b_init", self.b_init, ("gradient", "zero"))
        _choice("a_init", self.a_init, ("gradient", "random"))
        _choice("memory_source", self.memory_source, ("features", "gradients"))
        _choice("feature_stat", self.feature_stat, ("second-moment", "official-sketch"))
        if self.feature_stat == "official-sketch" and self.memory_source != "features":
            raise ValueError(
                "KeepLoRAConfig.feature_stat='official-sketch' is a statistic of the input features and needs "
                f"memory_source='features', got memory_source={self.memory_source!r}; use "
                "feature_stat='second-moment' with memory_source='gradients'"
            )
        self._resolve_weight_subspace()
        if isinstance(self.stats_dtype, torch.dtype):
            self.stats_dtype = {v: k for k, v in _STATS_DTYPES.items()}.get(self.stats_dtype, self.stats_dtype)
        _choice("stats_dtype", self.stats_dtype, tuple(_STATS_DTYPES))
        _choice("svd_method", self.svd_method, ("auto", "exact", "randomized"))
        for name in ("svd_oversample", "svd_power_iters", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"KeepLoRAConfig.{name} must be a non-negative integer, got {value!r}")
        if (
            not isinstance(self.grad_micro_batch, int)
            or isinstance(self.grad_micro_batch, bool)
            or self.grad_micro_batch < 0
        ):
            raise ValueError(
                "KeepLoRAConfig.grad_micro_batch must be a non-negative integer (tokens per micro-batch; "
                f"0 disables micro-batching), got {self.grad_micro_batch!r}"
            )
        if not isinstance(self.grad_offload, bool):
            raise ValueError(f"KeepLoRAConfig.grad_offload must be True or False, got {self.grad_offload!r}")
        if not isinstance(self.grad_checkpoint, bool):
            raise ValueError(f"KeepLoRAConfig.grad_checkpoint must be True or False, got {self.grad_checkpoint!r}")
        if not isinstance(self.adapter_name, str) or not self.adapter_name:
            raise ValueError(f"KeepLoRAConfig.adapter_name must be a non-empty string, got {self.adapter_name!r}")

    def _resolve_weight_subspace(self) -> None:
        _choice("weight_subspace", self.weight_subspace, ("input", "official-clip"))
        official = self.weight_subspace == "official-clip"
        for name, accepted, alias in (
            ("weight_subspace_side", ("input", "output"), "output"),
            ("weight_energy_rule", ("inclusive", "strict"), "strict"),
        ):
            value = getattr(self, name)
            if value is not None:
                _choice(name, value, accepted)
                if official and value != alias:
                    raise ValueError(
                        f"KeepLoRAConfig.weight_subspace='official-clip' means {name}={alias!r}, got "
                        f"{name}={value!r}; set weight_subspace='input' to combine the side and the "
                        "energy rule freely"
                    )
        if self.weight_subspace_side is None:
            self.weight_subspace_side = "output" if official else "input"
        if self.weight_energy_rule is None:
            self.weight_energy_rule = "strict" if official else "inclusive"
        clip = (self.weight_subspace_side, self.weight_energy_rule) == ("output", "strict")
        self.weight_subspace = "official-clip" if clip else "input"

    # ------------------------------------------------------------------ helpers
    def principal_subspace_options(self) -> dict[str, Any]:
        """Keyword arguments of ``keeplora_kernels.principal_subspace`` for the pre-trained bases."""
        return {"side": self.weight_subspace_side, "strict": self.weight_energy_rule == "strict"}

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.r

    @property
    def torch_stats_dtype(self) -> torch.dtype:
        return _STATS_DTYPES[self.stats_dtype]

    def weight_energy_for(self, module_name: str) -> float:
        """ε_w of one target; raises when a per-group mapping has no pattern for it."""
        if not isinstance(self.weight_energy, dict):
            return float(self.weight_energy)
        for pattern, value in self.weight_energy.items():
            if re.search(pattern, module_name):
                return float(value)
        raise ValueError(
            f"KeepLoRAConfig.weight_energy has no pattern matching target {module_name!r} "
            f"(patterns: {list(self.weight_energy)}); add one, e.g. '.*' last as a default"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KeepLoRAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"KeepLoRAConfig got unknown fields {unknown}; accepted: {sorted(known)}")
        return cls(**dict(data))
