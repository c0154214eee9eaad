"""Target resolution and the PEFT LoRA layers KeepLoRA owns.

KeepLoRA uses PEFT's own ``lora.Linear`` layers (so PEFT tooling, saving and ``PeftModel`` keep working) and swaps
their class to :class:`KeepLoRALinear`, a subclass that only changes ``forward``: when the layer is in KeepLoRA's
configuration (one active adapter, W and A frozen, no dropout in effect) it runs the fused frozen-A op
``keeplora_kernels.lora_linear``, which keeps ``s = x·Aᵀ`` (T×r) for backward instead of x (T×d_in). Any other
configuration falls back to PEFT's forward, so behaviour never silently changes.

Targets are ``torch.nn.Linear`` and transformers' ``Conv1D`` (GPT-2 family), which stores its weight ``d_in × d_out``
(PEFT's ``fan_in_fan_out``). :func:`target_weight` is the one place that reads a target's base weight: it gives it as
``d_out × d_in`` for both (a Conv1D weight's transpose, a view, so in-place writes reach the stored weight); PEFT's
``lora_A`` / ``lora_B`` are ``r × d_in`` / ``d_out × r`` for both.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator, Mapping

import torch
from peft import LoraConfig, PeftModel, inject_adapter_in_model
from peft.tuners.lora import layer as lora_layer
from peft.tuners.lora.layer import LoraLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

import keeplora_kernels as kk

from .config import KeepLoRAConfig

SUPPORTED_LAYERS = "supported: torch.nn.Linear, transformers Conv1D (GPT-2 family)"


def _base_of(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, LoraLayer) else module


def is_supported(module: nn.Module) -> bool:
    """Whether KeepLoRA can adapt ``module`` (a bare layer or a PEFT LoRA layer around one): its type is exactly
    ``torch.nn.Linear`` or transformers' ``Conv1D`` (subclasses such as quantized linears are not)."""
    return type(_base_of(module)) in (nn.Linear, Conv1D)


def target_weight(module: nn.Module) -> torch.Tensor:
    """The base weight of a target (a bare layer or a PEFT LoRA layer) as ``d_out × d_in``: ``nn.Linear``'s own
    weight, or the transpose of a ``Conv1D``'s ``d_in × d_out`` weight (a view: in-place writes reach the stored
    weight, and a DTensor stays one)."""
    base = _base_of(module)
    return base.weight.t() if type(base) is Conv1D else base.weight


def target_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a target (a bare layer or a PEFT LoRA layer); the global shape of a sharded weight."""
    d_out, d_in = target_weight(module).shape
    return int(d_out), int(d_in)


class KeepLoRALinear(lora_layer.Linear):
    """PEFT's LoRA ``Linear`` with the frozen-A fused forward; identical state and state-dict keys."""

    _keeplora_bypass = False  # set by adapters_bypassed(): the adapter is known to be zero, run the base layer only

    def _fused_adapter(self) -> str | None:
        """The adapter the fused path can run, or None when PEFT's general forward is needed."""
        active = self.active_adapters
        if self.disable_adapters or self.merged or len(active) != 1:
            return None
        name = active[0]
        if name not in self.lora_A or name in self.lora_variant or not is_supported(self.base_layer):
            return None
        if self.lora_A[name].weight.requires_grad or self.base_layer.weight.requires_grad:
            return None
        dropout = self.lora_dropout[name]
        if self.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
            return None
        return name

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._keeplora_bypass and not (args or kwargs):
            return self.base_layer(x)
        name = None if (args or kwargs) else self._fused_adapter()
        if name is None:
            return super().forward(x, *args, **kwargs)
        return kk.lora_linear(
            x,
            target_weight(self.base_layer),
            self.base_layer.bias,
            self.lora_A[name].weight,
            self.lora_B[name].weight,
            self.scaling[name],
        )


@contextlib.contextmanager
def adapters_bypassed(layers: Mapping[str, nn.Module]) -> Iterator[None]:
    """Inside, the :class:`KeepLoRALinear` layers run their base layer only. For passes where every adapter is
    exactly zero (B = 0: the function and the input gradients are the base layer's), this skips the adapter
    branch's kernels: the shrink and the rank-r update of the output in forward, two more in backward."""
    for layer in layers.values():
        layer._keeplora_bypass = True
    try:
        yield
    finally:
        for layer in layers.values():
            layer._keeplora_bypass = False


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``PeftModel`` (module names relative to it are PEFT's state-dict keys)."""
    if isinstance(model, PeftModel):
        return model.base_model.model
    return model


def _default_targets(model: nn.Module) -> list[str]:
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in mapping:
        raise ValueError(
            "KeepLoRAConfig.target_modules is None and PEFT has no default targets for model type "
            f"{model_type!r}; name the modules to adapt, e.g. target_modules=['q_proj', 'v_proj']"
        )
    return list(mapping[model_type])


def _entry_matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def resolve_targets(model: nn.Module, config: KeepLoRAConfig) -> list[str]:
    """Full names (relative to the unwrapped model) of the modules to adapt, in model order.

    Names in a list match like PEFT's (equal, or ending with '.' + entry); a string is a regex that must match the
    whole name. Raises ``ValueError`` naming every list entry that matches nothing and every match that is neither a
    ``torch.nn.Linear`` nor a transformers ``Conv1D`` (exact types).
    """
    root = unwrap_model(model)
    existing = _adapter_layers(root, config.adapter_name)
    spec = config.target_modules
    if spec is None:
        spec = sorted(existing) if existing else _default_targets(root)
    names, not_linear, used_entries = [], [], set()
    for name, module in root.named_modules():
        if not name or ".lora_" in name or name.endswith(".base_layer"):
            continue
        if isinstance(spec, str):
            hit = re.fullmatch(spec, name) is not None
        else:
            entries = {e for e in spec if _entry_matches(name, e)}
            used_entries |= entries
            hit = bool(entries)
        if not hit:
            continue
        if is_supported(module):
            names.append(name)
        else:
            base = _base_of(module)
            not_linear.append(f"{name} ({type(base).__module__}.{type(base).__qualname__})")
    if isinstance(spec, list) and len(used_entries) < len(spec):
        missing = [e for e in spec if e not in used_entries]
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in root.named_modules() if n and is_supported(m)})
        raise ValueError(
            f"KeepLoRAConfig.target_modules: no module matches {missing}; the nn.Linear / Conv1D modules of "
            f"this model have names ending with one of {linear_names}"
        )
    if not_linear:
        raise ValueError(
            "KeepLoRAConfig.target_modules matched modules that are not torch.nn.Linear or transformers Conv1D: "
            f"{not_linear[:8]} ({SUPPORTED_LAYERS})"
        )
    if not names:
        raise ValueError(
            f"KeepLoRAConfig.target_modules={spec!r} matches no nn.Linear or Conv1D module of the model "
            f"({SUPPORTED_LAYERS})"
        )
    return names


def _adapter_layers(root: nn.Module, adapter: str) -> dict[str, LoraLayer]:
    return {name: m for name, m in root.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


def check_shapes(model: nn.Module, names: list[str], config: KeepLoRAConfig) -> None:
    """Reject ``r`` larger than a target's input size (A would not have r orthonormal columns)."""
    root = unwrap_model(model)
    modules = dict(root.named_modules())
    for name in names:
        d_out, d_in = target_shape(modules[name])
        if config.r > d_in:
            raise ValueError(f"KeepLoRAConfig.r = {config.r} exceeds d_in = {d_in} of target {name!r}; use r ≤ {d_in}")
        if config.weight_subspace_side == "output":
            if d_out != d_in:
                raise ValueError(
                    "KeepLoRAConfig.weight_subspace_side='output' (also implied by "
                    "weight_subspace='official-clip') applies output-space singular vectors on the input "
                    f"side, which needs square weights; {name!r} is {(d_out, d_in)} (d_out, d_in). Use "
                    "weight_subspace_side='input'."
                )
        config.weight_energy_for(name)  # every target needs an ε_w


def fan_in_fan_out(root: nn.Module, names: list[str]) -> bool:
    """PEFT's ``LoraConfig.fan_in_fan_out`` for these targets: True when they are Conv1D layers (weight stored
    ``d_in × d_out``). PEFT sets it per layer at injection anyway (warning where the config disagrees, which
    attach_adapters silences), so a model whose targets mix both types gets the value of the majority."""
    modules = dict(root.named_modules())
    conv = sum(type(_base_of(modules[n])) is Conv1D for n in names)
    return 2 * conv > len(names)


def attach_adapters(model: nn.Module, names: list[str], config: KeepLoRAConfig) -> dict[str, KeepLoRALinear]:
    """Put KeepLoRA's PEFT LoRA adapter on every target (reusing an existing adapter of that name), A and B zero,
    A frozen, B trainable, every other parameter of the model frozen. Returns ``{name: layer}``."""
    root = unwrap_model(model)
    existing = _adapter_layers(root, config.adapter_name)
    if existing:
        if sorted(existing) != sorted(names):
            raise ValueError(
                f"the model's PEFT adapter {config.adapter_name!r} adapts {sorted(existing)}, but "
                f"KeepLoRAConfig.target_modules selects {sorted(names)}"
            )
        for name, layer in existing.items():
            a = layer.lora_A[config.adapter_name].weight
            if a.shape[0] != config.r or abs(layer.scaling[config.adapter_name] - config.scale) > 1e-12:
                raise ValueError(
                    f"the model's PEFT adapter {config.adapter_name!r} has r={a.shape[0]} and scale "
                    f"{layer.scaling[config.adapter_name]} at {name!r}; KeepLoRAConfig asks for "
                    f"r={config.r}, scale alpha/r={config.scale}"
                )
            if config.adapter_name in layer.lora_variant:
                raise ValueError(
                    f"the PEFT adapter {config.adapter_name!r} uses a LoRA variant (e.g. DoRA) at "
                    f"{name!r}; KeepLoRA needs plain LoRA"
                )
    else:
        lora_config = LoraConfig(
            r=config.r,
            lora_alpha=config.alpha,
            target_modules=list(names),
            lora_dropout=config.lora_dropout,
            bias="none",
            fan_in_fan_out=fan_in_fan_out(root, names),
        )
        with warnings.catch_warnings():
            # targets mixing nn.Linear and Conv1D: PEFT sets fan_in_fan_out right per layer, warning for each
            warnings.filterwarnings("ignore", message="fan_in_fan_out is set to", category=UserWarning)
            if isinstance(model, PeftModel):
                model.add_adapter(config.adapter_name, lora_config)
            else:
                inject_adapter_in_model(lora_config, root, adapter_name=config.adapter_name)
    if isinstance(model, PeftModel):
        model.set_adapter(config.adapter_name)
    modules = dict(root.named_modules())
    layers = {}
    for name in names:
        layer = modules[name]
        if type(layer) is lora_layer.Linear:
            layer.__class__ = KeepLoRALinear
        if not isinstance(layer, KeepLoRALinear):
            raise TypeError(f"target {name!r} is a {type(layer).__name__}, not a plain PEFT LoRA Linear")
        layers[name] = layer
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        with torch.no_grad():
            layer.lora_A[config.adapter_name].weight.zero_()
            layer.lora_B[config.adapter_name].weight.zero_()
    freeze_adapters(layers, config.adapter_name)
    return layers


def freeze_adapters(layers: dict[str, LoraLayer], adapter: str) -> None:
    """A frozen, B trainable (PEFT's ``set_adapter`` makes both trainable; call again after using it)."""
    for layer in layers.values():
        layer.lora_A[adapter].weight.requires_grad_(False)
        layer.lora_B[adapter].weight.requires_grad_(True)
