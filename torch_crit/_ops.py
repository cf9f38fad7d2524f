"""The compiled operator library ``torch.ops.torch_crit`` and its pure-PyTorch references.

Every op declared in ``csrc/registration.cpp`` has here:

* a typed wrapper (what the rest of the package calls),
* a pure-PyTorch reference of the same contraction (tests compare against it; it is also the
  fallback when the extension failed to build, with a one-time warning, and the path taken when
  gradients must flow through the op),
* a fake (meta) kernel so the op traces under ``torch.compile`` / ``torch.export``.

Which implementation ran is recorded: :func:`last_backend` and :func:`backend_counts` (``"cpu"``
and ``"cuda"`` are the compiled kernels, ``"reference"`` the pure-PyTorch path, ``"meta"`` the
fake kernel on meta tensors).

Set ``TORCH_CRIT_REQUIRE_EXT=1`` (the test suite does) to turn a missing extension into an
error instead of a warning.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Optional, Sequence, Union

import torch

__all__ = [
    "HAS_EXT",
    "EXT_ERROR",
    "gram_hadamard_accumulate_",
    "gram_hadamard_accumulate_reference_",
    "has_device_kernel",
    "last_backend",
    "backend_counts",
    "reset_backend_counts",
]

_OP_NAME = "torch_crit::gram_hadamard_accumulate_"
_REBUILD = "pip install --no-build-isolation -e ."

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
            f"Rebuild it with: {_REBUILD}  (error: {exc})"
        ) from exc


def _dispatch_keys_with_kernel() -> frozenset[str]:
    if not HAS_EXT:
        return frozenset()
    return frozenset(
        key
        for key in ("CPU", "CUDA")
        if torch._C._dispatch_has_kernel_for_dispatch_key(_OP_NAME, key)
    )


# Decided once at import (a Python constant, so torch.compile traces the wrapper without breaks).
_KERNEL_KEYS = _dispatch_keys_with_kernel()

_warned = False
_last_backend: list[Optional[str]] = [None]
_backend_counts: dict[str, int] = {}


def _record(backend: str) -> None:
    _last_backend[0] = backend
    _backend_counts[backend] = _backend_counts.get(backend, 0) + 1


def last_backend() -> Optional[str]:
    """Name the implementation that ran the most recent :func:`gram_hadamard_accumulate_` call.

    Returns:
        ``"cpu"`` or ``"cuda"`` (the compiled C++/OpenMP or CUDA kernel), ``"reference"`` (the
        pure-PyTorch contraction: missing extension, or gradients required), ``"meta"`` (the fake
        kernel on meta tensors), or ``None`` before the first call (or after
        :func:`reset_backend_counts`).
    """
    return _last_backend[0]


def backend_counts() -> dict[str, int]:
    """Count :func:`gram_hadamard_accumulate_` calls per implementation since import or reset.

    Returns:
        A new dict ``{backend: calls}`` with the names of :func:`last_backend`; mutating it
        changes nothing here.
    """
    return dict(_backend_counts)


def reset_backend_counts() -> None:
    """Forget the recorded calls (:func:`backend_counts` becomes ``{}``, :func:`last_backend` ``None``)."""
    _backend_counts.clear()
    _last_backend[0] = None


def has_device_kernel(device: Union[str, torch.device]) -> bool:
    """Tell whether the compiled extension has a kernel for tensors on ``device``.

    Args:
        device: a device or device string, e.g. ``"cpu"``, ``"cuda:0"``.

    Returns:
        ``True`` when ``torch_crit._C`` registered ``gram_hadamard_accumulate_`` for that
        device type (CUDA kernels exist only in builds made with ``TORCH_CRIT_CUDA=1`` or with
        a CUDA toolchain present).
    """
    return torch.device(device).type.upper() in _KERNEL_KEYS


def _require_device_kernel(device: torch.device) -> None:
    if device.type == "meta" or device.type.upper() in _KERNEL_KEYS:
        return
    if device.type == "cuda":
        raise RuntimeError(
            f"gram_hadamard_accumulate_: the tensors are on {device}, but torch_crit._C was built "
            "without CUDA kernels (it has kernels for: "
            f"{', '.join(sorted(_KERNEL_KEYS)) or 'none'}). Rebuild on a machine with nvcc and a "
            f"CUDA build of torch: TORCH_CRIT_CUDA=1 {_REBUILD}  — or move the tensors to the CPU."
        )
    raise RuntimeError(
        f"gram_hadamard_accumulate_: no torch_crit kernel for device type {device.type!r} (tensors "
        f"on {device}); supported: cpu, cuda. Move the tensors to the CPU, or call "
        "torch_crit._ops.gram_hadamard_accumulate_reference_ (pure PyTorch, any device)."
    )


def _warn_fallback() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            "torch_crit's C++ extension is not available; using the pure-PyTorch contraction "
            "(correct but slower and more memory hungry). Rebuild with "
            f"`{_REBUILD}` to get the fast kernels. Import error: {EXT_ERROR}",
            RuntimeWarning,
            stacklevel=3,
        )


def _eager_check(exc_type: type[Exception]) -> Callable[[bool, Callable[[], str]], None]:
    def check(cond: bool, message: Callable[[], str]) -> None:
        if not cond:
            raise exc_type(message())

    return check


def _validate(
    out: torch.Tensor,
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    C: Sequence[Optional[torch.Tensor]],
    symmetric: bool,
    *,
    symbolic: bool = False,
) -> None:
    """The argument rules of csrc/gram_hadamard.h, for the reference and the fake kernel.

    ``symbolic=True`` (the fake kernel) checks through ``torch._check_value``/``_check_type``,
    which accept symbolic sizes; eager checks avoid their first-call import cost.
    """
    op = "gram_hadamard_accumulate_"
    check_value = torch._check_value if symbolic else _eager_check(ValueError)
    check_type = torch._check_type if symbolic else _eager_check(TypeError)
    check_value(out.dim() == 4, lambda: f"{op}: out must have 4 dims, got shape {tuple(out.shape)}")
    check_type(
        out.dtype in (torch.float32, torch.float64),
        lambda: f"{op}: out has dtype {out.dtype}; supported are float32 and float64 "
        "(cast out, A, B and C with .float() or .double())",
    )
    check_value(
        len(A) == len(B) == len(C),
        lambda: f"{op}: A, B and C must have one entry per term, got {len(A)}, {len(B)} and "
        f"{len(C)} entries (use None in C for terms without a factor)",
    )
    N1, N2, K1, K2 = out.shape
    if symmetric:
        check_value(
            N1 == N2 and K1 == K2,
            lambda: f"{op}: symmetric=True needs out of shape [N, N, K, K], got {tuple(out.shape)}; "
            "call with symmetric=False",
        )
    for t, (a, b, c) in enumerate(zip(A, B, C)):
        for name, x, n, k in ((f"A[{t}]", a, N1, K1), (f"B[{t}]", b, N2, K2)):
            check_value(x.dim() == 3, lambda: f"{op}: {name} must have 3 dims, got shape {tuple(x.shape)}")
            check_value(
                x.device == out.device, lambda: f"{op}: {name} is on {x.device} but out is on {out.device}"
            )
            check_type(
                x.dtype == out.dtype, lambda: f"{op}: {name} has dtype {x.dtype} but out has {out.dtype}"
            )
            check_value(
                x.shape[0] == n and x.shape[1] == k,
                lambda: f"{op}: {name} must have shape [{n}, {k}, M] to match out "
                f"{tuple(out.shape)}, got {tuple(x.shape)}",
            )
        check_value(
            b.shape[2] == a.shape[2],
            lambda: f"{op}: B[{t}].size(2) must be {a.shape[2]} = A[{t}].size(2), got {b.shape[2]}",
        )
        if c is not None:
            check_value(
                c.device == out.device, lambda: f"{op}: C[{t}] is on {c.device} but out is on {out.device}"
            )
            check_type(
                c.dtype == out.dtype, lambda: f"{op}: C[{t}] has dtype {c.dtype} but out has {out.dtype}"
            )
            check_value(
                tuple(c.shape) in ((N1, N2), (N1, N2, K1, K2)),
                lambda: f"{op}: C[{t}] must be None, [N1, N2] = [{N1}, {N2}] or [N1, N2, K1, K2] = "
                f"{list(out.shape)}, got shape {tuple(c.shape)}",
            )


def _symmetrize(g: torch.Tensor) -> torch.Tensor:
    """Keep the pairs i <= j of ``g`` [N, N, K, K] and mirror i < j onto [j, i, b, a]."""
    n = g.shape[0]
    upper = torch.ones(n, n, dtype=g.dtype, device=g.device).triu()
    strict = torch.ones(n, n, dtype=g.dtype, device=g.device).triu(1)
    return g * upper[:, :, None, None] + (g * strict[:, :, None, None]).permute(1, 0, 3, 2)


def gram_hadamard_accumulate_reference_(
    out: torch.Tensor,
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    C: Sequence[Optional[torch.Tensor]],
    accumulate_fp64: bool = False,
    *,
    symmetric: bool = False,
) -> None:
    r"""Pure-PyTorch reference of :func:`gram_hadamard_accumulate_` (same contract, any device).

    .. math::
        \mathrm{out}_{ij;ab} \mathrel{+}= \sum_t \Big(\sum_m A^{(t)}_{i a m} B^{(t)}_{j b m}\Big)
        \, C^{(t)}_{ij(;ab)}

    One ``einsum`` per term, then the Hadamard factor and an in-place add: it forms one
    ``[N1, N2, K1, K2]`` temporary per term (two when ``C_t`` is given) and is differentiable
    with respect to every input. With ``accumulate_fp64`` the terms are summed in float64 and
    added to ``out`` with one rounding, as the compiled kernels do.

    Args:
        out: ``[N1, N2, K1, K2]``, float32 or float64; accumulated into.
        A: terms ``[N1, K1, M_t]``.
        B: terms ``[N2, K2, M_t]``.
        C: per term ``None``, ``[N1, N2]`` or ``[N1, N2, K1, K2]``.
        accumulate_fp64: sum in float64 and round once into ``out``.
        symmetric: keep the pairs ``i <= j`` and mirror ``i < j`` onto ``out[j, i, b, a]``.

    Raises:
        ValueError: shapes or devices do not fit. TypeError: unsupported or mixed dtypes.
    """
    A, B, C = list(A), list(B), list(C)
    _validate(out, A, B, C, symmetric)
    acc_dtype = torch.float64 if accumulate_fp64 else out.dtype
    total: Optional[torch.Tensor] = None
    for a, b, c in zip(A, B, C):
        g = torch.einsum("iam,jbm->ijab", a.to(acc_dtype), b.to(acc_dtype))
        if c is not None:
            g = g * (c[:, :, None, None] if c.dim() == 2 else c).to(acc_dtype)
        if symmetric:
            g = _symmetrize(g)
        if acc_dtype == out.dtype:
            out.add_(g)
        else:
            total = g if total is None else total + g
    if total is not None:
        out.copy_((out.to(acc_dtype) + total).to(out.dtype))


def _needs_autograd(out: torch.Tensor, *groups: Sequence[Optional[torch.Tensor]]) -> bool:
    if not torch.is_grad_enabled():
        return False
    if out.requires_grad:
        return True
    return any(x is not None and x.requires_grad for group in groups for x in group)


def gram_hadamard_accumulate_(
    out: torch.Tensor,
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    C: Sequence[Optional[torch.Tensor]],
    accumulate_fp64: bool = False,
    *,
    symmetric: bool = False,
) -> None:
    r"""Fused Gram–Hadamard accumulation, in place on ``out``.

    .. math::
        \mathrm{out}_{ij;ab} \mathrel{+}= \sum_t \Big(\sum_m A^{(t)}_{i a m} B^{(t)}_{j b m}\Big)
        \, C^{(t)}_{ij(;ab)}

    This is the one primitive behind the structured NTK (per layer: cotangent Gram ⊙ input
    Gram, cf. the layer sum (8.7) of the λ-weighted NTK (8.5)) and the dNTK (11.8); the compiled
    kernels form no per-term ``[N1, N2, K1, K2]`` temporary: they work on tiles of sample pairs,
    run one GEMM per term and tile, apply the factor ``C_t`` while accumulating all terms in a
    tile buffer, and read and write ``out`` once per call.

    Args:
        out: ``[N1, N2, K1, K2]``, contiguous, float32 or float64; accumulated into.
        A: terms ``[N1, K1, M_t]`` (any strides), same dtype and device as ``out``.
        B: terms ``[N2, K2, M_t]`` (any strides).
        C: per term ``None`` (all ones), ``[N1, N2]`` or ``[N1, N2, K1, K2]`` (any strides:
            ``expand`` views cost no memory).
        accumulate_fp64: for float32 inputs, form the inner products and the sum over terms in
            float64 and round once into ``out`` (float64 GEMMs: about 2× slower on CPU).
        symmetric: compute only the sample pairs ``i <= j`` and set ``out[j, i, b, a]`` for
            ``i < j`` from ``out[i, j, a, b]``: about half the work. Exact when the summed
            contribution is symmetric under ``(i, a) ↔ (j, b)`` (e.g. ``A_t is B_t`` and ``C_t``
            symmetric, as in Θ(x, x)); needs ``N1 == N2`` and ``K1 == K2``.

    Raises:
        ValueError: shapes, devices or ``out`` layout do not fit (the message names the term).
        TypeError: a dtype other than float32/float64, or mixed dtypes.
        RuntimeError: the tensors are on CUDA but the extension was built without CUDA kernels
            (rebuild with ``TORCH_CRIT_CUDA=1``), or on a device with no kernel.

    Note:
        When autograd is recording and any input requires grad, the differentiable
        pure-PyTorch reference runs instead of the compiled kernel (``last_backend() ==
        "reference"``); wrap probes in ``torch.no_grad()`` to get the fast path.

    Examples:
        >>> x = torch.randn(4, 1, 3, dtype=torch.float64)
        >>> out = torch.zeros(4, 4, 1, 1, dtype=torch.float64)
        >>> gram_hadamard_accumulate_(out, [x], [x], [None])
        >>> torch.allclose(out[:, :, 0, 0], x[:, 0] @ x[:, 0].T)
        True
    """
    A, B, C = list(A), list(B), list(C)
    if _needs_autograd(out, A, B, C):
        gram_hadamard_accumulate_reference_(out, A, B, C, accumulate_fp64, symmetric=symmetric)
        _record("reference")
        return
    if not HAS_EXT:
        _warn_fallback()
        gram_hadamard_accumulate_reference_(out, A, B, C, accumulate_fp64, symmetric=symmetric)
        _record("reference")
        return
    _require_device_kernel(out.device)
    torch.ops.torch_crit.gram_hadamard_accumulate_.default(out, A, B, C, accumulate_fp64, symmetric)
    _record(out.device.type)


if HAS_EXT:

    @torch.library.register_fake(_OP_NAME)
    def _gram_hadamard_accumulate_fake(
        out: torch.Tensor,
        A: list[torch.Tensor],
        B: list[torch.Tensor],
        C: list[Optional[torch.Tensor]],
        accumulate_fp64: bool = False,
        symmetric: bool = False,
    ) -> None:
        _validate(out, A, B, C, symmetric, symbolic=True)
        return None
