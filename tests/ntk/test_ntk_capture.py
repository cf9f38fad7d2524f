"""The functional capture (layer inputs, cotangents) and the learning-rate resolution (8.6)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_crit.ntk.capture import layer_inputs_and_cotangents, trace_calls
from torch_crit.ntk.learning_rates import resolve_learning_rates
from torch_crit.ntk.structured import call_features, unfold_conv_input


# tiny problems: one intra-op thread (shared fixture in tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def per_sample_weight_grads(net: nn.Module, x: torch.Tensor, pname: str) -> torch.Tensor:
    """[N, k, numel] by autograd, one scalar at a time (reference)."""
    p = dict(net.named_parameters())[pname]
    out = net(x).reshape(x.shape[0], -1)
    rows = torch.zeros(out.shape[0], out.shape[1], p.numel(), dtype=x.dtype)
    for i in range(out.shape[0]):
        for a in range(out.shape[1]):
            (g,) = torch.autograd.grad(out[i, a], p, retain_graph=True)
            rows[i, a] = g.reshape(-1)
    return rows


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2),
        nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
        nn.Conv2d(4, 4, 3, padding="same", dilation=2, groups=4),
        nn.Conv3d(2, 2, 2, stride=1, padding="valid"),
    ],
)
def test_features_reproduce_per_sample_weight_gradients(conv):
    torch.manual_seed(0)
    d = len(conv.kernel_size)
    head = nn.LazyLinear(3)
    net = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), head)
    x = torch.randn(3, conv.in_channels, *([6] * d))
    net(x)
    net = net.double()
    x = x.double()
    params = dict(net.named_parameters())
    out, inputs, cots = layer_inputs_and_cotangents(net, params, x, ["0", "3"])
    assert out.shape == (3, 3) and cots[0].shape[:2] == (3, 3)
    X, G = call_features(conv, inputs[0], cots[0])
    J = torch.einsum("nkgop,ngcp->nkgoc", G, X).reshape(3, 3, -1)
    torch.testing.assert_close(J, per_sample_weight_grads(net, x, "0.weight"), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(G.sum(-1).reshape(3, 3, -1), per_sample_weight_grads(net, x, "0.bias"), rtol=1e-10, atol=1e-12)
    # im2col against the conv itself
    Xu = unfold_conv_input(conv, x)
    W = conv.weight.reshape(conv.groups, conv.out_channels // conv.groups, -1)
    y = torch.einsum("goc,ngcp->ngop", W, Xu).reshape(3, conv.out_channels, -1) + conv.bias[:, None]
    torch.testing.assert_close(y, conv(x).reshape(3, conv.out_channels, -1), rtol=1e-10, atol=1e-12)


def test_linear_with_token_dims_and_repeated_calls():
    torch.manual_seed(0)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 4)
            self.o = nn.Linear(4, 2)

        def forward(self, x):  # x [N, T, 4]
            return self.o(torch.tanh(self.l(torch.tanh(self.l(x)))).mean(1))

    net = Twice().double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    calls = trace_calls(net, x, ["l", "o"])
    assert [(c.module, c.occurrence) for c in calls] == [("l", 0), ("l", 1), ("o", 0)]
    assert all(c.batch_first for c in calls) and calls[0].output_shape == (3, 5, 4)
    out, inputs, cots = layer_inputs_and_cotangents(net, dict(net.named_parameters()), x, ["l", "o"], calls=calls)
    assert cots[0].shape == (3, 2, 5, 4) and inputs[1].shape == (3, 5, 4)
    feats = [call_features(net.l, inputs[c], cots[c]) for c in (0, 1)]
    X = torch.cat([f[0] for f in feats], -1)
    G = torch.cat([f[1] for f in feats], -1)
    J = torch.einsum("nkgop,ngcp->nkgoc", G, X).reshape(3, 2, -1)  # both calls summed: exact
    torch.testing.assert_close(J, per_sample_weight_grads(net, x, "l.weight"), rtol=1e-10, atol=1e-12)


def test_seq_first_calls_are_flagged():
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 3)

        def forward(self, x):  # [N, T, 3] -> runs the Linear on [T, N, 3]
            return self.l(x.transpose(0, 1)).transpose(0, 1).sum(1)

    calls = trace_calls(SeqFirst(), torch.randn(4, 5, 3), ["l"])
    assert not calls[0].batch_first


def test_jvp_through_capture_matches_finite_differences():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(2, 3, 3), nn.GELU(), nn.Flatten(), nn.Linear(12, 2)).double()
    x = torch.randn(4, 2, 6, dtype=torch.float64)
    params = dict(net.named_parameters())
    tang = {k: torch.randn_like(v) for k, v in params.items()}
    f = lambda p: layer_inputs_and_cotangents(net, p, x, ["0", "3"])  # noqa: E731
    (out, xs, gs), (dout, dxs, dgs) = torch.func.jvp(f, (params,), (tang,))
    eps = 1e-6
    hi = f({k: v + eps * tang[k] for k, v in params.items()})
    lo = f({k: v - eps * tang[k] for k, v in params.items()})
    torch.testing.assert_close(dout, (hi[0] - lo[0]) / (2 * eps), rtol=1e-6, atol=1e-8)
    for c in range(2):
        torch.testing.assert_close(dgs[c], (hi[2][c] - lo[2][c]) / (2 * eps), rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(dxs[c], (hi[1][c] - lo[1][c]) / (2 * eps), rtol=1e-6, atol=1e-8)


class _SharedMiddle(nn.Module):
    """Linear → (a Linear called twice) → Linear: four captured calls, one module shared."""

    def __init__(self, k: int):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.s = nn.Linear(4, 4)
        self.o = nn.Linear(4, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        h = torch.nn.functional.gelu(self.s(h))
        h = torch.tanh(self.s(h))
        return self.o(h)


def _autograd_cotangents(net, x, names, probes, seeds, k):
    """Reference for the seeded capture: plain autograd through forward hooks, one output at a time."""
    mods = dict(net.named_modules())
    zs, xs = [], []

    def hook(module, args, output):
        c = len(zs)
        out = output + probes[c] if c in probes else output * 1.0
        zs.append(out)
        xs.append(args[0])
        return out

    handles = [mods[n].register_forward_hook(hook) for n in names]
    try:
        out = net(x).reshape(x.shape[0], -1)
    finally:
        for h in handles:
            h.remove()
    cots = [torch.zeros(z.shape[0], k, *z.shape[1:], dtype=x.dtype) for z in zs]
    for a in range(k):
        scalar = out[:, a].sum() + sum((seeds[c][a] * xs[c]).sum() for c in seeds)
        grads = torch.autograd.grad(scalar, zs, retain_graph=True)
        for c, g in enumerate(grads):
            cots[c][:, a] = g
    return out.detach(), [t.detach() for t in xs], cots


@pytest.mark.parametrize("k", [1, 3])
def test_capture_with_probes_and_seeds_matches_autograd(k: int):
    """Probe values added to the outputs and cotangent seeds on the inputs: the cotangents are
    ∂/∂z [f_a + Σ_c ⟨seed_c[a], X_c⟩] (checked against autograd), and jvp through probes and seeds
    matches central finite differences (the tangent route of the structured dNTK)."""
    torch.manual_seed(1)
    net = _SharedMiddle(k).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    names = ["a", "s", "o"]
    calls = trace_calls(net, x, names)
    assert [c.module for c in calls] == ["a", "s", "s", "o"]
    probes = {1: torch.randn(5, 4, dtype=torch.float64), 3: torch.randn(5, k, dtype=torch.float64)}
    seeds = {c: torch.randn(k, *calls[c].input_shape, dtype=torch.float64) for c in (0, 1, 2, 3)}
    params = dict(net.named_parameters())
    out, xs, gs = layer_inputs_and_cotangents(net, params, x, names, calls=calls, probes=probes, seeds=seeds)
    r_out, r_xs, r_gs = _autograd_cotangents(net, x, names, probes, seeds, k)
    torch.testing.assert_close(out, r_out, rtol=1e-12, atol=1e-14)
    for c in range(4):
        torch.testing.assert_close(xs[c], r_xs[c], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(gs[c], r_gs[c], rtol=1e-10, atol=1e-12)
    # the seeds matter (else the comparison above would not test them)
    _, _, plain = layer_inputs_and_cotangents(net, params, x, names, calls=calls, probes=probes)
    assert (plain[1] - gs[1]).abs().max() > 1e-3
    # jvp through zero probes and seeds against central differences
    p0 = {c: torch.zeros(calls[c].output_shape, dtype=torch.float64) for c in (0, 1, 3)}
    s0 = {c: torch.zeros_like(t) for c, t in seeds.items()}
    tp = {c: torch.randn_like(t) for c, t in p0.items()}
    ts = {c: torch.randn_like(t) for c, t in s0.items()}

    def f(pr, se):
        return layer_inputs_and_cotangents(net, params, x, names, calls=calls, probes=pr, seeds=se)[1:]

    _, (dxs, dgs) = torch.func.jvp(f, (p0, s0), (tp, ts))
    h = 1e-6
    hi = f({c: h * t for c, t in tp.items()}, {c: h * t for c, t in ts.items()})
    lo = f({c: -h * t for c, t in tp.items()}, {c: -h * t for c, t in ts.items()})
    for c in range(4):
        torch.testing.assert_close(dxs[c], (hi[0][c] - lo[0][c]) / (2 * h), rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(dgs[c], (hi[1][c] - lo[1][c]) / (2 * h), rtol=1e-6, atol=1e-8)


def test_capture_rejects_bad_probes_and_seeds():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    params = dict(net.named_parameters())
    with pytest.raises(ValueError, match="probe for call 1"):
        layer_inputs_and_cotangents(net, params, x, ["0", "2"], probes={1: torch.zeros(5, 4)})
    with pytest.raises(ValueError, match="seed for call 5"):
        layer_inputs_and_cotangents(net, params, x, ["0", "2"], seeds={5: torch.zeros(2, 5, 4)})
    with pytest.raises(ValueError, match="k = 2 outputs"):
        layer_inputs_and_cotangents(net, params, x, ["0", "2"], seeds={1: torch.zeros(3, 5, 4)})


def test_capture_rejects_changed_call_pattern():
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    x = torch.randn(4, 3)
    calls = trace_calls(net, x, ["0"])
    with pytest.raises(RuntimeError, match="traced"):
        layer_inputs_and_cotangents(net, dict(net.named_parameters()), torch.randn(5, 3), ["0"], calls=calls)
    with pytest.raises(KeyError, match="not a submodule"):
        trace_calls(net, x, ["nope"])


# ------------------------------------------------------------------ learning rates (8.6)


def test_resolve_learning_rates_forms():
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 1))
    net[1].weight = net[0].weight  # tied: counted once under "0.weight"
    net[2].bias.requires_grad_(False)  # frozen: never listed
    names = ["0.weight", "0.bias", "1.bias", "2.weight"]
    assert resolve_learning_rates(net, None) == {n: 1.0 for n in names}
    assert resolve_learning_rates(net, 0.25) == {n: 0.25 for n in names}
    lam = resolve_learning_rates(net, {"1.weight": 3.0, "2.weight": 0.5})  # alias of 0.weight
    assert lam == {"0.weight": 3.0, "0.bias": 1.0, "1.bias": 1.0, "2.weight": 0.5}
    groups = [{"params": [net[0].weight, net[0].bias], "lr": 0.1, "name": "first"},
              {"params": ["2.weight"], "lr": 2.0}]
    assert resolve_learning_rates(net, groups) == {"0.weight": 0.1, "0.bias": 0.1, "1.bias": 0.0, "2.weight": 2.0}


def test_resolve_learning_rates_errors():
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    with pytest.raises(ValueError, match="not a parameter of the model"):
        resolve_learning_rates(net, {"9.weight": 1.0})
    with pytest.raises(ValueError, match="more than one param group"):
        resolve_learning_rates(net, [{"params": [net[0].weight], "lr": 1.0}, {"params": [net[0].weight], "lr": 2.0}])
    with pytest.raises(ValueError, match="has no 'lr'"):
        resolve_learning_rates(net, [{"params": [net[0].weight]}])
    with pytest.raises(ValueError, match=">= 0"):
        resolve_learning_rates(net, -1.0)
    with pytest.raises(ValueError, match="not a parameter of this model"):
        resolve_learning_rates(net, [{"params": [torch.zeros(2)], "lr": 1.0}])
    with pytest.raises(TypeError, match="must be None, a number"):
        resolve_learning_rates(net, "fast")
