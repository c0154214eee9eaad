import os

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Without CUDA, Triton kernels run under the interpreter (tests/kernels/test_triton_*.py force KEEPLORA_BACKEND=triton).
# It has to be set before anything imports triton: triton's own jit helpers are built at its import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Property tests: "ci" (the default) is bounded and derandomized so that every run draws the same examples;
# HYPOTHESIS_PROFILE=dev draws more, from a fresh seed each run.
settings.register_profile("ci", max_examples=50, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("dev", max_examples=300, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    # GPU tests skip without CUDA; asked at collection time, never at import of library code.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_terminal_summary(terminalreporter):
    from support.properties import EXAMPLES

    if not EXAMPLES:
        return
    terminalreporter.section(f"hypothesis examples (profile {settings._current_profile})")
    for nodeid, n in sorted(EXAMPLES.items()):
        terminalreporter.write_line(f"{n:5d}  {nodeid}")
    terminalreporter.write_line(f"{sum(EXAMPLES.values()):5d}  in {len(EXAMPLES)} property tests")
