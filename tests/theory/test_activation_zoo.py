"""Every activation torch ships: the theory's own float64 form equals the module, derivatives are
right, and each gets its universality class and critical point (or an honest "none")."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_crit.errors import NoCriticalPointError
from torch_crit.theory import critical_point, get_activation
from torch_crit.theory.activations import activation_from_call, activation_from_module
from torch_crit.theory.criticality import chi_parallel, chi_perp, g_function

Z = torch.linspace(-7.3, 7.1, 1001, dtype=torch.float64)

MODULES = [
    nn.ReLU(), nn.ReLU6(inplace=True), nn.Hardtanh(-2.0, 1.5), nn.Hardswish(inplace=True), nn.Hardsigmoid(),
    nn.SiLU(), nn.Mish(), nn.ELU(0.7), nn.SELU(), nn.CELU(0.5), nn.GELU(), nn.GELU(approximate="tanh"),
    nn.LeakyReLU(0.2), nn.PReLU(init=0.3).double(), nn.Softsign(), nn.Softplus(beta=2.0), nn.LogSigmoid(),
    nn.Tanhshrink(), nn.Tanh(), nn.Sigmoid(), nn.Softshrink(0.4), nn.Hardshrink(0.4), nn.Threshold(0.3, -0.2),
]


def _ref(m: nn.Module, z: torch.Tensor) -> torch.Tensor:
    return m(z.clone()).detach()


@pytest.mark.parametrize("m", MODULES, ids=lambda m: type(m).__name__)
def test_theory_form_equals_module_and_leaves_it_alone(m):
    state = {k: v.clone() for k, v in m.state_dict().items()}
    act = get_activation(m)
    assert activation_from_module(m) == act
    torch.testing.assert_close(act.sigma(Z), _ref(m, Z), rtol=1e-12, atol=1e-12)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("m", [m for m in MODULES if not isinstance(m, (nn.Hardshrink, nn.Threshold))],
                         ids=lambda m: type(m).__name__)
def test_derivatives_match_finite_differences(m):
    act = get_activation(m)
    away = torch.stack([(Z - k).abs() for k in act.kinks]).min(0).values > 1e-3 if act.kinks else torch.ones_like(Z, dtype=torch.bool)
    z = Z[away]
    h = 1e-5
    fd1 = (act.sigma(z + h) - act.sigma(z - h)) / (2 * h)
    torch.testing.assert_close(act.derivative(z, 1), fd1, rtol=1e-6, atol=1e-7)
    fd2 = (act.derivative(z + h, 1) - act.derivative(z - h, 1)) / (2 * h)
    torch.testing.assert_close(act.derivative(z, 2), fd2, rtol=1e-5, atol=1e-6)


CALLS = [
    (F.relu_, (), {}, "relu"), (torch.relu_, (), {}, "relu"), (torch.Tensor.relu_, (), {}, "relu"),
    (F.relu6, (), {}, "relu6"), (torch.clamp, (0, 6), {}, "relu6"), (torch.clamp_min, (0.0,), {}, "relu"),
    (F.hardtanh_, (-2.0, 1.5), {}, "hardtanh(max_val=1.5,min_val=-2)"), (F.hardswish, (), {}, "hardswish"),
    (F.gelu, (), {"approximate": "tanh"}, "gelu_tanh"), (F.gelu, (), {}, "gelu"), (F.silu, (), {}, "swish"),
    (F.leaky_relu, (0.2,), {}, "leaky_relu(a=0.2)"), (F.leaky_relu_, (), {"negative_slope": 0.3}, "leaky_relu(a=0.3)"),
    (F.elu_, (), {"alpha": 0.5}, "elu(alpha=0.5)"), (torch.tanh_, (), {}, "tanh"), (torch.Tensor.sigmoid, (), {}, "sigmoid"),
    (F.mish, (), {}, "mish"), (F.softplus, (2.0,), {}, "softplus(beta=2)"), (F.celu, (), {"alpha": 2.0}, "celu(alpha=2)"),
]


@pytest.mark.parametrize("func,args,kwargs,key", CALLS, ids=lambda v: getattr(v, "__name__", None))
def test_activation_from_call_reads_the_call(func, args, kwargs, key):
    x = torch.zeros(3)
    act = activation_from_call(func, (x, *args), kwargs)
    assert act is not None and act.key == key


def test_non_activations_are_none():
    x = torch.zeros(3)
    assert activation_from_call(torch.add, (x, x), {}) is None
    assert activation_from_call(torch.clamp, (x, x, None), {}) is None  # tensor bounds
    assert activation_from_module(nn.Linear(2, 2)) is None
    assert activation_from_module(nn.Dropout()) is None


SMOOTH_CRITICAL = ["hardswish", "mish", "swish", "gelu", "gelu_tanh", "celu", "softsign", "elu", "selu", "softshrink"]


@pytest.mark.parametrize("name", SMOOTH_CRITICAL)
def test_critical_points_are_critical(name):
    cp = critical_point(name)
    K = 1e-8 if cp.K_star == 0 else cp.K_star
    assert float(chi_perp(name, K, cp.C_W)) == pytest.approx(1.0, abs=1e-3 if cp.K_star == 0 else 1e-8)
    if cp.K_star:
        assert cp.C_b + cp.C_W * float(g_function(name, K)) == pytest.approx(K, rel=1e-9)
        assert float(chi_parallel(name, K, cp.C_W)) == pytest.approx(1.0, abs=1e-6)


def test_locally_linear_activations_choice():
    """ReLU6 and Hardtanh are piecewise linear only near 0: ReLU's (0, 2) and the identity's (0, 1),
    valid while the kernel stays well inside the window; measured over depth."""
    r6 = critical_point("relu6")
    assert (r6.C_b, r6.C_W) == (0.0, 2.0) and "K << 36" in r6.notes
    ht = critical_point("hardtanh")
    assert (ht.C_b, ht.C_W) == (0.0, 1.0)
    # kernel recursion K' = C_W <sigma^2>_K over 20 layers: a small kernel is preserved to 1 %, a large
    # one (K = 25, units reach the saturation at 6) shrinks: the choice holds for K << 36.
    for K0, tol in ((0.5, 0.01), (25.0, None)):
        K = K0
        for _ in range(20):
            K = r6.C_W * float(g_function("relu6", K))
        if tol is None:
            assert K < 0.9 * K0
        else:
            assert K == pytest.approx(K0, rel=tol)


@pytest.mark.parametrize("name", ["sigmoid", "hardsigmoid", "logsigmoid", "tanhshrink", "hardshrink"])
def test_no_critical_point_is_honest(name):
    with pytest.raises(NoCriticalPointError) as info:
        critical_point(name)
    err = info.value
    assert err.reason and err.suggestion and err.nearest is not None
    assert 0 < err.nearest.C_W < 10  # never a saturating C_W ~ 100


def test_rrelu_reads_eval_mean_and_says_so():
    act = get_activation(nn.RReLU(0.1, 0.3))
    assert act.slopes == (1.0, pytest.approx(0.2)) and "eval mode" in act.note
