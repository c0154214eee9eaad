"""CUDA-graph replay (``keeplora_kernels.graphs``) and ``rsvd(graph=True)``: the eager fallback equals eager exactly,
the cache captures once per key, and on a GPU (marked ``gpu``) replays equal eager calls bit for bit."""

import pytest
import torch

import keeplora_kernels as kk
from keeplora_kernels import _dispatch, graphs
from keeplora_kernels.rsvd import rsvd_graph_entry


def _batch(b=3, m=40, n=24, dtype=torch.float32, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, m, n, generator=gen) * torch.logspace(0, -2, n)).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# CPU: the fallback and the cache logic.


def test_rsvd_graph_fallback_on_cpu_equals_eager_exactly():
    a = _batch()
    p = torch.linalg.qr(torch.randn(3, 40, 5, dtype=torch.float32)).Q
    cache = graphs.GraphCache()
    entry = rsvd_graph_entry(a, 4, oversample=4, power_iters=2, project_out=p, seed=7, cache=cache)
    assert not entry.graphed and "cpu" in entry.reason and entry.inputs == ()
    for got, want in zip(entry(a, p), kk.rsvd(a, 4, oversample=4, power_iters=2, project_out=p, seed=7)):
        assert torch.equal(got, want)
    graphs.default_cache.clear()
    before = graphs.default_cache.captures
    for got, want in zip(kk.rsvd(a[0], 4, power_iters=1, seed=3, graph=True), kk.rsvd(a[0], 4, power_iters=1, seed=3)):
        assert torch.equal(got, want)  # 2-D input too
    assert len(graphs.default_cache) == 1 and graphs.default_cache.captures == before
    assert all("cpu" in why for why in graphs.default_cache.reasons.values())
    graphs.default_cache.clear()


def test_rsvd_graph_validates_inputs_like_eager():
    with pytest.raises(ValueError, match="rank must be in"):
        kk.rsvd(_batch(), 0, graph=True)


class _FakeGraph:
    """Stands in for a captured CUDA graph on CPU: replay() recomputes fn on the static inputs into the static
    outputs in place (what a real replay does), so the copy-in / clone-out logic is tested without a GPU."""

    def __init__(self, fn, inputs, outputs):
        self.fn, self.inputs, self.outputs = fn, inputs, outputs
        self.replays = 0

    def replay(self):
        self.replays += 1
        fresh = self.fn(*self.inputs)
        for out, new in zip(self.outputs, fresh):
            out.copy_(new)


@pytest.fixture
def fake_capture(monkeypatch):
    """GraphedCall captures on CPU tensors with _FakeGraph; returns the list of captured fakes."""
    made = []

    def capture(self, example_inputs, device, warmup, adopt_inputs, pool):
        static = tuple(t if t is None or adopt_inputs else graphs._static_copy(t) for t in example_inputs)
        outputs = self.fn(*static)
        self.graph, self.inputs, self._outputs = _FakeGraph(self.fn, static, outputs), static, outputs
        made.append(self.graph)

    monkeypatch.setattr(graphs, "_cuda_device", lambda tensors: (torch.device("cpu"), ""))
    monkeypatch.setattr(graphs.GraphedCall, "_capture", capture)
    return made


def _op(x, w):
    return x @ w, (x * 2).sum(-1)


def test_cache_reuses_equal_keys_and_recaptures_new_shapes(fake_capture):
    cache = graphs.GraphCache(max_entries=2)
    x, w = torch.randn(4, 3), torch.randn(3, 2)
    first = cache.call("op", _op, (x, w), static=("a",))
    assert cache.captures == 1 and all(torch.equal(g, e) for g, e in zip(first, _op(x, w)))
    x2 = torch.randn(4, 3)  # same key, new data: replay, new answer
    second = cache.call("op", _op, (x2, w), static=("a",))
    assert cache.captures == 1 and fake_capture[0].replays == 2
    assert all(torch.equal(g, e) for g, e in zip(second, _op(x2, w)))
    assert all(torch.equal(g, e) for g, e in zip(first, _op(x, w)))  # cloned out: earlier results unchanged
    cache.call("op", _op, (torch.randn(5, 3), w), static=("a",))  # new shape: new capture
    cache.call("op", _op, (x, w), static=("b",))  # new static argument: new capture (evicts the oldest)
    cache.call("op", _op, (x.double(), w.double()), static=("a",))  # new dtype: new capture
    assert cache.captures == 4 and len(cache) == 2
    cache.call("op", _op, (x.t().contiguous().t(), w), static=("a",))  # same shape, other strides: new key
    assert cache.captures == 5
    entry = cache.entry("op", _op, (x.t().contiguous().t(), w), static=("a",))
    assert entry is cache.entry("op", _op, (x.t().contiguous().t(), w), static=("a",)) and cache.captures == 5


def test_static_inputs_skip_the_copy_and_wrong_inputs_are_refused(fake_capture):
    x, w = torch.randn(4, 3), torch.randn(3, 2)
    call = graphs.GraphedCall(_op, (x, w), clone_outputs=False)
    static_x, static_w = call.inputs
    assert static_x.data_ptr() != x.data_ptr() and torch.equal(static_x, x)
    static_x.copy_(torch.ones(4, 3))  # the caller writes its data into the static buffer and passes it back
    out = call(static_x, static_w)
    assert out is call._outputs and torch.equal(out[0], torch.ones(4, 3) @ w)
    adopted = graphs.GraphedCall(_op, (x, w), adopt_inputs=True)
    assert adopted.inputs[0] is x
    with pytest.raises(ValueError, match="differ from the captured"):
        call(torch.randn(5, 3), w)
    with pytest.raises(ValueError, match="expected 2 inputs"):
        call(x)


def test_failed_capture_falls_back_to_eager_with_the_reason(monkeypatch):
    def broken(self, *args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "_cuda_device", lambda tensors: (torch.device("cpu"), ""))
    monkeypatch.setattr(graphs.GraphedCall, "_capture", broken)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    x, w = torch.randn(4, 3), torch.randn(3, 2)
    call = graphs.GraphedCall(_op, (x, w))
    assert not call.graphed and call.reason.startswith("capture failed: RuntimeError: operation not permitted")
    assert all(torch.equal(g, e) for g, e in zip(call(x, w), _op(x, w)))


def test_graph_arguments_are_validated():
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        graphs.GraphedCall(_op, (torch.randn(2, 2), torch.randn(2, 2)), warmup=0)
    with pytest.raises(ValueError, match="max_entries must be >= 1"):
        graphs.GraphCache(max_entries=0)


# ---------------------------------------------------------------------------------------------------------------
# CUDA: a real capture and replay.


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_call_replays_bitwise_and_follows_new_data():
    x, w = torch.randn(64, 32, device="cuda"), torch.randn(32, 16, device="cuda")
    call = graphs.GraphedCall(_op, (x, w))
    assert call.graphed, call.reason
    for data in (x, torch.randn(64, 32, device="cuda")):
        got, want = call(data, w), _op(data, w)
        assert all(torch.equal(g, e) for g, e in zip(got, want))


@pytest.mark.gpu
@pytest.mark.skipif("rsvd" not in _dispatch.extension_ops("cuda"), reason="keeplora::rsvd is not built for CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("projected", [False, True])
def test_rsvd_graph_replay_equals_eager_bitwise(dtype, projected):
    a = _batch(6, 256, 192, dtype, seed=1, device="cuda")
    p = torch.linalg.qr(torch.randn(6, 256, 7, device="cuda")).Q if projected else None
    cache = graphs.GraphCache()
    entry = rsvd_graph_entry(a, 8, oversample=8, power_iters=2, project_out=p, seed=3, cache=cache)
    assert entry.graphed, entry.reason  # a capture that fell back would make the comparisons below vacuous
    for data in (a, _batch(6, 256, 192, dtype, seed=2, device="cuda")):  # new data in the same graph
        got = entry(data, p)
        want = kk.rsvd(data, 8, oversample=8, power_iters=2, project_out=p, seed=3)
        for g, e in zip(got, want):
            assert torch.equal(g, e)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a replay does not synchronise either
    try:
        entry(a, p)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graphs.default_cache.clear()
    before = graphs.default_cache.captures
    got = kk.rsvd(a, 8, oversample=8, power_iters=2, project_out=p, seed=3, graph=True)
    assert graphs.default_cache.captures == before + 1 and not graphs.default_cache.reasons
    assert all(
        torch.equal(g, e) for g, e in zip(got, kk.rsvd(a, 8, oversample=8, power_iters=2, project_out=p, seed=3))
    )
    graphs.default_cache.clear()
