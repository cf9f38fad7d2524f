"""Activation registry: names, modules, functionals, callables, derivatives, Taylor data."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_crit.theory import Activation, available_activations, get_activation, parse_activation_spec

ALL_SPECS = [
    ("relu", {}), ("leaky_relu", {"a": 0.2}), ("linear", {}), ("tanh", {}), ("sin", {}), ("erf", {}),
    ("sigmoid", {}), ("softplus", {"beta": 1.7}), ("swish", {}), ("swish", {"beta": 1.3}), ("gelu", {}),
    ("gelu_tanh", {}), ("elu", {"alpha": 0.7}), ("selu", {}), ("monomial", {"p": 3}), ("monomial", {"p": 2}),
]
Z = torch.tensor([-2.3, -1.1, -0.4, 0.3, 0.9, 1.7, 2.6], dtype=torch.float64)  # away from kinks


@pytest.mark.parametrize("name,params", ALL_SPECS)
def test_closed_form_derivatives_match_autograd(name: str, params: dict) -> None:
    act = get_activation(name, **params)
    for order in (1, 2, 3):
        closed = act.derivative(Z, order)
        auto = torch.stack([_autograd(act.sigma, z, order) for z in Z])
        torch.testing.assert_close(closed, auto, rtol=1e-12, atol=1e-12)


def _autograd(f, z: torch.Tensor, order: int) -> torch.Tensor:
    x = z.clone().requires_grad_(True)
    y = f(x)
    for k in range(order):
        if not y.requires_grad:
            return torch.zeros((), dtype=torch.float64)
        (y,) = torch.autograd.grad(y, x, create_graph=True)
    return y.detach()


@pytest.mark.parametrize("name,params", [s for s in ALL_SPECS if s[0] not in {"relu", "leaky_relu", "elu", "selu"}])
def test_taylor_coefficients_match_autograd_at_zero(name: str, params: dict) -> None:
    act = get_activation(name, **params)
    z0 = torch.zeros((), dtype=torch.float64)
    expected = [float(act.sigma(z0))] + [float(_autograd(act.sigma, z0, k)) for k in range(1, 6)]
    assert act.taylor is not None
    np.testing.assert_allclose(act.taylor, expected, rtol=1e-12, atol=1e-12)


def test_known_taylor_and_slopes() -> None:
    assert get_activation("tanh").taylor == (0.0, 1.0, 0.0, -2.0, 0.0, 16.0)
    assert get_activation("relu").slopes == (1.0, 0.0) and get_activation("relu").taylor is None
    assert get_activation("leaky_relu", a=0.1).slopes == (1.0, 0.1)
    assert get_activation("linear").A2 == 1.0 and get_activation("relu").A2 == 0.5
    assert get_activation("relu").A4 == 0.5
    gelu = get_activation("gelu")
    assert gelu.taylor[2] == pytest.approx(math.sqrt(2 / math.pi), rel=1e-15)


@pytest.mark.parametrize("module,key", [
    (nn.ReLU(), "relu"), (nn.LeakyReLU(0.2), "leaky_relu(a=0.2)"), (nn.GELU(), "gelu"),
    (nn.GELU(approximate="tanh"), "gelu_tanh"), (nn.Tanh(), "tanh"), (nn.SiLU(), "swish"),
    (nn.ELU(0.5), "elu(alpha=0.5)"), (nn.SELU(), "selu"), (nn.Softplus(beta=2.0), "softplus(beta=2)"),
    (nn.Sigmoid(), "sigmoid"), (nn.Identity(), "linear"), (nn.PReLU(init=0.3), "leaky_relu(a=0.3)"),
])
def test_modules(module: nn.Module, key: str) -> None:
    act = get_activation(module)
    assert act.key == key
    z = torch.linspace(-3, 3, 13, dtype=torch.float64)
    torch.testing.assert_close(act.sigma(z), module.double()(z), rtol=1e-6 if key.startswith("prelu") else 1e-12, atol=1e-12)


@pytest.mark.parametrize("fn,key", [
    (F.relu, "relu"), (torch.relu, "relu"), (F.gelu, "gelu"), (torch.tanh, "tanh"), (torch.sin, "sin"),
    (F.silu, "swish"), (torch.sigmoid, "sigmoid"), (torch.erf, "erf"), (F.softplus, "softplus(beta=1)"),
    (F.elu, "elu(alpha=1)"), (F.selu, "selu"), (F.leaky_relu, "leaky_relu(a=0.01)"), (np.tanh, "tanh"),
])
def test_functionals(fn, key: str) -> None:
    assert get_activation(fn).key == key


def test_user_callable_torch_uses_autograd() -> None:
    act = get_activation(lambda z: 1.5 * torch.tanh(0.7 * z), name="scaled_tanh")
    assert act.name == "custom:scaled_tanh" and act.derivative_source == "autograd"
    torch.testing.assert_close(act.derivative(Z, 1), 1.05 / torch.cosh(0.7 * Z) ** 2, rtol=1e-13, atol=0)
    assert act.taylor[1] == pytest.approx(1.05, rel=1e-14)
    assert act.taylor[3] == pytest.approx(-2 * 1.5 * 0.7**3, rel=1e-12)


def test_user_callable_numpy_finite_differences() -> None:
    with pytest.warns(UserWarning, match="finite differences"):
        act = get_activation(lambda z: np.arctan(z), name="atan")
    exact = 1 / (1 + Z**2)
    torch.testing.assert_close(act.derivative(Z, 1), exact, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(act.derivative(Z, 2), -2 * Z / (1 + Z**2) ** 2, rtol=1e-6, atol=1e-7)


def test_parameter_free_module_used_as_callable() -> None:
    class Cube(nn.Module):
        def forward(self, z):
            return z * z * z

    act = get_activation(Cube())
    assert act.name == "custom:Cube"
    torch.testing.assert_close(act.sigma(Z), Z**3)


def test_parse_spec_and_key_stable() -> None:
    assert parse_activation_spec("leaky_relu:0.1").key == "leaky_relu(a=0.1)"
    assert parse_activation_spec("monomial:3").key == "monomial(p=3)"
    assert parse_activation_spec("softplus:beta=2").key == "softplus(beta=2)"
    assert repr(get_activation("silu")) == "Activation(swish)"
    assert get_activation("relu") == get_activation(nn.ReLU())
    with pytest.raises(ValueError, match="positional"):
        parse_activation_spec("tanh:3")
    with pytest.raises(ValueError, match="not a number"):
        parse_activation_spec("leaky_relu:abc")


def test_immutable() -> None:
    act = get_activation("tanh")
    with pytest.raises(AttributeError):
        act.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        act.params["a"] = 1.0  # type: ignore[index]


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="Accepted names: .*relu.*tanh"):
        get_activation("relu6x")
    with pytest.raises(TypeError, match="unexpected parameters"):
        get_activation("tanh", a=1.0)
    with pytest.raises(ValueError, match="integer power"):
        get_activation("monomial", p=0)
    prelu = nn.PReLU(num_parameters=3)
    assert get_activation(prelu).key == "leaky_relu(a=0.25)"  # equal slopes: one activation
    with torch.no_grad():
        prelu.weight[1] = 0.5
    with pytest.raises(ValueError, match="one slope"):
        get_activation(prelu)
    with pytest.raises(TypeError, match="has parameters"):
        get_activation(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="elementwise"):
        get_activation(lambda z: z.sum())
    with pytest.raises(ValueError, match="non-negative int"):
        get_activation("tanh").derivative(Z, -1)
    assert "relu" in available_activations() and isinstance(get_activation("tanh"), Activation)


def test_float32_and_no_mutation() -> None:
    z = torch.tensor([0.5, -0.5], dtype=torch.float32)
    z0 = z.clone()
    out = get_activation("gelu").derivative(z, 2)
    assert out.dtype == torch.float32 and torch.equal(z, z0)


def test_from_module_and_lazy_theory_names() -> None:
    import torch_crit.theory as theory

    assert Activation.from_module(nn.LeakyReLU(0.2)).key == "leaky_relu(a=0.2)"
    with pytest.raises(AttributeError, match="no attribute 'definitely_missing'"):
        getattr(theory, "definitely_missing")
    assert "critical_point" in dir(theory) and "finite_width" in dir(theory)
