"""Ensemble sampling speed: batched networks (torch_crit.validate) vs a naive per-model loop.

Workload (issue #6): M = 10,000 tanh MLPs at criticality, depth L = 10, hidden width 64,
n0 = 16, n_out = 2, N = 8 inputs, float64. Per network we need the stochastic metric of every
layer (for V) and the output NTK (for Θ, A, B).

* ``batched`` — :func:`torch_crit.validate.sample_ensemble` (weights ``[M_chunk, n_out, n_in]``,
  one ``baddbmm`` per layer, exact output NTK by batched backward cotangents), three variants:
  metric only, + output-layer NTK, + NTK of every layer.
* ``naive loop`` — one ``nn.Sequential`` per network: draw weights, forward the 8 inputs while
  recording each layer's metric, output NTK by ``torch.func.jacrev`` over the parameters and a
  λ-weighted ``J Λ Jᵀ``. Timed on a subset of networks and extrapolated linearly to M (stated
  in the table).

Prints a table and writes ``benchmarks/results/ensemble_speed.json`` (atomically). Timings are
wall-clock on whatever machine runs it; say how loaded it was when quoting them.

Usage: ``python benchmarks/ensemble_speed.py [--ensemble 10000] [--loop-subset 200]``
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

from torch_crit._io import atomic_write_json
from torch_crit.theory.predict import ArchitectureSpec
from torch_crit.validate import sample_ensemble


def naive_loop(spec: ArchitectureSpec, x: torch.Tensor, count: int, seed: int = 0) -> tuple[float, float]:
    """(wall, CPU) seconds for ``count`` networks done one at a time (metric per layer + output NTK by jacrev)."""
    from torch.func import functional_call, jacrev

    act = spec.activation
    g = torch.Generator().manual_seed(seed)
    widths = [x.shape[1]] + list(spec.widths) + [spec.n_out]
    L = spec.depth
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(count):
        layers: list[nn.Module] = []
        for l in range(1, L + 1):
            lin = nn.Linear(widths[l - 1], widths[l]).double()
            with torch.no_grad():
                lin.weight.normal_(0.0, math.sqrt(spec.layer_value("C_W", l) / widths[l - 1]), generator=g)
                lin.bias.normal_(0.0, math.sqrt(spec.layer_value("C_b", l)), generator=g)
            layers.append(lin)
            if l < L:
                layers.append(_Act(act))
        model = nn.Sequential(*layers)
        with torch.no_grad():  # stochastic metric of every layer
            h = x
            metrics = []
            for m in model:
                if isinstance(m, nn.Linear):
                    metrics.append(h @ h.T / h.shape[1])
                h = m(h)
        params = {k: v.detach() for k, v in model.named_parameters()}
        J = jacrev(lambda p: functional_call(model, p, (x,)))(params)
        lam = {}
        for l, name in enumerate(n for n, _ in model.named_parameters()):
            layer = l // 2 + 1
            lam[name] = (spec.layer_value("lambda_W", layer) / widths[layer - 1]) if name.endswith("weight") \
                else spec.layer_value("lambda_b", layer)
        H = sum(lam[k] * torch.einsum("aiP,bjP->ijab", j.reshape(x.shape[0], spec.n_out, -1),
                                      j.reshape(x.shape[0], spec.n_out, -1)) for k, j in J.items())
        del H, metrics
    return time.perf_counter() - t0, time.process_time() - c0


class _Act(nn.Module):
    def __init__(self, act) -> None:
        super().__init__()
        self.act = act

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.act.sigma(z)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ensemble", type=int, default=10_000)
    ap.add_argument("--depth", type=int, default=10)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--inputs", type=int, default=8)
    ap.add_argument("--loop-subset", type=int, default=100)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ensemble_speed.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    spec = ArchitectureSpec.critical("tanh", args.depth, args.width, n_out=2, n_in=16)
    x = torch.randn(args.inputs, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    M = args.ensemble
    rows = []
    for label, layers in (("batched: metric (V) only", ()), ("batched: + output NTK", (args.depth,)),
                          ("batched: + NTK of every layer", None)):
        t0, c0 = time.perf_counter(), time.process_time()
        meas = sample_ensemble(spec, x, M, seed=0, ntk_layers=layers, probe_neurons=4)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        rows.append({"method": label, "networks_timed": M, "seconds_for_M": dt, "cpu_seconds_for_M": dc,
                     "extrapolated": False, "ok": bool(torch.isfinite(meas.V.value[1:]).all())})
        print(f"  {label}: {dt:.1f} s wall, {dc:.1f} s CPU", flush=True)
    sub = min(args.loop_subset, M)
    t_loop, c_loop = naive_loop(spec, x, sub)
    rows.append({"method": "naive per-model loop (metric + output NTK via jacrev)", "networks_timed": sub,
                 "seconds_for_M": t_loop * M / sub, "cpu_seconds_for_M": c_loop * M / sub,
                 "extrapolated": True, "ok": True})
    threads = torch.get_num_threads()
    base = rows[1]["cpu_seconds_for_M"]
    print(f"Ensemble sampling: M={M}, L={args.depth}, n={args.width}, N={args.inputs} inputs, float64, "
          f"{threads} threads, load average {os.getloadavg()[0]:.1f} (wall times inflate with load; CPU "
          f"seconds / threads estimates an unloaded wall time)")
    print(f"{'method':<56} {'timed on':>15} {'wall s (M)':>11} {'CPU s (M)':>10} {'CPU/threads':>12} {'vs batched+NTK':>15}")
    for r in rows:
        tag = f"{r['networks_timed']}" + (" (extrap.)" if r["extrapolated"] else "")
        print(f"{r['method']:<56} {tag:>15} {r['seconds_for_M']:11.2f} {r['cpu_seconds_for_M']:10.2f} "
              f"{r['cpu_seconds_for_M'] / threads:12.2f} {r['cpu_seconds_for_M'] / base:14.1f}x")
    target = min(rows[1]["seconds_for_M"], rows[1]["cpu_seconds_for_M"] / threads) < 60
    print(f"target (< 60 s for M={M} with output NTK, unloaded estimate): {'met' if target else 'NOT met'}")
    atomic_write_json(args.out, {
        "benchmark": "ensemble_speed", "ensemble": M, "depth": args.depth, "width": args.width,
        "inputs": args.inputs, "dtype": "float64", "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0], "machine": platform.platform(), "torch": torch.__version__,
        "rows": rows, "target_60s_met": target,
    })
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
