"""Memory model of an empirical-NTK call: result size, per-tile workspace, block size.

:func:`empirical_ntk` tiles the ``N1 × N2`` example pairs into blocks of ``block_size``
examples. Per block it holds the block's features (layer inputs, cotangents, per-example
gradients where chosen, generic Jacobians), per tile the primitive's operands and the tile
itself. :func:`plan_memory` picks the largest block whose workspace fits next to the result,
and raises :class:`NTKMemoryError` with the estimate and the fix when nothing fits.
:func:`estimate_ntk_memory` runs the same planning for a model and inputs without computing
anything large.
"""
from __future__ import annotations

from ..errors import NTKMemoryError  # noqa: F401  (re-exported)
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = [
    "NTKMemoryError",
    "MemoryEstimate",
    "available_memory",
    "plan_memory",
    "estimate_ntk_memory",
    "format_bytes",
]


def format_bytes(n: float) -> str:
    """``1536`` → ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def available_memory(device: torch.device) -> int:
    """Bytes available for new allocations on ``device``.

    CUDA: free device memory (``torch.cuda.mem_get_info``). CPU: ``MemAvailable`` of
    ``/proc/meminfo`` (falls back to total physical memory via ``sysconf``).
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@dataclass(frozen=True)
class MemoryEstimate:
    """Memory plan of one NTK call (bytes).

    Attributes:
        result_bytes: the returned tensor(s) (``per_layer`` multiplies by the group count).
        feature_bytes_per_example: block features kept per example.
        transient_bytes_per_example: temporaries while computing one example's features.
        pair_bytes: per example pair in a tile (output tile, ``C`` operands).
        block_size: examples per block; tiles are ``block_size × block_size``.
        n_row_blocks, n_col_blocks: the tile grid.
        cache_features: whether every block's features are kept (else column blocks are
            recomputed for each row block).
        workspace_bytes: peak memory besides the result, at this block size.
        available_bytes: memory available on the device when planned.
    """

    result_bytes: int
    feature_bytes_per_example: int
    transient_bytes_per_example: int
    pair_bytes: int
    block_size: int
    n_row_blocks: int
    n_col_blocks: int
    cache_features: bool
    workspace_bytes: int
    available_bytes: int

    @property
    def total_bytes(self) -> int:
        """Result plus workspace."""
        return self.result_bytes + self.workspace_bytes

    def __str__(self) -> str:
        return (
            f"result {format_bytes(self.result_bytes)} + workspace {format_bytes(self.workspace_bytes)} "
            f"(block {self.block_size}, {self.n_row_blocks}×{self.n_col_blocks} tiles, features "
            f"{'cached' if self.cache_features else 'recomputed per tile'}) of "
            f"{format_bytes(self.available_bytes)} available"
        )


def _smaller_outputs(output: str) -> str:
    """Advice naming the outputs smaller than ``output`` ("" when it is already the smallest)."""
    if output == "full":
        return "output='trace' (k² times smaller) or output='diagonal', "
    if output == "diagonal_outputs":
        return "output='trace' or output='diagonal', "
    if output == "trace":
        return "output='diagonal' (only Θ(x_i, x_i)), "
    return ""


def _workspace(b1: int, b2: int, feat: int, trans: int, pair: int) -> int:
    return (b1 + b2) * feat + max(b1, b2) * trans + b1 * b2 * pair


def plan_memory(
    *,
    n1: int,
    n2: int,
    symmetric: bool,
    result_bytes: int,
    feature_bytes_per_example: int,
    transient_bytes_per_example: int,
    pair_bytes: int,
    available_bytes: int,
    block_size: Optional[int] = None,
    fraction: float = 0.8,
    output: str = "full",
) -> MemoryEstimate:
    """Choose the block size (or check the given one) so that result + workspace fit.

    Args:
        n1, n2: examples on each side.
        symmetric: ``x2 is None`` (one set of blocks, upper-triangle tiles).
        result_bytes: size of what is returned.
        feature_bytes_per_example, transient_bytes_per_example, pair_bytes: the per-example and
            per-pair costs (see :class:`MemoryEstimate`).
        available_bytes: what the device has free.
        block_size: requested block size, or ``None`` to choose.
        output: the requested output (the advice only suggests smaller outputs than this one).
        fraction: share of the available memory the call may use.

    Raises:
        NTKMemoryError: the result alone, or one tile at the smallest (or requested) block
            size, does not fit; the message gives the estimate and the fix.
    """
    budget = int(available_bytes * fraction)
    smaller = _smaller_outputs(output)
    if result_bytes > budget:
        raise NTKMemoryError(
            f"the NTK result alone needs {format_bytes(result_bytes)} ({result_bytes} bytes) but "
            f"only {format_bytes(budget)} of {format_bytes(available_bytes)} available may be used. "
            f"Tiling cannot shrink the result: use {smaller}fewer inputs, or per_layer=False."
        )
    room = budget - result_bytes
    nmax = max(n1, n2)
    if block_size is not None:
        if block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size}.")
        b = min(block_size, nmax)
        ws = _workspace(min(b, n1), min(b, n2), feature_bytes_per_example, transient_bytes_per_example, pair_bytes)
        if ws > room:
            fit = b
            while fit > 1 and _workspace(min(fit, n1), min(fit, n2), feature_bytes_per_example, transient_bytes_per_example, pair_bytes) > room:
                fit = max(1, fit // 2)
            raise NTKMemoryError(
                f"one {b}×{b} tile needs about {format_bytes(ws)} ({ws} bytes) of workspace next to "
                f"the {format_bytes(result_bytes)} result, but only {format_bytes(room)} is left of "
                f"{format_bytes(available_bytes)} available. Use block_size={fit} or less (or "
                f"block_size=None to choose){', or ' + smaller.rstrip(', ') if smaller else ''}."
            )
    else:
        b = nmax
        while b > 1 and _workspace(min(b, n1), min(b, n2), feature_bytes_per_example, transient_bytes_per_example, pair_bytes) > room:
            b = (b + 1) // 2
        ws = _workspace(min(b, n1), min(b, n2), feature_bytes_per_example, transient_bytes_per_example, pair_bytes)
        if ws > room:
            raise NTKMemoryError(
                f"even a 1×1 tile needs about {format_bytes(ws)} ({ws} bytes) of workspace (one "
                f"example's features and Jacobians) but only {format_bytes(room)} is left of "
                f"{format_bytes(available_bytes)} available next to the result. Use "
                f"{smaller}a smaller model, or free memory."
            )
    nb1 = math.ceil(n1 / b)
    nb2 = nb1 if symmetric else math.ceil(n2 / b)
    cached_total = (n1 if symmetric else n1 + n2) * feature_bytes_per_example
    cache = (nb1 * nb2 > 1) and (cached_total + max(b, 1) * transient_bytes_per_example + b * b * pair_bytes <= room)
    if nb1 * nb2 == 1:
        cache = True
    ws_final = ws if not cache else max(ws, cached_total + b * transient_bytes_per_example + b * b * pair_bytes)
    return MemoryEstimate(
        result_bytes=int(result_bytes),
        feature_bytes_per_example=int(feature_bytes_per_example),
        transient_bytes_per_example=int(transient_bytes_per_example),
        pair_bytes=int(pair_bytes),
        block_size=int(b),
        n_row_blocks=int(nb1),
        n_col_blocks=int(nb2),
        cache_features=bool(cache),
        workspace_bytes=int(ws_final),
        available_bytes=int(available_bytes),
    )


def estimate_ntk_memory(model: "nn.Module", x1: Any, x2: Any = None, **kwargs: Any) -> MemoryEstimate:
    """The memory plan :func:`torch_crit.empirical_ntk` would use, without computing the NTK.

    Runs the model on at most two examples to size every layer, then plans the tiles.

    Args:
        model: the network.
        x1, x2: the inputs, as for :func:`torch_crit.empirical_ntk`.
        **kwargs: the same keywords as :func:`torch_crit.empirical_ntk` (``output``,
            ``per_layer``, ``learning_rates``, ``method``, ``block_size``, ``dtype``…).

    Returns:
        The :class:`MemoryEstimate`.

    Raises:
        NTKMemoryError: when the call would not fit (same message as the real call).
    """
    from torch_crit.ntk.empirical import plan_ntk

    return plan_ntk(model, x1, x2, **kwargs).memory
