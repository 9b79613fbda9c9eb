"""Installs `hessian_service` from service/, with the native extension `hessian_service._C`.

The extension (csrc/) is built with torch's BuildExtension (ninja): a CppExtension on CPU
torch, a CUDAExtension with csrc/cuda/*.cu when torch has CUDA and nvcc is found. A failed
build prints a warning and the pure-Python package still installs (autograd serves).
Build with `pip install --no-build-isolation` so the extension compiles against the
installed torch.
"""

import glob
import sys

from setuptools import find_packages, setup


def _warn(message: str) -> None:
    print(
        f"\nWARNING: hessian_service._C {message}; the autograd backend will serve.\n",
        file=sys.stderr,
    )


def _native_build() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for hessian_service._C, or nothing when torch is absent."""
    try:
        import torch
        from torch.utils.cpp_extension import (
            CUDA_HOME,
            BuildExtension,
            CppExtension,
            CUDAExtension,
        )
    except ImportError as exc:
        _warn(f"not built (torch is not importable at build time: {exc})")
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """BuildExtension that warns instead of failing the install."""

        def run(self) -> None:
            try:
                super().run()
            except (Exception, SystemExit) as exc:  # a compiler error must not fail install
                _warn(f"failed to build ({type(exc).__name__}: {exc})")

    sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    with_cuda = bool(torch.version.cuda and CUDA_HOME and cuda_sources)
    kind = CUDAExtension if with_cuda else CppExtension
    ext = kind(
        "hessian_service._C",
        sources + (cuda_sources if with_cuda else []),
        extra_compile_args={"cxx": ["-O3", "-fno-math-errno"], "nvcc": ["-O3"]},
        define_macros=[("WITH_CUDA", None)] if with_cuda else [],
    )
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _native_build()

setup(
    name="hessian-service",
    version="0.1.0",
    description="Second-order optimisation as a gRPC service",
    python_requires=">=3.11",
    package_dir={"": "service"},
    packages=find_packages("service"),
    # What hessian_service imports (tests/test_package_metadata.py checks it against the code).
    # torch is pinned exactly as requirements/torch.txt, which installs it first (the CPU
    # build): a range here would let pip pull a newer, CUDA, torch. hessian-client holds the
    # generated wire stubs: ./client is installed before this package (make install, the
    # Dockerfile), so pip finds it installed; no version floor, which a stale editable
    # install would fail and send pip to the index for a package only this repository has.
    install_requires=[
        "torch==2.13.0",
        "numpy>=1.26",
        "grpcio>=1.85.1",
        "grpcio-health-checking>=1.85.1",
        "grpcio-reflection>=1.85.1",
        "grpcio-status>=1.85.1",
        "googleapis-common-protos>=1.70",
        "protobuf>=6.31,<8",
        "prometheus-client>=0.20",
        "psycopg[binary]>=3.2",
        "psycopg-pool>=3.2",
        "hessian-client",
    ],
    extras_require={"plot": ["matplotlib>=3.8"]},  # hessian_service.seed --plot
    entry_points={"console_scripts": ["hessian-server=hessian_service.server:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
