"""The data passes: target-only gradients, exact masked second moments, evenly spaced subsets."""

import pytest
import torch

from keeplora import KeepLoRA, KeepLoRAConfig
from keeplora.statistics import collect_second_moments, estimate_gradients, evenly_spaced
from support.tiny_models import CASES


def make(case_name, **overrides):
    case = CASES[case_name]
    model = case.model()
    cfg = dict(target_modules=case.targets, r=4, alpha=4.0, weight_energy=case.weight_energy, progress=False)
    cfg.update(overrides)
    return case, model, KeepLoRA(model, KeepLoRAConfig(**cfg))


@pytest.mark.parametrize("case_name", ["bert", "clip", "llama"])
def test_gradient_estimate_equals_autograd_and_touches_no_grad(case_name):
    case, model, kl = make(case_name)
    data = case.batches(n=3)
    head = torch.nn.Parameter(torch.ones(()))  # a user parameter in the loss must not get .grad either

    def loss_fn(m, b):
        return case.loss(m, b) * head

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    grads = estimate_gradients(model, kl.layers, data, loss_fn, device=torch.device("cpu"), dtype=torch.float64)
    assert all(p.grad is None for p in model.parameters()) and head.grad is None
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    weights = {n: kl.layers[n].base_layer.weight for n in kl.layers}
    for w in weights.values():
        w.requires_grad_(True)
    expected = {n: torch.zeros_like(w, dtype=torch.float64) for n, w in weights.items()}
    for b in data:
        case.loss(model, b).backward()
        for n, w in weights.items():
            expected[n] += w.grad.double() / len(data)
            w.grad = None
    for n in weights:
        torch.testing.assert_close(grads[n], expected[n], rtol=1e-5, atol=1e-7)


def test_second_moments_count_only_real_tokens_per_tower():
    """CLIP: text inputs are masked by the text attention mask, vision inputs count every patch."""
    case, model, kl = make("clip")
    data = case.batches(n=2)
    moments, tokens = collect_second_moments(
        model, kl.layers, data, case.loss, device=torch.device("cpu"), dtype=torch.float64
    )
    seen = {n: torch.zeros_like(m) for n, m in moments.items()}
    count = {n: 0 for n in moments}
    current = {}

    def hook(name):
        def fn(_m, args, _o):
            x = args[0].double()
            if "text_model" in name:
                x = x[current["mask"].bool()]
            x = x.reshape(-1, x.shape[-1])
            seen[name] += x.t() @ x
            count[name] += x.shape[0]

        return fn

    handles = [layer.register_forward_hook(hook(n)) for n, layer in kl.layers.items()]
    with torch.no_grad():
        for b in data:
            current["mask"] = b["attention_mask"]
            case.loss(model, b)
    for h in handles:
        h.remove()
    n_text = int(sum(b["attention_mask"].sum() for b in data))
    for n in moments:
        torch.testing.assert_close(moments[n], seen[n])
        assert tokens[n] == count[n]
        if "text_model" in n:
            assert tokens[n] == n_text
        else:
            assert tokens[n] == 2 * 4 * 5  # batches × images × (4 patches + CLS)


@pytest.mark.parametrize(
    "fraction,count,expected", [(1.0, 5, [0, 1, 2, 3, 4]), (0.2, 10, [0, 5]), (0.5, 5, [0, 2, 4]), (0.01, 3, [0])]
)
def test_evenly_spaced_subset(fraction, count, expected):
    assert [i for i, _ in evenly_spaced(range(count), fraction)] == expected


def test_grad_data_fraction_uses_the_evenly_spaced_batches():
    case, model, kl = make("bert")
    data = case.batches(n=4)
    sub = estimate_gradients(
        model, kl.layers, data, case.loss, device=torch.device("cpu"), dtype=torch.float64, fraction=0.5
    )
    direct = estimate_gradients(
        model, kl.layers, [data[0], data[2]], case.loss, device=torch.device("cpu"), dtype=torch.float64
    )
    for n in sub:
        torch.testing.assert_close(sub[n], direct[n])


def test_gradient_memory_source_grows_the_basis():
    case, model, kl = make("bert", memory_source="gradients", feature_energy=0.9)
    data = case.batches()
    sizes = kl.basis_sizes()
    kl.begin_task(data, case.loss)
    kl.end_task(data, case.loss)
    grew = [n for n, k in kl.basis_sizes().items() if k > sizes[n]]
    assert grew
    for n in grew:
        p = kl.bases[n]
        torch.testing.assert_close(p.t() @ p, torch.eye(p.shape[1]), atol=1e-5, rtol=0)


def test_memory_bounded_batches_give_the_same_lifecycle(monkeypatch):
    """Cutting the batched SVD / eigen calls into one-matrix batches changes nothing but the peak memory."""
    results = []
    for budget in (None, "1"):
        if budget is None:
            monkeypatch.delenv("KEEPLORA_BATCH_BYTES", raising=False)
        else:
            monkeypatch.setenv("KEEPLORA_BATCH_BYTES", budget)
        case, model, kl = make("llama", feature_energy=0.9, svd_method="randomized", svd_oversample=4)
        data = case.batches()
        kl.begin_task(data, case.loss)
        a = {n: layer.lora_A[kl.adapter_name].weight.clone() for n, layer in kl.layers.items()}
        kl.end_task(data, case.loss)
        results.append((a, {n: p.clone() for n, p in kl.bases.items()}))
    (a1, p1), (a2, p2) = results
    for n in a1:
        torch.testing.assert_close(a2[n], a1[n], rtol=1e-5, atol=1e-6)
        assert p1[n].shape == p2[n].shape
        torch.testing.assert_close(p2[n], p1[n], rtol=1e-5, atol=1e-5)


def test_batch_budget_is_validated(monkeypatch):
    from keeplora.batching import bounded_batches

    monkeypatch.setenv("KEEPLORA_BATCH_BYTES", "lots")
    with pytest.raises(ValueError, match="KEEPLORA_BATCH_BYTES must be a positive integer"):
        list(bounded_batches([1, 2], 8))
    monkeypatch.setenv("KEEPLORA_BATCH_BYTES", "16")
    assert list(bounded_batches([1, 2, 3], 8)) == [[1, 2], [3]]


# ---- micro-batched gradient pass: exact for the model's own token-mean loss
def _own_loss_model(kind: str):
    """Tiny transformers models whose own loss is a mean over the labels that are not -100."""
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":  # loss_type None (no loss type in the class name): transformers uses the causal LM loss
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32))
        assert model.loss_type is None
        return model.eval(), ["c_attn", "c_proj", "c_fc"]
    if kind == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=64,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=32,
            )
        )
        return model.eval(), ["q_proj", "k_proj", "v_proj", "o_proj"]
    model = BertForMaskedLM(
        BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=32,
        )
    )
    return model.eval(), ["query", "key", "value", "attention.output.dense"]


def _labelled_batches(kind: str, n: int, rows: int = 7, length: int = 9, seed: int = 0):
    """Padded rows of unequal length and unequal label counts; one row has no label at all."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 64, (rows, length), generator=g)
        lengths = torch.randint(2, length + 1, (rows,), generator=g)
        mask = (torch.arange(length)[None] < lengths[:, None]).long()
        labels = ids.masked_fill(mask == 0, -100)
        if kind == "bert":  # masked LM: only some positions carry a label
            labels = labels.masked_fill(torch.rand(rows, length, generator=g) < 0.6, -100)
        labels[2] = -100
        out.append({"input_ids": ids * mask, "attention_mask": mask, "labels": labels})
    return out


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("tokens", [9, 20, 27])  # one row per part, two rows, three rows (a shorter last part)
def test_micro_batched_pass_equals_the_unsplit_pass(kind, tokens):
    from keeplora.statistics import _micro_batches

    model, targets = _own_loss_model(kind)
    kl = KeepLoRA(model, KeepLoRAConfig(target_modules=targets, r=4, weight_energy=0.5, progress=False))
    data = _labelled_batches(kind, 2)
    parts = _micro_batches(model, data[0], tokens)
    rows = tokens // 9
    assert len(parts) <= -(-7 // rows) - (rows == 1)  # parts holding no label (row 2 alone) are skipped
    assert all(len(p["labels"]) <= rows for p, _ in parts)
    torch.testing.assert_close(sum(float(w) for _, w in parts), 1.0)
    seen = []
    hook = kl.layers[next(iter(kl.layers))].register_forward_hook(lambda _m, a, _o: seen.append(a[0].shape[0]))
    kw = dict(device=torch.device("cpu"), dtype=torch.float32)
    split = estimate_gradients(model, kl.layers, data, None, micro_batch_tokens=tokens, **kw)
    assert max(seen) == tokens // 9 < 7
    seen.clear()
    whole = estimate_gradients(model, kl.layers, data, None, micro_batch_tokens=0, **kw)
    assert seen == [7, 7]
    hook.remove()
    for n in whole:
        assert whole[n].abs().max() > 0
        torch.testing.assert_close(split[n], whole[n], rtol=1e-5, atol=1e-6)


def test_micro_batching_leaves_user_losses_and_other_batches_whole():
    from keeplora.statistics import _micro_batches

    model, _ = _own_loss_model("llama")
    batch = _labelled_batches("llama", 1)[0]
    assert _micro_batches(model, batch, 9)[0][1] is not None
    assert _micro_batches(model, batch, 0) == [(batch, None)]  # disabled
    assert _micro_batches(model, batch, 1000) == [(batch, None)]  # fits in one part
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    assert _micro_batches(model, no_labels, 9) == [(no_labels, None)]
    odd = {**batch, "extra": torch.zeros(3)}  # a tensor that is not one row per example
    assert _micro_batches(model, odd, 9) == [(odd, None)]
    unlabelled = {**batch, "labels": torch.full_like(batch["labels"], -100)}  # full loss is 0/0: left to raise
    assert _micro_batches(model, unlabelled, 9) == [(unlabelled, None)]
    gpt2, _ = _own_loss_model("gpt2")
    gpt2_batch = _labelled_batches("gpt2", 1)[0]
    assert _micro_batches(gpt2, gpt2_batch, 9)[0][1] is not None
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(
        _own_loss_model("gpt2")[0], LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    assert _micro_batches(wrapped, gpt2_batch, 9)[0][1] is not None  # a PeftModel's loss is its base model's
    gpt2.loss_function = lambda logits, labels, **kw: logits.sum()  # a user's own loss: unknown, left whole
    assert _micro_batches(gpt2, gpt2_batch, 9) == [(gpt2_batch, None)]
    bert, _ = _own_loss_model("bert")
    case, tiny, kl = make("bert")  # BertModel with a user loss: no loss type of its own
    assert _micro_batches(tiny, case.batches(n=1)[0], 9)[0][1] is None
    seen = []
    hook = kl.layers[next(iter(kl.layers))].register_forward_hook(lambda _m, a, _o: seen.append(a[0].shape[0]))
    kl.config.grad_micro_batch = 9
    kl.begin_task(case.batches(n=1), case.loss)  # a user loss_fn: whole batches
    hook.remove()
    assert seen == [4]


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_begin_task_with_micro_batches_offload_or_checkpointing_gives_the_same_adapter(kind):
    results = []
    for options in (
        dict(grad_micro_batch=0),
        dict(grad_micro_batch=18),
        dict(grad_micro_batch=0, grad_offload=True),
        dict(grad_micro_batch=0, grad_checkpoint=True),
        dict(grad_micro_batch=18, grad_checkpoint=True),
    ):
        model, targets = _own_loss_model(kind)
        kl = KeepLoRA(
            model,
            KeepLoRAConfig(
                target_modules=targets, r=4, weight_energy=0.5, progress=False, svd_method="exact", **options
            ),
        )
        kl.begin_task(_labelled_batches(kind, 2))
        results.append(
            {
                n: (
                    layer.lora_A[kl.adapter_name].weight.detach().clone(),
                    layer.lora_B[kl.adapter_name].weight.detach().clone(),
                )
                for n, layer in kl.layers.items()
            }
        )
    for other in results[1:]:
        for n, (a, b) in results[0].items():
            # A's columns are singular vectors (sign-ambiguous); the product B·A is not
            torch.testing.assert_close(other[n][1] @ other[n][0], b @ a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_checkpointed_pass_gives_the_same_sums_and_restores_the_model(kind):
    from keeplora.statistics import checkpoint_blocks

    case = CASES[kind]
    model = case.build()
    kl = KeepLoRA(model, KeepLoRAConfig(target_modules=case.targets, r=4, weight_energy=0.5, progress=False))
    blocks = checkpoint_blocks(model, kl.layers)
    # the transformer blocks: every target sits in exactly one (both towers of CLIP)
    assert blocks and all(sum(any(m is t for m in b.modules()) for b in blocks) == 1 for t in kl.layers.values())
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    calls = []
    inner = next(t for t in kl.layers.values() if any(m is t for m in blocks[0].modules()))
    hook = inner.register_forward_hook(lambda *_: calls.append(getattr(config, "use_cache", None)))
    kw = dict(device=torch.device("cpu"), dtype=torch.float64)
    data = case.batches(n=2)
    plain = estimate_gradients(model, kl.layers, data, case.loss, **kw)
    assert len(calls) == 2
    calls.clear()
    kept = estimate_gradients(model, kl.layers, data, case.loss, checkpoint=True, **kw)
    assert len(calls) == 4  # the block's forward ran again in the backward
    assert not any(calls)  # no key/value cache inside the checkpointed pass
    hook.remove()
    for n in plain:
        assert plain[n].abs().max() > 0
        torch.testing.assert_close(kept[n], plain[n], rtol=1e-12, atol=1e-14)
    assert all("forward" not in vars(b) for b in blocks)  # the class forward again
    assert getattr(config, "use_cache", None) == use_cache


def test_checkpointed_pass_keeps_less_for_backward():
    """What autograd keeps at the end of the forward (the backward's working set): with checkpointing, the blocks'
    inputs instead of their activations."""
    model, targets = _own_loss_model("llama")
    kl = KeepLoRA(model, KeepLoRAConfig(target_modules=targets, r=4, weight_energy=0.5, progress=False))
    batch = _labelled_batches("llama", 1, rows=4, length=32)
    alive = {}
    for checkpoint in (False, True):
        storages = set()

        def pack(t, storages=storages):
            storages.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            estimate_gradients(
                model, kl.layers, batch, None, device=torch.device("cpu"), dtype=torch.float32, checkpoint=checkpoint
            )
        alive[checkpoint] = sum(nbytes for _, nbytes in storages)
    # checkpoint's own hooks take over inside the blocks: only what is saved outside them reaches ours
    assert 0 < alive[True] < alive[False] / 3, alive


def test_checkpointing_needs_repeated_blocks():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    kl = KeepLoRA(model, KeepLoRAConfig(target_modules=["0"], r=2, weight_energy=0.5, progress=False))
    batch = [torch.randn(4, 8)]
    with pytest.raises(ValueError, match="grad_checkpoint=True: Sequential has no repeated blocks"):
        estimate_gradients(
            model,
            kl.layers,
            batch,
            lambda m, b: m(b).sum(),
            device=torch.device("cpu"),
            dtype=torch.float32,
            checkpoint=True,
        )


def test_memory_gradient_pass_takes_the_gradient_pass_memory_options():
    """end_task's gradient pass (memory_source='gradients') with micro-batches or checkpointing: the same memory."""
    bases = []
    for options in (dict(grad_micro_batch=0), dict(grad_micro_batch=18), dict(grad_checkpoint=True)):
        model, targets = _own_loss_model("llama")
        kl = KeepLoRA(
            model,
            KeepLoRAConfig(
                target_modules=targets,
                r=4,
                weight_energy=0.5,
                feature_energy=0.9,
                memory_source="gradients",
                progress=False,
                svd_method="exact",
                **options,
            ),
        )
        data = _labelled_batches("llama", 2)
        kl.begin_task(data)
        rows = []
        hook = next(iter(kl.layers.values())).register_forward_hook(lambda _m, a, _o: rows.append(a[0].shape[0]))
        kl.end_task(data)
        hook.remove()
        assert max(rows) == (2 if options.get("grad_micro_batch") == 18 else 7)  # the pass was split or not
        bases.append({n: p @ p.t() for n, p in kl.bases.items()})  # projectors: sign-free
    for other in bases[1:]:
        for n, proj in bases[0].items():
            torch.testing.assert_close(other[n], proj, rtol=1e-4, atol=1e-5)


def test_checkpointed_pass_turns_off_every_cache_of_a_nested_model():
    """A multimodal model's language model has its own config: its cache is off inside the pass too."""
    import types

    model, targets = _own_loss_model("llama")

    class Outer(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm
            self.config = types.SimpleNamespace(use_cache=True)

        def forward(self, **batch):
            return self.lm(**batch)

    outer = Outer(model)
    kl = KeepLoRA(outer, KeepLoRAConfig(target_modules=targets, r=4, weight_energy=0.5, progress=False))
    seen = []
    layer = next(iter(kl.layers.values()))
    hook = layer.register_forward_hook(lambda *_: seen.append((outer.config.use_cache, model.config.use_cache)))
    estimate_gradients(
        outer,
        kl.layers,
        _labelled_batches("llama", 1),
        lambda m, b: m(**b).loss,
        device=torch.device("cpu"),
        dtype=torch.float32,
        checkpoint=True,
        progress=False,
    )
    hook.remove()
    assert seen and not any(a or b for a, b in seen)
    assert outer.config.use_cache is True and model.config.use_cache is True
