"""torch_crit.distributed: tiles over ranks (gloo on loopback), memmap output, resume."""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import torch_crit
from torch_crit import distributed as tcd

from _references import mlp


def _model(seed: int = 0) -> nn.Module:
    return mlp(depth=3, width=16, d_in=5, d_out=3, dtype=torch.float32, seed=seed)


def _inputs() -> torch.Tensor:
    return torch.randn(11, 5, generator=torch.Generator().manual_seed(1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_path: str, results) -> None:
    """One process group, three scenarios: gather to rank 0, shared memmap, mismatched weights."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x = _inputs()
        res = tcd.empirical_ntk(_model(), x, output="full", block_size=4)
        results.put((rank, "gather", None if res is None else res.numpy()))
        res = tcd.empirical_ntk(_model(), x, output="full", block_size=4, out_path=out_path)
        results.put((rank, "memmap", np.asarray(res).copy()))
        try:
            tcd.empirical_ntk(_model(seed=rank), x, output="full", block_size=4)
            results.put((rank, "mismatch", "no error"))
        except RuntimeError as exc:
            results.put((rank, "mismatch", str(exc)))
    finally:
        dist.destroy_process_group()


def _run(world: int, out_path: str) -> dict[tuple[int, str], object]:
    ctx = mp.get_context("spawn")
    for attempt in range(2):  # the free port can be taken between probing and rendezvous: retry once
        results = ctx.SimpleQueue()
        try:
            mp.start_processes(_worker, args=(world, _free_port(), out_path, results), nprocs=world,
                               join=True, start_method="spawn")
            break
        except (mp.ProcessRaisedException, mp.ProcessExitedException):
            if attempt == 1:
                raise
    out = {}
    while not results.empty():
        rank, scenario, payload = results.get()
        out[rank, scenario] = payload
    return out


def _reference(output: str = "full") -> torch.Tensor:
    return torch_crit.empirical_ntk(_model(), _inputs(), output=output)


def test_tile_grid_covers_ragged_grid():
    tiles = tcd.tile_grid(11, 7, 4, symmetric=False)
    seen = np.zeros((11, 7), int)
    for i0, i1, j0, j1 in tiles:
        seen[i0:i1, j0:j1] += 1
    assert (seen == 1).all()
    sym = tcd.tile_grid(11, 11, 4, symmetric=True)
    assert len(sym) == 6 and all(j0 >= i0 for i0, _, j0, _ in sym)
    with pytest.raises(ValueError, match="block_size"):
        tcd.tile_grid(3, 3, 0, True)


def test_single_process_matches_empirical_ntk():
    ref = _reference()
    got = tcd.empirical_ntk(_model(), _inputs(), output="full", block_size=4)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    x2 = torch.randn(6, 5)
    got2 = tcd.empirical_ntk(_model(), _inputs(), x2, output="trace", block_size=4)
    torch.testing.assert_close(got2, torch_crit.empirical_ntk(_model(), _inputs(), x2, output="trace"), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_gloo_ranks(tmp_path):
    out = _run(2, str(tmp_path / "ntk.npy"))
    ref = _reference().numpy()
    # gathered to rank 0, None elsewhere
    assert out[1, "gather"] is None
    np.testing.assert_allclose(out[0, "gather"], ref, rtol=1e-5, atol=1e-6)
    # one memmap written by both ranks, readable on both
    for rank in (0, 1):
        np.testing.assert_allclose(out[rank, "memmap"], ref, rtol=1e-5, atol=1e-6)
    # ranks with different weights are refused on every rank, before any work
    for rank in (0, 1):
        assert "different model weights" in out[rank, "mismatch"]


def test_interrupted_run_resumes_to_the_same_file(tmp_path):
    full = tmp_path / "full.npy"
    tcd.empirical_ntk(_model(), _inputs(), output="full", block_size=4, out_path=full)
    part = tmp_path / "part.npy"
    with pytest.raises(KeyboardInterrupt):
        tcd.empirical_ntk(_model(), _inputs(), output="full", block_size=4, out_path=part, _stop_after=2)
    assert len((tmp_path / "part.npy.tiles" / "rank0.txt").read_text().splitlines()) == 2
    calls = []
    orig = torch_crit.ntk.empirical_ntk

    def counting(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    torch_crit.ntk.empirical_ntk = counting
    try:
        res = tcd.empirical_ntk(_model(), _inputs(), output="full", block_size=4, out_path=part)
    finally:
        torch_crit.ntk.empirical_ntk = orig
    assert len(calls) == len(tcd.tile_grid(11, 11, 4, True)) - 2  # finished tiles are skipped
    assert np.array_equal(np.load(full), np.asarray(res))
    # a torn journal line (crash while writing it) only redoes that tile
    with open(tmp_path / "part.npy.tiles" / "rank0.txt", "a") as fh:
        fh.write("8")
    res2 = tcd.empirical_ntk(_model(), _inputs(), output="full", block_size=4, out_path=part)
    assert np.array_equal(np.load(full), np.asarray(res2))


def test_resume_with_another_model_is_refused(tmp_path):
    path = tmp_path / "ntk.npy"
    with pytest.raises(KeyboardInterrupt):
        tcd.empirical_ntk(_model(), _inputs(), output="trace", block_size=4, out_path=path, _stop_after=1)
    with pytest.raises(RuntimeError, match="different computation"):
        tcd.empirical_ntk(_model(seed=5), _inputs(), output="trace", block_size=4, out_path=path)


def test_bad_inputs():
    with pytest.raises(ValueError, match="output"):
        tcd.empirical_ntk(_model(), _inputs(), output="diagonal")
    with pytest.raises(ValueError, match="feature shape"):
        tcd.empirical_ntk(_model(), _inputs(), torch.randn(3, 4))
