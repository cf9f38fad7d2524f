r"""Depth trainability: PyTorch's default init vs ``torch_crit.init_`` + ``param_groups``.

MLPs of depth 10, 30 and 100 (width 256) are trained with plain minibatch SGD on scikit-learn's
digits (``sklearn.datasets.load_digits``: 1797 images, 64 features, 10 classes; shipped with
scikit-learn, no download), mean cross-entropy loss.

* **default**: PyTorch's default initialization (``kaiming_uniform_(a=√5)``, weight variance
  1/(3·fan_in)) and one global learning rate, the best of a small grid *for each depth*
  (favours the baseline).
* **critical**: ``torch_crit.init_`` (critical (C_b, C_W), (5.67)/(5.90)) and
  ``torch_crit.param_groups`` with ONE pair (lr_b, lr_W) = (η λ̃_b, η λ̃_W) per activation, the
  same at every depth (ReLU (10, 10), tanh (3, 3); chosen once at depth 10–30) — the
  learning-rate equivalence principle (9.94)–(9.96) makes it depth-independent.

The script prints the final train-loss table (and accuracy) and writes
``benchmarks/results/depth_trainability.json`` (atomically, after every run).

Usage::

    python benchmarks/depth_trainability.py            # full: 3 depths, 2 activations
    python benchmarks/depth_trainability.py --quick    # a 1–2 minute smoke version
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import torch_crit

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS = RESULTS_DIR / "depth_trainability.json"  # --quick writes depth_trainability_quick.json
ACTS = {"relu": nn.ReLU, "tanh": nn.Tanh}
# one (lr_b, lr_W) pair per activation, used unchanged at every depth
PAIRS = {"relu": (10.0, 10.0), "tanh": (3.0, 3.0)}


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised digits features ``[1797, 64]`` (float32) and labels ``[1797]`` (int64)."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = d.data.astype(np.float64)
    mu, sd = x.mean(0), x.std(0)
    x = (x - mu) / np.where(sd > 0, sd, 1.0)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(d.target, dtype=torch.int64)


def make_mlp(act: str, depth: int, width: int, n0: int = 64, n_out: int = 10) -> nn.Sequential:
    mods: list[nn.Module] = [nn.Linear(n0, width)]
    for l in range(2, depth + 1):
        mods += [ACTS[act](), nn.Linear(width, width if l < depth else n_out)]
    return nn.Sequential(*mods)


def train(net: nn.Module, groups: list[dict[str, Any]] | None, lr: float | None, x: torch.Tensor, y: torch.Tensor,
          steps: int, batch: int, seed: int) -> dict[str, Any]:
    opt = torch.optim.SGD(groups if groups is not None else net.parameters(), lr=lr if lr is not None else 0.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        initial = float(F.cross_entropy(net(x), y))
    t0 = time.perf_counter()
    diverged = False
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        if not torch.isfinite(loss):
            diverged = True
            break
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = net(x)
        final = float(F.cross_entropy(out, y))
        acc = float((out.argmax(1) == y).float().mean())
    if not math.isfinite(final):
        diverged = True
    return {"initial_loss": initial, "loss": final if math.isfinite(final) else float("inf"), "accuracy": acc,
            "diverged": diverged,
            "seconds": time.perf_counter() - t0}


def write_json(payload: dict[str, Any], path: Path) -> None:
    """Write ``payload`` to ``path`` atomically (temp file in the same folder, then os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=2)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="depths 10 and 30, 40 steps, 2 grid points, relu")
    ap.add_argument("--depths", type=int, nargs="+", default=[10, 30, 100])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--activations", nargs="+", default=["relu", "tanh"], choices=sorted(ACTS))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--grid", type=float, nargs="+", default=[0.03, 0.1, 0.3],
                    help="global learning rates tried for the default init (best per depth is kept)")
    ap.add_argument("--lr-b", type=float, default=None,
                    help="critical: lr_b = η λ̃_b, the same for every depth (default: relu 10, tanh 3)")
    ap.add_argument("--lr-w", type=float, default=None,
                    help="critical: lr_W = η λ̃_W, the same for every depth (default: relu 10, tanh 3)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.depths, args.steps, args.grid, args.activations = [10, 30], 40, [0.1, 1.0], ["relu"]
    out_path = RESULTS_DIR / ("depth_trainability_quick.json" if args.quick else "depth_trainability.json")
    torch.set_num_threads(args.threads)
    x, y = load_digits()
    payload: dict[str, Any] = {
        "benchmark": "depth_trainability", "dataset": "sklearn digits (1797 x 64, 10 classes), full set as train",
        "config": {k: v for k, v in vars(args).items()}, "torch": torch.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {args.threads} threads",
        "note": "timings taken on a shared machine under load; losses are the point", "runs": [], "table": [],
    }
    write_json(payload, out_path)
    rows = []
    for act in args.activations:
        for depth in args.depths:
            best = None
            for lr in args.grid:
                torch.manual_seed(args.seed)
                net = make_mlp(act, depth, args.width)
                r = train(net, None, lr, x, y, args.steps, args.batch, args.seed)
                payload["runs"].append({"activation": act, "depth": depth, "setup": "default", "lr": lr, **r})
                write_json(payload, out_path)
                print(f"  default  {act:5s} L={depth:3d} lr={lr:<6g} loss={r['loss']:.4f} acc={r['accuracy']:.3f}"
                      f" ({r['seconds']:.0f}s)", flush=True)
                if best is None or r["loss"] < best[1]["loss"]:
                    best = (lr, r)
            lr_b = PAIRS[act][0] if args.lr_b is None else args.lr_b
            lr_w = PAIRS[act][1] if args.lr_w is None else args.lr_w
            torch.manual_seed(args.seed)
            net = make_mlp(act, depth, args.width)
            report = torch_crit.init_(net, generator=torch.Generator().manual_seed(args.seed))
            groups = torch_crit.param_groups(net, lr_b, lr_w, report=report)
            r = train(net, groups, None, x, y, args.steps, args.batch, args.seed)
            payload["runs"].append({"activation": act, "depth": depth, "setup": "critical", "lr_b": lr_b,
                                    "lr_W": lr_w, "C_b": report.layers[1].C_b, "C_W": report.layers[1].C_W, **r})
            print(f"  critical {act:5s} L={depth:3d} lr_b={lr_b:g} lr_W={lr_w:g} loss={r['loss']:.4f} "
                  f"acc={r['accuracy']:.3f} ({r['seconds']:.0f}s)", flush=True)
            row = {"activation": act, "depth": depth, "default_best_lr": best[0], "default_loss": best[1]["loss"],
                   "default_accuracy": best[1]["accuracy"], "critical_loss": r["loss"],
                   "critical_accuracy": r["accuracy"], "critical_initial_loss": r["initial_loss"],
                   "critical_lr_b": lr_b, "critical_lr_W": lr_w,
                   "default_initial_loss": best[1]["initial_loss"]}
            rows.append(row)
            payload["table"] = rows
            write_json(payload, out_path)
    print()
    print(f"Final train loss after {args.steps} SGD steps (batch {args.batch}, width {args.width}; "
          f"ln 10 = {math.log(10):.3f} is chance)")
    head = (f"{'act':5s} {'L':>4s} | {'default: best lr':>16s} {'start':>6s} {'final':>7s} {'acc':>5s} | "
            f"{'critical: lr_b, lr_W':>20s} {'start':>6s} {'final':>7s} {'acc':>5s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        pair = f"{r['critical_lr_b']:g}, {r['critical_lr_W']:g}"
        print(f"{r['activation']:5s} {r['depth']:4d} | {r['default_best_lr']:>16g} {r['default_initial_loss']:6.3f} "
              f"{r['default_loss']:7.4f} {100 * r['default_accuracy']:4.0f}% | {pair:>20s} "
              f"{r['critical_initial_loss']:6.3f} {r['critical_loss']:7.4f} {100 * r['critical_accuracy']:4.0f}%")
    print(f"\nwrote {out_path}")


if __name__ == "__main__":
    main()
