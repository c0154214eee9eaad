"""Imported first by the ``test_triton_*`` modules.

Skips the importing module when triton is not installed. Without a CUDA device the kernels run under the Triton
interpreter (``TRITON_INTERPRET=1``, which must be set before triton is imported: ``conftest.py`` does it first
thing); with one they run compiled on it. Asking CUDA here is fine: this is test code, imported at collection,
never library code.
"""

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:  # conftest.py already did this before anything could import triton; kept for standalone use
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


@pytest.fixture
def force_triton(monkeypatch):
    """``KEEPLORA_BACKEND=triton`` for one test (the other tests in the same session keep ``auto``).

    On the CPU also one intra-op thread for the test: the shapes are tiny, and on a shared 2-core machine a
    2-thread pool turns each small torch op into ~20 ms of spinning."""
    monkeypatch.setenv("KEEPLORA_BACKEND", "triton")
    threads = torch.get_num_threads()
    if not ON_GPU:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
