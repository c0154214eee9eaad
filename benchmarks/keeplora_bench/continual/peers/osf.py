"""OSF: orthogonal subspace fine-tuning, used from PEFT (``peft.OSFConfig``, PEFT >= 0.18), not re-implemented.

Source: Nayak et al., "Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for Continual Learning"
(arXiv 2504.07097), as integrated in PEFT (``peft.tuners.osf``). Each adapted weight is split by its SVD into the top
``k`` singular directions (frozen, "preserved") and the rest (``U_low``, ``S_low``, ``V_low``: trainable, gradients
projected orthogonally to the preserved directions by hooks PEFT installs).

Recipe: PEFT's documented sequential one — wrap the model with ``OSFConfig(effective_rank=k_t)``, train the task,
take the plain model back, wrap it again for the next task (a fresh SVD of the updated weights) with a preserved rank
raised by ``rank_step``: ``k_t = effective_rank + t * rank_step`` (``t`` = 0 for the first task; an int is a number
of directions, a float in (0, 1) a fraction of each weight's smaller dimension).

Keys (method entry): ``target_modules`` (the adapter section's), ``effective_rank`` (default 8) and ``rank_step``
(default 4), PEFT's recipe values. The learning rate is the method's ``lr`` (PEFT advises 1e-5 to 1e-4; configs set it
and ``keeplora sweep`` chooses it on validation).

Deviations from the documented recipe and from the authors' code:

* between tasks the model is taken back with ``merge_and_unload()``, not ``unload()`` as PEFT's example writes: in
  PEFT ``unload()`` drops the adapter without merging, which would throw the task's training away;
* ``k_t`` is capped at ``min(weight.shape) - 1`` so every task keeps one trainable direction (PEFT would otherwise
  clamp to the full dimension and train nothing); ``info`` records the preserved rank of every module per task;
* the optimizer is the benchmark's shared AdamW over ``U_low``, ``S_low``, ``V_low`` with one weight decay (PEFT
  suggests per-factor decays). Adam rescales each coordinate of the (projected) gradient, so its step is not exactly
  orthogonal to the preserved directions: the update leaks into them. ``info["preserved_leak"]`` records, per task,
  the largest ``‖U_kᵀ ΔW‖ / ‖ΔW‖`` over the modules (0 under plain gradient descent);
* the paper chooses the preserved ranks adaptively per layer ("adaptive SVD"); PEFT's recipe, used here, raises one
  rank for every module.
"""

from __future__ import annotations

import re

import torch

from ..methods import Method, _targets, merge_peft, wrap_peft

MIN_PEFT = "0.18"  # the first PEFT release with OSFConfig


def osf_missing() -> str | None:
    """Why OSF cannot run here (the installed PEFT lacks ``OSFConfig``), or None when it can."""
    try:
        from peft import OSFConfig  # noqa: F401
    except ImportError:
        import peft

        return (
            f"method type 'osf' needs peft >= {MIN_PEFT} (peft.OSFConfig); the installed peft is "
            f"{getattr(peft, '__version__', '?')}: pip install 'peft>={MIN_PEFT}' (or the 'bench' extra)"
        )
    return None


def _resolve(value: int | float, min_dim: int) -> int:
    """A rank key's value for one weight: an int as given, a float in (0, 1) as a fraction of ``min_dim``."""
    return int(min_dim * value) if isinstance(value, float) else int(value)


class OSFFineTuning(Method):
    """Sequential OSF through PEFT (module docstring)."""

    def __init__(self, spec, encoder, seed):
        super().__init__(spec, encoder, seed)
        missing = osf_missing()
        if missing:
            raise RuntimeError(f"method {spec['name']!r}: {missing}")
        self.peft_model = None
        self.ranks: dict[str, int] = {}
        self.pre_task: dict[str, torch.Tensor] = {}

    def preserved_ranks(self, task: int) -> dict[str, int]:
        """``{module name: k_t}`` for every targeted linear module (PEFT's own target matching)."""
        from peft import OSFConfig
        from peft.tuners.tuners_utils import check_target_module_exists

        probe = OSFConfig(target_modules=_targets(self.spec["target_modules"]))
        ranks = {}
        for name, module in self.model.named_modules():
            weight = getattr(module, "weight", None)
            if name and isinstance(module, torch.nn.Linear) and check_target_module_exists(probe, name):
                min_dim = min(weight.shape)
                k = _resolve(self.spec["effective_rank"], min_dim) + task * _resolve(self.spec["rank_step"], min_dim)
                ranks[name] = max(1, min(k, min_dim - 1))
        if not ranks:
            raise RuntimeError(f"method {self.spec['name']!r}: target_modules match no linear module of the model")
        return ranks

    def begin_task(self, task, data, loader):
        from peft import OSFConfig

        self.ranks = self.preserved_ranks(task)
        self.pre_task = {n: m.weight.detach().clone() for n, m in self.model.named_modules() if n in self.ranks}
        cfg = OSFConfig(
            target_modules=sorted(self.ranks),
            effective_rank=max(self.ranks.values()),
            rank_pattern={f"^{re.escape(name)}$": k for name, k in self.ranks.items()},
        )
        self.peft_model = wrap_peft(self.model, cfg)

    def parameters(self, task):
        return [p for n, p in self.model.named_parameters() if p.requires_grad and "osf_svd_params" in n]

    def end_task(self, task, data, loader):
        merge_peft(self.peft_model, self.model)
        self.peft_model = None
        modules = dict(self.model.named_modules())
        self.info.append(
            {
                "preserved_rank": dict(self.ranks),
                "preserved_leak": max(
                    preserved_leak(w, modules[n].weight, self.ranks[n]) for n, w in self.pre_task.items()
                ),
            }
        )
        self.pre_task = {}


@torch.no_grad()
def preserved_leak(before: torch.Tensor, after: torch.Tensor, k: int) -> float:
    """``max(‖U_kᵀ ΔW‖, ‖ΔW V_k‖) / ‖ΔW‖`` for the top-``k`` singular directions of ``before`` (0: untouched)."""
    delta = (after - before).double()
    norm = float(delta.norm())
    if norm == 0.0:
        return 0.0
    u, _, vh = torch.linalg.svd(before.double(), full_matrices=False)
    return max(float((u[:, :k].T @ delta).norm()), float((delta @ vh[:k].T).norm())) / norm
