"""Trace NTK of N=16,384 inputs with bounded memory, 1 vs 2 processes (gloo), side by side.

MLP 64→512×4→1 (tanh), float32, written tile by tile into a .npy memmap by
``torch_crit.distributed.empirical_ntk``. Each configuration runs in fresh processes so the
peak RSS (max over ranks, ``ru_maxrss``) is its own. The result itself is 1 GiB on disk; the
processes never hold it in memory.

    python benchmarks/ntk_scaling.py            # N = 16384
    python benchmarks/ntk_scaling.py --quick    # N = 2048
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import write_results  # noqa: E402


def make_model() -> nn.Module:
    torch.manual_seed(0)
    layers, n = [], 64
    for _ in range(4):
        layers += [nn.Linear(n, 512), nn.Tanh()]
        n = 512
    return nn.Sequential(*layers, nn.Linear(n, 1))


def _worker(rank, world, port, n, block, path, queue):
    import torch_crit.distributed as tcd

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(1))
    model = make_model()
    t0 = time.perf_counter()
    res = tcd.empirical_ntk(model, x, output="trace", block_size=block, out_path=path)
    seconds = time.perf_counter() - t0
    diag = float(np.asarray(res[:4, :4]).trace()) if rank == 0 else 0.0
    if world > 1:
        dist.destroy_process_group()
    queue.put((rank, seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, diag))


def run_config(world: int, n: int, block: int) -> dict:
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
        path = os.path.join(d, "ntk.npy")
        ctx = mp.get_context("spawn")
        queue = ctx.SimpleQueue()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        t0 = time.perf_counter()
        mp.start_processes(_worker, args=(world, port, n, block, path, queue), nprocs=world, start_method="spawn")
        wall = time.perf_counter() - t0
        rows = [queue.get() for _ in range(world)]
        size = os.path.getsize(path)
    return {
        "processes": world,
        "N": n,
        "block_size": block,
        "wall_s": wall,
        "ntk_s": max(r[1] for r in rows),
        "peak_rss_mib_max_rank": max(r[2] for r in rows),
        "result_file_mib": size / 2**20,
        "result_in_memory_mib": n * n * 4 / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--block", type=int, default=2048)
    args = ap.parse_args()
    n = args.n or (2048 if args.quick else 16384)
    block = min(args.block, n // 2) if args.quick else args.block
    rows = [run_config(1, n, block), run_config(2, n, block)]
    print(f"trace NTK, MLP 64→512×4→1 tanh, float32, N={n}, tiles {block}×{block}, memmap output")
    print(f"{'processes':>9} {'wall s':>8} {'NTK s':>8} {'peak RSS MiB (max rank)':>24} {'result MiB':>11}")
    for r in rows:
        print(f"{r['processes']:>9} {r['wall_s']:>8.1f} {r['ntk_s']:>8.1f} {r['peak_rss_mib_max_rank']:>24.0f} {r['result_file_mib']:>11.0f}")
    print(f"speed-up 2 vs 1 process: {rows[0]['ntk_s'] / rows[1]['ntk_s']:.2f}x (2 cores)")
    write_results("ntk_scaling", {"rows": rows, "quick": args.quick})


if __name__ == "__main__":
    main()
