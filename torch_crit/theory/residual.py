r"""Residual MLPs at infinite width and the optimal aspect ratio (Appendix B).

Residual layer (B.3) with :math:`\xi = 1` (B.6): :math:`z^{(\ell+1)} = b^{(\ell+1)} +
W^{(\ell+1)}\sigma(z^{(\ell)}) + \gamma z^{(\ell)}`. At infinite width

.. math::
    K^{(\ell+1)}_{\alpha\beta} = C_b + C_W\langle\sigma_\alpha\sigma_\beta\rangle_{K^{(\ell)}}
        + \gamma^2 K^{(\ell)}_{\alpha\beta}\quad (B.11),\qquad
    \chi_\parallel = \gamma^2 + C_W g'(K)\ (B.15),\quad \chi_\perp = \gamma^2 + C_W\langle\sigma'\sigma'\rangle_K\ (B.16),

and the frozen NTK picks up the same :math:`\gamma^2` on its multiplicative term
[derived here from (8.12): the skip adds :math:`\gamma\,\partial z^{(\ell)}` to the
derivative, cross terms vanish with :math:`E[W] = 0`]. Criticality needs
:math:`C_b = 0,\ C_W = (1-\gamma^2)/A_2` (scale-invariant, (B.20)) or
:math:`(1-\gamma^2)/\sigma_1^2` (:math:`K^\star = 0`, (B.21)); it is unsatisfiable for
:math:`\gamma = 1`. For other classes both :math:`C_b` and :math:`C_W` of the plain MLP scale by
:math:`1-\gamma^2` at the same :math:`K^\star` [derived here: (B.15)–(B.16) with the fixed point
:math:`(1-\gamma^2)K^\star = C_b + C_W g(K^\star)`].

Finite width: :math:`V/(nG^2) = \nu(\gamma)\,r` with (B.29)/(B.35), the optimal aspect ratio
:math:`r^\star(\gamma) = \frac{4}{20+3n_L}\frac{1}{\nu(\gamma)}` (B.36), and read backwards the
optimal residual strength :math:`\gamma^\star(r)` for a given depth and width (footnote 7:
:math:`1-\gamma^{\star2}\sim 1/r`).

Example:
    >>> from torch_crit.theory import residual_critical_point, optimal_residual_gamma
    >>> round(residual_critical_point("relu", 0.5 ** 0.5).C_W, 12)   # (B.20): 2 (1 - 1/2)
    1.0
    >>> round(optimal_residual_gamma("relu", depth=10, width=1000), 6)   # r < r*(0): no skip
    0.0
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from .activations import Activation, get_activation
from .criticality import CriticalPoint, UniversalityClass, chi_parallel, chi_perp, critical_point
from .kernels import KernelStacks, Scalars, _depth, _initial, _per_layer, _recurse

__all__ = [
    "residual_kernel_recursion",
    "residual_kernel_and_ntk_recursion",
    "residual_chi_parallel",
    "residual_chi_perp",
    "residual_critical_point",
    "residual_nu",
    "optimal_aspect_ratio",
    "optimal_residual_gamma",
]


def _act(a: Any) -> Activation:
    return a if isinstance(a, Activation) else get_activation(a)


def _gamma_scalar(gamma: float) -> float:
    g = float(gamma)
    if not math.isfinite(g):
        raise ValueError(f"gamma must be finite, got {gamma!r}")
    if g * g >= 1.0:
        raise ValueError(
            f"residual criticality needs gamma^2 < 1 (B.20)-(B.21); got gamma={gamma!r}. The customary "
            "gamma = 1 cannot be critical (text after (B.21)): pick 0 <= gamma < 1, e.g. "
            "optimal_residual_gamma(activation, depth, width)."
        )
    return g


def _gamma_seq(gamma: Scalars, depth: int) -> Tensor:
    t = torch.as_tensor(gamma.detach() if isinstance(gamma, Tensor) else gamma, dtype=torch.float64)
    if t.dim() == 0:
        t = t.expand(depth).clone()
    elif t.dim() != 1 or t.numel() != depth:
        raise ValueError(f"gamma must be a scalar or a sequence of length depth={depth}, got shape {tuple(t.shape)}.")
    if not torch.isfinite(t).all():
        raise ValueError(f"gamma must be finite, got {t.tolist()}")
    return t


def residual_kernel_recursion(
    activation: Any,
    C_b: Scalars,
    C_W: Scalars,
    gamma: Scalars,
    x: Tensor | None = None,
    depth: int | None = None,
    *,
    gram: Tensor | None = None,
    n_nodes: int | None = None,
) -> Tensor:
    r"""Residual-MLP kernel :math:`K^{(\ell)}`, :math:`\ell = 1..L`, by (B.11); ``[depth, N, N]``.

    Layer 1 is the plain input layer :math:`K^{(1)} = C_b + C_W\,x x^\top/n_0` (no skip, since
    :math:`n_0 \ne n`); layers :math:`2..L` carry the skip :math:`\gamma^{(\ell)}` (pass a sequence
    with ``gamma[L-1] = 0`` for a plain readout). ``gamma[0]`` is ignored.

    Args:
        activation: activation.
        C_b, C_W: scalars or length-``depth`` sequences.
        gamma: residual strength :math:`\gamma` (scalar or length ``depth``).
        x, depth, gram, n_nodes: as :func:`~torch_crit.theory.kernels.kernel_recursion`.

    Returns:
        ``[depth, N, N]``.
    """
    L = _depth(depth)
    g0, dtype = _initial(x, gram)
    Ks, _ = _recurse(_act(activation), _per_layer(C_b, L, "C_b"), _per_layer(C_W, L, "C_W"), g0, L,
                     gamma=_gamma_seq(gamma, L), n_nodes=n_nodes)
    return Ks.to(dtype)


def residual_kernel_and_ntk_recursion(
    activation: Any,
    C_b: Scalars,
    C_W: Scalars,
    gamma: Scalars,
    lambda_b: Scalars,
    lambda_W: Scalars,
    x: Tensor | None = None,
    depth: int | None = None,
    *,
    gram: Tensor | None = None,
    n_nodes: int | None = None,
) -> KernelStacks:
    r"""Residual kernel (B.11) and frozen NTK, :math:`\Theta^{(\ell+1)} = \lambda_b + \lambda_W\langle\sigma\sigma\rangle
    + (C_W\langle\sigma'\sigma'\rangle + \gamma^2)\Theta^{(\ell)}` [derived here]; see
    :func:`residual_kernel_recursion` for the arguments. Returns :class:`KernelStacks`."""
    L = _depth(depth)
    g0, dtype = _initial(x, gram)
    Ks, Th = _recurse(
        _act(activation), _per_layer(C_b, L, "C_b"), _per_layer(C_W, L, "C_W"), g0, L,
        lambda_b=_per_layer(lambda_b, L, "lambda_b"), lambda_W=_per_layer(lambda_W, L, "lambda_W"),
        gamma=_gamma_seq(gamma, L), n_nodes=n_nodes,
    )
    return KernelStacks(K=Ks.to(dtype), Theta=Th.to(dtype))


def residual_chi_parallel(activation: Any, K: Tensor | float, C_W: float, gamma: float) -> Tensor:
    r""":math:`\chi_\parallel(K) = \gamma^2 + C_W g'(K)` (B.15), shape of ``K``."""
    return gamma**2 + chi_parallel(activation, K, C_W)


def residual_chi_perp(activation: Any, K: Tensor | float, C_W: float, gamma: float) -> Tensor:
    r""":math:`\chi_\perp(K) = \gamma^2 + C_W\langle\sigma'\sigma'\rangle_K` (B.16), shape of ``K``."""
    return gamma**2 + chi_perp(activation, K, C_W)


def residual_nu(activation: Any, gamma: float) -> float:
    r""":math:`\nu(\gamma)` with :math:`V/(nG^2) = \nu(\gamma)\,r` at criticality.

    .. math::
        \nu(\gamma) = (1-\gamma^2)\Big[(1-\gamma^2)\Big(\frac{3A_4}{A_2^2}-1\Big) + 4\gamma^2\Big]
        \ \text{(B.29, scale-invariant)},\qquad
        \nu(\gamma) = \tfrac23(1-\gamma^4)\ \text{(B.35, } K^\star=0\text{)}.

    :math:`\gamma = 0` gives the plain MLP values (A.69)–(A.70) (5 for ReLU, 2/3 for tanh).

    Raises:
        ValueError: for classes where the book gives no :math:`\nu` (half-stable, none).
    """
    g = float(gamma)
    if g * g > 1.0:
        raise ValueError(f"gamma^2 must be <= 1, got gamma={gamma!r}")
    cp = critical_point(activation)
    t = 1.0 - g * g
    if cp.universality_class is UniversalityClass.SCALE_INVARIANT:
        c = 3.0 * cp.A4 / cp.A2**2 - 1.0
        return t * (t * c + 4.0 * g * g)
    if cp.universality_class is UniversalityClass.K_STAR_ZERO and cp.nu is not None:
        return cp.nu * (1.0 - g**4)
    raise ValueError(
        f"nu(gamma) is known for the scale-invariant (B.29) and K*=0 (B.35) classes only; "
        f"{cp.activation.key} is {cp.universality_class.value}."
    )


def residual_critical_point(activation: Any, gamma: float) -> CriticalPoint:
    r"""Critical :math:`(C_b, C_W)` of a residual MLP with skip strength :math:`\gamma` (B.19)–(B.21).

    Scale-invariant: :math:`(0, (1-\gamma^2)/A_2)` (B.20); :math:`K^\star=0`:
    :math:`(0, (1-\gamma^2)/\sigma_1^2)` (B.21); half-stable: the plain :math:`(C_b, C_W)` times
    :math:`1-\gamma^2` at the same :math:`K^\star` [derived here]. ``nu`` is :math:`\nu(\gamma)`.

    Args:
        activation: activation (or its plain :class:`CriticalPoint`).
        gamma: residual strength, :math:`\gamma^2 < 1`.

    Returns:
        :class:`CriticalPoint` with ``gamma`` set.

    Raises:
        ValueError: :math:`\gamma^2 \ge 1` (unsatisfiable).
        NoCriticalPointError: activations without criticality.
    """
    g = _gamma_scalar(gamma)
    cp = activation if isinstance(activation, CriticalPoint) else critical_point(activation)
    t = 1.0 - g * g
    try:
        nu = residual_nu(cp.activation, g)
    except ValueError:
        nu = None
    eq = {UniversalityClass.SCALE_INVARIANT: "(B.20)", UniversalityClass.K_STAR_ZERO: "(B.21)"}.get(
        cp.universality_class, "[derived here from (B.15)-(B.16)]")
    return replace(cp, C_b=cp.C_b * t, C_W=cp.C_W * t, gamma=g, nu=nu,
                   notes=f"residual MLP with gamma={g:g} {eq}; " + cp.notes, alternatives=())


def optimal_aspect_ratio(activation: Any, gamma: float = 0.0, n_out: int = 1) -> float:
    r"""Optimal aspect ratio :math:`r^\star = \frac{4}{20 + 3 n_L}\frac{1}{\nu(\gamma)}` (A.73)/(B.36).

    Args:
        activation: activation.
        gamma: residual strength (0: plain MLP).
        n_out: output width :math:`n_L \ge 1`.

    Returns:
        :math:`r^\star = L/n` maximising the mutual information between output halves.
    """
    if isinstance(n_out, bool) or not isinstance(n_out, int) or n_out < 1:
        raise ValueError(f"n_out must be an int >= 1, got {n_out!r}")
    nu = residual_nu(activation, gamma)
    if nu <= 0:
        return math.inf
    return 4.0 / (20.0 + 3.0 * n_out) / nu


def optimal_residual_gamma(activation: Any, depth: int, width: int, n_out: int = 1) -> float:
    r"""Optimal residual strength :math:`\gamma^\star(r)`, :math:`r = L/n`, read off (B.36).

    Solves :math:`r^\star(\gamma) = r`, i.e. :math:`\nu(\gamma) = \frac{4}{(20+3n_L)\,r}`; returns 0
    when :math:`r \le r^\star(0)` (residual connections do not help shallow networks). For
    :math:`r \gg r^\star(0)`, :math:`1-\gamma^{\star2}\sim 1/r` (footnote 7 of App. B).

    Args:
        activation: activation (scale-invariant or :math:`K^\star=0` class).
        depth: :math:`L \ge 1`.
        width: hidden width :math:`n \ge 1`.
        n_out: output width :math:`n_L`.

    Returns:
        :math:`\gamma^\star \in [0, 1)`.
    """
    for name, v in (("depth", depth), ("width", width), ("n_out", n_out)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    r = depth / width
    target = 4.0 / ((20.0 + 3.0 * n_out) * r)
    if residual_nu(activation, 0.0) <= target:
        return 0.0
    cp = critical_point(activation)
    if cp.universality_class is UniversalityClass.SCALE_INVARIANT:
        c = 3.0 * cp.A4 / cp.A2**2 - 1.0          # nu = (c - 4) t^2 + 4 t, t = 1 - gamma^2
        if abs(c - 4.0) < 1e-14:
            t = target / 4.0
        else:
            t = (-4.0 + math.sqrt(16.0 + 4.0 * (c - 4.0) * target)) / (2.0 * (c - 4.0))
        return math.sqrt(max(0.0, 1.0 - t))
    nu0 = cp.nu                                    # nu = nu0 (1 - gamma^4)
    return (1.0 - target / nu0) ** 0.25
