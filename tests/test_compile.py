"""``torch.compile`` of KeepLoRA-adapted transformers models: no graph break in the adapted layers, and compiled
outputs and gradients equal eager ones, for the default GEMM orders and the fused-dY backward (Triton op)."""

import pytest
import torch

import tiny_models as tm
from keeplora import KeepLoRA, KeepLoRAConfig
from tolerances import assert_close

ORDERS = ["base_first,base_first", "expand_first,fused_dy"]


def _adapted(name):
    case = tm.CASES[name]
    model = case.model()
    kl = KeepLoRA(model, KeepLoRAConfig(target_modules=case.targets, r=4, progress=False))
    batches = case.batches(2)
    kl.begin_task(batches, case.loss)
    return case, model, kl, batches[1]


def _loss_and_grads(fn, kl, batch):
    params = kl.trainable_parameters()
    loss = fn(batch)
    return (loss.detach(),) + torch.autograd.grad(loss, params)


@pytest.mark.parametrize("name", ["bert", "llama"])
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
    # equality in eval mode (no dropout: compiled and eager RNG streams differ)
    eager = _loss_and_grads(step, kl, batch)
    compiled = _loss_and_grads(torch.compile(step, backend="aot_eager", fullgraph=True), kl, batch)
    for got, ref in zip(compiled, eager):
        assert_close(got, ref)
    assert any(g.abs().sum() > 0 for g in eager[1:])  # the adapters do receive gradient


def test_compiled_graph_contains_the_registered_dy_pass(monkeypatch):
    """With the fused-dY backward the backward graph calls the registered op (not an opaque Python call)."""
    from torch._functorch.aot_autograd import aot_module_simplified

    monkeypatch.setenv("KEEPLORA_LORA_ORDERS", "expand_first,fused_dy")
    torch._dynamo.reset()
    case, model, kl, batch = _adapted("bert")
    model.train()
    seen = []

    def record(gm, _inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=record, bw_compiler=record)

    loss = torch.compile(lambda b: case.loss(model, b), backend=backend, fullgraph=True)(batch)
    loss.backward()
    assert any("lora_dy_pass" in t for t in seen), sorted(set(seen))[:20]


@pytest.mark.gpu
@pytest.mark.parametrize("orders", ["expand_first,fused_dy"])
def test_reduce_overhead_captures_the_whole_step_on_cuda(orders, monkeypatch):
    """``mode="reduce-overhead"`` on a GPU: the adapted Llama's step is replayed from CUDA graphs (no cudagraph
    skip) and equals eager. The order with the registered Triton op (the plain-aten orders have nothing that could
    stop a capture)."""
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
