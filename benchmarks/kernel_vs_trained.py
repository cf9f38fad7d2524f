"""Trained wide networks vs the infinite-width frozen-NTK prediction (Ch. 10, THEORY.md §7, §12 C.22).

    python benchmarks/kernel_vs_trained.py            # widths 128..2048, a few minutes on 2 cores
    python benchmarks/kernel_vs_trained.py --quick    # < 30 s smoke version

Setup. scikit-learn's digits (no download): inputs standardised per pixel and normalised to
(1/n0)|x|^2 = 1, a fixed train/test split, targets one-hot minus 1/10 (k = 10 outputs, a
regression task). Ensembles of tanh MLPs (depth L) at criticality (``torch_crit.init_``:
C_b = 0, C_W = 1), learning rates from ``torch_crit.param_groups`` (equivalence principle (9.96)),
full-batch gradient descent on the book's extensive MSE L = 1/2 sum (z - y)^2 (10.5), every
network trained for T steps. The global scale c of the groups' rates is c = eta_frac/lambda_max,
lambda_max the largest eigenvalue of the training block of the frozen NTK built from the *same*
groups (lambda_W^(l) = lr_W^(l) n_{l-1}, lambda_b^(l) = lr_b^(l), book convention (8.6)), so the
trained networks and ``ntk_prediction(..., learning_rate=c, steps=T)`` describe the same step.
The script checks that one batched step equals ``torch.optim.SGD(groups)`` on a real model.

Measured per width n (each with its standard error over the ensemble):
  * ``mean_gap``  |E[z_B(T)] - m_T| / |m_T|: ensemble mean vs the frozen-NTK mean (10.40 at finite
    T). Estimated with the control variate d = z(T) - [f0_B - P_T (f0_A - y)] (the infinite-width
    trajectory from the network's own initial outputs; E[f0] = 0, so E[d] = E[z(T)] - m_T) and
    the noise-bias correction |mean d|^2 - tr Cov(d)/M. Theory: O(L/n) (∞.171) -> slope -1.
  * ``net_rms``   per-network RMS of d: the network's own NTK fluctuates by O(1/sqrt(n)) -> slope -1/2.
  * ``lin_rms``   per-network RMS of z(T) minus its own linearized model (empirical NTK at init,
    ``torch_crit.empirical_ntk`` with the same groups, f0 in the mean): only the dNTK/ddNTK
    (representation learning) remains -> O(1/n), slope -1.
  * ``var_ratio`` ensemble variance of z_B(T) / the theory covariance (10.41 at finite T).
Exponents are least-squares slopes of log(metric) vs log(n).
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_results  # noqa: E402

import torch_crit  # noqa: E402
from torch_crit._io import atomic_savefig  # noqa: E402
from torch_crit.theory.learning import infinite_width_kernels, ntk_prediction  # noqa: E402

DT = torch.float64


def load_data(n_train: int, n_test: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits: x [N, 64] standardised, (1/n0)|x|^2 = 1; y = one-hot - 1/10, [N, 10]; fixed split."""
    from sklearn.datasets import load_digits

    X, lab = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=DT)
    X = (X - X.mean(0)) / X.std(0).clamp_min(1e-8)
    X = X / X.pow(2).mean(1, keepdim=True).sqrt()
    Y = torch.nn.functional.one_hot(torch.tensor(lab), 10).to(DT) - 0.1
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    a, b = perm[:n_train], perm[n_train:n_train + n_test]
    return X[a], Y[a], X[b], Y[b]


def make_mlp(width: int, depth: int, n0: int, k: int) -> nn.Sequential:
    dims = [n0] + [width] * (depth - 1) + [k]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < depth - 1:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def layer_rates(model: nn.Sequential, groups: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """Per-parameter step sizes of each Linear layer (weights, biases), read from the groups."""
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    lins = [m for m in model if isinstance(m, nn.Linear)]
    missing = [i for i, m in enumerate(lins) if id(m.weight) not in lr_of or id(m.bias) not in lr_of]
    if missing:
        raise RuntimeError(f"param_groups left layers {missing} without a learning rate")
    return [lr_of[id(m.weight)] for m in lins], [lr_of[id(m.bias)] for m in lins]


class Ensemble:
    """M independent MLPs trained at once: parameters stacked as [M, ...], batched matmuls."""

    def __init__(self, models: list[nn.Sequential], lr_w: list[float], lr_b: list[float], dtype: torch.dtype):
        lins = [[m for m in net if isinstance(m, nn.Linear)] for net in models]
        depth = len(lins[0])
        self.W = [torch.stack([ls[l].weight.detach().T for ls in lins]).to(dtype).requires_grad_() for l in range(depth)]
        self.b = [torch.stack([ls[l].bias.detach()[None] for ls in lins]).to(dtype).requires_grad_() for l in range(depth)]
        self.lr_w, self.lr_b, self.dtype = lr_w, lr_b, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.dtype).expand(self.W[0].shape[0], -1, -1)
        for l, (W, b) in enumerate(zip(self.W, self.b)):
            h = torch.baddbmm(b, h, W)
            if l < len(self.W) - 1:
                h = torch.tanh(h)
        return h  # [M, N, k]

    def step(self, x_a: torch.Tensor, y_a: torch.Tensor) -> float:
        """One full-batch GD step on sum over networks of 1/2 sum (z - y)^2 (each network's own loss)."""
        z = self.forward(x_a)
        loss = 0.5 * ((z - y_a.to(self.dtype)) ** 2).sum()
        grads = torch.autograd.grad(loss, self.W + self.b)
        depth = len(self.W)
        with torch.no_grad():
            for l in range(depth):
                self.W[l].sub_(self.lr_w[l] * grads[l])
                self.b[l].sub_(self.lr_b[l] * grads[depth + l])
        return float(loss.detach())


def check_step_matches_sgd(model: nn.Sequential, groups: list[dict[str, Any]], x_a: torch.Tensor, y_a: torch.Tensor) -> float:
    """Max relative difference between one batched step and torch.optim.SGD(groups) on the model."""
    ref = copy.deepcopy(model).to(DT)
    ref_groups = [{**g, "params": [dict(ref.named_parameters())[n] for n, p in model.named_parameters() if any(p is q for q in g["params"])]} for g in groups]
    opt = torch.optim.SGD(ref_groups, lr=0.0)
    opt.zero_grad()
    (0.5 * ((ref(x_a) - y_a) ** 2).sum()).backward()
    opt.step()
    lw, lb = layer_rates(model, groups)
    ens = Ensemble([model], lw, lb, DT)
    ens.step(x_a, y_a)
    lins = [m for m in ref if isinstance(m, nn.Linear)]
    err = 0.0
    for l, m in enumerate(lins):
        for a, b in ((ens.W[l][0].T, m.weight), (ens.b[l][0, 0], m.bias)):
            err = max(err, float((a.detach() - b.detach()).abs().max() / b.detach().abs().max()))
    return err


def slope(ns: list[int], vals: list[float]) -> float | None:
    pts = [(math.log(n), math.log(v)) for n, v in zip(ns, vals) if v is not None and v > 0 and math.isfinite(v)]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sum((p[0] - mx) ** 2 for p in pts)


def jackknife(values: torch.Tensor, stat: Any) -> tuple[float, float]:
    """Statistic over networks (axis 0) and its jackknife standard error."""
    full = float(stat(values))
    M = values.shape[0]
    if M < 3:
        return full, float("nan")
    loo = torch.tensor([float(stat(torch.cat([values[:i], values[i + 1:]]))) for i in range(M)], dtype=DT)
    return full, float(math.sqrt((M - 1) / M * ((loo - loo.mean()) ** 2).sum()))


def run_width(width: int, ensemble: int, args: argparse.Namespace, data: tuple, theory: dict[str, Any], seed: int) -> dict[str, Any]:
    x_a, y_a, x_b, y_b = data
    x_d = torch.cat([x_a, x_b])
    n_a, k = y_a.shape
    depth = args.depth
    t0 = time.perf_counter()
    models, groups0 = [], None
    for i in range(ensemble):
        net = make_mlp(width, depth, x_a.shape[1], k).to(DT)
        torch_crit.init_(net, generator=torch.Generator().manual_seed(seed + i))
        groups = torch_crit.param_groups(net, lr_b=args.lr_b * theory["scale"], lr_W=args.lr_W * theory["scale"])
        if groups0 is None:
            groups0 = groups
        models.append(net)
    lw, lb = layer_rates(models[0], groups0)
    ens = Ensemble(models, lw, lb, getattr(torch, args.dtype))
    with torch.no_grad():
        f0 = ens.forward(x_d).to(DT)  # [M, N_D, k]
    for _ in range(args.steps):
        ens.step(x_a, y_a)
    with torch.no_grad():
        zT = ens.forward(x_b).to(DT)  # [M, N_B, k]
    t_train = time.perf_counter() - t0
    # infinite-width trajectory from each network's own f0: lin = f0_B - P_T f0_A + P_T y
    P_f0 = ntk_prediction(f0[:, :n_a].permute(1, 0, 2).reshape(n_a, -1), theory["ntk"], learning_rate=theory["scale"], steps=args.steps).mean
    lin = f0[:, n_a:] - P_f0.reshape(x_b.shape[0], ensemble, k).permute(1, 0, 2) + theory["mean"]
    d = zT - lin  # [M, N_B, k]
    m_norm = float(theory["mean"].norm())

    def gap2(v: torch.Tensor) -> torch.Tensor:
        return (v.mean(0) ** 2).sum() - v.var(0).sum() / v.shape[0]

    g2, g2_se = jackknife(d, gap2)
    rms, rms_se = jackknife(d, lambda v: v.pow(2).mean().sqrt())
    var_ratio = float(zT.var(0).mean(-1).mean() / theory["cov"].diagonal().mean())
    raw_gap = float((zT.mean(0) - theory["mean"]).norm()) / m_norm
    noise_floor = math.sqrt(float(theory["cov"].diagonal().sum()) * k / ensemble) / m_norm
    # each of the first n_emp networks vs its own linearized model (empirical NTK at init)
    lin_rms = []
    t1 = time.perf_counter()
    for i in range(min(args.n_emp, ensemble)):
        H = torch_crit.empirical_ntk(models[i], x_d, output="full", learning_rates=groups0 if i == 0 else torch_crit.param_groups(
            models[i], lr_b=args.lr_b * theory["scale"], lr_W=args.lr_W * theory["scale"]), dtype=DT)
        H = H.to(DT)
        pred = ntk_prediction(y_a, H, learning_rate=1.0, steps=args.steps, f0=f0[i])
        lin_rms.append(float((zT[i] - pred.mean).pow(2).mean().sqrt()))
    t_emp = time.perf_counter() - t1
    gap = math.sqrt(max(g2, 0.0)) / m_norm
    gap_se = (g2_se / (2 * math.sqrt(g2)) / m_norm) if g2 > 0 else float("nan")
    return {
        "width": width, "ensemble": ensemble,
        "mean_gap": gap, "mean_gap_se": gap_se, "mean_gap_sq": g2, "mean_gap_sq_se": g2_se,
        "mean_gap_resolved": bool(g2 > 2 * g2_se),
        "raw_gap": raw_gap, "raw_noise_floor": noise_floor,
        "net_rms": rms / (m_norm / math.sqrt(theory["mean"].numel())), "net_rms_se": rms_se / (m_norm / math.sqrt(theory["mean"].numel())),
        "lin_rms": (sum(lin_rms) / len(lin_rms)) / (m_norm / math.sqrt(theory["mean"].numel())) if lin_rms else None,
        "var_ratio": var_ratio,
        "train_s": t_train, "emp_ntk_s": t_emp,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="widths 64,128,256, 4 nets, 20 steps, 32/16 points")
    ap.add_argument("--widths", type=int, nargs="*", default=None)
    ap.add_argument("--ensemble", type=int, nargs="*", default=None, help="networks per width (one value or one per width)")
    ap.add_argument("--depth", type=int, default=3, help="number of weight layers L")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--n-test", type=int, default=None)
    ap.add_argument("--eta-frac", type=float, default=1.0, help="c * lambda_max(Theta_AA); < 2 for stability")
    ap.add_argument("--lr-b", type=float, default=1.0, help="lr_b of param_groups before the global scale")
    ap.add_argument("--lr-W", type=float, default=1.0, help="lr_W of param_groups before the global scale")
    ap.add_argument("--n-emp", type=int, default=2, help="networks per width compared with their own linearized model")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="training dtype (theory is float64)")
    ap.add_argument("--n-nodes", type=int, default=None, help="quadrature nodes per panel for the tanh kernels (default: library's)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a loaded 2-core machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        widths = args.widths or [64, 128, 256]
        ens = args.ensemble or [4]
        args.steps = args.steps or 20
        args.n_train, args.n_test = args.n_train or 32, args.n_test or 16
        args.n_emp = min(args.n_emp, 1)
    else:
        widths = args.widths or [128, 256, 512, 1024, 2048]
        ens = args.ensemble or [32, 32, 16, 8, 4]
        args.steps = args.steps or 40
        args.n_train, args.n_test = args.n_train or 64, args.n_test or 32
    if len(ens) == 1:
        ens = ens * len(widths)
    if len(ens) != len(widths):
        raise SystemExit(f"--ensemble needs one value or one per width ({len(widths)}); got {ens}")
    out_dir = args.out or RESULTS
    name = "kernel_vs_trained" + ("_quick" if args.quick else "")
    data = load_data(args.n_train, args.n_test, args.seed)
    x_a, y_a, x_b, y_b = data

    # --- theory: frozen NTK from the same groups the networks train with -------------------
    t0 = time.perf_counter()
    probe = make_mlp(widths[0], args.depth, x_a.shape[1], y_a.shape[1]).to(DT)
    report = torch_crit.init_(probe, generator=torch.Generator().manual_seed(args.seed))
    C_b = [float(r.C_b) for r in report.layers]  # per-layer critical values used by init_
    C_W = [float(r.C_W) for r in report.layers]
    unit = torch_crit.param_groups(probe, lr_b=args.lr_b, lr_W=args.lr_W)
    lw, lb = layer_rates(probe, unit)
    fan_in = [m.in_features for m in probe if isinstance(m, nn.Linear)]
    lam_W = [lr * n for lr, n in zip(lw, fan_in)]  # lambda_W^(l) = lr(W^(l)) n_{l-1}  (eta = 1), (8.6)
    lam_b = lb
    kern = infinite_width_kernels("tanh", C_b, C_W, args.depth, x_a, x_b, lambda_b=lam_b, lambda_W=lam_W, n_nodes=args.n_nodes)
    lam_max = float(torch.linalg.eigvalsh(kern.ntk[: len(x_a), : len(x_a)])[-1])
    scale = args.eta_frac / lam_max
    pred = ntk_prediction(y_a, kern, learning_rate=scale, steps=args.steps)
    conv = ntk_prediction(y_a, kern)
    theory = {"ntk": kern.ntk, "scale": scale, "mean": pred.mean, "cov": pred.cov}
    step_err = check_step_matches_sgd(probe, torch_crit.param_groups(probe, lr_b=args.lr_b * scale, lr_W=args.lr_W * scale), x_a, y_a)
    t_theory = time.perf_counter() - t0
    test_mse = lambda m: float(((m - y_b) ** 2).sum(1).mean())  # noqa: E731
    print(f"digits: N_A={len(x_a)}, N_B={len(x_b)}, k=10, tanh depth L={args.depth}, C_b={C_b}, C_W={C_W}")
    print(f"lambda_b^(l)={[round(v, 4) for v in lam_b]}, lambda_W^(l)={[round(v, 4) for v in lam_W]} (from param_groups)")
    print(f"lambda_max(Theta_AA)={lam_max:.4g}, global lr scale c={scale:.4g} (eta_frac={args.eta_frac}), T={args.steps} steps")
    print(f"batched GD step vs torch.optim.SGD(param_groups): max rel diff {step_err:.2e}")
    print(f"theory test MSE/sample: t=T {test_mse(pred.mean):.4f}, t=inf {test_mse(conv.mean):.4f} (theory {t_theory:.1f} s)")

    rows = []
    for i, (w, m) in enumerate(zip(widths, ens)):
        rows.append(run_width(w, m, args, data, theory, seed=1000 * (i + 1) + args.seed))
        r = rows[-1]
        print(f"  width {w}: done in {r['train_s']:.1f} s (+{r['emp_ntk_s']:.1f} s empirical NTK)", flush=True)
    fits = {
        "mean_gap": slope([r["width"] for r in rows if r["mean_gap_resolved"]], [r["mean_gap"] for r in rows if r["mean_gap_resolved"]]),
        "net_rms": slope([r["width"] for r in rows], [r["net_rms"] for r in rows]),
        "lin_rms": slope([r["width"] for r in rows], [r["lin_rms"] for r in rows]),
    }
    expected = {"mean_gap": -1.0, "net_rms": -0.5, "lin_rms": -1.0}
    hdr = f"{'width':>6} {'M':>3} | {'mean gap (rel)':>20} | {'raw gap':>8} {'floor':>7} | {'net rms':>16} | {'lin rms':>8} | {'var ratio':>9} | {'train s':>7}"
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for r in rows:
        mg = f"{r['mean_gap']:.2e}±{r['mean_gap_se']:.1e}" if r["mean_gap_resolved"] else f"<{2 * math.sqrt(max(r['mean_gap_sq_se'], 0)) / float(theory['mean'].norm()):.1e} (noise)"
        lr_ = f"{r['lin_rms']:.2e}" if r["lin_rms"] is not None else "-"
        print(f"{r['width']:>6} {r['ensemble']:>3} | {mg:>20} | {r['raw_gap']:>8.3f} {r['raw_noise_floor']:>7.3f} | "
              f"{r['net_rms']:.2e}±{r['net_rms_se']:.1e} | {lr_:>8} | {r['var_ratio']:>9.3f} | {r['train_s']:>7.1f}")
    print("\nfitted exponents (metric ~ n^p):  " + ", ".join(
        f"{k_}: {('%.2f' % v) if v is not None else 'n/a'} (theory {expected[k_]})" for k_, v in fits.items()))
    print("mean gap, net rms and lin rms are relative to the RMS of the theory mean m_T; 'floor' is the\n"
          "ensemble noise of the raw gap, sqrt(tr Cov/M)/|m_T|; timings on a shared, loaded 2-core CPU.")
    payload = {
        "quick": args.quick,
        "config": {"depth": args.depth, "steps": args.steps, "n_train": len(x_a), "n_test": len(x_b), "k": 10,
                   "dtype": args.dtype, "eta_frac": args.eta_frac, "lr_b": args.lr_b, "lr_W": args.lr_W,
                   "global_scale": scale, "lambda_b": lam_b, "lambda_W": lam_W, "C_b": C_b, "C_W": C_W},
        "theory": {"lambda_max": lam_max, "test_mse_T": test_mse(pred.mean), "test_mse_inf": test_mse(conv.mean), "seconds": t_theory},
        "sgd_step_check_max_rel_diff": step_err,
        "rows": rows, "exponents": fits, "expected_exponents": expected,
    }
    write_results(name, payload) if out_dir == RESULTS else _write(out_dir / f"{name}.json", payload)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return 0
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ns = [r["width"] for r in rows]
    for key, label, marker in (("net_rms", "per-network |z - lin_inf(f0)| (exp. -1/2)", "o"),
                               ("lin_rms", "per-network |z - own linearized| (exp. -1)", "s"),
                               ("mean_gap", "ensemble mean gap (exp. -1)", "^")):
        pts = [(r["width"], r[key]) for r in rows if r[key] is not None and (key != "mean_gap" or r["mean_gap_resolved"])]
        if pts:
            ax.loglog(*zip(*pts), marker=marker, label=label)
    ref = [(n / ns[0]) ** -1 * rows[0]["net_rms"] for n in ns]
    ax.loglog(ns, ref, "k:", lw=0.8, label="~1/n")
    ax.set_xlabel("width n")
    ax.set_ylabel("deviation / RMS(m_T)")
    ax.set_title(f"digits, tanh L={args.depth}, T={args.steps} GD steps")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = atomic_savefig(fig, out_dir / f"{name}.png", dpi=120)
    print(f"wrote {path}")
    return 0


def _write(path: Path, payload: dict[str, Any]) -> None:
    from _common import machine

    from torch_crit._io import atomic_write_json

    atomic_write_json(path, {"benchmark": path.stem, "machine": machine(), **payload})
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
