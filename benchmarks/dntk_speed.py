"""Empirical dNTK (11.8) speed: the torch.func recipe vs torch_crit's generic and structured paths.

One run, side by side, on the same model and inputs: a tanh MLP 32 → 256×4 → 1 (float32),
N ∈ {16, 32, 64, 128} inputs. Methods (each (method, N) in its own subprocess, timeout 60 s):

* ``recipe``      — the best torch.func recipe a user would write: forward-over-reverse, ``vmap``
  over the N·k gradient directions of ``jvp`` of the per-sample Jacobian (``vmap(jacrev)``),
  contracted with the Jacobian by ``einsum`` (λ = 1).
* ``generic``     — ``torch_crit.empirical_dntk(method="generic")`` (blocked forward-over-reverse).
* ``structured/torch`` — ``method="structured", backend="torch"``: the fused contraction by the
  pure-PyTorch reference of the primitive.
* ``structured/ext``   — ``method="structured"`` with the compiled C++ kernel.

Reported per (method, N): wall time and process CPU time (median of up to 7 runs within 10 s after a warm-up
on N=4; the CPU time is the fairer measure on a machine shared with other jobs), time spent in
the fused contraction (structured only), peak RSS of the subprocess, and the max relative error
against the float64 structured result (itself checked to 1e-9 against a brute-force autograd
reference in tests/ntk/test_dntk.py). Table on stdout, JSON in benchmarks/results/dntk_speed.json
(``dntk_speed_cuda.json`` with ``--device cuda``; ``--json`` to write elsewhere), written after every
row, atomically.

``--device cuda`` runs the same table on the GPU (model, inputs and every method on ``cuda:0``;
times synchronised; peak GPU memory reported as well); on a machine without CUDA it exits with a
message and status 2. ``--n 16,32`` runs a subset of the sizes.

Usage: ``python benchmarks/dntk_speed.py [--quick] [--n 16,32] [--device cpu|cuda] [--timeout 60]
[--threads 2] [--json PATH]``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "dntk_speed.json"
RESULTS_CUDA = ROOT / "benchmarks" / "results" / "dntk_speed_cuda.json"
METHODS = ["recipe", "generic", "structured/torch", "structured/ext"]


# ----------------------------------------------------------------------------- worker (subprocess)


def _model(torch, nn):
    torch.manual_seed(0)
    layers = [nn.Linear(32, 256), nn.Tanh()]
    for _ in range(3):
        layers += [nn.Linear(256, 256), nn.Tanh()]
    layers += [nn.Linear(256, 1)]
    return nn.Sequential(*layers)


def _recipe(torch, model, x):
    from torch.func import functional_call, jacrev, jvp, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def fnet_single(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    def jac_fn(p):
        return vmap(jacrev(fnet_single), (None, 0))(p, x)  # {name: [N, k, *shape]}

    J = jac_fn(params)
    n, k = x.shape[0], next(iter(J.values())).shape[1]
    U = {name: t.reshape(n * k, *t.shape[2:]) for name, t in J.items()}
    D = vmap(lambda u: jvp(jac_fn, (params,), (u,))[1])(U)  # {name: [N·k (d2,i2), N, k, *shape]}
    out = 0
    for name in params:
        Dn = D[name].reshape(n, k, n, k, -1)  # d2, i2, d0, i0, P
        Jn = J[name].reshape(n, k, -1)  # d1, i1, P
        out = out + torch.einsum("caeip,djp->edcija", Dn, Jn)  # [d0, d1, d2, i0, i1, i2]
    return out


def worker(method: str, n: int, threads: int, timeout: float, device: str = "cpu") -> None:
    import torch
    from torch import nn

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    import torch_crit.ntk.dntk_structured as ds
    from torch_crit.ntk.dntk import empirical_dntk

    cuda = device == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    contraction = [0.0]
    orig = ds._accumulate

    def timed(*a, **kw):
        sync()
        t = time.perf_counter()
        orig(*a, **kw)
        sync()
        contraction[0] += time.perf_counter() - t

    ds._accumulate = timed
    model = _model(torch, nn).to(device)
    gen = torch.Generator().manual_seed(1)
    x_all = torch.randn(128, 32, generator=gen).to(device)
    x = x_all[:n]

    def run(xx):
        if method == "recipe":
            return _recipe(torch, model, xx)
        if method == "generic":
            return empirical_dntk(model, xx, method="generic")
        backend = method.split("/")[1]
        return empirical_dntk(model, xx, method="structured", backend=backend)

    run(x_all[:4])  # warm-up (torch.func first-use costs)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    class _Timeout(Exception):
        pass

    def on_alarm(signum, frame):
        raise _Timeout()

    signal.signal(signal.SIGALRM, on_alarm)
    times, cpu, ctimes = [], [], []
    total = 0.0
    res = None
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        while len(times) < 7 and (total < 10.0 or not times):
            contraction[0] = 0.0
            sync()
            t, c = time.perf_counter(), time.process_time()
            res = run(x)
            sync()
            dt = time.perf_counter() - t
            times.append(dt)
            cpu.append(time.process_time() - c)
            ctimes.append(contraction[0])
            total += dt
    except _Timeout:
        if not times:
            print(json.dumps({"status": "timeout"}))
            return
    except MemoryError:
        print(json.dumps({"status": "oom"}))
        return
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    ref = empirical_dntk(model, x, method="structured", dtype=torch.float64)
    err = float((res.double() - ref).abs().max() / ref.abs().max())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    row = {
        "time_s": statistics.median(times), "cpu_s": statistics.median(cpu), "runs": len(times),
        "contraction_s": statistics.median(ctimes) if method.startswith("structured") else None,
        "peak_rss_mib": rss, "max_rel_err_vs_fp64": err,
    }
    if cuda:
        row["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(row))


# ----------------------------------------------------------------------------- driver


def _write(payload: dict, path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from torch_crit._io import atomic_write_json

    atomic_write_json(path, payload)


def _sizes(spec: str) -> list:
    try:
        sizes = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(v < 1 for v in sizes):
        raise SystemExit(f"--n: expected a comma-separated list of positive ints (e.g. 16,32), got {spec!r}")
    return sizes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="N ∈ {8, 16}, timeout 30 s")
    ap.add_argument("--timeout", type=float, default=None, help="per (method, N) timeout in seconds (default 60)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=str, default=None, help="comma-separated sizes N to run (default 16,32,64,128)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run every method (default cpu)")
    ap.add_argument("--json", type=Path, default=None, help="output JSON (default benchmarks/results/dntk_speed[_cuda].json)")
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.threads, args.timeout or 60.0, args.device)
        return 0
    device_desc = "CPU"
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print(
                "dntk_speed.py --device cuda: no CUDA device is available here (torch "
                f"{torch.__version__}, torch.cuda.is_available() is False); run without --device "
                "or on a machine with a GPU.",
                file=sys.stderr,
            )
            return 2
        device_desc = f"GPU {torch.cuda.get_device_name(0)}"
    sizes = _sizes(args.n) if args.n else ([8, 16] if args.quick else [16, 32, 64, 128])
    timeout = args.timeout or (30.0 if args.quick else 60.0)
    results = (args.json or (RESULTS_CUDA if args.device == "cuda" else RESULTS)).resolve()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    payload = {
        "benchmark": "dntk_speed",
        "model": "tanh MLP 32 -> 256x4 -> 1, float32, λ = 1",
        "machine": f"{os.cpu_count()} CPUs, torch threads {args.threads}, load average at start {load:.1f}",
        "device": device_desc,
        "timeout_s": timeout,
        "rows": [],
    }
    print(f"# {payload['model']}; {payload['machine']}; device {device_desc}; per-run timeout {timeout:.0f} s")
    print(f"{'N':>5} {'method':>17} {'time [s]':>10} {'CPU [s]':>9} {'contract [s]':>12} {'RSS [MiB]':>10} {'rel err':>9} {'vs recipe':>10} {'CPU vs rec.':>11}")
    for n in sizes:
        recipe_time = None
        for method in METHODS:
            cmd = [sys.executable, __file__, "--threads", str(args.threads), "--timeout", str(timeout), "--device", args.device, "--worker", method, str(n)]
            t0 = time.perf_counter()
            try:  # the worker enforces `timeout` on the timed runs; start-up and warm-up get 300 s more
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 300, cwd=ROOT)
                if proc.returncode != 0:
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
                    row = {"status": "oom" if "memory" in tail[0].lower() or proc.returncode == -9 else "error", "detail": tail[0]}
                else:
                    row = {"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}
                    if row.get("status") == "timeout":
                        row["detail"] = f"> {timeout:.0f} s"
                    elif row.get("status") == "oom":
                        row["detail"] = "MemoryError"
            except subprocess.TimeoutExpired:
                row = {"status": "timeout", "detail": f"worker killed after {timeout + 300:.0f} s (start-up + warm-up + run)"}
            row.update({"N": n, "method": method, "wall_incl_startup_s": time.perf_counter() - t0})
            if method == "recipe" and row["status"] == "ok":
                recipe_time = (row["time_s"], row["cpu_s"])
            if row["status"] == "ok" and recipe_time:
                row["speedup_vs_recipe"] = recipe_time[0] / row["time_s"]
                row["cpu_speedup_vs_recipe"] = recipe_time[1] / row["cpu_s"]
            payload["rows"].append(row)
            _write(payload, results)
            if row["status"] == "ok":
                ct = f"{row['contraction_s']:.3f}" if row.get("contraction_s") is not None else "-"
                sp = f"{row['speedup_vs_recipe']:.1f}x" if row.get("speedup_vs_recipe") else "-"
                cs = f"{row['cpu_speedup_vs_recipe']:.1f}x" if row.get("cpu_speedup_vs_recipe") else "-"
                print(f"{n:>5} {method:>17} {row['time_s']:>10.3f} {row['cpu_s']:>9.2f} {ct:>12} {row['peak_rss_mib']:>10.0f} {row['max_rel_err_vs_fp64']:>9.1e} {sp:>10} {cs:>11}", flush=True)
            else:
                print(f"{n:>5} {method:>17} {row['status']:>10}   {row.get('detail', '')}", flush=True)
    # the C++ kernel against the same contraction in plain PyTorch (structured, per N)
    summary = {}
    for n in sizes:
        rows = {r["method"]: r for r in payload["rows"] if r["N"] == n and r["status"] == "ok"}
        if "structured/ext" in rows and "structured/torch" in rows:
            e, t = rows["structured/ext"], rows["structured/torch"]
            summary[f"N={n}"] = {
                "ext_over_torch_total": t["time_s"] / e["time_s"],
                "ext_over_torch_contraction": (t["contraction_s"] / e["contraction_s"]) if e["contraction_s"] else None,
                "structured_ext_over_recipe": (rows["recipe"]["time_s"] / e["time_s"]) if "recipe" in rows else None,
                "structured_ext_over_recipe_cpu": (rows["recipe"]["cpu_s"] / e["cpu_s"]) if "recipe" in rows else None,
            }
    payload["summary"] = summary
    payload["targets"] = {
        "structured >= 50x faster than recipe at N=32": summary.get("N=32", {}).get("structured_ext_over_recipe"),
        "C++ kernel >= 1.5x faster than plain-PyTorch contraction": {k: v["ext_over_torch_contraction"] for k, v in summary.items()},
        "only structured finishes N=128 within the timeout": sorted(r["method"] for r in payload["rows"] if r["N"] == 128 and r["status"] == "ok"),
    }
    _write(payload, results)
    print("\nsummary:", json.dumps(summary, indent=1))
    print(f"JSON: {results.relative_to(ROOT) if results.is_relative_to(ROOT) else results}")
    print("Note: timed on a shared 2-core machine under load from other jobs; ratios are more reliable than absolute times.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
