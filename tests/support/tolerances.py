"""The one tolerance table of the test suite.

Low-precision rule (flash-attention's): an implementation's error against an fp64 reference must be at most
``2 ×`` the error PyTorch's own ops make at the same dtype, plus an absolute floor ``ATOL_FLOOR[dtype]``.
Same-dtype comparisons of two fp32/fp64 computations use ``RTOL_ATOL``.
"""

import torch

RTOL_ATOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (2e-2, 1e-2),
}

ATOL_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_close(actual, expected, dtype=None):
    dtype = dtype or actual.dtype
    rtol, atol = RTOL_ATOL[dtype]
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol)


def assert_within_torch_error(actual, torch_low, exact, dtype):
    """``|actual − exact| ≤ 2·|torch_low − exact| + floor`` (max norms), exact computed in fp64."""
    exact = exact.double()
    err = (actual.double() - exact).abs().max().item()
    torch_err = (torch_low.double() - exact).abs().max().item()
    bound = 2 * torch_err + ATOL_FLOOR[dtype]
    assert err <= bound, f"error {err:.3e} exceeds 2×torch error {torch_err:.3e} + floor {ATOL_FLOOR[dtype]:.0e}"


# Largest principal angle (its sine) between a computed principal subspace and the exact one (float64 eigh), by the
# dtype of the returned basis: what keeplora_kernels.principal_subspace must guarantee on any spectrum.
SUBSPACE_SIN = {torch.float32: 1e-5, torch.float64: 1e-10}
