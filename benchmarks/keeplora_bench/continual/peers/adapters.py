"""One LoRA adapter per task on a frozen linear layer, all of them active at once (the peers that keep their
adapters apart instead of merging them: InfLoRA, O-LoRA)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ..methods import Method


class TaskLoRALinear(nn.Module):
    """``y = W·x + b + scale · Σ_t B_t·A_t·x`` over every adapter added so far (no task id: all are summed).

    ``lora_A[t]`` is ``r × d_in``, ``lora_B[t]`` is ``d_out × r``. The base layer is kept as ``base_layer`` so that
    the runner's checkpoints recognise its unchanged weights (it compares them under the name without
    ``.base_layer``) and save only the adapters.
    """

    def __init__(self, base: nn.Linear, scale: float):
        super().__init__()
        if type(base) is not nn.Linear:
            raise TypeError(f"TaskLoRALinear adapts torch.nn.Linear layers only, got {type(base).__name__}")
        self.base_layer = base
        self.scale = float(scale)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()

    def add_adapter(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Append one task's adapter (copied to the base weight's device and dtype; it does not require grad)."""
        r = a.shape[0]
        if a.shape != (r, self.in_features) or b.shape != (self.out_features, r):
            raise ValueError(
                f"add_adapter: A must be (r, {self.in_features}) and B ({self.out_features}, r); "
                f"got A {tuple(a.shape)} and B {tuple(b.shape)}"
            )
        like = self.base_layer.weight
        self.lora_A.append(nn.Parameter(a.detach().to(like), requires_grad=False))
        self.lora_B.append(nn.Parameter(b.detach().to(like), requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not len(self.lora_A):
            return y
        # the sum over tasks as one product of the stacked factors: Σ_t B_t·A_t = [B_1 … B_T]·[A_1; …; A_T]
        a = torch.cat(list(self.lora_A), 0)
        b = torch.cat(list(self.lora_B), 1)
        return y + self.scale * F.linear(F.linear(x.to(a.dtype), a), b).to(y.dtype)


def attach_task_adapters(model: nn.Module, target_modules, scale: float) -> dict[str, TaskLoRALinear]:
    """Replace each target ``nn.Linear`` of ``model`` by a :class:`TaskLoRALinear` with no adapter yet; returns them
    by module name, in model order. Targets are matched as KeepLoRA matches them (a list of names ending like
    PEFT's, or a regex matching the whole name); every model parameter is frozen."""
    from keeplora.adapters import resolve_targets

    names = resolve_targets(model, SimpleNamespace(target_modules=target_modules, adapter_name="task_lora"))
    model.requires_grad_(False)
    layers = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = TaskLoRALinear(getattr(parent, child), scale)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers


def adapter_counts(layers: dict[str, TaskLoRALinear]) -> int:
    """The number of adapters every layer holds (they always hold the same number)."""
    counts = {len(layer.lora_A) for layer in layers.values()}
    if len(counts) != 1:
        raise RuntimeError(f"the adapted layers hold different numbers of task adapters: {sorted(counts)}")
    return counts.pop()


class TaskAdapterMethod(Method):
    """A method that adds one :class:`TaskLoRALinear` adapter per task on the shared ``adapter`` targets (r, alpha,
    target_modules); the adapters of earlier tasks are frozen and stay active. Checkpoints hold the adapters as model
    tensors (saved by the runner) and their number here."""

    def __init__(self, spec, encoder, seed):
        super().__init__(spec, encoder, seed)
        self.r = int(spec["r"])
        self.scale = float(spec["alpha"]) / self.r
        if self.r < 1:
            raise ValueError(f"method {spec['name']!r}: adapter r must be >= 1, got {self.r}")
        self.layers: dict[str, TaskLoRALinear] = {}

    def attach(self) -> None:
        if not self.layers:
            targets = self.spec["target_modules"]
            self.layers = attach_task_adapters(
                self.model, targets if isinstance(targets, str) else list(targets), self.scale
            )

    def current(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """``(A, B)`` of the newest adapter of every layer."""
        return [(layer.lora_A[-1], layer.lora_B[-1]) for layer in self.layers.values()]

    def extra_state(self, folder: Path) -> dict:
        return {**super().extra_state(folder), "adapters": adapter_counts(self.layers)}

    def load_extra_state(self, state: dict, folder: Path) -> None:
        # empty adapters of the saved shapes first: the runner then loads the saved tensors into them
        self.attach()
        for _ in range(int(state["adapters"])):
            for layer in self.layers.values():
                layer.add_adapter(torch.zeros(self.r, layer.in_features), torch.zeros(layer.out_features, self.r))
        super().load_extra_state(state, folder)
