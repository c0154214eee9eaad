"""The continual-learning methods compared by ``keeplora run``, on one shared training loop.

Every method sees the same tasks, batches (same order, from the same seed), epochs, optimizer (AdamW) and schedule;
methods differ only in what is trained and how the weights evolve between tasks:

* ``zero_shot`` — nothing is trained (the pretrained encoder at every step).
* ``full_ft`` — every encoder parameter is trained on each task in turn.
* ``lora_ft`` — sequential LoRA (peft, standard init: A Kaiming-uniform, B = 0, no dropout) on the adapted
  modules; A and B train; merged into the weights after each task, a fresh adapter for the next one.
* ``keeplora`` — the engine (``keeplora.KeepLoRA``): ``begin_task`` (residual-gradient init of A, B), training of
  the B's, ``end_task`` (merge, feature memory). With ``head: true`` it is KeepLoRA+: a per-task cosine head
  (scale 30, initialised at the normalised class means of the task's training embeddings after ``begin_task``)
  trained with the B's; its logits are added to the prompt logits for that task (as in the authors' code).
  The ablations are configs: ``weight_energy: 0`` (no pretrained subspace), ``feature_energy: 0`` (no task
  memory), ``a_init: random`` (A random inside the residual subspace).
* the peers (``peers/``, each module names its source and its deviations): ``inflora``, ``olora``.
"""

from __future__ import annotations

import contextlib
import importlib
import shutil
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import TaskData
from .model import Batch, CosineHead, TextEncoder, prompt_logits


class Method:
    trains = True
    progress = False  # the engine's own progress bars over its data passes

    def __init__(self, spec: dict, encoder: TextEncoder, seed: int):
        self.spec = spec
        self.encoder = encoder
        self.seed = seed
        self.heads: dict[int, CosineHead] = {}
        self.info: list[dict] = []  # per finished task: anything worth reporting (e.g. basis sizes)

    @property
    def model(self) -> nn.Module:
        return self.encoder.model

    def loss_fn(self, task: int):
        """``fn(model, batch) -> loss`` over the prompt logits (plus the task's head when it has one)."""

        def fn(model, batch: Batch):
            b = batch.to(next(model.parameters()).device)
            return F.cross_entropy(prompt_logits(self.encoder, b, model, self.heads.get(task)), b.labels)

        return fn

    def begin_task(self, task: int, data: TaskData, loader: list[Batch]) -> None:
        pass

    def parameters(self, task: int) -> list[nn.Parameter]:
        """What the optimizer of ``task`` trains (called after ``begin_task``)."""
        raise NotImplementedError

    def end_task(self, task: int, data: TaskData, loader: list[Batch]) -> None:
        pass

    def eval_model(self):
        """The context the runner evaluates in: the model as trained (MagMax swaps its merged model in)."""
        return contextlib.nullcontext()

    # checkpoints: the model's changed tensors are saved by the runner; methods add their own state here
    def extra_state(self, folder: Path) -> dict:
        return {"heads": {t: h.state_dict() | {"scale": h.scale} for t, h in self.heads.items()}}

    def load_extra_state(self, state: dict, folder: Path) -> None:
        for t, sd in state.get("heads", {}).items():
            head = CosineHead(sd["weight"], sd["scale"])
            head.load_state_dict({"weight": sd["weight"]})
            self.heads[int(t)] = head


class ZeroShot(Method):
    trains = False

    def parameters(self, task):
        return []


class FullFineTuning(Method):
    def begin_task(self, task, data, loader):
        for p in self.model.parameters():
            p.requires_grad_(True)

    def parameters(self, task):
        return [p for p in self.model.parameters() if p.requires_grad]


def wrap_peft(model: nn.Module, peft_config):
    """``get_peft_model(model, peft_config)``, injecting in place into ``model``. PEFT reads transformers'
    deprecated ``is_gradient_checkpointing`` there, a FutureWarning that is neither the user's nor ours."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, peft_config)


def merge_peft(peft_model, model: nn.Module) -> None:
    """Merge a PEFT model's adapters into ``model`` (which PEFT injected them into) and freeze every parameter."""
    merged = peft_model.merge_and_unload()
    assert merged is model, "peft merged into a new object; the encoder would lose its weights"
    for p in model.parameters():
        p.requires_grad_(False)


class LoRAFineTuning(Method):
    """Sequential LoRA with peft's standard initialisation, merged after each task."""

    def __init__(self, spec, encoder, seed):
        super().__init__(spec, encoder, seed)
        self.peft_model = None

    def begin_task(self, task, data, loader):
        from peft import LoraConfig

        cfg = LoraConfig(
            r=int(self.spec["r"]),
            lora_alpha=float(self.spec["alpha"]),
            lora_dropout=0.0,
            target_modules=_targets(self.spec["target_modules"]),
            bias="none",
        )
        self.peft_model = wrap_peft(self.model, cfg)

    def parameters(self, task):
        return [p for n, p in self.model.named_parameters() if p.requires_grad and "lora_" in n]

    def end_task(self, task, data, loader):
        merge_peft(self.peft_model, self.model)
        self.peft_model = None


class KeepLoRAMethod(Method):
    """KeepLoRA (and KeepLoRA+ with ``head: true``) through the engine's public API."""

    def __init__(self, spec, encoder, seed):
        super().__init__(spec, encoder, seed)
        try:
            from keeplora import KeepLoRA, KeepLoRAConfig  # noqa: F401
        except ImportError as e:
            raise RuntimeError(
                f"method {spec['name']!r} needs the KeepLoRA engine (keeplora.KeepLoRA), which "
                f"this installation does not have: {e}"
            ) from None
        self.kl = None

    def engine_config(self):
        from keeplora import KeepLoRAConfig

        s = self.spec
        return KeepLoRAConfig(
            target_modules=_targets(s["target_modules"]),
            r=int(s["r"]),
            alpha=float(s["alpha"]),
            weight_energy=_energy(s["weight_energy"]),
            feature_energy=float(s["feature_energy"]),
            b_init=s["b_init"],
            a_init=s["a_init"],
            grad_data_fraction=float(s["grad_data_fraction"]),
            feature_stat=s.get("feature_stat", "second-moment"),
            seed=int(self.seed),
            progress=self.progress,
        )

    def setup(self) -> None:
        from keeplora import KeepLoRA

        self.kl = KeepLoRA(self.model, self.engine_config())

    def begin_task(self, task, data, loader):
        if self.kl is None:
            self.setup()
        self.kl.begin_task(loader, loss_fn=self.loss_fn(task))
        if self.spec.get("head"):
            self.heads[task] = CosineHead(class_means(self.encoder, loader, len(data.task.classes)))

    def parameters(self, task):
        params = list(self.kl.trainable_parameters())
        for t, head in self.heads.items():
            head.weight.requires_grad_(t == task)
        if task in self.heads:
            params.append(self.heads[task].weight)
        return params

    def end_task(self, task, data, loader):
        self.kl.end_task(loader, loss_fn=self.loss_fn(task))
        self.info.append(
            {
                "basis_sizes": {name: int(b.shape[1]) for name, b in self.kl.bases.items()},
                "d_in": {name: int(layer.in_features) for name, layer in self.kl.layers.items()},
            }
        )

    def extra_state(self, folder: Path) -> dict:
        target = folder / "keeplora"
        if target.exists():
            shutil.rmtree(target)
        self.kl.save(target)
        return super().extra_state(folder)

    def load_extra_state(self, state: dict, folder: Path) -> None:
        from keeplora import KeepLoRA

        self.kl = KeepLoRA.load(folder / "keeplora", self.model)
        super().load_extra_state(state, folder)


def _targets(value):
    """A regex string (full match on module names, as peft and the engine read it) or a list of names."""
    return value if isinstance(value, str) else list(value)


def _energy(value):
    return {str(k): float(v) for k, v in value.items()} if isinstance(value, dict) else float(value)


METHODS = {"zero_shot": ZeroShot, "full_ft": FullFineTuning, "lora_ft": LoRAFineTuning, "keeplora": KeepLoRAMethod}
PEER_METHODS = {  # type -> (module in peers/, class): imported when built, since they subclass the classes above
    "inflora": ("inflora", "InfLoRA"),
    "olora": ("olora", "OLoRA"),
    "magmax": ("magmax", "MagMax"),
    "osf": ("osf", "OSFFineTuning"),
}


def build_method(spec: dict, encoder: TextEncoder, seed: int) -> Method:
    if spec["type"] in PEER_METHODS:
        module, name = PEER_METHODS[spec["type"]]
        return getattr(importlib.import_module(f".peers.{module}", __package__), name)(spec, encoder, seed)
    return METHODS[spec["type"]](spec, encoder, seed)


@torch.no_grad()
def class_means(encoder: TextEncoder, loader: list[Batch], num_classes: int) -> torch.Tensor:
    """Mean embedding per class over a task's training batches (current weights, eval mode)."""
    was_training = encoder.model.training
    encoder.model.eval()
    device = next(encoder.model.parameters()).device
    sums, counts = None, torch.zeros(num_classes)
    for batch in loader:
        b = batch.to(device)
        emb = encoder.embed(b.input_ids, b.attention_mask).cpu()
        if sums is None:
            sums = torch.zeros(num_classes, emb.shape[1])
        sums.index_add_(0, b.labels.cpu(), emb)
        counts += torch.bincount(b.labels.cpu(), minlength=num_classes).float()
    encoder.model.train(was_training)
    return sums / counts.clamp_min(1).unsqueeze(1)
