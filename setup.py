"""Builds the optional C++/CUDA extension ``keeplora_kernels._C`` from ``csrc/`` and ships the benchmark configs;
metadata is in pyproject.toml.

* ``KEEPLORA_BUILD_EXT`` unset (or ``auto``): the extension is built when torch is importable at build time; if that
  or the compilation fails (no compiler, missing headers), the package is still built and installed without it, with
  a warning (it then runs its pure-PyTorch/Triton paths). ``KEEPLORA_BUILD_EXT=1``: the extension is required and a
  failure stops the build. ``KEEPLORA_BUILD_EXT=0``: no extension.
* With a CUDA toolkit (``CUDA_HOME``) and a CUDA build of torch, a ``CUDAExtension`` is built for
  ``TORCH_CUDA_ARCH_LIST`` (default ``9.0``); otherwise a CPU-only ``CppExtension``. The compiled library works only
  with the torch it was built against.
* ``MAX_JOBS`` is honoured by torch's ninja build.
* ``configs/*.yaml`` (the single source of the benchmark configs) are copied into the built package as
  ``keeplora_bench/configs/``, so that ``keeplora run`` finds them in an installed wheel.
"""

import glob
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

BUILD_EXT = os.environ.get("KEEPLORA_BUILD_EXT", "auto").strip().lower()
if BUILD_EXT not in ("0", "1", "auto", ""):
    sys.exit(f"KEEPLORA_BUILD_EXT must be 0 (skip), 1 (required) or auto (build if possible), got {BUILD_EXT!r}")
REQUIRED = BUILD_EXT == "1"


def warn(message: str) -> None:
    bar = "*" * 100
    print(f"\n{bar}\nWARNING (keeplora): {message}\n{bar}\n", file=sys.stderr)


class BuildPyWithConfigs(build_py):
    """build_py that also copies the repository's ``configs/*.yaml`` into ``keeplora_bench/configs`` of the build.

    An editable install skips the copy: the app then reads ``configs/`` of the checkout directly.
    """

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = os.path.join(self.build_lib, "keeplora_bench", "configs")
        os.makedirs(target, exist_ok=True)
        for path in sorted(glob.glob(os.path.join("configs", "*.yaml"))):
            shutil.copy2(path, os.path.join(target, os.path.basename(path)))


def extension_modules():
    if BUILD_EXT == "0":
        return [], {}
    cpp_sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    if not cpp_sources:
        if REQUIRED:
            sys.exit(
                "KEEPLORA_BUILD_EXT=1 but there are no csrc/*.cpp sources (build from the repository or its sdist)"
            )
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        # pip's isolated build environment has no torch (see pyproject.toml): build with --no-build-isolation
        if REQUIRED:
            sys.exit(f"KEEPLORA_BUILD_EXT=1 needs torch at build time ({exc}); use pip's --no-build-isolation")
        warn(
            f"torch is not importable at build time ({exc}): building keeplora WITHOUT the compiled extension "
            "keeplora_kernels._C (the PyTorch/Triton paths are used). To build it, install torch first and build "
            "with pip's --no-build-isolation."
        )
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """Unless the extension is required, a failed compilation leaves the package without it (with a warning)."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler missing or failing, headers missing, ninja errors, ...
                if REQUIRED:
                    raise
                warn(
                    f"building the compiled extension keeplora_kernels._C failed ({type(exc).__name__}: {exc}); "
                    "keeplora is installed WITHOUT it (the PyTorch/Triton paths are used). Set KEEPLORA_BUILD_EXT=1 "
                    "to make this an error, or KEEPLORA_BUILD_EXT=0 to skip the extension silently."
                )
                self.extensions = []

        def get_outputs(self):
            return super().get_outputs() if self.extensions else []

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
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithConfigs, **cmdclass})
