"""Tests for torch_crit.param_groups (learning-rate equivalence principle, (9.94)–(9.96))."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torch_crit
from torch_crit import init_, param_groups


def mlp(act: type[nn.Module], n0: int, n: int, depth: int, n_out: int = 1) -> nn.Sequential:
    mods: list[nn.Module] = [nn.Linear(n0, n)]
    for l in range(2, depth + 1):
        mods += [act(), nn.Linear(n, n if l < depth else n_out)]
    return nn.Sequential(*mods)


def by_name(groups):
    return {g["name"]: g for g in groups}


# ------------------------------------------------------------------------------- exact rates
def test_relu_rates_are_9_94():
    net = mlp(nn.ReLU, 5, 16, 4)
    g = by_name(param_groups(net, lr_b=0.3, lr_W=0.7, weight_decay=1e-4, momentum=0.9))
    L = 4
    assert g["0.weight"]["lr"] == pytest.approx(0.7 / L / 5)
    for name in ("2", "4", "6"):
        assert g[f"{name}.weight"]["lr"] == pytest.approx(0.7 / L / 16)
        assert g[f"{name}.bias"]["lr"] == pytest.approx(0.3 / L)
    assert all(x["weight_decay"] == 1e-4 and x["momentum"] == 0.9 for x in g.values())
    assert [x["depth"] for x in g.values()] == [1, 1, 2, 2, 3, 3, 4, 4]
    opt = torch.optim.SGD(list(g.values()), lr=123.0)  # accepted as is; group lrs win
    assert [pg["lr"] for pg in opt.param_groups] == [x["lr"] for x in g.values()]


def test_tanh_rates_are_9_96_and_mixed_nets_follow_the_governing_activation():
    net = mlp(nn.Tanh, 3, 8, 5)
    g = by_name(param_groups(net, lr_b=1.0, lr_W=2.0))
    for l, name in enumerate(("0", "2", "4", "6", "8"), start=1):
        assert g[f"{name}.bias"]["lr"] == pytest.approx(1.0 / l)
        assert g[f"{name}.weight"]["lr"] == pytest.approx(2.0 / (3 if l == 1 else 8))

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 1)

        def forward(self, x):
            return self.c(F.relu(self.b(torch.tanh(self.a(x)))))

    g = by_name(param_groups(Mixed(), lr_b=1.0, lr_W=1.0))
    # a: first layer -> tanh (after it), l=1: bias 1/1; b fed by tanh, l=2: bias 1/2; c fed by relu: 1/L
    assert (g["a.bias"]["lr"], g["b.bias"]["lr"], g["c.bias"]["lr"]) == pytest.approx((1.0, 0.5, 1 / 3))


def test_every_trainable_parameter_in_exactly_one_group_frozen_and_tied_left_out():
    class LM(nn.Module):
        def __init__(self, V=50, d=16):
            super().__init__()
            self.emb = nn.Embedding(V, d)
            self.ln = nn.LayerNorm(d)
            self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
            self.fc = nn.Linear(d, d)
            self.head = nn.Linear(d, V, bias=False)
            self.head.weight = self.emb.weight
            self.temp = nn.Parameter(torch.ones(()))

        def forward(self, idx):
            x = self.emb(idx)
            h = self.ln(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            x = x + self.fc(F.relu(x))
            return self.head(x) * self.temp

    lm = LM()
    lm.fc.bias.requires_grad_(False)
    groups = param_groups(lm, lr_b=0.1, lr_W=0.2, weight_decay=0.01)
    ids = [id(p) for gr in groups for p in gr["params"]]
    trainable = [p for p in lm.parameters() if p.requires_grad]
    assert len(ids) == len(set(ids)) == len(trainable)
    assert set(ids) == {id(p) for p in trainable}
    assert id(lm.fc.bias) not in ids
    names = [gr["name"] for gr in groups]
    assert len(names) == len(set(names))
    g = by_name(groups)
    L = 4  # emb, attn, fc, head
    assert g["emb.weight"]["lr"] == pytest.approx(0.2 / L / 1)  # one-hot fan-in 1
    assert g["attn.weight"]["lr"] == pytest.approx(0.2 / L / 16)
    assert g["ln.norm"]["role"] == "norm" and g["ln.norm"]["lr"] == pytest.approx(0.1 / L)
    assert g["other"]["params"] == [lm.temp] and g["other"]["lr"] == pytest.approx(0.1 / L)
    assert "head.weight" not in g  # tied to emb: optimised once, with the embedding
    torch.optim.AdamW(param_groups(lm, 0.1, 0.2, optimizer="adamw", other_lr=1e-3, weight_decay=0.1))
    assert by_name(param_groups(lm, 0.1, 0.2, other_lr=1e-3))["other"]["lr"] == 1e-3


def test_report_reuse_wrappers_and_bad_arguments():
    net = mlp(nn.ReLU, 4, 8, 3)
    rep = init_(net)
    direct = param_groups(net, 0.1, 0.1)
    for wrapped in (net, nn.DataParallel(net)):
        gs = param_groups(wrapped, 0.1, 0.1, report=rep)
        assert [(x["name"], x["lr"], [id(p) for p in x["params"]]) for x in gs] == \
               [(x["name"], x["lr"], [id(p) for p in x["params"]]) for x in direct]
    with pytest.raises(ValueError, match="does not describe this model"):
        param_groups(mlp(nn.ReLU, 4, 8, 5), 0.1, 0.1, report=init_(mlp(nn.ReLU, 4, 8, 4)))
    with pytest.raises(ValueError, match="not supported"):
        param_groups(net, 0.1, 0.1, optimizer="lbfgs")
    with pytest.raises(ValueError, match="lr_W must be a finite"):
        param_groups(net, 0.1, float("nan"))
    for p in net.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        param_groups(net, 0.1, 0.1)


def test_torch_compiled_model_is_unwrapped():
    net = mlp(nn.ReLU, 4, 8, 3)
    compiled = torch.compile(net)
    gs = param_groups(compiled, 0.1, 0.1, optimizer=torch.optim.Adam)
    assert {id(p) for x in gs for p in x["params"]} == {id(p) for p in net.parameters()}
    rep = init_(compiled)
    assert rep.layer("4").C_W == 2.0


# ------------------------------------------------------------------------------ NTK shares
@pytest.mark.slow
def test_sgd_groups_give_equal_per_layer_ntk_shares_relu(one_thread):
    """With the groups as the learning-rate tensor λ (8.6), layer l's NTK contribution (8.7)
    H_l = Σ_{θ∈l} lr_θ (∂f/∂θ)² has mean (lr_b + lr_W g_{l-1})/L for every l (ReLU, any width:
    THEORY.md §12 item 18; g_{l-1} = A2 K* = x²/n0 = 1 here, so every share is (lr_b + lr_W)/L).
    120 networks of width 48, depth 5; tolerance 4 standard errors of the ensemble mean."""
    L, S = 5, 120
    net = mlp(nn.ReLU, 8, 48, L)
    x = torch.randn(1, 8)
    x = x / x.pow(2).mean().sqrt()
    lr_b, lr_W = 0.3, 0.9
    groups = param_groups(net, lr_b, lr_W)
    lr_of = {id(p): gr["lr"] for gr in groups for p in gr["params"]}
    layer_of = {id(p): gr["depth"] for gr in groups for p in gr["params"]}
    shares = torch.zeros(S, L, dtype=torch.float64)
    for s in range(S):
        init_(net, generator=torch.Generator().manual_seed(s))
        net.zero_grad()
        net(x).sum().backward()
        for p in net.parameters():
            shares[s, layer_of[id(p)] - 1] += lr_of[id(p)] * float(p.grad.double().pow(2).sum())
    mean, se = shares.mean(0), shares.std(0) / math.sqrt(S)
    want = (lr_b + lr_W) / L
    assert bool(((mean - want).abs() <= 4 * se).all()), (mean.tolist(), want, se.tolist())
    assert float(shares.sum(1).mean()) == pytest.approx(lr_b + lr_W, rel=0.15)  # O(1) total NTK


def _adam_layer_changes(width: int, depth: int, groups_fn, seeds: int) -> torch.Tensor:
    """[depth]: mean over seeds of -Δf caused by one Adam step of layer l alone (loss = f(x))."""
    net = mlp(nn.ReLU, 16, width, depth)
    x = torch.randn(1, 16, generator=torch.Generator().manual_seed(99))
    out = torch.zeros(depth, dtype=torch.float64)
    for s in range(seeds):
        init_(net, generator=torch.Generator().manual_seed(s))
        groups = groups_fn(net)
        state = [p.detach().clone() for p in net.parameters()]
        with torch.no_grad():
            f0 = float(net(x))
        for l in range(1, depth + 1):
            gs = [{**g, "lr": g["lr"] if g["depth"] == l else 0.0} for g in groups]
            opt = torch.optim.Adam(gs)
            opt.zero_grad()
            net(x).sum().backward()
            opt.step()
            with torch.no_grad():
                out[l - 1] += (f0 - float(net(x))) / seeds
                for p, s0 in zip(net.parameters(), state):
                    p.copy_(s0)
    return out


@pytest.mark.slow
def test_adam_groups_make_per_layer_output_change_width_independent_and_depth_balanced(one_thread):
    """The Adam rule of torch_crit.optim (derived in its docstring): one Adam step of layer l alone
    changes the output by an amount independent of the width and equal across layers (up to O(1)
    constants such as E|σ|/√g). Widths 64 and 1024 (16×), depth 4, 4 seeds: each layer's change
    agrees within a factor 1.5 across widths (the naive SGD groups under Adam grow ~√16 = 4×), the
    layers agree within a factor 3, and depth 12 gives the same total change as depth 4 within 2×."""
    adam = lambda net: param_groups(net, 0.01, 0.01, optimizer="adam")  # noqa: E731
    naive = lambda net: param_groups(net, 0.01, 0.01, optimizer="sgd")  # noqa: E731
    small, big = _adam_layer_changes(64, 4, adam, 4), _adam_layer_changes(1024, 4, adam, 4)
    ratio = big / small
    assert bool(((ratio > 1 / 1.5) & (ratio < 1.5)).all()), ratio.tolist()
    assert float(big.max() / big.min()) < 3 and bool((big > 0).all()), big.tolist()
    nsmall, nbig = _adam_layer_changes(64, 4, naive, 2), _adam_layer_changes(1024, 4, naive, 2)
    assert float((nbig / nsmall)[1:3].min()) > 2.5, (nbig / nsmall).tolist()
    deep = _adam_layer_changes(256, 12, adam, 2)
    shallow = _adam_layer_changes(256, 4, adam, 2)
    assert 1 / 2 < float(deep.sum() / shallow.sum()) < 2, (deep.sum(), shallow.sum())  # measured 0.70


def test_activation_without_critical_point_needs_strict_false():
    from torch_crit.theory import NoCriticalPointError

    net = mlp(nn.Sigmoid, 3, 8, 3)
    with pytest.raises(NoCriticalPointError, match="sigmoid"):
        param_groups(net, 0.1, 0.1)
    with pytest.warns(RuntimeWarning, match="scale-invariant rule"):
        g = by_name(param_groups(net, 0.1, 0.1, strict=False))
    assert g["2.weight"]["lr"] == pytest.approx(0.1 / 3 / 8)
