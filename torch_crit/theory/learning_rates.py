r"""The learning-rate equivalence principle (§9.4, (9.94)–(9.96)).

No layer and no parameter group should dominate the NTK. With :math:`\tilde\lambda_b,
\tilde\lambda_W = O(1)`, layer :math:`\ell = 1..L` (:math:`\ell = L` is the readout):

* scale-invariant class (ReLU, leaky ReLU, linear) (9.94):
  :math:`\lambda_b^{(\ell)} = \tilde\lambda_b/L`, :math:`\lambda_W^{(\ell)} = \tilde\lambda_W/L`;
* :math:`K^\star = 0` class with :math:`p_\perp = b_1/a_1` (9.95):
  :math:`\lambda_b^{(\ell)} = \tilde\lambda_b\,\ell^{-p_\perp}L^{p_\perp-1}`,
  :math:`\lambda_W^{(\ell)} = \tilde\lambda_W\,(L/\ell)^{p_\perp-1}`; odd activations
  (tanh, sin: :math:`p_\perp = 1`) give (9.96): :math:`\tilde\lambda_b/\ell` and :math:`\tilde\lambda_W`.

How the class decides the scalings. From the formal solution (9.28),
:math:`\Theta^{(L)} = \sum_{\ell}[\lambda_b^{(\ell)} + \lambda_W^{(\ell)}g^{(\ell-1)}]
\prod_{\ell'=\ell}^{L-1}\chi_\perp^{(\ell')}`, with :math:`K^{(\ell)}\sim\ell^{-p_0}` and
:math:`\chi_\perp^{(\ell)} = 1 - p_\perp/\ell`, so :math:`\prod\chi_\perp \approx (\ell/L)^{p_\perp}`.
Equal per-layer shares need :math:`\lambda_b^{(\ell)}\propto\ell^{-p_\perp}` and
:math:`\lambda_W^{(\ell)}\propto\ell^{p_0-p_\perp}`; the global factor :math:`L^{p_\perp-1}` makes
:math:`\Theta^{(L)} = O(1)` [derived here; reproduces (9.94)–(9.96)]. The scale-invariant class
has :math:`\chi_\perp \equiv 1` and :math:`K` constant (:math:`p_0 = p_\perp = 0` in this sense).
The half-stable classes (SWISH, GELU) sit at :math:`K^\star \ne 0` with :math:`\chi_\perp = 1` and
behave scale-invariantly for all practical depths (§5.3.4: :math:`|\tilde a_1|` is tiny), so they
get (9.94) as well [derived here].

The per-parameter step sizes (multiply by the global :math:`\eta`) are ``bias_lr`` =
:math:`\lambda_b^{(\ell)}` and ``weight_lr`` = :math:`\lambda_W^{(\ell)}/n_{\ell-1}` (8.6).

Example:
    >>> from torch_crit.theory import layer_learning_rates
    >>> lr = layer_learning_rates("tanh", layer=3, depth=10, fan_in=256)
    >>> (round(lr.lambda_b, 6), lr.lambda_W, lr.weight_lr)
    (0.333333, 1.0, 0.00390625)
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

from .criticality import CriticalPoint, NoCriticalPointError, UniversalityClass, critical_point

__all__ = ["LayerLearningRates", "LearningRateScaling", "learning_rate_scaling", "layer_learning_rates"]


@dataclass(frozen=True)
class LearningRateScaling:
    r"""Exponents of :math:`\lambda^{(\ell)} = \tilde\lambda\,\ell^{e_\ell}\,L^{e_L}` for one class.

    Attributes:
        bias_layer_exp, bias_depth_exp: :math:`\lambda_b^{(\ell)} = \tilde\lambda_b \ell^{\text{bias\_layer\_exp}} L^{\text{bias\_depth\_exp}}`.
        weight_layer_exp, weight_depth_exp: the same for :math:`\lambda_W^{(\ell)}`.
        equation: the book's equation the rule comes from.
        universality_class: the class that decided it.
    """

    bias_layer_exp: float
    bias_depth_exp: float
    weight_layer_exp: float
    weight_depth_exp: float
    equation: str
    universality_class: UniversalityClass

    def describe(self) -> str:
        """Short text form, e.g. ``'lambda_b ~ l^-1 L^0, lambda_W ~ l^0 L^0 (9.96)'``."""
        return (f"lambda_b ~ l^{self.bias_layer_exp:g} L^{self.bias_depth_exp:g}, "
                f"lambda_W ~ l^{self.weight_layer_exp:g} L^{self.weight_depth_exp:g} {self.equation}")


@dataclass(frozen=True)
class LayerLearningRates:
    r"""Learning rates of one layer by the equivalence principle.

    Attributes:
        layer: :math:`\ell` (1-based; ``layer == depth`` is the readout).
        depth: :math:`L`.
        fan_in: :math:`n_{\ell-1}`.
        lambda_b: :math:`\lambda_b^{(\ell)}` (book convention (8.6)).
        lambda_W: :math:`\lambda_W^{(\ell)}` (book convention: multiplies :math:`1/n_{\ell-1}`).
        bias_lr: per-parameter step size of the biases, :math:`\lambda_b^{(\ell)}` (times :math:`\eta`).
        weight_lr: per-parameter step size of the weights, :math:`\lambda_W^{(\ell)}/n_{\ell-1}`.
        scaling: the :class:`LearningRateScaling` used.
    """

    layer: int
    depth: int
    fan_in: int
    lambda_b: float
    lambda_W: float
    bias_lr: float
    weight_lr: float
    scaling: LearningRateScaling


def _critical(activation: Any, strict: bool) -> CriticalPoint:
    if isinstance(activation, CriticalPoint):
        return activation
    try:
        return critical_point(activation)
    except NoCriticalPointError as err:
        if strict:
            raise
        warnings.warn(
            f"{err.activation.key} has no critical point; using the scale-invariant rule (9.94) at its "
            f"nearest setting ({err.reason})", RuntimeWarning, stacklevel=3,
        )
        return err.nearest


def learning_rate_scaling(activation: Any, *, strict: bool = True) -> LearningRateScaling:
    r"""The :math:`\ell`- and :math:`L`-exponents of (9.94)–(9.96) for an activation's class.

    Args:
        activation: activation (anything ``get_activation`` accepts) or a :class:`CriticalPoint`.
        strict: raise :class:`NoCriticalPointError` for activations without criticality
            (default); with ``False`` they get the scale-invariant rule and a ``RuntimeWarning``.

    Returns:
        :class:`LearningRateScaling`.
    """
    cp = _critical(activation, strict)
    cls = cp.universality_class
    if cls is UniversalityClass.K_STAR_ZERO:
        p = float(cp.p_perp)
        p0 = float(cp.exponents.get("p0", 1.0))
        eq = "(9.96)" if p == 1.0 and p0 == 1.0 else "(9.95)"
        return LearningRateScaling(-p, p - 1.0, p0 - p, p - 1.0, eq, cls)
    return LearningRateScaling(0.0, -1.0, 0.0, -1.0, "(9.94)", cls)


def layer_learning_rates(
    activation: Any,
    layer: int,
    depth: int,
    fan_in: int,
    *,
    lambda_b: float = 1.0,
    lambda_W: float = 1.0,
    strict: bool = True,
) -> LayerLearningRates:
    r"""Per-layer learning rates of the equivalence principle (9.94)–(9.96).

    .. math::
        \lambda_b^{(\ell)} = \tilde\lambda_b\,\ell^{-p_\perp}L^{p_\perp-1},\qquad
        \lambda_W^{(\ell)} = \tilde\lambda_W\,\ell^{p_0-p_\perp}L^{p_\perp-1}

    (:math:`K^\star=0`: :math:`p_0 = 1`; scale-invariant and half-stable: :math:`1/L`.)

    Args:
        activation: activation or its :class:`CriticalPoint`.
        layer: :math:`\ell`, 1-based, ``1 <= layer <= depth``.
        depth: :math:`L \ge 1`.
        fan_in: :math:`n_{\ell-1}` (input dimension for ``layer = 1``).
        lambda_b, lambda_W: :math:`\tilde\lambda_b, \tilde\lambda_W \ge 0`.
        strict: see :func:`learning_rate_scaling`.

    Returns:
        :class:`LayerLearningRates` (``bias_lr`` = :math:`\lambda_b^{(\ell)}`, ``weight_lr`` =
        :math:`\lambda_W^{(\ell)}/n_{\ell-1}`).

    Raises:
        ValueError: layer outside 1..depth, fan_in < 1, negative rates.
        NoCriticalPointError: non-critical activation with ``strict=True``.
    """
    for name, v, lo in (("depth", depth, 1), ("layer", layer, 1), ("fan_in", fan_in, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}.")
    if layer > depth:
        raise ValueError(f"layer must be in 1..depth (1-based, depth = readout), got layer={layer}, depth={depth}.")
    for name, v in (("lambda_b", lambda_b), ("lambda_W", lambda_W)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}.")
    sc = learning_rate_scaling(activation, strict=strict)
    lb = float(lambda_b) * layer**sc.bias_layer_exp * depth**sc.bias_depth_exp
    lw = float(lambda_W) * layer**sc.weight_layer_exp * depth**sc.weight_depth_exp
    return LayerLearningRates(layer=layer, depth=depth, fan_in=fan_in, lambda_b=lb, lambda_W=lw,
                              bias_lr=lb, weight_lr=lw / fan_in, scaling=sc)
