"""Learning-rate transfer across width and depth: SP vs μP vs u-μP vs torch_crit (THEORY.md §5.4).

    python benchmarks/lr_transfer.py                 # default axes grid (below): ~17-20 min on this 2-core CPU
    python benchmarks/lr_transfer.py --estimate      # calibrate, print the estimated total, exit (~30 s)
    python benchmarks/lr_transfer.py --grid full     # widths {128,512,2048} x depths {4,16,48}: hours on CPU
    python benchmarks/lr_transfer.py --quick         # smoke version (~25 s)

Task. scikit-learn's digits (fixed 80/20 split, standardised pixels), MLPs with tanh or ReLU,
cross-entropy (mean over the batch), minibatch training for a fixed number of steps, a log grid
of global learning rates, several seeds; recorded: final train loss (full training set) and
test accuracy. A parametrization transfers well when the best learning rate does not move
with width/depth and the smallest model's best rate is near-optimal for the largest.

Parametrizations (each with its own library's modules, init and optimizer rules):
  * ``sp-sgd`` / ``sp-adam``: PyTorch defaults (kaiming-uniform init), one global lr.
  * ``mup-sgd`` / ``mup-adam``: ``mup`` (``MuReadout`` output, ``set_base_shapes`` with base width
    ``--mup-base``, default the smallest width, ``MuSGD`` / ``MuAdam``). Skipped with a note when
    ``mup`` is not installed (``pip install --no-deps mup``: its Requires-Dist has ``torchvision``,
    which pins its own torch).
  * ``uu-sgd`` / ``uu-adam``: u-μP, ``unit-scaling`` 0.3.5 (``pip install 'torch-crit[bench]'``, or
    ``pip install --no-deps unit-scaling==0.3.5 einops docstring-parser``: ``import unit_scaling``
    needs only those two of its dependencies). The network is built from its unit-scaled modules:
    ``uu.Linear`` (weights N(0, 1), output x fan_in^-1/2; bias=True as in the other networks) for
    the input and hidden layers, the hidden blocks inside ``uu.DepthSequential`` (its depth rule:
    lr x depth^-1/2), ``uu.LinearReadout`` (output x 1/fan_in) and ``uu.functional.cross_entropy``.
    unit_scaling ships unit-scaled GELU/SiLU but no tanh/ReLU, so they are made with its own
    ``core.functional.scale_elementwise`` and its convention: output / std for a unit Gaussian
    input (for ReLU the limit of its ``gelu`` scales, sqrt(2/(1-1/π))). Optimizers:
    ``uu.optim.SGD`` / ``uu.optim.Adam``. u-μP's depth rule was derived for residual stacks; this
    MLP has none, so the depth axis tests it outside its derivation, and with ReLU the std (not
    rms) convention grows the pre-activations' second moment 1/(1-1/π) = 1.47x per layer (deep
    ReLU nets start with huge logits). Skipped with a note when ``unit_scaling`` does not import.
  * ``tc-sgd`` / ``tc-adam``: ``torch_crit.init_`` (criticality) and
    ``torch_crit.param_groups(lr_b=lr, lr_W=lr, optimizer='sgd'|'adam')`` (equivalence principle
    (9.94)–(9.96); Adam rule derived in ``torch_crit.optim``).

How it is run. For every (parametrization, activation, architecture) the runs of all learning
rates and seeds are trained at once as a batch of independent networks (stacked parameters,
batched matmuls; Adam through torch's fused CPU kernel per run). Initial parameters come from
real ``nn.Module`` instances initialised by each library; the per-parameter learning-rate
multipliers are read from the real optimizer's param groups (built with lr = 1); for u-μP the
forward/backward scales of its modules and loss are applied with its own ``scale_fwd`` /
``scale_bwd`` (the weight/bias gradient scale batch^-1/2 as a gradient multiplier). One batched
run of 2 steps is checked against the real modules + real optimizer in float64 (``step_check``
in the JSON: max relative parameter difference; measured <= 2e-12 for every parametrization).

Default grid (``--grid axes``). Every width and depth of the task, one axis at a time (the way
μP/u-μP papers report transfer): a width sweep {128, 512, 2048} at depth 4 and a depth sweep
{4, 16, 48} at width 128; tanh and ReLU; 8 learning rates (a log grid over 10^4 per
parametrization, ``LR_RANGES``: the optima fall inside, not on the edges), 2 seeds, batch 32, 40
steps. The product ``--grid full`` costs hours here, and its 2048x48 cell (1.9e8 parameters per
network, 16 stacked networks: ~25 GB for SGD, ~50 GB for Adam) needs a bigger machine or fewer
runs (``--n-lr 4 --seeds 1``). Cost is dominated by the width-2048 cell (16 networks of 8.6e6
parameters). Before training, the script times setup, 3 steps (median) and the evaluation of
every architecture for one SGD and one Adam parametrization and prints the extrapolated total;
``--estimate`` stops there. Measured with 1 thread on the shared 2-core machine: per step
2048x4 0.95 s (SGD) / 1.03 s (Adam), 512x4 0.064 / 0.070 s, 128x48 0.11 / 0.14 s, 128x16
0.033 / 0.041 s, 128x4 0.008 / 0.010 s; final evaluation 8.7 s at 2048x4 (1.8 s at 128x48);
estimated total 16.5 min + 27 s calibration for 8 parametrizations x 2 activations. A whole
2048x4 cell measured 54-62 s against 47-50 s extrapolated (other jobs on the host vary it by
~25%), so expect ~17-20 min.

Headline numbers per (parametrization, activation) and axis: the spread of the optimal learning
rate (max/min ratio of the per-architecture argmins of the seed-mean final train loss) and the
transfer gap = loss of the largest model at the smallest model's optimal rate minus its loss at
its own optimum. An optimum on the edge of the grid, and a model that learns nothing at any rate
(best loss > 0.9 ln 10, its lr* is meaningless), are flagged.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine  # noqa: E402

import torch_crit  # noqa: E402
from torch_crit._io import atomic_savefig, atomic_write_json  # noqa: E402

ACTS = {"tanh": nn.Tanh, "relu": nn.ReLU}
ACT_FN: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"tanh": torch.tanh, "relu": torch.relu}
# log10 ranges of the global learning rate per parametrization: the optima of the axes grid (40 steps,
# batch 32) lie inside, checked on every cell but 2048x4 (there on sp-sgd/tanh, sp-adam/tanh, uu-adam/relu)
LR_RANGES = {
    "sp-sgd": (-2.5, 1.5), "mup-sgd": (-2.5, 1.5), "uu-sgd": (-3.0, 1.0), "tc-sgd": (-1.0, 3.0),
    "sp-adam": (-5.0, -1.0), "mup-adam": (-4.5, -0.5), "uu-adam": (-2.5, 1.5), "tc-adam": (-1.5, 2.5),
}
PARAMS = list(LR_RANGES)
N_CLASSES = 10


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


# --------------------------------------------------------------------------- u-μP (unit_scaling)
def unit_scaling_available() -> str | None:
    """None when ``unit_scaling`` imports, else the reason (for the skip note)."""
    try:
        import unit_scaling  # noqa: F401
    except Exception as exc:  # ImportError, or a missing dependency of it
        return f"{type(exc).__name__}: {exc}"
    return None


def gaussian_act_scales(act: str) -> tuple[float, float]:
    """(std σ(z), rms σ'(z)) for z ~ N(0, 1): unit scaling divides by these (its ``gelu`` convention)."""
    if act == "relu":  # Var relu(z) = 1/2 - 1/(2π); relu' is 0/1 with probability 1/2
        return math.sqrt((1 - 1 / math.pi) / 2), math.sqrt(0.5)
    if act != "tanh":
        raise ValueError(act)
    import numpy as np

    x, w = np.polynomial.hermite_e.hermegauss(160)  # probabilists' Gauss-Hermite: exact to ~1e-12 here
    w = w / w.sum()
    y = np.tanh(x)
    dy = 1 - y**2
    return float(np.sqrt((w * y * y).sum() - (w * y).sum() ** 2)), float(np.sqrt((w * dy * dy).sum()))


class UnitScaledAct(nn.Module):
    """tanh / ReLU made unit-scaled with ``unit_scaling.core.functional.scale_elementwise``."""

    def __init__(self, act: str, constraint: str | None = "to_output_scale"):
        super().__init__()
        std, grad_rms = gaussian_act_scales(act)
        self.act, self.constraint = act, constraint
        self.output_scale, self.grad_input_scale = 1 / std, 1 / grad_rms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from unit_scaling.core.functional import scale_elementwise

        return scale_elementwise(ACT_FN[self.act], self.output_scale, self.grad_input_scale, self.constraint)(x)


def build_uu_model(act: str, width: int, depth: int, in_dim: int = 64) -> nn.Sequential:
    import unit_scaling as uu

    hidden = [nn.Sequential(uu.Linear(width, width, bias=True), UnitScaledAct(act)) for _ in range(depth - 2)]
    return nn.Sequential(uu.Linear(in_dim, width, bias=True), UnitScaledAct(act), uu.DepthSequential(*hidden),
                         uu.LinearReadout(width, N_CLASSES, bias=True))


@dataclass
class UUScales:
    """u-μP scale factors of one network, as its modules apply them (``unit_scaling.functional``)."""

    out: list[float]          # forward multiplier of layer ℓ's output x W^T + b
    grad_in: list[float]      # backward multiplier of layer ℓ's input gradient
    grad_w_power: list[float]  # weight and bias gradients scaled by batch^-power
    act_out: float
    act_grad: float
    logit_grad: float         # cross_entropy: backward multiplier of the logits (sum reduction)

    @classmethod
    def from_model(cls, model: nn.Module) -> UUScales:
        import unit_scaling as uu
        from unit_scaling.constraints import apply_constraint

        out, gin, pw = [], [], []
        for m in model.modules():
            if not isinstance(m, nn.Linear):
                continue
            # unit_scaling.functional.linear / linear_readout (scale_power (0.5|1.0, 0.5, 0.5))
            p_out = 1.0 if isinstance(m, uu.LinearReadout) else 0.5
            o, g = apply_constraint(m.constraint, m.in_features ** -p_out, m.out_features ** -0.5)
            out.append(o)
            gin.append(g)
            pw.append(0.5)
        act = next(m for m in model.modules() if isinstance(m, UnitScaledAct))
        a_out, a_grad = apply_constraint(act.constraint, act.output_scale, act.grad_input_scale)
        return cls(out, gin, pw, a_out, a_grad, N_CLASSES / (N_CLASSES - 1) ** 0.5)


# --------------------------------------------------------------------------- real models
def build_model(param: str, act: str, width: int, depth: int, mup_base: int) -> nn.Sequential:
    """An MLP with `depth` weight layers; for mup the readout is MuReadout and base shapes are set."""
    if param.startswith("uu"):
        return build_uu_model(act, width, depth)

    def make(n: int) -> nn.Sequential:
        dims = [64] + [n] * (depth - 1) + [N_CLASSES]
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


def real_loss(param: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if param.startswith("uu"):
        import unit_scaling.functional as U

        return U.cross_entropy(logits, y)
    return torch.nn.functional.cross_entropy(logits, y)


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
    if param == "uu-sgd":
        import unit_scaling as uu

        return uu.optim.SGD(model.parameters(), lr=lr)  # readout_constraint=None, as LinearReadout's
    if param == "uu-adam":
        import unit_scaling as uu

        return uu.optim.Adam(model.parameters(), lr=lr)
    if param in ("tc-sgd", "tc-adam"):
        groups = torch_crit.param_groups(model, lr_b=lr, lr_W=lr, optimizer=param[3:])
        return (torch.optim.SGD if param == "tc-sgd" else torch.optim.Adam)(groups, lr=lr)
    raise ValueError(param)


def init_model(param: str, act: str, width: int, depth: int, seed: int, mup_base: int) -> nn.Sequential:
    torch.manual_seed(seed)  # PyTorch default init (sp, mup) and unit_scaling's normal_ use the global RNG
    model = build_model(param, act, width, depth, mup_base)
    if param.startswith("tc"):
        torch_crit.init_(model, generator=torch.Generator().manual_seed(seed))
    return model


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


# --------------------------------------------------------------------------- batched trainer
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
    uu: UUScales | None = None

    @classmethod
    def from_models(cls, models: list[nn.Module], param: str, act: str, repeat: int) -> Batched:
        lins = [linears(net) for net in models]
        W = [torch.stack([ls[l].weight.detach().T for ls in lins]).repeat_interleave(repeat, 0).contiguous().requires_grad_() for l in range(len(lins[0]))]
        b = [torch.stack([ls[l].bias.detach()[None] for ls in lins]).repeat_interleave(repeat, 0).contiguous().requires_grad_() for l in range(len(lins[0]))]
        in_mult = [float(m.output_mult / m.width_mult()) if hasattr(m, "width_mult") else 1.0 for m in lins[0]]
        opt = real_optimizer(param, models[0], 1.0)
        lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        uu = UUScales.from_model(models[0]) if param.startswith("uu") else None
        return cls(W, b, in_mult, [lr_of[id(m.weight)] for m in lins[0]], [lr_of[id(m.bias)] for m in lins[0]], act,
                   param.endswith("adam"), uu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [R, B, 64] -> logits [R, B, 10]."""
        grad = torch.is_grad_enabled()
        h = x
        for l, (W, b) in enumerate(zip(self.W, self.b)):
            if self.uu is not None:
                h = self._uu_linear(l, h, W, b, grad)
            else:
                h = torch.baddbmm(b, h * self.in_mult[l] if self.in_mult[l] != 1.0 else h, W)
            if l < len(self.W) - 1:
                h = self._act(h, grad)
        return h

    def _uu_linear(self, l: int, h: torch.Tensor, W: torch.Tensor, b: torch.Tensor, grad: bool) -> torch.Tensor:
        """``unit_scaling.functional.linear`` per run (its batch size is the per-run batch)."""
        from unit_scaling.scale import scale_bwd, scale_fwd

        s = self.uu
        if not grad:
            return torch.baddbmm(b, h, W).mul_(s.out[l])
        h = scale_bwd(h, s.grad_in[l]) if h.requires_grad else h
        # scale_bwd(W, batch^-1/2) and scale_bwd(b, ...) are applied to the gradients by grad_mults:
        # the same product, without copying the (up to 268 MB) stacked weight in every forward
        return scale_fwd(torch.baddbmm(b, h, W), s.out[l])

    def _act(self, h: torch.Tensor, grad: bool) -> torch.Tensor:
        if self.uu is None:
            return ACT_FN[self.act](h)
        if not grad:
            return ACT_FN[self.act](h).mul_(self.uu.act_out)
        from unit_scaling.scale import scale_bwd, scale_fwd

        return scale_fwd(ACT_FN[self.act](scale_bwd(h, self.uu.act_grad)), self.uu.act_out)

    def params(self) -> list[torch.Tensor]:
        return self.W + self.b

    def grad_mults(self, batch: int) -> list[float]:
        """Multipliers of the autograd gradients of ``params()`` (u-μP: weight/bias grads x batch^-1/2)."""
        if self.uu is None:
            return [1.0] * (2 * len(self.W))
        return [batch ** -pw for pw in self.uu.grad_w_power] * 2

    def mults(self) -> list[float]:
        return self.mult_W + self.mult_b


def batch_loss(net: Batched, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """Per-run mean cross-entropy; xb [R, B, 64], yb [R, B] -> [R] (u-μP: its loss's gradient scales)."""
    logits = net.forward(xb)
    if net.uu is None or not torch.is_grad_enabled():
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), yb, reduction="none").mean(1)
    from unit_scaling.scale import scale_bwd, scale_fwd

    # unit_scaling.functional.cross_entropy: logits' grad x V/sqrt(V-1), sum reduction, 1/B forward only
    logits = scale_bwd(logits, net.uu.logit_grad)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), yb, reduction="none").sum(1)
    return scale_fwd(ce, 1.0 / yb.shape[1])


class BatchedOptimizer:
    """SGD or Adam (torch.optim defaults: betas (0.9, 0.999), eps 1e-8) with a per-run global lr.

    Run r's parameter of layer ℓ gets lr_r x mult_ℓ. SGD: one in-place ``addcmul_`` per tensor.
    Adam: torch's fused CPU kernel (``torch._fused_adam_``, the one ``torch.optim.Adam(fused=True)``
    calls) on each run's slices, grouped by learning rate: one pass over p, g, m, v instead of ~7
    (the width-2048 runs hold 16 x 8.6e6 parameters; 0.36 s instead of 1.0 s per step here).
    """

    def __init__(self, net: Batched, lrs: torch.Tensor):
        self.net, self.t = net, 0
        ps, mults = net.params(), net.mults()
        self.lr = [(lrs.double() * mult).to(p.dtype).view(-1, *([1] * (p.dim() - 1))) for p, mult in zip(ps, mults)]
        if not net.adam:
            return
        self.m = [torch.zeros_like(p) for p in ps]
        self.v = [torch.zeros_like(p) for p in ps]
        self.groups: list[tuple[float, list[int], int]] = []  # (lr, tensor indices, run)
        for r, lr_r in enumerate(lrs.double().tolist()):
            by_mult: dict[float, list[int]] = {}
            for i, mult in enumerate(mults):
                by_mult.setdefault(mult, []).append(i)
            self.groups += [(lr_r * mult, idx, r) for mult, idx in by_mult.items()]

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor], grad_mults: list[float] | None = None) -> None:
        """One step with the gradients ``grads`` (of ``net.params()``) times ``grad_mults``."""
        self.t += 1
        ps = self.net.params()
        gm = grad_mults or [1.0] * len(ps)
        if not self.net.adam:
            for p, g, lr, c in zip(ps, grads, self.lr, gm):
                p.addcmul_(g, lr, value=-c)
            return
        for g, c in zip(grads, gm):
            if c != 1.0:
                g.mul_(c)
        step = torch.tensor(float(self.t))
        for lr, idx, r in self.groups:
            torch._fused_adam_([ps[i][r] for i in idx], [grads[i][r] for i in idx], [self.m[i][r] for i in idx],
                               [self.v[i][r] for i in idx], [], [step] * len(idx), lr=lr, beta1=0.9, beta2=0.999,
                               weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)


def step_check(param: str, act: str, width: int, depth: int, args: argparse.Namespace, data: tuple) -> float:
    """Max relative parameter difference after 2 steps: batched trainer vs the real modules + optimizer.

    In float64, so any difference above rounding (~1e-13) is a mismatch of the rules, not noise: in
    float32 Adam's first steps amplify rounding where a gradient entry is near eps.
    """
    x_tr, y_tr = data[0].double(), data[1]
    lr = 10 ** (sum(LR_RANGES[param]) / 2)
    model = init_model(param, act, width, depth, 0, args.mup_base).double()
    net = Batched.from_models([model], param, act, 1)
    bopt = BatchedOptimizer(net, torch.tensor([lr], dtype=torch.float64))
    opt = real_optimizer(param, model, lr)
    idx = torch.arange(32)
    for _ in range(2):
        opt.zero_grad()
        real_loss(param, model(x_tr[idx]), y_tr[idx]).backward()
        opt.step()
        bl = batch_loss(net, x_tr[idx][None], y_tr[idx][None]).sum()
        bopt.step(list(torch.autograd.grad(bl, net.params())), net.grad_mults(len(idx)))
    err = 0.0
    for l, m in enumerate(linears(model)):
        for a, ref in ((net.W[l][0].T, m.weight), (net.b[l][0, 0], m.bias)):
            err = max(err, float((a.detach() - ref.detach()).abs().max() / ref.detach().abs().max().clamp_min(1e-12)))
    return err


class Runs:
    """All (seed, lr) runs of one (parametrization, activation, architecture); run r = seed * G + lr index."""

    def __init__(self, param: str, act: str, width: int, depth: int, lrs: torch.Tensor, args: argparse.Namespace):
        self.S, self.G, self.batch = args.seeds, len(lrs), args.batch
        models = [init_model(param, act, width, depth, s, args.mup_base) for s in range(self.S)]
        self.net = Batched.from_models(models, param, act, repeat=self.G)
        del models
        self.opt = BatchedOptimizer(self.net, lrs.repeat(self.S))
        self.gens = [torch.Generator().manual_seed(10_000 + s) for s in range(self.S)]

    def train(self, steps: int, x_tr: torch.Tensor, y_tr: torch.Tensor) -> None:
        for _ in range(steps):
            idx = torch.stack([torch.randint(len(x_tr), (self.batch,), generator=g) for g in self.gens]).repeat_interleave(self.G, 0)
            loss = batch_loss(self.net, x_tr[idx], y_tr[idx])
            loss = torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss))  # diverged runs stop contributing
            self.opt.step(list(torch.autograd.grad(loss.sum(), self.net.params())), self.net.grad_mults(self.batch))

    @torch.no_grad()
    def evaluate(self, data: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """Seed x lr tables of the final full-train-set loss (inf if diverged) and the test accuracy."""
        x_tr, y_tr, x_te, y_te = data
        R = self.S * self.G
        tr_loss = batch_loss(self.net, x_tr.expand(R, -1, -1), y_tr.expand(R, -1))
        acc = (self.net.forward(x_te.expand(R, -1, -1)).argmax(-1) == y_te).float().mean(1)
        ok = torch.isfinite(tr_loss)
        return torch.where(ok, tr_loss, torch.full_like(tr_loss, math.inf)).view(self.S, self.G), torch.where(ok, acc, torch.zeros_like(acc)).view(self.S, self.G)


def train_config(param: str, act: str, width: int, depth: int, lrs: torch.Tensor, args: argparse.Namespace, data: tuple) -> dict[str, Any]:
    t0 = time.perf_counter()
    runs = Runs(param, act, width, depth, lrs, args)
    runs.train(args.steps, data[0], data[1])
    tr_loss, acc = runs.evaluate(data)
    return {
        "param": param, "act": act, "width": width, "depth": depth,
        "lrs": lrs.tolist(),
        "train_loss": tr_loss.tolist(), "test_acc": acc.tolist(),
        "seconds": time.perf_counter() - t0,
    }


def calibrate(params: list[str], archs: list[tuple[int, int]], args: argparse.Namespace, data: tuple) -> dict[str, Any]:
    """Time setup, 3 training steps (median, after one warm-up step) and the final evaluation of every
    architecture for one SGD and one Adam parametrization (tanh); extrapolate to the whole run."""
    kinds = {k: next((p for p in params if p.endswith(k)), None) for k in ("sgd", "adam")}
    for p in params:  # first-use costs (imports, torch_crit's analysis) out of the timings
        Runs(p, "tanh", *archs[0], torch.ones(1), args).train(1, data[0], data[1])
    cells: dict[str, dict[str, float]] = {}
    total = 0.0
    for (w, d) in archs:
        cell: dict[str, float] = {}
        for kind, p in kinds.items():
            if p is None:
                continue
            lrs = torch.logspace(*LR_RANGES[p], args.n_lr)
            t0 = time.perf_counter()
            runs = Runs(p, "tanh", w, d, lrs, args)
            t1 = time.perf_counter()
            runs.train(1, data[0], data[1])  # warm-up
            times = []
            for _ in range(3):
                t2 = time.perf_counter()
                runs.train(1, data[0], data[1])
                times.append(time.perf_counter() - t2)
            t3 = time.perf_counter()
            cell[f"setup_{kind}_s"], cell[f"step_{kind}_s"] = t1 - t0, sorted(times)[1]  # median: robust to a stall
            if "eval_s" not in cell:
                runs.evaluate(data)
                cell["eval_s"] = time.perf_counter() - t3
            del runs
        for p in params:
            kind = "adam" if p.endswith("adam") else "sgd"
            kind = kind if f"step_{kind}_s" in cell else next(k for k in ("sgd", "adam") if f"step_{k}_s" in cell)
            total += len(args.acts) * (cell[f"setup_{kind}_s"] + args.steps * cell[f"step_{kind}_s"] + cell["eval_s"])
        cells[f"{w}x{d}"] = cell
    return {"cells": cells, "estimated_total_s": total}


# --------------------------------------------------------------------------- reporting
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
                if not float(mean[i]) <= 0.9 * math.log(N_CLASSES):  # best loss within 10% of chance: nothing learned
                    untrained.append(f"{a[0]}x{a[1]}")
            small, large = archs[0], archs[-1]
            mean_large = torch.tensor(rs[large]["train_loss"]).mean(0)
            lr_opt = [best[a][0] for a in archs]
            entry[axis] = {
                "optimal_lr": {f"{a[0]}x{a[1]}": best[a][0] for a in archs},
                "optimal_loss": {f"{a[0]}x{a[1]}": best[a][1] for a in archs},
                "lr_spread": max(lr_opt) / min(lr_opt),
                "transfer_gap": float(mean_large[best[small][2]]) - best[large][1],
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
    if not acts:
        return None
    fig, axes = plt.subplots(1, len(acts), figsize=(5.2 * len(acts), 3.8), squeeze=False)
    styles = ("-", "--", ":", "-.")
    for ax, act in zip(axes[0], acts):
        for k, axis in enumerate(sweeps):
            for a in sweeps[axis]:
                r = next((r for r in rows if (r["param"], r["act"], r["width"], r["depth"]) == (param, act, *a)), None)
                if r is None:
                    continue
                mean = torch.tensor(r["train_loss"]).mean(0).clamp(max=10.0)
                ax.semilogx(r["lrs"], mean.tolist(), styles[k % len(styles)], marker="o", ms=3, label=f"{axis}: n={a[0]}, L={a[1]}")
        ax.set_title(f"{param}, {act}")
        ax.set_xlabel("global learning rate")
        ax.set_ylabel("final train loss (seed mean, clipped at 10)")
        ax.set_ylim(0, 3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return atomic_savefig(fig, out_dir / f"{name}_{param}.png", dpi=110)


def print_table(summary: dict[str, Any]) -> None:
    hdr = f"{'parametrization':15s} {'axis':12s} {'lr* per model (small -> large)':32s} {'best loss per model':22s} {'spread':>7s} {'gap':>7s}  flags"
    print(hdr + "\n" + "-" * len(hdr))
    for key, entry in summary.items():
        for axis, e in entry.items():
            lrs_s = " ".join(f"{v:.2g}" for v in e["optimal_lr"].values())
            loss_s = " ".join(f"{v:.3f}" for v in e["optimal_loss"].values())
            flags = [f"edge:{a}" for a in e["optimum_on_grid_edge"]] + [f"untrained:{a}" for a in e["untrained"]]
            print(f"{key:15s} {axis:12s} {lrs_s:32s} {loss_s:22s} {e['lr_spread']:7.1f} {e['transfer_gap']:7.3f}  {','.join(flags) or '-'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="widths {16,64} at L=3, depths {3,8} at n=32, 5 lrs, 1 seed, 20 steps")
    ap.add_argument("--grid", choices=["axes", "full"], default="axes",
                    help="axes (default): width {128,512,2048} at L=4 and depth {4,16,48} at n=128; full: the product")
    ap.add_argument("--estimate", action="store_true", help="calibrate, print the estimated total and exit")
    ap.add_argument("--params", nargs="*", default=PARAMS, choices=PARAMS)
    ap.add_argument("--acts", nargs="*", default=["tanh", "relu"], choices=list(ACTS))
    ap.add_argument("--n-lr", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--mup-base", type=int, default=None, help="mup base width (default: smallest width)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: with 2, every small op here waited ~ms for the second thread, "
                         "0.25 s instead of 0.007 s per width-128 step; only the width-2048 cell gains from 2)")
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
        sweeps = {"width": [(128, 4), (512, 4), (2048, 4)], "depth": [(128, 4), (128, 16), (128, 48)]}
        args.n_lr, args.seeds, args.steps = args.n_lr or 8, args.seeds or 2, args.steps or 40
    widths = sorted({a[0] for s in sweeps.values() for a in s})
    args.mup_base = args.mup_base or widths[0]
    archs = sorted({a for s in sweeps.values() for a in s}, key=lambda a: (a[0] * a[0] * a[1], a))
    notes: list[str] = []
    params = list(dict.fromkeys(args.params))
    try:
        import mup  # noqa: F401
    except ImportError:
        notes.append("mup not installed: mup-sgd/mup-adam skipped (`pip install --no-deps mup`)")
        params = [p for p in params if not p.startswith("mup")]
    uu_missing = unit_scaling_available()
    if uu_missing is not None and any(p.startswith("uu") for p in params):
        notes.append(f"unit-scaling (u-μP) not importable ({uu_missing}): uu-sgd/uu-adam skipped "
                     "(`pip install --no-deps unit-scaling==0.3.5 einops docstring-parser`)")
        params = [p for p in params if not p.startswith("uu")]
    if any(p.startswith("uu") for p in params):
        notes.append("u-μP: hidden blocks in uu.DepthSequential (lr x depth^-1/2, a rule derived for residual "
                     "stacks; this MLP has no residual stream); tanh/ReLU unit-scaled with its scale_elementwise "
                     "(output/std: for ReLU the pre-activations' second moment grows 1.47x per layer, so deep ReLU "
                     "nets start with exploded logits)")
    out_dir = args.out or RESULTS
    grid = "quick" if args.quick else args.grid
    name = "lr_transfer" + ("_quick" if args.quick else "")
    data = load_digits_split()
    t_start = time.perf_counter()

    est = calibrate(params, archs, args, data)
    print(f"lr_transfer ({grid} grid): {len(params)} parametrizations x {len(args.acts)} activations x {len(archs)} "
          f"architectures; {args.n_lr} lrs x {args.seeds} seeds batched, {args.steps} steps, batch {args.batch}, "
          f"{args.threads} threads")
    for cell, c in est["cells"].items():
        print(f"  calibration {cell:8s} " + ", ".join(f"{k} {v:.3f}" for k, v in c.items()))
    print(f"estimated total: {est['estimated_total_s'] / 60:.1f} min ({est['estimated_total_s']:.0f} s; + calibration "
          f"{time.perf_counter() - t_start:.0f} s, step checks and plots)", flush=True)
    if args.estimate:
        return 0

    checks: dict[str, float] = {}
    rows: list[dict[str, Any]] = []

    def save() -> None:
        payload = {
            "benchmark": name, "machine": machine(), "quick": args.quick, "grid": grid,
            "config": {"sweeps": {k: [list(a) for a in v] for k, v in sweeps.items()}, "params": params, "acts": args.acts,
                       "n_lr": args.n_lr, "seeds": args.seeds, "steps": args.steps, "batch": args.batch,
                       "mup_base": args.mup_base, "lr_ranges_log10": {p: LR_RANGES[p] for p in params},
                       "loss": "cross-entropy, batch mean", "data": "sklearn digits, 80/20 split (seed 0), standardised"},
            "notes": notes, "calibration": est, "step_check": checks, "rows": rows, "summary": summarize(rows, sweeps),
            "seconds": time.perf_counter() - t_start,
        }
        atomic_write_json(out_dir / f"{name}.json", payload)

    for param in params:
        lrs = torch.logspace(*LR_RANGES[param], args.n_lr)
        for act in args.acts:
            checks[f"{param}/{act}"] = step_check(param, act, archs[0][0], archs[0][1], args, data)
            for (w, d) in archs:
                rows.append(train_config(param, act, w, d, lrs, args, data))
                print(f"  {param:9s} {act:5s} n={w:<5d} L={d:<3d} {rows[-1]['seconds']:6.1f} s", flush=True)
                save()
    summary = summarize(rows, sweeps)
    print(f"\nlearning-rate transfer on digits ({grid} grid; {args.n_lr} lrs, {args.seeds} seeds, {args.steps} steps, "
          f"batch {args.batch}; CPU, {args.threads} threads)")
    print("batched trainer vs real modules + optimizer (max rel. diff after 2 steps): "
          + ", ".join(f"{k}={v:.1e}" for k, v in checks.items()))
    print_table(summary)
    step = (LR_RANGES[params[0]][1] - LR_RANGES[params[0]][0]) / (args.n_lr - 1) if params else 0.0
    print(f"spread = max/min optimal lr over the sweep (1 = perfect transfer; grid step {10 ** step:.2f}x); gap = train-loss "
          "excess of the largest model at the smallest model's optimal lr; edge = optimum on the grid boundary; "
          "untrained = best loss > 0.9 ln 10 (no learning at any lr: its lr* is meaningless).")
    for n in notes:
        print("note:", n)
    save()
    for param in params:
        p = plot(rows, param, out_dir, name, sweeps)
        if p:
            print(f"wrote {p}")
    total = time.perf_counter() - t_start
    print(f"wrote {out_dir / f'{name}.json'} ({total:.0f} s; estimated {est['estimated_total_s']:.0f} s + calibration)")
    return 0


def keep_freed_memory() -> bool:
    """glibc: serve large blocks from the heap and never trim it, so the ~0.3 GB gradient and
    temporary buffers of every width-2048 step reuse memory instead of being page-faulted anew
    (page faults are slow in this VM: the weight-gradient bmm took 0.56 s with fresh memory, 0.14 s
    with reused). Process-wide, so only the script entry point calls it, not ``main`` (tests)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc
        return False


if __name__ == "__main__":
    keep_freed_memory()
    sys.exit(main())
