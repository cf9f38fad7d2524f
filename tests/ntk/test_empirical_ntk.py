"""Exactness of ``torch_crit.empirical_ntk`` against a brute-force float64 reference.

The reference is deliberately naive and independent of the library (no torch.func): the full
Jacobian ``J[N·k, P]`` row by row with ``torch.autograd.grad`` (one backward pass per output
scalar), then ``J Λ Jᵀ`` (8.5) with λ per parameter tensor (8.6). Tolerances: float64 ≤ 1e-10
relative to max|Θ| (round-off of sums of O(10³) terms is ~1e-15); float32 with float64
accumulation ≤ 1e-4 (float32 forward/backward round-off, ~1e-6, amplified by cancellation).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional

import pytest
import torch
from torch import nn

import torch_crit
from torch_crit.ntk.inputs import call_model, flatten_output



# tiny problems: one intra-op thread (shared fixture in tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- reference

from _references import contract, jacobian_per_param as reference_jacobian, ntk_reference as reference_ntk, rel_err  # noqa: E402,F401


# ---------------------------------------------------------------------------- the zoo


class Residual(nn.Module):
    def __init__(self, d: int = 6):
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.f1 = nn.Linear(d, d)
        self.f2 = nn.Linear(d, d)
        self.out = nn.Linear(d, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = h + 0.5 * self.f2(torch.relu(self.f1(h)))
        return self.out(h)


class LNMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(4, 8)
        self.ln = nn.LayerNorm(8)
        self.l2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.l2(torch.nn.functional.gelu(self.ln(self.l1(x))))


class TiedLM(nn.Module):
    """Embedding → Linear → head tied to the embedding (used outside its module call)."""

    def __init__(self, vocab: int = 7, d: int = 5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=True)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = torch.tanh(self.mix(self.emb(ids)))  # [N, T, d]: Linear with extra dims
        return self.head(h).mean(1)


class Attention(nn.Module):
    """Hand-written single-head attention with Linear projections + an MHA block."""

    def __init__(self, d: int = 6):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.mha = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln = nn.LayerNorm(d)
        self.ff = nn.Linear(d, d)
        self.out = nn.Linear(d, 2)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1) @ v
        h = self.ln(x + a)
        h = h + self.mha(h, h, h, need_weights=False)[0]
        h = h + torch.tanh(self.ff(h))
        return self.out(h[:, 0])


class Shared(nn.Module):
    """One Linear called twice, and two Conv modules sharing one weight (cross terms)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 3, padding=1)
        self.c2 = nn.Conv1d(2, 3, 3, stride=2)
        self.c2.weight = self.c1.weight
        self.lin = nn.Linear(3, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.c1(x)).mean(-1) + torch.tanh(self.c2(x)).mean(-1)
        h = torch.tanh(self.lin(torch.tanh(self.lin(h))))
        return self.out(h)


class MultiIO(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4)
        self.h1 = nn.Linear(4, 2)
        self.h2 = nn.Linear(4, 1)

    def forward(self, xa, xb, scale: float = 1.0):
        h = torch.tanh(self.a(xa) + self.b(xb)) * scale
        return self.h1(h), self.h2(h).unsqueeze(-1)


class CustomParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4) / 2)
        self.scale = nn.Parameter(torch.ones(4))
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(torch.sin(x @ self.w) * self.scale)


class MyLinear(nn.Linear):
    def forward(self, x):  # overrides forward: must go generic
        return super().forward(x) * 2.0


def conv_net(dim: int) -> nn.Module:
    Conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim]
    net = nn.Sequential(
        Conv(2, 4, 3, stride=2, padding=1),
        nn.Tanh(),
        Conv(4, 4, 3, padding=2, dilation=2, groups=2),
        BN(4),
        nn.ReLU(),
        Conv(4, 6, 2, padding="same" if dim < 3 else 0, bias=False),
        nn.GELU(),
        nn.Flatten(),
        nn.LazyLinear(3),
    )
    return net


def _mlp(act: Callable[[], nn.Module]) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 7), act(), nn.Linear(7, 7), act(), nn.Linear(7, 7), act(), nn.Linear(7, 3))


def make(name: str) -> tuple[nn.Module, Any, Any]:
    g = torch.Generator().manual_seed(hash(name) % 1000)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    if name.startswith("mlp_"):
        act = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}[name[4:]]
        return _mlp(act), r(5, 4), r(3, 4)
    if name.startswith("cnn"):
        dim = int(name[3])
        shape = {1: (2, 9), 2: (2, 6, 5), 3: (2, 4, 3, 4)}[dim]
        net = conv_net(dim)
        net(torch.randn(2, *shape))  # materialise LazyLinear
        bn = net[3]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.data.uniform_(0.5, 1.5)
        return net, r(4, *shape), r(3, *shape)
    if name == "residual":
        return Residual(), r(5, 4), r(2, 4)
    if name == "layernorm":
        return LNMLP(), r(5, 4), r(3, 4)
    if name == "tied_lm":
        return TiedLM(), torch.randint(0, 7, (4, 3), generator=g), torch.randint(0, 7, (3, 3), generator=g)
    if name == "attention":
        return Attention(), r(3, 4, 6), r(2, 4, 6)
    if name == "shared":
        return Shared(), r(4, 2, 7), r(3, 2, 7)
    if name == "multi_io":
        return MultiIO(), (r(4, 3), r(4, 2), 0.7), (r(2, 3), r(2, 2), 0.7)
    if name == "custom_param":
        return CustomParam(), r(4, 3), r(2, 3)
    if name == "subclass":
        return nn.Sequential(MyLinear(3, 5), nn.Tanh(), nn.Linear(5, 2)), r(4, 3), r(2, 3)
    raise KeyError(name)


ZOO = ["mlp_tanh", "mlp_relu", "mlp_gelu", "cnn1d", "cnn2d", "cnn3d", "residual", "layernorm", "tied_lm",
       "attention", "shared", "multi_io", "custom_param", "subclass"]


@pytest.fixture(scope="module")
def zoo():
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(1)
            net, x1, x2 = make(name)
            net = net.double()
            J1, J2 = reference_jacobian(net, x1), reference_jacobian(net, x2)
            cache[name] = (net, x1, x2, contract(J1, J1), contract(J1, J2), J1, J2)
        return cache[name]

    return get


# ---------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("name", ZOO)
def test_float64_exact_vs_reference(zoo, name):
    net, x1, x2, R11, R12, J1, J2 = zoo(name)
    T = torch_crit.empirical_ntk(net, x1)
    assert T.shape == R11.shape and T.dtype == torch.float64
    assert rel_err(T, R11) <= 1e-10
    T12 = torch_crit.empirical_ntk(net, x1, x2)
    assert T12.shape == R12.shape
    assert rel_err(T12, R12) <= 1e-10


@pytest.mark.parametrize("name", ["mlp_tanh", "cnn2d", "attention", "shared", "tied_lm"])
def test_float32_with_fp64_accumulation(zoo, name):
    net, x1, x2, R11, R12, J1, J2 = zoo(name)
    net32 = make(name)[0]
    net32.load_state_dict(net.state_dict())
    net32 = net32.float()
    if name == "tied_lm":
        net32.head.weight = net32.emb.weight
    if name == "shared":
        net32.c2.weight = net32.c1.weight
    x1f = x1 if not torch.is_tensor(x1) or not x1.is_floating_point() else x1.float()
    x2f = x2 if not torch.is_tensor(x2) or not x2.is_floating_point() else x2.float()
    T = torch_crit.empirical_ntk(net32, x1f, x2f, accumulate_fp64=True)
    assert T.dtype == torch.float32
    assert rel_err(T, R12) <= 1e-4
    # dtype= computes on a float64 copy of the float32 model, leaving it untouched
    T64 = torch_crit.empirical_ntk(net32, x1f, x2f, dtype=torch.float64)
    assert T64.dtype == torch.float64 and next(net32.parameters()).dtype == torch.float32
    assert rel_err(T64, R12) <= 1e-4


@pytest.mark.parametrize("name", ["mlp_relu", "cnn1d", "cnn3d", "attention", "shared", "layernorm"])
def test_structured_equals_generic_and_backends_agree(zoo, name):
    net, x1, x2, R11, R12, J1, J2 = zoo(name)
    G = torch_crit.empirical_ntk(net, x1, x2, method="generic")
    S_ext = torch_crit.empirical_ntk(net, x1, x2, method="structured", backend="ext")
    S_torch = torch_crit.empirical_ntk(net, x1, x2, method="structured", backend="torch")
    assert rel_err(S_ext, G) <= 1e-12
    assert rel_err(S_torch, S_ext) <= 1e-12


@pytest.mark.parametrize("name", ["mlp_tanh", "cnn2d", "attention", "shared", "multi_io"])
def test_outputs_and_per_layer_consistent(zoo, name):
    net, x1, x2, R11, R12, J1, J2 = zoo(name)
    full = torch_crit.empirical_ntk(net, x1)
    n, k = full.shape[0], full.shape[2]
    tr = torch_crit.empirical_ntk(net, x1, output="trace")
    assert tr.shape == (n, n)
    assert rel_err(tr, full.diagonal(dim1=2, dim2=3).sum(-1)) <= 1e-12
    dg = torch_crit.empirical_ntk(net, x1, output="diagonal")
    assert dg.shape == (n, k, k)
    assert rel_err(dg, full.diagonal(dim1=0, dim2=1).permute(2, 0, 1)) <= 1e-12
    dt = torch_crit.empirical_ntk(net, x1, output="diagonal_trace")
    assert dt.shape == (n,)
    assert rel_err(dt, dg.diagonal(dim1=1, dim2=2).sum(-1)) <= 1e-12
    parts = torch_crit.empirical_ntk(net, x1, x2, per_layer=True)
    ref_parts = contract(J1, J2, per_layer=True)
    assert list(parts) == [g for g in ref_parts if g in parts]
    assert set(parts) == set(ref_parts)
    for g in parts:
        assert rel_err(parts[g], ref_parts[g]) <= 1e-10 or float(ref_parts[g].abs().max()) == 0.0
    assert rel_err(sum(parts.values()), R12) <= 1e-12
    trp = torch_crit.empirical_ntk(net, x1, output="trace", per_layer=True)
    assert rel_err(sum(trp.values()), tr) <= 1e-12


def test_learning_rates_as_groups_number_and_dict(zoo):
    net, x1, x2, _, R12, J1, J2 = zoo("cnn2d")
    names = [n for n, p in net.named_parameters()]
    groups = [
        {"params": [p for n, p in net.named_parameters() if n.endswith("bias")], "lr": 0.3, "name": "biases"},
        {"params": [p for n, p in net.named_parameters() if not n.endswith("bias")], "lr": 2.5, "name": "weights"},
    ]
    lam = {n: (0.3 if n.endswith("bias") else 2.5) for n in names}
    R = contract(J1, J2, lam)
    T = torch_crit.empirical_ntk(net, x1, x2, learning_rates=groups)
    assert rel_err(T, R) <= 1e-10
    T = torch_crit.empirical_ntk(net, x1, x2, learning_rates=lam)
    assert rel_err(T, R) <= 1e-10
    T = torch_crit.empirical_ntk(net, x1, x2, learning_rates=0.5)
    assert rel_err(T, 0.5 * R12) <= 1e-10
    # a parameter in no group is not trained: left out
    T = torch_crit.empirical_ntk(net, x1, x2, learning_rates=groups[1:])
    assert rel_err(T, contract(J1, J2, {n: v for n, v in lam.items() if not n.endswith("bias")})) <= 1e-10


def test_frozen_parameters_do_not_contribute():
    torch.manual_seed(3)
    net = _mlp(nn.Tanh).double()
    net[2].weight.requires_grad_(False)
    net[4].bias.requires_grad_(False)
    x = torch.randn(4, 4, dtype=torch.float64)
    R = reference_ntk(net, x)
    T, plan = torch_crit.empirical_ntk(net, x, return_plan=True)
    assert rel_err(T, R) <= 1e-10
    planned = {p for lp in plan.layers for p in lp.params}
    assert "2.weight" not in planned and "4.bias" not in planned and "2.bias" in planned


def test_structured_plan_covers_linear_conv_and_explains_the_rest(zoo):
    net, x1, *_ = zoo("attention")
    _, plan = torch_crit.empirical_ntk(net, x1, return_plan=True)
    by = {lp.group: lp for lp in plan.layers}
    assert by["q"].method == "structured" and by["ff"].method == "structured"
    assert by["mha"].method == "generic" and by["ln"].method == "generic"
    assert by["mha.out_proj"].method == "generic"  # used through F.linear inside MHA, not called
    assert "never called" in by["mha.out_proj"].reason
    net, x1, *_ = zoo("tied_lm")
    _, plan = torch_crit.empirical_ntk(net, x1, return_plan=True)
    by = {lp.params: lp for lp in plan.layers}
    assert by[("emb.weight",)].method == "generic"
    assert by[("head.bias",)].method == "structured"
    assert by[("mix.weight", "mix.bias")].method == "structured"
    net, x1, *_ = zoo("subclass")
    _, plan = torch_crit.empirical_ntk(net, x1, return_plan=True)
    assert {lp.group: lp.method for lp in plan.layers} == {"0": "generic", "2": "structured"}
    assert [lp.group for lp in plan.layers] == ["0", "2"]  # forward order
    assert "overrides forward" in plan.layers[0].reason
    net, x1, *_ = zoo("shared")
    _, plan = torch_crit.empirical_ntk(net, x1, return_plan=True)
    c1 = next(lp for lp in plan.layers if lp.params == ("c1.weight",))
    assert c1.method == "structured" and c1.calls == 2  # two modules share the weight
    assert str(plan).count("structured") >= 4


def test_contraction_order_chosen_by_cost():
    # wide channels on a 2-position map: position pairs are cheaper; a big image: per-sample
    small = nn.Sequential(nn.Conv2d(64, 64, 1), nn.Flatten(), nn.Linear(64 * 2, 2)).double()
    x = torch.randn(3, 64, 1, 2, dtype=torch.float64)
    _, plan = torch_crit.empirical_ntk(small, x, return_plan=True)
    assert plan.layers[0].contraction == "position_pair"
    big = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 14 * 14, 2)).double()
    x = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    T, plan = torch_crit.empirical_ntk(big, x, return_plan=True)
    assert plan.layers[0].contraction == "per_sample"
    assert rel_err(T, reference_ntk(big, x)) <= 1e-10
    # the calibrated cases (benchmarks/ntk_speed.py CNN, 10 outputs, 4×4 positions): 32 channels →
    # per-sample gradients (1.8× faster, measured quiet), 128 channels → position pairs (4.6× faster)
    for ch, want in ((32, "per_sample"), (128, "position_pair")):
        late = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), nn.Flatten(), nn.Linear(ch * 16, 10))
        plan = torch_crit.ntk.empirical.plan_ntk(late, torch.randn(64, ch, 4, 4))
        assert plan.layers[0].contraction == want, str(plan)
        assert set(plan.layers[0].flops) == {"per_sample", "position_pair", "jacobian"}
        assert plan.layers[0].flops["jacobian"] >= min(plan.layers[0].flops["per_sample"], plan.layers[0].flops["position_pair"])
    # Linear over tokens: few tokens → pairs; both give the reference
    seq = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Flatten(), nn.Linear(16, 2)).double()
    x = torch.randn(3, 2, 8, dtype=torch.float64)
    T, plan = torch_crit.empirical_ntk(seq, x, return_plan=True)
    assert rel_err(T, reference_ntk(seq, x)) <= 1e-10


def test_tiling_matches_single_tile(zoo):
    net, x1, x2, R11, R12, J1, J2 = zoo("mlp_gelu")
    J = {n: torch.cat([J1[n], J2[n]]) for n in J1}
    R = contract(J, J)
    xb = torch.cat([x1, x2])
    for bs, out in ((1, "full"), (3, "full"), (3, "trace"), (3, "diagonal")):
        T = torch_crit.empirical_ntk(net, xb, block_size=bs, output=out)
        ref = {"full": R, "trace": R.diagonal(dim1=2, dim2=3).sum(-1),
               "diagonal": R.diagonal(dim1=0, dim2=1).permute(2, 0, 1)}[out]
        assert rel_err(T, ref) <= 1e-10
    net, x1, x2, R11, R12, J1, J2 = zoo("cnn1d")
    T, plan = torch_crit.empirical_ntk(net, x1, x2, block_size=2, return_plan=True)
    assert plan.memory.n_row_blocks == 2 and plan.memory.n_col_blocks == 2
    assert rel_err(T, R12) <= 1e-10


def test_ext_primitive_is_what_runs(zoo, monkeypatch):
    from torch_crit import _ops

    calls = {"ext": 0, "ref": 0}
    real_ext, real_ref = _ops.gram_hadamard_accumulate_, _ops.gram_hadamard_accumulate_reference_

    def ext(*a, **k):
        calls["ext"] += 1
        return real_ext(*a, **k)

    def ref(*a, **k):
        calls["ref"] += 1
        return real_ref(*a, **k)

    monkeypatch.setattr(_ops, "gram_hadamard_accumulate_", ext)
    monkeypatch.setattr(_ops, "gram_hadamard_accumulate_reference_", ref)
    net, x1, *_ = zoo("mlp_tanh")
    if hasattr(_ops, "reset_backend_counts"):
        _ops.reset_backend_counts()
    torch_crit.empirical_ntk(net, x1)
    assert calls == {"ext": 1, "ref": 0}  # one fused call for all layers of the single tile
    if hasattr(_ops, "backend_counts"):  # the compiled CPU kernel ran, not the reference
        assert _ops.backend_counts() == {"cpu": 1}
    torch_crit.empirical_ntk(net, torch.cat([x1, x1]), block_size=5)
    assert calls["ext"] == 1 + 3  # upper-triangle tiles of a 2×2 grid
    torch_crit.empirical_ntk(net, x1, backend="torch")
    assert calls["ref"] == 1 and calls["ext"] == 4
    assert _ops.HAS_EXT


def test_model_state_untouched_and_mode_restored(zoo):
    net, x1, *_ = zoo("cnn2d")
    net.train()
    net[6].training = False  # a mixed-mode model
    before = {k: v.clone() for k, v in net.state_dict().items()}
    modes = [m.training for m in net.modules()]
    T = torch_crit.empirical_ntk(net, x1)
    after = net.state_dict()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert [m.training for m in net.modules()] == modes
    # evaluated in eval mode: BatchNorm used its running statistics
    net.eval()
    assert rel_err(T, reference_ntk(net, x1)) <= 1e-10


def test_dropout_is_off_for_the_probe():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 2)).double().train()
    x = torch.randn(4, 3, dtype=torch.float64)
    a = torch_crit.empirical_ntk(net, x)
    b = torch_crit.empirical_ntk(net, x)
    assert torch.equal(a, b) and net.training
    assert rel_err(a, reference_ntk(net, x)) <= 1e-10


def test_dict_inputs_and_keyword_model():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 2)

        def forward(self, *, x, mask):
            return self.l(x) * mask

    torch.manual_seed(0)
    net = KW().double()
    x = {"x": torch.randn(4, 3, dtype=torch.float64), "mask": torch.ones(4, 1, dtype=torch.float64)}
    x["mask"][1] = 0.5
    assert rel_err(torch_crit.empirical_ntk(net, x), reference_ntk(net, x)) <= 1e-10


def test_progress_reports_plan_and_tiles(zoo, capsys):
    net, x1, *_ = zoo("cnn1d")
    torch_crit.empirical_ntk(net, x1, progress=True, block_size=2)
    err = capsys.readouterr().err
    assert "empirical_ntk plan" in err and "structured/" in err and "generic/" in err
    assert "tile 3/3" in err  # 2×2 grid, upper triangle


def test_generic_path_falls_back_when_vmap_cannot_batch():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(3)
            self.l = nn.Linear(3, 2)

        def forward(self, x):
            h = self.ln(x)
            if h.sum() > 1e9:  # Python control flow on values: no vmap over examples
                h = h * 2
            return self.l(h)

    torch.manual_seed(0)
    net = DataDependent().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.warns(torch_crit.errors.FallbackPathWarning, match="one item at a time"):
        T = torch_crit.empirical_ntk(net, x)
    assert rel_err(T, reference_ntk(net, x)) <= 1e-10
