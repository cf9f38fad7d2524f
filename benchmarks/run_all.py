"""Run every benchmark and collect one JSON and one markdown table.

    python benchmarks/run_all.py            # full runs (long: see each script)
    python benchmarks/run_all.py --quick    # every script's --quick mode
    python benchmarks/run_all.py --only ntk_speed dntk_speed

Each script prints its own side-by-side table and writes ``benchmarks/results/<name>.json``;
this collects the printed tables into ``benchmarks/results/summary.md`` and the JSON files
into ``benchmarks/results/summary.json`` (both written atomically, after each script, so an
interrupted run keeps what finished).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import RESULTS, machine  # noqa: E402

from torch_crit._io import atomic_write_json, atomic_write_text  # noqa: E402

ORDER = [
    "theory_speed",
    "contraction_speed",
    "ntk_speed",
    "dntk_speed",
    "ensemble_speed",
    "monitor_overhead",
    "depth_trainability",
    "kernel_vs_trained",
    "ntk_scaling",
    "lr_transfer",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--timeout", type=float, default=3600)
    args = ap.parse_args()
    names = [n for n in ORDER if (HERE / f"{n}.py").exists()]
    names += sorted(p.stem for p in HERE.glob("*.py") if p.stem not in names and not p.stem.startswith("_") and p.stem != "run_all")
    if args.only:
        names = [n for n in names if n in args.only]
    md = [f"# Benchmark summary ({'quick' if args.quick else 'full'} mode)", "", f"machine: `{json.dumps(machine())}`", ""]
    summary: dict = {"machine": machine(), "quick": args.quick, "benchmarks": {}}
    for name in names:
        cmd = [sys.executable, str(HERE / f"{name}.py")] + (["--quick"] if args.quick else [])
        print(f"=== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=HERE.parent)
            status, out = ("ok" if proc.returncode == 0 else f"exit {proc.returncode}"), proc.stdout + (proc.stderr[-2000:] if proc.returncode else "")
        except subprocess.TimeoutExpired as exc:
            status, out = "timeout", (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        seconds = time.perf_counter() - t0
        print(out, flush=True)
        result_file = RESULTS / f"{name}.json"
        summary["benchmarks"][name] = {
            "status": status,
            "seconds": seconds,
            "result": json.loads(result_file.read_text()) if result_file.exists() and status == "ok" else None,
        }
        md += [f"## {name} ({status}, {seconds:.0f} s)", "", "```", out.strip(), "```", ""]
        atomic_write_json(RESULTS / "summary.json", summary)
        atomic_write_text(RESULTS / "summary.md", "\n".join(md) + "\n")
    failed = [n for n, r in summary["benchmarks"].items() if r["status"] != "ok"]
    print(f"wrote {RESULTS / 'summary.md'} and summary.json; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
