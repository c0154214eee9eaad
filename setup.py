"""Builds the optional C++/CUDA extension ``keeplora_kernels._C`` from ``csrc/``; metadata is in pyproject.toml.

* ``KEEPLORA_BUILD_EXT=0`` skips the extension (the package then runs its pure-PyTorch/Triton paths).
* With a CUDA toolkit (``CUDA_HOME``) and a CUDA build of torch, a ``CUDAExtension`` is built for
  ``TORCH_CUDA_ARCH_LIST`` (default ``9.0``); otherwise a CPU-only ``CppExtension``.
* ``MAX_JOBS`` is honoured by torch's ninja build.
"""

import glob
import os

from setuptools import setup


def extension_modules():
    if os.environ.get("KEEPLORA_BUILD_EXT", "1") == "0":
        return [], {}
    cpp_sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    if not cpp_sources:
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cxx = ["-O3", "-std=c++17"]
    with_cuda = CUDA_HOME is not None and torch.version.cuda is not None
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        cu_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
        ext = CUDAExtension(
            "keeplora_kernels._C",
            cpp_sources + cu_sources,
            extra_compile_args={
                "cxx": cxx + ["-DKEEPLORA_WITH_CUDA"],
                "nvcc": ["-O3", "-std=c++17", "-DKEEPLORA_WITH_CUDA"],
            },
        )
    else:
        ext = CppExtension("keeplora_kernels._C", cpp_sources, extra_compile_args=cxx)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
