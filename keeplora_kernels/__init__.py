"""Kernels behind keeplora: each op has a PyTorch (``torch``) backend and, where it pays, Triton and C++/CUDA ones.

``keeplora_kernels._dispatch`` picks the implementation per call; ``KEEPLORA_BACKEND`` forces one. Kernels that
lost to these wherever they were measured, or that no GPU has measured yet, are in
``keeplora_kernels.experimental``, never dispatched.
Importing this package never needs a GPU or the compiled extension.
"""

from ._extension import status as extension_status
from .lora_linear import lora_linear, lora_linear_shared, lora_linear_unfused
from .outer_sum import outer_sum
from .principal_subspace import energy_rank, principal_subspace
from .residual_project import residual_project
from .rsvd import rsvd
from .second_moment import second_moment_update

__all__ = [
    "lora_linear",
    "lora_linear_shared",
    "lora_linear_unfused",
    "residual_project",
    "second_moment_update",
    "outer_sum",
    "rsvd",
    "principal_subspace",
    "energy_rank",
    "extension_status",
]
