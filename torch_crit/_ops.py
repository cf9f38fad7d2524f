"""The compiled operator library ``torch.ops.torch_crit`` and its pure-PyTorch references.

Every op declared in ``csrc/registration.cpp`` has here:

* a typed wrapper (what the rest of the package calls),
* a pure-PyTorch reference of the same contraction (tests compare against it; it is also the
  fallback when the extension failed to build, with a one-time warning),
* a fake (meta) kernel so the op traces under ``torch.compile``.

Set ``TORCH_CRIT_REQUIRE_EXT=1`` (the test suite does) to turn a missing extension into an
error instead of a warning.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional, Sequence

import torch

__all__ = ["HAS_EXT", "EXT_ERROR", "gram_hadamard_accumulate_", "gram_hadamard_accumulate_reference_"]

try:  # importing _C runs the TORCH_LIBRARY registrations
    from torch_crit import _C  # noqa: F401

    HAS_EXT = True
    EXT_ERROR: Optional[BaseException] = None
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    HAS_EXT = False
    EXT_ERROR = exc
    if os.environ.get("TORCH_CRIT_REQUIRE_EXT") == "1":
        raise ImportError(
            "torch_crit's C++ extension (torch_crit._C) is not built but TORCH_CRIT_REQUIRE_EXT=1. "
            "Rebuild it with: pip install --no-build-isolation -e .  (error: %s)" % exc
        ) from exc

_warned = False


def _warn_fallback() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            "torch_crit's C++ extension is not available; using the pure-PyTorch contraction "
            "(correct but slower and more memory hungry). Rebuild with "
            "`pip install --no-build-isolation -e .` to get the fast kernels. "
            f"Import error: {EXT_ERROR}",
            RuntimeWarning,
            stacklevel=3,
        )


def gram_hadamard_accumulate_reference_(
    out: torch.Tensor,
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    C: Sequence[Optional[torch.Tensor]],
    accumulate_fp64: bool = False,
) -> None:
    r"""Pure-PyTorch reference of :func:`gram_hadamard_accumulate_` (same contract)."""
    for a, b, c in zip(A, B, C, strict=True):
        if accumulate_fp64 and a.dtype != torch.float64:
            g = torch.einsum("iam,jbm->ijab", a.double(), b.double())
        else:
            g = torch.einsum("iam,jbm->ijab", a, b)
        if c is not None:
            g = g * (c[:, :, None, None] if c.dim() == 2 else c)
        out.add_(g.to(out.dtype))


def gram_hadamard_accumulate_(
    out: torch.Tensor,
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    C: Sequence[Optional[torch.Tensor]],
    accumulate_fp64: bool = False,
) -> None:
    r"""Fused Gram–Hadamard accumulation, in place on ``out``.

    .. math::
        \mathrm{out}_{ij;ab} \mathrel{+}= \sum_t \Big(\sum_m A^{(t)}_{i a m} B^{(t)}_{j b m}\Big)
        \, C^{(t)}_{ij(;ab)}

    This is the one primitive behind the structured NTK (per layer: cotangent Gram ⊙ input
    Gram, cf. the layer sum (8.7)) and the dNTK (11.8); no per-term ``[N1, N2, K1, K2]``
    temporary is formed by the compiled kernels.

    Args:
        out: ``[N1, N2, K1, K2]``, contiguous, float32 or float64; accumulated into.
        A: terms ``[N1, K1, M_t]``.
        B: terms ``[N2, K2, M_t]``.
        C: per term ``None`` (all ones), ``[N1, N2]`` or ``[N1, N2, K1, K2]``.
        accumulate_fp64: accumulate the inner products in float64 for float32 inputs.
    """
    if not HAS_EXT:
        _warn_fallback()
        gram_hadamard_accumulate_reference_(out, A, B, C, accumulate_fp64)
        return
    torch.ops.torch_crit.gram_hadamard_accumulate_(out, list(A), list(B), list(C), accumulate_fp64)


if HAS_EXT:

    @torch.library.register_fake("torch_crit::gram_hadamard_accumulate_")
    def _gram_hadamard_accumulate_fake(out, A, B, C, accumulate_fp64=False):
        torch._check(out.dim() == 4, lambda: "gram_hadamard_accumulate_: out must be 4-D")
        torch._check(len(A) == len(B) == len(C), lambda: "A, B, C must have equal lengths")
        return None
