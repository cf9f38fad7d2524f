"""Learning-rate transfer across width and depth: SP vs μP vs torch_crit (THEORY.md §5.4).

    python benchmarks/lr_transfer.py                 # documented reduced grid (~15 min on the loaded 2-core CPU)
    python benchmarks/lr_transfer.py --grid full     # widths {128,512,2048} x depths {4,16,48}: hours on CPU
    python benchmarks/lr_transfer.py --quick         # smoke version (< 2 min)

Task. scikit-learn's digits (fixed 80/20 split, standardised pixels), MLPs with tanh or ReLU,
cross-entropy (mean over the batch), minibatch training for a fixed number of steps, a log grid
of global learning rates, several seeds; recorded: final train loss (full training set) and
test accuracy. A parametrization transfers well when the best learning rate does not move
with width/depth and the smallest model's best rate is near-optimal for the largest.

Parametrizations (each with its own library's init and optimizer rules):
  * ``sp-sgd`` / ``sp-adam``: PyTorch defaults (kaiming-uniform init), one global lr.
  * ``mup-sgd`` / ``mup-adam``: ``mup`` (``MuReadout`` output, ``set_base_shapes`` with base width
    ``--mup-base``, ``MuSGD`` / ``MuAdam``). Skipped with a note when ``mup`` is not installed.
  * ``tc-sgd`` / ``tc-adam``: ``torch_crit.init_`` (criticality) and
    ``torch_crit.param_groups(lr_b=lr, lr_W=lr, optimizer='sgd'|'adam')`` (equivalence principle
    (9.94)–(9.96); Adam rule derived in ``torch_crit.optim``).
  * ``unit-scaling`` (u-μP) is not run: it needs its own unit-scaled modules (``uu.Linear``, ...)
    rather than a parametrization of the same ``nn.Linear`` network; noted in the output.

How it is run. For every (parametrization, activation, architecture) the runs of all learning
rates and seeds are trained at once as a batch of independent networks (stacked parameters,
batched matmuls). Initial parameters come from real ``nn.Module`` instances initialised by each
library; the per-parameter learning-rate multipliers are read from the real optimizer's param
groups (built with lr = 1), and one batched step is checked against the real optimizer's step
(``step_check`` in the JSON: max relative difference).

Reduced grid (default). The task's grid (widths {128, 512, 2048} x depths {4, 16, 48}) costs
~1e16 FLOP, hours on this CPU-only machine (width 2048 x depth 48 alone is ~2e8 parameters per
network; measured throughput under the shared load was ~1 GFLOP/s). The default run therefore
separates the two axes and shrinks them: a width sweep {16, 64, 256} at depth 4 (16x in width)
and a depth sweep {4, 16, 48} at width 64 (8 learning rates, 2 seeds, batch 32, 40 steps).
``--grid full`` runs the task's grid unchanged (10 lrs, 3 seeds, 200 steps) on a faster machine.

Headline numbers per (parametrization, activation) and axis: the spread of the optimal learning
rate (max/min ratio of the per-architecture argmins of the seed-mean final train loss) and the
transfer gap = loss of the largest model at the smallest model's optimal rate minus its loss at
its own optimum. An optimum on the edge of the grid is flagged.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine  # noqa: E402

import torch_crit  # noqa: E402
from torch_crit._io import atomic_savefig, atomic_write_json  # noqa: E402

ACTS = {"tanh": nn.Tanh, "relu": nn.ReLU}
# log10 ranges of the global learning rate per parametrization (chosen to contain the optima)
LR_RANGES = {
    "sp-sgd": (-2.5, 1.5), "mup-sgd": (-2.5, 1.5), "tc-sgd": (-1.0, 3.0),
    "sp-adam": (-4.5, -0.5), "mup-adam": (-4.5, -0.5), "tc-adam": (-1.5, 2.5),
}


def load_digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32)
    y = torch.tensor(y)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    n_tr = int(0.8 * len(X))
    tr, te = perm[:n_tr], perm[n_tr:]
    mu, sd = X[tr].mean(0), X[tr].std(0).clamp_min(1e-6)
    X = (X - mu) / sd
    return X[tr], y[tr], X[te], y[te]


def build_model(param: str, act: str, width: int, depth: int, mup_base: int) -> nn.Sequential:
    """An MLP with `depth` weight layers; for mup the readout is MuReadout and base shapes are set."""
    def make(n: int) -> nn.Sequential:
        dims = [64] + [n] * (depth - 1) + [10]
        layers: list[nn.Module] = []
        for i in range(depth):
            if i == depth - 1 and param.startswith("mup"):
                from mup import MuReadout

                layers.append(MuReadout(dims[i], dims[i + 1]))
            else:
                layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < depth - 1:
                layers.append(ACTS[act]())
        return nn.Sequential(*layers)

    model = make(width)
    if param.startswith("mup"):
        from mup import set_base_shapes

        set_base_shapes(model, make(mup_base), delta=make(mup_base * 2))
    return model  # torch_crit's init_ is applied by init_model (with a generator)


def real_optimizer(param: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if param == "sp-sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    if param == "sp-adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if param == "mup-sgd":
        from mup import MuSGD

        return MuSGD(model.parameters(), lr=lr)
    if param == "mup-adam":
        from mup import MuAdam

        return MuAdam(model.parameters(), lr=lr)
    if param in ("tc-sgd", "tc-adam"):
        groups = torch_crit.param_groups(model, lr_b=lr, lr_W=lr, optimizer=param[3:])
        return (torch.optim.SGD if param == "tc-sgd" else torch.optim.Adam)(groups, lr=lr)
    raise ValueError(param)


def init_model(param: str, act: str, width: int, depth: int, seed: int, mup_base: int) -> nn.Sequential:
    torch.manual_seed(seed)  # PyTorch default init (sp, mup) draws from the global RNG
    model = build_model(param, act, width, depth, mup_base)
    if param.startswith("tc"):
        torch_crit.init_(model, generator=torch.Generator().manual_seed(seed))
    return model


@dataclass
class Batched:
    """R independent MLPs: W[l] [R, in, out], b[l] [R, 1, out]; per-parameter lr multipliers."""

    W: list[torch.Tensor]
    b: list[torch.Tensor]
    in_mult: list[float]
    mult_W: list[float]
    mult_b: list[float]
    act: str
    adam: bool

    @classmethod
    def from_models(cls, models: list[nn.Sequential], param: str, act: str, repeat: int) -> Batched:
        lins = [[m for m in net if isinstance(m, nn.Linear)] for net in models]
        W = [torch.stack([ls[l].weight.detach().T for ls in lins]).repeat_interleave(repeat, 0).clone().requires_grad_() for l in range(len(lins[0]))]
        b = [torch.stack([ls[l].bias.detach()[None] for ls in lins]).repeat_interleave(repeat, 0).clone().requires_grad_() for l in range(len(lins[0]))]
        in_mult = []
        for m in lins[0]:
            in_mult.append(float(m.output_mult / m.width_mult()) if hasattr(m, "width_mult") else 1.0)
        opt = real_optimizer(param, models[0], 1.0)
        lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        return cls(W, b, in_mult, [lr_of[id(m.weight)] for m in lins[0]], [lr_of[id(m.bias)] for m in lins[0]], act, param.endswith("adam"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for l, (W, b) in enumerate(zip(self.W, self.b)):
            h = torch.baddbmm(b, h * self.in_mult[l] if self.in_mult[l] != 1.0 else h, W)
            if l < len(self.W) - 1:
                h = torch.tanh(h) if self.act == "tanh" else torch.relu(h)
        return h

    def params(self) -> list[torch.Tensor]:
        return self.W + self.b

    def mults(self) -> list[float]:
        return self.mult_W + self.mult_b


class BatchedOptimizer:
    """SGD or Adam (torch.optim defaults: betas (0.9, 0.999), eps 1e-8) with a per-run global lr."""

    def __init__(self, net: Batched, lrs: torch.Tensor):
        self.net, self.lrs, self.t = net, lrs, 0
        self.m = [torch.zeros_like(p) for p in net.params()] if net.adam else None
        self.v = [torch.zeros_like(p) for p in net.params()] if net.adam else None

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor]) -> None:
        self.t += 1
        for i, (p, g, mult) in enumerate(zip(self.net.params(), grads, self.net.mults())):
            lr = (self.lrs * mult).view(-1, *([1] * (p.dim() - 1)))
            if not self.net.adam:
                p.sub_(lr * g)
                continue
            self.m[i].mul_(0.9).add_(g, alpha=0.1)
            self.v[i].mul_(0.999).addcmul_(g, g, value=0.001)
            mhat = self.m[i] / (1 - 0.9**self.t)
            vhat = self.v[i] / (1 - 0.999**self.t)
            p.sub_(lr * mhat / (vhat.sqrt() + 1e-8))


def batch_loss(net: Batched, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """Per-run mean cross-entropy; xb [R, B, 64], yb [R, B] -> [R]."""
    logits = net.forward(xb)
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), yb, reduction="none").mean(1)


def step_check(param: str, act: str, width: int, depth: int, args: argparse.Namespace, data: tuple) -> float:
    """Max relative parameter difference after 2 steps: batched trainer vs the real optimizer."""
    x_tr, y_tr = data[0], data[1]
    lr = 10 ** (sum(LR_RANGES[param]) / 2)
    model = init_model(param, act, width, depth, 0, args.mup_base)
    net = Batched.from_models([model], param, act, 1)
    bopt = BatchedOptimizer(net, torch.tensor([lr]))
    opt = real_optimizer(param, model, lr)
    idx = torch.arange(32)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
        opt.step()
        bl = batch_loss(net, x_tr[idx][None], y_tr[idx][None]).sum()
        bopt.step(list(torch.autograd.grad(bl, net.params())))
    lins = [m for m in model if isinstance(m, nn.Linear)]
    err = 0.0
    for l, m in enumerate(lins):
        for a, ref in ((net.W[l][0].T, m.weight), (net.b[l][0, 0], m.bias)):
            err = max(err, float((a.detach() - ref.detach()).abs().max() / ref.detach().abs().max().clamp_min(1e-12)))
    return err


def train_config(param: str, act: str, width: int, depth: int, lrs: torch.Tensor, args: argparse.Namespace, data: tuple) -> dict[str, Any]:
    x_tr, y_tr, x_te, y_te = data
    S, G = args.seeds, len(lrs)
    models = [init_model(param, act, width, depth, s, args.mup_base) for s in range(S)]
    net = Batched.from_models(models, param, act, repeat=G)  # run r = seed * G + lr index
    run_lrs = lrs.repeat(S)
    opt = BatchedOptimizer(net, run_lrs)
    gens = [torch.Generator().manual_seed(10_000 + s) for s in range(S)]
    t0 = time.perf_counter()
    for _ in range(args.steps):
        idx = torch.stack([torch.randint(len(x_tr), (args.batch,), generator=g) for g in gens]).repeat_interleave(G, 0)
        loss = batch_loss(net, x_tr[idx], y_tr[idx])
        loss = torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss))  # diverged runs stop contributing
        opt.step(list(torch.autograd.grad(loss.sum(), net.params())))
    with torch.no_grad():
        R = len(run_lrs)
        tr_loss = batch_loss(net, x_tr.expand(R, -1, -1), y_tr.expand(R, -1))
        acc = (net.forward(x_te.expand(R, -1, -1)).argmax(-1) == y_te).float().mean(1)
    tr_loss = torch.where(torch.isfinite(tr_loss), tr_loss, torch.full_like(tr_loss, math.inf))
    acc = torch.where(torch.isfinite(tr_loss), acc, torch.zeros_like(acc))
    return {
        "param": param, "act": act, "width": width, "depth": depth,
        "lrs": lrs.tolist(),
        "train_loss": tr_loss.view(S, G).tolist(), "test_acc": acc.view(S, G).tolist(),
        "seconds": time.perf_counter() - t0,
    }


def summarize(rows: list[dict[str, Any]], sweeps: dict[str, list[tuple[int, int]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in sorted({(r["param"], r["act"]) for r in rows}):
        rs = {(r["width"], r["depth"]): r for r in rows if (r["param"], r["act"]) == key}
        entry: dict[str, Any] = {}
        for axis, archs in sweeps.items():
            archs = [a for a in archs if a in rs]
            if len(archs) < 2:
                continue
            best, edges, untrained = {}, [], []
            for a in archs:
                lrs = rs[a]["lrs"]
                mean = torch.tensor(rs[a]["train_loss"]).mean(0)
                i = int(torch.argmin(torch.where(torch.isnan(mean), torch.full_like(mean, math.inf), mean)))
                best[a] = (lrs[i], float(mean[i]), i)
                if i in (0, len(lrs) - 1):
                    edges.append(f"{a[0]}x{a[1]}")
                if float(mean[i]) > 0.9 * math.log(10):  # best loss within 10% of chance: nothing learned
                    untrained.append(f"{a[0]}x{a[1]}")
            small, large = archs[0], archs[-1]
            mean_large = torch.tensor(rs[large]["train_loss"]).mean(0)
            lr_small_idx = best[small][2]
            lr_opt = [best[a][0] for a in archs]
            entry[axis] = {
                "optimal_lr": {f"{a[0]}x{a[1]}": best[a][0] for a in archs},
                "optimal_loss": {f"{a[0]}x{a[1]}": best[a][1] for a in archs},
                "lr_spread": max(lr_opt) / min(lr_opt),
                "transfer_gap": float(mean_large[lr_small_idx]) - best[large][1],
                "optimum_on_grid_edge": edges,
                "untrained": untrained,
            }
        out[f"{key[0]}/{key[1]}"] = entry
    return out


def plot(rows: list[dict[str, Any]], param: str, out_dir: Path, name: str, sweeps: dict[str, list[tuple[int, int]]]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    acts = sorted({r["act"] for r in rows if r["param"] == param})
    fig, axes = plt.subplots(1, len(acts), figsize=(5.2 * len(acts), 3.8), squeeze=False)
    for ax, act in zip(axes[0], acts):
        for axis, style in zip(sweeps, ("-", "--", ":")):
            for a in sweeps[axis]:
                r = next((r for r in rows if (r["param"], r["act"], r["width"], r["depth"]) == (param, act, *a)), None)
                if r is None:
                    continue
                mean = torch.tensor(r["train_loss"]).mean(0).clamp(max=10.0)
                ax.semilogx(r["lrs"], mean.tolist(), style, marker="o", ms=3, label=f"{axis}: n={a[0]}, L={a[1]}")
        ax.set_title(f"{param}, {act}")
        ax.set_xlabel("global learning rate")
        ax.set_ylabel("final train loss (seed mean, clipped at 10)")
        ax.set_ylim(0, 3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return atomic_savefig(fig, out_dir / f"{name}_{param}.png", dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="widths {16,64} at L=3, depths {3,8} at n=32, 5 lrs, 1 seed, 20 steps")
    ap.add_argument("--grid", choices=["reduced", "full"], default="reduced")
    ap.add_argument("--params", nargs="*", default=list(LR_RANGES))
    ap.add_argument("--acts", nargs="*", default=["tanh", "relu"])
    ap.add_argument("--n-lr", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--mup-base", type=int, default=None, help="mup base width (default: smallest width)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a loaded 2-core machine)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        sweeps = {"width": [(16, 3), (64, 3)], "depth": [(32, 3), (32, 8)]}
        args.n_lr, args.seeds, args.steps = args.n_lr or 5, args.seeds or 1, args.steps or 20
    elif args.grid == "full":
        sweeps = {f"width@L={L}": [(n, L) for n in (128, 512, 2048)] for L in (4, 16, 48)}
        sweeps.update({f"depth@n={n}": [(n, L) for L in (4, 16, 48)] for n in (128, 512, 2048)})
        args.n_lr, args.seeds, args.steps = args.n_lr or 10, args.seeds or 3, args.steps or 200
    else:
        sweeps = {"width": [(16, 4), (64, 4), (256, 4)], "depth": [(64, 4), (64, 16), (64, 48)]}
        args.n_lr, args.seeds, args.steps = args.n_lr or 8, args.seeds or 2, args.steps or 40
    widths = sorted({a[0] for s in sweeps.values() for a in s})
    args.mup_base = args.mup_base or widths[0]
    archs = sorted({a for s in sweeps.values() for a in s}, key=lambda a: (a[0] * a[0] * a[1], a))
    notes = ["unit-scaling (u-μP) not run: it replaces the network's modules by unit-scaled ones, not a "
             "parametrization of the same nn.Linear MLP"]
    params = list(args.params)
    try:
        import mup  # noqa: F401
    except ImportError:
        notes.append("mup not installed: mup-sgd/mup-adam skipped (`pip install --no-deps mup`)")
        params = [p for p in params if not p.startswith("mup")]
    out_dir = args.out or RESULTS
    name = "lr_transfer" + ("_quick" if args.quick else "")
    data = load_digits_split()
    checks: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()

    def save() -> None:
        payload = {
            "benchmark": name, "machine": machine(), "quick": args.quick, "grid": "quick" if args.quick else args.grid,
            "config": {"sweeps": {k: [list(a) for a in v] for k, v in sweeps.items()}, "n_lr": args.n_lr, "seeds": args.seeds,
                       "steps": args.steps, "batch": args.batch, "mup_base": args.mup_base, "lr_ranges_log10": LR_RANGES,
                       "loss": "cross-entropy, batch mean", "data": "sklearn digits, 80/20 split (seed 0), standardised"},
            "notes": notes, "step_check": checks, "rows": rows, "summary": summarize(rows, sweeps),
            "seconds": time.perf_counter() - t_start,
        }
        atomic_write_json(out_dir / f"{name}.json", payload)

    for param in params:
        lo, hi = LR_RANGES[param]
        lrs = torch.logspace(lo, hi, args.n_lr)
        for act in args.acts:
            checks[f"{param}/{act}"] = step_check(param, act, archs[0][0], archs[0][1], args, data)
            for (w, d) in archs:
                rows.append(train_config(param, act, w, d, lrs, args, data))
                print(f"  {param:9s} {act:5s} n={w:<5d} L={d:<3d} {rows[-1]['seconds']:6.1f} s", flush=True)
                save()
    summary = summarize(rows, sweeps)
    print(f"\nlearning-rate transfer on digits ({'quick' if args.quick else args.grid} grid; {args.n_lr} lrs, "
          f"{args.seeds} seeds, {args.steps} steps, batch {args.batch}; CPU, shared and loaded)")
    print("batched trainer vs real optimizer (max rel. diff after 2 steps): "
          + ", ".join(f"{k}={v:.1e}" for k, v in checks.items()))
    hdr = f"{'parametrization':18s} {'axis':12s} {'lr* per model (small -> large)':36s} {'best loss per model':26s} {'spread':>7s} {'gap':>7s}  flags"
    print(hdr + "\n" + "-" * len(hdr))
    for key, entry in summary.items():
        for axis, e in entry.items():
            lrs_s = " ".join(f"{v:.2g}" for v in e["optimal_lr"].values())
            loss_s = " ".join(f"{v:.3f}" for v in e["optimal_loss"].values())
            flags = [f"edge:{a}" for a in e["optimum_on_grid_edge"]] + [f"untrained:{a}" for a in e["untrained"]]
            print(f"{key:18s} {axis:12s} {lrs_s:36s} {loss_s:26s} {e['lr_spread']:7.1f} {e['transfer_gap']:7.3f}  {','.join(flags) or '-'}")
    print("spread = max/min optimal lr over the sweep (1 = perfect transfer; grid step "
          f"{10 ** ((LR_RANGES['sp-sgd'][1] - LR_RANGES['sp-sgd'][0]) / (args.n_lr - 1)):.2f}x); gap = train-loss excess of the "
          "largest model at the smallest model's optimal lr; edge = optimum on the grid boundary; untrained = best "
          "loss > 0.9 ln 10 (no learning at any lr: its lr* is meaningless).")
    for n in notes:
        print("note:", n)
    save()
    for param in params:
        p = plot(rows, param, out_dir, name, sweeps)
        if p:
            print(f"wrote {p}")
    print(f"wrote {out_dir / f'{name}.json'} ({time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
