"""The one dispatch place: which backend runs an op, decided from the device and the operands' dtypes."""

import pytest
import torch

from keeplora_kernels import _dispatch

CUDA = torch.device("cuda")  # a device object only: nothing here touches CUDA


@pytest.fixture
def compiled_triton(monkeypatch):
    """As on a GPU machine: triton installed, no interpreter."""
    monkeypatch.setattr(_dispatch, "triton_available", lambda: True)
    monkeypatch.setattr(_dispatch, "triton_interpreted", lambda: False)
    monkeypatch.delenv("KEEPLORA_BACKEND", raising=False)


@pytest.mark.parametrize("op", ["lora_linear", "lora_linear_shared", "residual_project", "second_moment_update"])
def test_fp64_never_goes_to_triton_on_cuda(compiled_triton, op):
    assert _dispatch.select(op, CUDA, torch.float64) == "torch"  # no fp64 dot on GPUs
    assert _dispatch.select(op, CUDA, torch.bfloat16, torch.float64) == "torch"
    cpu_auto = "extension" if op in _dispatch.extension_ops("cpu") else "torch"  # the compiled op, if built
    assert _dispatch.select(op, torch.device("cpu"), torch.float32) == cpu_auto


def test_cuda_auto_takes_triton_only_where_it_measured_faster(compiled_triton):
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert _dispatch.select("second_moment_update", CUDA, dtype, torch.float32) == "triton"
        assert _dispatch.select("lora_linear", CUDA, dtype, dtype, torch.float32, torch.float32) == "torch"
        assert _dispatch.select("lora_linear_shared", CUDA, dtype) == "torch"
    assert _dispatch.select("residual_project", CUDA, torch.bfloat16, torch.float32) == "triton"
    assert _dispatch.select("residual_project", CUDA, torch.float32, torch.float32) == "torch"


@pytest.mark.parametrize("op", ["residual_project", "second_moment_update"])
def test_forcing_triton_reaches_every_kernel_on_cuda(compiled_triton, monkeypatch, op):
    monkeypatch.setenv("KEEPLORA_BACKEND", "triton")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert _dispatch.select(op, CUDA, dtype, torch.float32) == "triton"


@pytest.mark.parametrize("op", ["lora_linear", "lora_linear_shared", "outer_sum"])
def test_forcing_a_backend_an_op_lacks_keeps_the_automatic_choice(compiled_triton, monkeypatch, op):
    """No Triton row for these (the LoRA kernels are experimental): a forced ``triton`` leaves them on torch."""
    monkeypatch.setattr(_dispatch, "extension_ops", lambda device_type=None: frozenset())
    monkeypatch.setenv("KEEPLORA_BACKEND", "triton")
    assert "triton" not in _dispatch.implemented(op)
    assert _dispatch.select(op, CUDA, torch.bfloat16, torch.float32) == "torch"


def test_every_op_has_the_torch_backend_and_it_can_be_forced(monkeypatch):
    monkeypatch.setenv("KEEPLORA_BACKEND", "torch")
    for op in _dispatch._TABLE:
        assert "torch" in _dispatch.implemented(op)
        assert _dispatch.select(op, torch.device("cpu"), torch.float32) == "torch"
        assert callable(_dispatch.implementation(op, "torch"))


def test_forcing_triton_on_fp64_cuda_tensors_names_the_dtype(compiled_triton, monkeypatch):
    monkeypatch.setenv("KEEPLORA_BACKEND", "triton")
    assert _dispatch.select("residual_project", CUDA, torch.bfloat16) == "triton"
    with pytest.raises(RuntimeError, match="float64"):
        _dispatch.select("residual_project", CUDA, torch.float64)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        _dispatch.select("residual_project", torch.device("cpu"), torch.float32)


def test_the_interpreter_runs_every_dtype(monkeypatch):
    monkeypatch.setattr(_dispatch, "triton_available", lambda: True)
    monkeypatch.setattr(_dispatch, "triton_interpreted", lambda: True)
    monkeypatch.setenv("KEEPLORA_BACKEND", "triton")
    assert _dispatch.select("residual_project", torch.device("cpu"), torch.float64) == "triton"


def test_a_bad_backend_name_lists_the_accepted_ones(monkeypatch):
    monkeypatch.setenv("KEEPLORA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="'auto', 'torch', 'triton', 'extension'"):
        _dispatch.select("lora_linear", CUDA, torch.float32)


def test_the_old_backend_name_says_what_it_is_called_now(monkeypatch):
    monkeypatch.setenv("KEEPLORA_BACKEND", "reference")
    with pytest.raises(ValueError, match="now called 'torch'.*'auto', 'torch', 'triton', 'extension'"):
        _dispatch.select("residual_project", CUDA, torch.float32)


def test_choices_table_lists_every_op_and_marks_what_cannot_run(compiled_triton, monkeypatch):
    table = _dispatch.choices(CUDA)
    assert set(table) == set(_dispatch._TABLE)
    assert table["second_moment_update"]["bfloat16"] == "triton"
    assert table["lora_linear"] == {"bfloat16": "torch", "float32": "torch", "float64": "torch"}
    assert table["outer_sum"]["float32"] == "torch (addmm)"
    monkeypatch.setenv("KEEPLORA_BACKEND", "triton")
    forced = _dispatch.choices(CUDA)
    assert forced["residual_project"]["float64"] == "unavailable"  # no fp64 dot on GPUs
    assert forced["lora_linear"]["float64"] == "torch"  # no Triton row: the automatic choice
