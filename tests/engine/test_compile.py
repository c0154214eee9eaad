"""``torch.compile`` of KeepLoRA-adapted transformers models: no graph break in the adapted layers, and compiled
outputs and gradients equal eager ones, for the GEMM orders of the CPU and CUDA defaults (GPT-2: Conv1D targets, run by
the fused op on the transposed view of their weights). (The experimental fused-dY
backward's compile tests are in ``test_lora_variants.py``.)"""

import pytest
import torch

from keeplora import KeepLoRA, KeepLoRAConfig
from support import tiny_models as tm
from support.tolerances import assert_close

ORDERS = ["base_first,base_first", "expand_first,expand_first"]


def _adapted(name):
    case = {**tm.CASES, **tm.CONV1D_CASES}[name]
    model = case.model()
    kl = KeepLoRA(model, KeepLoRAConfig(target_modules=case.targets, r=4, progress=False))
    batches = case.batches(2)
    kl.begin_task(batches, case.loss)
    return case, model, kl, batches[1]


def _loss_and_grads(fn, kl, batch):
    params = kl.trainable_parameters()
    loss = fn(batch)
    return (loss.detach(),) + torch.autograd.grad(loss, params)


@pytest.mark.parametrize("name", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("orders", ORDERS)
def test_compiled_step_has_no_graph_break_and_equals_eager(name, orders, monkeypatch):
    monkeypatch.setenv("KEEPLORA_LORA_ORDERS", orders)
    torch._dynamo.reset()
    case, model, kl, batch = _adapted(name)
    step = lambda b: case.loss(model, b)  # noqa: E731
    for mode in ("train", "eval"):
        getattr(model, mode)()
        explained = torch._dynamo.explain(step)(batch)
        assert explained.graph_break_count == 0, (mode, [r.reason for r in explained.break_reasons])
    # equality in eval and train mode; dropout off (compiled and eager RNG streams differ)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    compiled_step = torch.compile(step, backend="aot_eager", fullgraph=True)
    for mode in ("eval", "train"):
        getattr(model, mode)()
        eager = _loss_and_grads(step, kl, batch)
        compiled = _loss_and_grads(compiled_step, kl, batch)
        for got, ref in zip(compiled, eager):
            assert_close(got, ref)
        assert any(g.abs().sum() > 0 for g in eager[1:])  # the adapters do receive gradient


@pytest.mark.gpu
@pytest.mark.parametrize("orders", ["expand_first,expand_first"])
def test_reduce_overhead_captures_the_whole_step_on_cuda(orders, monkeypatch):
    """``mode="reduce-overhead"`` on a GPU: the adapted Llama's step, in the CUDA default orders, is replayed from
    CUDA graphs (no cudagraph skip) and equals eager."""
    from torch._dynamo.utils import counters

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.setenv("KEEPLORA_LORA_ORDERS", orders)
    torch._dynamo.reset()
    counters.clear()
    case = tm.CASES["llama"]
    model = case.model().cuda()
    kl = KeepLoRA(model, KeepLoRAConfig(target_modules=case.targets, r=4, progress=False))
    batches = [{k: v.cuda() for k, v in b.items()} for b in case.batches(2)]
    kl.begin_task(batches, case.loss)
    step = lambda b: case.loss(model, b)  # noqa: E731
    eager = _loss_and_grads(step, kl, batches[1])
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, record, replay
        got = _loss_and_grads(compiled, kl, batches[1])
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    for g, ref in zip(got, eager):
        assert_close(g, ref)
