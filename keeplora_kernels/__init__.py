"""Kernels behind keeplora: each op has a PyTorch reference and, where it pays, Triton and C++/CUDA versions.

``keeplora_kernels._dispatch`` picks the implementation per call; ``KEEPLORA_BACKEND`` forces one.
Importing this package never needs a GPU or the compiled extension.
"""

from ._extension import status as extension_status
from .lora_linear import lora_linear, lora_linear_ref, lora_linear_shared, lora_linear_shared_ref, lora_linear_unfused
from .outer_sum import outer_sum
from .principal_subspace import energy_rank, principal_subspace
from .residual_project import residual_project
from .rsvd import rsvd
from .second_moment import second_moment_update

__all__ = [
    "lora_linear",
    "lora_linear_ref",
    "lora_linear_shared",
    "lora_linear_shared_ref",
    "lora_linear_unfused",
    "residual_project",
    "second_moment_update",
    "outer_sum",
    "rsvd",
    "principal_subspace",
    "energy_rank",
    "extension_status",
]
