"""The authors' research pipeline (CLIP/MTIL code path), re-implemented as a baseline for time and memory.

It computes the same algorithm as :class:`keeplora.KeepLoRA` the way the research code does it (all-parameter
gradients, dense projector, per-matrix SVD loops), so a profile can run both on one model and data:

* gradient estimate: every model parameter requires grad and gets ``.grad``; after each batch the target weights'
  gradients are copied to the host and summed there;
* residual projection with the dense projector ``(I − P·Pᵀ)`` (``d_in × d_in``) per matrix;
* one ``torch.svd_lowrank(q=4r, niter=4)`` per matrix, in a Python loop;
* LoRA layers computing ``base(x) + (x @ A @ B) * s`` (three kernels and an add; x is kept for backward);
* memory update from the batch-summed feature sketch ``Σ_b X_bᵀ`` (``d_in × tokens per batch``; batches must have
  equal token counts) with two full ``torch.linalg.svd`` per matrix and a Python loop over singular values. A module
  that sees inputs of several token counts per batch (e.g. texts and label prompts through one encoder) keeps one
  sketch per count, placed side by side.

The pre-trained subspace uses the input side and the non-strict energy rule, like ours, so the two produce
comparable bases; the research code's other departures (docs/algorithm.md) are *not* reproduced here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from keeplora.statistics import model_loss, move_to_device


class AuthorsLoRALinear(nn.Module):
    """``y = base(x) + (x @ A @ B) * s`` with A (``d_in × r``) a frozen buffer and B (``r × d_out``) trained."""

    def __init__(self, base: nn.Linear, r: int, scale: float):
        super().__init__()
        self.base = base
        self.scale = scale
        self.register_buffer("lora_A", base.weight.new_zeros(base.in_features, r))
        self.lora_B = nn.Parameter(base.weight.new_zeros(r, base.out_features))

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A @ self.lora_B) * self.scale


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class AuthorsKeepLoRA:
    """Same lifecycle API as :class:`keeplora.KeepLoRA` (``begin_task``/``end_task``/``trainable_parameters``)."""

    def __init__(
        self,
        model: nn.Module,
        target_names: list[str],
        *,
        r: int,
        alpha: float,
        weight_energy: float,
        feature_energy: float,
        progress: bool = False,
    ):
        self.model = model
        self.r = r
        self.scale = alpha / r
        self.feature_energy = feature_energy
        self.layers: dict[str, AuthorsLoRALinear] = {}
        for name in target_names:
            base = model.get_submodule(name)
            if not isinstance(base, nn.Linear):
                raise ValueError(f"{name} is not an nn.Linear")
            layer = AuthorsLoRALinear(base, r, self.scale)
            _replace(model, name, layer)
            self.layers[name] = layer
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in self.layers.values():
            layer.lora_B.requires_grad_(True)
        self.device = next(iter(self.layers.values())).weight.device
        self.bases: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():  # one full SVD per matrix, in a loop
            _, s, vh = torch.linalg.svd(layer.weight.detach().float(), full_matrices=False)
            ratio = (s**2) / (s**2).sum()
            cumulative = torch.cumsum(ratio, 0)
            p = int((cumulative - ratio < weight_energy).sum()) if weight_energy > 0 else 0
            self.bases[name] = vh[:p].t().contiguous()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [layer.lora_B for layer in self.layers.values()]

    def begin_task(self, dataloader: Iterable[Any], loss_fn: Callable | None = None) -> None:
        loss_fn = loss_fn or model_loss
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in flags:  # the research code leaves the whole encoder trainable for the gradient pass
            p.requires_grad_(True)
        sums = {name: torch.zeros(layer.weight.shape, dtype=torch.float32) for name, layer in self.layers.items()}
        count = 0
        for batch in dataloader:
            self.model.zero_grad(set_to_none=False)
            loss = loss_fn(self.model, move_to_device(batch, self.device))
            loss.backward()
            for name, layer in self.layers.items():
                sums[name] += layer.weight.grad.detach().float().to("cpu", copy=True)  # host copy per batch
            count += 1
        self.model.zero_grad(set_to_none=True)
        for p, flag in flags:
            p.requires_grad_(flag)
        with torch.no_grad():
            for name, layer in self.layers.items():  # one matrix at a time
                grad = (sums[name] / count).to(self.device)
                basis = self.bases[name]
                projector = torch.eye(basis.shape[0], device=self.device) - basis @ basis.t()  # dense d_in × d_in
                residual = projector @ grad.t()
                u, s, v = torch.svd_lowrank(residual, q=min(4 * self.r, *residual.shape), niter=4)
                a = u[:, : self.r]
                b = torch.diag(s[: self.r]) @ v[:, : self.r].t()
                layer.lora_A.copy_(a.to(layer.lora_A.dtype))
                layer.lora_B.copy_(b.to(layer.lora_B.dtype))
                layer.base.weight -= (self.scale * (a @ b).t()).to(layer.weight.dtype)

    def end_task(self, dataloader: Iterable[Any], loss_fn: Callable | None = None) -> None:
        loss_fn = loss_fn or model_loss
        with torch.no_grad():
            for layer in self.layers.values():
                layer.base.weight += (self.scale * (layer.lora_A @ layer.lora_B).t()).to(layer.weight.dtype)
                layer.lora_A.zero_()
                layer.lora_B.zero_()
        sketches: dict[str, dict[int, torch.Tensor]] = {}  # module -> {tokens per call: d_in × tokens sketch}
        tokens = {"n": 0}

        def hook(name):
            def fn(_m, args, _o):
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                per_count = sketches.setdefault(name, {})
                if x.shape[0] not in per_count:
                    if per_count and tokens["n"] > 0:
                        raise ValueError(
                            "the research code's feature sketch needs equal tokens per batch "
                            f"(a call with {x.shape[0]} tokens after {sorted(per_count)})"
                        )
                    per_count[x.shape[0]] = torch.zeros(x.shape[1], x.shape[0], device=x.device)
                per_count[x.shape[0]] += x.t()

            return fn

        handles = [layer.register_forward_hook(hook(n)) for n, layer in self.layers.items()]
        self.model.eval()
        with torch.no_grad():
            for batch in dataloader:
                loss_fn(self.model, move_to_device(batch, self.device))
                tokens["n"] += 1
        for h in handles:
            h.remove()
        for name, per_count in sketches.items():  # two full SVDs per matrix and a Python loop, as in GPM
            sketch = torch.cat([per_count[c] for c in sorted(per_count)], 1)
            basis = self.bases[name]
            activation = sketch / max(1, tokens["n"])
            _, s, _ = torch.linalg.svd(activation, full_matrices=False)
            total = (s**2).sum()
            projector = torch.eye(basis.shape[0], device=activation.device) - basis @ basis.t()
            residual = projector @ activation
            u, s_hat, _ = torch.linalg.svd(residual, full_matrices=False)
            captured = float((total - (s_hat**2).sum()) / total)
            ratio = ((s_hat**2) / total).tolist()
            added = 0
            for value in ratio:
                if captured >= self.feature_energy:
                    break
                captured += value
                added += 1
            added = min(added, basis.shape[0] - basis.shape[1])
            if added:
                self.bases[name] = torch.cat([basis, u[:, :added]], 1)
