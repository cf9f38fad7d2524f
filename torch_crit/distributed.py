r"""Empirical NTKs beyond one device: tiled, distributed and resumable, on ``torch.distributed``.

The N1×N2 sample grid is cut into tiles of ``block_size``×``block_size`` (the last ones ragged);
tile ``t`` (in a fixed order) belongs to rank ``t % world_size``. Each rank computes its tiles
with :func:`torch_crit.empirical_ntk` (the structured path, on the rank's device) and

* either the tiles are summed onto rank 0 (``out_path=None``; every other rank gets ``None``),
* or every rank writes its tiles straight into one ``.npy`` file (a numpy memmap, so results
  larger than memory stay usable) and records each finished tile in a per-rank journal after
  the data are flushed. A run killed mid-way resumes from the journals: finished tiles are
  skipped, and the file ends up identical to an uninterrupted run.

The same code runs under ``torchrun`` on CPUs (gloo) and GPUs (NCCL), and without
``torch.distributed`` at all (one process)::

    torchrun --nproc-per-node 2 my_script.py     # my_script calls dist.init_process_group("gloo")

    theta = torch_crit.distributed.empirical_ntk(model, x, output="trace", block_size=2048,
                                                 out_path="ntk.npy")   # np.load("ntk.npy", mmap_mode="r")

Ranks must hold identical weights and inputs: a checksum of both is compared across ranks
before any work, and stored with the output file so that a resume with a different model or
different inputs is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from torch_crit._io import atomic_write_text

__all__ = ["empirical_ntk", "tile_grid", "fingerprint"]

_Output = Literal["full", "trace"]


def tile_grid(n1: int, n2: int, block_size: int, symmetric: bool) -> list[tuple[int, int, int, int]]:
    """Tiles ``(i0, i1, j0, j1)`` covering an ``n1 × n2`` grid in row-major order.

    With ``symmetric`` (x2 is x1) only tiles with ``j0 >= i0`` are listed; the others are
    mirrors. ``n1``/``n2`` need not be multiples of ``block_size``: the last tiles are ragged.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size}")
    tiles = []
    for i0 in range(0, n1, block_size):
        for j0 in range(0, n2, block_size):
            if symmetric and j0 < i0:
                continue
            tiles.append((i0, min(i0 + block_size, n1), j0, min(j0 + block_size, n2)))
    return tiles


def fingerprint(model: nn.Module, *tensors: Optional[torch.Tensor]) -> str:
    """SHA-256 of the model's parameters and buffers (names, shapes, bytes) and of ``tensors``."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    for t in tensors:
        if t is not None:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()


def _world(process_group) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(process_group), dist.get_world_size(process_group)
    return 0, 1


def _check_same_everywhere(fp: str, process_group) -> None:
    rank, world = _world(process_group)
    if world == 1:
        return
    fps: list[Any] = [None] * world
    dist.all_gather_object(fps, fp, group=process_group)
    bad = [r for r, f in enumerate(fps) if f != fps[0]]
    if bad:
        raise RuntimeError(
            f"torch_crit.distributed.empirical_ntk: ranks {bad} hold different model weights or "
            f"inputs than rank 0 (checksums differ). Broadcast the weights first, e.g. "
            f"`for p in model.parameters(): dist.broadcast(p.data, 0)`, and pass the same inputs "
            f"on every rank."
        )


def _barrier(process_group) -> None:
    if _world(process_group)[1] > 1:
        dist.barrier(group=process_group)


class _TileFile:
    """The ``.npy`` result, its metadata and the per-rank journals of finished tiles."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype, meta: dict[str, Any]):
        self.path = path
        self.meta_path = path.with_name(path.name + ".meta.json")
        self.journal_dir = path.with_name(path.name + ".tiles")
        self.shape, self.dtype, self.meta = shape, dtype, meta

    def prepare(self, rank: int) -> None:
        """Rank 0 creates the file or validates the one of an interrupted run."""
        if rank != 0:
            return
        if self.meta_path.exists() and self.path.exists():
            old = json.loads(self.meta_path.read_text())
            if old != self.meta:
                diff = sorted(k for k in set(old) | set(self.meta) if old.get(k) != self.meta.get(k))
                raise RuntimeError(
                    f"{self.path} holds an interrupted NTK run of a different computation "
                    f"(differs in: {', '.join(diff)}). Delete {self.path}, {self.meta_path} and "
                    f"{self.journal_dir}/ to start afresh, or pass another out_path."
                )
            return
        for f in self.journal_dir.glob("rank*.txt") if self.journal_dir.exists() else []:
            f.unlink()
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.dtype, shape=self.shape)
        arr.flush()
        del arr
        os.replace(tmp, self.path)
        atomic_write_text(self.meta_path, json.dumps(self.meta, indent=2))

    def done(self) -> set[tuple[int, int]]:
        finished = set()
        if self.journal_dir.exists():
            for f in self.journal_dir.glob("rank*.txt"):
                for line in f.read_text().splitlines():
                    parts = line.split()
                    if len(parts) == 2:  # a torn last line is ignored: that tile is redone
                        finished.add((int(parts[0]), int(parts[1])))
        return finished

    def open(self) -> np.memmap:
        return np.load(self.path, mmap_mode="r+")

    def record(self, rank: int, i0: int, j0: int) -> None:
        with open(self.journal_dir / f"rank{rank}.txt", "a") as fh:
            fh.write(f"{i0} {j0}\n")
            fh.flush()
            os.fsync(fh.fileno())


def empirical_ntk(
    model: nn.Module,
    x1: torch.Tensor,
    x2: Optional[torch.Tensor] = None,
    *,
    output: _Output = "trace",
    block_size: int = 1024,
    out_path: Optional[str | os.PathLike] = None,
    process_group: Optional[Any] = None,
    learning_rates: Any = None,
    method: str = "auto",
    dtype: Optional[torch.dtype] = None,
    progress: bool = False,
    _stop_after: Optional[int] = None,
) -> Optional[torch.Tensor | np.memmap]:
    r"""Empirical NTK computed tile by tile, shared across the ranks of ``process_group``.

    .. math::
        \hat H_{i_1 i_2;\delta_1\delta_2}
        = \sum_{\mu} \lambda_\mu \frac{\partial z_{i_1;\delta_1}}{\partial\theta_\mu}
          \frac{\partial z_{i_2;\delta_2}}{\partial\theta_\mu}   \quad (8.5)

    Args:
        model: the network; identical on every rank (checked by checksum).
        x1: ``[N1, ...]`` inputs, identical on every rank (checked).
        x2: ``[N2, ...]`` inputs or ``None`` for ``x1`` (then only tiles on and above the
            diagonal are computed and mirrored).
        output: ``"trace"`` → ``[N1, N2]`` (summed over outputs) or ``"full"`` →
            ``[N1, N2, k, k]``.
        block_size: tile edge; N need not be a multiple of it.
        out_path: a ``.npy`` file to write tile by tile (returned as a read-only memmap on
            every rank); resumable. ``None`` sums the tiles onto rank 0 (others get ``None``).
        process_group: the ``torch.distributed`` group; ``None`` = the default group, or a
            single process when ``torch.distributed`` is not initialised.
        learning_rates, method, dtype: as in :func:`torch_crit.empirical_ntk`.
        progress: tqdm bar of this rank's tiles.

    Returns:
        the NTK on rank 0 (tensor or memmap), a memmap on other ranks with ``out_path``, else
        ``None`` on other ranks.
    """
    from tqdm.auto import tqdm

    from torch_crit.ntk import empirical_ntk as _ntk

    if output not in ("trace", "full"):
        raise ValueError(f"output must be 'trace' or 'full', got {output!r}")
    symmetric = x2 is None
    x2_ = x1 if symmetric else x2
    if not isinstance(x1, torch.Tensor) or not isinstance(x2_, torch.Tensor):
        raise TypeError("torch_crit.distributed.empirical_ntk takes tensors x1 (and x2) with the batch in dim 0")
    if x1.shape[1:] != x2_.shape[1:]:
        raise ValueError(f"x1 and x2 must have the same feature shape, got {tuple(x1.shape[1:])} and {tuple(x2_.shape[1:])}")
    rank, world = _world(process_group)
    fp = fingerprint(model, x1, None if symmetric else x2)
    _check_same_everywhere(fp, process_group)

    n1, n2 = x1.shape[0], x2_.shape[0]
    with torch.no_grad():
        k = int(model(x1[:1]).reshape(1, -1).shape[1]) if output == "full" else 1
    res_dtype = dtype or torch.float32
    shape = (n1, n2) if output == "trace" else (n1, n2, k, k)
    tiles = tile_grid(n1, n2, block_size, symmetric)
    mine = [t for idx, t in enumerate(tiles) if idx % world == rank]

    def compute(t):
        i0, i1, j0, j1 = t
        res = _ntk(model, x1[i0:i1], x2_[j0:j1], output=output, learning_rates=learning_rates,
                   method=method, dtype=dtype)
        return res.to(res_dtype)

    if out_path is None:
        result = torch.zeros(shape, dtype=res_dtype, device=x1.device)
        for n_done, t in enumerate(tqdm(mine, desc=f"NTK tiles (rank {rank})", disable=not progress)):
            if _stop_after is not None and n_done >= _stop_after:
                raise KeyboardInterrupt("stopped on request (_stop_after)")
            i0, i1, j0, j1 = t
            blk = compute(t)
            result[i0:i1, j0:j1] = blk
            if symmetric and j0 != i0:
                result[j0:j1, i0:i1] = blk.transpose(0, 1).transpose(2, 3) if output == "full" else blk.T
        if world > 1:
            dist.reduce(result, dst=dist.get_global_rank(process_group, 0) if process_group else 0,
                        op=dist.ReduceOp.SUM, group=process_group)
        return result if rank == 0 else None

    path = Path(out_path)
    meta = {"fingerprint": fp, "shape": list(shape), "dtype": str(np.dtype(str(res_dtype).split(".")[-1])),
            "block_size": block_size, "output": output, "symmetric": symmetric,
            "learning_rates": repr(learning_rates)}
    tf = _TileFile(path, shape, np.dtype(meta["dtype"]), meta)
    tf.prepare(rank)
    _barrier(process_group)
    finished = tf.done()
    todo = [t for t in mine if (t[0], t[2]) not in finished]
    arr = tf.open()
    for n_done, t in enumerate(tqdm(todo, desc=f"NTK tiles (rank {rank})", disable=not progress)):
        if _stop_after is not None and n_done >= _stop_after:
            arr.flush()
            raise KeyboardInterrupt("stopped on request (_stop_after)")
        i0, i1, j0, j1 = t
        blk = compute(t).cpu().numpy()
        arr[i0:i1, j0:j1] = blk
        if symmetric and j0 != i0:
            arr[j0:j1, i0:i1] = blk.transpose(1, 0, 3, 2) if output == "full" else blk.T
        arr.flush()
        tf.record(rank, i0, j0)
    del arr
    _barrier(process_group)
    return np.load(path, mmap_mode="r")
