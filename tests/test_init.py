"""Tests for torch_crit.init_ (critical initialization in place)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torch_crit
from torch_crit.init import UntouchedParameterWarning, init_
from torch_crit.theory import (
    NoCriticalPointError,
    critical_point,
    get_activation,
    kernel_recursion,
    single_input_recursions,
)


class Atan(nn.Module):
    """A user activation (parameter-free module, read as a callable): K*=0 class, critical (0, 1)."""

    def forward(self, z):
        return torch.atan(z)


def mlp(act: type[nn.Module] | None, n0: int, n: int, depth: int, n_out: int | None = None) -> nn.Sequential:
    mods: list[nn.Module] = [nn.Linear(n0, n)]
    for l in range(2, depth + 1):
        if act is not None:
            mods.append(act())
        mods.append(nn.Linear(n, n if (l < depth or n_out is None) else n_out))
    return nn.Sequential(*mods)


def layer_kernels(net: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """[depth, N]: (1/n_l) Σ_i z_{i;α}² after every Linear."""
    out = []
    h = x
    with torch.no_grad():
        for m in net:
            h = m(h)
            if isinstance(m, nn.Linear):
                out.append(h.pow(2).mean(dim=1))
    return torch.stack(out)


# --------------------------------------------------------------------------- Monte Carlo: kernels
DEPTH, WIDTH, N0, SEEDS = 64, 512, 16, 5
CHECK_LAYERS = [1, 2, 4, 8, 16, 32, 64]


@pytest.mark.slow
@pytest.mark.parametrize("act_cls", [nn.ReLU, nn.Tanh, nn.GELU, Atan], ids=["relu", "tanh", "gelu", "user-atan"])
def test_deep_mlp_kernel_follows_theory_and_default_init_does_not(act_cls, one_thread):
    """Depth-64, width-512 MLP: the measured layer kernel matches kernel_recursion at criticality.

    Measured: M[l, α] = mean over SEEDS networks of (1/n) Σ_i z_{i;α}^(l)², 2 inputs.
    Predicted: K^(l) (4.118) + G{1}^(l)/n (NLO metric (5.110); zero for ReLU, where E[z²] = K^(1)
    exactly at any width, THEORY.md §12 item 9).
    Tolerance: 4 standard errors + K (l/n)². The standard error is the larger of the empirical one
    (spread over seeds / √SEEDS) and the theory's, Var[(1/n)Σz²] = V/n + 2(K² + V/n)/n (THEORY.md §4.1,
    V from (5.109)); (l/n)² K bounds the O(1/n²) remainder (normalised vertex V/(nK²) = O(l/n)).
    PyTorch's default init (weight var 1/(3 n), χ < 1) is asserted to miss by > 5× at l = 64 and by
    more than 5 tolerances at some checked layer.
    """
    torch.manual_seed(1234)
    net = mlp(act_cls, N0, WIDTH, DEPTH)
    x = torch.randn(2, N0)
    x = x / x.pow(2).mean(dim=1, keepdim=True).sqrt() * torch.tensor([[0.7], [1.6]])
    ms = []
    report = None
    for s in range(SEEDS):
        report = init_(net, generator=torch.Generator().manual_seed(100 + s))
        ms.append(layer_kernels(net, x).double())
    ms = torch.stack(ms)  # [S, L, N]
    rec = report.layers[1]
    act = get_activation(act_cls())
    assert rec.activation == act.key and len({(l.C_b, l.C_W) for l in report.layers}) == 1
    C_b, C_W = rec.C_b, rec.C_W
    K = torch.diagonal(kernel_recursion(act, C_b, C_W, x.double(), DEPTH), dim1=1, dim2=2)  # [L, N]
    th = single_input_recursions(act, C_b, C_W, x.double(), DEPTH)
    pred = K + th.G1 / WIDTH
    se_theory = ((th.V / WIDTH + 2 * (K**2 + th.V / WIDTH) / WIDTH) / SEEDS).sqrt()
    se_emp = ms.std(dim=0) / math.sqrt(SEEDS)
    mean = ms.mean(dim=0)
    tols = []
    for l in CHECK_LAYERS:
        tol = 4 * torch.maximum(se_theory[l - 1], se_emp[l - 1]) + K[l - 1] * (l / WIDTH) ** 2
        tols.append(tol)
        err = (mean[l - 1] - pred[l - 1]).abs()
        assert bool((err <= tol).all()), (l, mean[l - 1].tolist(), pred[l - 1].tolist(), tol.tolist())
    # PyTorch's default initialization (kaiming_uniform(a=√5): C_W = 1/3): the deep kernel collapses
    torch.manual_seed(500)
    for m in net:
        if isinstance(m, nn.Linear):
            m.reset_parameters()
    dflt = layer_kernels(net, x).double()
    assert bool((dflt[-1] < pred[-1] / 5).all()), (dflt[-1].tolist(), pred[-1].tolist())
    miss = max(float(((dflt[l - 1] - pred[l - 1]).abs() / t).min()) for l, t in zip(CHECK_LAYERS, tols))
    assert miss > 5, miss


@pytest.mark.slow
def test_residual_mlp_at_gamma_keeps_the_kernel_and_plain_skip_grows_by_at_most_e(one_thread):
    """ReLU residual MLPs, width 256, B = 16 blocks, 12 seeds.

    γ = 0.6: branch at C_W(γ) = 2(1-γ²) (B.20) ⇒ K^(l+1) = γ²K + C_W(γ) K/2 = K (B.11).
    γ = 1 (x + f(x)): unsatisfiable (B.21); the 1/B branch rule gives E[K_out] = (1+1/B)^B K_in
    exactly in expectation (z is symmetric, so E[relu(z)²] = E[z²]/2 at any width).
    Tolerance: 4 empirical standard errors + K·B/n (the O(L/n) corrections of residual nets).
    """
    B, n, S = 16, 256, 12

    class Res(nn.Module):
        def __init__(self, gamma):
            super().__init__()
            self.inp = nn.Linear(8, n)
            self.blocks = nn.ModuleList(nn.Linear(n, n) for _ in range(B))
            self.gamma = gamma

        def forward(self, x):
            h = self.inp(x)
            out = [h]
            for b in self.blocks:
                h = h + b(F.relu(h)) if self.gamma == 1.0 else self.gamma * h + b(F.relu(h))
                out.append(h)
            return torch.stack(out)

    x = torch.randn(3, 8)
    for gamma, ratio in ((0.6, 1.0), (1.0, (1 + 1 / B) ** B)):
        net = Res(gamma)
        ks = []
        for s in range(S):
            rep = init_(net, generator=torch.Generator().manual_seed(s))
            with torch.no_grad():
                z = net(x)
            ks.append((z[-1].pow(2).mean(-1) / z[0].pow(2).mean(-1)).double())
        ks = torch.stack(ks)
        se = ks.std(0) / math.sqrt(S)
        assert bool(((ks.mean(0) - ratio).abs() <= 4 * se + ratio * B / n).all()), (gamma, ks.mean(0), ratio, se)
        blk = rep.layer("blocks.0")
        if gamma < 1:
            assert blk.C_W == pytest.approx(2 * (1 - gamma**2)) and blk.gamma == pytest.approx(gamma)
        else:
            assert blk.C_W == pytest.approx(2 / B) and "unsatisfiable" in " ".join(blk.notes)
            assert any("γ=1" in n_ for n_ in rep.notes)


# ------------------------------------------------------------------ drawn variances (chi-square)
def sample_var_ok(t: torch.Tensor, var: float, mean_zero: bool = True) -> bool:
    """|s²/σ² - 1| < 5 sqrt(2/N): the χ²_N sampling spread of a Gaussian sample variance."""
    t = t.detach().double().flatten()
    s2 = t.pow(2).mean() if mean_zero else t.var()
    return abs(float(s2) / var - 1) < 5 * math.sqrt(2 / t.numel())


def test_conv_net_with_groups_draws_the_critical_variances():
    net = nn.Sequential(nn.Conv2d(16, 128, 3, padding=1), nn.GELU(), nn.Conv2d(128, 128, 3, groups=4),
                        nn.GELU(), nn.Flatten())
    rep = init_(net, generator=torch.Generator().manual_seed(0))
    cp = critical_point("gelu")
    c0, c2 = net[0], net[2]
    assert rep.layer("2").fan_in == (128 // 4) * 9
    assert sample_var_ok(c0.weight, cp.C_W / (16 * 9))
    assert sample_var_ok(c2.weight, cp.C_W / (32 * 9))
    assert sample_var_ok(torch.cat([c0.bias, c2.bias]), cp.C_b)
    assert rep.layer("0").C_b == pytest.approx(0.17292239, rel=1e-6)
    assert rep.layer("0").C_W == pytest.approx(1.98305826, rel=1e-6)
    assert rep.layer("0").universality_class == "HALF_STABLE"


def test_functional_activations_via_fx_set_each_layers_constants():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(64, 2048), nn.Linear(2048, 2048), nn.Linear(2048, 4)

        def forward(self, x):
            return self.c(torch.tanh(self.b(F.relu(self.a(x)))))

    net = Net()
    rep = init_(net, generator=torch.Generator().manual_seed(3))
    # a: first layer, governed by the activation after it (relu): (0, 2); b fed by relu: (0, 2);
    # c (readout) fed by tanh: (0, 1)
    assert [(l.name, l.activation, l.C_b, l.C_W) for l in rep.layers] == [
        ("a", "relu", 0.0, 2.0), ("b", "relu", 0.0, 2.0), ("c", "tanh", 0.0, 1.0)]
    assert sample_var_ok(net.a.weight, 2.0 / 64) and sample_var_ok(net.b.weight, 2.0 / 2048)
    assert sample_var_ok(net.c.weight, 1.0 / 2048)
    assert float(net.b.bias.detach().abs().max()) == 0.0
    assert "relu" in str(rep) and "C_W" in str(rep)


def test_transformer_pieces_embedding_norm_attention_and_tied_weights():
    class LM(nn.Module):
        def __init__(self, V=300, d=64):
            super().__init__()
            self.emb = nn.Embedding(V, d, padding_idx=0)
            self.ln = nn.LayerNorm(d)
            self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
            self.bn = nn.BatchNorm1d(d)
            self.head = nn.Linear(d, V, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            x = self.emb(idx)
            h = self.ln(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            x = self.bn(x.transpose(1, 2)).transpose(1, 2)
            return self.head(x)

    lm = LM()
    with torch.no_grad():
        lm.ln.weight.mul_(3.0)
        lm.bn.running_mean.fill_(5.0)
    rep = init_(lm, generator=torch.Generator().manual_seed(1))
    # tied with the readout: drawn with the readout's C_W / d (logits O(1)), padding row zero
    assert sample_var_ok(lm.emb.weight[1:], 1.0 / 64) and float(lm.emb.weight[0].detach().abs().max()) == 0.0
    assert any("tied with readout 'head'" in n for n in rep.layer("emb").notes)
    assert torch.equal(lm.ln.weight, torch.ones(64)) and torch.equal(lm.ln.bias, torch.zeros(64))
    assert torch.equal(lm.bn.running_mean, torch.zeros(64))
    assert sample_var_ok(lm.attn.in_proj_weight, 1.0 / 64)
    assert float(lm.attn.in_proj_bias.detach().abs().max()) == 0.0 and float(lm.attn.out_proj.bias.detach().abs().max()) == 0.0
    # the attention branch (x + attn) is a γ=1 block (B = 1): out_proj at C_W / B = 1
    assert sample_var_ok(lm.attn.out_proj.weight, 1.0 / 64)
    head = rep.layer("head")
    assert head.tied == ("head.weight",) and head.params == ()
    assert lm.head.weight is lm.emb.weight
    assert rep.layer("emb").params == ("emb.weight",)


def test_generator_makes_draws_bitwise_reproducible_and_float64_works():
    def make():
        torch.manual_seed(0)
        return mlp(nn.Tanh, 5, 32, 4).double()

    a, b, c = make(), make(), make()
    init_(a, generator=torch.Generator().manual_seed(7))
    init_(b, generator=torch.Generator().manual_seed(7))
    init_(c, generator=torch.Generator().manual_seed(8))
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        assert pa.dtype == torch.float64 and torch.equal(pa, pb)
    assert not torch.equal(a[0].weight, c[0].weight)


def test_frozen_parameters_are_initialised_and_reported():
    net = mlp(nn.ReLU, 4, 8, 3)
    net[0].weight.requires_grad_(False)
    before = net[0].weight.clone()
    rep = init_(net, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(before, net[0].weight)
    assert rep.layer("0").frozen == ("0.weight",) and not net[0].weight.requires_grad


def test_no_critical_point_raises_and_strict_false_uses_the_nearest_setting():
    net = mlp(nn.Sigmoid, 4, 16, 3)
    with pytest.raises(NoCriticalPointError, match="sigmoid"):
        init_(net)
    w = net[2].weight.clone()
    rep = init_(net, strict=False)
    rec = rep.layer("2")
    assert rec.universality_class == "NONE" and any("nearest" in n for n in rec.notes)
    with pytest.raises(NoCriticalPointError) as exc:
        critical_point("sigmoid")
    assert rec.C_W == pytest.approx(exc.value.nearest.C_W) and not torch.equal(w, net[2].weight)


def test_caller_constants_override_criticality():
    net = mlp(nn.Tanh, 4, 1024, 2)
    rep = init_(net, C_b=0.3, C_W=1.5, generator=torch.Generator().manual_seed(0))
    assert (rep.layer("0").C_b, rep.layer("0").C_W) == (0.3, 1.5)
    assert sample_var_ok(net[2].weight, 1.5 / 1024) and sample_var_ok(net[0].bias, 0.3)
    with pytest.raises(ValueError, match="C_W must be a finite positive"):
        init_(net, C_W=0.0)


def test_bad_models_raise_clear_errors():
    with pytest.raises(ValueError, match="no Linear, Conv"):
        init_(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)))
    with torch.device("meta"):
        meta = mlp(nn.ReLU, 3, 4, 2)
    with pytest.raises(ValueError, match="meta device.*to_empty"):
        init_(meta)

    class Grow(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = self.a(x)
            return 1.5 * h + self.b(torch.relu(h))

    with pytest.raises(ValueError, match="γ=1.5 > 1"):
        init_(Grow())
    rep = init_(Grow(), strict=False)  # the γ = 1 rule: C_W / B with B = 1 block
    assert rep.layer("b").C_W == pytest.approx(2.0) and "unsatisfiable" in " ".join(rep.layer("b").notes)


def test_unplaced_parameters_are_left_untouched_with_a_warning():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.scale = nn.Parameter(torch.full((), 7.0))

        def forward(self, x):
            return self.fc(x) * self.scale

    m = M()
    with pytest.warns(UntouchedParameterWarning, match="scale"):
        rep = init_(m, activation="relu")
    assert float(m.scale.detach()) == 7.0 and [u.name for u in rep.untouched] == ["scale"]
    assert rep.layer("fc").C_W == 2.0  # single layer: the activation argument governs it


def test_wrapped_models_are_initialised_in_place():
    net = mlp(nn.ReLU, 4, 8, 3)
    w = net[0].weight
    rep = torch_crit.init_(nn.DataParallel(net), generator=torch.Generator().manual_seed(0))
    assert net[0].weight is w and rep.layer("4").C_W == 2.0
