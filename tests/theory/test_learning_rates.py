"""Learning-rate equivalence principle (9.94)-(9.96)."""
from __future__ import annotations

import pytest
import torch

from torch_crit.theory import (
    NoCriticalPointError,
    UniversalityClass,
    chi_perp,
    critical_point,
    g_function,
    kernel_recursion,
    layer_learning_rates,
    learning_rate_scaling,
)

f64 = dict(dtype=torch.float64)


def test_scale_invariant_rule_994() -> None:
    for name in ("relu", "linear", "gelu", "swish"):
        r = layer_learning_rates(name, layer=3, depth=8, fan_in=64, lambda_b=2.0, lambda_W=3.0)
        assert (r.lambda_b, r.lambda_W) == (2.0 / 8, 3.0 / 8)
        assert r.bias_lr == r.lambda_b and r.weight_lr == pytest.approx(3.0 / 8 / 64, rel=1e-15)
        assert r.scaling.equation == "(9.94)"


def test_odd_k_star_zero_rule_996() -> None:
    for layer in (1, 4, 10):
        r = layer_learning_rates("tanh", layer=layer, depth=10, fan_in=32, lambda_b=1.5, lambda_W=0.5)
        assert r.lambda_b == pytest.approx(1.5 / layer, rel=1e-15) and r.lambda_W == 0.5
        assert r.weight_lr == pytest.approx(0.5 / 32, rel=1e-15)
    assert learning_rate_scaling("sin").equation == "(9.96)"


def test_general_k_star_zero_rule_995() -> None:
    # a K*=0 activation with sigma_2 != 0: p_perp = b1/a1 != 1
    act = lambda z: torch.tanh(z) + 0.1 * torch.tanh(z) ** 2  # noqa: E731
    cp = critical_point(act)
    p = cp.p_perp
    assert cp.universality_class is UniversalityClass.K_STAR_ZERO and p != pytest.approx(1.0)
    assert p == pytest.approx(cp.b1 / cp.a1)
    l, L = 3, 12
    r = layer_learning_rates(cp, layer=l, depth=L, fan_in=10)
    assert r.lambda_b == pytest.approx(l ** (-p) * L ** (p - 1), rel=1e-14)      # (9.95)
    assert r.lambda_W == pytest.approx((L / l) ** (p - 1), rel=1e-14)
    assert r.scaling.equation == "(9.95)"


def _layer_shares(name: str, lam_b: list[float], lam_W: list[float], L: int) -> torch.Tensor:
    """Per-layer contributions to Theta^(L) from the formal solution (9.28), single input."""
    cp = critical_point(name)
    K = kernel_recursion(name, cp.C_b, cp.C_W, gram=torch.ones(1, 1, **f64), depth=L)[:, 0, 0]
    g_prev = torch.cat([torch.ones(1, **f64), g_function(name, K[:-1])])   # g^(0) = x.x/n0 = 1
    chi = chi_perp(name, K, cp.C_W)
    shares = []
    for l in range(1, L + 1):
        prod = torch.prod(chi[l - 1:L - 1]) if l < L else torch.tensor(1.0, **f64)
        shares.append((lam_b[l - 1] + lam_W[l - 1] * g_prev[l - 1]) * prod)
    return torch.stack(shares)


def test_equivalence_principle_gives_equal_layer_shares() -> None:
    L = 60
    # ReLU: every layer contributes exactly the same
    rs = [layer_learning_rates("relu", l, L, 100) for l in range(1, L + 1)]
    s = _layer_shares("relu", [r.lambda_b for r in rs], [r.lambda_W for r in rs], L)
    torch.testing.assert_close(s[1:], s[1:].mean().expand(L - 1), rtol=1e-12, atol=0)
    # tanh: with (9.96) the deep layers share ~equally (log corrections), with uniform rates they do not
    rs = [layer_learning_rates("tanh", l, L, 100, lambda_b=1.0, lambda_W=2.0) for l in range(1, L + 1)]
    s = _layer_shares("tanh", [r.lambda_b for r in rs], [r.lambda_W for r in rs], L)
    deep = s[L // 3:]
    assert float(deep.max() / deep.min()) < 1.25
    u = _layer_shares("tanh", [1.0] * L, [2.0] * L, L)[L // 3:]
    assert float(u.max() / u.min()) > 2.0


def test_strict_and_bad_input() -> None:
    with pytest.raises(NoCriticalPointError):
        layer_learning_rates("sigmoid", 1, 3, 10)
    with pytest.warns(RuntimeWarning, match="no critical point"):
        r = layer_learning_rates("sigmoid", 2, 4, 10, strict=False)
    assert r.lambda_b == 0.25
    with pytest.raises(ValueError, match="layer must be in 1..depth"):
        layer_learning_rates("relu", 5, 4, 10)
    with pytest.raises(ValueError, match="layer must be an int >= 1"):
        layer_learning_rates("relu", 0, 4, 10)
    with pytest.raises(ValueError, match="fan_in"):
        layer_learning_rates("relu", 1, 4, 0)
    with pytest.raises(ValueError, match="lambda_W"):
        layer_learning_rates("relu", 1, 4, 3, lambda_W=-1.0)
