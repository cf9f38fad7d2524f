"""Speed and peak memory of the fused Gram–Hadamard op against its pure-PyTorch reference.

    python benchmarks/contraction_speed.py                  # full run (CPU: ~15 min on 2 cores)
    python benchmarks/contraction_speed.py --quick          # small rows only
    python benchmarks/contraction_speed.py --device cuda    # GPU (writes contraction_speed_cuda.json)
    python benchmarks/contraction_speed.py --rows dntk_N32_k1 dntk_N64_k1 dntk_N128_k1 dntk_N256_k1 dntk_N32_k4
                                                            # the dNTK's shapes (contraction_speed_dntk.json)

The inputs have the shapes of the structured NTK of an MLP 64 → 512 ×8 → 10 (one term per
layer: cotangent Gram ⊙ (λ_W·input Gram + λ_b), i.e. A_t = B_t = G_l [N, K, m_l],
C_t = [N, N]). "full" rows keep the output pair (K = 10); "trace" rows are the output-trace NTK
(A reshaped to [N, 1, K·m]). Methods, one child process each on CPU (so that peak RSS is that
method's alone; on CUDA all run in one process, peak memory from the allocator's statistics):

* ``reference``: ``gram_hadamard_accumulate_reference_`` (einsum + multiply + add per term),
* ``ext``: the compiled kernel, ``ext_sym``: with ``symmetric=True`` (Θ(x, x)),
* ``ext_fp64acc``: float32 inputs with float64 accumulation.

Timing: one warm-up call, then ``--repeats`` timed calls; min and median are reported.
Memory (CPU): peak RSS of the child (``ru_maxrss``) minus its RSS right before the first call,
i.e. the extra memory the method needs on top of its inputs and ``out`` (CUDA:
``torch.cuda.max_memory_allocated`` minus the allocation before the call). Every child also
returns 4096 strided entries of ``out`` after one call from zero; the table reports their
largest deviation from the reference's, relative to the reference's largest entry.

Timings on the 2-core development machine are taken while other jobs share it: compare the
columns of one run, not runs with each other.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import write_results  # noqa: E402

# name: (N, K, [M_t per term], C per term: "pair" | "none", trace flag for the label)
ROWS: dict[str, dict[str, Any]] = {
    "full_N64": {"N": 64, "K": 10, "M": [512] * 8 + [10], "quick": True},
    "full_N256": {"N": 256, "K": 10, "M": [512] * 8 + [10], "quick": True},
    "trace_N1024": {"N": 1024, "K": 1, "M": [5120] * 8 + [100], "quick": True},
    "trace_N4096": {"N": 4096, "K": 1, "M": [5120] * 3, "quick": False},
    "full_N1024": {"N": 1024, "K": 10, "M": [512] * 8 + [10], "quick": False},
    # the structured dNTK's shapes (dntk_structured.py, tanh MLP 32 → 256×4 → k): one row block
    # per direction (δ2, i2), out [N·k·N, N, k, k], two terms per layer (Ġ·G ⊙ XX, Ẋ·X ⊙ GG)
    "dntk_N32_k1": {"N": 32, "N1": 32 * 32, "K": 1, "M": [256] * 10, "quick": False, "dntk": True},
    "dntk_N64_k1": {"N": 64, "N1": 64 * 64, "K": 1, "M": [256] * 10, "quick": False, "dntk": True},
    "dntk_N128_k1": {"N": 128, "N1": 128 * 128, "K": 1, "M": [256] * 10, "quick": False, "dntk": True},
    "dntk_N256_k1": {"N": 256, "N1": 256 * 256, "K": 1, "M": [256] * 10, "quick": False, "dntk": True},
    "dntk_N32_k4": {"N": 32, "N1": 32 * 4 * 32, "K": 4, "M": [256] * 10, "quick": False, "dntk": True},
}
METHODS = ["reference", "ext", "ext_sym", "ext_fp64acc"]
N_PROBE = 4096


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(row: str, method: str, device: str, repeats: int, dtype_name: str) -> dict[str, Any]:
    import torch

    from torch_crit import _ops

    spec = ROWS[row]
    N, K = spec["N"], spec["K"]
    N1 = spec.get("N1", N)  # dNTK rows: N1 = directions × examples
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator(device=device).manual_seed(0)
    A, B, C = [], [], []
    x = torch.randn(N, 64, generator=gen, device=device, dtype=dtype)
    for t, m in enumerate(spec["M"]):
        # in-place scaling: no transient copies that would raise the setup's peak RSS
        A.append(torch.randn(N1, K, m, generator=gen, device=device, dtype=dtype).div_(m**0.5))
        B.append(A[-1] if N1 == N else torch.randn(N, K, m, generator=gen, device=device, dtype=dtype).div_(m**0.5))
        gram = (x @ x.T).div_(x.shape[1])
        gram = gram.add_(0.1) if t % 2 == 0 else gram
        C.append(gram if N1 == N else gram.repeat(N1 // N, 1))
    out = torch.zeros(N1, N, K, K, device=device, dtype=dtype)
    kwargs: dict[str, Any] = {}
    if method == "reference":
        fn = _ops.gram_hadamard_accumulate_reference_
    else:
        fn = _ops.gram_hadamard_accumulate_
        kwargs = {"symmetric": method == "ext_sym"}
        if method == "ext_fp64acc":
            kwargs["accumulate_fp64"] = True

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        mem0 = torch.cuda.memory_allocated()
    else:
        mem0 = _rss_bytes()
    with torch.no_grad():
        fn(out, A, B, C, **kwargs)
        sync()
        probe = out.flatten()[:: max(1, out.numel() // N_PROBE)][:N_PROBE].double().cpu().tolist()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(out, A, B, C, **kwargs)
            sync()
            times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - mem0
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - mem0
    backend = "reference" if method == "reference" else _ops.last_backend()
    flops = sum(2.0 * N1 * N * K * K * m for m in spec["M"])
    return {
        "row": row,
        "method": method,
        "backend": backend,
        "N": N,
        "K": K,
        "M": spec["M"],
        "dtype": dtype_name,
        "device": device,
        "threads": torch.get_num_threads(),
        "times_s": times,
        "min_s": min(times),
        "median_s": statistics.median(times),
        "gflop_per_s": flops / min(times) / 1e9,
        "extra_peak_mb": max(0, peak) / 2**20,
        "out_mb": out.numel() * out.element_size() / 2**20,
        "probe": probe,
    }


def run_child(row: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    if args.device == "cuda":  # peak memory is exact per call on CUDA: no process per method needed
        try:
            return child(row, method, args.device, args.repeats, args.dtype)
        except Exception as exc:  # noqa: BLE001 - reported in the table, the run goes on
            return {"row": row, "method": method, "error": f"{type(exc).__name__}: {exc}"}
    cmd = [sys.executable, __file__, "--child", row, method, "--device", args.device,
           "--repeats", str(args.repeats), "--dtype", args.dtype]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        return {"row": row, "method": method, "error": f"timeout after {args.timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"row": row, "method": method, "error": f"exit {proc.returncode}: {proc.stderr[-800:]}"}
    return json.loads(lines[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--quick", action="store_true", help="only the small rows")
    ap.add_argument("--rows", nargs="*", default=None, help=f"subset of {list(ROWS)}")
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--repeats", type=int, default=None, help="timed calls (default 3, quick 2)")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds per child process")
    ap.add_argument("--child", nargs=2, metavar=("ROW", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.device, args.repeats, args.dtype)))
        return 0
    rows = args.rows or [r for r, spec in ROWS.items() if (spec["quick"] or not args.quick) and not spec.get("dntk")]
    dntk = all(ROWS[r].get("dntk") for r in rows)
    if any(ROWS[r].get("dntk") for r in rows) and not dntk:
        ap.error("run the dntk_* rows on their own (--rows dntk_N32_k1 ...): they go to contraction_speed_dntk.json")
    name = "contraction_speed" + ("_dntk" if dntk else "") + ("_cuda" if args.device == "cuda" else "")
    results: list[dict[str, Any]] = []
    header = (f"| row | N | K | terms | method | backend | min s | median s | GFLOP/s | speed-up vs ref | "
              f"extra peak MB | mem ratio ref/this | out MB | max rel dev |")
    table = [header, "|" + "---|" * 14]
    for row in rows:
        per_row: dict[str, dict[str, Any]] = {}
        for method in args.methods:
            if method == "ext_sym" and ROWS[row].get("N1", ROWS[row]["N"]) != ROWS[row]["N"]:
                continue  # the dNTK tile is not symmetric
            rec = run_child(row, method, args)
            per_row[method] = rec
            results.append({k: v for k, v in rec.items() if k != "probe"})
            print(f"[{row} {method}] " + (rec.get("error") or f"{rec['min_s']:.3f} s, {rec['extra_peak_mb']:.0f} MB"), flush=True)
            write_results(name, {"device": args.device, "dtype": args.dtype, "repeats": args.repeats, "records": results, "table": table})
        ref = per_row.get("reference")
        for method, rec in per_row.items():
            if "error" in rec:
                table.append(f"| {row} | | | | {method} | error: {rec['error'][:60]} |" + " |" * 8)
                continue
            spd = mem = dev = "–"
            if ref and "error" not in ref:
                spd = f"{ref['min_s'] / rec['min_s']:.2f}x"
                mem = f"{ref['extra_peak_mb'] / max(rec['extra_peak_mb'], 1.0):.1f}x"
                scale = max(abs(v) for v in ref["probe"]) or 1.0
                dev = f"{max(abs(a - b) for a, b in zip(rec['probe'], ref['probe'])) / scale:.1e}"
                results[-len(per_row) + list(per_row).index(method)].update(
                    speedup_vs_reference=ref["min_s"] / rec["min_s"],
                    memory_ratio_reference_over_this=ref["extra_peak_mb"] / max(rec["extra_peak_mb"], 1.0),
                    max_rel_dev_vs_reference=float(dev),
                )
            table.append(
                f"| {row} | {rec['N']} | {rec['K']} | {len(rec['M'])} | {method} | {rec['backend']} | {rec['min_s']:.3f} | "
                f"{rec['median_s']:.3f} | {rec['gflop_per_s']:.0f} | {spd} | {rec['extra_peak_mb']:.0f} | {mem} | "
                f"{rec['out_mb']:.0f} | {dev} |"
            )
        write_results(name, {"device": args.device, "dtype": args.dtype, "repeats": args.repeats, "records": results, "table": table})
    print("\n".join(table))
    print("GFLOP/s counts 2·N1·N·K²·M per term (N1 = N except dNTK rows; ext_sym does about half of it).")
    print("extra peak MB: CPU = child's peak RSS minus its RSS before the first call; CUDA = peak allocated minus allocated before.")
    errors = [r for r in results if "error" in r]
    if errors:
        print(f"{len(errors)} of {len(results)} measurements failed", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
