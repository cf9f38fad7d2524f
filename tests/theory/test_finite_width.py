"""Finite-width recursions: closed forms at criticality, consistency, exact moments, errors."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from torch_crit.theory.finite_width import (
    RecursionDivergenceError,
    RecursionDivergenceWarning,
    critical_closed_forms,
    dntk_statistics,
    exact_metric_moments,
    finite_width_tensors,
    four_point_vertex,
    kernel_nlo_correction,
    nd_gaussian_expectation,
    ntk_preactivation_cross,
    ntk_variance,
    single_input_recursions,
)

D64 = torch.float64


# ---------------------------------------------------------------- scale-invariant: exact closed forms
@pytest.mark.parametrize("act,kwargs", [("relu", {}), ("leaky_relu", {"a": 0.2}), ("linear", {})])
def test_scale_invariant_recursions_equal_closed_forms(act, kwargs):
    """(5.120), (9.44), (9.49)-(9.51), (11.74), (11.79), (5.117) hold exactly in l (leading order)."""
    from torch_crit.theory.activations import get_activation

    a = get_activation(act, **kwargs)
    CW = 1 / a.A2
    x = torch.full((1, 5), 0.9, dtype=D64)
    K1 = CW * 0.81
    L = 30
    lb, lw = 0.3, 1.7
    th = single_input_recursions(a, 0.0, CW, x, L, lambda_b=lb, lambda_W=lw)
    cf = critical_closed_forms(a, range(1, L + 1), K_star=K1, lambda_b=lb, lambda_W=lw)
    assert cf.universality_class == "scale-invariant"
    for k in ("K", "Theta", "V", "D", "F", "B", "Q"):
        got, want = getattr(th, k)[:, 0], getattr(cf, k)
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11 * float(want.abs().max()), msg=k)
    scale = float(th.B.abs().max())
    assert float(th.P.abs().max()) < 1e-12 * scale  # P = 0 (11.74)
    assert float(th.G1.abs().max()) < 1e-12 * float(th.V.abs().max())  # G1 = 0 (5.117)
    # A: (9.52) gives only the leading l^3 term
    th_deep = single_input_recursions(a, 0.0, CW, x, 200, lambda_b=lb, lambda_W=lw)
    cf_deep = critical_closed_forms(a, [200], K_star=K1, lambda_b=lb, lambda_W=lw)
    assert abs(float(th_deep.A[-1, 0] / cf_deep.A[0]) - 1) < 0.01


def test_relu_book_numbers():
    """ReLU: V/(nK^2) = 5 l/n coefficient (5.130); Q coefficient A4/(6 A2) = 1/6 (11.81)."""
    cf = critical_closed_forms("relu", [10], K_star=1.0, lambda_b=0.0, lambda_W=1.0)
    assert cf.coefficients["V/(nK^2)"] == pytest.approx(5.0)
    assert cf.coefficients["Q/(nTheta^2)"] == pytest.approx(1 / 6 * 1.0 / 0.5)
    assert cf.coefficients["B/(nTheta^2)"] == pytest.approx(2 / 3)
    assert critical_closed_forms("linear", [3], K_star=1.0).coefficients["V/(nK^2)"] == pytest.approx(2.0)


# ---------------------------------------------------------------- K* = 0 class: large-depth asymptotics
def test_tanh_recursions_approach_book_asymptotics():
    """(5.92), (5.127), (5.134), (9.71), (9.81)-(9.86), (11.98), (11.101) at l = 800 (lambda of (9.70))."""
    L = 800
    l = torch.arange(1, L + 1, dtype=D64)
    lbt, lwt = 1.0, 0.7
    th = single_input_recursions("tanh", 0.0, 1.0, torch.ones(1, 3), L, lambda_b=lbt / l, lambda_W=lwt)
    cf = critical_closed_forms("tanh", l, lambda_b=lbt, lambda_W=lwt)
    assert cf.universality_class == "K*=0" and not cf.exact_in_depth
    # asymptotics converge like log(l)/l: at l = 800 every ratio is within 3% of 1 (A: 4%) and
    # strictly closer to 1 than at l = 200 (observed at l = 800: K 0.4%, V 0.35%, B 1.7%, A 2.8%)
    tol = {"K": 0.01, "V": 0.01, "G1": 0.015, "Theta": 0.015, "F": 0.015, "B": 0.03, "D": 0.02,
           "A": 0.04, "P": 0.03, "Q": 0.03}
    for k, t in tol.items():
        ratio = float(getattr(th, k)[-1, 0] / getattr(cf, k)[-1])
        early = float(getattr(th, k)[199, 0] / getattr(cf, k)[199])
        assert abs(ratio - 1) < t, (k, ratio)
        assert abs(ratio - 1) < abs(early - 1), (k, ratio, early)
    # the normalised vertex grows like (2/3) l/n: slope of V/K^2 between l = 600 and 1200
    r = th.V[:, 0] / th.K[:, 0] ** 2
    slope = float((r[-1] - r[399]) / 400)
    assert slope == pytest.approx(2 / 3, rel=0.02)
    # book numbers for tanh: Theta -> lb + lw/2, F/(nK Theta) -> 1/4, P/(n Theta^2) -> -1/12 per l
    assert cf.coefficients["F/(nKTheta)"] == pytest.approx(0.25)
    assert cf.coefficients["P/(nTheta^2)"] == pytest.approx(-1 / 12)
    assert cf.coefficients["Q/(nTheta^2)"] == pytest.approx(-(1 / 16) * lbt / (lbt + lwt / 2))


# ---------------------------------------------------------------- multi-input vs single-input
@pytest.mark.parametrize("act,CW", [("relu", 2.0), ("tanh", 1.0)])
def test_multi_input_diagonal_equals_single_input(act, CW):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, generator=g, dtype=D64)
    L = 3
    ft = finite_width_tensors(act, 0.1, CW, x, L, lambda_b=0.4, lambda_W=1.3, nlo=True, ntk=True)
    si = single_input_recursions(act, 0.1, CW, x, L, lambda_b=0.4, lambda_W=1.3)
    ar = torch.arange(2)
    for k in ("K", "Theta", "G1"):
        torch.testing.assert_close(getattr(ft, k)[:, ar, ar], getattr(si, k), rtol=1e-9, atol=1e-12, msg=k)
    for k in ("V", "A", "B", "D", "F"):
        torch.testing.assert_close(getattr(ft, k)[:, ar, ar, ar, ar], getattr(si, k), rtol=1e-9, atol=1e-12, msg=k)
    # symmetries of V (4.77): (a1 a2) <-> (a3 a4), a1 <-> a2
    V = ft.V[-1]
    torch.testing.assert_close(V, V.permute(2, 3, 0, 1))
    torch.testing.assert_close(V, V.permute(1, 0, 2, 3))
    # public wrappers agree with the engine
    torch.testing.assert_close(four_point_vertex(act, 0.1, CW, x, L), ft.V)
    torch.testing.assert_close(kernel_nlo_correction(act, 0.1, CW, x, L), ft.G1)
    nv = ntk_variance(act, 0.1, CW, 0.4, 1.3, x, L)
    torch.testing.assert_close(nv.B, ft.B)
    torch.testing.assert_close(ntk_preactivation_cross(act, 0.1, CW, 0.4, 1.3, x, L).F, ft.F)
    dn = dntk_statistics(act, 0.1, CW, 0.4, 1.3, x, L)
    torch.testing.assert_close(dn.Q, si.Q)


def test_kernel_matches_infinite_width_engine():
    from torch_crit.theory.kernels import kernel_and_ntk_recursion

    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=D64)
    ft = finite_width_tensors("tanh", 0.05, 1.1, x, 3, lambda_b=0.5, lambda_W=0.8)
    st = kernel_and_ntk_recursion("tanh", 0.05, 1.1, 0.5, 0.8, x, 3)
    torch.testing.assert_close(ft.K, st.K.to(D64), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ft.Theta, st.Theta.to(D64), rtol=1e-10, atol=1e-12)


def test_three_distinct_inputs_vertex_symmetric_and_finite():
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(2), dtype=D64)
    V = four_point_vertex("tanh", 0.0, 1.0, x, 3)
    assert V.shape == (3, 3, 3, 3, 3) and bool(torch.isfinite(V).all())
    assert float(V[0].abs().max()) == 0.0
    for p in ((1, 0, 2, 3), (0, 1, 3, 2), (2, 3, 0, 1)):
        torch.testing.assert_close(V[-1], V[-1].permute(*p))


# ---------------------------------------------------------------- widths, exact moments
def test_exact_moments_linear_equal_book_product_formula():
    """Deep linear: E[z_i^2 z_j^2]/G2^2 = prod (1 + 2/n_l) (3.25), so n Var(G_hat) = n G^2 (prod - 1)."""
    widths = [7, 11, 5, 9]
    x = torch.ones(1, 3, dtype=D64)
    em = exact_metric_moments("linear", 0.0, 1.3, x, 5, widths=widths)
    G2 = 1.3 ** torch.arange(1, 6, dtype=D64)
    for l in range(2, 6):
        prod = math.prod(1 + 2 / n for n in widths[: l - 1])
        assert float(em.mean[l - 1, 0]) == pytest.approx(float(G2[l - 1]), rel=1e-13)
        assert float(em.var[l - 1, 0]) == pytest.approx(float(G2[l - 1]) ** 2 * (prod - 1), rel=1e-12)


def test_unequal_widths_leading_order_matches_exact_moments():
    """Recursion with width ratios r = n_l/n_{l-1} == leading order of the exact ReLU moments."""
    widths = [40, 80, 20, 60, 30]
    big = [w * 10**6 for w in widths]
    x = torch.ones(1, 4, dtype=D64)
    th = single_input_recursions("relu", 0.0, 2.0, x, 6, widths=big)
    em = exact_metric_moments("relu", 0.0, 2.0, x, 6, widths=big)
    torch.testing.assert_close(th.V, em.V_exact, rtol=1e-5, atol=1e-12)
    # equal-width default differs from the unequal case
    assert float((single_input_recursions("relu", 0.0, 2.0, x, 6).V - th.V).abs().max()) > 0.1


# ---------------------------------------------------------------- quadrature
def test_nd_gaussian_expectation_wick_and_kinks():
    C = torch.tensor([[1.3, 0.5, 0.2, 0.1], [0.5, 1.0, 0.3, -0.2], [0.2, 0.3, 0.9, 0.25], [0.1, -0.2, 0.25, 1.1]], dtype=D64)
    ident = [lambda z: z] * 4
    wick = C[0, 1] * C[2, 3] + C[0, 2] * C[1, 3] + C[0, 3] * C[1, 2]
    assert float(nd_gaussian_expectation(ident, C)) == pytest.approx(float(wick), rel=2e-5)  # default nodes
    assert float(nd_gaussian_expectation(ident, C, n_nodes=12)) == pytest.approx(float(wick), rel=1e-8)
    # ReLU pair through 3-D quadrature (third factor 1) vs the arc-cosine closed form
    from torch_crit.theory.activations import get_activation
    from torch_crit.theory.gaussian import expect2

    r = get_activation("relu")
    one = lambda z: torch.ones_like(z)
    ref = expect2(r.fn(0), r.fn(0), C[0, 0], C[0, 1], C[1, 1])
    got = nd_gaussian_expectation([r.fn(0), r.fn(0), one], C[:3, :3])
    assert float(got) == pytest.approx(float(ref), rel=1e-7)


# ---------------------------------------------------------------- errors and off-criticality
def test_errors_are_clear():
    x = torch.ones(1, 3, dtype=D64)
    with pytest.raises(ValueError, match="hidden widths must be >= 2"):
        single_input_recursions("relu", 0.0, 2.0, x, 3, widths=[8, 1])
    with pytest.raises(ValueError, match="length"):
        single_input_recursions("relu", 0.0, [2.0, 2.0], x, 3)
    with pytest.raises(ValueError, match="widths must list"):
        single_input_recursions("relu", 0.0, 2.0, x, 3, widths=[8, 8, 8])
    with pytest.raises(ValueError, match="depth"):
        single_input_recursions("relu", 0.0, 2.0, x, 0)
    with pytest.raises(ValueError, match="single_input_recursions"):
        critical_closed_forms("swish", [3])
    with pytest.raises(ValueError, match="neither"):
        critical_closed_forms("softplus", [3])
    with pytest.raises(ValueError, match="K_star"):
        critical_closed_forms("relu", [3])
    with pytest.raises(ValueError, match="scale-invariant"):
        exact_metric_moments("tanh", 0.0, 1.0, x, 3, widths=[4, 4])


def test_divergence_is_reported_with_layer():
    x = torch.ones(1, 3, dtype=D64)
    with pytest.raises(RecursionDivergenceError, match=r"layer l=\d+"):
        single_input_recursions("relu", 0.0, 8.0, x, 700)
    with pytest.warns(RecursionDivergenceWarning, match="layer"):
        th = single_input_recursions("relu", 0.0, 8.0, x, 700, on_divergence="warn")
    assert bool(torch.isnan(th.V[-1]).all()) and bool(torch.isfinite(th.V[1]).all())


def test_off_critical_activation_is_allowed():
    """sigmoid has no critical point; predictions off criticality are still well defined."""
    th = single_input_recursions("sigmoid", 0.1, 1.5, torch.ones(1, 3), 6)
    assert bool(torch.isfinite(th.V).all()) and float(th.V[-1, 0]) > 0


def test_multi_input_vertex_deep_linear_exact():
    """Linear sigma, C_W = 1: V^{(l)}_{(a1a2)(a3a4)} = (l-1)(K_{a1a3}K_{a2a4} + K_{a1a4}K_{a2a3}) ((3.28) generalised)."""
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=D64)
    V = four_point_vertex("linear", 0.0, 1.0, x, 3)
    K = x @ x.T / 5
    want = torch.einsum("ac,bd->abcd", K, K) + torch.einsum("ad,bc->abcd", K, K)
    for l in range(3):
        torch.testing.assert_close(V[l], l * want, rtol=1e-6, atol=1e-6)
