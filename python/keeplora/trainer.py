"""Use KeepLoRA with a transformers ``Trainer``: one ``Trainer.train()`` per task.

    kl = KeepLoRA(model, KeepLoRAConfig(...))
    for task_dataset in tasks:
        trainer = Trainer(model=model, args=args, train_dataset=task_dataset,
                          callbacks=[KeepLoRACallback(kl)])
        trainer.train()          # begin_task at on_train_begin, end_task at on_train_end

The Trainer builds its optimizer from the parameters that require grad; KeepLoRA has frozen everything but the B
matrices (add your own head by setting its ``requires_grad`` before creating the Trainer).

Every Trainer checkpoint gets KeepLoRA's state (:meth:`KeepLoRA.save`, mid-task) in its ``keeplora/`` subfolder, and
``trainer.train(resume_from_checkpoint=...)`` restores it before training continues: the resumed task keeps its
bases, A, B at task start and task record, and is not begun again.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import checkpoint, distributed
from .adapters import target_weight
from .engine import KeepLoRA
from .statistics import LossFn

STATE_SUBFOLDER = "keeplora"


class KeepLoRACallback(TrainerCallback):
    """Calls :meth:`KeepLoRA.begin_task` when training starts and :meth:`KeepLoRA.end_task` when it ends, saves
    KeepLoRA's state into every Trainer checkpoint and restores it when the Trainer resumes from one.

    Args:
        keeplora: the :class:`KeepLoRA` of the model the Trainer trains.
        loss_fn: ``loss_fn(model, batch)`` for the statistics passes; None uses the model's own loss, which is what
            the Trainer optimises by default.
        statistics_data: batches for the statistics passes; None uses the Trainer's train dataloader.

    A Trainer resumed from a checkpoint (``state.global_step > 0`` at ``on_train_begin``) restores the state from
    the checkpoint's ``keeplora/`` subfolder and does not begin the task again. The callback events do not carry the
    checkpoint's path, so the folder is ``args.resume_from_checkpoint`` when that is a path, else
    ``{args.output_dir}/checkpoint-{global_step}`` (where ``resume_from_checkpoint=True`` and checkpoints of this
    ``output_dir`` resume from); resuming from a checkpoint elsewhere needs ``TrainingArguments(
    resume_from_checkpoint=path)`` as well.
    """

    def __init__(self, keeplora: KeepLoRA, loss_fn: LossFn | None = None, statistics_data: Iterable[Any] | None = None):
        self.keeplora = keeplora
        self.loss_fn = loss_fn
        self.statistics_data = statistics_data

    def _data(self, train_dataloader):
        data = self.statistics_data if self.statistics_data is not None else train_dataloader
        if data is None:
            raise RuntimeError("KeepLoRACallback got no train dataloader from the Trainer; pass statistics_data")
        return data

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if state.global_step > 0:
            restore(self.keeplora, _resumed_folder(args, state))
        if not self.keeplora.in_task:
            self.keeplora.begin_task(self._data(train_dataloader), self.loss_fn)

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        self.keeplora.save(os.path.join(folder, STATE_SUBFOLDER))

    def on_train_end(self, args, state, control, train_dataloader=None, **kwargs):
        self.keeplora.end_task(self._data(train_dataloader), self.loss_fn)


def _resumed_folder(args, state) -> str:
    given = args.resume_from_checkpoint
    if isinstance(given, str) and given:
        folder = given
    else:
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"the Trainer resumes at global step {state.global_step}, but the checkpoint folder {folder} does not "
            "exist; for a checkpoint outside args.output_dir set TrainingArguments(resume_from_checkpoint=<path>)"
        )
    return folder


def restore(keeplora: KeepLoRA, folder: str | os.PathLike) -> None:
    """Put the KeepLoRA state saved in Trainer checkpoint ``folder`` (its ``keeplora/`` subfolder) into ``keeplora``
    in place: the target weights, the adapter's A and B (the same parameters, so the Trainer's optimizer keeps
    them) and the continual state. Everything is checked before the model is touched."""
    sub = os.path.join(os.fspath(folder), STATE_SUBFOLDER)
    if not os.path.isfile(os.path.join(sub, checkpoint.STATE_FILE)):
        raise FileNotFoundError(
            f"Trainer checkpoint {folder} holds no KeepLoRA state ({STATE_SUBFOLDER}/{checkpoint.STATE_FILE} is "
            "missing): it was not saved with KeepLoRACallback, so the task's bases, A and B start cannot be restored"
        )
    try:
        saved = checkpoint.read_state(sub, keeplora.model)
    except ValueError as error:
        raise ValueError(
            f"the KeepLoRA state in Trainer checkpoint {folder} does not fit this model: {error}"
        ) from error
    mine, theirs = keeplora.config.to_dict(), saved.config.to_dict()
    if mine != theirs:
        differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise ValueError(
            f"the KeepLoRA state in Trainer checkpoint {folder} was saved with another config: "
            + ", ".join(f"{k}={theirs.get(k)!r} there, {mine.get(k)!r} here" for k in differ)
        )
    layers, adapter = keeplora.layers, keeplora.config.adapter_name
    b_dtypes = {n: layer.lora_B[adapter].weight.dtype for n, layer in layers.items()}
    new_state = saved.state.to(keeplora.device, keeplora.config.torch_stats_dtype, b_dtypes)
    new_state.bases = {n: new_state.bases[n] for n in layers}
    new_state.b_start = {n: new_state.b_start[n] for n in layers} if new_state.in_task else {}
    with torch.no_grad():
        for name, layer in layers.items():
            distributed.copy_full_(target_weight(layer), saved.weights[name])
            if saved.adapters is not None:
                a, b = saved.adapters[name]
                distributed.copy_full_(layer.lora_A[adapter].weight, a)
                distributed.copy_full_(layer.lora_B[adapter].weight, b)
    keeplora.state = new_state
