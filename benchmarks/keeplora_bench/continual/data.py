"""Tokenized task data and deterministic batching (dynamic padding; evaluation batches sorted by length)."""

from __future__ import annotations

import hashlib
import random

import torch

from .model import Batch, TextEncoder
from .tasks import Task


def seed_from(*parts) -> int:
    """A 63-bit seed derived from any parts (stable across processes, unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


class TaskData:
    """A task with its texts tokenized once (by the encoder's tokenizer, truncated to its ``max_length``)."""

    def __init__(self, task: Task, encoder: TextEncoder, index: int):
        self.task = task
        self.index = index
        self.train_ids = encoder.tokenize([t for t, _ in task.train])["input_ids"] if task.train else []
        self.test_ids = encoder.tokenize([t for t, _ in task.test])["input_ids"] if task.test else []
        self.train_labels = [y for _, y in task.train]
        self.test_labels = [y for _, y in task.test]
        self._pad = encoder.pad
        self.prompt_ids, self.prompt_mask = encoder.pad(encoder.tokenize(task.prompts)["input_ids"])

    def batches(
        self, split: str, batch_size: int, shuffle_seed: int | None = None, sort_by_length: bool = False
    ) -> list[Batch]:
        """The split cut into batches: in stored order, shuffled by ``shuffle_seed``, or sorted by length."""
        ids = self.train_ids if split == "train" else self.test_ids
        labels = self.train_labels if split == "train" else self.test_labels
        order = list(range(len(ids)))
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(order)
        elif sort_by_length:
            order.sort(key=lambda i: len(ids[i]))
        out = []
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            input_ids, mask = self._pad([ids[i] for i in chunk])
            out.append(
                Batch(
                    input_ids,
                    mask,
                    torch.tensor([labels[i] for i in chunk], dtype=torch.long),
                    self.prompt_ids,
                    self.prompt_mask,
                    self.index,
                )
            )
        return out
