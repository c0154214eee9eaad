"""Tiny random transformers models (real classes, random weights) with data and a loss, for the engine tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    BertConfig,
    BertModel,
    CLIPConfig,
    CLIPModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTModel,
)

VOCAB = 64


@dataclass
class Case:
    name: str
    build: Callable[[], torch.nn.Module]
    targets: list[str]
    batch: Callable[[torch.Generator], dict[str, torch.Tensor]]
    loss: Callable[[torch.nn.Module, Any], torch.Tensor]
    weight_energy: Any = 0.5
    has_text_mask: bool = True
    extra: dict = field(default_factory=dict)

    def batches(self, n: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        return [self.batch(g) for _ in range(n)]

    def model(self, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return self.build().eval()


def _text(g: torch.Generator, batch: int = 4, length: int = 9) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    lengths = torch.randint(3, length + 1, (batch,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def _head(dim: int, classes: int = 3) -> torch.Tensor:
    return torch.randn(dim, classes, generator=torch.Generator().manual_seed(123))


# ---- BERT: classification by a fixed head on the first token
_BERT_HEAD = _head(32)


def _bert():
    return BertModel(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=32,
        ),
        add_pooling_layer=False,
    )


def _bert_batch(g):
    return {**_text(g), "labels": torch.randint(0, 3, (4,), generator=g)}


def _bert_loss(model, b):
    h = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state[:, 0]
    return F.cross_entropy(h @ _BERT_HEAD.to(h), b["labels"])


# ---- CLIP: both towers, the model's own contrastive loss
def _clip():
    return CLIPModel(
        CLIPConfig(
            text_config=dict(
                vocab_size=VOCAB,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=16,
            ),
            vision_config=dict(
                hidden_size=32,
                image_size=16,
                patch_size=8,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
            ),
            projection_dim=16,
        )
    )


def _clip_batch(g):
    return {**_text(g), "pixel_values": torch.randn(4, 3, 16, 16, generator=g)}


def _clip_loss(model, b):
    return model(
        input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"], return_loss=True
    ).loss


# ---- ViT: classification by a fixed head on the CLS token
_VIT_HEAD = _head(32)


def _vit():
    return ViTModel(
        ViTConfig(
            image_size=16,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
        ),
        add_pooling_layer=False,
    )


def _vit_batch(g):
    return {"pixel_values": torch.randn(4, 3, 16, 16, generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}


def _vit_loss(model, b):
    h = model(pixel_values=b["pixel_values"]).last_hidden_state[:, 0]
    return F.cross_entropy(h @ _VIT_HEAD, b["labels"])


# ---- Llama: causal LM, the model's own loss; k/v projections are non-square (grouped-query attention)
def _llama():
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
        )
    )


def _llama_batch(g):
    t = _text(g)
    labels = t["input_ids"].masked_fill(t["attention_mask"] == 0, -100)
    return {**t, "labels": labels}


def _llama_loss(model, b):
    return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss


CASES = {
    "bert": Case("bert", _bert, ["query", "key", "value", "attention.output.dense"], _bert_batch, _bert_loss),
    "clip": Case(
        "clip",
        _clip,
        ["q_proj", "k_proj", "v_proj", "out_proj"],
        _clip_batch,
        _clip_loss,
        weight_energy={"vision_model": 0.85, "text_model": 0.2},
    ),
    "vit": Case("vit", _vit, ["q_proj", "v_proj"], _vit_batch, _vit_loss, has_text_mask=False),
    "llama": Case("llama", _llama, ["q_proj", "k_proj", "v_proj", "o_proj"], _llama_batch, _llama_loss),
}


def sgd_pass(model: torch.nn.Module, params, batches, loss, lr: float = 0.1) -> None:
    """One SGD step per batch on ``params`` in train mode, then back to eval mode (the engine tests' training)."""
    opt = torch.optim.SGD(params, lr=lr)
    model.train()
    for batch in batches:
        loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
