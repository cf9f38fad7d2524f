"""Critical points against the numbers the book states (book_numbers.json) and hand derivations."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from torch_crit.theory.criticality import saturated_fraction
from torch_crit.theory import (
    CriticalPoint,
    NoCriticalPointError,
    UniversalityClass,
    chi_parallel,
    chi_perp,
    critical_point,
    criticality_condition,
    fixed_points,
    g_function,
    get_activation,
    h_function,
    taylor_constants,
)

BOOK = json.loads(Path("/work/shared/theory/book_numbers.json").read_text()) if Path(
    "/work/shared/theory/book_numbers.json").exists() else []


def _book(quantity_prefix: str, activation: str):
    for e in BOOK:
        if e["quantity"].startswith(quantity_prefix) and e["activation"] == activation:
            return e["value"]
    pytest.skip(f"book_numbers.json has no entry {quantity_prefix!r} / {activation!r}")


def _digits(x: float) -> float:
    """Half a unit in the last digit the book prints (read off the stored decimal string)."""
    mant, _, exp = repr(x).lower().partition("e")
    decimals = len(mant.split(".")[1]) if "." in mant else 0
    # values the json stores in full (from a closed form such as (3+sqrt(17))/2): 1e-12 relative
    return max(0.5 * 10.0 ** (-decimals + (int(exp) if exp else 0)), 1e-12 * abs(x))


@pytest.mark.parametrize("name,book_act", [("relu", "ReLU"), ("linear", "linear (deep linear network)"), ("tanh", "tanh")])
def test_simple_critical_points(name: str, book_act: str) -> None:
    Cb, Cw = _book("critical (C_b, C_W)", book_act)
    cp = critical_point(name)
    assert (cp.C_b, cp.C_W) == (Cb, Cw)


def test_scale_invariant_class() -> None:
    relu = critical_point("relu")
    assert relu.universality_class is UniversalityClass.SCALE_INVARIANT and relu.K_star is None
    assert relu.nu == 5.0 and critical_point("linear").nu == 2.0          # footnote 26 of App. A
    assert relu.exponents["p0"] == 0 and relu.exponents["p_V"] == -1
    a = 0.3
    leaky = critical_point(get_activation("leaky_relu", a=a))
    assert leaky.C_W == pytest.approx(2 / (1 + a * a), rel=1e-15)      # (5.67)
    assert leaky.nu == pytest.approx(6 * (1 + a**4) / (1 + a * a) ** 2 - 1, rel=1e-14)
    K = torch.tensor([0.2, 3.0], dtype=torch.float64)
    torch.testing.assert_close(chi_parallel("relu", K, 2.0), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(chi_perp("relu", K, 2.0), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(h_function("relu", K, 2.0), torch.zeros(2, dtype=torch.float64))


def test_k_star_zero_class_and_taylor_constants() -> None:
    a1, a2, b1 = taylor_constants("tanh")
    assert a1 == _book("Taylor combination a1", "tanh")
    assert a2 == pytest.approx(17 / 3, rel=1e-15) and b1 == -2.0
    cp = critical_point("tanh")
    assert cp.universality_class is UniversalityClass.K_STAR_ZERO and cp.K_star == 0.0
    assert cp.p_perp == 1.0 and cp.nu == pytest.approx(2 / 3)
    assert cp.exponents["p_V"] - 2 * cp.exponents["p0"] == -1          # scaling law (5.129)
    sin = critical_point("sin")
    assert (sin.C_b, sin.C_W, sin.a1, sin.b1, sin.p_perp) == (0.0, 1.0, -1.0, -1.0, 1.0)
    erf = critical_point("erf")
    assert erf.C_W == pytest.approx(math.pi / 4, rel=1e-15)           # 1/sigma_1^2, sigma_1 = 2/sqrt(pi)
    # GELU: (-a1) = -6/pi at K* = 0 (text after (5.105))
    assert taylor_constants("gelu")[0] == pytest.approx(-_book("(-a1) at K*=0", "GELU"), rel=1e-14)


@pytest.mark.parametrize("name,book_act", [("swish", "SWISH"), ("gelu", "GELU")])
def test_half_stable_points_to_the_books_digits(name: str, book_act: str) -> None:
    K_book = _book("half-stable nontrivial fixed point K*", book_act)
    Cb, Cw = _book("critical (C_b, C_W) at the half-stable fixed point", book_act)
    minus_a1t = _book("(-a~1) at the half-stable fixed point", book_act)
    cp = critical_point(name)
    assert cp.universality_class is UniversalityClass.HALF_STABLE
    assert abs(cp.K_star - K_book) <= _digits(K_book)
    assert abs(cp.C_b - Cb) <= _digits(Cb) and abs(cp.C_W - Cw) <= _digits(Cw)
    assert abs(-cp.a1_tilde - minus_a1t) <= _digits(minus_a1t)
    assert cp.chi_parallel == pytest.approx(1.0, abs=1e-12) and cp.chi_perp == pytest.approx(1.0, abs=1e-14)
    # the unstable K* = 0 solution with (C_b, C_W) = (0, 4) is kept as an alternative
    (alt,) = cp.alternatives
    assert (alt.C_b, alt.C_W, alt.K_star) == (0.0, 4.0, 0.0) and alt.universality_class is UniversalityClass.NONE
    # (5.73) holds at K*
    assert float(criticality_condition(name, cp.K_star)) == pytest.approx(1.0, abs=1e-12)
    # fixed point (5.56)
    assert cp.C_b + cp.C_W * float(g_function(name, cp.K_star)) == pytest.approx(cp.K_star, rel=1e-13)


def test_no_critical_point_cases() -> None:
    with pytest.raises(NoCriticalPointError) as info:
        critical_point("sigmoid")
    err = info.value
    assert isinstance(err, ValueError) and "-4" in err.reason                 # C_b = -(s0/s1)^2 = -4
    assert "tanh" in err.suggestion
    near = err.nearest
    assert near.universality_class is UniversalityClass.NONE and not near.is_critical
    # chi_perp = 1 would put the fixed point at K* = 45.6 (38 % of units saturated); the nearest
    # setting keeps the forward signal O(1) instead: a fixed point at K* = 1, with its chi_perp stated
    assert near.C_b == 0.0 and near.K_star == 1.0
    assert near.C_W * float(g_function("sigmoid", near.K_star)) == pytest.approx(near.K_star, rel=1e-10)
    assert float(chi_perp("sigmoid", near.K_star, near.C_W)) == pytest.approx(near.chi_perp, rel=1e-10)
    assert 0.1 < near.chi_perp < 0.2 and "saturated" in near.notes
    assert saturated_fraction("sigmoid", 45.62) > 0.3 and saturated_fraction("sigmoid", 1.0) < 0.01
    with pytest.raises(NoCriticalPointError):
        critical_point("softplus")
    for p in (2, 3, 4):
        with pytest.raises(NoCriticalPointError, match=r"p/\(2p-1\)"):
            critical_point(get_activation("monomial", p=p))


def test_user_callables_against_hand_derivations() -> None:
    a, b = 1.5, 0.7
    cp = critical_point(lambda z: a * torch.tanh(b * z))
    # sigma_1 = a b, sigma_3 = -2 a b^3 -> a1 = b1 = -2 b^2, C_W = 1/(a b)^2
    assert cp.universality_class is UniversalityClass.K_STAR_ZERO
    assert cp.C_W == pytest.approx(1 / (a * b) ** 2, rel=1e-13)
    assert cp.a1 == pytest.approx(-2 * b * b, rel=1e-12) and cp.p_perp == pytest.approx(1.0, rel=1e-12)
    # shifted sigmoid sigma - 1/2 = tanh(z/2)/2 is critical at (0, 16) (§5.3.2)
    cp = critical_point(lambda z: torch.sigmoid(z) - 0.5)
    assert (cp.C_b, cp.C_W) == (0.0, pytest.approx(16.0, rel=1e-13))
    # scaled ReLU, detected numerically as scale-invariant: C_W = 2/c^2 (5.67)
    cp = critical_point(lambda z: 3.0 * torch.relu(z))
    assert cp.universality_class is UniversalityClass.SCALE_INVARIANT
    assert cp.C_W == pytest.approx(2 / 9, rel=1e-10) and cp.nu == pytest.approx(5.0, rel=1e-9)
    # shifted ReLU relu(z) + c: g'(K) = 1/2 + c/sqrt(2 pi K) != <s's'> = 1/2 for every K > 0
    with pytest.raises(NoCriticalPointError):
        critical_point(get_activation(lambda z: torch.relu(z) + 0.3, kinks=(0.0,)))
    # a rescaled SWISH z*sigmoid(beta z) = swish(beta z)/beta: K* scales as 1/beta^2, C's invariant
    beta = 1.3
    cp, ref = critical_point(lambda z: z * torch.sigmoid(beta * z)), critical_point("swish")
    assert cp.K_star == pytest.approx(ref.K_star / beta**2, rel=1e-8)
    assert cp.C_W == pytest.approx(ref.C_W, rel=1e-10) and cp.C_b == pytest.approx(ref.C_b / beta**2, rel=1e-8)


def test_kinked_k_star_zero_elu() -> None:
    """[derived here] ELU: (0, 1/A2) with K^(l) l^2 -> 4 A2^2/kappa^2 = 2 pi and chi_perp = 1 - 2/l."""
    cp = critical_point("elu")
    assert cp.universality_class is UniversalityClass.K_STAR_ZERO and (cp.C_b, cp.C_W) == (0.0, 1.0)
    assert critical_point(get_activation("elu", alpha=0.5)).C_W == pytest.approx(2 / 1.25, rel=1e-14)
    K = torch.tensor([1.0], dtype=torch.float64)
    L = 150
    for _ in range(L):
        K = cp.C_W * g_function("elu", K)
    assert float(K) * L**2 == pytest.approx(2 * math.pi, rel=0.07)   # O(log l / l) corrections (~5% here)
    assert (1 - float(chi_perp("elu", K, cp.C_W))) * L == pytest.approx(2.0, rel=0.01)


def test_critical_point_object() -> None:
    cp = critical_point("tanh")
    assert isinstance(cp, CriticalPoint)
    with pytest.raises(Exception):
        cp.C_W = 2.0  # type: ignore[misc]
    d = cp.as_dict()
    assert json.loads(json.dumps(d))["universality_class"] == "k_star_zero"
    with pytest.raises(TypeError):
        cp.exponents["p0"] = 3.0  # type: ignore[index]


def test_fixed_points_at_half_critical_hyperparameters() -> None:
    """Footnotes 20-21 of §5.3.4: a second, trivial fixed point next to the half-stable one.

    SWISH: book "K* ~ 14.5" (attracts kernels above 14.3): we find 14.593. GELU: the book says
    "~ 3.2"; the root of C_b + C_W g(K) - K is 3.03498 (cross-checked with mpmath, 25 digits:
    3.034981435472), still attracting (chi_par < 1) and below K* = 3.56 as the footnote states.
    """
    cp = critical_point("swish")
    (k, chi), = fixed_points("swish", cp.C_b, cp.C_W)
    assert abs(k - _book("trivial fixed point attracting kernels above", "SWISH")) < 0.1 and chi < 1
    cp = critical_point("gelu")
    (k, chi), = fixed_points("gelu", cp.C_b, cp.C_W)
    assert k == pytest.approx(3.034981435472, rel=1e-10) and chi < 1 and k < cp.K_star
    # scale-invariant, chi = A2 C_W < 1: K* = C_b / (1 - chi) (bullets after (5.65))
    (k, chi), = fixed_points("relu", 0.1, 1.5)
    assert k == pytest.approx(0.1 / 0.25, rel=1e-12) and chi == 0.75
