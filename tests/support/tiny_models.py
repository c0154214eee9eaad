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
    GPT2Config,
    GPT2LMHeadModel,
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


# ---- GPT-2: causal LM, the model's own loss; every target is a transformers Conv1D (weight stored d_in × d_out):
# c_attn 32→96, c_proj 32→32 (attention) and 128→32 (MLP), c_fc 32→128. No dropout, so that training steps in train
# mode are deterministic (two runs that should agree do).
def _gpt2():
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=32,
            n_inner=128,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    # transformers finds no loss type in the class name "GPT2LMHeadModel": its loss_function property then logs a
    # warning on every call (a graph break under torch.compile) and uses the causal LM loss, named here instead
    model.loss_type = "ForCausalLM"
    return model


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

# Models whose targets are transformers Conv1D layers (weight stored d_in × d_out; tests read every target's weight
# as d_out × d_in through ``keeplora.adapters.target_weight``); also part of CASES.
CONV1D_CASES = {
    "gpt2": Case("gpt2", _gpt2, ["c_attn", "c_proj", "c_fc"], _llama_batch, _llama_loss),
}
CASES.update(CONV1D_CASES)


def sgd_pass(model: torch.nn.Module, params, batches, loss, lr: float = 0.1) -> None:
    """One SGD step per batch on ``params`` in train mode, then back to eval mode (the engine tests' training)."""
    opt = torch.optim.SGD(params, lr=lr)
    model.train()
    for batch in batches:
        loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
