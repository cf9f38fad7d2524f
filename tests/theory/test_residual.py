"""Residual MLPs (Appendix B): critical C_W(gamma), nu(gamma), r*(gamma), gamma*(r), recursions."""
from __future__ import annotations

import math

import pytest
import torch

from torch_crit.theory import (
    UniversalityClass,
    critical_point,
    g_function,
    get_activation,
    optimal_aspect_ratio,
    optimal_residual_gamma,
    residual_chi_parallel,
    residual_chi_perp,
    residual_critical_point,
    residual_kernel_and_ntk_recursion,
    residual_kernel_recursion,
    residual_nu,
)

f64 = dict(dtype=torch.float64)


def test_critical_hyperparameters_b20_b21() -> None:
    g = 0.6
    cp = residual_critical_point("relu", g)
    assert (cp.C_b, cp.C_W, cp.gamma) == (0.0, pytest.approx(2 * (1 - g * g), rel=1e-15), g)
    cp = residual_critical_point("tanh", g)
    assert cp.C_W == pytest.approx(1 - g * g, rel=1e-15) and cp.universality_class is UniversalityClass.K_STAR_ZERO
    lk = residual_critical_point(get_activation("leaky_relu", a=0.2), g)
    assert lk.C_W == pytest.approx((1 - g * g) / ((1 + 0.04) / 2), rel=1e-14)
    # susceptibilities are one at the residual critical point (B.15)-(B.16)
    K = torch.tensor([0.5, 2.0], **f64)
    torch.testing.assert_close(residual_chi_perp("relu", K, 2 * (1 - g * g), g), torch.ones(2, **f64))
    torch.testing.assert_close(residual_chi_parallel("relu", K, 2 * (1 - g * g), g), torch.ones(2, **f64))
    # half-stable: same K*, both C's scaled by 1 - gamma^2 [derived here]; fixed point of (B.12)
    sw, sw_r = critical_point("swish"), residual_critical_point("swish", g)
    assert sw_r.K_star == sw.K_star
    Ks = sw_r.K_star
    assert sw_r.C_b + sw_r.C_W * float(g_function("swish", Ks)) + g * g * Ks == pytest.approx(Ks, rel=1e-12)
    assert float(residual_chi_perp("swish", Ks, sw_r.C_W, g)) == pytest.approx(1.0, rel=1e-12)


def test_gamma_one_is_unsatisfiable() -> None:
    with pytest.raises(ValueError, match="gamma = 1 cannot be critical"):
        residual_critical_point("relu", 1.0)


def test_nu_b29_b35() -> None:
    for g in (0.0, 0.3, 0.8, 1.0):
        t = 1 - g * g
        assert residual_nu("relu", g) == pytest.approx(t * (t * 5 + 4 * g * g), rel=1e-14, abs=1e-15)
        assert residual_nu("linear", g) == pytest.approx(t * (t * 2 + 4 * g * g), rel=1e-14, abs=1e-15)
        assert residual_nu("tanh", g) == pytest.approx(2 / 3 * (1 - g**4), rel=1e-14, abs=1e-15)
    assert residual_nu("relu", 1.0) == 0.0 and residual_nu("tanh", 1.0) == 0.0   # nu(1) = 0
    assert residual_nu("relu", math.sqrt(0.5)) == pytest.approx(9 / 4)
    with pytest.raises(ValueError, match="scale-invariant"):
        residual_nu("gelu", 0.5)


def test_optimal_aspect_ratio_and_gamma() -> None:
    # (A.73) plain MLP, n_L = 10: r* = 4/50/nu
    assert optimal_aspect_ratio("tanh", 0.0, n_out=10) == pytest.approx(0.08 / (2 / 3))
    assert optimal_aspect_ratio("relu", 0.0, n_out=10) == pytest.approx(0.016)
    assert optimal_aspect_ratio("linear", 0.0, n_out=10) == pytest.approx(0.04)
    # shallow networks do not want residual connections
    assert optimal_residual_gamma("relu", depth=2, width=1000) == 0.0
    for name in ("relu", "tanh", "leaky_relu"):
        for depth in (50, 400, 3000):
            g = optimal_residual_gamma(name, depth=depth, width=100, n_out=2)
            assert 0 < g < 1
            # read forwards again: r*(gamma*) = r  (B.36)
            assert optimal_aspect_ratio(name, g, n_out=2) == pytest.approx(depth / 100, rel=1e-10)
    # footnote 7: 1 - gamma*^2 ~ 1/r for large r
    r1 = 1 - optimal_residual_gamma("relu", 1000, 10) ** 2
    r2 = 1 - optimal_residual_gamma("relu", 4000, 10) ** 2
    assert r1 / r2 == pytest.approx(4.0, rel=1e-3)


def test_residual_recursions() -> None:
    g, L = 0.7, 20
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(2), **f64)
    cp = residual_critical_point("relu", g)
    K = residual_kernel_recursion("relu", cp.C_b, cp.C_W, g, x, depth=L)
    # layer 1 plain, then norms preserved: K_ii^(l+1) = (1 - g^2) K_ii + g^2 K_ii
    torch.testing.assert_close(K[:, range(3), range(3)], K[0].diagonal().expand(L, 3), rtol=1e-14, atol=0)
    # gamma = 0 is the plain MLP
    from torch_crit.theory import kernel_and_ntk_recursion
    plain = kernel_and_ntk_recursion("tanh", 0.0, 1.0, 0.5, 1.0, x[:2], depth=4)
    res = residual_kernel_and_ntk_recursion("tanh", 0.0, 1.0, 0.0, 0.5, 1.0, x[:2], depth=4)
    torch.testing.assert_close(res.K, plain.K, rtol=0, atol=0)
    torch.testing.assert_close(res.Theta, plain.Theta, rtol=0, atol=0)
    # residual NTK, single input, ReLU at criticality: Theta' = Theta + lambda_b + lambda_W A2 K* (chi_perp = 1)
    S = residual_kernel_and_ntk_recursion("relu", cp.C_b, cp.C_W, g, 0.3, 0.9, gram=torch.ones(1, 1, **f64), depth=5)
    steps = S.Theta[1:, 0, 0] - S.Theta[:-1, 0, 0]
    Kstar = float(S.K[0, 0, 0])
    torch.testing.assert_close(steps, torch.full((4,), 0.3 + 0.9 * 0.5 * Kstar, **f64), rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="length depth"):
        residual_kernel_recursion("relu", 0.0, 1.0, [0.5, 0.5], x, depth=3)


@pytest.mark.slow
def test_residual_kernel_monte_carlo() -> None:
    """Residual tanh MLP ensemble vs (B.11); tolerance 4 SE + 3 l/n |K| (O(1/n) bias allowance)."""
    gen = torch.Generator().manual_seed(4)
    g, width, depth, M = 0.8, 256, 4, 150
    cp = residual_critical_point("tanh", g)
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(8), **f64)
    K = residual_kernel_recursion("tanh", cp.C_b, cp.C_W, g, x, depth=depth)
    z = x.expand(M, 2, 6) @ (torch.randn(M, 6, width, generator=gen, **f64) * math.sqrt(cp.C_W / 6))
    for l in range(2, depth + 1):
        W = torch.randn(M, width, width, generator=gen, **f64) * math.sqrt(cp.C_W / width)
        z = torch.tanh(z) @ W + g * z
        per_net = z @ z.transpose(1, 2) / width
        mean, se = per_net.mean(0), per_net.std(0) / math.sqrt(M)
        assert bool(((mean - K[l - 1]).abs() <= 4 * se + 3 * l / width * K[l - 1].abs()).all())
