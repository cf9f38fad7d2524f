r"""Susceptibilities, fixed points and critical initialization hyperparameters (Ch. 5).

For a single input the infinite-width kernel obeys :math:`K^{(\ell+1)} = C_b + C_W g(K^{(\ell)})`
with :math:`g(K) = \langle\sigma\sigma\rangle_K` (5.46). Criticality (5.55) asks for a fixed
point :math:`K^\star = C_b + C_W g(K^\star)` (5.56) with both susceptibilities equal to one:

.. math::
    \chi_\parallel(K) = C_W\,g'(K) = \frac{C_W}{2K^2}\langle\sigma\sigma(z^2-K)\rangle_K
    \quad (5.50),\qquad
    \chi_\perp(K) = C_W\langle\sigma'\sigma'\rangle_K \quad (5.51).

:func:`critical_point` returns a :class:`CriticalPoint` for the activation's universality
class (§5.2–§5.3):

* scale-invariant (piecewise linear, :math:`\sigma = a_\pm z`): :math:`(C_b, C_W) = (0, 1/A_2)`
  (5.67), a line of fixed points (5.66);
* :math:`K^\star = 0` (:math:`\sigma_0 = 0,\ \sigma_1 \ne 0,\ a_1 < 0`, e.g. tanh, sin, erf):
  :math:`(C_b, C_W) = (0, 1/\sigma_1^2)` (5.89)–(5.90), :math:`p_\perp = b_1/a_1` (5.99);
* half-stable (SWISH, GELU): the non-zero root of (5.73), with (5.71)–(5.72) giving
  :math:`C_W, C_b` and :math:`\tilde a_1 = \tfrac12 C_W g''(K^\star)` of (5.102);
* none (sigmoid, softplus, :math:`z^p` with :math:`p>1`, ...): :class:`NoCriticalPointError`.

User callables go through the same numerical algorithm of §5.3.1 (scan + bisection of
(5.73), multiplied out as :math:`\langle\sigma'\sigma'\rangle_K - g'(K) = 0`).

Example:
    >>> from torch_crit.theory import critical_point
    >>> cp = critical_point("tanh")
    >>> (cp.C_b, cp.C_W, cp.universality_class.value)
    (0.0, 1.0, 'k_star_zero')
"""
from __future__ import annotations

from ..errors import NoCriticalPointError  # noqa: F401  (re-exported)
import dataclasses
import enum
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from .activations import Activation, get_activation
from .gaussian import expect1, expect1_dK

__all__ = [
    "UniversalityClass",
    "CriticalPoint",
    "NoCriticalPointError",
    "critical_point",
    "g_function",
    "chi_parallel",
    "chi_perp",
    "h_function",
    "susceptibilities",
    "taylor_constants",
    "saturated_fraction",
    "criticality_condition",
    "fixed_points",
]

ActivationLike = Any  # str | Callable | nn.Module | Activation


class UniversalityClass(str, enum.Enum):
    """Universality classes of criticality (§5.2–§5.3)."""

    SCALE_INVARIANT = "scale_invariant"
    K_STAR_ZERO = "k_star_zero"
    HALF_STABLE = "half_stable"
    NONE = "none"


@dataclass(frozen=True)
class CriticalPoint:
    r"""Critical initialization hyperparameters of one activation.

    Attributes:
        activation: the :class:`~torch_crit.theory.activations.Activation`.
        C_b: bias variance :math:`C_b` (2.19).
        C_W: rescaled weight variance :math:`C_W` (weights have variance :math:`C_W/n_{\ell-1}`).
        K_star: fixed-point kernel :math:`K^\star`; ``None`` for the scale-invariant class
            (a line of fixed points (5.66): every :math:`K` is preserved) and when unknown.
        universality_class: :class:`UniversalityClass`.
        exponents: critical exponents of §5–§11 (keys ``p0``, ``p_par``, ``p_perp``,
            ``p_psi``, ``p_V``, ``p_Theta``, ``p_D``, ``p_F``, ``p_A``, ``p_B``, ``p_P``,
            ``p_Q``; only those the book states for the class).
        a1, a2, b1: Taylor combinations (5.86)–(5.88) (smooth activations with
            :math:`\sigma_0 = 0`), else ``None``.
        p_perp: :math:`p_\perp = b_1/a_1` (K*=0 class), 2 (nonlinear scale-invariant, finite
            angle (5.168)), 0 (linear), else ``None``.
        a1_tilde: :math:`\tilde a_1 = \tfrac12 C_W g''(K^\star)` of (5.102) (half-stable).
        sigma1: :math:`\sigma_1 = \sigma'(0)` (K*=0 class).
        A2, A4: :math:`(a_+^2+a_-^2)/2`, :math:`(a_+^4+a_-^4)/2` (scale-invariant).
        nu: :math:`\nu` with :math:`V/(nG^2) = \nu\, r` at the output: :math:`3A_4/A_2^2-1`
            (A.70) or :math:`2/3` (A.69); residual value (B.29)/(B.35) if ``gamma > 0``.
        chi_parallel, chi_perp: susceptibilities at :math:`K^\star` (1 when critical).
        gamma: residual strength (B.3); 0 for a plain MLP.
        notes: human-readable remarks (stability, how it was obtained).
        alternatives: other solutions of (5.73) (e.g. the unstable :math:`K^\star=0` point
            of SWISH/GELU).
    """

    activation: Activation
    C_b: float
    C_W: float
    K_star: float | None
    universality_class: UniversalityClass
    exponents: Mapping[str, float] = field(default_factory=dict, compare=False, hash=False)
    a1: float | None = None
    a2: float | None = None
    b1: float | None = None
    p_perp: float | None = None
    a1_tilde: float | None = None
    sigma1: float | None = None
    A2: float | None = None
    A4: float | None = None
    nu: float | None = None
    chi_parallel: float = 1.0
    chi_perp: float = 1.0
    gamma: float = 0.0
    notes: str = ""
    alternatives: tuple["CriticalPoint", ...] = field(default=(), compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "exponents", MappingProxyType(dict(self.exponents)))

    @property
    def is_critical(self) -> bool:
        """False only for the ``.nearest`` suggestions of :class:`NoCriticalPointError`."""
        return self.universality_class is not UniversalityClass.NONE

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly dictionary (activation as its key)."""
        return {
            "activation": self.activation.key,
            "universality_class": self.universality_class.value,
            "C_b": self.C_b, "C_W": self.C_W, "K_star": self.K_star,
            "exponents": dict(self.exponents),
            "a1": self.a1, "a2": self.a2, "b1": self.b1, "p_perp": self.p_perp,
            "a1_tilde": self.a1_tilde, "sigma1": self.sigma1, "A2": self.A2, "A4": self.A4,
            "nu": self.nu, "chi_parallel": self.chi_parallel, "chi_perp": self.chi_perp,
            "gamma": self.gamma, "notes": self.notes,
            "alternatives": [a.as_dict() for a in self.alternatives],
        }


# ------------------------------------------------------------------------------ building blocks
def _act(a: ActivationLike) -> Activation:
    return a if isinstance(a, Activation) else get_activation(a)


def _t(K: Tensor | float) -> Tensor:
    if isinstance(K, Tensor):
        return K if K.is_floating_point() else K.to(torch.float64)
    return torch.as_tensor(K, dtype=torch.float64)


def _square(f: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    return lambda z: f(z) ** 2


def g_function(activation: ActivationLike, K: Tensor | float) -> Tensor:
    r""":math:`g(K) = \langle\sigma(z)\sigma(z)\rangle_K` (5.5), elementwise over ``K`` (any shape).

    Closed forms (piecewise linear: :math:`A_2K` (5.60); erf; sin) or quadrature.
    """
    act = _act(activation)
    K = _t(K)
    form = act.pair_closed_form(0, 0)
    if form is not None:
        return form(K, K, K)
    return expect1(_square(act.sigma), K, kinks=act.kinks)


def _sigma_prime_sq(act: Activation, K: Tensor) -> Tensor:
    form = act.pair_closed_form(1, 1)
    if form is not None:
        return form(K, K, K)
    return expect1(_square(act.fn(1)), K, kinks=act.kinks)


def _g_prime(act: Activation, K: Tensor) -> Tensor:
    """g'(K), with the K -> 0 limit from the Taylor series where available."""
    if act.slopes is not None:
        return torch.full_like(K, act.A2)
    pos = K > 0
    safe = torch.where(pos, K, torch.ones_like(K))
    val = expect1_dK(_square(act.sigma), safe, 1, kinks=act.kinks)
    if bool((~pos).any()):
        if act.taylor is None:
            raise ValueError(
                f"g'(0) of {act.key} needs its Taylor series at 0, which is not available (kink at 0)."
            )
        s0, s1, s2 = act.taylor[:3]
        val = torch.where(pos, val, torch.full_like(K, s1 * s1 + s0 * s2))
    return val


def chi_parallel(activation: ActivationLike, K: Tensor | float, C_W: float | Tensor) -> Tensor:
    r"""Parallel susceptibility :math:`\chi_\parallel(K) = C_W g'(K)` (5.50), shape of ``K``.

    Computed as :math:`C_W\langle\sigma^2(z^2-K)\rangle_K/(2K^2)`; at :math:`K=0` from the Taylor
    series, :math:`C_W(\sigma_1^2 + \sigma_0\sigma_2)`.
    """
    act = _act(activation)
    return C_W * _g_prime(act, _t(K))


def chi_perp(activation: ActivationLike, K: Tensor | float, C_W: float | Tensor) -> Tensor:
    r"""Perpendicular susceptibility :math:`\chi_\perp(K) = C_W\langle\sigma'\sigma'\rangle_K` (5.51)."""
    act = _act(activation)
    return C_W * _sigma_prime_sq(act, _t(K))


def susceptibilities(activation: ActivationLike, K: Tensor | float, C_W: float | Tensor) -> tuple[Tensor, Tensor]:
    r"""``(chi_parallel, chi_perp)`` at kernel ``K`` (5.50)–(5.51)."""
    return chi_parallel(activation, K, C_W), chi_perp(activation, K, C_W)


def h_function(activation: ActivationLike, K: Tensor | float, C_W: float | Tensor) -> Tensor:
    r"""Helper :math:`h(K) = \tfrac12 \frac{d\chi_\perp}{dK} = \frac{C_W}{4K^2}\langle\sigma'\sigma'(z^2-K)\rangle_K` (5.52).

    Zero for the scale-invariant class (5.62). Requires ``K > 0`` otherwise.
    """
    act = _act(activation)
    K = _t(K)
    if act.slopes is not None:
        return torch.zeros_like(K)
    return 0.5 * C_W * expect1_dK(_square(act.fn(1)), K, 1, kinks=act.kinks)


def criticality_condition(activation: ActivationLike, K: Tensor | float) -> Tensor:
    r"""Left-hand side of (5.73), :math:`2K^2\langle\sigma'\sigma'\rangle_K / \langle\sigma\sigma(z^2-K)\rangle_K`.

    Equals 1 exactly at the candidate critical kernels (Figures 5.1–5.3). ``K > 0``.
    """
    act = _act(activation)
    K = _t(K)
    return _sigma_prime_sq(act, K) / _g_prime(act, K)


def taylor_constants(activation: ActivationLike) -> tuple[float, float, float]:
    r"""The Taylor combinations :math:`(a_1, a_2, b_1)` of (5.86)–(5.88).

    .. math::
        a_1 = \frac{\sigma_3}{\sigma_1} + \frac34\Big(\frac{\sigma_2}{\sigma_1}\Big)^2,\quad
        a_2 = \frac14\frac{\sigma_5}{\sigma_1} + \frac58\frac{\sigma_4}{\sigma_1}\frac{\sigma_2}{\sigma_1}
              + \frac{5}{12}\Big(\frac{\sigma_3}{\sigma_1}\Big)^2,\quad
        b_1 = \frac{\sigma_3}{\sigma_1} + \Big(\frac{\sigma_2}{\sigma_1}\Big)^2.

    Raises:
        ValueError: when :math:`\sigma` is not smooth at 0 or :math:`\sigma_1 = 0`.
    """
    act = _act(activation)
    if act.taylor is None:
        raise ValueError(f"{act.key} is not smooth at 0; the Taylor constants a1, a2, b1 do not exist.")
    s0, s1, s2, s3, s4, s5 = act.taylor
    if s1 == 0:
        raise ValueError(f"{act.key} has sigma_1 = sigma'(0) = 0; a1, a2, b1 divide by it.")
    r2, r3, r4, r5 = s2 / s1, s3 / s1, s4 / s1, s5 / s1
    return r3 + 0.75 * r2 * r2, 0.25 * r5 + (5 / 8) * r4 * r2 + (5 / 12) * r3 * r3, r3 + r2 * r2


def fixed_points(
    activation: ActivationLike, C_b: float, C_W: float, *, K_max: float = 1e3
) -> list[tuple[float, float]]:
    r"""Fixed points :math:`K^\star = C_b + C_W g(K^\star)` (5.56) of the single-input kernel, any :math:`(C_b, C_W)`.

    Roots of :math:`C_b + C_W g(K) - K` on :math:`[0, K_{max}]` (scan + bracketing), each with its
    parallel susceptibility :math:`\chi_\parallel(K^\star)`: the fixed point attracts nearby
    kernels when :math:`\chi_\parallel < 1` and repels them when :math:`> 1` (§5.2, (5.9)).

    Args:
        activation: activation.
        C_b, C_W: hyperparameters (``>= 0``).
        K_max: upper end of the search.

    Returns:
        ``[(K_star, chi_parallel), ...]`` in increasing :math:`K^\star` (empty if none; the
        scale-invariant class at criticality has a whole line of them and returns ``[]`` with
        :math:`C_b = 0, C_W = 1/A_2`).
    """
    act = _act(activation)
    if not (C_b >= 0 and C_W >= 0 and math.isfinite(C_b) and math.isfinite(C_W)):
        raise ValueError(f"C_b and C_W must be finite and >= 0, got C_b={C_b!r}, C_W={C_W!r}.")
    if act.slopes is not None and C_b == 0 and abs(C_W * act.A2 - 1) < 1e-14:
        return []
    grid = torch.cat([torch.zeros(1, dtype=torch.float64),
                      torch.logspace(-6, math.log10(K_max), 241, dtype=torch.float64)])

    def R(K: Tensor) -> Tensor:
        return C_b + C_W * g_function(act, K) - K

    vals = R(grid)
    roots = [0.0] if float(vals[0]) == 0.0 else []
    roots += [k for k in _sign_change_roots(R, grid[1:], vals[1:])]
    out = []
    for k in sorted(set(roots)):
        chi = float(chi_parallel(act, torch.tensor([k], dtype=torch.float64), C_W)[0])
        out.append((k, chi))
    return out


# ---------------------------------------------------------------------------------- exponents
def _exponents_scale_invariant(linear: bool) -> dict[str, float]:
    return {
        "p0": 0.0, "p_par": 0.0, "p_perp": 0.0 if linear else 2.0, "p_psi": 0.0 if linear else 1.0,
        "p_V": -1.0, "p_Theta": -1.0, "p_D": -2.0, "p_F": -2.0, "p_A": -3.0, "p_B": -3.0, "p_Q": -3.0,
    }


def _exponents_k_star_zero(p_perp: float) -> dict[str, float]:
    return {
        "p0": 1.0, "p_par": 2.0, "p_perp": p_perp, "p_V": 1.0, "p_Theta": p_perp - 1.0,
        "p_D": p_perp - 1.0, "p_F": p_perp - 1.0, "p_A": 2 * p_perp - 3.0, "p_B": 2 * p_perp - 3.0,
        "p_P": 2 * p_perp - 3.0, "p_Q": 2 * p_perp - 3.0,
    }


# ------------------------------------------------------------------------------------ solvers
_K_GRID = torch.logspace(-3, 3, 121, dtype=torch.float64)


def _bisect(f: Callable[[float], float], lo: float, hi: float, flo: float, iters: int = 100) -> float:
    """Root in [lo, hi] by the Illinois (modified regula falsi) method, bisection-safeguarded."""
    fhi = f(hi)
    if fhi == 0.0:
        return hi
    side = 0
    for _ in range(iters):
        x = (lo * fhi - hi * flo) / (fhi - flo)
        if not (lo < x < hi):
            x = 0.5 * (lo + hi)
        fx = f(x)
        if fx == 0.0:
            return x
        if (fx > 0) == (fhi > 0):
            hi, fhi = x, fx
            if side == -1:
                flo *= 0.5
            side = -1
        else:
            lo, flo = x, fx
            if side == 1:
                fhi *= 0.5
            side = 1
        if hi - lo <= 2e-15 * hi:
            break
    return lo if abs(flo) < abs(fhi) else hi


def _sign_change_roots(F: Callable[[Tensor], Tensor], grid: Tensor, vals: Tensor | None = None) -> list[float]:
    vals = F(grid) if vals is None else vals
    roots: list[float] = []
    for i in range(grid.numel() - 1):
        a, b = float(vals[i]), float(vals[i + 1])
        if a == 0.0:
            roots.append(float(grid[i]))
        elif a * b < 0:
            f = lambda k: float(F(torch.tensor([k], dtype=torch.float64))[0])  # noqa: E731
            roots.append(_bisect(f, float(grid[i]), float(grid[i + 1]), a))
    return roots


def _scale_invariant_point(act: Activation, A2: float, A4: float, notes: str) -> CriticalPoint:
    linear = act.slopes is not None and act.slopes[0] == act.slopes[1]
    return CriticalPoint(
        activation=act, C_b=0.0, C_W=1.0 / A2, K_star=None,
        universality_class=UniversalityClass.SCALE_INVARIANT,
        exponents=_exponents_scale_invariant(linear), p_perp=0.0 if linear else 2.0,
        A2=A2, A4=A4, nu=3 * A4 / A2**2 - 1, notes=notes,
    )


def _half_stable(act: Activation, K: float, alternatives: tuple[CriticalPoint, ...]) -> CriticalPoint:
    Kt = torch.tensor([K], dtype=torch.float64)
    sp2 = float(_sigma_prime_sq(act, Kt)[0])
    C_W = 1.0 / sp2                                    # (5.71)
    C_b = K - float(g_function(act, Kt)[0]) * C_W      # (5.72)
    g2 = float(expect1_dK(_square(act.sigma), Kt, 2, kinks=act.kinks)[0])
    a1t = 0.5 * C_W * g2                               # (5.102): dK' = dK + a1~ dK^2
    side = "below" if a1t > 0 else "above"
    notes = (f"half-stable fixed point of (5.73): kernels {side} K*={K:.8g} are attracted, the "
             f"others repelled (5.102)-(5.103); |a1~| = {abs(a1t):.3g}.")
    return CriticalPoint(
        activation=act, C_b=C_b, C_W=C_W, K_star=K, universality_class=UniversalityClass.HALF_STABLE,
        exponents={"p0": 0.0, "p_dK": 1.0}, a1_tilde=a1t,
        chi_parallel=float(chi_parallel(act, Kt, C_W)[0]), chi_perp=float(C_W * sp2),
        notes=notes, alternatives=alternatives,
    )


def _k_star_zero(act: Activation, stable: bool) -> CriticalPoint:
    s1 = act.taylor[1]
    a1, a2, b1 = taylor_constants(act)
    p_perp = b1 / a1 if a1 != 0 else float("nan")
    if stable:
        notes = ("K*=0 universality class (5.89)-(5.90): K ~ 1/((-a1) l) (5.92); "
                 f"p_perp = b1/a1 = {p_perp:.6g} (5.99).")
        cls = UniversalityClass.K_STAR_ZERO
        exps = _exponents_k_star_zero(p_perp)
    else:
        notes = (f"K*=0 solves (5.73) with (C_b, C_W) = (0, 1/sigma_1^2), but (-a1) = {-a1:.6g} < 0: "
                 "the fixed point repels (unstable).")
        cls = UniversalityClass.NONE
        exps = {}
    return CriticalPoint(
        activation=act, C_b=0.0, C_W=1.0 / (s1 * s1), K_star=0.0, universality_class=cls,
        exponents=exps, a1=a1, a2=a2, b1=b1, p_perp=p_perp if stable else None, sigma1=s1,
        nu=2.0 / 3.0 if stable else None, notes=notes,
    )


def _kinked_k_star_zero(act: Activation) -> CriticalPoint | None:
    r"""K* = 0 for sigma(0) = 0 with one-sided slopes a_+- and curvatures c_+- at a kink at 0 (ELU, SELU).

    [derived here, not in the book] With A2 = (a_+^2 + a_-^2)/2 and
    kappa = (a_+ c_+ - a_- c_-) sqrt(2/pi): g(K) = A2 K + kappa K^{3/2} + O(K^2) and
    <s's'>_K = A2 + kappa sqrt(K) + O(K), so C_W = 1/A2, C_b = 0 gives chi_par, chi_perp -> 1 as
    K -> 0 and K' = K + (kappa/A2) K^{3/2}: attractive iff kappa < 0, with K ~ 4 A2^2/(kappa^2 l^2)
    (p0 = 2), chi_par = 1 - 3/l, chi_perp = 1 - 2/l (p_par = 3, p_perp = 2).
    """
    z = torch.tensor([0.0, 1e-300, -1e-300], dtype=torch.float64)
    s0 = float(act.sigma(z[:1])[0])
    d1 = act.derivative(z, 1)
    d2 = act.derivative(z, 2)
    ap, am = float(d1[1]), float(d1[2])
    cpl, cmi = float(d2[1]), float(d2[2])
    if not all(math.isfinite(v) for v in (s0, ap, am, cpl, cmi)):
        return None
    A2 = 0.5 * (ap * ap + am * am)
    if abs(s0) > 1e-12 * max(1.0, A2) or A2 <= 0:
        return None
    kappa = (ap * cpl - am * cmi) * math.sqrt(2.0 / math.pi)
    if not kappa < -1e-12 * A2:
        return None
    notes = ("[derived here, not in the book] kinked K*=0 class: sigma(0) = 0 with one-sided slopes "
             f"(a+, a-) = ({ap:.6g}, {am:.6g}) and curvatures giving K' = K + (kappa/A2) K^(3/2), "
             f"kappa = {kappa:.6g} < 0: K* = 0 attracts like 1/l^2 (p0 = 2); chi_perp = 1 - 2/l.")
    return CriticalPoint(
        activation=act, C_b=0.0, C_W=1.0 / A2, K_star=0.0, universality_class=UniversalityClass.K_STAR_ZERO,
        exponents={"p0": 2.0, "p_par": 3.0, "p_perp": 2.0}, p_perp=2.0, A2=A2, notes=notes,
    )


def _suggestion(act: Activation) -> str:
    base = act.name
    if base == "sigmoid":
        return ("use tanh: the shifted sigmoid sigma - 1/2 = tanh(z/2)/2 is in the K*=0 class, critical "
                "at (C_b, C_W) = (0, 16) (§5.3.2).")
    if base == "softplus":
        return "use relu (its kinked limit, critical at (0, 2)) or swish/gelu (half-stable)."
    if base == "monomial":
        return "use linear (p = 1, critical at (0, 1)) or tanh (K*=0 class)."
    if base.startswith("custom:"):
        return ("make sigma(0) = 0 with sigma'(0) != 0 and (-a1) > 0 (K*=0 class, e.g. tanh) or make it "
                "piecewise linear (scale-invariant, e.g. relu).")
    return "use tanh (K*=0 class, critical at (0, 1)) or relu (scale-invariant, critical at (0, 2))."


_NEAREST_K_MAX = 4.0


def saturated_fraction(activation: ActivationLike, K: float, *, threshold: float = 1e-2) -> float:
    r"""Fraction of units in saturation under :math:`z \sim N(0, K)`.

    A unit is saturated where :math:`|\sigma'(z)| < ` ``threshold`` :math:`\cdot \max|\sigma'|`
    (the maximum over :math:`|z| \le 10\sqrt{K}`). Used to report what a non-critical setting
    costs (``docs/activations.md``).

    Args:
        activation: anything :func:`~torch_crit.theory.activations.get_activation` accepts.
        K: the preactivation variance, > 0.
        threshold: relative slope below which a unit counts as saturated.

    Returns:
        The probability, in [0, 1].
    """
    act = _act(activation)
    sd = math.sqrt(float(K))
    z = torch.linspace(-10 * sd, 10 * sd, 40001, dtype=torch.float64)
    d = act.derivative(z, 1).abs()
    top = float(d.max())
    if top == 0:
        return 1.0
    w = torch.exp(-0.5 * (z / sd) ** 2)
    return float((w * (d < threshold * top)).sum() / w.sum())


def _nearest(act: Activation, reason: str) -> CriticalPoint:
    """C_b = 0 and chi_perp = 1 at the fixed point (gradient-critical) when that fixed point has
    K* <= 4; otherwise the fixed point K* = 1 (forward signal O(1), units unsaturated)."""
    def R(K: Tensor) -> Tensor:  # g(K) / <s's'>_K - K, zero at a C_b = 0 fixed point with chi_perp = 1
        return g_function(act, K) / _sigma_prime_sq(act, K) - K

    try:
        roots = _sign_change_roots(R, _K_GRID)
    except ValueError:
        roots = []
    roots = [K for K in roots if float(_sigma_prime_sq(act, torch.tensor([K], dtype=torch.float64))[0]) > 0]
    K1 = torch.tensor([1.0], dtype=torch.float64)
    g1 = float(g_function(act, K1)[0])
    if roots and roots[0] > _NEAREST_K_MAX and g1 > 0:
        # the gradient-critical fixed point sits deep in saturation (sigmoid: K* = 45.6, C_W = 103):
        # keep the forward signal O(1) instead (fixed point K* = 1 at C_b = 0) and say what it costs
        C_W = 1.0 / g1
        chi_perp_1 = float(C_W * _sigma_prime_sq(act, K1)[0])
        chi_par = float(chi_parallel(act, K1, C_W)[0])
        note = (f"not critical: {reason} The setting with chi_perp = 1 has its fixed point at K* = {roots[0]:.4g}, "
                f"where {saturated_fraction(act, roots[0]):.0%} of units are saturated; nearest usable setting "
                f"instead: C_b = 0, C_W = 1/<sigma^2>_(K=1) = {C_W:.6g}, a fixed point at K* = 1 "
                f"({saturated_fraction(act, 1.0):.0%} saturated units) with chi_perp = {chi_perp_1:.4g}: "
                f"gradients shrink by that factor per layer (about {chi_perp_1:.3g}^L).")
        return CriticalPoint(activation=act, C_b=0.0, C_W=C_W, K_star=1.0,
                             universality_class=UniversalityClass.NONE, chi_parallel=chi_par,
                             chi_perp=chi_perp_1, notes=note)
    if roots:
        K = roots[0]
        Kt = torch.tensor([K], dtype=torch.float64)
        C_W = 1.0 / float(_sigma_prime_sq(act, Kt)[0])
        chi_par = float(chi_parallel(act, Kt, C_W)[0])
        note = (f"not critical: {reason} Nearest usable setting: C_b = 0 and C_W = 1/<s's'>_K* so that "
                f"chi_perp(K*) = 1 at the fixed point K* = {K:.6g} (no exploding/vanishing gradients); "
                f"chi_par(K*) = {chi_par:.6g} != 1, so the kernel still flows.")
        return CriticalPoint(activation=act, C_b=0.0, C_W=C_W, K_star=K,
                             universality_class=UniversalityClass.NONE, chi_parallel=chi_par,
                             chi_perp=1.0, notes=note)
    K1 = torch.tensor([1.0], dtype=torch.float64)
    C_W = 1.0 / max(float(_sigma_prime_sq(act, K1)[0]), 1e-300)
    chi_par = float(chi_parallel(act, K1, C_W)[0])
    note = (f"not critical: {reason} No fixed point with chi_perp = 1 exists either; nearest setting: "
            f"C_b = 0, C_W = 1/<s's'>_(K=1) (chi_perp = 1 at K = 1 only).")
    return CriticalPoint(activation=act, C_b=0.0, C_W=C_W, K_star=None,
                         universality_class=UniversalityClass.NONE, chi_parallel=chi_par,
                         chi_perp=1.0, notes=note)


def _solve(act: Activation) -> CriticalPoint:
    # (a) scale-invariant class: closed form (5.67)
    if act.slopes is not None:
        if act.A2 == 0:
            raise NoCriticalPointError(act, "sigma is identically zero (A2 = 0).",
                                       CriticalPoint(act, 0.0, float("inf"), None, UniversalityClass.NONE),
                                       _suggestion(act))
        return _scale_invariant_point(act, act.A2, act.A4,
                                      "scale-invariant class (5.67): a line of fixed points K* = K^(1)/... "
                                      "(5.66); chi_par = chi_perp = A2 C_W = 1.")

    # (a') piecewise linear only near 0 (ReLU6, Hardtanh): the book's scale-invariant class holds
    # for kernels well inside the linear window (a deliberate choice, docs/activations.md)
    if act.local_slopes is not None:
        ap, am = act.local_slopes
        A2, A4 = 0.5 * (ap * ap + am * am), 0.5 * (ap**4 + am**4)
        if A2 > 0:
            r = act.local_radius
            cp = _scale_invariant_point(
                act, A2, A4,
                f"[choice, not in the book] sigma is piecewise linear with slopes (a+, a-) = ({ap:g}, {am:g}) "
                f"only for |z| < {r:g}: scale-invariant (5.67) while the kernel K << {r * r:g} (units rarely "
                f"reach the saturation at |z| = {r:g}); for larger K the saturation makes chi_par < 1 and "
                "the kernel shrinks back toward that window.")
            if ap == am:  # locally the identity: bounded like tanh, K* = 0 with an exponentially slow flow
                cp = dataclasses.replace(cp, universality_class=UniversalityClass.K_STAR_ZERO, K_star=0.0,
                                         exponents={}, p_perp=None)
            return cp

    alternatives: list[CriticalPoint] = []
    reason_zero = ""
    tay = act.taylor
    if tay is not None and all(math.isfinite(t) for t in tay[:4]):
        s0, s1 = tay[0], tay[1]
        scale = max(abs(t) for t in tay[:4]) or 1.0
        if abs(s0) <= 1e-12 * scale and s1 != 0:
            a1 = taylor_constants(act)[0] if math.isfinite(tay[3]) else float("nan")
            if a1 < -1e-12:
                return _k_star_zero(act, stable=True)
            if math.isfinite(tay[4]) and math.isfinite(tay[5]) and a1 > 1e-12:
                alternatives.append(_k_star_zero(act, stable=False))
            reason_zero = f"K* = 0 is not attractive ((-a1) = {-a1:.6g} <= 0)."
        elif s1 != 0:
            reason_zero = (f"(5.73) is met only as K* -> 0, where (5.72) needs C_b = -(sigma_0/sigma_1)^2 = "
                           f"{-(s0 / s1) ** 2:.6g} < 0 (§5.3.2).")
        else:
            reason_zero = "sigma'(0) = 0, so K* = 0 cannot be a nontrivial fixed point (5.89)."

    elif tay is None and 0.0 in act.kinks:
        kinked = _kinked_k_star_zero(act)
        if kinked is not None:
            return kinked

    # (b) numerical solve of (5.73): <s's'>_K - g'(K) = 0 for K > 0
    def F(K: Tensor) -> Tensor:
        return _sigma_prime_sq(act, K) - _g_prime(act, K)

    grid = _K_GRID
    sp2 = _sigma_prime_sq(act, grid)
    gp = _g_prime(act, grid)
    Fv = sp2 - gp
    if bool((Fv.abs() <= 1e-11 * sp2.abs().clamp(min=1e-300)).all()):
        # numerically scale invariant: <s's'> = g' for all K; check g(K) = A2 K (C_b = 0 line)
        A2 = float(sp2.mean())
        gv = g_function(act, grid)
        if bool(((gv - A2 * grid).abs() <= 1e-9 * gv.abs().clamp(min=1e-300)).all()):
            K1 = torch.tensor([1.0], dtype=torch.float64)
            A4 = float(expect1(lambda z: act.derivative(z, 1) ** 4, K1, kinks=act.kinks)[0])
            return _scale_invariant_point(
                act, A2, A4, "detected numerically as scale-invariant: <s's'>_K = g'(K) = A2 for all K.")
    roots = _sign_change_roots(F, grid, Fv)
    reasons = []
    for K in roots:
        Kt = torch.tensor([K], dtype=torch.float64)
        sp2_K = float(_sigma_prime_sq(act, Kt)[0])
        if sp2_K < 0.1:
            if not any("nearly vanishes" in r for r in reasons):
                reasons.append(f"<sigma'sigma'> nearly vanishes at the roots from K* = {K:.6g} (C_W would exceed 10: "
                               "the units sit in a flat region of sigma)")
            continue
        C_W = 1.0 / sp2_K
        C_b = K - C_W * float(g_function(act, Kt)[0])
        if C_b < -1e-10 * max(1.0, K):
            reasons.append(f"the root K* = {K:.6g} of (5.73) needs C_b = {C_b:.6g} < 0")
            continue
        return _half_stable(act, K, tuple(alternatives))
    reason = reason_zero
    if not roots:
        reason += " (5.73) has no solution with K* > 0 (checked 1e-3 <= K <= 1e3)."
    else:
        reason += " " + "; ".join(reasons) + "."
    if act.name == "monomial":
        p = act.params["p"]
        reason = (f"for sigma = z^p (5.73) reads p/(2p-1) = 1 (5.78), impossible for p > 1 (here p/(2p-1) = "
                  f"{p / (2 * p - 1):.6g}).")
    raise NoCriticalPointError(act, reason.strip(), _nearest(act, reason.strip()), _suggestion(act))


_CACHE: dict[str, CriticalPoint | NoCriticalPointError] = {}


def critical_point(activation: ActivationLike) -> CriticalPoint:
    r"""Critical initialization hyperparameters :math:`(C_b, C_W)` of an activation (§5.2–§5.3).

    Algorithm: piecewise-linear → (5.67); :math:`\sigma_0=0,\sigma_1\ne0, a_1<0` → (5.90);
    otherwise a scan over :math:`10^{-3}\le K\le10^{3}` and bisection of (5.73), keeping roots
    with :math:`C_b \ge 0` from (5.71)–(5.72) (half-stable points, §5.3.4). Activations
    without a solution raise :class:`NoCriticalPointError` (§5.3.2). Results for registry
    activations are memoised by their key.

    Args:
        activation: anything :func:`~torch_crit.theory.activations.get_activation` accepts.

    Returns:
        The :class:`CriticalPoint`.

    Raises:
        NoCriticalPointError: with ``.reason``, ``.nearest`` and ``.suggestion``.
    """
    act = _act(activation)
    key = None if act.is_custom else act.key
    if key is not None and key in _CACHE:
        hit = _CACHE[key]
        if isinstance(hit, NoCriticalPointError):
            raise NoCriticalPointError(hit.activation, hit.reason, hit.nearest, hit.suggestion)
        return hit
    try:
        cp = _solve(act)
    except NoCriticalPointError as err:
        if key is not None:
            _CACHE[key] = err
        raise
    if key is not None:
        _CACHE[key] = cp
    return cp
