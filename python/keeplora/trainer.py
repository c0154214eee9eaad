"""Use KeepLoRA with a transformers ``Trainer``: one ``Trainer.train()`` per task.

    kl = KeepLoRA(model, KeepLoRAConfig(...))
    for task_dataset in tasks:
        trainer = Trainer(model=model, args=args, train_dataset=task_dataset,
                          callbacks=[KeepLoRACallback(kl)])
        trainer.train()          # begin_task at on_train_begin, end_task at on_train_end

The Trainer builds its optimizer from the parameters that require grad; KeepLoRA has frozen everything but the B
matrices (add your own head by setting its ``requires_grad`` before creating the Trainer).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from transformers import TrainerCallback

from .engine import KeepLoRA
from .statistics import LossFn


class KeepLoRACallback(TrainerCallback):
    """Calls :meth:`KeepLoRA.begin_task` when training starts and :meth:`KeepLoRA.end_task` when it ends.

    Args:
        keeplora: the :class:`KeepLoRA` of the model the Trainer trains.
        loss_fn: ``loss_fn(model, batch)`` for the statistics passes; None uses the model's own loss, which is what
            the Trainer optimises by default.
        statistics_data: batches for the statistics passes; None uses the Trainer's train dataloader.
    A Trainer resumed from a checkpoint mid-task (``keeplora.in_task`` already true) does not begin the task again.
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
        if not self.keeplora.in_task:
            self.keeplora.begin_task(self._data(train_dataloader), self.loss_fn)

    def on_train_end(self, args, state, control, train_dataloader=None, **kwargs):
        self.keeplora.end_task(self._data(train_dataloader), self.loss_fn)
