r"""Finite-width theory: the leading :math:`1/n` corrections of Roberts & Yaida, Ch. 4, 5, 8, 9, 11.

Everything here is a deterministic recursion over layers, in float64, for an MLP

.. math::
    z^{(1)} = b^{(1)} + W^{(1)} x, \qquad z^{(\ell+1)} = b^{(\ell+1)} + W^{(\ell+1)}\sigma(z^{(\ell)}),
    \qquad \mathrm{Var}\,W^{(\ell)}_{ij} = C_W^{(\ell)}/n_{\ell-1}, \quad \mathrm{Var}\,b^{(\ell)}_i = C_b^{(\ell)}

(2.5), (2.19)–(2.22), trained with the diagonal learning-rate tensor (8.6)
(:math:`\lambda_b^{(\ell)}` on biases, :math:`\lambda_W^{(\ell)}/n_{\ell-1}` on weights).

Conventions (THEORY.md §1.5): an order-one tensor of layer :math:`\ell` — the four-point vertex
:math:`V`, the NTK variances :math:`A, B`, the NTK–preactivation cross-correlations :math:`D, F`,
the dNTK–preactivation tensors :math:`P, Q` and the NLO metric :math:`G^{\{1\}}` — is the
coefficient of :math:`1/n_{\ell-1}` in the corresponding correlator, e.g.

.. math::
    \mathbb E[z_{i_1;\alpha_1} z_{i_2;\alpha_2} z_{i_3;\alpha_3} z_{i_4;\alpha_4}]\big|_{\rm connected}
    = \frac{1}{n_{\ell-1}}\big[\delta_{i_1i_2}\delta_{i_3i_4} V_{(\alpha_1\alpha_2)(\alpha_3\alpha_4)}
    + \text{2 perms}\big] \qquad (4.77),

so with unequal widths the "inherited" terms of each recursion carry the ratio
:math:`r_\ell = n_\ell/n_{\ell-1}` (visible in the multi-input forms (4.115), (8.77)–(8.97),
(11.49)–(11.52)). Every result is indexed by the layer :math:`\ell = 1, \dots, L` along the
first axis (``[depth, ...]``); layer-1 tensors vanish (the first layer is exactly Gaussian).

Entry points:

* :func:`single_input_recursions` — all single-input recursions at once for every input's
  own norm: :math:`K, \Theta` (4.118), (9.6); :math:`V` (5.109); :math:`G^{\{1\}}` (5.110);
  :math:`D, F, B, A` (9.13)–(9.16); :math:`P, Q` (11.55)–(11.56).
* :func:`four_point_vertex` — :math:`V^{(\ell)}_{(\alpha_1\alpha_2)(\alpha_3\alpha_4)}` for
  several inputs, (4.90)/(4.119); :func:`kernel_nlo_correction` — :math:`G^{\{1\}}` (4.115);
  :func:`ntk_variance` — :math:`A, B` (8.89), (8.97); :func:`ntk_preactivation_cross` —
  :math:`D, F` (8.77), (8.79); :func:`dntk_statistics` — :math:`P, Q` (single input).
* :func:`critical_closed_forms` — the book's closed forms / large-depth asymptotics at
  criticality per universality class ((5.120), (5.127), (9.44)–(9.52), (9.71)–(9.86),
  (11.79), (11.98)–(11.101)).
* :func:`exact_metric_moments` — for the scale-invariant class, the *exact* (all orders in
  :math:`1/n`) mean and variance of the stochastic metric (THEORY.md §4.1, derived here).

Gaussian expectations: 1-D and 2-D from :mod:`torch_crit.theory.gaussian` (kink-aware
composite Gauss–Legendre, closed forms where registered); the 3- and 4-point functions of up
to four distinct inputs in (4.119) use a nested Cholesky quadrature of the same kind (kinks
split at every level). Derivatives of :math:`\sigma` beyond the first are avoided for kinked
activations by Gaussian integration by parts (Stein's identity, THEORY.md §2.5), so ReLU-like
functions, whose :math:`\sigma''` is a delta function, are handled exactly.

Example:
    >>> import torch
    >>> from torch_crit.theory.finite_width import single_input_recursions
    >>> th = single_input_recursions("relu", 0.0, 2.0, torch.ones(1, 4), 5)
    >>> [round(v, 6) for v in (th.V[:, 0] / th.K[:, 0] ** 2).tolist()]  # (l-1) * 5, (5.120)
    [0.0, 5.0, 10.0, 15.0, 20.0]
"""
from __future__ import annotations

from ..errors import RecursionDivergenceError, RecursionDivergenceWarning  # noqa: F401  (re-exported)
import itertools
import math
import warnings
from dataclasses import dataclass, fields
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor

from .activations import Activation, get_activation
from .gaussian import _BREAKS, DEFAULT_NODES_1D, _edges, _panels, _std_weights, expect1, expect2

__all__ = [
    "RecursionDivergenceError",
    "RecursionDivergenceWarning",
    "SingleInputTheory",
    "single_input_recursions",
    "four_point_vertex",
    "kernel_nlo_correction",
    "NTKVariance",
    "ntk_variance",
    "NTKPreactivationCross",
    "ntk_preactivation_cross",
    "DNTKStatistics",
    "dntk_statistics",
    "FiniteWidthTensors",
    "finite_width_tensors",
    "CriticalClosedForms",
    "critical_closed_forms",
    "ExactMetricMoments",
    "exact_metric_moments",
    "nd_gaussian_expectation",
]

_DTYPE = torch.float64
_ND_BREAKS = (-8.0, -2.5, 0.0, 2.5, 8.0)  # panel edges (standardised units) of the N-D quadrature
Hyper = float | Sequence[float] | Tensor
OnDivergence = Literal["raise", "warn"]


# ============================================================================ input handling
def _activation(activation: str | Callable | Activation) -> Activation:
    return get_activation(activation)


def _gram(x: Tensor | None, gram: Tensor | None) -> Tensor:
    r"""Input Gram :math:`G^{(0)}_{\alpha\beta} = x_\alpha\cdot x_\beta/n_0`, shape [N, N]."""
    if gram is not None:
        g = torch.as_tensor(gram, dtype=_DTYPE)
        if g.dim() != 2 or g.shape[0] != g.shape[1]:
            raise ValueError(f"gram must be a square [N, N] matrix (1/n0) x x^T, got shape {tuple(g.shape)}.")
        if not torch.allclose(g, g.T, rtol=1e-10, atol=1e-12):
            raise ValueError("gram must be symmetric; pass (1/n0) * x @ x.T.")
        return g
    if x is None:
        raise ValueError("pass the inputs x ([N, n0] or [n0]) or gram=(1/n0) x x^T ([N, N]); got neither.")
    xt = torch.as_tensor(x, dtype=_DTYPE)
    if xt.dim() == 1:
        xt = xt[None]
    if xt.dim() != 2 or xt.shape[1] < 1 or xt.shape[0] < 1:
        raise ValueError(f"x must have shape [N, n0] (N inputs of dimension n0), got {tuple(xt.shape)}.")
    return xt @ xt.T / xt.shape[1]


def _check_depth(depth: int) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an int >= 1 (number of weight layers L), got {depth!r}.")
    return depth


def _per_layer(value: Hyper, depth: int, name: str) -> Tensor:
    """Broadcast a scalar or check a per-layer sequence (layers 1..L) -> tensor [depth]."""
    t = torch.as_tensor(value, dtype=_DTYPE)
    if t.dim() == 0:
        return t.expand(depth).clone()
    if t.dim() != 1 or t.shape[0] != depth:
        raise ValueError(
            f"{name} must be a number or one value per layer l = 1..{depth} (length {depth}); got "
            f"shape {tuple(t.shape)}. Pass a scalar for layer-independent hyperparameters."
        )
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite, got {t.tolist()}.")
    return t


def _width_ratios(widths: Sequence[int] | None, depth: int) -> tuple[Tensor, tuple[int, ...] | None]:
    r"""Ratios :math:`r_\ell = n_\ell/n_{\ell-1}` for the map :math:`\ell\to\ell+1`, shape [depth].

    ``widths``: ``None`` (equal hidden widths: all ratios 1), the hidden widths
    :math:`(n_1..n_{L-1})` (length ``depth - 1``) or all widths :math:`(n_0..n_L)` (length
    ``depth + 1``). Entry ``l-1`` of the result is used in the recursion from layer ``l`` to
    ``l + 1``; :math:`r_1` multiplies only vanishing layer-1 tensors and is set to 1.
    """
    r = torch.ones(depth, dtype=_DTYPE)
    if widths is None:
        return r, None
    w = [int(v) for v in widths]
    if len(w) == depth + 1:
        hidden = w[1:-1]
    elif len(w) == depth - 1:
        hidden = w
    else:
        raise ValueError(
            f"widths must list the hidden widths n_1..n_{{L-1}} (length {depth - 1}) or all widths "
            f"n_0..n_L (length {depth + 1}) for depth={depth}; got length {len(w)}: {w}."
        )
    bad = [v for v in hidden if v < 2]
    if bad:
        raise ValueError(
            f"hidden widths must be >= 2 for a 1/n expansion (and for neuron-pair statistics); got "
            f"{hidden}. Widen the layers."
        )
    for l in range(2, depth):  # ratio n_l / n_{l-1} for l = 2..L-1
        r[l - 1] = hidden[l - 1] / hidden[l - 2]
    return r, tuple(hidden)


def _check_finite(layer: int, values: dict[str, Tensor], on_divergence: OnDivergence) -> bool:
    """Return True if all finite; otherwise raise or warn naming the layer and quantity."""
    stacked = torch.cat([v.reshape(-1) for v in values.values()])
    if bool(torch.isfinite(stacked).all()) and (not stacked.numel() or float(stacked.abs().max()) <= 1e280):
        return True
    for name, v in values.items():
        if not bool(torch.isfinite(v).all()) or (v.numel() and float(v.abs().max()) > 1e280):
            msg = (
                f"the finite-width recursion diverged at layer l={layer}: {name} is "
                f"{'non-finite' if not bool(torch.isfinite(v).all()) else 'overflowing'} "
                f"(max |{name}| = {float(v.abs().nan_to_num(posinf=float('inf')).max()):.3g}). The "
                "hyperparameters are far from criticality (chi > 1 grows exponentially); use "
                "torch_crit.theory.critical_point(activation) or a smaller depth."
            )
            if on_divergence == "raise":
                raise RecursionDivergenceError(msg)
            warnings.warn(msg + " Remaining layers are filled with NaN.", RecursionDivergenceWarning, stacklevel=3)
            return False
    return True


# ============================================================================ 1-D moments
# Row order of the stacked 1-D moments (all at the current kernel K).
_MOMENTS = ("g", "s4", "ss11", "d2", "d4", "zsd", "zsd3", "d2z2", "s2z2", "s2z4")


def _moments1(act: Activation, K: Tensor) -> dict[str, Tensor]:
    r"""The single-input Gaussian moments at kernel ``K`` (shape [N]), one quadrature pass.

    g=<σ²>, s4=<σ⁴>, ss11=<σ²σ'²>, d2=<σ'²>, d4=<σ'⁴>, zsd=<zσσ'>, zsd3=<zσσ'³>,
    d2z2=<σ'²z²>, s2z2=<σ²z²>, s2z4=<σ²z⁴>. Only σ and σ' are evaluated, so kinked
    activations are exact (the quadrature splits at the kinks). When every kink sits at
    :math:`z = 0` (ReLU family, smooth activations) the nodes of
    :func:`~torch_crit.theory.gaussian.expect1` are fixed in standardised units and are reused
    across layers (same nodes, same result, no per-call set-up).
    """
    if all(k == 0.0 for k in act.kinks):
        u, w = _fixed_nodes()
        z = torch.sqrt(K.clamp(min=0.0))[..., None] * u
        vals = torch.stack(_integrands(act, z)) @ w  # [10, N]
        return dict(zip(_MOMENTS, vals))

    def f(z: Tensor) -> Tensor:
        return torch.stack(_integrands(act, z[0]))

    Kb = K.expand((len(_MOMENTS),) + K.shape)
    vals = expect1(f, Kb, kinks=act.kinks)
    return dict(zip(_MOMENTS, vals))


def _integrands(act: Activation, zz: Tensor) -> list[Tensor]:
    s = act.sigma(zz)
    d = act.derivative(zz, 1)
    s2, d2, z2 = s * s, d * d, zz * zz
    return [s2, s2 * s2, s2 * d2, d2, d2 * d2, zz * s * d, zz * s * d2 * d, d2 * z2, s2 * z2, s2 * z2 * z2]


_NODE_CACHE: list[tuple[Tensor, Tensor]] = []


def _fixed_nodes() -> tuple[Tensor, Tensor]:
    """Standard-normal nodes/weights of expect1's fixed panels (edges include u = 0)."""
    if not _NODE_CACHE:
        like = torch.zeros((), dtype=_DTYPE)
        u, w = _panels(_edges(_BREAKS, None, like), DEFAULT_NODES_1D)
        _NODE_CACHE.append((u, _std_weights(u, w)))
    return _NODE_CACHE[0]


# ============================================================================ single input
@dataclass(frozen=True)
class SingleInputTheory:
    r"""All single-input finite-width tensors, per layer and per input (each input's own norm).

    Every field is a float64 tensor of shape ``[depth, N]`` (layer :math:`\ell = 1..L` along
    dim 0, input :math:`\alpha` along dim 1) unless stated. Normalisation: the order-one tensors
    multiply :math:`1/n_{\ell-1}` (see the module docstring).

    Attributes:
        K: kernel :math:`K^{(\ell)}` (4.118).
        Theta: frozen NTK :math:`\Theta^{(\ell)}` (9.6).
        V: four-point vertex (5.109).
        G1: NLO metric :math:`G^{\{1\}(\ell)}` (5.110); :math:`\mathbb E[z^2] = K + G^{\{1\}}/n_{\ell-1}`.
        A, B: NTK variance tensors (9.16), (9.15).
        D, F: NTK–preactivation cross-correlation tensors (9.13), (9.14).
        P, Q: dNTK–preactivation cross-correlation tensors (11.55), (11.56).
        chi_par, chi_perp: susceptibilities (5.50), (5.51) at :math:`K^{(\ell)}` with the
            :math:`C_W` of the map :math:`\ell\to\ell+1` (layer :math:`L` uses :math:`C_W^{(L)}`).
        widths: hidden widths :math:`(n_1..n_{L-1})` if given, else ``None``.
    """

    K: Tensor
    Theta: Tensor
    V: Tensor
    G1: Tensor
    A: Tensor
    B: Tensor
    D: Tensor
    F: Tensor
    P: Tensor
    Q: Tensor
    chi_par: Tensor
    chi_perp: Tensor
    widths: tuple[int, ...] | None = None

    @property
    def depth(self) -> int:
        """Number of layers :math:`L`."""
        return int(self.K.shape[0])

    def normalized(self, n: float | Sequence[float] | Tensor | None = None) -> dict[str, Tensor]:
        r"""Dimensionless finite-width ratios ((5.128), (9.23)–(9.24), (11.62)), each [depth, N].

        ``V/(nK²)``, ``G1/(nK)``, ``A/(nΘ²)``, ``B/(nΘ²)``, ``D/(nKΘ)``, ``F/(nKΘ)``,
        ``P/(nΘ²)``, ``Q/(nΘ²)`` with :math:`n = n_{\ell-1}`.

        Args:
            n: the width feeding each layer: a number (equal widths), a sequence of length
                ``depth`` (:math:`n_0..n_{L-1}`), or ``None`` to use the stored hidden widths
                (layer 1 then gets :math:`n_0 := n_1`; its tensors vanish anyway). With no
                widths at all the ratios are returned for :math:`n = 1` (i.e. times n).

        Returns:
            dict name -> tensor [depth, N].
        """
        if n is None:
            if self.widths is None:
                nn_ = torch.ones(self.depth, dtype=_DTYPE)
            else:
                nn_ = torch.as_tensor((self.widths[0],) + tuple(self.widths), dtype=_DTYPE)
        else:
            nn_ = torch.as_tensor(n, dtype=_DTYPE)
            if nn_.dim() == 0:
                nn_ = nn_.expand(self.depth)
            if nn_.shape != (self.depth,):
                raise ValueError(f"n must be a number or have length depth={self.depth}, got shape {tuple(nn_.shape)}.")
        nn_ = nn_[:, None]
        K, Th = self.K, self.Theta
        return {
            "V/(nK^2)": self.V / (nn_ * K * K),
            "G1/(nK)": self.G1 / (nn_ * K),
            "A/(nTheta^2)": self.A / (nn_ * Th * Th),
            "B/(nTheta^2)": self.B / (nn_ * Th * Th),
            "D/(nKTheta)": self.D / (nn_ * K * Th),
            "F/(nKTheta)": self.F / (nn_ * K * Th),
            "P/(nTheta^2)": self.P / (nn_ * Th * Th),
            "Q/(nTheta^2)": self.Q / (nn_ * Th * Th),
        }


def single_input_recursions(
    activation: str | Callable | Activation,
    C_b: Hyper,
    C_W: Hyper,
    x: Tensor | None,
    depth: int,
    *,
    lambda_b: Hyper = 1.0,
    lambda_W: Hyper = 1.0,
    widths: Sequence[int] | None = None,
    gram: Tensor | None = None,
    on_divergence: OnDivergence = "raise",
) -> SingleInputTheory:
    r"""Iterate every single-input recursion of the book, for each input's own norm.

    With all expectations at :math:`K = K^{(\ell)}`, :math:`C = C^{(\ell+1)}`,
    :math:`\lambda = \lambda^{(\ell+1)}`, :math:`r = n_\ell/n_{\ell-1}`:

    .. math::
        K' &= C_b + C_W g, \qquad \Theta' = \lambda_b + \lambda_W g + \chi_\perp\Theta
            && (4.118),\ (9.6)\\
        V' &= C_W^2(\langle\sigma^4\rangle - g^2) + r\chi_\parallel^2 V && (5.109)\\
        G^{\{1\}\prime} &= r\,[\chi_\parallel G^{\{1\}} + j\,V/(8K^2)] && (5.110)\\
        F' &= r\chi_\parallel^2F + C_W^2\langle\sigma\sigma\sigma'\sigma'\rangle\Theta,\quad
        B' = r\chi_\perp^2B + C_W^2\langle\sigma'^4\rangle\Theta^2 && (9.14),\ (9.15)\\
        D' &= r\chi_\perp\chi_\parallel D + \tfrac{\lambda_W}{C_W}[C_W^2\langle\sigma^4\rangle
            - (C_Wg)^2 + r\chi_\parallel^2V] + \Theta[C_W^2\langle\sigma\sigma\sigma'\sigma'\rangle
            - C_Wg\chi_\perp + 2rh\chi_\parallel V] && (9.13)

    :math:`A'` as (9.16) and :math:`P', Q'` as (11.55)–(11.56), with :math:`r` on every
    inherited (previous-layer) tensor. Initial conditions (4.8), (9.7), (9.17), (11.57):
    :math:`K^{(1)} = C_b^{(1)} + C_W^{(1)}x^2/n_0`, :math:`\Theta^{(1)} = \lambda_b^{(1)} +
    \lambda_W^{(1)}x^2/n_0`, all 1/n tensors zero. :math:`\langle\sigma''\sigma\rangle` and
    :math:`\langle\sigma''\sigma'\sigma'\sigma\rangle` are evaluated by integration by parts,
    so kinked activations (ReLU: (11.67), (11.70) give 0) are exact.

    Args:
        activation: name, module, callable or :class:`Activation`.
        C_b, C_W: initialization hyperparameters, scalars or one value per layer (length depth).
        x: inputs ``[N, n0]`` (or ``[n0]``); only the norms :math:`x_\alpha^2/n_0` enter.
        depth: number of weight layers :math:`L \ge 1`.
        lambda_b, lambda_W: learning rates per layer (scalars or length depth), (8.6).
        widths: hidden widths :math:`n_1..n_{L-1}` (or :math:`n_0..n_L`); default equal.
        gram: alternatively the Gram ``(1/n0) x x^T`` ``[N, N]`` (its diagonal is used).
        on_divergence: ``"raise"`` :class:`RecursionDivergenceError` (default) or ``"warn"``
            and fill the remaining layers with NaN.

    Returns:
        :class:`SingleInputTheory` with ``[depth, N]`` tensors.

    Raises:
        ValueError: bad shapes, lengths or widths < 2.
        RecursionDivergenceError: the recursion overflowed (layer and tensor named).
    """
    act = _activation(activation)
    depth = _check_depth(depth)
    g0 = torch.diagonal(_gram(x, gram)).clone()
    Cb, CW = _per_layer(C_b, depth, "C_b"), _per_layer(C_W, depth, "C_W")
    lb, lW = _per_layer(lambda_b, depth, "lambda_b"), _per_layer(lambda_W, depth, "lambda_W")
    ratio, hidden = _width_ratios(widths, depth)
    names = ("K", "Theta", "V", "G1", "A", "B", "D", "F", "P", "Q", "chi_par", "chi_perp")
    out = {k: torch.full((depth,) + g0.shape, float("nan"), dtype=_DTYPE) for k in names}
    K = Cb[0] + CW[0] * g0
    Th = lb[0] + lW[0] * g0
    zero = torch.zeros_like(g0)
    V = G1 = A = B = D = F = P = Q = zero
    Cb_f, CW_f, lb_f, lW_f, r_f = Cb.tolist(), CW.tolist(), lb.tolist(), lW.tolist(), ratio.tolist()
    for l in range(1, depth + 1):  # state holds layer l
        cw_next = CW_f[l] if l < depth else CW_f[depth - 1]
        m = _moments1(act, K)
        Ks = torch.where(K > 0, K, torch.ones_like(K))
        q = m["zsd"] / Ks  # chi_par / C_W  (5.50)
        h0 = (m["d2z2"] - K * m["d2"]) / (4 * Ks * Ks)  # h / C_W  (5.52)
        row = dict(K=K, Theta=Th, V=V, G1=G1, A=A, B=B, D=D, F=F, P=P, Q=Q,
                   chi_par=cw_next * q, chi_perp=cw_next * m["d2"])
        for k, v in row.items():
            out[k][l - 1] = v
        if l == depth:
            break
        cb, cw, lamb, lamw, r = Cb_f[l], CW_f[l], lb_f[l], lW_f[l], r_f[l - 1]
        g, d2 = m["g"], m["d2"]
        chi_par, chi_perp, h = cw * q, cw * d2, cw * h0
        j = cw * (m["s2z4"] / (Ks * Ks) - 6 * m["s2z2"] / Ks + 3 * g)  # (5.111)
        sdd_s = q - d2  # <σ''σ> by parts
        sddds = m["zsd3"] / (3 * Ks) - m["d4"] / 3  # <σ''σ'σ'σ> by parts
        var_s2 = m["s4"] - g * g
        mix = m["ss11"] - g * d2
        K_n = cb + cw * g
        Th_n = lamb + lamw * g + chi_perp * Th
        V_n = cw * cw * var_s2 + r * chi_par**2 * V
        G1_n = r * (chi_par * G1 + j * V / (8 * Ks * Ks))
        F_n = r * chi_par**2 * F + cw * cw * m["ss11"] * Th
        B_n = r * chi_perp**2 * B + cw * cw * m["d4"] * Th * Th
        D_n = (r * chi_perp * chi_par * D + lamw * (cw * var_s2 + r * cw * q * q * V)
               + Th * (cw * cw * mix + 2 * r * h * chi_par * V))
        A_n = (r * chi_perp**2 * A + lamw**2 * (var_s2 + r * q * q * V)
               + 2 * lamw * Th * (cw * mix + 2 * r * h0 * chi_par * V)
               + 2 * r * lamw * chi_perp * q * D + 4 * r * h * chi_perp * Th * D
               + Th * Th * (cw * cw * (m["d4"] - d2 * d2) + r * (2 * h) ** 2 * V))
        P_n = cw * cw * sddds * Th * Th + r * (cw * chi_perp * sdd_s * (B + P) + chi_perp**2 * P)
        Q_n = (cw * cw * sddds * Th * Th + lamw * cw * (r * q * q * F + m["ss11"] * Th)
               + 2 * r * h * chi_par * Th * F + r * (cw * chi_perp * sdd_s + chi_perp**2) * Q)
        new = dict(K=K_n, Theta=Th_n, V=V_n, G1=G1_n, A=A_n, B=B_n, D=D_n, F=F_n, P=P_n, Q=Q_n)
        if not _check_finite(l + 1, new, on_divergence):
            break
        if float(K_n.min()) < 0:
            raise ValueError(f"the kernel became negative at layer {l + 1} (C_b < 0?): K = {K_n.tolist()}.")
        K, Th, V, G1, A, B, D, F, P, Q = (new[k] for k in ("K", "Theta", "V", "G1", "A", "B", "D", "F", "P", "Q"))
    return SingleInputTheory(**out, widths=hidden)


# ============================================================================ N-D quadrature
def _safe_cholesky(C: Tensor) -> Tensor:
    """Lower-triangular L with L L^T = C for PSD C [B, d, d], zero pivots allowed."""
    Bn, d, _ = C.shape
    L = torch.zeros_like(C)
    for k in range(d):
        s = C[:, k, k] - (L[:, k, :k] ** 2).sum(-1)
        scale = C[:, k, k].abs().clamp(min=1e-300)
        if bool((s < -1e-9 * scale).any()):
            raise ValueError(
                "the kernel sub-block is not positive semi-definite (negative pivot "
                f"{float(s.min()):.3g}); check the input Gram and the hyperparameters."
            )
        piv = torch.sqrt(torch.clamp(s, min=0.0))
        piv = torch.where(piv > 1e-12 * torch.sqrt(scale), piv, torch.zeros_like(piv))
        L[:, k, k] = piv
        for i in range(k + 1, d):
            num = C[:, i, k] - (L[:, i, :k] * L[:, k, :k]).sum(-1)
            L[:, i, k] = torch.where(piv > 0, num / torch.where(piv > 0, piv, torch.ones_like(piv)), torch.zeros_like(num))
    return L


def nd_gaussian_expectation(
    fns: Sequence[Callable[[Tensor], Tensor]],
    cov: Tensor,
    *,
    kinks: Sequence[Sequence[float]] | None = None,
    n_nodes: int | None = None,
) -> Tensor:
    r"""Gaussian expectation of a product :math:`\langle \prod_k f_k(z_k)\rangle_C` in ``d`` dimensions.

    .. math::
        \langle f_1(z_1)\cdots f_d(z_d)\rangle_C, \qquad z\sim\mathcal N(0, C)\qquad (4.25)

    Nested quadrature in Cholesky coordinates :math:`z_k = \sum_{j\le k} L_{kj}u_j`: each
    :math:`u_k` is integrated by composite Gauss–Legendre on :math:`[-10, 10]` with panel edges
    at 0 and at every kink of :math:`f_k` mapped through the outer nodes, as in
    :func:`~torch_crit.theory.gaussian.expect2` (singular :math:`C`, e.g. repeated inputs,
    is allowed). Panels: :math:`[-8, -2.5, 0, 2.5, 8]` plus kinks (tail mass < 1.3e-15).
    Accuracy with the defaults: ~1e-6 relative for 4-point functions of tanh/ReLU. Used for the 3- and 4-point functions of (4.119), (8.97).

    Args:
        fns: ``d`` elementwise functions.
        cov: covariance(s) ``[d, d]`` or batched ``[B, d, d]`` (PSD).
        kinks: per function, the points where it is not smooth (default: ``f.kinks`` or none).
        n_nodes: Gauss–Legendre nodes per panel (default 24, 16, 10, 7 for d = 1, 2, 3, 4).

    Returns:
        Tensor ``[]`` or ``[B]``.
    """
    C = torch.as_tensor(cov, dtype=_DTYPE)
    single = C.dim() == 2
    if single:
        C = C[None]
    d = len(fns)
    if C.dim() != 3 or C.shape[1:] != (d, d):
        raise ValueError(f"cov must be [{d}, {d}] or [B, {d}, {d}] for {d} functions, got {tuple(C.shape)}.")
    n = n_nodes or {1: 24, 2: 16, 3: 10, 4: 7}.get(d, 5)
    ks = [tuple(float(v) for v in (kinks[k] if kinks is not None else getattr(fns[k], "kinks", ()) or ()))
          for k in range(d)]
    L = _safe_cholesky(C)
    out = torch.empty(C.shape[0], dtype=_DTYPE)
    per = 1
    for k in range(d):
        per *= (2 + len(ks[k])) * n
    step = max(1, (1 << 22) // per)
    for lo in range(0, C.shape[0], step):
        out[lo:lo + step] = _nd_core(fns, L[lo:lo + step], ks, n)
    return out[0] if single else out


def _nd_core(fns: Sequence[Callable], L: Tensor, ks: list[tuple[float, ...]], n: int) -> Tensor:
    Bn, d, _ = L.shape
    us: list[Tensor] = []  # each broadcastable to [B, P1, ..., Pd]
    weight = torch.ones((Bn,), dtype=_DTYPE)
    prod = torch.ones((Bn,), dtype=_DTYPE)
    for k in range(d):
        lead = weight.shape  # [B, P1..P_{k-1}]
        offset = torch.zeros(lead, dtype=_DTYPE)
        for j, u in enumerate(us):
            offset = offset + L[(slice(None), k, j) + (None,) * (len(lead) - 1)] * u
        piv = L[(slice(None), k, k) + (None,) * (len(lead) - 1)].expand(lead)
        extra = None
        if ks[k]:
            kt = torch.as_tensor(ks[k], dtype=_DTYPE)
            safe = torch.where(piv > 0, piv, torch.ones_like(piv))[..., None]
            extra = torch.where(piv[..., None] > 0, (kt - offset[..., None]) / safe, torch.zeros_like(safe))
        u_k, w_k = _panels(_edges(_ND_BREAKS, extra, offset), n)  # [lead..., Pk]
        z_k = offset[..., None] + piv[..., None] * u_k
        y = fns[k](z_k)
        if y.shape != z_k.shape:
            y = y.expand(z_k.shape)
        us = [u[..., None] for u in us] + [u_k]
        weight = weight[..., None] * _std_weights(u_k, w_k)
        prod = prod[..., None] * y
    return (prod * weight).reshape(Bn, -1).sum(-1)


# ============================================================================ multi-input pieces
def _pow_fn(act: Activation, orders: Sequence[int], zpow: int = 0) -> Callable[[Tensor], Tensor]:
    """z ↦ z^zpow · Π_k σ^{(o_k)}(z)."""
    orders = tuple(orders)

    def f(z: Tensor) -> Tensor:
        y = z**zpow if zpow else torch.ones_like(z)
        for o in orders:
            y = y * act.derivative(z, o)
        return y

    f.kinks = act.kinks  # type: ignore[attr-defined]
    return f


def _four_point(act: Activation, K: Tensor, orders: tuple[int, int, int, int]) -> Tensor:
    r"""``E[σ^{(o1)}(z_a1) σ^{(o2)}(z_a2) σ^{(o3)}(z_a3) σ^{(o4)}(z_a4)]`` for all index tuples, [N]*4."""
    N = K.shape[0]
    groups: dict[tuple, list[tuple[int, int, int, int]]] = {}
    for idx in itertools.product(range(N), repeat=4):
        per: dict[int, list[int]] = {}
        for a, o in zip(idx, orders):
            per.setdefault(a, []).append(o)
        key = tuple(sorted((a, tuple(sorted(os))) for a, os in per.items()))
        groups.setdefault(key, []).append(idx)
    out = torch.empty((N,) * 4, dtype=_DTYPE)
    # batch keys with the same per-slot function signature
    batches: dict[tuple, list[tuple]] = {}
    for key in groups:
        sig = tuple(os for _, os in key)
        batches.setdefault(sig, []).append(key)
    for sig, keys in batches.items():
        fns = [_pow_fn(act, os) for os in sig]
        samples = torch.tensor([[a for a, _ in key] for key in keys])
        cov = K[samples[:, :, None], samples[:, None, :]]
        d = len(sig)
        if d == 1:
            vals = expect1(fns[0], cov[:, 0, 0], kinks=act.kinks)
        elif d == 2:
            vals = expect2(fns[0], fns[1], cov[:, 0, 0], cov[:, 0, 1], cov[:, 1, 1])
        else:
            vals = nd_gaussian_expectation(fns, cov)
        for key, v in zip(keys, vals):
            for idx in groups[key]:
                out[idx] = v
    return out


def _pairs(N: int) -> tuple[Tensor, Tensor]:
    ii, jj = torch.triu_indices(N, N, offset=1)
    return ii, jj


def _stein_pair_tensor(act: Activation, K: Tensor, order: int) -> Tensor:
    r"""``M[a1, a2, c1, c2] = <∂_{c1}∂_{c2} (σ^{(o)}(z_{a1}) σ^{(o)}(z_{a2}))>_K``, shape [N]*4.

    Stein's identity turns the book's contraction
    :math:`\sum_{\beta}\langle(z_{\beta_1}z_{\beta_2}-K_{\beta_1\beta_2})F\rangle K^{\beta_1\gamma_1}K^{\beta_2\gamma_2}`
    of (4.119), (8.77), (8.97) into this tensor; it is non-zero only for
    :math:`\gamma\subset\{\alpha_1,\alpha_2\}`. Smooth activations use derivatives directly
    (no kernel inverse); kinked ones integrate by parts with the 2×2 block inverse.
    """
    N = K.shape[0]
    M = torch.zeros((N,) * 4, dtype=_DTYPE)
    Kd = torch.diagonal(K)
    # a1 == a2: <∂²(f²)> = <f² (z² - K)>/K²
    fo = _pow_fn(act, (order, order))
    fz = _pow_fn(act, (order, order), 2)
    e0 = expect1(fo, Kd, kinks=act.kinks)
    e2 = expect1(fz, Kd, kinks=act.kinks)
    diag = (e2 - Kd * e0) / (Kd * Kd)
    ar = torch.arange(N)
    M[ar, ar, ar, ar] = diag
    if N == 1:
        return M
    i, j = _pairs(N)
    k11, k12, k22 = K[i, i], K[i, j], K[j, j]
    if act.is_smooth:
        f0, f1, f2 = (_pow_fn(act, (order + t,)) for t in range(3))
        m11 = expect2(f2, f0, k11, k12, k22)
        m12 = expect2(f1, f1, k11, k12, k22)
        m22 = expect2(f0, f2, k11, k12, k22)
    else:
        det = k11 * k22 - k12 * k12
        cond_bad = det <= 1e-10 * k11 * k22
        if bool(cond_bad.any()):
            b = int(torch.nonzero(cond_bad)[0])
            raise ValueError(
                f"inputs {int(i[b])} and {int(j[b])} have a (nearly) degenerate 2x2 kernel block "
                f"(cos = {float(k12[b] / torch.sqrt(k11[b] * k22[b])):.12f}); the multi-input recursions of a "
                "kinked activation need linearly independent inputs. Remove duplicated/collinear inputs "
                "or use single_input_recursions."
            )
        f = _pow_fn(act, (order,))
        fz1 = _pow_fn(act, (order,), 1)
        fz2 = _pow_fn(act, (order,), 2)
        E0 = expect2(f, f, k11, k12, k22)
        T11 = expect2(fz2, f, k11, k12, k22) - k11 * E0
        T12 = expect2(fz1, fz1, k11, k12, k22) - k12 * E0
        T22 = expect2(f, fz2, k11, k12, k22) - k22 * E0
        inv11, inv12, inv22 = k22 / det, -k12 / det, k11 / det
        Tm = torch.stack([torch.stack([T11, T12], -1), torch.stack([T12, T22], -1)], -2)
        Ki = torch.stack([torch.stack([inv11, inv12], -1), torch.stack([inv12, inv22], -1)], -2)
        Mm = Ki @ Tm @ Ki
        m11, m12, m22 = Mm[:, 0, 0], Mm[:, 0, 1], Mm[:, 1, 1]
    for (a, b, c, d_), v in (((i, j, i, i), m11), ((i, j, i, j), m12), ((i, j, j, i), m12), ((i, j, j, j), m22)):
        M[a, b, c, d_] = v
        M[b, a, d_, c] = v  # symmetric in (a1 a2) with the same c-assignment
    return M


def _stein_mixed(act: Activation, K: Tensor) -> Tensor:
    r"""``N[a1, a3, g] = <∂_g (σ(z_{a1}) σ'(z_{a3}))>_K``, shape [N]*3 (Stein form of (8.79))."""
    Nn = K.shape[0]
    out = torch.zeros((Nn,) * 3, dtype=_DTYPE)
    Kd = torch.diagonal(K)
    ar = torch.arange(Nn)
    out[ar, ar, ar] = expect1(_pow_fn(act, (0, 1), 1), Kd, kinks=act.kinks) / Kd  # <zσσ'>/K
    if Nn == 1:
        return out
    ii, jj = torch.meshgrid(torch.arange(Nn), torch.arange(Nn), indexing="ij")
    off = ii != jj
    i, j = ii[off], jj[off]
    k11, k12, k22 = K[i, i], K[i, j], K[j, j]
    s0, s1 = _pow_fn(act, (0,)), _pow_fn(act, (1,))
    if act.is_smooth:
        g_a1 = expect2(s1, s1, k11, k12, k22)  # ∂ on z_{a1}: <σ'_1 σ'_2>
        g_a3 = expect2(s0, _pow_fn(act, (2,)), k11, k12, k22)  # <σ_1 σ''_2>
    else:
        det = k11 * k22 - k12 * k12
        if bool((det <= 1e-10 * k11 * k22).any()):
            raise ValueError("degenerate pair of inputs in the multi-input F recursion; remove collinear inputs.")
        e1 = expect2(_pow_fn(act, (0,), 1), s1, k11, k12, k22)  # <z1 σ1 σ'2>
        e2 = expect2(s0, _pow_fn(act, (1,), 1), k11, k12, k22)  # <σ1 z2 σ'2>
        g_a1 = (k22 * e1 - k12 * e2) / det
        g_a3 = (-k12 * e1 + k11 * e2) / det
    out[i, j, i] = g_a1
    out[i, j, j] = g_a3
    return out


def _two_point(act: Activation, K: Tensor, o1: int, o2: int) -> Tensor:
    Kd = torch.diagonal(K)
    return expect2(act.fn(o1), act.fn(o2), Kd[:, None], K, Kd[None, :])


@dataclass(frozen=True)
class FiniteWidthTensors:
    r"""Multi-input infinite-width kernels and leading finite-width tensors, per layer.

    Sample-index conventions follow the book: ``V[l, a1, a2, a3, a4]`` =
    :math:`V^{(\ell)}_{(\alpha_1\alpha_2)(\alpha_3\alpha_4)}` (4.77);
    ``A[l, a1, a2, a3, a4]`` = :math:`A^{(\ell)}_{(\alpha_1\alpha_2)(\alpha_3\alpha_4)}`;
    ``B[l, a1, a3, a2, a4]`` = :math:`B^{(\ell)}_{\alpha_1\alpha_3\alpha_2\alpha_4}` (8.82), so
    :math:`\mathbb E[\widehat{\Delta H}_{ij;\alpha_1\alpha_2}\widehat{\Delta H}_{ij;\alpha_3\alpha_4}]
    = B_{\alpha_1\alpha_3\alpha_2\alpha_4}/n` for :math:`i\ne j`;
    ``D[l, a1, a2, a3, a4]`` = :math:`D_{\alpha_1\alpha_2\alpha_3\alpha_4}` and
    ``F[l, a1, a3, a2, a4]`` = :math:`F_{\alpha_1\alpha_3\alpha_2\alpha_4}` (8.67).

    Attributes:
        K, Theta: ``[depth, N, N]`` kernel (4.118) and frozen NTK (9.5).
        V: ``[depth, N, N, N, N]`` four-point vertex (4.119).
        G1: ``[depth, N, N]`` NLO metric (4.115), or ``None`` if not requested.
        A, B, D, F: ``[depth, N, N, N, N]`` NTK tensors (8.77)–(8.97), or ``None``.
    """

    K: Tensor
    Theta: Tensor
    V: Tensor
    G1: Tensor | None = None
    A: Tensor | None = None
    B: Tensor | None = None
    D: Tensor | None = None
    F: Tensor | None = None


def _nlo_offdiag(act: Activation, K: Tensor, V: Tensor, G1: Tensor, Ms: Tensor, cw: Tensor, r: Tensor) -> Tensor:
    """Off-diagonal entries of the (4.115) update for every pair of distinct inputs."""
    N = K.shape[0]
    out = torch.zeros(N, N, dtype=_DTYPE)
    if N == 1:
        return out
    i, j = _pairs(N)
    k11, k12, k22 = K[i, i], K[i, j], K[j, j]
    det = k11 * k22 - k12 * k12
    if bool((det <= 1e-10 * k11 * k22).any()):
        raise ValueError(
            "kernel_nlo_correction needs linearly independent inputs (a 2x2 kernel block is singular); "
            "remove duplicated or collinear inputs."
        )
    E4 = [expect2(_pow_fn(act, (0,), p), _pow_fn(act, (0,), 4 - p), k11, k12, k22) for p in range(5)]
    E2 = [expect2(_pow_fn(act, (0,), p), _pow_fn(act, (0,), 2 - p), k11, k12, k22) for p in range(3)]
    E0 = expect2(_pow_fn(act, (0,)), _pow_fn(act, (0,)), k11, k12, k22)
    P = i.shape[0]
    Kb = torch.stack([torch.stack([k11, k12], -1), torch.stack([k12, k22], -1)], -2)  # [P, 2, 2]
    Ki = torch.linalg.inv(Kb)
    sel = torch.stack([i, j], -1)  # [P, 2]
    Vs = V[sel[:, :, None, None, None], sel[:, None, :, None, None], sel[:, None, None, :, None], sel[:, None, None, None, :]]
    Vr = torch.einsum("pab,pcd,pef,pgh,pbdfh->paceg", Ki, Ki, Ki, Ki, Vs)  # raised indices (4.83)
    E2m = torch.empty(P, 2, 2, dtype=_DTYPE)
    X = torch.empty(P, 2, 2, 2, 2, dtype=_DTYPE)
    for b1, b2 in itertools.product(range(2), repeat=2):
        E2m[:, b1, b2] = E2[(b1 == 0) + (b2 == 0)]
    for b in itertools.product(range(2), repeat=4):
        p = sum(1 for v in b if v == 0)
        X[(slice(None),) + b] = (E4[p] - Kb[:, b[2], b[3]] * E2m[:, b[0], b[1]] - Kb[:, b[0], b[1]] * E2m[:, b[2], b[3]]
                                 + Kb[:, b[0], b[1]] * Kb[:, b[2], b[3]] * E0)
    T1 = 0.5 * torch.einsum("pcd,pcd->p", G1[sel[:, :, None], sel[:, None, :]], _msub(Ms, i, j, sel))
    T2 = 0.125 * torch.einsum("pabcd,pabcd->p", Vr, X)
    Y = -2 * E2m + Kb * E0[:, None, None]
    T3 = 0.25 * torch.einsum("pacbd,pcd,pab->p", Vr, Kb, Y)
    vals = r * cw * (T1 + T2 + T3)
    out[i, j] = vals
    out[j, i] = vals
    return out


def _msub(Ms: Tensor, i: Tensor, j: Tensor, sel: Tensor) -> Tensor:
    """Ms[a1=i, a2=j, c1, c2] restricted to c ∈ {i, j}: [P, 2, 2]."""
    return Ms[i[:, None, None], j[:, None, None], sel[:, :, None], sel[:, None, :]]


def finite_width_tensors(
    activation: str | Callable | Activation,
    C_b: Hyper,
    C_W: Hyper,
    x: Tensor | None,
    depth: int,
    *,
    lambda_b: Hyper = 1.0,
    lambda_W: Hyper = 1.0,
    widths: Sequence[int] | None = None,
    gram: Tensor | None = None,
    nlo: bool = False,
    ntk: bool = False,
    on_divergence: OnDivergence = "raise",
) -> FiniteWidthTensors:
    r"""Multi-input recursions for :math:`K, \Theta, V` (and optionally :math:`G^{\{1\}}, A, B, D, F`).

    With all expectations over :math:`K^{(\ell)}`, :math:`C = C^{(\ell+1)}`,
    :math:`r = n_\ell/n_{\ell-1}` and the Stein tensor
    :math:`M_{(\alpha_1\alpha_2)(\gamma_1\gamma_2)} = \langle\partial_{\gamma_1}\partial_{\gamma_2}
    (\sigma_{\alpha_1}\sigma_{\alpha_2})\rangle` (THEORY.md §2.5):

    .. math::
        V'_{(\alpha_1\alpha_2)(\alpha_3\alpha_4)} = C_W^2\big[\langle\sigma_{\alpha_1}\sigma_{\alpha_2}
        \sigma_{\alpha_3}\sigma_{\alpha_4}\rangle - \langle\sigma_{\alpha_1}\sigma_{\alpha_2}\rangle
        \langle\sigma_{\alpha_3}\sigma_{\alpha_4}\rangle\big] + \frac{r C_W^2}{4}
        \sum_{\gamma} M_{(\alpha_1\alpha_2)(\gamma_1\gamma_2)} V_{(\gamma_1\gamma_2)(\gamma_3\gamma_4)}
        M_{(\alpha_3\alpha_4)(\gamma_3\gamma_4)} \qquad (4.119)

    :math:`G^{\{1\}}` by (4.115) (diagonal by (5.110); each off-diagonal entry needs only the 2×2
    block of its two inputs, by marginalisation), :math:`D, F, B, A` by (8.77), (8.79), (8.89),
    (8.97) with :math:`\Omega_{\alpha_1\alpha_2} = \lambda_W\sigma_{\alpha_1}\sigma_{\alpha_2} +
    C_W\Theta_{\alpha_1\alpha_2}\sigma'_{\alpha_1}\sigma'_{\alpha_2}` (8.74). Cost per layer
    :math:`O(N^6)` for the contractions plus up to 4-D quadratures for each distinct multiset of
    inputs; intended for :math:`N \lesssim 8`.

    Args:
        activation, C_b, C_W, x, depth, lambda_b, lambda_W, widths, gram, on_divergence: as in
            :func:`single_input_recursions`.
        nlo: also compute :math:`G^{\{1\}}`.
        ntk: also compute :math:`A, B, D, F`.

    Returns:
        :class:`FiniteWidthTensors`.
    """
    act = _activation(activation)
    depth = _check_depth(depth)
    G0 = _gram(x, gram)
    N = G0.shape[0]
    if N > 16:
        warnings.warn(f"multi-input finite-width recursions with N={N} inputs cost O(N^6) per layer; "
                      "consider fewer inputs or single_input_recursions.", UserWarning, stacklevel=2)
    Cb, CW = _per_layer(C_b, depth, "C_b"), _per_layer(C_W, depth, "C_W")
    lb, lW = _per_layer(lambda_b, depth, "lambda_b"), _per_layer(lambda_W, depth, "lambda_W")
    ratio, _ = _width_ratios(widths, depth)
    shp4 = (depth,) + (N,) * 4
    nan = float("nan")
    Ks = torch.full((depth, N, N), nan, dtype=_DTYPE)
    Ths = torch.full((depth, N, N), nan, dtype=_DTYPE)
    Vs = torch.full(shp4, nan, dtype=_DTYPE)
    G1s = torch.full((depth, N, N), nan, dtype=_DTYPE) if nlo else None
    As, Bs, Ds, Fs = ((torch.full(shp4, nan, dtype=_DTYPE) for _ in range(4)) if ntk else (None,) * 4)
    K = Cb[0] + CW[0] * G0
    Th = lb[0] + lW[0] * G0
    V = torch.zeros((N,) * 4, dtype=_DTYPE)
    G1 = torch.zeros(N, N, dtype=_DTYPE)
    A = B = D = F = V.clone()
    ar = torch.arange(N)
    for l in range(1, depth + 1):
        Ks[l - 1], Ths[l - 1], Vs[l - 1] = K, Th, V
        if nlo:
            G1s[l - 1] = G1
        if ntk:
            As[l - 1], Bs[l - 1], Ds[l - 1], Fs[l - 1] = A, B, D, F
        if l == depth:
            break
        cb, cw, lamb, lamw, r = Cb[l], CW[l], lb[l], lW[l], ratio[l - 1]
        g2 = _two_point(act, K, 0, 0)
        ssss = _four_point(act, K, (0, 0, 0, 0))
        Ms = _stein_pair_tensor(act, K, 0)
        K_n = cb + cw * g2
        V_n = cw**2 * (ssss - g2[:, :, None, None] * g2[None, None]) + 0.25 * r * cw**2 * torch.einsum(
            "abij,ijkl,cdkl->abcd", Ms, V, Ms)
        new: dict[str, Tensor] = {"K": K_n, "V": V_n}
        d2 = _two_point(act, K, 1, 1)
        new["Theta"] = lamb + lamw * g2 + cw * d2 * Th  # (9.5)
        if nlo:
            Kd = torch.diagonal(K)
            m = _moments1(act, Kd)
            q = m["zsd"] / Kd
            j = cw * (m["s2z4"] / (Kd * Kd) - 6 * m["s2z2"] / Kd + 3 * m["g"])
            Vd = V[ar, ar, ar, ar]
            G1_n = _nlo_offdiag(act, K, V, G1, Ms, cw, r)
            G1_n[ar, ar] = r * (cw * q * torch.diagonal(G1) + j * Vd / (8 * Kd * Kd))
            new["G1"] = G1_n
        if ntk:
            ssdd = _four_point(act, K, (0, 0, 1, 1))  # <σ_a1 σ_a2 σ'_a3 σ'_a4>
            dddd = _four_point(act, K, (1, 1, 1, 1))
            Md = _stein_pair_tensor(act, K, 1)
            Nm = _stein_mixed(act, K)
            Om = lamw * g2 + cw * Th * d2  # <Ω>
            MOm = lamw * Ms + cw * Th[:, :, None, None] * Md  # <∂∂Ω>
            # <σσΩ> - <σσ><Ω>, indices (a1 a2)(a3 a4)
            ssO = lamw * (ssss - g2[:, :, None, None] * g2[None, None]) + cw * Th[None, None] * (
                ssdd - g2[:, :, None, None] * d2[None, None])
            OO = (lamw**2 * (ssss - g2[:, :, None, None] * g2[None, None])
                  + lamw * cw * Th[None, None] * (ssdd - g2[:, :, None, None] * d2[None, None])
                  + lamw * cw * Th[:, :, None, None] * (ssdd.permute(2, 3, 0, 1) - d2[:, :, None, None] * g2[None, None])
                  + cw**2 * Th[:, :, None, None] * Th[None, None] * (dddd - d2[:, :, None, None] * d2[None, None]))
            D_n = (cw * ssO + 0.25 * r * cw * torch.einsum("abij,ijkl,cdkl->abcd", Ms, V, MOm)
                   + 0.5 * r * cw**2 * torch.einsum("abij,ijcd->abcd", Ms, D) * d2[None, None])
            # F'[a1,a3,a2,a4] = C_W² <σ_a1 σ_a2 σ'_a3 σ'_a4> Θ_a3a4 + r C_W² Σ N[a1,a3,g1] N[a2,a4,g2] F[g1,a3,g2,a4]
            F_n = (cw**2 * ssdd.permute(0, 2, 1, 3) * Th[None, :, None, :]
                   + r * cw**2 * torch.einsum("acg,bdh,gchd->acbd", Nm, Nm, F))
            # B'[a1,a3,a2,a4] = C_W² [<σ'σ'σ'σ'> Θ_a1a2 Θ_a3a4 + r <σ'_a1σ'_a3><σ'_a2σ'_a4> B]
            B_n = cw**2 * (dddd * Th[:, None, :, None] * Th[None, :, None, :]
                           + r * d2[:, :, None, None] * d2[None, None] * B)
            MD = torch.einsum("abij,ijcd->abcd", MOm, D) * d2[None, None]
            A_n = (OO + 0.25 * r * torch.einsum("abij,ijkl,cdkl->abcd", MOm, V, MOm)
                   + r * cw**2 * d2[:, :, None, None] * d2[None, None] * A
                   + 0.5 * r * cw * (MD + MD.permute(2, 3, 0, 1)))
            new.update(A=A_n, B=B_n, D=D_n, F=F_n)
        if not _check_finite(l + 1, new, on_divergence):
            break
        K, V, Th = new["K"], new["V"], new["Theta"]
        if nlo:
            G1 = new["G1"]
        if ntk:
            A, B, D, F = new["A"], new["B"], new["D"], new["F"]
    return FiniteWidthTensors(K=Ks, Theta=Ths, V=Vs, G1=G1s, A=As, B=Bs, D=Ds, F=Fs)


def four_point_vertex(
    activation: str | Callable | Activation,
    C_b: Hyper,
    C_W: Hyper,
    x: Tensor | None,
    depth: int,
    *,
    widths: Sequence[int] | None = None,
    gram: Tensor | None = None,
) -> Tensor:
    r"""Four-point vertex :math:`V^{(\ell)}_{(\alpha_1\alpha_2)(\alpha_3\alpha_4)}`, :math:`\ell = 1..L`.

    Leading-order recursion (4.90)/(4.119) (see :func:`finite_width_tensors`), in the book's
    normalisation: the connected four-point function of layer :math:`\ell` times
    :math:`n_{\ell-1}` (4.77), equivalently
    :math:`\mathrm{Cov}(\widehat G^{(\ell)}_{\alpha_1\alpha_2}, \widehat G^{(\ell)}_{\alpha_3\alpha_4})
    = V^{(\ell)}_{(\alpha_1\alpha_2)(\alpha_3\alpha_4)}/n_{\ell-1}` (4.76). :math:`V^{(1)} = 0`;
    single input it reduces to (5.109).

    Args:
        activation: name, module, callable or :class:`Activation`.
        C_b, C_W: scalars or one value per layer.
        x: inputs ``[N, n0]``.
        depth: :math:`L`.
        widths: hidden widths (ratios :math:`n_\ell/n_{\ell-1}` enter), default equal.
        gram: alternatively ``(1/n0) x x^T`` ``[N, N]``.

    Returns:
        Tensor ``[depth, N, N, N, N]`` (float64).
    """
    return finite_width_tensors(activation, C_b, C_W, x, depth, widths=widths, gram=gram).V


def kernel_nlo_correction(
    activation: str | Callable | Activation,
    C_b: Hyper,
    C_W: Hyper,
    x: Tensor | None,
    depth: int,
    *,
    widths: Sequence[int] | None = None,
    gram: Tensor | None = None,
) -> Tensor:
    r"""NLO metric :math:`G^{\{1\}(\ell)}_{\alpha_1\alpha_2}`: :math:`\mathbb E[z_{i;\alpha_1}z_{i;\alpha_2}]
    = K^{(\ell)}_{\alpha_1\alpha_2} + G^{\{1\}(\ell)}_{\alpha_1\alpha_2}/n_{\ell-1} + O(1/n^2)`.

    Recursion (4.115) (single input (5.110)–(5.111)), :math:`G^{\{1\}(1)} = 0`. Finite-width
    shifts of the hyperparameters (e.g. the renormalised :math:`C_W = (1 + 2/(3n))/\sigma_1^2`
    of (5.142)) are included by passing the shifted values: :math:`K` is then computed with them.
    Scale-invariant activations give :math:`G^{\{1\}} = 0` on the diagonal (5.117).

    Returns:
        Tensor ``[depth, N, N]``.
    """
    return finite_width_tensors(activation, C_b, C_W, x, depth, widths=widths, gram=gram, nlo=True).G1


@dataclass(frozen=True)
class NTKVariance:
    r"""NTK variance tensors (8.82): ``A[l, a1, a2, a3, a4]`` = :math:`A_{(\alpha_1\alpha_2)(\alpha_3\alpha_4)}`,
    ``B[l, a1, a3, a2, a4]`` = :math:`B_{\alpha_1\alpha_3\alpha_2\alpha_4}`, both ``[depth, N, N, N, N]``.

    Single input: :math:`\mathrm{Var}(\hat H_{ii}) = (A+2B)/n`, :math:`\mathrm{Cov}(\hat H_{ii},
    \hat H_{jj}) = A/n`, :math:`\mathbb E[\hat H_{ij}^2] = B/n` with :math:`n = n_{\ell-1}`.
    """

    A: Tensor
    B: Tensor


@dataclass(frozen=True)
class NTKPreactivationCross:
    r"""NTK–preactivation cross-correlations (8.67): ``D[l, a1, a2, a3, a4]`` = :math:`D_{\alpha_1\alpha_2\alpha_3\alpha_4}`,
    ``F[l, a1, a3, a2, a4]`` = :math:`F_{\alpha_1\alpha_3\alpha_2\alpha_4}`, both ``[depth, N, N, N, N]``.

    Single input: :math:`\mathbb E[z_i^2\widehat{\Delta H}_{jj}] = D/n`, :math:`\mathbb E[z_iz_j\hat H_{ij}] = F/n`.
    """

    D: Tensor
    F: Tensor


def ntk_variance(
    activation: str | Callable | Activation,
    C_b: Hyper,
    C_W: Hyper,
    lambda_b: Hyper,
    lambda_W: Hyper,
    x: Tensor | None,
    depth: int,
    *,
    widths: Sequence[int] | None = None,
    gram: Tensor | None = None,
) -> NTKVariance:
    r"""NTK variance tensors :math:`A^{(\ell)}, B^{(\ell)}` for several inputs, (8.89), (8.97).

    .. math::
        B'_{\alpha_1\alpha_3\alpha_2\alpha_4} = C_W^2\big[\langle\sigma'_{\alpha_1}\sigma'_{\alpha_2}
        \sigma'_{\alpha_3}\sigma'_{\alpha_4}\rangle\Theta_{\alpha_1\alpha_2}\Theta_{\alpha_3\alpha_4}
        + r\langle\sigma'_{\alpha_1}\sigma'_{\alpha_3}\rangle\langle\sigma'_{\alpha_2}\sigma'_{\alpha_4}\rangle
        B_{\alpha_1\alpha_3\alpha_2\alpha_4}\big] \qquad (8.89)

    and :math:`A'` by (8.97) (mixes with :math:`V` and :math:`D`). Single input: (9.15), (9.16).
    :math:`A^{(1)} = B^{(1)} = 0` (9.17).

    Returns:
        :class:`NTKVariance` with ``[depth, N, N, N, N]`` tensors.
    """
    t = finite_width_tensors(activation, C_b, C_W, x, depth, lambda_b=lambda_b, lambda_W=lambda_W,
                             widths=widths, gram=gram, ntk=True)
    return NTKVariance(A=t.A, B=t.B)


def ntk_preactivation_cross(
    activation: str | Callable | Activation,
    C_b: Hyper,
    C_W: Hyper,
    lambda_b: Hyper,
    lambda_W: Hyper,
    x: Tensor | None,
    depth: int,
    *,
    widths: Sequence[int] | None = None,
    gram: Tensor | None = None,
) -> NTKPreactivationCross:
    r"""NTK–preactivation cross-correlation tensors :math:`D^{(\ell)}, F^{(\ell)}`, (8.77), (8.79).

    .. math::
        F'_{\alpha_1\alpha_3\alpha_2\alpha_4} = C_W^2\langle\sigma_{\alpha_1}\sigma_{\alpha_2}
        \sigma'_{\alpha_3}\sigma'_{\alpha_4}\rangle\Theta_{\alpha_3\alpha_4} + rC_W^2\sum
        \langle\partial_{\gamma_1}(\sigma_{\alpha_1}\sigma'_{\alpha_3})\rangle
        \langle\partial_{\gamma_2}(\sigma_{\alpha_2}\sigma'_{\alpha_4})\rangle
        F_{\gamma_1\alpha_3\gamma_2\alpha_4} \qquad (8.79)

    and :math:`D'` by (8.77). Single input: (9.13), (9.14); :math:`D^{(1)} = F^{(1)} = 0`.

    Returns:
        :class:`NTKPreactivationCross` with ``[depth, N, N, N, N]`` tensors.
    """
    t = finite_width_tensors(activation, C_b, C_W, x, depth, lambda_b=lambda_b, lambda_W=lambda_W,
                             widths=widths, gram=gram, ntk=True)
    return NTKPreactivationCross(D=t.D, F=t.F)


@dataclass(frozen=True)
class DNTKStatistics:
    r"""dNTK–preactivation cross-correlations, single input (11.55)–(11.56): ``P``, ``Q`` ``[depth, N]``.

    :math:`\mathbb E[\widehat{dH}_{ijj}z_i] = P/n`, :math:`\mathbb E[\widehat{dH}_{iij}z_j] = Q/n`
    (:math:`i \ne j`), :math:`\mathbb E[\widehat{dH}_{iii}z_i] = (P+2Q)/n`, :math:`n = n_{\ell-1}`.
    """

    P: Tensor
    Q: Tensor


def dntk_statistics(
    activation: str | Callable | Activation,
    C_b: Hyper,
    C_W: Hyper,
    lambda_b: Hyper,
    lambda_W: Hyper,
    x: Tensor | None,
    depth: int,
    *,
    widths: Sequence[int] | None = None,
    gram: Tensor | None = None,
) -> DNTKStatistics:
    r"""dNTK tensors :math:`P^{(\ell)}, Q^{(\ell)}` for each input (single-input recursions).

    .. math::
        P' &= C_W^2\langle\sigma''\sigma'\sigma'\sigma\rangle\Theta^2 + r\big[C_W\chi_\perp
            \langle\sigma''\sigma\rangle(B + P) + \chi_\perp^2P\big] && (11.55)\\
        Q' &= C_W^2\langle\sigma''\sigma'\sigma'\sigma\rangle\Theta^2 + \tfrac{\lambda_W}{C_W}F'
            + 2rh\chi_\parallel\Theta F + r\big[C_W\chi_\perp\langle\sigma''\sigma\rangle
            + \chi_\perp^2\big]Q && (11.56)

    :math:`P^{(1)} = Q^{(1)} = 0` (11.57). Multi-input (11.49)/(11.52) is not implemented.

    Returns:
        :class:`DNTKStatistics` with ``[depth, N]`` tensors.
    """
    t = single_input_recursions(activation, C_b, C_W, x, depth, lambda_b=lambda_b, lambda_W=lambda_W,
                                widths=widths, gram=gram)
    return DNTKStatistics(P=t.P, Q=t.Q)


# ============================================================================ closed forms
@dataclass(frozen=True)
class CriticalClosedForms:
    r"""The book's closed forms at criticality, per layer (tensors ``[len(layers)]``).

    Attributes:
        universality_class: ``"scale-invariant"`` or ``"K*=0"``.
        exact_in_depth: for the scale-invariant class the forms of K, Θ, V, G1, D, F, B, P, Q
            are exact at every layer (leading order in 1/n); ``A`` is its leading :math:`\ell^3`
            term (9.52). For the :math:`K^\star = 0` class all are large-:math:`\ell` asymptotics.
        layers, K, Theta, V, G1, A, B, D, F, P, Q: see :class:`SingleInputTheory`.
        coefficients: the :math:`\ell/n` coefficients of the normalised ratios (e.g.
            ``"V/(nK^2)"``: 5 for ReLU, 2/3 for tanh), (5.130), (5.131), (11.81), (11.100), (11.102).
    """

    universality_class: str
    exact_in_depth: bool
    layers: Tensor
    K: Tensor
    Theta: Tensor
    V: Tensor
    G1: Tensor
    A: Tensor
    B: Tensor
    D: Tensor
    F: Tensor
    P: Tensor
    Q: Tensor
    coefficients: dict[str, float]


def critical_closed_forms(
    activation: str | Callable | Activation,
    layers: Sequence[int] | Tensor,
    *,
    K_star: float | None = None,
    lambda_b: float = 1.0,
    lambda_W: float = 1.0,
) -> CriticalClosedForms:
    r"""Closed-form finite-width tensors at criticality, per universality class.

    **Scale-invariant** (:math:`C_b = 0`, :math:`C_W = 1/A_2`, uniform :math:`\lambda_b, \lambda_W`,
    :math:`K = K^\star`): :math:`V = (\ell-1)(3A_4/A_2^2-1)K^{\star2}` (5.120),
    :math:`\Theta = (\lambda_b + \lambda_WA_2K^\star)\ell` (9.44), :math:`D, F, B, A` (9.49)–(9.52),
    :math:`G^{\{1\}} = 0` (5.117), :math:`P = 0` (11.74), and (11.79) with
    :math:`\tilde\lambda = L\lambda`: :math:`Q = \tfrac{\ell(\ell^2-1)}{6}\tfrac{A_4}{A_2}
    (\lambda_b + \lambda_WA_2K^\star)\lambda_WK^\star`.

    **K* = 0 class** (:math:`C_b = 0`, :math:`C_W = 1/\sigma_1^2`, learning rates (9.70)
    :math:`\lambda_b^{(\ell)} = \tilde\lambda_b\ell^{-p_\perp}`, :math:`\lambda_W^{(\ell)} =
    \tilde\lambda_W\ell^{1-p_\perp}`; here ``lambda_b``, ``lambda_W`` are the tildes):
    :math:`K = 1/((-a_1)\ell)` (5.92), :math:`V = 2/(3a_1^2\ell)` (5.127),
    :math:`G^{\{1\}} = -1/(3(-a_1))` (5.134), :math:`\Theta = \tilde\Theta\ell^{1-p_\perp}` (9.71),
    :math:`F, B, D, A` (9.81)–(9.86), :math:`P, Q` (11.98), (11.101) (without the :math:`L`
    factors of (9.95)), with :math:`\tilde\Theta = \tilde\lambda_b + \tilde\lambda_W\sigma_1^2/(-a_1)`,
    :math:`p_\perp = b_1/a_1`, :math:`a_1, b_1` of (5.86), (5.88).

    Args:
        activation: a scale-invariant (ReLU, leaky ReLU, linear) or K*=0-class (tanh, sin, erf, ...) activation.
        layers: layer indices :math:`\ell \ge 1`.
        K_star: fixed-point kernel for the scale-invariant class (:math:`K^{(1)}`); required there.
        lambda_b, lambda_W: uniform rates (scale-invariant) or :math:`\tilde\lambda` (K*=0 class).

    Returns:
        :class:`CriticalClosedForms`.

    Raises:
        ValueError: activation in neither class (e.g. SWISH/GELU: their half-stable points have
            no closed forms), or missing ``K_star``.
    """
    act = _activation(activation)
    l = torch.as_tensor(layers, dtype=_DTYPE)
    if l.dim() == 0:
        l = l[None]
    if bool((l < 1).any()):
        raise ValueError(f"layers must be >= 1, got {l.tolist()}.")
    lb, lw = float(lambda_b), float(lambda_W)
    if act.slopes is not None:
        if K_star is None:
            raise ValueError("the scale-invariant class needs K_star = K^(1) = C_W * x.x/n0 (the preserved kernel).")
        Ks = float(K_star)
        A2, A4 = act.A2, act.A4
        nu = 3 * A4 / A2**2 - 1
        th1 = lb + lw * A2 * Ks
        r4 = A4 / A2**2
        K = torch.full_like(l, Ks)
        Th = th1 * l
        V = (l - 1) * nu * Ks**2
        D = l * (l - 1) / 2 * (lb * (r4 - 1) * Ks + lw * A2 * (4 * r4 - 2) * Ks**2)
        F = l * (l - 1) / 2 * r4 * th1 * Ks
        B = l * (l - 1) * (2 * l - 1) / 6 * r4 * th1**2
        A = l**3 / 3 * ((r4 - 1) * lb**2 + 3 * (r4 - 1) * lb * lw * A2 * Ks + (5 * A4 - 3 * A2**2) * lw**2 * Ks**2)
        Q = l * (l * l - 1) / 6 * (A4 / A2) * th1 * lw * Ks
        zero = torch.zeros_like(l)
        coeffs = {
            "V/(nK^2)": nu,
            "B/(nTheta^2)": r4 / 3,
            "F/(nKTheta)": r4 / 2,
            "D/(nKTheta)": 0.5 * (lb * (r4 - 1) + lw * A2 * Ks * (4 * r4 - 2)) / th1,
            "A/(nTheta^2)": ((r4 - 1) * lb**2 + 3 * (r4 - 1) * lb * lw * A2 * Ks + (5 * A4 - 3 * A2**2) * lw**2 * Ks**2) / (3 * th1**2),
            "P/(nTheta^2)": 0.0,
            "Q/(nTheta^2)": (A4 / (6 * A2)) * lw * Ks / th1,
        }
        return CriticalClosedForms("scale-invariant", True, l, K, Th, V, zero, A, B, D, F, zero, Q, coeffs)
    t = act.taylor
    if t is None or abs(t[0]) > 1e-12 or abs(t[1]) < 1e-12:
        raise ValueError(
            f"{act.key} is in neither the scale-invariant nor the K*=0 class (needs sigma(0) = 0 and "
            f"sigma'(0) != 0, (5.89)); closed forms exist only for these. Use single_input_recursions."
        )
    s1, s2, s3 = t[1], t[2], t[3]
    a1 = s3 / s1 + 0.75 * (s2 / s1) ** 2
    b1 = s3 / s1 + (s2 / s1) ** 2
    if not a1 < 0:
        raise ValueError(
            f"{act.key} has a1 = {a1:.6g} >= 0: its K*=0 fixed point is unstable (5.92) (half-stable class, e.g. "
            "SWISH/GELU, whose critical point K* > 0 has no closed forms in the book); use single_input_recursions."
        )
    p = b1 / a1
    ma1 = -a1
    th = lb + lw * s1**2 / ma1
    X = p * lb + (p - 1) * lw * s1**2 / ma1
    K = 1.0 / (ma1 * l)
    V = 2.0 / (3 * a1**2 * l)
    G1 = torch.full_like(l, -1.0 / (3 * ma1))
    Th = th * l ** (1 - p)
    F = th / ((5 - p) * ma1) * l ** (1 - p)
    B = th**2 / 3 * l ** (3 - 2 * p)
    D = -2.0 / (9 * ma1) * X * l ** (1 - p)
    A = 4.0 / 27 * X**2 * l ** (3 - 2 * p)
    P = -(1.0 / 3) * (2 - p) / (5 - p) * th**2 * l ** (3 - 2 * p)
    Q = (1 - p - lb / th) / (5 - p) ** 2 * th**2 * l ** (3 - 2 * p)
    coeffs = {
        "V/(nK^2)": 2.0 / 3,
        "B/(nTheta^2)": 1.0 / 3,
        "F/(nKTheta)": 1.0 / (5 - p),
        "D/(nKTheta)": -2.0 / 9 * X / th,
        "A/(nTheta^2)": 4.0 / 27 * (X / th) ** 2,
        "P/(nTheta^2)": -(1.0 / 3) * (2 - p) / (5 - p),
        "Q/(nTheta^2)": (1 - p - lb / th) / (5 - p) ** 2,
    }
    return CriticalClosedForms("K*=0", False, l, K, Th, V, G1, A, B, D, F, P, Q, coeffs)


# ============================================================================ exact moments
@dataclass(frozen=True)
class ExactMetricMoments:
    r"""Exact mean and variance of the single-input stochastic metric (scale-invariant class).

    Attributes:
        mean: ``[depth, N]`` :math:`\mathbb E[\widehat G^{(\ell)}]` (= :math:`\mathbb E[z^2]`).
        var: ``[depth, N]`` :math:`\mathrm{Var}[\widehat G^{(\ell)}]`.
        V_exact: ``[depth, N]`` :math:`n_{\ell-1}\mathrm{Var}[\widehat G^{(\ell)}]`, the vertex
            *defined* by (4.76) at finite width, to all orders in 1/n (layer 1: 0).
    """

    mean: Tensor
    var: Tensor
    V_exact: Tensor


def exact_metric_moments(
    activation: str | Callable | Activation,
    C_b: Hyper,
    C_W: Hyper,
    x: Tensor | None,
    depth: int,
    *,
    widths: Sequence[int],
    gram: Tensor | None = None,
) -> ExactMetricMoments:
    r"""All-orders single-input metric moments for scale-invariant activations [derived here].

    Given :math:`\widehat G^{(\ell)}`, the preactivations of layer :math:`\ell` are i.i.d.
    :math:`\mathcal N(0, \widehat G^{(\ell)})` (4.69), and for
    :math:`\sigma(z) = a_\pm z`: :math:`\langle\sigma^2\rangle = A_2\widehat G`,
    :math:`\langle\sigma^4\rangle = 3A_4\widehat G^2` (5.60), (9.36). Hence with
    :math:`\chi = C_W A_2`, :math:`\nu = 3A_4/A_2^2 - 1`, :math:`m_1 = \mathbb E\widehat G`,
    :math:`m_2 = \mathbb E\widehat G^2`:

    .. math::
        m_1' = C_b + \chi m_1, \qquad
        m_2' = C_b^2 + 2C_b\chi m_1 + \chi^2(1 + \nu/n_\ell)\,m_2,

    exact at any width (:math:`\widehat G^{(1)} = K^{(1)}` deterministic). At criticality
    :math:`n\mathrm{Var}\widehat G^{(\ell)}/K^2 = n[(1+\nu/n)^{\ell-1} - 1] = \nu(\ell-1) +
    \nu^2(\ell-1)(\ell-2)/(2n) + \dots` — the leading term is (5.120); the second is the
    next-order correction that makes ReLU measurements run above leading order. For the
    linear activation this is the book's exact (3.25).

    Args:
        activation: a piecewise-linear (scale-invariant) activation.
        C_b, C_W: scalars or per layer.
        x: inputs ``[N, n0]``.
        depth: :math:`L`.
        widths: hidden widths :math:`n_1..n_{L-1}` (or :math:`n_0..n_L`); required.
        gram: alternatively the Gram matrix.

    Returns:
        :class:`ExactMetricMoments`.

    Raises:
        ValueError: non-scale-invariant activation.
    """
    act = _activation(activation)
    if act.slopes is None:
        raise ValueError(f"exact metric moments need a scale-invariant (piecewise-linear) activation, got {act.key}.")
    depth = _check_depth(depth)
    g0 = torch.diagonal(_gram(x, gram)).clone()
    Cb, CW = _per_layer(C_b, depth, "C_b"), _per_layer(C_W, depth, "C_W")
    _, hidden = _width_ratios(widths, depth)
    A2, A4 = act.A2, act.A4
    nu = 3 * A4 / A2**2 - 1
    m1 = Cb[0] + CW[0] * g0
    m2 = m1 * m1
    mean = torch.empty((depth,) + g0.shape, dtype=_DTYPE)
    var = torch.empty_like(mean)
    vex = torch.zeros_like(mean)
    for l in range(1, depth + 1):
        mean[l - 1], var[l - 1] = m1, (m2 - m1 * m1).clamp(min=0.0)
        if l >= 2:
            vex[l - 1] = hidden[l - 2] * var[l - 1]
        if l == depth:
            break
        chi = CW[l] * A2
        n_l = hidden[l - 1]
        m1, m2 = Cb[l] + chi * m1, Cb[l] ** 2 + 2 * Cb[l] * chi * m1 + chi**2 * (1 + nu / n_l) * m2
    return ExactMetricMoments(mean=mean, var=var, V_exact=vex)
