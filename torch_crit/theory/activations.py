r"""Activation functions as small immutable objects, and their registry.

An :class:`Activation` bundles everything the theory engine needs to know about
:math:`\sigma`: its values, derivatives (closed forms where known, autograd otherwise),
the Taylor coefficients :math:`\sigma_p = \sigma^{(p)}(0)` of (5.80) that decide the
:math:`K^\star = 0` universality class, the slopes :math:`(a_+, a_-)` of (5.59) that mark
the scale-invariant class, the points where :math:`\sigma` is not smooth (``kinks``, used
by the piecewise quadrature of :mod:`torch_crit.theory.gaussian`) and closed-form
two-point Gaussian expectations (arc-cosine, arcsine, ...) used as fast paths.

Example:
    >>> import torch
    >>> from torch_crit.theory import get_activation
    >>> act = get_activation("leaky_relu", a=0.1)
    >>> act.key
    'leaky_relu(a=0.1)'
    >>> act.slopes
    (1.0, 0.1)
    >>> get_activation(torch.nn.GELU(approximate="tanh")).name
    'gelu_tanh'
"""
from __future__ import annotations

import math
import warnings
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from .gaussian import (
    erf_pair_expectation,
    piecewise_linear_pair_expectation,
    sin_pair_expectation,
)

__all__ = [
    "Activation",
    "ActivationFunction",
    "get_activation",
    "available_activations",
    "parse_activation_spec",
    "activation_from_call",
    "activation_from_module",
]

# Closed-form pair expectations: (order1, order2) -> f(K11, K12, K22) = <s^(o1)(z1) s^(o2)(z2)>.
PairForms = Mapping[tuple[int, int], Callable[[Tensor, Tensor, Tensor], Tensor]]

_SQRT_PI = math.sqrt(math.pi)
_SQRT_2PI = math.sqrt(2.0 * math.pi)
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def _as_tensor(z: Tensor | float | Sequence[float]) -> Tensor:
    if isinstance(z, Tensor):
        return z if z.is_floating_point() else z.to(torch.float64)
    return torch.as_tensor(z, dtype=torch.float64)


class ActivationFunction:
    r"""The callable :math:`z \mapsto \sigma^{(k)}(z)` of one activation and derivative order.

    Passed to :func:`~torch_crit.theory.gaussian.expect1` / ``expect2`` it lets them use the
    activation's closed-form Gaussian integrals and its kink locations.

    Attributes:
        activation: the :class:`Activation`.
        order: derivative order :math:`k \ge 0`.
    """

    __slots__ = ("activation", "order")

    def __init__(self, activation: "Activation", order: int) -> None:
        object.__setattr__(self, "activation", activation)
        object.__setattr__(self, "order", int(order))

    def __setattr__(self, name: str, value: Any) -> None:  # immutable
        raise AttributeError("ActivationFunction is immutable")

    def __call__(self, z: Tensor) -> Tensor:
        return self.activation.derivative(z, self.order)

    @property
    def kinks(self) -> tuple[float, ...]:
        """Points where this function (or a lower derivative) is not smooth."""
        return self.activation.kinks

    def __repr__(self) -> str:
        tick = "'" * self.order if self.order <= 3 else f"^({self.order})"
        return f"{self.activation.key}{tick}"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ActivationFunction)
            and other.activation == self.activation
            and other.order == self.order
        )

    def __hash__(self) -> int:
        return hash((self.activation, self.order))


class Activation:
    r"""An activation function :math:`\sigma` with what the theory needs to know about it.

    Instances are immutable; build them with :func:`get_activation`.

    Attributes:
        name: registry name (``"relu"``, ``"tanh"``, ...) or ``"custom:<qualname>"``.
        params: read-only mapping of the activation's parameters (``{"a": 0.1}``).
        key: stable string for reports, e.g. ``"leaky_relu(a=0.1)"``.
        taylor: :math:`(\sigma_0, \dots, \sigma_5)`, the derivatives at 0 of (5.80), or
            ``None`` when :math:`\sigma` is not smooth at 0.
        slopes: :math:`(a_+, a_-)` of (5.59) for piecewise-linear activations
            (scale-invariant class), else ``None``.
        kinks: points where :math:`\sigma` or one of its first three derivatives jumps.
        odd: whether :math:`\sigma(-z) = -\sigma(z)`.
        derivative_source: ``"closed-form"``, ``"autograd"`` or ``"finite-difference"``.
        local_slopes: :math:`(a_+, a_-)` of a function that is piecewise linear only on
            :math:`|z| <` ``local_radius`` (ReLU6, Hardtanh): scale-invariant for small kernels
            :math:`K \ll` ``local_radius``:math:`^2`, saturating beyond (see ``docs/activations.md``).
        local_radius: the half-width of that linear window.
        note: a caveat reported with the activation (e.g. RReLU read in eval mode).
    """

    __slots__ = (
        "name", "_params", "_fn", "_derivs", "taylor", "slopes", "kinks", "odd",
        "_pair_forms", "derivative_source", "_identity", "local_slopes", "local_radius", "note",
    )

    def __init__(
        self,
        name: str,
        params: Mapping[str, float],
        fn: Callable[[Tensor], Tensor],
        *,
        derivatives: Sequence[Callable[[Tensor], Tensor]] = (),
        taylor: Sequence[float] | None = None,
        slopes: tuple[float, float] | None = None,
        kinks: Sequence[float] = (),
        odd: bool = False,
        pair_forms: PairForms | None = None,
        derivative_source: str = "closed-form",
        identity: object = None,
        local_slopes: tuple[float, float] | None = None,
        local_radius: float | None = None,
        note: str = "",
    ) -> None:
        set_ = object.__setattr__
        set_(self, "name", str(name))
        set_(self, "_params", MappingProxyType({k: float(v) for k, v in params.items()}))
        set_(self, "_fn", fn)
        set_(self, "_derivs", tuple(derivatives))
        set_(self, "taylor", None if taylor is None else tuple(float(t) for t in taylor))
        set_(self, "slopes", None if slopes is None else (float(slopes[0]), float(slopes[1])))
        set_(self, "kinks", tuple(sorted(float(k) for k in kinks)))
        set_(self, "odd", bool(odd))
        set_(self, "_pair_forms", MappingProxyType(dict(pair_forms or {})))
        set_(self, "derivative_source", derivative_source)
        set_(self, "_identity", identity)
        set_(self, "local_slopes", None if local_slopes is None else (float(local_slopes[0]), float(local_slopes[1])))
        set_(self, "local_radius", None if local_radius is None else float(local_radius))
        set_(self, "note", str(note))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Activation is immutable (tried to set {name!r})")

    # ----------------------------------------------------------------- identity
    @property
    def params(self) -> Mapping[str, float]:
        """Read-only parameters of the activation."""
        return self._params

    @property
    def key(self) -> str:
        """Stable identifier for reports and caches, e.g. ``'elu(alpha=1.0)'``."""
        if not self._params:
            return self.name
        inner = ",".join(f"{k}={v:g}" for k, v in sorted(self._params.items()))
        return f"{self.name}({inner})"

    @property
    def is_custom(self) -> bool:
        """True for activations built from a user callable (not from the registry)."""
        return self._identity is not None

    def __repr__(self) -> str:
        return f"Activation({self.key})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Activation):
            return NotImplemented
        return self.key == other.key and self._identity is other._identity

    def __hash__(self) -> int:
        return hash((self.key, id(self._identity)))

    @classmethod
    def from_module(cls, module: nn.Module) -> "Activation":
        """The activation of an ``nn.Module`` (``nn.ReLU()``, ``nn.GELU('tanh')``, ...); see :func:`get_activation`."""
        return get_activation(module)

    # ------------------------------------------------------------------ values
    def sigma(self, z: Tensor | float) -> Tensor:
        r"""Evaluate :math:`\sigma(z)` elementwise.

        Args:
            z: tensor of any shape (floats; Python numbers become float64 tensors).

        Returns:
            Tensor of the same shape and dtype as ``z``.
        """
        return self._fn(_as_tensor(z))

    __call__ = sigma

    def derivative(self, z: Tensor | float, order: int = 1) -> Tensor:
        r"""Evaluate :math:`\sigma^{(k)}(z)` elementwise, :math:`k` = ``order``.

        Closed forms are used where registered; otherwise nested autograd (torch callables)
        or 5-point finite differences (numpy callables). Derivatives at kinks are the
        pointwise (one-sided) values; the distributional delta terms (e.g.
        :math:`\sigma'' = (a_+ - a_-)\delta(z)` for ReLU) are not represented.

        Args:
            z: tensor of any shape.
            order: derivative order, ``0 <= order`` (closed forms cover 0..3; autograd any).

        Returns:
            Tensor of the same shape as ``z``.

        Raises:
            ValueError: for a negative or non-integer order.
        """
        if isinstance(order, bool) or not isinstance(order, int) or order < 0:
            raise ValueError(
                f"derivative order must be a non-negative int, got {order!r}; pass 0 for "
                "sigma itself, 1 for sigma', 2 for sigma''."
            )
        z = _as_tensor(z)
        if order == 0:
            return self._fn(z)
        if order <= len(self._derivs):
            return self._derivs[order - 1](z)
        if self.derivative_source == "finite-difference":
            return _finite_difference(self._fn, z, order)
        return _autograd_derivative(self._fn, z, order)

    def fn(self, order: int = 0) -> ActivationFunction:
        r"""The callable :math:`\sigma^{(k)}` (for :func:`~torch_crit.theory.gaussian.expect2`)."""
        if isinstance(order, bool) or not isinstance(order, int) or order < 0:
            raise ValueError(f"order must be a non-negative int, got {order!r}")
        return ActivationFunction(self, order)

    def pair_closed_form(
        self, order1: int, order2: int
    ) -> Callable[[Tensor, Tensor, Tensor], Tensor] | None:
        r"""Closed form of :math:`\langle \sigma^{(o_1)}(z_1)\sigma^{(o_2)}(z_2)\rangle_K`, if known.

        Returns:
            ``f(K11, K12, K22)`` on broadcastable tensors, or ``None``.
        """
        form = self._pair_forms.get((order1, order2))
        if form is None and order1 != order2:
            swapped = self._pair_forms.get((order2, order1))
            if swapped is not None:
                return lambda k11, k12, k22: swapped(k22, k12, k11)
        return form

    # --------------------------------------------------------------- constants
    @property
    def A2(self) -> float | None:
        r""":math:`A_2 = (a_+^2 + a_-^2)/2` of (5.61), for the scale-invariant class."""
        if self.slopes is None:
            return None
        return 0.5 * (self.slopes[0] ** 2 + self.slopes[1] ** 2)

    @property
    def A4(self) -> float | None:
        r""":math:`A_4 = (a_+^4 + a_-^4)/2` of (5.114), for the scale-invariant class."""
        if self.slopes is None:
            return None
        return 0.5 * (self.slopes[0] ** 4 + self.slopes[1] ** 4)

    @property
    def is_smooth(self) -> bool:
        """True when the activation has no kinks (all derivatives continuous)."""
        return not self.kinks


# --------------------------------------------------------------------------- derivatives
def _autograd_derivative(fn: Callable[[Tensor], Tensor], z: Tensor, order: int) -> Tensor:
    x = z.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        y = fn(x)
        if not isinstance(y, Tensor):
            raise TypeError(
                f"activation returned {type(y).__name__}, not a torch.Tensor; autograd cannot "
                "differentiate it. Pass a torch function, or a numpy function (derivatives are "
                "then taken by finite differences)."
            )
        for k in range(order):
            if not y.requires_grad:
                return torch.zeros_like(z)
            (y,) = torch.autograd.grad(y.sum(), x, create_graph=k < order - 1, allow_unused=True)
            if y is None:
                return torch.zeros_like(z)
    return y.detach().to(z.dtype)


_FD_STENCILS = {
    # order: (step, offsets, weights, power of h)
    1: (2e-3, (-2, -1, 1, 2), (1 / 12, -8 / 12, 8 / 12, -1 / 12), 1),
    2: (5e-3, (-2, -1, 0, 1, 2), (-1 / 12, 16 / 12, -30 / 12, 16 / 12, -1 / 12), 2),
    3: (1e-2, (-3, -2, -1, 1, 2, 3), (1 / 8, -1, 13 / 8, -13 / 8, 1, -1 / 8), 3),
}


def _finite_difference(fn: Callable[[Tensor], Tensor], z: Tensor, order: int) -> Tensor:
    if order not in _FD_STENCILS:
        raise ValueError(
            f"finite-difference derivatives are available for orders 1..3, got {order}; give a "
            "torch callable (autograd) or closed-form derivatives for higher orders."
        )
    h, offsets, weights, power = _FD_STENCILS[order]
    zz = z.to(torch.float64)
    out = torch.zeros_like(zz)
    for o, w in zip(offsets, weights):
        out = out + w * fn(zz + o * h).to(torch.float64)
    return (out / h**power).to(z.dtype)


def _taylor_by_autograd(fn: Callable[[Tensor], Tensor], source: str, n: int = 6) -> tuple[float, ...]:
    z0 = torch.zeros(1, dtype=torch.float64)
    out = [float(fn(z0)[0])]
    for k in range(1, n):
        if source == "finite-difference":
            if k > 3:
                out.append(float("nan"))
                continue
            out.append(float(_finite_difference(fn, z0, k)[0]))
        else:
            out.append(float(_autograd_derivative(fn, z0, k)[0]))
    return tuple(out)


# --------------------------------------------------------------------------- registry
def _sig(z: Tensor) -> Tensor:
    return torch.sigmoid(z)


def _piecewise_linear(name: str, params: Mapping[str, float], a_plus: float, a_minus: float) -> Activation:
    ap, am = float(a_plus), float(a_minus)

    def fn(z: Tensor) -> Tensor:
        return torch.where(z >= 0, ap * z, am * z)

    def d1(z: Tensor) -> Tensor:
        return torch.where(z > 0, torch.full_like(z, ap), torch.full_like(z, am))

    def d0(z: Tensor) -> Tensor:
        return torch.zeros_like(z)

    linear = ap == am
    return Activation(
        name, params, fn,
        derivatives=(d1, d0, d0),
        taylor=(0.0, ap, 0.0, 0.0, 0.0, 0.0) if linear else None,
        slopes=(ap, am),
        kinks=() if linear else (0.0,),
        odd=linear,
        pair_forms={
            (0, 0): lambda k11, k12, k22: piecewise_linear_pair_expectation(ap, am, k11, k12, k22, 0),
            (1, 1): lambda k11, k12, k22: piecewise_linear_pair_expectation(ap, am, k11, k12, k22, 1),
        },
    )


def _make_relu(**p: float) -> Activation:
    _no_params("relu", p)
    return _piecewise_linear("relu", {}, 1.0, 0.0)


def _make_leaky_relu(a: float = 0.01, **p: float) -> Activation:
    _no_params("leaky_relu", p, accepted="a")
    return _piecewise_linear("leaky_relu", {"a": a}, 1.0, a)


def _make_linear(**p: float) -> Activation:
    _no_params("linear", p)
    return _piecewise_linear("linear", {}, 1.0, 1.0)


def _make_tanh(**p: float) -> Activation:
    _no_params("tanh", p)

    def d1(z: Tensor) -> Tensor:
        t = torch.tanh(z)
        return 1 - t * t

    def d2(z: Tensor) -> Tensor:
        t = torch.tanh(z)
        return -2 * t * (1 - t * t)

    def d3(z: Tensor) -> Tensor:
        t = torch.tanh(z)
        return -2 * (1 - t * t) * (1 - 3 * t * t)

    return Activation("tanh", {}, torch.tanh, derivatives=(d1, d2, d3),
                      taylor=(0.0, 1.0, 0.0, -2.0, 0.0, 16.0), odd=True)


def _make_sin(**p: float) -> Activation:
    _no_params("sin", p)
    return Activation(
        "sin", {}, torch.sin,
        derivatives=(torch.cos, lambda z: -torch.sin(z), lambda z: -torch.cos(z)),
        taylor=(0.0, 1.0, 0.0, -1.0, 0.0, 1.0), odd=True,
        pair_forms={
            (0, 0): lambda k11, k12, k22: sin_pair_expectation(k11, k12, k22, 0),
            (1, 1): lambda k11, k12, k22: sin_pair_expectation(k11, k12, k22, 1),
        },
    )


def _make_erf(**p: float) -> Activation:
    _no_params("erf", p)
    c = 2.0 / _SQRT_PI

    def d1(z: Tensor) -> Tensor:
        return c * torch.exp(-z * z)

    return Activation(
        "erf", {}, torch.erf,
        derivatives=(d1, lambda z: -2 * z * d1(z), lambda z: (4 * z * z - 2) * d1(z)),
        taylor=(0.0, c, 0.0, -2.0 * c, 0.0, 12.0 * c), odd=True,
        pair_forms={
            (0, 0): lambda k11, k12, k22: erf_pair_expectation(k11, k12, k22, 0),
            (1, 1): lambda k11, k12, k22: erf_pair_expectation(k11, k12, k22, 1),
        },
    )


def _make_sigmoid(**p: float) -> Activation:
    _no_params("sigmoid", p)

    def d1(z: Tensor) -> Tensor:
        s = _sig(z)
        return s * (1 - s)

    def d2(z: Tensor) -> Tensor:
        s = _sig(z)
        return s * (1 - s) * (1 - 2 * s)

    def d3(z: Tensor) -> Tensor:
        s = _sig(z)
        return s * (1 - s) * (1 - 6 * s + 6 * s * s)

    return Activation("sigmoid", {}, _sig, derivatives=(d1, d2, d3),
                      taylor=(0.5, 0.25, 0.0, -0.125, 0.0, 0.25))


def _make_softplus(beta: float = 1.0, **p: float) -> Activation:
    _no_params("softplus", p, accepted="beta")
    b = float(beta)
    if not b > 0:
        raise ValueError(f"softplus needs beta > 0, got beta={beta!r}")

    def fn(z: Tensor) -> Tensor:
        return F.softplus(b * z) / b

    def d1(z: Tensor) -> Tensor:
        return _sig(b * z)

    def d2(z: Tensor) -> Tensor:
        s = _sig(b * z)
        return b * s * (1 - s)

    def d3(z: Tensor) -> Tensor:
        s = _sig(b * z)
        return b * b * s * (1 - s) * (1 - 2 * s)

    return Activation("softplus", {"beta": b}, fn, derivatives=(d1, d2, d3),
                      taylor=(math.log(2.0) / b, 0.5, b / 4, 0.0, -(b**3) / 8, 0.0))


def _make_swish(beta: float = 1.0, **p: float) -> Activation:
    _no_params("swish", p, accepted="beta")
    b = float(beta)

    def fn(z: Tensor) -> Tensor:
        return z * _sig(b * z)

    def d1(z: Tensor) -> Tensor:
        s = _sig(b * z)
        return s + b * z * s * (1 - s)

    def d2(z: Tensor) -> Tensor:
        s = _sig(b * z)
        q = s * (1 - s)
        return 2 * b * q + b * b * z * q * (1 - 2 * s)

    def d3(z: Tensor) -> Tensor:
        s = _sig(b * z)
        q = s * (1 - s)
        return 3 * b * b * q * (1 - 2 * s) + b**3 * z * q * (1 - 6 * s + 6 * s * s)

    sig_derivs = (0.5, 0.25, 0.0, -0.125, 0.0)  # sigmoid^{(k)}(0)
    taylor = (0.0,) + tuple(k * b ** (k - 1) * sig_derivs[k - 1] for k in range(1, 6))
    return Activation("swish", {"beta": b} if b != 1.0 else {}, fn,
                      derivatives=(d1, d2, d3), taylor=taylor)


def _make_gelu(**p: float) -> Activation:
    _no_params("gelu", p)
    inv_sqrt2 = 1.0 / math.sqrt(2.0)

    def phi(z: Tensor) -> Tensor:
        return torch.exp(-0.5 * z * z) / _SQRT_2PI

    def fn(z: Tensor) -> Tensor:
        return 0.5 * z * (1 + torch.erf(z * inv_sqrt2))

    def d1(z: Tensor) -> Tensor:
        return 0.5 * (1 + torch.erf(z * inv_sqrt2)) + z * phi(z)

    phi0 = 1.0 / _SQRT_2PI
    return Activation(
        "gelu", {}, fn,
        derivatives=(d1, lambda z: (2 - z * z) * phi(z), lambda z: (z**3 - 4 * z) * phi(z)),
        taylor=(0.0, 0.5, 2 * phi0, 0.0, -4 * phi0, 0.0),
    )


def _make_gelu_tanh(**p: float) -> Activation:
    _no_params("gelu_tanh", p)
    c = math.sqrt(2.0 / math.pi)

    def fn(z: Tensor) -> Tensor:
        return 0.5 * z * (1 + torch.tanh(c * (z + 0.044715 * z**3)))

    return Activation("gelu_tanh", {}, fn, taylor=_taylor_by_autograd(fn, "autograd"),
                      derivative_source="autograd")


def _elu_like(name: str, params: Mapping[str, float], alpha: float, scale: float) -> Activation:
    a, s = float(alpha), float(scale)

    def fn(z: Tensor) -> Tensor:
        return s * torch.where(z > 0, z, a * torch.expm1(torch.clamp(z, max=0.0)))

    def d1(z: Tensor) -> Tensor:
        return s * torch.where(z > 0, torch.ones_like(z), a * torch.exp(torch.clamp(z, max=0.0)))

    def dk(z: Tensor) -> Tensor:
        return s * torch.where(z > 0, torch.zeros_like(z), a * torch.exp(torch.clamp(z, max=0.0)))

    return Activation(name, params, fn, derivatives=(d1, dk, dk), kinks=(0.0,))


def _make_elu(alpha: float = 1.0, **p: float) -> Activation:
    _no_params("elu", p, accepted="alpha")
    return _elu_like("elu", {"alpha": alpha}, alpha, 1.0)


def _make_selu(**p: float) -> Activation:
    _no_params("selu", p)
    return _elu_like("selu", {}, _SELU_ALPHA, _SELU_SCALE)


def _make_monomial(p: float = 2, **extra: float) -> Activation:
    _no_params("monomial", extra, accepted="p")
    if float(p) != int(p) or int(p) < 1:
        raise ValueError(f"monomial needs an integer power p >= 1, got p={p!r}")
    n = int(p)
    if n == 1:
        act = _piecewise_linear("monomial", {"p": 1}, 1.0, 1.0)
        return act

    def power(k: int) -> Callable[[Tensor], Tensor]:
        coef = math.factorial(n) / math.factorial(n - k) if k <= n else 0.0
        if k > n:
            return torch.zeros_like
        return lambda z: coef * z ** (n - k)

    taylor = tuple(float(math.factorial(n)) if k == n else 0.0 for k in range(6))
    return Activation("monomial", {"p": n}, power(0), derivatives=(power(1), power(2), power(3)),
                      taylor=taylor, odd=n % 2 == 1)


# ----------------------------------------------------------------- kinked / bounded forms
# The theory never calls a user's module: each form below is an out-of-place float64 closed form
# with its kinks registered (the quadrature splits there) and hand-written derivatives (torch has
# no double backward for hardsigmoid/hardswish). See docs/activations.md for the table.
def _const(v: float) -> Callable[[Tensor], Tensor]:
    return lambda z: torch.full_like(z, float(v))


def _hardtanh_like(name: str, params: Mapping[str, float], lo: float, hi: float) -> Activation:
    lo, hi = float(lo), float(hi)
    if not lo < hi:
        raise ValueError(f"{name} needs min_val < max_val, got min_val={lo}, max_val={hi}")

    def d1(z: Tensor) -> Tensor:
        return ((z > lo) & (z < hi)).to(z.dtype)

    local = radius = taylor = None
    if lo < 0 < hi:  # linear near 0
        local, radius, taylor = (1.0, 1.0), min(-lo, hi), (0.0, 1.0, 0.0, 0.0, 0.0, 0.0)
    elif lo == 0 < hi:  # ReLU near 0
        local, radius = (1.0, 0.0), hi
    elif lo < 0 == hi:
        local, radius = (0.0, 1.0), -lo
    else:  # constant near 0
        taylor = (min(max(0.0, lo), hi), 0.0, 0.0, 0.0, 0.0, 0.0)
    return Activation(name, params, lambda z: torch.clamp(z, lo, hi), derivatives=(d1, torch.zeros_like, torch.zeros_like),
                      taylor=taylor, kinks=(lo, hi), odd=lo == -hi, local_slopes=local, local_radius=radius)


def _make_hardtanh(min_val: float = -1.0, max_val: float = 1.0, **p: float) -> Activation:
    _no_params("hardtanh", p, accepted="min_val, max_val")
    if (float(min_val), float(max_val)) == (0.0, 6.0):
        return _make_relu6()
    return _hardtanh_like("hardtanh", {"min_val": min_val, "max_val": max_val}, min_val, max_val)


def _make_relu6(**p: float) -> Activation:
    _no_params("relu6", p)
    return _hardtanh_like("relu6", {}, 0.0, 6.0)


def _make_hardsigmoid(**p: float) -> Activation:
    _no_params("hardsigmoid", p)

    def d1(z: Tensor) -> Tensor:
        return ((z > -3) & (z < 3)).to(z.dtype) / 6

    return Activation("hardsigmoid", {}, lambda z: torch.clamp(z / 6 + 0.5, 0.0, 1.0),
                      derivatives=(d1, torch.zeros_like, torch.zeros_like),
                      taylor=(0.5, 1 / 6, 0.0, 0.0, 0.0, 0.0), kinks=(-3.0, 3.0))


def _make_hardswish(**p: float) -> Activation:
    _no_params("hardswish", p)

    def fn(z: Tensor) -> Tensor:
        return z * torch.clamp(z + 3, 0.0, 6.0) / 6

    def d1(z: Tensor) -> Tensor:
        return torch.where(z <= -3, torch.zeros_like(z), torch.where(z >= 3, torch.ones_like(z), (2 * z + 3) / 6))

    def d2(z: Tensor) -> Tensor:
        return ((z > -3) & (z < 3)).to(z.dtype) / 3

    return Activation("hardswish", {}, fn, derivatives=(d1, d2, torch.zeros_like),
                      taylor=(0.0, 0.5, 1 / 3, 0.0, 0.0, 0.0), kinks=(-3.0, 3.0))


def _make_mish(**p: float) -> Activation:
    _no_params("mish", p)

    def fn(z: Tensor) -> Tensor:
        return z * torch.tanh(F.softplus(z))

    return Activation("mish", {}, fn, taylor=_taylor_by_autograd(fn, "autograd"), derivative_source="autograd")


def _make_celu(alpha: float = 1.0, **p: float) -> Activation:
    _no_params("celu", p, accepted="alpha")
    a = float(alpha)
    if not a > 0:
        raise ValueError(f"celu needs alpha > 0, got alpha={alpha!r}")

    def e(z: Tensor) -> Tensor:
        return torch.exp(torch.clamp(z, max=0.0) / a)

    def fn(z: Tensor) -> Tensor:
        return torch.where(z > 0, z, a * torch.expm1(torch.clamp(z, max=0.0) / a))

    return Activation("celu", {"alpha": a}, fn, kinks=(0.0,), derivatives=(
        lambda z: torch.where(z > 0, torch.ones_like(z), e(z)),
        lambda z: torch.where(z > 0, torch.zeros_like(z), e(z) / a),
        lambda z: torch.where(z > 0, torch.zeros_like(z), e(z) / (a * a))))


def _make_softsign(**p: float) -> Activation:
    _no_params("softsign", p)
    return Activation("softsign", {}, lambda z: z / (1 + z.abs()), kinks=(0.0,), odd=True, derivatives=(
        lambda z: (1 + z.abs()) ** -2,
        lambda z: -2 * torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z)) * (1 + z.abs()) ** -3,
        lambda z: 6 * (1 + z.abs()) ** -4))


def _make_logsigmoid(**p: float) -> Activation:
    _no_params("logsigmoid", p)

    def d2(z: Tensor) -> Tensor:
        s = _sig(z)
        return -s * (1 - s)

    return Activation("logsigmoid", {}, F.logsigmoid, derivatives=(
        lambda z: _sig(-z), d2, lambda z: d2(z) * (1 - 2 * _sig(z))),
        taylor=(-math.log(2.0), 0.5, -0.25, 0.0, 0.125, 0.0))


def _make_tanhshrink(**p: float) -> Activation:
    _no_params("tanhshrink", p)

    def d1(z: Tensor) -> Tensor:
        t = torch.tanh(z)
        return t * t

    def d2(z: Tensor) -> Tensor:
        t = torch.tanh(z)
        return 2 * t * (1 - t * t)

    def d3(z: Tensor) -> Tensor:
        t = torch.tanh(z)
        return 2 * (1 - t * t) * (1 - 3 * t * t)

    return Activation("tanhshrink", {}, lambda z: z - torch.tanh(z), derivatives=(d1, d2, d3),
                      taylor=(0.0, 0.0, 0.0, 2.0, 0.0, -16.0), odd=True)


def _shrink(name: str, lambd: float, hard: bool) -> Activation:
    lam = float(lambd)
    if not lam >= 0:
        raise ValueError(f"{name} needs lambd >= 0, got lambd={lambd!r}")

    def fn(z: Tensor) -> Tensor:
        out = z if hard else z - lam * torch.sign(z)
        return torch.where(z.abs() > lam, out, torch.zeros_like(z))

    def d1(z: Tensor) -> Tensor:
        return (z.abs() > lam).to(z.dtype)

    return Activation(name, {"lambd": lam}, fn, derivatives=(d1, torch.zeros_like, torch.zeros_like),
                      kinks=(-lam, lam) if lam > 0 else (0.0,), odd=True,
                      taylor=(0.0,) * 6 if lam > 0 else (0.0, 1.0, 0.0, 0.0, 0.0, 0.0))


def _make_softshrink(lambd: float = 0.5, **p: float) -> Activation:
    _no_params("softshrink", p, accepted="lambd")
    return _shrink("softshrink", lambd, hard=False)


def _make_hardshrink(lambd: float = 0.5, **p: float) -> Activation:
    _no_params("hardshrink", p, accepted="lambd")
    return _shrink("hardshrink", lambd, hard=True)


def _make_threshold(threshold: float = 0.0, value: float = 0.0, **p: float) -> Activation:
    _no_params("threshold", p, accepted="threshold, value")
    th, v = float(threshold), float(value)
    if th == 0.0 and v == 0.0:
        return _piecewise_linear("threshold", {"threshold": th, "value": v}, 1.0, 0.0)

    def fn(z: Tensor) -> Tensor:
        return torch.where(z > th, z, torch.full_like(z, v))

    taylor = None if th == 0 else ((0.0, 1.0, 0.0, 0.0, 0.0, 0.0) if th < 0 else (v, 0.0, 0.0, 0.0, 0.0, 0.0))
    return Activation("threshold", {"threshold": th, "value": v}, fn, taylor=taylor, kinks=(th,),
                      derivatives=(lambda z: (z > th).to(z.dtype), torch.zeros_like, torch.zeros_like))


def _make_rrelu(lower: float = 1.0 / 8, upper: float = 1.0 / 3, **p: float) -> Activation:
    _no_params("rrelu", p, accepted="lower, upper")
    mean = 0.5 * (float(lower) + float(upper))
    base = _piecewise_linear("rrelu", {"lower": lower, "upper": upper}, 1.0, mean)
    return Activation(base.name, base.params, base._fn, derivatives=base._derivs, slopes=base.slopes,
                      kinks=base.kinks, pair_forms=base._pair_forms,
                      note=f"RReLU read in eval mode: the negative slope is its mean (lower+upper)/2 = {mean:g}; "
                           "in train mode the slope is random per unit and the theory does not cover it.")


def _no_params(name: str, params: Mapping[str, float], accepted: str = "") -> None:
    if params:
        acc = f"accepted: {accepted}" if accepted else "it takes no parameters"
        raise TypeError(f"activation {name!r} got unexpected parameters {sorted(params)}; {acc}.")


_REGISTRY: dict[str, Callable[..., Activation]] = {
    "relu": _make_relu,
    "leaky_relu": _make_leaky_relu,
    "linear": _make_linear,
    "tanh": _make_tanh,
    "sin": _make_sin,
    "erf": _make_erf,
    "sigmoid": _make_sigmoid,
    "softplus": _make_softplus,
    "swish": _make_swish,
    "gelu": _make_gelu,
    "gelu_tanh": _make_gelu_tanh,
    "elu": _make_elu,
    "selu": _make_selu,
    "monomial": _make_monomial,
    "relu6": _make_relu6,
    "hardtanh": _make_hardtanh,
    "hardsigmoid": _make_hardsigmoid,
    "hardswish": _make_hardswish,
    "mish": _make_mish,
    "celu": _make_celu,
    "softsign": _make_softsign,
    "logsigmoid": _make_logsigmoid,
    "tanhshrink": _make_tanhshrink,
    "softshrink": _make_softshrink,
    "hardshrink": _make_hardshrink,
    "threshold": _make_threshold,
    "rrelu": _make_rrelu,
}
_ALIASES = {
    "identity": "linear", "id": "linear", "none": "linear",
    "silu": "swish", "lrelu": "leaky_relu", "leakyrelu": "leaky_relu",
    "gelu_erf": "gelu", "logistic": "sigmoid", "power": "monomial",
    "hard_swish": "hardswish", "hard_sigmoid": "hardsigmoid", "hard_tanh": "hardtanh",
    "log_sigmoid": "logsigmoid", "soft_sign": "softsign", "gelu_none": "gelu",
}
# Positional parameter of "name:value" specs (CLI).
_POSITIONAL = {"leaky_relu": "a", "softplus": "beta", "swish": "beta", "elu": "alpha", "monomial": "p",
               "celu": "alpha", "softshrink": "lambd", "hardshrink": "lambd"}


def available_activations() -> list[str]:
    """Names accepted by :func:`get_activation` (aliases excluded)."""
    return sorted(_REGISTRY)


def parse_activation_spec(spec: str) -> Activation:
    """Parse ``"name"``, ``"name:value"`` or ``"name:key=value,key=value"`` (CLI syntax).

    Example:
        >>> parse_activation_spec("leaky_relu:0.1").key
        'leaky_relu(a=0.1)'
    """
    name, _, rest = spec.partition(":")
    params: dict[str, float] = {}
    if rest:
        for i, item in enumerate(rest.split(",")):
            k, eq, v = item.partition("=")
            if not eq:
                canonical = _ALIASES.get(name.lower(), name.lower())
                if i > 0 or canonical not in _POSITIONAL:
                    raise ValueError(
                        f"cannot parse activation spec {spec!r}: positional value {item!r} is only "
                        f"allowed first, for {sorted(_POSITIONAL)}; use key=value otherwise."
                    )
                k, v = _POSITIONAL[canonical], item
            try:
                params[k.strip()] = float(v)
            except ValueError:
                raise ValueError(f"cannot parse activation spec {spec!r}: {v!r} is not a number") from None
    return get_activation(name, **params)


# ----------------------------------------------------------------- modules / functionals
# (name, ((parameter, position in the call, keyword, default), ...)) of each functional form; the
# position counts the input as 0. In-place variants (F.relu_, torch.tanh_, Tensor.relu_ ...) map
# to the same activation: the theory evaluates its own out-of-place form.
_P = tuple[tuple[str, int, str, Any], ...]


def _call_forms() -> dict[Any, tuple[str, _P]]:
    T = torch.Tensor
    slope: _P = (("a", 1, "negative_slope", 0.01),)
    alpha: _P = (("alpha", 1, "alpha", 1.0),)
    lambd: _P = (("lambd", 1, "lambd", 0.5),)
    bounds: _P = (("min_val", 1, "min_val", -1.0), ("max_val", 2, "max_val", 1.0))
    forms: dict[Any, tuple[str, _P]] = {}

    def add(name: str, params: _P, *fns: Any) -> None:
        for f in fns:
            if f is not None:
                forms[f] = (name, params)

    g = lambda mod, attr: getattr(mod, attr, None)  # noqa: E731 - tolerate torch versions
    add("relu", (), F.relu, F.relu_, torch.relu, torch.relu_, T.relu, T.relu_)
    add("tanh", (), F.tanh, torch.tanh, torch.tanh_, T.tanh, T.tanh_)
    add("sigmoid", (), F.sigmoid, torch.sigmoid, torch.sigmoid_, T.sigmoid, T.sigmoid_, torch.special.expit)
    add("sin", (), torch.sin, torch.sin_, T.sin, T.sin_)
    add("erf", (), torch.erf, torch.erf_, T.erf, T.erf_, torch.special.erf)
    add("swish", (), F.silu)
    add("mish", (), F.mish)
    add("gelu", (("approximate", 1, "approximate", "none"),), F.gelu)
    add("softplus", (("beta", 1, "beta", 1.0),), F.softplus)
    add("elu", alpha, F.elu, F.elu_)
    add("celu", alpha, F.celu, F.celu_, torch.celu, g(torch, "celu_"))
    add("selu", (), F.selu, F.selu_, torch.selu, torch.selu_)
    add("leaky_relu", slope, F.leaky_relu, F.leaky_relu_)
    add("hardtanh", bounds, F.hardtanh, F.hardtanh_)
    add("relu6", (), F.relu6)
    add("hardswish", (), F.hardswish)
    add("hardsigmoid", (), F.hardsigmoid)
    add("logsigmoid", (), F.logsigmoid)
    add("softsign", (), F.softsign)
    add("tanhshrink", (), F.tanhshrink)
    add("softshrink", lambd, F.softshrink)
    add("hardshrink", lambd, F.hardshrink, T.hardshrink)
    add("threshold", (("threshold", 1, "threshold", 0.0), ("value", 2, "value", 0.0)), F.threshold, F.threshold_)
    add("rrelu", (("lower", 1, "lower", 1.0 / 8), ("upper", 2, "upper", 1.0 / 3)), F.rrelu, F.rrelu_)
    add("clamp", (("min", 1, "min", None), ("max", 2, "max", None)),
        torch.clamp, torch.clamp_, torch.clip, T.clamp, T.clamp_, T.clip, T.clip_)
    add("clamp", (("min", 1, "min", None),), torch.clamp_min, torch.clamp_min_, T.clamp_min, T.clamp_min_)
    return forms


_FORMS: dict[Any, tuple[str, _P]] | None = None


def _forms() -> dict[Any, tuple[str, _P]]:
    global _FORMS
    if _FORMS is None:
        _FORMS = _call_forms()
    return _FORMS


def _from_form(name: str, values: Mapping[str, Any]) -> Activation | None:
    if name == "gelu":
        return get_activation("gelu_tanh" if values["approximate"] == "tanh" else "gelu")
    if name == "clamp":  # max(z, lo) / clamp(z, lo, hi) with constant bounds
        lo, hi = values.get("min"), values.get("max")
        if not all(v is None or isinstance(v, (int, float)) for v in (lo, hi)):
            return None  # tensor bounds: not one elementwise function
        if lo is not None and hi is not None:
            return get_activation("hardtanh", min_val=lo, max_val=hi)
        if lo is not None:
            return get_activation("relu") if lo == 0 else get_activation("threshold", threshold=lo, value=lo)
        return None
    if name == "softplus":
        return get_activation("softplus", beta=values["beta"])
    return get_activation(name, **{k: v for k, v in values.items()})


def activation_from_call(func: Any, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None) -> Activation | None:
    """The activation a torch call applies elementwise to its first argument, or ``None``.

    Recognised (module, functional, ``torch.*`` and ``Tensor`` method forms, in-place variants
    included): relu, relu6, hardtanh, hardswish, hardsigmoid, tanh, sigmoid, sin, erf, silu,
    mish, gelu (``approximate``), softplus (``beta``), elu/celu (``alpha``), selu, leaky_relu
    (``negative_slope``), logsigmoid, softsign, tanhshrink, softshrink/hardshrink (``lambd``),
    threshold, rrelu (eval mode: mean slope), and ``clamp``/``clip``/``clamp_min`` with
    constant bounds (``clamp(z, 0, 6)`` is ReLU6, ``clamp_min(z, 0)`` is ReLU). Parameters are
    read from ``args``/``kwargs`` exactly as the call passes them.

    Args:
        func: the callable as a ``TorchFunctionMode`` or an fx ``call_function`` node sees it.
        args: its positional arguments (the input first).
        kwargs: its keyword arguments.

    Returns:
        The :class:`Activation`, or ``None`` when ``func`` is not an elementwise activation.
    """
    try:
        form = _forms().get(func)
    except TypeError:  # unhashable callable
        return None
    if form is None:
        return None
    name, params = form
    kwargs = kwargs or {}
    values = {}
    for key, pos, kw, default in params:
        v = args[pos] if len(args) > pos else kwargs.get(kw, default)
        if isinstance(v, Tensor):
            if v.numel() != 1:
                return None
            v = float(v.detach().reshape(()))
        values[key] = v
    return _from_form(name, values)


def _module_values(m: nn.Module) -> tuple[str, dict[str, Any]] | None:
    if isinstance(m, nn.ReLU6):
        return "relu6", {}
    table: tuple[tuple[type, str, Callable[[Any], dict[str, Any]]], ...] = (
        (nn.ReLU, "relu", lambda m: {}),
        (nn.LeakyReLU, "leaky_relu", lambda m: {"a": m.negative_slope}),
        (nn.GELU, "gelu", lambda m: {"approximate": m.approximate}),
        (nn.Tanh, "tanh", lambda m: {}),
        (nn.SiLU, "swish", lambda m: {}),
        (nn.Mish, "mish", lambda m: {}),
        (nn.SELU, "selu", lambda m: {}),
        (nn.CELU, "celu", lambda m: {"alpha": m.alpha}),
        (nn.ELU, "elu", lambda m: {"alpha": m.alpha}),
        (nn.Sigmoid, "sigmoid", lambda m: {}),
        (nn.Hardtanh, "hardtanh", lambda m: {"min_val": m.min_val, "max_val": m.max_val}),
        (nn.Hardswish, "hardswish", lambda m: {}),
        (nn.Hardsigmoid, "hardsigmoid", lambda m: {}),
        (nn.LogSigmoid, "logsigmoid", lambda m: {}),
        (nn.Softsign, "softsign", lambda m: {}),
        (nn.Tanhshrink, "tanhshrink", lambda m: {}),
        (nn.Softshrink, "softshrink", lambda m: {"lambd": m.lambd}),
        (nn.Hardshrink, "hardshrink", lambda m: {"lambd": m.lambd}),
        (nn.Threshold, "threshold", lambda m: {"threshold": m.threshold, "value": m.value}),
        (nn.RReLU, "rrelu", lambda m: {"lower": m.lower, "upper": m.upper}),
        (nn.Identity, "linear", lambda m: {}),
    )
    for cls, name, read in table:
        if isinstance(m, cls):
            return name, read(m)
    return None


def activation_from_module(m: nn.Module) -> Activation | None:
    """The activation an ``nn.Module`` computes, read from its attributes, or ``None``.

    Every ``torch.nn`` activation module is recognised (parameters read from the instance:
    ``LeakyReLU.negative_slope``, ``ELU/CELU.alpha``, ``Hardtanh`` bounds, ``Softplus.beta``,
    ``GELU.approximate``, ``PReLU``'s *current* single slope, ``RReLU``'s mean slope …);
    the module itself is never called. Other modules give ``None``.

    Raises:
        InvalidArgumentError: ``nn.PReLU`` with several different slopes (not one activation).
    """
    if isinstance(m, nn.Softplus):
        if m.threshold * m.beta < 15:
            warnings.warn(
                f"nn.Softplus(threshold={m.threshold}) switches to the identity at beta*z > "
                f"{m.threshold}; the theory uses the exact softplus.", UserWarning, stacklevel=3,
            )
        return get_activation("softplus", beta=m.beta)
    if isinstance(m, nn.PReLU):
        w = m.weight.detach().reshape(-1)
        if w.numel() != 1 and not bool((w == w[0]).all()):
            from ..errors import InvalidArgumentError

            raise InvalidArgumentError(
                f"nn.PReLU with {w.numel()} different slopes has no single activation; the theory "
                "needs one slope. Use nn.PReLU(num_parameters=1) or nn.LeakyReLU, or pass "
                "mapping={layer: 'leaky_relu'} for the layers it feeds.")
        return get_activation("leaky_relu", a=float(w[0]))
    hit = _module_values(m)
    if hit is None:
        return None
    name, values = hit
    return _from_form(name, values)


_from_module = activation_from_module


def _functional_table() -> dict[Any, tuple[str, dict[str, float]]]:
    """Default-parameter forms of the functionals (and ``np.tanh``/``np.sin``)."""
    table: dict[Any, tuple[str, dict[str, float]]] = {}
    for f, (name, params) in _forms().items():
        if name != "clamp":
            table[f] = (name, {k: d for k, _, _, d in params})
    try:
        import numpy as np

        table[np.tanh] = ("tanh", {})
        table[np.sin] = ("sin", {})
    except ImportError:  # pragma: no cover
        pass
    return table


def _custom(fn: Callable, name: str | None, kinks: Sequence[float] | None) -> Activation:
    """Wrap a user callable (torch or numpy)."""
    label = name or getattr(fn, "__qualname__", None) or type(fn).__name__
    probe = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64, requires_grad=True)
    source = "autograd"
    torch_fn: Callable[[Tensor], Tensor] = fn
    try:
        with torch.enable_grad():
            out = fn(probe)
        if not isinstance(out, Tensor):
            raise TypeError
        if out.shape != probe.shape:
            raise ValueError(
                f"activation {label!r} must act elementwise: input shape {tuple(probe.shape)} gave "
                f"output shape {tuple(out.shape)}."
            )
        if not out.requires_grad:
            source = "finite-difference"
    except ValueError:
        raise
    except Exception:
        import numpy as np

        def torch_fn(z: Tensor, _f: Callable = fn) -> Tensor:  # numpy wrapper
            arr = np.asarray(_f(z.detach().cpu().numpy()), dtype=np.float64)
            return torch.as_tensor(arr, dtype=z.dtype, device=z.device)

        try:
            out = torch_fn(probe.detach())
        except Exception as exc:
            raise TypeError(
                f"cannot evaluate activation {label!r} on a float64 tensor or numpy array: {exc!r}. "
                "An activation must map an array of z values to an array of the same shape."
            ) from exc
        if out.shape != probe.shape:
            raise ValueError(f"activation {label!r} must act elementwise (shape {tuple(out.shape)}).")
        source = "finite-difference"
    if source == "finite-difference":
        warnings.warn(
            f"activation {label!r} is not differentiable by torch autograd; its derivatives are "
            "taken by finite differences (~1e-8 accurate). Write it with torch ops for exact ones.",
            UserWarning, stacklevel=3,
        )
    kinks_t = tuple(kinks) if kinks is not None else ()
    taylor = None if 0.0 in kinks_t else _taylor_by_autograd(torch_fn, source)
    if taylor is not None and any(not math.isfinite(t) for t in taylor[:4]):
        taylor = None
    return Activation(f"custom:{label}", {}, torch_fn, taylor=taylor, kinks=kinks_t,
                      derivative_source=source, identity=fn)


def get_activation(
    name_or_callable: str | Callable | nn.Module | Activation,
    *,
    kinks: Sequence[float] | None = None,
    name: str | None = None,
    **params: float,
) -> Activation:
    r"""Return the :class:`Activation` for a name, an ``nn.Module``, a functional or a callable.

    Accepted:

    * names (case-insensitive): ``relu``, ``leaky_relu`` (``a``), ``linear``/``identity``,
      ``tanh``, ``sin``, ``erf``, ``sigmoid``, ``softplus`` (``beta``), ``swish``/``silu``
      (``beta``), ``gelu`` (erf form), ``gelu_tanh``, ``elu`` (``alpha``), ``selu``,
      ``monomial`` (``p``: :math:`\sigma = z^p`);
    * modules: ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.GELU`` (both forms), ``nn.Tanh``,
      ``nn.SiLU``, ``nn.ELU``, ``nn.SELU``, ``nn.Softplus``, ``nn.Sigmoid``,
      ``nn.Identity``, ``nn.PReLU`` (one slope); any other parameter-free module is used as
      a callable;
    * functionals: ``F.relu``, ``torch.relu``, ``F.gelu``, ``torch.tanh``, ``torch.sin``,
      ``torch.erf``, ``F.silu``, ``torch.sigmoid``, ``F.softplus``, ``F.elu``, ``F.selu``,
      ``F.leaky_relu``, ``np.tanh``, ``np.sin`` (their default parameters);
    * any elementwise callable on torch tensors (derivatives by autograd) or numpy arrays
      (derivatives by finite differences); an existing :class:`Activation` is returned as is.

    Args:
        name_or_callable: see above.
        kinks: for user callables, the points where :math:`\sigma` is not smooth (e.g.
            ``(0.0,)`` for a ReLU-like function); the quadrature splits there.
        name: label for a user callable in reports (default: its ``__qualname__``).
        **params: the named activation's parameters (``a=0.1``, ``beta=2.0``, ``p=3``...).

    Returns:
        The immutable :class:`Activation`.

    Raises:
        ValueError: unknown name (the message lists the accepted names) or bad parameters.
        TypeError: objects that are not activations.
    """
    obj = name_or_callable
    if isinstance(obj, Activation):
        if params:
            raise TypeError("parameters cannot be applied to an existing Activation object")
        return obj
    if isinstance(obj, str):
        key = obj.strip().lower().replace("-", "_")
        key = _ALIASES.get(key, key)
        if key not in _REGISTRY:
            raise ValueError(
                f"unknown activation {obj!r}. Accepted names: {', '.join(available_activations())} "
                f"(aliases: {', '.join(sorted(_ALIASES))}); or pass an nn.Module or a callable."
            )
        return _REGISTRY[key](**params)
    if params:
        raise TypeError(
            f"parameters {sorted(params)} are only accepted with an activation name, not with "
            f"{type(obj).__name__}."
        )
    if isinstance(obj, nn.Module):
        act = _from_module(obj)
        if act is not None:
            return act
        if any(True for _ in obj.parameters()):
            raise TypeError(
                f"module {type(obj).__name__} has parameters and is not a known activation; the "
                "theory needs a fixed elementwise function. Wrap it in a function of z."
            )
        return _custom(obj, name or type(obj).__name__, kinks)
    try:
        known = _functional_table().get(obj)
    except TypeError:  # unhashable callable
        known = None
    if known is not None:
        return _from_form(known[0], known[1])
    if callable(obj):
        return _custom(obj, name, kinks)
    raise TypeError(
        f"cannot make an activation from {type(obj).__name__}: pass a name "
        f"({', '.join(available_activations())}), an nn.Module activation or a callable."
    )
