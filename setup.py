"""Build script for torch_crit's operator library ``torch_crit._C``.

Switches (environment variables):

* ``TORCH_CRIT_CUDA``: ``0`` never builds the CUDA kernels, ``1`` requires them (fails loudly
  without nvcc / a CUDA build of torch), unset = build them when ``torch.version.cuda`` and
  ``CUDA_HOME`` are both present (never decided by ``torch.cuda.is_available()``, so GPU-less
  build hosts still compile the kernels).
* ``TORCH_CRIT_DEBUG=1``: ``-O0 -g``.
* ``TORCH_CUDA_ARCH_LIST``: CUDA architectures, default ``8.0;9.0+PTX``.
"""
from __future__ import annotations

import glob
import os

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def get_extensions():
    debug = os.environ.get("TORCH_CRIT_DEBUG", "0") == "1"
    want_cuda = os.environ.get("TORCH_CRIT_CUDA")
    cuda_possible = torch.version.cuda is not None and CUDA_HOME is not None
    if want_cuda == "1" and not cuda_possible:
        raise RuntimeError(
            "TORCH_CRIT_CUDA=1 but no CUDA toolchain: torch.version.cuda="
            f"{torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}. Install a CUDA build of torch and "
            "nvcc of the same major version, or unset TORCH_CRIT_CUDA."
        )
    # torch derives CUDA_HOME from `which nvcc`; a wrapper script such as /usr/local/bin/nvcc
    # then yields a CUDA_HOME without the toolkit's headers.
    headers = CUDA_HOME is not None and os.path.isfile(os.path.join(CUDA_HOME, "include", "cuda_runtime.h"))
    if cuda_possible and not headers:
        msg = (
            f"CUDA_HOME={CUDA_HOME!r} has no include/cuda_runtime.h (is nvcc on PATH a wrapper "
            "outside the toolkit?). Set CUDA_HOME to the toolkit, e.g. CUDA_HOME=/usr/local/cuda."
        )
        if want_cuda == "1":
            raise RuntimeError(msg)
        print(f"torch_crit build: CUDA kernels skipped: {msg}")
        cuda_possible = False
    use_cuda = cuda_possible if want_cuda is None else want_cuda == "1"

    sources = _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp")
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-fopenmp"]
    extra = {"cxx": cxx}
    ext_cls = CppExtension
    if use_cuda:
        sources += _rel("csrc/cuda/*.cpp") + _rel("csrc/cuda/*.cu")
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        # no --use_fast_math: it flushes float32 denormals to zero; the kernels need no fast
        # transcendental functions and keep IEEE semantics (tests compare to 1e-12).
        extra["nvcc"] = ["-O3", "-lineinfo"] if not debug else ["-O0", "-g", "-G"]
        extra["cxx"] = extra["cxx"] + ["-DTORCH_CRIT_WITH_CUDA"]
        ext_cls = CUDAExtension
    print(
        f"torch_crit build: torch {torch.__version__}, CUDA "
        f"{'on (' + os.environ['TORCH_CUDA_ARCH_LIST'] + ')' if use_cuda else 'off'}, "
        f"{len(sources)} sources"
    )
    return [
        ext_cls(
            "torch_crit._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    ]


setup(
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
