"""Speed of the theory engine, with naive baselines side by side.

    python benchmarks/theory_speed.py            # full run (~1-2 min on an idle 2-core machine)
    python benchmarks/theory_speed.py --quick    # smaller recursions

Rows:

* ``critical_point`` of new user callables (no cache): a half-stable SWISH variant (scan +
  root of (5.73) by quadrature), a scaled tanh (Taylor path), a scaled ReLU (detected
  numerically as scale-invariant). Target < 0.5 s. Baseline: the same (5.73) root with
  ``scipy.integrate.quad`` + ``scipy.optimize.brentq`` (what one writes by hand).
* ``kernel_recursion`` / ``kernel_and_ntk_recursion``: ReLU (arc-cosine closed form), 1000 layers
  on a 256×256 Gram. Target < 1 s. Baselines: a NumPy full-matrix implementation of the same
  closed form, and a Python loop over the N(N+1)/2 pairs (timed on a few layers, extrapolated
  linearly in depth; the row says so).
* quadrature path: tanh kernel recursion (shared 2-D Gauss–Legendre grid over all pairs), N=100,
  10 layers (target: a few seconds), reported per pair and layer; and N=256 extrapolated to 1000
  layers from 3 (not a target; stated for scale).

Timing: best of ``--repeats`` wall-clock runs, for each ``torch.set_num_threads`` in ``--threads``
(default ``1,2``: both tables in one run and one JSON), and the
process CPU time of that run (with one thread, an estimate of the wall time on an idle machine).
The development machine is shared by other jobs: compare columns of one run, not runs.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import write_results  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from torch_crit.theory import critical_point, kernel_and_ntk_recursion, kernel_recursion  # noqa: E402


_CPU: dict[int, float] = {}


def _best(fn: Callable[[], Any], repeats: int) -> float:
    """Best wall time of ``repeats`` runs; the process CPU time of that run goes to ``_CPU[id(fn)]``."""
    best, cpu = math.inf, math.inf
    for _ in range(repeats):
        c, t = time.process_time(), time.perf_counter()
        fn()
        wall = time.perf_counter() - t
        if wall < best:
            best, cpu = wall, time.process_time() - c
    _CPU[id(fn)] = cpu
    return best


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(best wall seconds, CPU seconds of that run); with one thread the CPU time approximates
    the wall time on an idle machine."""
    wall = _best(fn, repeats)
    return wall, _CPU.pop(id(fn))


def _scipy_critical(beta: float) -> float:
    """Hand-written baseline: root of (5.73) for z*sigmoid(beta z) with scipy quad + brentq."""
    from scipy import integrate, optimize

    def sig(z: float) -> float:  # sigmoid(beta z)
        return 0.5 * (1 + math.tanh(0.5 * beta * z))

    def s(z: float) -> float:
        return z * sig(z)

    def ds(z: float) -> float:
        q = sig(z)
        return q + beta * z * q * (1 - q)

    def gauss(f: Callable[[float], float], K: float) -> float:
        c = 1 / math.sqrt(2 * math.pi * K)
        return integrate.quad(lambda z: f(z) * c * math.exp(-z * z / (2 * K)), -np.inf, np.inf, epsabs=1e-14, epsrel=1e-13)[0]

    def F(K: float) -> float:
        return 2 * K * K * gauss(lambda z: ds(z) ** 2, K) - gauss(lambda z: s(z) ** 2 * (z * z - K), K)

    grid = np.geomspace(0.5, 100, 40)
    vals = [F(k) for k in grid]
    for a, b, fa, fb in zip(grid[:-1], grid[1:], vals[:-1], vals[1:]):
        if fa * fb < 0:
            return optimize.brentq(F, a, b, xtol=1e-12)
    return math.nan


def _numpy_relu(G: np.ndarray, depth: int) -> np.ndarray:
    K = 2.0 * G
    for _ in range(depth - 1):
        n = np.sqrt(np.diag(K))
        norm = np.outer(n, n)
        c = np.clip(K / norm, -1, 1)
        psi = np.arccos(c)
        K = 2.0 * (norm / (2 * np.pi)) * (np.sin(psi) + (np.pi - psi) * c)
    return K


def _loop_relu(G: np.ndarray, depth: int) -> np.ndarray:
    N = G.shape[0]
    K = 2.0 * G
    for _ in range(depth - 1):
        new = np.empty_like(K)
        for i in range(N):
            for j in range(i, N):
                nrm = math.sqrt(K[i, i] * K[j, j])
                c = max(-1.0, min(1.0, K[i, j] / nrm))
                psi = math.acos(c)
                new[i, j] = new[j, i] = 2.0 * nrm / (2 * math.pi) * (math.sin(psi) + (math.pi - psi) * c)
        K = new
    return K


def _run(threads: int, quick: bool, repeats: int) -> list[dict[str, Any]]:
    torch.set_num_threads(threads)
    rows: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- critical points of new callables
    cases = {
        "swish_beta1.1 (half-stable, (5.73) scan+root)": lambda: critical_point(lambda z: z * torch.sigmoid(1.1 * z)),
        "1.5*tanh(0.7z) (K*=0, Taylor)": lambda: critical_point(lambda z: 1.5 * torch.tanh(0.7 * z)),
        "3*relu(z) (numerically scale-invariant)": lambda: critical_point(lambda z: 3.0 * torch.relu(z)),
    }
    for name, fn in cases.items():
        fn()  # warm-up (torch kernels); every call builds a new callable, so no cache hit
        t, cpu = _timed(fn, repeats)
        rows.append({"case": f"critical_point: {name}", "torch_crit_s": t, "torch_crit_cpu_s": cpu, "target_s": 0.5})
    try:
        t0 = time.perf_counter()
        kb = _scipy_critical(1.1)
        tb = time.perf_counter() - t0
        ours = critical_point(lambda z: z * torch.sigmoid(1.1 * z)).K_star
        rows[0].update(baseline="scipy quad+brentq", baseline_s=tb, K_star=ours, K_star_baseline=kb)
    except ImportError:  # pragma: no cover
        rows[0].update(baseline="scipy missing", baseline_s=None)

    # ---------------------------------------------------------------- closed-form recursions
    N, depth = (128, 300) if quick else (256, 1000)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, 32, generator=gen, dtype=torch.float64)
    G = (x @ x.T / 32).numpy()
    kernel_recursion("relu", 0.0, 2.0, x, depth=3)
    t_k, c_k = _timed(lambda: kernel_recursion("relu", 0.0, 2.0, x, depth=depth), repeats)
    t_kt, c_kt = _timed(lambda: kernel_and_ntk_recursion("relu", 0.0, 2.0, 1.0, 1.0, x, depth=depth), repeats)
    t_np, c_np = _timed(lambda: _numpy_relu(G, depth), 1)
    loop_layers = 3
    t_loop = _best(lambda: _loop_relu(G, loop_layers + 1), 1) * (depth - 1) / loop_layers
    K = kernel_recursion("relu", 0.0, 2.0, x, depth=depth)[-1].numpy()
    err = float(np.abs(K - _numpy_relu(G, depth)).max() / np.abs(K).max())
    rows.append({"case": f"kernel_recursion relu L={depth} N={N}", "torch_crit_s": t_k, "torch_crit_cpu_s": c_k,
                 "target_s": 1.0, "baseline": "numpy full-matrix (no stack kept)", "baseline_s": t_np,
                 "baseline_cpu_s": c_np, "max_rel_diff": err})
    rows.append({"case": f"kernel_recursion relu L={depth} N={N} (pair loop)", "torch_crit_s": t_k,
                 "baseline": f"python pair loop (extrapolated from {loop_layers} layers)", "baseline_s": t_loop})
    rows.append({"case": f"kernel_and_ntk_recursion relu L={depth} N={N}", "torch_crit_s": t_kt,
                 "torch_crit_cpu_s": c_kt, "target_s": 1.0})
    t_erf, c_erf = _timed(lambda: kernel_and_ntk_recursion("erf", 0.0, 1.0, 1.0, 1.0, x, depth=depth), repeats)
    rows.append({"case": f"kernel_and_ntk_recursion erf (arcsine) L={depth} N={N}", "torch_crit_s": t_erf,
                 "torch_crit_cpu_s": c_erf})

    # ---------------------------------------------------------------- quadrature path (shared 2-D grid)
    Nq, Lq = (30, 4) if quick else (100, 10)
    xq = x[:Nq]
    t_q, c_q = _timed(lambda: kernel_recursion("tanh", 0.0, 1.0, xq, depth=Lq), 1)
    pairs = Nq * (Nq - 1) // 2
    rows.append({"case": f"kernel_recursion tanh (2-D quadrature) L={Lq} N={Nq}", "torch_crit_s": t_q,
                 "torch_crit_cpu_s": c_q, "per_pair_layer_us": 1e6 * c_q / (pairs * (Lq - 1)),
                 "target_s": 5.0})
    if not quick:  # N = 256: a few layers, extrapolated to 1000 (the row says so)
        Ls = 3
        t_b, c_b = _timed(lambda: kernel_recursion("tanh", 0.0, 1.0, x, depth=Ls), 1)
        rows.append({"case": f"kernel_recursion tanh L=1000 N={N} (extrapolated from {Ls} layers)",
                     "torch_crit_s": t_b * 999 / (Ls - 1), "torch_crit_cpu_s": c_b * 999 / (Ls - 1)})
    for r in rows:
        r["threads"] = threads
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=str, default="1,2", help="comma-separated torch thread counts")
    args = ap.parse_args(argv)
    rows: list[dict[str, Any]] = []
    thread_list = [int(t) for t in args.threads.split(",") if t.strip()]
    for th in thread_list:
        rows += _run(th, args.quick, args.repeats)

    # ---------------------------------------------------------------- report
    nan = float("nan")
    print(f"{'case':<66} {'thr':>3} {'wall [s]':>9} {'cpu [s]':>8} {'target [s]':>10} {'baseline wall':>13} "
          f"{'baseline cpu':>12}  baseline")
    for r in rows:
        b, bc = r.get("baseline_s"), r.get("baseline_cpu_s")
        print(f"{r['case']:<66} {r['threads']:>3} {r['torch_crit_s']:>9.4f} {r.get('torch_crit_cpu_s', nan):>8.4f} "
              f"{r.get('target_s', nan):>10.2f} {(b if b is not None else nan):>13.4f} "
              f"{(bc if bc is not None else nan):>12.4f}  {r.get('baseline', '')}")
    write_results("theory_speed", {"threads": thread_list, "quick": args.quick, "rows": rows,
                                   "note": "shared 2-core machine under load; compare columns of one run"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
