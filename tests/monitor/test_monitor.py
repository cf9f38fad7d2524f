"""KernelFlowMonitor: no side effects, hook hygiene, metrics against direct computations."""
from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from _references import mlp, reference_ntk
from torch_crit.monitor import JSONLWriter, KernelFlowMonitor


def engine():
    """The package's NTK engine when it is built, else the brute-force reference."""
    try:
        from torch_crit import empirical_ntk

        return empirical_ntk
    except (ImportError, AttributeError):
        return reference_ntk


def jac_ntk(model: nn.Module, x: torch.Tensor, lam: dict[str, float] | None = None) -> torch.Tensor:
    """Independent brute force: torch.func full Jacobian, Θ[N, N, k, k] = Σ_p λ_p J_p J_pᵀ."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    J = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    n, k = model(x).shape
    out = torch.zeros(n, n, k, k, dtype=torch.float64)
    for name, j in J.items():
        j = j.reshape(n, k, -1).double()
        out += (1.0 if lam is None else lam[name]) * torch.einsum("iap,jbp->ijab", j, j)
    return out


def _data(n=24, d=5, k=2, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, dtype=torch.float64, generator=g), torch.randn(n, k, dtype=torch.float64, generator=g)


def _train(model, opt, x, y, steps, monitor=None):
    losses = []
    ctx = monitor.attach(opt) if monitor is not None else None
    try:
        for _ in range(steps):
            loss = ((model(x) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach().clone())
    finally:
        if ctx is not None:
            ctx.close()
    return losses


def _hooks(model, opt):
    n_fwd = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return n_fwd, len(opt._optimizer_step_post_hooks) + len(opt._optimizer_step_pre_hooks)


def _noisy_ntk(model, x, **kw):
    torch.rand(3)  # consumes the global RNG: the monitor must restore it
    return reference_ntk(model, x, **kw)


def _bn_dropout_net():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 2)).double()


@pytest.mark.parametrize("make", [lambda: mlp(), _bn_dropout_net], ids=["mlp", "batchnorm+dropout"])
def test_no_side_effects_bit_for_bit(make):
    x, y = _data()
    runs = []
    for with_monitor in (False, True):
        model = make()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        torch.manual_seed(11)
        mon = None
        if with_monitor:
            mon = KernelFlowMonitor(model, x[:6], y[:6], every=3, ntk_fn=_noisy_ntk, ntk_output="full")
        losses = _train(model, opt, x, y, 20, mon)
        runs.append((losses, copy.deepcopy(model.state_dict()), torch.get_rng_state(), model, opt, mon))
    (l0, s0, r0, _, _, _), (l1, s1, r1, model, opt, mon) = runs
    assert len(mon.records) == 7  # steps 0, 3, ..., 18
    assert all(torch.equal(a, b) for a, b in zip(l0, l1))
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)  # params and BN buffers
    assert torch.equal(r0, r1)
    assert all(m.training for m in model.modules())
    assert _hooks(model, opt) == (0, 0)


def test_grads_and_modes_untouched_by_a_probe():
    x, y = _data()
    model = mlp()
    model[1].eval()  # a mixed-mode model: the monitor restores each module's own flag
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ((model(x) - y) ** 2).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    refs = [p.grad for p in model.parameters()]
    mon = KernelFlowMonitor(model, x[:4], every=1, ntk_fn=reference_ntk)
    mon.attach(opt)  # probes at step 0 with live gradients
    assert all(p.grad is r and torch.equal(p.grad, g) for p, r, g in zip(model.parameters(), refs, grads))
    assert [m.training for m in model.modules()] == [True, True, False, True, True, True]
    mon.detach()


def test_hooks_only_during_probe_and_removed_on_detach():
    x, y = _data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []

    def spy(state):
        seen.append(_hooks(model, opt))
        return {}

    mon = KernelFlowMonitor(model, x[:4], every=2, metrics=("preact_kernel", spy), ntk_fn=reference_ntk)
    mon.attach(opt)
    assert _hooks(model, opt) == (0, 1)  # between logging steps: only the step counter
    _train(model, opt, x, y, 3)
    assert mon.step == 3 and len(mon.records) == 2
    mon.detach()
    mon.detach()  # idempotent
    assert _hooks(model, opt) == (0, 0)
    with pytest.raises(RuntimeError, match="already attached"):
        mon.attach(opt)
        mon.attach(opt)
    mon.detach()


def test_context_manager_removes_hooks_on_exception(tmp_path):
    x, y = _data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = JSONLWriter(tmp_path / "log.jsonl")
    with pytest.raises(ZeroDivisionError):
        with KernelFlowMonitor(model, x[:4], every=1, ntk_fn=reference_ntk, writers=[writer]).attach(opt) as mon:
            _train(model, opt, x, y, 2)
            1 / 0
    assert _hooks(model, opt) == (0, 0)
    assert not mon.attached
    with pytest.raises(RuntimeError, match="closed"):
        writer.write(99, {})
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]


def test_preactivation_kernels_match_manual_forward():
    x, _ = _data()
    model = mlp(depth=4, width=12)
    mon = KernelFlowMonitor(model, x[:7], metrics=("preact_kernel",))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon.attach(opt)
    mon.detach()
    rec = mon.records[0]
    h = x[:7]
    labels = []
    for i, m in enumerate(model):
        with torch.no_grad():
            h = m(h)
        if isinstance(m, nn.Linear):
            K = h @ h.T / h.shape[1]
            d = torch.diagonal(K)
            rho = K / torch.sqrt(torch.outer(d, d))
            off = rho[~torch.eye(7, dtype=torch.bool)].mean()
            lab = f"l{len(labels) + 1:02d}.{i}"
            labels.append(lab)
            assert rec[f"preact/{lab}/K_diag"] == pytest.approx(float(d.mean()), rel=1e-13)
            assert rec[f"preact/{lab}/corr_offdiag"] == pytest.approx(float(off), rel=1e-12)
    assert labels == ["l01.0", "l02.2", "l03.4", "l04.6"]
    assert [li.activation for li in mon.last_state.layers] == ["tanh", "tanh", "tanh", None]


@pytest.mark.parametrize("output", ["trace", "full"])
def test_ntk_metrics_match_bruteforce(output):
    x, y = _data(n=24, k=3)
    model = mlp(depth=3, width=10, d_out=3)
    init = copy.deepcopy(model)
    groups = [{"params": [model[0].weight, model[0].bias], "lr": 0.02},
              {"params": [p for m in model[1:] for p in m.parameters()], "lr": 0.05}]
    opt = torch.optim.SGD(groups, lr=0.05)
    mon = KernelFlowMonitor(model, x[:6], y[:6], every=4, ntk_output=output, learning_rates="optimizer",
                            ntk_fn=engine(), ntk_kwargs={} if engine() is reference_ntk else {"dtype": torch.float64})
    _train(model, opt, x, y, 8, mon)
    names = dict((id(p), n) for n, p in model.named_parameters())
    lam = {names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
    th0 = jac_ntk(init, x[:6], lam)
    th = jac_ntk(model, x[:6], lam)
    if output == "trace":
        th0, th = torch.einsum("ijaa->ij", th0), torch.einsum("ijaa->ij", th)
    # the monitor's NTK equals the brute-force J Λ Jᵀ to round-off
    assert torch.allclose(mon.last_state.ntk.double(), th, rtol=1e-10, atol=1e-12 * th.abs().max())
    rec0, rec = mon.records[0], mon.records[-1]
    assert rec["step"] == 8
    mat = th if output == "trace" else th.permute(0, 2, 1, 3).reshape(18, 18)
    assert rec["ntk/diag_mean"] == pytest.approx(float(torch.diagonal(mat).mean()), rel=1e-10)
    assert rec["ntk/rel_change"] == pytest.approx(float((th - th0).norm() / th0.norm()), rel=1e-8)
    assert rec0["ntk/rel_change"] == 0.0
    lam_sorted = torch.linalg.eigvalsh(mat).flip(0)
    for i in range(3):
        assert rec[f"ntk/eig/{i}"] == pytest.approx(float(lam_sorted[i]), rel=1e-9)
    # per-layer shares of tr Θ (8.7)
    lay0 = jac_ntk_layer(model, x[:6], lam, "0")
    assert rec["ntk_layer/l01.0/share"] == pytest.approx(float(torch.einsum("iiaa->", lay0) / torch.diagonal(mat).sum()), rel=1e-9)
    yy = y[:6] @ y[:6].T
    T = yy if output == "trace" else torch.einsum("ia,jb->ijab", y[:6], y[:6])
    assert rec["ntk/alignment"] == pytest.approx(float((th * T).sum() / (th.norm() * T.norm())), rel=1e-9)


def jac_ntk_layer(model, x, lam, prefix):
    sub = {n: v for n, v in lam.items() if n.startswith(prefix + ".")}
    full = {n: (v if n in sub else 0.0) for n, v in lam.items()}
    return jac_ntk(model, x, full)


def test_default_engine_is_used_and_exact():
    try:
        from torch_crit import empirical_ntk  # noqa: F401
    except (ImportError, AttributeError):
        pytest.skip("torch_crit.empirical_ntk is not built in this tree yet")
    x, _ = _data()
    model = mlp()
    mon = KernelFlowMonitor(model, x[:5], metrics=("ntk",), ntk_output="full", ntk_kwargs={"dtype": torch.float64})
    mon.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    mon.detach()
    ref = jac_ntk(model, x[:5])
    assert torch.allclose(mon.last_state.ntk.double(), ref, rtol=1e-10, atol=1e-12 * ref.abs().max())


def test_bad_probe_device_and_dtype():
    model = mlp()
    with pytest.raises(TypeError, match=r"float32.*float64.*probe_inputs.to"):
        KernelFlowMonitor(model, torch.randn(4, 5), ntk_fn=reference_ntk)
    with pytest.raises(ValueError, match=r"meta.*cpu"):
        KernelFlowMonitor(model, torch.empty(4, 5, dtype=torch.float64, device="meta"), ntk_fn=reference_ntk)
    with pytest.raises(ValueError, match="at least 2"):
        KernelFlowMonitor(model, torch.randn(1, 5, dtype=torch.float64), ntk_fn=reference_ntk)
    with pytest.raises(ValueError, match="need probe_targets"):
        KernelFlowMonitor(model, torch.randn(4, 5, dtype=torch.float64), metrics=("ntk_alignment",), ntk_fn=reference_ntk)
    with pytest.raises(ValueError, match="every"):
        KernelFlowMonitor(model, torch.randn(4, 5, dtype=torch.float64), every=0, ntk_fn=reference_ntk)
    with pytest.raises(ValueError, match="unknown"):
        KernelFlowMonitor(model, torch.randn(4, 5, dtype=torch.float64), theory=dict(sigma_w=1.0), ntk_fn=reference_ntk)


def test_nonfinite_kernels_are_logged_and_training_continues(tmp_path):
    x, y = _data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = KernelFlowMonitor(model, x[:4], every=1, ntk_fn=reference_ntk, writers=[tmp_path / "f.jsonl"])
    with mon.attach(opt):
        _train(model, opt, x, y, 1)
        with torch.no_grad():
            model[2].weight[0, 0] = float("inf")
        with pytest.warns(RuntimeWarning, match="non-finite probe kernels at step 2"):
            _train(model, opt, x, y, 1)
    lines = [json.loads(s) for s in (tmp_path / "f.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2]
    bad = lines[-1]
    assert "ntk" in bad["monitor/nonfinite"] and "l02.2" in bad["monitor/nonfinite"]
    assert bad["preact/l02.2/K_diag"] is None and "preact/l02.2/K_diag" in bad["nonfinite"]


def test_engine_warnings_are_repeated_once():
    x, _ = _data()
    model = mlp()

    def warning_ntk(model, x, **kw):
        warnings.warn("layer 'x' is not covered by the structured path; using the generic path", UserWarning)
        return reference_ntk(model, x, **kw)

    mon = KernelFlowMonitor(model, x[:4], every=1, metrics=("ntk",), ntk_fn=warning_ntk)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="generic path") as rec:
        with mon.attach(opt):
            _train(model, opt, x, _data()[1], 3)
    assert len([w for w in rec if "generic path" in str(w.message)]) == 1


def test_uncovered_layer_falls_back_with_the_real_engine():
    try:
        from torch_crit import empirical_ntk  # noqa: F401
    except (ImportError, AttributeError):
        pytest.skip("torch_crit.empirical_ntk is not built in this tree yet")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 2)).double()
    x, y = _data()
    mon = KernelFlowMonitor(model, x[:4], every=1, metrics=("ntk",), ntk_output="full",
                            ntk_kwargs={"dtype": torch.float64})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with mon.attach(opt):
            _train(model, opt, x, y, 2)
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == len(set(msgs))  # each notice at most once
    ref = jac_ntk(model, x[:4])
    assert torch.allclose(mon.last_state.ntk.double(), ref, rtol=1e-10, atol=1e-12 * ref.abs().max())


def test_integer_targets_are_one_hot():
    x, _ = _data()
    model = mlp(d_out=3)
    labels = torch.tensor([0, 2, 1, 2])
    mon = KernelFlowMonitor(model, x[:4], labels, metrics=("ntk", "ntk_alignment"), ntk_fn=reference_ntk)
    mon.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    mon.detach()
    onehot = nn.functional.one_hot(labels, 3).double()
    from torch_crit.monitor import kernel_target_alignment

    assert mon.records[0]["ntk/alignment"] == pytest.approx(kernel_target_alignment(mon.last_state.ntk, onehot), rel=1e-14)


def test_state_dict_keeps_the_reference_across_a_resume():
    x, y = _data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = KernelFlowMonitor(model, x[:4], every=2, metrics=("ntk",), ntk_fn=reference_ntk)
    _train(model, opt, x, y, 4, mon)
    state = mon.state_dict()
    assert state["step"] == 4 and state["ref_step"] == 0
    mon2 = KernelFlowMonitor(model, x[:4], every=2, metrics=("ntk",), ntk_fn=reference_ntk)
    mon2.load_state_dict(state)
    mon2.attach(opt)  # continues from the restored step
    mon2.detach()
    assert mon2.records[0]["step"] == 4
    assert mon2.records[0]["ntk/rel_change"] == pytest.approx(mon.records[-1]["ntk/rel_change"], rel=1e-12)
    assert mon2.records[0]["ntk/ref_step"] == 0


def test_theory_at_step_zero():
    try:
        from torch_crit.theory.kernels import kernel_recursion  # noqa: F401
    except ImportError:
        pytest.skip("torch_crit.theory.kernel_recursion is not built in this tree yet")
    torch.manual_seed(0)
    width, C_b, C_W = 512, 0.05, 1.0
    model = mlp(depth=3, width=width, d_in=5, d_out=1)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=math.sqrt(C_W / m.in_features))
            nn.init.normal_(m.bias, std=math.sqrt(C_b))
    x, _ = _data(n=6)
    mon = KernelFlowMonitor(model, x, metrics=("preact_kernel", "ntk", "theory"), ntk_fn=engine(),
                            theory=dict(activation="tanh", C_b=C_b, C_W=C_W))
    mon.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    mon.detach()
    rec = mon.records[0]
    K1 = C_b + C_W * (x @ x.T) / 5  # (4.8): exact in the first layer
    assert rec["theory/preact/l01.0/K_diag"] == pytest.approx(float(torch.diagonal(K1).mean()), rel=1e-12)
    assert rec["theory/source"] == "user" and rec["theory/activation"] == "tanh"
    # measured vs the infinite-width kernel: the neuron average over n = 512 hidden units
    # fluctuates by ~ sqrt(2/n) ≈ 0.06 relative; allow 4 standard errors (the 1-unit readout
    # has no neuron average to test)
    assert rec["theory/preact/l02.2/rel_error"] < 4 * math.sqrt(2 / width)
    # the frozen NTK (9.5) with λ_b = 1, λ_W = n_{ℓ-1} (plain J Jᵀ), same O(1/sqrt(n)) scale
    assert rec["theory/ntk/rel_error"] < 4 * math.sqrt(2 / width)
    # default theory="auto": C_b, C_W read off the weights, activation from the model
    mon2 = KernelFlowMonitor(model, x, metrics=("theory",))
    mon2.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    mon2.detach()
    assert mon2.records[0]["theory/source"] == "weights"
    assert mon2.records[0]["theory/C_W"] == pytest.approx(C_W, rel=0.1)


@pytest.mark.parametrize("output,lrs", [("full", None), ("trace", "optimizer")])
def test_dntk_velocity_against_measured_change(output, lrs):
    x, y = _data(n=16, k=1)

    def groups(net):  # two learning rates: only λ = the optimizer's rates describes the step
        return [{"params": list(net[0].parameters()), "lr": 5e-4}, {"params": list(net[2:].parameters()), "lr": 1e-3}]

    plain = mlp(depth=3, width=24, d_out=1)
    plain_losses = _train(plain, torch.optim.SGD(groups(plain) if lrs else plain.parameters(), lr=1e-3), x, y, 5)
    model = mlp(depth=3, width=24, d_out=1)
    opt = torch.optim.SGD(groups(model) if lrs else model.parameters(), lr=1e-3)
    mon = KernelFlowMonitor(model, x[:5], every=3, metrics=("ntk", "ntk_velocity"), ntk_fn=reference_ntk,
                            ntk_output=output, learning_rates=lrs)
    losses = _train(model, opt, x, y, 5, mon)
    # the one-step hooks of the velocity metric change nothing either
    assert all(torch.equal(a, b) for a, b in zip(losses, plain_losses))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()))
    dn = [r for r in mon.records if "dntk/rel_error" in r]
    assert [r["step"] for r in dn] == [1, 4]
    for r in dn:
        # first order in η: the remainder is O(η) relative, here η ≤ 1e-3
        assert r["dntk/rel_error"] < 2e-2
        assert r["dntk/cosine"] > 0.999
        assert r["dntk/measured_norm"] > 0
    assert _hooks(model, opt) == (0, 0)


def test_dntk_velocity_refuses_mismatched_rates():
    x, y = _data(n=16, k=1)
    model = mlp(depth=3, width=8, d_out=1)
    opt = torch.optim.SGD([{"params": list(model[0].parameters()), "lr": 5e-4},
                           {"params": list(model[2:].parameters()), "lr": 1e-3}])
    mon = KernelFlowMonitor(model, x[:4], every=2, metrics=("ntk", "ntk_velocity"), ntk_fn=reference_ntk)
    with pytest.warns(UserWarning, match="learning_rates='optimizer'"):
        _train(model, opt, x, y, 3, mon)
    assert not [r for r in mon.records if "dntk/rel_error" in r]
    assert _hooks(model, opt) == (0, 0)
