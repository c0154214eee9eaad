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


SPLITS = ("train", "val", "test")


class TaskData:
    """A task with its texts tokenized once (by the encoder's tokenizer, truncated to its ``max_length``)."""

    def __init__(self, task: Task, encoder: TextEncoder, index: int):
        self.task = task
        self.index = index
        self.ids: dict[str, list] = {}  # split name -> token ids per text
        self.labels: dict[str, list[int]] = {}
        for split in SPLITS:
            rows = getattr(task, split)
            self.ids[split] = encoder.tokenize([t for t, _ in rows])["input_ids"] if rows else []
            self.labels[split] = [y for _, y in rows]
        self._pad = encoder.pad
        self.prompt_ids, self.prompt_mask = encoder.pad(encoder.tokenize(task.prompts)["input_ids"])

    def batches(
        self, split: str, batch_size: int, shuffle_seed: int | None = None, sort_by_length: bool = False
    ) -> list[Batch]:
        """The split (``"train"``, ``"val"`` or ``"test"``) cut into batches: in stored order, shuffled by
        ``shuffle_seed``, or sorted by length."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(map(repr, SPLITS))}, got {split!r}")
        ids, labels = self.ids[split], self.labels[split]
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
