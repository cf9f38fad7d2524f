"""Kernel and frozen-NTK recursions: closed forms, quadrature, Monte Carlo, bad input."""
from __future__ import annotations

import math

import pytest
import torch

from torch_crit.theory import (
    critical_point,
    get_activation,
    input_gram,
    kernel_and_ntk_recursion,
    kernel_recursion,
    ntk_recursion,
    pair_expectations,
)

f64 = dict(dtype=torch.float64)


def _x(N: int = 4, n0: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randn(N, n0, generator=torch.Generator().manual_seed(seed), **f64)


def test_relu_two_inputs_against_angle_map() -> None:
    """Equal-norm ReLU inputs at criticality: K_d preserved, cos psi' = cos psi + (1/pi)(sin psi - psi cos psi) (5.162)."""
    psi0 = 1.2
    gram = torch.tensor([[1.0, math.cos(psi0)], [math.cos(psi0), 1.0]], **f64)
    L = 30
    K = kernel_recursion("relu", 0.0, 2.0, gram=gram, depth=L)
    Kd = 2.0  # K^(1) = C_W * 1
    c = math.cos(psi0)
    for l in range(L):
        assert float(K[l, 0, 0]) == pytest.approx(Kd, rel=1e-15)
        assert abs(float(K[l, 0, 1]) / Kd - c) < 1e-13
        psi = math.acos(c)
        c = c + (math.sin(psi) - psi * math.cos(psi)) / math.pi


def test_erf_against_arcsine_map_and_quadrature() -> None:
    """erf recursion vs an independent scalar arcsine-kernel loop, and quadrature (custom erf) vs closed form."""
    x = _x(3, 5)
    C_b, C_W, L = 0.1, 1.7, 5
    K = kernel_recursion("erf", C_b, C_W, x, depth=L)
    G = x @ x.T / 5
    ref = C_b + C_W * G
    for l in range(1, L):
        d = ref.diagonal()
        ref = C_b + C_W * (2 / math.pi) * torch.asin(2 * ref / torch.sqrt((1 + 2 * d[:, None]) * (1 + 2 * d[None, :])))
        torch.testing.assert_close(K[l], ref, rtol=1e-13, atol=1e-14)
    Kq = kernel_recursion(get_activation(lambda z: torch.erf(z), name="erf_quad"), C_b, C_W, x, depth=L)
    torch.testing.assert_close(Kq, K, rtol=1e-10, atol=1e-12)
    # NTK: quadrature vs closed form (sigma' pair)
    Tq = ntk_recursion(get_activation(lambda z: torch.erf(z)), C_b, C_W, 0.5, 1.5, x[:2], depth=3)
    T = ntk_recursion("erf", C_b, C_W, 0.5, 1.5, x[:2], depth=3)
    torch.testing.assert_close(Tq, T, rtol=1e-10, atol=1e-12)


def test_relu_kernel_quadrature_matches_closed_form() -> None:
    x = _x(3, 6, seed=3)
    relu_q = get_activation(lambda z: torch.relu(z), kinks=(0.0,), name="relu_quad")
    S = kernel_and_ntk_recursion("relu", 0.2, 1.9, 1.0, 0.5, x, depth=5)
    Sq = kernel_and_ntk_recursion(relu_q, 0.2, 1.9, 1.0, 0.5, x, depth=5)
    torch.testing.assert_close(Sq.K, S.K, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(Sq.Theta, S.Theta, rtol=1e-10, atol=1e-12)


def test_exact_single_input_solutions() -> None:
    # deep linear network G^(l) = C_b sum + C_W^l G^(0) (3.15), per-layer C's
    g = torch.tensor([[1.3]], **f64)
    C_W = [1.1, 0.9, 1.2, 0.8]
    K = kernel_recursion("linear", 0.0, C_W, gram=g, depth=4)
    torch.testing.assert_close(K[:, 0, 0], 1.3 * torch.cumprod(torch.tensor(C_W, **f64), 0), rtol=1e-15, atol=0)
    # scale-invariant at criticality, uniform lambda: Theta^(l) = (lambda_b + lambda_W A2 K*) l (9.44)
    lb, lw, L = 0.7, 1.3, 12
    S = kernel_and_ntk_recursion("relu", 0.0, 2.0, lb, lw, gram=g, depth=L)
    Kstar = 2.0 * 1.3
    torch.testing.assert_close(S.K[:, 0, 0], torch.full((L,), Kstar, **f64), rtol=1e-15, atol=0)
    th1 = lb + lw * 1.3  # Theta^(1) = lambda_b + lambda_W x.x/n0
    expected = th1 + (lb + lw * 0.5 * Kstar) * torch.arange(L, **f64)
    torch.testing.assert_close(S.Theta[:, 0, 0], expected, rtol=1e-14, atol=0)


def test_tanh_asymptotics_single_input() -> None:
    """K*=0 class: l K^(l) -> 1/(-a1) = 1/2 for tanh (5.92); THEORY.md: 0.512 at l = 100."""
    K = kernel_recursion("tanh", 0.0, 1.0, gram=torch.ones(1, 1, **f64), depth=100)
    assert 100 * float(K[-1, 0, 0]) == pytest.approx(0.512, abs=2e-3)


def test_dtypes_and_inputs_not_modified() -> None:
    x32 = _x().float()
    x0 = x32.clone()
    K = kernel_recursion("relu", 0.0, 2.0, x32, depth=3)
    assert K.dtype == torch.float32 and torch.equal(x32, x0)
    g = input_gram(_x())
    g0 = g.clone()
    assert kernel_recursion("tanh", 0.0, 1.0, gram=g, depth=2).dtype == torch.float64 and torch.equal(g, g0)
    # one input given as a vector
    assert kernel_recursion("relu", 0.0, 2.0, torch.ones(5, **f64), depth=2).shape == (2, 1, 1)


def test_bad_input() -> None:
    x = _x()
    with pytest.raises(ValueError, match="depth"):
        kernel_recursion("relu", 0.0, 2.0, x, depth=0)
    with pytest.raises(TypeError, match="depth is required"):
        kernel_recursion("relu", 0.0, 2.0, x)
    with pytest.raises(ValueError, match="length depth=3"):
        kernel_recursion("relu", [0.0, 0.0], 2.0, x, depth=3)
    with pytest.raises(ValueError, match="C_W must be >= 0"):
        kernel_recursion("relu", 0.0, -2.0, x, depth=3)
    with pytest.raises(ValueError, match="positive semi-definite"):
        kernel_recursion("relu", 0.0, 2.0, gram=torch.tensor([[1.0, 2.0], [2.0, 1.0]], **f64), depth=3)
    with pytest.raises(ValueError, match="symmetric"):
        kernel_recursion("relu", 0.0, 2.0, gram=torch.tensor([[1.0, 0.5], [0.2, 1.0]], **f64), depth=3)
    with pytest.raises(TypeError, match="exactly one"):
        kernel_recursion("relu", 0.0, 2.0, x, depth=3, gram=input_gram(x))
    with pytest.raises(ValueError, match="overflow"):
        kernel_recursion("monomial", 0.0, 3.0, x * 10, depth=40)
    with pytest.raises(ValueError, match="unknown activation"):
        kernel_recursion("nope", 0.0, 2.0, x, depth=3)


# ----------------------------------------------------------------------------- Monte Carlo
def _mlp_preactivations(act, x: torch.Tensor, width: int, depth: int, C_b: float, C_W: float,
                        M: int, gen: torch.Generator) -> list[torch.Tensor]:
    """z^(l) for M independent networks at once: list over l of [M, N, width]."""
    N, n0 = x.shape
    h = x.expand(M, N, n0)
    fan_in, zs = n0, []
    for _ in range(depth):
        W = torch.randn(M, fan_in, width, generator=gen, **f64) * math.sqrt(C_W / fan_in)
        b = torch.randn(M, 1, width, generator=gen, **f64) * math.sqrt(C_b)
        z = h @ W + b
        zs.append(z)
        h, fan_in = act(z), width
    return zs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tanh", "relu"])
def test_kernel_monte_carlo(name: str) -> None:
    """Measured (1/n) sum_i z_i;a z_i;b over M networks vs K^(l).

    Tolerance: 4 standard errors of the ensemble mean (estimated from the M networks) plus an
    O(1/n) allowance 3 l/n |K| for the finite-width bias of the mean metric (4.104)-(4.106).
    """
    gen = torch.Generator().manual_seed(11)
    act = get_activation(name)
    cp = critical_point(name)
    x = _x(3, 8, seed=5)
    width, depth, M = 256, 4, 120
    K = kernel_recursion(name, cp.C_b + 0.05, cp.C_W, x, depth=depth)
    zs = _mlp_preactivations(act, x, width, depth, cp.C_b + 0.05, cp.C_W, M, gen)
    for l in (1, 2, 4):
        z = zs[l - 1]
        per_net = z @ z.transpose(1, 2) / width  # [M, N, N]
        mean, se = per_net.mean(0), per_net.std(0) / math.sqrt(M)
        tol = 4 * se + 3 * l / width * K[l - 1].abs()
        assert bool(((mean - K[l - 1]).abs() <= tol).all()), (l, mean, K[l - 1], tol)


@pytest.mark.slow
def test_ntk_monte_carlo_against_autograd_jacobian() -> None:
    """Empirical NTK J Lambda J^T (autograd, per-parameter rates lambda_b, lambda_W/n_{l-1}) vs Theta^(L).

    Tolerance: 4 standard errors over the ensemble plus an O(L/n) allowance 2 L/n |Theta|.
    """
    gen = torch.Generator().manual_seed(3)
    name, C_b, C_W, lb, lw = "relu", 0.1, 2.0, 0.7, 1.3
    act = get_activation(name)
    x = _x(3, 6, seed=9)
    width, depth, M = 160, 3, 16
    theta = ntk_recursion(name, C_b, C_W, lb, lw, x, depth=depth)[-1]
    samples = []
    for _ in range(M):
        params, fan_in = [], x.shape[1]
        for l in range(depth):
            out = 1 if l == depth - 1 else width
            W = (torch.randn(fan_in, out, generator=gen, **f64) * math.sqrt(C_W / fan_in)).requires_grad_()
            b = (torch.randn(out, generator=gen, **f64) * math.sqrt(C_b)).requires_grad_()
            params.append((W, b, fan_in))
            fan_in = out
        h = x
        for l, (W, b, _) in enumerate(params):
            h = h @ W + b
            if l < depth - 1:
                h = act(h)
        rows = []
        for a in range(x.shape[0]):
            grads = torch.autograd.grad(h[a, 0], [t for W, b, _ in params for t in (W, b)], retain_graph=True)
            scaled = []
            for (W, b, n_prev), gW, gb in zip(params, grads[0::2], grads[1::2]):
                scaled.append((gW * math.sqrt(lw / n_prev)).reshape(-1))
                scaled.append(gb * math.sqrt(lb))
            rows.append(torch.cat(scaled))
        J = torch.stack(rows)
        samples.append(J @ J.T)
    H = torch.stack(samples)
    mean, se = H.mean(0), H.std(0) / math.sqrt(M)
    tol = 4 * se + 2 * depth / width * theta.abs()
    assert bool(((mean - theta).abs() <= tol).all()), (mean, theta, tol)


def _pairwise_reference(name: str, C_b: float, C_W: float, lb: float, lW: float, x: torch.Tensor, depth: int):
    """Brute force: every (alpha, beta) entry of every layer by its own expect2 call (no packing)."""
    from torch_crit.theory import expect1, expect2

    act = get_activation(name)
    G = x @ x.T / x.shape[1]
    K, T = C_b + C_W * G, lb + lW * G
    Ks, Ts = [K], [T]
    N = G.shape[0]
    for _ in range(1, depth):
        S = torch.empty_like(K)
        Sp = torch.empty_like(K)
        for a in range(N):
            for b in range(N):
                if a == b:
                    S[a, a] = expect1(lambda z: act.fn(0)(z) ** 2, K[a, a], kinks=act.kinks)
                    Sp[a, a] = expect1(lambda z: act.fn(1)(z) ** 2, K[a, a], kinks=act.kinks)
                else:
                    S[a, b] = expect2(act.fn(0), act.fn(0), K[a, a], K[a, b], K[b, b], n_nodes=48)
                    Sp[a, b] = expect2(act.fn(1), act.fn(1), K[a, a], K[a, b], K[b, b], n_nodes=48)
        K, T = C_b + C_W * S, lb + lW * S + C_W * Sp * T
        Ks.append(K)
        Ts.append(T)
    return torch.stack(Ks), torch.stack(Ts)


@pytest.mark.parametrize("name,C_b,C_W", [("relu", 0.1, 2.0), ("leaky_relu", 0.02, 1.9), ("tanh", 0.05, 1.1),
                                          ("erf", 0.0, 1.3), ("gelu", 0.0, 1.5)])
def test_packed_recursion_matches_entrywise_reference(name: str, C_b: float, C_W: float) -> None:
    """The packed (upper-triangle) recursion and its fast paths (arc-cosine, closed forms, shared
    2-D grid) against an entry-by-entry loop over adaptive-panel quadrature; 1e-10 relative."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    x[3] = 0.0  # zero input: variance C_b (zero for the smooth cases, where sigma(0) is regular)
    x[4] = 2.0 * x[1]  # exactly collinear pair: K12^2 = K11 K22
    st = kernel_and_ntk_recursion(name, C_b, C_W, 0.5, 1.0, x, depth=4)
    Kr, Tr = _pairwise_reference(name, C_b, C_W, 0.5, 1.0, x, 4)
    torch.testing.assert_close(st.K, Kr, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(st.Theta, Tr, rtol=1e-10, atol=1e-12)
    assert torch.equal(st.K, st.K.transpose(1, 2)) and torch.equal(st.Theta, st.Theta.transpose(1, 2))
    pe = pair_expectations(name, Kr[2], (0, 1))
    S0 = (Kr[3] - C_b) / C_W
    torch.testing.assert_close(pe[0], S0, rtol=1e-10, atol=1e-12)


def test_overflow_layer_reported() -> None:
    x = torch.eye(3, dtype=torch.float64)
    # K_aa = (8/3) 4^(l-1) (chi_parallel = C_W / 2 = 4): first inf at layer 1 + ceil(log4(3 max / 8))
    first = 1 + math.ceil((math.log(torch.finfo(torch.float64).max) + math.log(3 / 8)) / math.log(4))
    with pytest.raises(ValueError, match=f"overflowed at layer {first}:"):
        kernel_recursion("relu", 0.0, 8.0, x, depth=600)
