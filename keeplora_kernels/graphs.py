"""CUDA-graph replay of whole ops: one host launch instead of one per kernel.

A batched op made of many small steps (``rsvd``: GEMMs, CholeskyQR passes, the Jacobi kernel) is bound by the
host's launch rate, not by the device, at real batch sizes. :class:`GraphedCall` captures one call of a function
of tensors into a CUDA graph and replays it: inputs are copied into static buffers (skipped when the caller passes
the static buffers themselves, see :attr:`GraphedCall.inputs`), the graph is replayed, and the outputs are cloned
out of the graph's memory pool (or returned as the static buffers with ``clone_outputs=False``).
:class:`GraphCache` keys captured graphs by ``(op, tensor shapes/strides/dtypes/devices, static arguments)``.

The captured function must not synchronise with the host, and everything that is not a tensor input (ranks, seeds,
flags) is baked into the graph, so it belongs in the key. Capture runs under ``torch.no_grad()``: graphed calls
return tensors without autograd history. Where a graph cannot be used (CPU tensors, tensors on several devices,
capture failed, e.g. an op that reads a device value on the host) the call runs eagerly and :attr:`reason` says why;
a failed capture is not retried for the same key.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

__all__ = ["GraphedCall", "GraphCache", "tensor_key", "default_cache"]


def _map_tensors(fn: Callable[[torch.Tensor], Any], value: Any) -> Any:
    """``fn`` applied to every tensor of a (nested) tuple/list/dict output; other values kept."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        mapped = [_map_tensors(fn, v) for v in value]
        return type(value)(mapped) if not hasattr(value, "_fields") else type(value)(*mapped)
    if isinstance(value, dict):
        return {k: _map_tensors(fn, v) for k, v in value.items()}
    return value


def tensor_key(tensors: Sequence[torch.Tensor | None]) -> tuple:
    """The part of a cache key that describes the tensor inputs: shape, stride, dtype and device of each (None kept)."""
    return tuple(None if t is None else (tuple(t.shape), t.stride(), t.dtype, str(t.device)) for t in tensors)


def _static_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with its strides (the captured kernels see the layout eager calls see)."""
    if t.is_contiguous():
        return t.clone()
    try:
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)
    except RuntimeError:  # overlapping strides (an expanded view): a dense copy, same values
        return t.clone()


def _cuda_device(tensors: Sequence[torch.Tensor | None]) -> tuple[torch.device | None, str]:
    """The one CUDA device of the inputs, or (None, why a graph cannot be used)."""
    devices = {t.device for t in tensors if t is not None}
    if not devices:
        return None, "no tensor inputs"
    if len(devices) > 1:
        return None, f"inputs on several devices {sorted(map(str, devices))}"
    device = devices.pop()
    if device.type != "cuda":
        return None, f"{device.type} tensors: CUDA graphs need CUDA tensors"
    return device, ""


class GraphedCall:
    """``fn(*inputs)`` captured once into a CUDA graph and replayed; eager where a graph cannot be used.

    Args:
        fn: function of the tensors (``None`` entries are passed as ``None``); it must not synchronise with the
            host. Its output is a tensor or a nested tuple/list/dict of tensors.
        example_inputs: tensors with the shapes, strides, dtypes and device of every later call (their values are
            the first call's data; they are copied, never kept, unless ``adopt_inputs``).
        warmup: eager calls on a side stream before the capture (library handles, workspaces, lazy init); the
            first call of a key costs warmup + 1 eager-length calls plus the capture.
        clone_outputs: return copies of the graph's output buffers (the default), so results stay valid across
            replays; with False the same buffers are returned by every call and overwritten by the next replay.
        adopt_inputs: use the ``example_inputs`` tensors themselves as the static inputs (no copy at capture, none
            when the caller passes them again); the caller keeps them alive and writes new data into them.
        pool: a graph memory pool handle shared with other graphs (``torch.cuda.graph_pool_handle()``).

    Attributes: ``graphed`` (whether calls replay a graph), ``reason`` (why not, else ""), ``inputs`` (the static
    input buffers; writing into them and passing them back skips the copies).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        example_inputs: Sequence[torch.Tensor | None],
        *,
        warmup: int = 1,
        clone_outputs: bool = True,
        adopt_inputs: bool = False,
        pool=None,
    ):
        if warmup < 1:
            raise ValueError(
                f"GraphedCall: warmup must be >= 1 (library handles are created on first use), got {warmup}"
            )
        self.fn = fn
        self.clone_outputs = clone_outputs
        self.key = tensor_key(example_inputs)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[torch.Tensor | None, ...] = ()  # eager calls keep no buffers
        self._outputs: Any = None
        self.reason = ""
        device, why = _cuda_device(example_inputs)
        if device is None:
            self.reason = why
            return
        try:
            self._capture(example_inputs, device, warmup, adopt_inputs, pool)
        except Exception as exc:  # any capture failure (host sync, unsupported op) falls back to eager
            self.graph, self._outputs, self.inputs = None, None, ()
            self.reason = f"capture failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            torch.cuda.synchronize(device)

    @property
    def graphed(self) -> bool:
        return self.graph is not None

    def _capture(self, example_inputs, device, warmup, adopt_inputs, pool) -> None:
        with torch.no_grad(), torch.cuda.device(device):
            static = tuple(t if t is None or adopt_inputs else _static_copy(t) for t in example_inputs)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    self.fn(*static)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                outputs = self.fn(*static)
            self.graph, self.inputs, self._outputs = graph, static, outputs

    def __call__(self, *inputs: torch.Tensor | None) -> Any:
        if len(inputs) != len(self.key):
            raise ValueError(f"GraphedCall: expected {len(self.key)} inputs, got {len(inputs)}")
        if self.graph is None:
            return self.fn(*inputs)
        key = tensor_key(inputs)
        if key != self.key:
            raise ValueError(
                f"GraphedCall: inputs {key} differ from the captured {self.key} (shape, stride, "
                "dtype and device must match; GraphCache captures one graph per key)"
            )
        with torch.no_grad():
            for new, static in zip(inputs, self.inputs):
                if new is not None and new.data_ptr() != static.data_ptr():
                    static.copy_(new)
            self.graph.replay()
            if not self.clone_outputs:
                return self._outputs
            return _map_tensors(torch.clone, self._outputs)


class GraphCache:
    """Captured :class:`GraphedCall` s keyed by ``(op, tensor_key(inputs), static)``, least recently used first out.

    ``call(op, fn, inputs, static)`` replays the graph of that key (capturing it on first use) and returns the
    outputs; ``fn`` must compute the same thing for equal keys, so every non-tensor argument goes into ``static``.
    ``reasons`` holds why a key runs eagerly; ``captures`` counts captures (a test hook: equal keys reuse).
    """

    def __init__(self, max_entries: int = 16):
        if max_entries < 1:
            raise ValueError(f"GraphCache: max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: collections.OrderedDict[Hashable, GraphedCall] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.captures = 0

    def key(self, op: str, inputs: Sequence[torch.Tensor | None], static: Hashable = ()) -> tuple:
        return (op, tensor_key(inputs), static)

    def entry(
        self, op: str, fn: Callable[..., Any], inputs: Sequence[torch.Tensor | None], static: Hashable = (), **options
    ) -> GraphedCall:
        """The entry of this key, captured now if missing (``options`` go to :class:`GraphedCall`)."""
        key = self.key(op, inputs, static)
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                return found
        graphed = GraphedCall(fn, inputs, **options)
        if graphed.graphed:
            self.captures += 1
        with self._lock:
            self._entries[key] = graphed
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return graphed

    def call(
        self, op: str, fn: Callable[..., Any], inputs: Sequence[torch.Tensor | None], static: Hashable = (), **options
    ) -> Any:
        return self.entry(op, fn, inputs, static, **options)(*inputs)

    @property
    def reasons(self) -> dict:
        return {k: e.reason for k, e in self._entries.items() if e.reason}

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every graph (and with it the memory its pool holds once nothing else refers to it)."""
        with self._lock:
            self._entries.clear()


default_cache = GraphCache()
