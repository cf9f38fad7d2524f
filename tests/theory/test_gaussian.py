"""Gaussian expectations: quadrature vs closed forms, moments, Monte Carlo, bad input."""
from __future__ import annotations

import math

import pytest
import torch

from torch_crit.theory import expect1, expect1_dK, expect2, get_activation
from torch_crit.theory.gaussian import erf_pair_expectation, piecewise_linear_pair_expectation

f64 = dict(dtype=torch.float64)
K = torch.tensor([1e-4, 0.3, 1.0, 4.0, 25.0], **f64)


def test_expect1_moments_and_shape() -> None:
    torch.testing.assert_close(expect1(lambda z: z**4, K), 3 * K**2, rtol=1e-13, atol=0)
    torch.testing.assert_close(expect1(lambda z: z**6, K), 15 * K**3, rtol=1e-13, atol=0)
    torch.testing.assert_close(expect1(torch.cos, K), torch.exp(-K / 2), rtol=1e-13, atol=1e-14)  # cancellation
    torch.testing.assert_close(expect1(torch.exp, K[:4]), torch.exp(K[:4] / 2), rtol=1e-13, atol=0)
    KK = K.reshape(5, 1).expand(5, 3)
    assert expect1(torch.cos, KK).shape == (5, 3)
    assert float(expect1(lambda z: z + 2.0, torch.tensor(0.0, **f64))) == pytest.approx(2.0, rel=1e-15)  # K = 0: f(0)


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "elu"])
def test_expect1_kinked_is_exact(name: str) -> None:
    act = get_activation(name)
    if name == "elu":  # <elu^2> in closed form: K/2 + E[(e^z - 1)^2; z<0]
        def exact(k: torch.Tensor) -> torch.Tensor:
            from torch.special import log_ndtr
            return (k / 2 + torch.exp(2 * k + log_ndtr(-2 * k.sqrt()))
                    - 2 * torch.exp(k / 2 + log_ndtr(-k.sqrt())) + 0.5)
    else:
        def exact(k: torch.Tensor) -> torch.Tensor:
            return act.A2 * k
    torch.testing.assert_close(expect1(lambda z: act(z) ** 2, K, kinks=act.kinks), exact(K), rtol=1e-12, atol=1e-17)


def _kernels() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    K11 = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0, 0.2], **f64)
    K22 = torch.tensor([1.0, 0.5, 0.5, 1.5, 2.0, 0.7], **f64)
    rho = torch.tensor([0.3, -0.9, 0.999, 0.0, -0.2, 0.95], **f64)
    return K11, rho * torch.sqrt(K11 * K22), K22


@pytest.mark.parametrize("name,params", [("relu", {}), ("leaky_relu", {"a": 0.3}), ("linear", {}),
                                         ("erf", {}), ("sin", {})])
@pytest.mark.parametrize("order", [0, 1])
def test_expect2_quadrature_matches_closed_form(name: str, params: dict, order: int) -> None:
    act = get_activation(name, **params)
    K11, K12, K22 = _kernels()
    closed = expect2(act.fn(order), act.fn(order), K11, K12, K22)
    quad = expect2(act.fn(order), act.fn(order), K11, K12, K22, closed_form=False)
    torch.testing.assert_close(quad, closed, rtol=1e-10, atol=1e-12)


def test_closed_forms_against_book_equal_norm() -> None:
    # (5.158): ReLU, K = K_d [[1, cos psi], [cos psi, 1]]
    Kd, psi = 1.7, torch.tensor([0.1, 1.0, 2.5], **f64)
    out = piecewise_linear_pair_expectation(1.0, 0.0, Kd, Kd * torch.cos(psi), Kd, 0)
    torch.testing.assert_close(out, Kd / (2 * math.pi) * (torch.sin(psi) + (math.pi - psi) * torch.cos(psi)))
    # (5.161)
    out = piecewise_linear_pair_expectation(1.0, 0.2, Kd, Kd * torch.cos(psi), Kd, 1)
    torch.testing.assert_close(out, (1 + 0.04) / 2 - psi / (2 * math.pi) * 0.64)
    # arcsine kernel at coincident inputs equals <erf^2>
    k = torch.tensor([0.4], **f64)
    torch.testing.assert_close(erf_pair_expectation(k, k, k), expect1(lambda z: torch.erf(z) ** 2, k), rtol=1e-13, atol=0)


def test_expect2_smooth_generic_and_degenerate() -> None:
    K11, K12, K22 = _kernels()
    # Mehler/Isserlis: <z1^2 z2^2> = K11 K22 + 2 K12^2
    quad = expect2(lambda z: z**2, lambda z: z**2, K11, K12, K22)
    torch.testing.assert_close(quad, K11 * K22 + 2 * K12**2, rtol=1e-12, atol=0)
    # exactly singular kernel (identical inputs): <f(z) g(z)>
    k = torch.tensor([0.8, 2.0], **f64)
    torch.testing.assert_close(expect2(torch.tanh, torch.tanh, k, k, k), expect1(lambda z: torch.tanh(z) ** 2, k),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(expect2(torch.tanh, torch.tanh, k, -k, k), -expect1(lambda z: torch.tanh(z) ** 2, k),
                               rtol=1e-12, atol=0)
    # zero variance on one side: <f(0)> <g>
    out = expect2(lambda z: z + 1.0, torch.cos, torch.zeros(1, **f64), torch.zeros(1, **f64), torch.ones(1, **f64))
    torch.testing.assert_close(out, torch.exp(torch.tensor([-0.5], **f64)), rtol=1e-13, atol=0)


def test_expect1_dK_matches_derivative_of_closed_form() -> None:
    k = torch.tensor([0.3, 1.0, 3.0], **f64)
    erf2 = lambda z: torch.erf(z) ** 2  # noqa: E731
    g = lambda kk: (2 / math.pi) * torch.asin(2 * kk / (1 + 2 * kk))  # noqa: E731
    kk = k.clone().requires_grad_(True)
    (d1,) = torch.autograd.grad(g(kk).sum(), kk, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), kk)
    torch.testing.assert_close(expect1_dK(erf2, k, 1), d1.detach(), rtol=1e-11, atol=0)
    torch.testing.assert_close(expect1_dK(erf2, k, 2), d2, rtol=1e-9, atol=0)


@pytest.mark.slow
def test_monte_carlo() -> None:
    """Quadrature vs 2e6 Gaussian draws; tolerance = 5 standard errors of the MC mean."""
    gen = torch.Generator().manual_seed(1)
    n = 2_000_000
    K11, K12, K22 = 1.3, -0.6, 0.9
    L = torch.linalg.cholesky(torch.tensor([[K11, K12], [K12, K22]], **f64))
    z = torch.randn(n, 2, generator=gen, **f64) @ L.T
    gelu = get_activation("gelu")
    vals = gelu(z[:, 0]) * torch.tanh(z[:, 1])
    quad = float(expect2(gelu.fn(), torch.tanh, torch.tensor(K11, **f64), torch.tensor(K12, **f64), torch.tensor(K22, **f64)))
    se = float(vals.std()) / math.sqrt(n)
    assert abs(float(vals.mean()) - quad) < 5 * se


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="variance"):
        expect1(torch.tanh, torch.tensor([-0.5], **f64))
    with pytest.raises(ValueError, match="finite"):
        expect1(torch.tanh, torch.tensor([float("nan")], **f64))
    with pytest.raises(ValueError, match="non-finite"):
        expect1(lambda z: torch.exp(z * z), torch.tensor([100.0], **f64))  # overflows on the nodes
    with pytest.raises(ValueError, match="positive semi-definite"):
        expect2(torch.tanh, torch.tanh, 1.0, 1.5, 1.0)
    with pytest.raises(ValueError, match="K22"):
        expect2(torch.tanh, torch.tanh, 1.0, 0.0, -1.0)
    with pytest.raises(ValueError, match="non-finite"):
        expect2(torch.exp, lambda z: torch.exp(z**2), 1.0, 0.0, 100.0)
    with pytest.raises(ValueError, match="n_nodes"):
        expect1(torch.tanh, 1.0, n_nodes=1)
    with pytest.raises(ValueError, match="K > 0"):
        expect1_dK(torch.tanh, 0.0)


@pytest.mark.parametrize("name", ["tanh", "gelu", "swish"])
@pytest.mark.parametrize("order", [0, 1])
def test_expect2_shared_grid_matches_adaptive_panels(name: str, order: int) -> None:
    """The shared-grid fast path (smooth built-ins, K <= 10) against the per-pair adaptive
    panels at 64 nodes (independent scheme), incl. rho -> 1 and rho = 1 exactly; 1e-10 relative."""
    from torch_crit.theory import gaussian

    f = get_activation(name).fn(order)
    rho = torch.tensor([-0.99, -0.5, 0.0, 0.3, 0.9, 0.999999, 1.0], **f64)
    for Kd in (0.05, 1.0, 2.9, 9.0):
        K11 = torch.full_like(rho, Kd)
        K22 = 0.7 * K11
        K12 = rho * torch.sqrt(K11 * K22)
        assert gaussian._fixed_grid_nodes(f, f, K11, K22) is not None  # the fast path is taken
        fast = expect2(f, f, K11, K12, K22)
        ref = expect2(f, f, K11, K12, K22, n_nodes=64)  # explicit n_nodes: adaptive panels
        torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-13)


def test_expect2_shared_grid_only_where_accurate() -> None:
    from torch_crit.theory import gaussian

    tanh = get_activation("tanh").fn(0)
    one = torch.ones(1, **f64)
    assert gaussian._fixed_grid_nodes(tanh, tanh, one, 11.0 * one) is None  # K > 10: adaptive
    assert gaussian._fixed_grid_nodes(torch.tanh, torch.tanh, one, one) is None  # plain callable
    relu = get_activation("relu").fn(0)
    assert gaussian._fixed_grid_nodes(relu, relu, one, one) is None  # kinked
    sp = get_activation("softplus", beta=50.0).fn(0)
    assert gaussian._fixed_grid_nodes(sp, sp, one, one) is None  # parameters: scale not bounded
    t2 = get_activation("tanh").fn(2)
    assert gaussian._fixed_grid_nodes(t2, t2, one, one) is None  # only orders 0, 1 validated
