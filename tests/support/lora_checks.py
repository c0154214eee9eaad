"""Checks shared by the torch-backend and the Triton tests of the frozen-A LoRA linear."""

import torch

import keeplora_kernels as kk
from support.ref_ops import lora_linear_ref
from support.tolerances import assert_close, assert_within_torch_error


def assert_saves_only_s(x, w, b, a, lb, fn=None):
    """``fn`` (default ``kk.lora_linear``, whatever backend is selected) keeps ``s = x·Aᵀ`` (T×r) for backward and
    no T×d_in activation; returns the output so that a test can run backward from it."""
    fn = fn or kk.lora_linear
    x.requires_grad_()
    lb.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fn(x, w, b, a, lb, 1.0)
    d_in, r = x.shape[-1], a.shape[0]
    tokens = x.numel() // d_in
    activations = [t for t in saved if t.shape[0] == tokens]
    assert [tuple(t.shape) for t in activations] == [(tokens, r)]
    assert all(t.numel() <= max(w.numel(), tokens * r) for t in saved)
    assert not any(t.shape in (x.shape, (tokens, d_in)) for t in saved)
    return y


def seeded_inputs(lead, d_in, d_out, r, dtype, bias=True, device="cpu", seed=0):
    """``(x, W, b, A, B)`` drawn in fp64 from a seeded generator (A with orthonormal rows), then cast to ``dtype``
    on ``device``; ``b`` is None without ``bias``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d_in, generator=g, dtype=torch.float64)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / d_in**0.5
    b = torch.randn(d_out, generator=g, dtype=torch.float64) if bias else None
    a = torch.linalg.qr(torch.randn(d_in, r, generator=g, dtype=torch.float64)).Q.T.contiguous()
    lb = torch.randn(d_out, r, generator=g, dtype=torch.float64)
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return to(x), to(w), to(b), to(a), to(lb)


def oracle_grads(x, w, b, a, lb, dy, dtype, scale=0.5):
    """``(y, dX, dB[, db])`` of the oracle :func:`ref_ops.lora_linear_ref` with every operand in ``dtype``."""
    xr, lr = x.to(dtype).requires_grad_(), lb.to(dtype).requires_grad_()
    br = None if b is None else b.to(dtype).requires_grad_()
    yr = lora_linear_ref(xr, w.to(dtype), br, a.to(dtype), lr, scale)
    return (yr,) + torch.autograd.grad(yr, [t for t in (xr, lr, br) if t is not None], dy.to(dtype))


def assert_matches_oracle(fn, x, w, b, a, lb, dtype):
    """``fn(x, w, b, a, lb)`` (the LoRA linear at scale 0.5): output and every gradient against the fp64 oracle within
    the dtype's tolerance; bf16 input gets fp32 adapters (the engine's configuration) and the suite's low-precision
    rule (within 2× the error of PyTorch's own ops at that dtype)."""
    if dtype == torch.bfloat16:
        a, lb = a.float(), lb.float()
    xs, ls = x.clone().requires_grad_(), lb.clone().requires_grad_()
    bs = None if b is None else b.clone().requires_grad_()
    y = fn(xs, w, bs, a, ls)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], w.shape[0])
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [t for t in (xs, ls, bs) if t is not None], dy)
    refs = oracle_grads(x, w, b, a, lb, dy, torch.float64)
    if dtype == torch.float32:
        assert_close(y, refs[0].to(dtype))
        for got, ref in zip(grads, refs[1:]):
            assert_close(got, ref.to(got.dtype))
    else:
        lows = oracle_grads(x, w, b, a, lb, dy, dtype)
        for got, low, ref in zip((y, *grads), lows, refs):
            assert_within_torch_error(got, low, ref, dtype)
    assert grads[1].dtype == lb.dtype


def compiled_graph_targets(fn, *args) -> set[str]:
    """The call targets of the forward and backward graphs that ``torch.compile(fn, fullgraph=True)`` builds for
    ``fn(*args).backward()`` (AOT autograd, graphs run as traced): which ops a compiled step calls."""
    from torch._functorch.aot_autograd import aot_module_simplified

    torch._dynamo.reset()
    seen: set[str] = set()

    def record(gm, _inputs):
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=record, bw_compiler=record)

    torch.compile(fn, backend=backend, fullgraph=True)(*args).backward()
    return seen
