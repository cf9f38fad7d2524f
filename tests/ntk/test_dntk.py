"""Tests of torch_crit.empirical_dntk / ntk_velocity (the dNTK (11.8) and the NTK update (11.10)).

Exactness: against the brute-force float64 references of test_dntk_reference.py (double-backward
Hessian-vector products contracted in plain loops), relative error ≤ 1e-9, for both methods.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from _references import dntk_reference, jacobian_reference, ntk_reference
from torch_crit import _ops
from torch_crit.ntk.dntk import DNTKMemoryError, SecondDerivativeError, empirical_dntk, ntk_velocity

F64 = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# ----------------------------------------------------------------------------- model zoo


class ResidualMLP(nn.Module):
    """Residual MLP with a LayerNorm (generic path) and a block called twice (shared weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 5)
        self.block = nn.Linear(5, 5)
        self.norm = nn.LayerNorm(5)
        self.out = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = h + self.block(torch.tanh(self.norm(h)))
        h = h + 0.5 * self.block(torch.nn.functional.gelu(h))
        return self.out(h)


def tanh_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))


def gelu_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 5), nn.GELU(), nn.Linear(5, 4), nn.GELU(), nn.Linear(4, 1))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(),
        nn.Conv2d(2, 2, 2, stride=2, dilation=1), nn.Tanh(),
        nn.Flatten(), nn.Linear(2 * 2 * 2, 2),
    )


def seq_mlp() -> nn.Module:  # Linear on [N, T, d] inputs: per-example gradients sum over T
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1), nn.Flatten())


class SharedFirst(nn.Module):
    """A Linear applied to the input and again to its own output (shared weights from call 0: the
    cross terms of the low-rank injection), a bias-free Linear, and a head whose weight is frozen
    (its bias alone is trained: a bias-only injection)."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(3, 3)
        self.mid = nn.Linear(3, 4, bias=False)
        self.head = nn.Linear(4, 2)
        self.head.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l(x))
        h = torch.tanh(self.l(h))
        return self.head(nn.functional.gelu(self.mid(h)))


def conv_ln_mlp() -> nn.Module:  # Conv (dense tangents), Linear (low-rank), LayerNorm (generic) in one jvp
    return nn.Sequential(
        nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(),
        nn.Linear(9, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2),
    )


ZOO = {
    "tanh_mlp": (tanh_mlp, (4, 3)),
    "gelu_mlp": (gelu_mlp, (4, 3)),
    "cnn": (cnn, (2, 1, 4, 4)),
    "residual_ln_shared": (ResidualMLP, (2, 3)),
    "linear_on_sequences": (seq_mlp, (3, 2, 3)),
    "shared_first_bias_only": (SharedFirst, (3, 3)),
    "conv_ln_mlp": (conv_ln_mlp, (3, 2, 5)),
}


def _make(name: str, seed: int = 0):
    torch.manual_seed(seed)
    ctor, xshape = ZOO[name]
    model = ctor().double()
    x = torch.randn(*xshape, dtype=F64)
    lam = {n: 0.3 + 0.15 * j for j, (n, _) in enumerate(model.named_parameters())}
    return model, x, lam


_REF_CACHE: dict = {}


def _reference(name: str):
    if name not in _REF_CACHE:
        model, x, lam = _make(name)
        _REF_CACHE[name] = dntk_reference(model, x, lam)
    return _REF_CACHE[name]


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("method", ["generic", "structured"])
@pytest.mark.parametrize("name", list(ZOO))
def test_exact_against_bruteforce(name: str, method: str):
    model, x, lam = _make(name)
    ref = _reference(name)
    got = empirical_dntk(model, x, learning_rates=lam, method=method, block_size=3)
    assert got.shape == ref.shape and got.dtype == F64
    assert rel_err(got, ref) <= 1e-9
    # symmetric in the last two (sample, output) index pairs, (11.8)
    torch.testing.assert_close(got, got.permute(0, 2, 1, 3, 5, 4), rtol=0, atol=1e-12 * float(ref.abs().max()))
    # diagonal_outputs = the i0 = i1 = i2 entries
    k = ref.shape[-1]
    i = torch.arange(k)
    # block_size 3: blocks of directions that span two output indices i2 (output-major order)
    diag = empirical_dntk(model, x, learning_rates=lam, method=method, output="diagonal_outputs", block_size=3)
    assert diag.shape == ref.shape[:3] + (k,)
    assert rel_err(diag, ref[..., i, i, i]) <= 1e-9


def test_structured_with_param_groups_against_bruteforce():
    """λ from torch_crit.param_groups (per-layer λ_b, λ_W/n_{ℓ-1}, (9.94)): the rates enter the
    low-rank injection (ε, seeds) and the contraction; exact against the reference."""
    import torch_crit

    model, x, _ = _make("tanh_mlp", seed=4)
    groups = torch_crit.param_groups(model, 0.7, 1.3)
    names = {id(p): n for n, p in model.named_parameters()}
    lam = {names[id(p)]: g["lr"] for g in groups for p in g["params"]}
    assert len(set(lam.values())) > 2
    ref = dntk_reference(model, x, lam)
    got = empirical_dntk(model, x, learning_rates=groups, method="structured", block_size=5)
    assert rel_err(got, ref) <= 1e-9


def test_structured_uses_compiled_kernel_and_matches_torch_backend():
    model, x, lam = _make("tanh_mlp")
    _ops.reset_backend_counts()
    a = empirical_dntk(model, x, learning_rates=lam, method="structured", backend="ext")
    assert _ops.backend_counts().get("cpu", 0) >= 1, _ops.backend_counts()
    b = empirical_dntk(model, x, learning_rates=lam, method="structured", backend="torch")
    assert rel_err(a, b) <= 1e-12
    assert rel_err(a, _reference("tanh_mlp")) <= 1e-9


def test_float32_default_and_dtype_copy():
    model, x, lam = _make("tanh_mlp")
    m32 = copy.deepcopy(model).float()
    before = {n: p.clone() for n, p in m32.named_parameters()}
    m32.train()
    got = empirical_dntk(m32, x.float(), learning_rates=lam)  # auto → structured, float32
    assert got.dtype == torch.float32
    assert rel_err(got.double(), _reference("tanh_mlp")) <= 1e-5
    got64 = empirical_dntk(m32, x, learning_rates=lam, dtype=F64)  # cast copy
    assert got64.dtype == F64
    assert m32.training and all(p.dtype == torch.float32 for p in m32.parameters())
    assert all(torch.equal(before[n], p) for n, p in m32.named_parameters())


def test_learning_rate_conventions():
    """λ enters twice (11.8): a global λ scales the dNTK by λ²; param groups == dict."""
    model, x, lam = _make("gelu_mlp")
    base = empirical_dntk(model, x)
    torch.testing.assert_close(empirical_dntk(model, x, learning_rates=0.5), 0.25 * base, rtol=1e-12, atol=0)
    groups = [{"params": [p], "lr": lam[n]} for n, p in model.named_parameters()]
    torch.testing.assert_close(empirical_dntk(model, x, learning_rates=groups), empirical_dntk(model, x, learning_rates=lam), rtol=1e-12, atol=0)
    # frozen parameters do not contribute (= λ 0)
    frozen = copy.deepcopy(model)
    frozen[0].weight.requires_grad_(False)
    lam0 = dict(lam)
    lam0["0.weight"] = 0.0
    torch.testing.assert_close(empirical_dntk(frozen, x, learning_rates=lam), empirical_dntk(model, x, learning_rates=lam0), rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------- the book's facts


@pytest.mark.parametrize("layer", [nn.Linear(3, 4), nn.Conv1d(2, 3, 3, padding=1)])
def test_first_layer_dntk_vanishes(layer: nn.Module):
    """(11.26): z^(1) is linear in its parameters, so the first-layer dNTK is exactly zero."""
    layer = layer.double()
    x = torch.randn(3, 3, dtype=F64) if isinstance(layer, nn.Linear) else torch.randn(3, 2, 4, dtype=F64)
    for method in ("generic", "structured"):
        assert empirical_dntk(layer, x, method=method).abs().max() == 0
    # one nonlinearity later it no longer vanishes
    deeper = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    assert empirical_dntk(deeper, torch.randn(3, 3, dtype=F64)).abs().max() > 1e-3


def test_relu_is_the_exact_autograd_answer_away_from_kinks():
    """ReLU: σ'' = 0 a.e. but the dNTK is not zero (products of weights across layers); it is
    the exact derivative of the NTK wherever no preactivation crosses a kink."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    x = torch.randn(3, 3, dtype=F64)
    ref = dntk_reference(model, x)
    got = empirical_dntk(model, x, method="structured")
    assert float(ref.abs().max()) > 1e-3
    assert rel_err(got, ref) <= 1e-9
    # central difference of H along u2 = ∇z[d2, i2] (tiny step: no kink is crossed)
    J = jacobian_reference(model, x)
    d2, i2, h = 2, 1, 1e-6
    u2 = J[d2, i2]

    def shifted(sign: float) -> torch.Tensor:
        m = copy.deepcopy(model)
        with torch.no_grad():
            off = 0
            for p in m.parameters():
                p.add_(sign * h * u2[off:off + p.numel()].reshape(p.shape))
                off += p.numel()
        return ntk_reference(m, x)

    fd = (shifted(1.0) - shifted(-1.0)) / (2 * h)
    pred = got[:, :, d2, :, :, i2] + got[:, :, d2, :, :, i2].permute(1, 0, 3, 2)
    # piecewise-polynomial NTK: the central difference is exact up to round-off (~1e-16/h)
    torch.testing.assert_close(fd, pred, rtol=1e-7, atol=1e-8 * float(pred.abs().max()))


# ----------------------------------------------------------------------------- velocity


def _sgd_step_ntk_change(model: nn.Module, x_probe, x_train, y, lam, eta: float) -> torch.Tensor:
    """Measured H(t=1) − H(t=0) after one real torch.optim.SGD step on ½Σ(z−y)² with lr_μ = η λ_μ."""
    m = copy.deepcopy(model)
    h0 = ntk_reference(m, x_probe, lam=lam)
    opt = torch.optim.SGD([{"params": [p], "lr": eta * lam[n]} for n, p in m.named_parameters()], lr=eta)
    loss = 0.5 * ((m(x_train).reshape(len(y), -1) - y) ** 2).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return ntk_reference(m, x_probe, lam=lam) - h0


@pytest.mark.parametrize("method", ["generic", "structured"])
def test_velocity_against_full_dntk_and_sgd_step(method: str):
    model, x, lam = _make("tanh_mlp", seed=5)
    torch.manual_seed(6)
    x_train = torch.randn(3, 3, dtype=F64)
    y = torch.randn(3, 2, dtype=F64)
    eps = model(x_train).detach() - y  # ε = dL/dz for L = ½Σ(z−y)², (11.5)
    eta = 0.3
    v = ntk_velocity(model, x, x_train, eps, learning_rates=lam, eta=eta, method=method)
    assert v.shape == (4, 4, 2, 2)
    # (11.10) contracted from the brute-force dNTK over probe ∪ train
    N = x.shape[0]
    dH = dntk_reference(model, torch.cat([x, x_train]), lam)[:N, :N, N:]  # [d1, d2, a, i1, i2, j]
    pred = -eta * (torch.einsum("pqaijl,al->pqij", dH, eps) + torch.einsum("qpajil,al->pqij", dH, eps))
    assert rel_err(v, pred) <= 1e-9
    # a real SGD step: H(t=1) − H(t=0) = velocity + O(η²), so the relative error halves with η
    errs = []
    for e in (1e-3, 5e-4):
        dv = ntk_velocity(model, x, x_train, eps, learning_rates=lam, eta=e, method=method)
        errs.append(rel_err(_sgd_step_ntk_change(model, x, x_train, y, lam, e), dv))
    assert errs[0] < 1e-2 and 1.7 < errs[0] / errs[1] < 2.3, errs  # relative error O(η)


def test_velocity_structured_equals_generic_on_cnn_and_residual():
    for name in ("cnn", "residual_ln_shared"):
        model, x, lam = _make(name, seed=2)
        xt = torch.randn(2, *x.shape[1:], dtype=F64)
        eps = torch.randn(2, 2, dtype=F64)
        a = ntk_velocity(model, x, xt, eps, learning_rates=lam, method="generic")
        b = ntk_velocity(model, x, xt, eps, learning_rates=lam, method="structured")
        assert rel_err(b, a) <= 1e-10


# ----------------------------------------------------------------------------- ensembles vs theory


def _ensemble_velocity(M: int, n0: int, n: int, L: int, nL: int, x: torch.Tensor, gen: torch.Generator):
    """Per network (C_b=0, C_W=1, λ_b=1, λ_W/n_{l-1}) the one-step NTK velocity at one input
    for L = ½|z|² (ε = z), η = 1 — vmapped over M stacked networks with torch.func."""
    from torch.func import jacrev, jvp, vjp, vmap

    dims = [n0] + [n] * (L - 1) + [nL]
    P = {}
    for l in range(L):
        P[f"W{l}"] = torch.randn(M, dims[l + 1], dims[l], generator=gen, dtype=F64) / math.sqrt(dims[l])
        P[f"b{l}"] = torch.zeros(M, dims[l + 1], dtype=F64)
    lam = {f"W{l}": 1.0 / dims[l] for l in range(L)} | {f"b{l}": 1.0 for l in range(L)}

    def f(p, xx):
        h = xx
        for l in range(L):
            h = p[f"W{l}"] @ h + p[f"b{l}"]
            if l < L - 1:
                h = torch.tanh(h)
        return h

    def velocity(p):
        z, pull = vjp(lambda q: f(q, x), p)
        (g,) = pull(z.detach())
        step = {key: -lam[key] * g[key] for key in p}

        def H(q):
            J = jacrev(lambda qq: f(qq, x))(q)
            return sum(lam[key] * J[key].flatten(1) @ J[key].flatten(1).T for key in q)

        return jvp(H, (p,), (step,))[1]

    return P, lam, vmap(velocity)(P)


@pytest.mark.slow
def test_one_step_ntk_change_matches_P_Q_theory():
    """THEORY §12 prediction 25 (from (11.10), (11.45)): for one input, targets 0, MSE, one GD step,
    E[ΔH_ii] = −(2η/n_{L−1}) [P + (n_L+1) Q] with P, Q of (11.55)–(11.56) at the actual widths.
    Checked at two widths (the 1/n law) and two depths (growth with depth), each within 4 standard
    errors of the ensemble mean (SE measured from the ensemble, ≈ 3–4 %). Our ntk_velocity is tied
    to the vmapped torch.func velocity used for the ensemble by an exact comparison on 3 networks."""
    from torch_crit.theory.finite_width import dntk_statistics

    gen = torch.Generator().manual_seed(11)
    n0, nL = 4, 2
    x = torch.randn(n0, dtype=F64, generator=gen)
    x = x / x.norm() * math.sqrt(n0)  # x²/n0 = 1 → K^(1) = 1
    means = {}
    for n, L, M in [(24, 3, 1200), (48, 3, 1200), (24, 5, 800)]:
        P, lam, V = _ensemble_velocity(M, n0, n, L, nL, x, gen)
        d = torch.diagonal(V, dim1=1, dim2=2).mean(1)  # per network, averaged over the n_L outputs
        mean, se = float(d.mean()), float(d.std() / math.sqrt(M))
        th = dntk_statistics("tanh", 0.0, 1.0, 1.0, 1.0, x[None], L, widths=[n] * (L - 1))
        pred = float(-(2.0 / n) * (th.P[-1, 0] + (nL + 1) * th.Q[-1, 0]))
        assert abs(mean - pred) < 4 * se, (n, L, mean, se, pred)
        means[n, L] = mean
        if (n, L) == (24, 3):  # tie the ensemble implementation to ntk_velocity, exactly
            for j in range(3):
                net = nn.Sequential(*[m for l in range(L) for m in ([nn.Linear(1, 1)] if l == L - 1 else [nn.Linear(1, 1), nn.Tanh()])])
                dims = [n0] + [n] * (L - 1) + [nL]
                lin = [m for m in net if isinstance(m, nn.Linear)]
                for l, mod in enumerate(lin):
                    mod.weight = nn.Parameter(P[f"W{l}"][j].clone())
                    mod.bias = nn.Parameter(P[f"b{l}"][j].clone())
                lr = {f"{2 * l}.weight": 1.0 / dims[l] for l in range(L)} | {f"{2 * l}.bias": 1.0 for l in range(L)}
                z = net(x[None]).detach()
                v = ntk_velocity(net, x[None], x[None], z, learning_rates=lr)
                assert rel_err(v[0, 0], V[j]) <= 1e-10
    # 1/n: halving the width doubles the mean change; deeper → larger
    assert 1.6 < means[24, 3] / means[48, 3] < 2.5
    assert means[24, 5] > 1.5 * means[24, 3]


# ----------------------------------------------------------------------------- bad input


class _NoJvp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (1 - torch.tanh(x) ** 2)


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 1)

    def forward(self, x):
        return self.b(_NoJvp.apply(self.a(x)))


@pytest.mark.parametrize("method", ["generic", "structured"])
def test_no_second_derivatives_is_a_clear_error(method: str):
    with pytest.raises(SecondDerivativeError, match="second derivatives"):
        empirical_dntk(_Custom().double(), torch.randn(2, 3, dtype=F64), method=method)


def test_result_too_large_is_a_clear_error(monkeypatch):
    import torch_crit.ntk.dntk as dntk

    monkeypatch.setattr(dntk, "available_memory", lambda device: 1_000)
    model, x, _ = _make("tanh_mlp")
    with pytest.raises(DNTKMemoryError, match="diagonal_outputs"):
        empirical_dntk(model, x)
    # the velocity never forms the N³ tensor
    assert ntk_velocity(model, x, x, torch.ones(4, 2, dtype=F64)).shape == (4, 4, 2, 2)


def test_bad_options_and_shapes():
    model, x, _ = _make("tanh_mlp")
    with pytest.raises(ValueError, match="output"):
        empirical_dntk(model, x, output="trace")
    with pytest.raises(ValueError, match="method"):
        empirical_dntk(model, x, method="fast")
    with pytest.raises(ValueError, match="block_size"):
        empirical_dntk(model, x, block_size=0)
    with pytest.raises(ValueError, match="error has shape"):
        ntk_velocity(model, x, x, torch.ones(4, 3, dtype=F64))
    with pytest.raises(ValueError, match="structured"):
        empirical_dntk(nn.Sequential(nn.LayerNorm(3)).double(), x, method="structured")
    with pytest.raises(ValueError, match="dtype"):
        empirical_dntk(model, x.float())


def test_memory_estimate_formula():
    from torch_crit.ntk.dntk import estimate_dntk_memory

    est = estimate_dntk_memory(10, 2, 1000, itemsize=8)
    assert est["result"] == 10**3 * 2**3 * 8
    assert est["jacobian"] == 10 * 2 * 1000 * 8
    assert estimate_dntk_memory(10, 2, 1000, output="diagonal_outputs", itemsize=8)["result"] == 10**3 * 2 * 8
    assert est["total"] == est["result"] + est["jacobian"] + est["per_block"]


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4)
        self.c = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.c(torch.tanh(self.a(x) + scale * self.b(y)))


def test_tuple_and_dict_inputs():
    torch.manual_seed(4)
    model = _TwoInputs().double()
    x, y = torch.randn(3, 3, dtype=F64), torch.randn(3, 2, dtype=F64)

    class Packed(nn.Module):  # the same network as a one-input model, for the reference
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, xy: torch.Tensor) -> torch.Tensor:
            return self.inner(xy[:, :3], xy[:, 3:], 0.5)

    ref = dntk_reference(Packed(model), torch.cat([x, y], 1))
    for method in ("generic", "structured"):
        assert rel_err(empirical_dntk(model, (x, y, 0.5), method=method), ref) <= 1e-9
        assert rel_err(empirical_dntk(model, {"x": x, "y": y, "scale": 0.5}, method=method), ref) <= 1e-9
