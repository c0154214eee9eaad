"""MagMax: sequential fine-tuning, evaluated through a maximum-magnitude merge of the task vectors.

Source: Marczak, Twardowski, Trzciński, Cygert, "MagMax: Leveraging Model Merging for Seamless Continual Learning"
(ECCV 2024; code github.com/danielm1405/magmax). The model is fine-tuned on the tasks in turn, each task starting from
the previous task's fine-tuned model (the sequential chain ``θ_1, θ_2, ...`` from the pre-trained ``θ_0``). After
task ``t`` the task vectors are ``τ_i = θ_i − θ_0`` (i ≤ t); the merged vector takes, for every parameter entry, the
``τ_i`` of largest magnitude (sign kept; on a tie the later task wins, as the authors' ``>=``), and the evaluated model
is ``θ_0 + λ · τ_merged``. Training of task ``t + 1`` continues from ``θ_t`` (the chain), not from the merged model.

Keys (method entry): ``r``, ``alpha``, ``target_modules`` (the adapter section's: the chain is this benchmark's LoRA-FT)
and ``merge_scale`` (λ, default 0.5: the authors' MagMax coefficient).

Deviations from the authors' code:

* the chain is sequential LoRA fine-tuning (peft LoRA merged into the weights after each task, as ``lora_ft``), not
  full fine-tuning of the encoder, so the task vectors are non-zero on the adapted weights only (the merge runs over
  every floating-point parameter, as the authors', and leaves the untouched ones at ``θ_0``);
* the merge is evaluated after every task (the benchmark's T x T protocol) from the running maximum, which equals the
  authors' merge of ``τ_1..τ_t`` recomputed at each step;
* the merged vector is kept in memory and in the checkpoints only for the parameters some task changed.
"""

from __future__ import annotations

import contextlib

import torch

from ..methods import LoRAFineTuning


def max_magnitude(previous: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
    """Entry-wise the one of ``previous`` and ``delta`` with the larger magnitude; ``delta`` on a tie."""
    if previous is None:
        return delta.clone()
    return torch.where(delta.abs() >= previous.abs(), delta, previous)


class MagMax(LoRAFineTuning):
    """Sequential LoRA-FT, evaluated as ``θ_0 + λ · maxmag(τ_1..τ_t)`` (module docstring)."""

    def __init__(self, spec, encoder, seed):
        super().__init__(spec, encoder, seed)
        self.theta0 = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.is_floating_point()}
        self.merged: dict[str, torch.Tensor] = {}  # parameter name -> running max-magnitude task vector

    @torch.no_grad()
    def end_task(self, task, data, loader):
        super().end_task(task, data, loader)  # the chain: LoRA merged into the weights
        latest = total = 0
        for name, p in self.model.named_parameters():
            if name not in self.theta0:
                continue
            delta = p.detach() - self.theta0[name]
            if name not in self.merged and not delta.any():
                continue
            merged = max_magnitude(self.merged.get(name), delta)
            latest += int(((merged == delta) & (delta != 0)).sum())
            total += int((merged != 0).sum())
            self.merged[name] = merged
        self.info.append({"merged_tensors": len(self.merged), "latest_task_share": latest / max(total, 1)})

    @contextlib.contextmanager
    def eval_model(self):
        """Swap ``θ_0 + λ · τ_merged`` in for the evaluation, the chain back afterwards."""
        if not self.merged:
            yield
            return
        params = dict(self.model.named_parameters())
        scale = float(self.spec["merge_scale"])
        chain = {name: params[name].detach().clone() for name in self.merged}
        try:
            with torch.no_grad():
                for name, tau in self.merged.items():
                    params[name].copy_(self.theta0[name] + scale * tau)
            yield
        finally:
            with torch.no_grad():
                for name, weights in chain.items():
                    params[name].copy_(weights)

    def extra_state(self, folder):
        return super().extra_state(folder) | {"magmax": {k: v.clone() for k, v in self.merged.items()}}

    def load_extra_state(self, state, folder):
        super().load_extra_state(state, folder)
        self.merged = {k: v.clone() for k, v in state.get("magmax", {}).items()}
