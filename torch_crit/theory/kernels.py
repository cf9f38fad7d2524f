r"""Infinite-width kernel and frozen-NTK recursions for a full Gram matrix of inputs.

Kernel recursion (4.118)/(5.1), first layer (4.8)/(5.2):

.. math::
    K^{(1)}_{\alpha\beta} = C_b^{(1)} + C_W^{(1)}\,\frac{1}{n_0}\sum_j x_{j;\alpha}x_{j;\beta},
    \qquad
    K^{(\ell+1)}_{\alpha\beta} = C_b^{(\ell+1)} + C_W^{(\ell+1)}
        \langle\sigma_\alpha\sigma_\beta\rangle_{K^{(\ell)}}.

Frozen NTK (9.5) with the book's learning-rate convention (8.6) (:math:`\lambda_W` multiplies
:math:`1/n_{\ell-1}`), first layer (8.23):

.. math::
    \Theta^{(1)}_{\alpha\beta} = \lambda_b^{(1)} + \lambda_W^{(1)}\frac{1}{n_0}\sum_j x_{j;\alpha}x_{j;\beta},\qquad
    \Theta^{(\ell+1)}_{\alpha\beta} = \lambda_b^{(\ell+1)} + \lambda_W^{(\ell+1)}
        \langle\sigma_\alpha\sigma_\beta\rangle_{K^{(\ell)}}
        + C_W^{(\ell+1)}\langle\sigma'_\alpha\sigma'_\beta\rangle_{K^{(\ell)}}\Theta^{(\ell)}_{\alpha\beta}.

Each entry needs only the 2×2 block of :math:`K^{(\ell)}` on its two inputs (after (5.3)); all
:math:`N(N+1)/2` pairs are evaluated at once per layer — closed forms (arc-cosine (5.158)–
(5.161) for ReLU/leaky ReLU/linear, arcsine for erf, sin) or 2-D quadrature
(:func:`~torch_crit.theory.gaussian.expect2`).

Example:
    >>> import torch
    >>> from torch_crit.theory import kernel_recursion
    >>> x = torch.randn(4, 10, dtype=torch.float64)
    >>> K = kernel_recursion("relu", 0.0, 2.0, x, depth=5)
    >>> K.shape
    torch.Size([5, 4, 4])
    >>> torch.allclose(K[-1].diagonal(), K[0].diagonal())   # criticality preserves norms (5.66)
    True
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from .activations import Activation, get_activation
from .gaussian import expect1, expect2

__all__ = [
    "KernelStacks",
    "kernel_recursion",
    "ntk_recursion",
    "kernel_and_ntk_recursion",
    "pair_expectations",
    "input_gram",
]

Scalars = float | Sequence[float] | Tensor


@dataclass(frozen=True)
class KernelStacks:
    r"""Kernel and frozen-NTK stacks over depth.

    Attributes:
        K: ``[depth, N, N]``, ``K[l-1]`` = :math:`K^{(\ell)}`.
        Theta: ``[depth, N, N]``, ``Theta[l-1]`` = :math:`\Theta^{(\ell)}` (book λ convention).
    """

    K: Tensor
    Theta: Tensor


# ------------------------------------------------------------------------------ validation
def _depth(depth: Any) -> int:
    if depth is None:
        raise TypeError("depth is required: the number of layers L (>= 1) to recurse through.")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an int >= 1 (number of layers), got {depth!r}.")
    return depth


def _per_layer(value: Scalars, depth: int, name: str, *, allow_zero: bool = True) -> Tensor:
    """Scalar or length-``depth`` sequence -> float64 tensor [depth]."""
    t = torch.as_tensor(value.detach() if isinstance(value, Tensor) else value, dtype=torch.float64)
    if t.dim() == 0:
        t = t.expand(depth).clone()
    elif t.dim() != 1 or t.numel() != depth:
        raise ValueError(
            f"{name} must be a scalar or a sequence of length depth={depth} (one value per layer "
            f"l = 1..{depth}), got shape {tuple(t.shape)}."
        )
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite, got {t.tolist()}")
    if (t < 0).any():
        raise ValueError(f"{name} must be >= 0 (a variance or learning rate), got min {float(t.min()):.6g}.")
    return t


def input_gram(x: Tensor) -> Tensor:
    r"""The input Gram :math:`\frac{1}{n_0}\sum_j x_{j;\alpha}x_{j;\beta}` of ``x [N, n0]`` -> ``[N, N]``."""
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x, dtype=torch.float64)
    if x.dim() == 1:
        x = x[None, :]
    if x.dim() != 2:
        raise ValueError(f"x must have shape [N, n0] (N inputs of dimension n0), got {tuple(x.shape)}.")
    if not torch.isfinite(x).all():
        raise ValueError("x contains non-finite values.")
    xd = x.detach().to(torch.float64)
    return xd @ xd.T / xd.shape[1]


def _check_gram(gram: Tensor) -> Tensor:
    g = torch.as_tensor(gram.detach() if isinstance(gram, Tensor) else gram, dtype=torch.float64)
    if g.dim() == 0:
        g = g.reshape(1, 1)
    if g.dim() != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"gram must be a square [N, N] matrix (x x^T / n0), got shape {tuple(g.shape)}.")
    if not torch.isfinite(g).all():
        raise ValueError("gram contains non-finite values.")
    scale = float(g.abs().max()) if g.numel() else 0.0
    if float((g - g.T).abs().max()) > 1e-10 * max(scale, 1e-300):
        raise ValueError("gram must be symmetric; got max |G - G^T| = "
                         f"{float((g - g.T).abs().max()):.3g}. Pass x x^T / n0.")
    g = 0.5 * (g + g.T)
    if g.shape[0] > 0:
        lmin = float(torch.linalg.eigvalsh(g)[0])
        if lmin < -1e-10 * max(scale, 1e-300):
            raise ValueError(
                f"gram must be positive semi-definite (it is x x^T / n0); its smallest eigenvalue is "
                f"{lmin:.6g}. Build it from actual inputs or pass x instead."
            )
    return g


def _initial(x: Tensor | None, gram: Tensor | None) -> tuple[Tensor, torch.dtype]:
    if (x is None) == (gram is None):
        raise TypeError("pass exactly one of x ([N, n0] inputs) or gram= ([N, N] = x x^T / n0).")
    src = x if x is not None else gram
    dtype = src.dtype if isinstance(src, Tensor) and src.is_floating_point() else torch.float64
    g = input_gram(x) if x is not None else _check_gram(gram)
    return g, dtype


# ------------------------------------------------------------------------------ pair expectations
def _pl_pair(ap: float, am: float, K: Tensor, want_prime: bool) -> tuple[Tensor, Tensor | None]:
    """Arc-cosine kernels (5.159), (5.161) for a full Gram K [N, N] (fast path, exact diagonal).

    Works on the full matrix (gathering/scattering the upper triangle costs more than the
    transcendental functions it would save); about ten passes over N^2 doubles per call.
    """
    A2 = 0.5 * (ap * ap + am * am)
    d2 = (ap - am) ** 2
    if d2 == 0.0:
        return A2 * K, (torch.full_like(K, A2) if want_prime else None)
    n = torch.sqrt(torch.clamp(K.diagonal(), min=0.0))
    pos = n > 0
    inv = torch.where(pos, 1.0 / torch.where(pos, n, torch.ones_like(n)), torch.zeros_like(n))
    c = K * torch.outer(inv, inv)  # cos(psi); 0 for zero-variance inputs (their products vanish)
    c.clamp_(-1.0, 1.0)
    c.diagonal().copy_(pos.to(c.dtype))
    psi = torch.acos(c)
    s = torch.addcmul(torch.ones_like(c), c, c, value=-1.0).clamp_(min=0.0).sqrt_()  # sin(psi)
    # A2 K + (d2 / 2 pi) |x||y| (sin psi - psi cos psi)
    ss = torch.addcmul(s, psi, c, value=-1.0).mul_(torch.outer(n * (d2 / (2 * math.pi)), n)).add_(K, alpha=A2)
    sp = psi.mul_(-d2 / (2 * math.pi)).add_(A2) if want_prime else None
    return ss, sp


def pair_expectations(
    activation: Any, K: Tensor, orders: Sequence[int] = (0,), *, n_nodes: int | None = None
) -> list[Tensor]:
    r"""All pairwise :math:`\langle\sigma^{(k)}_\alpha\sigma^{(k)}_\beta\rangle_K` for a Gram ``K [N, N]``.

    Args:
        activation: anything :func:`get_activation` accepts.
        K: kernel ``[N, N]`` (symmetric PSD), float64.
        orders: derivative orders :math:`k` to compute (0: :math:`\sigma\sigma`, 1: :math:`\sigma'\sigma'`).
        n_nodes: quadrature nodes per panel (2-D), when no closed form exists.

    Returns:
        One ``[N, N]`` tensor per order.
    """
    act = activation if isinstance(activation, Activation) else get_activation(activation)
    if act.slopes is not None and set(orders) <= {0, 1}:
        ss, sp = _pl_pair(act.slopes[0], act.slopes[1], K, 1 in orders)
        return [ss if o == 0 else sp for o in orders]
    N = K.shape[0]
    d = K.diagonal()
    iu = torch.triu_indices(N, N, offset=1)
    out = []
    for o in orders:
        f = act.fn(o)
        form = act.pair_closed_form(o, o)
        if form is not None:
            M = form(d[:, None], K, d[None, :])
            M = 0.5 * (M + M.T)
            M.diagonal().copy_(form(d, d, d))
            out.append(M)
            continue
        M = torch.empty_like(K)
        M.diagonal().copy_(expect1(lambda z, f=f: f(z) ** 2, d, kinks=act.kinks))
        if iu.shape[1]:
            vals = expect2(f, f, d[iu[0]], K[iu[0], iu[1]], d[iu[1]], n_nodes=n_nodes)
            M[iu[0], iu[1]] = vals
            M[iu[1], iu[0]] = vals
        out.append(M)
    return out


# ------------------------------------------------------------------------------ recursions
def _recurse(
    act: Activation,
    C_b: Tensor,
    C_W: Tensor,
    gram: Tensor,
    depth: int,
    *,
    lambda_b: Tensor | None = None,
    lambda_W: Tensor | None = None,
    gamma: Tensor | None = None,
    n_nodes: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Shared core of the plain and residual (B.11) recursions; float64 throughout."""
    N = gram.shape[0]
    Ks = torch.empty(depth, N, N, dtype=torch.float64)
    Ks[0] = C_b[0] + C_W[0] * gram
    Th = None
    if lambda_b is not None:
        Th = torch.empty(depth, N, N, dtype=torch.float64)
        Th[0] = lambda_b[0] + lambda_W[0] * gram
    orders = (0, 1) if Th is not None else (0,)
    for l in range(1, depth):
        K = Ks[l - 1]
        pe = pair_expectations(act, K, orders, n_nodes=n_nodes)
        out = Ks[l]
        torch.mul(pe[0], C_W[l], out=out).add_(C_b[l])
        if gamma is not None:
            out.add_(K, alpha=float(gamma[l]) ** 2)
        if Th is not None:
            chi = pe[1].mul_(C_W[l])
            if gamma is not None:
                chi.add_(float(gamma[l]) ** 2)
            torch.mul(chi, Th[l - 1], out=Th[l]).add_(pe[0], alpha=float(lambda_W[l])).add_(lambda_b[l])
        if l % 64 == 0 and not bool(torch.isfinite(out).all()):
            _overflow(l + 1)
    for stack in (Ks, Th):
        if stack is not None:
            bad = ~torch.isfinite(stack.reshape(depth, -1)).all(1)
            if bool(bad.any()):
                _overflow(int(torch.nonzero(bad)[0]) + 1)
    return Ks, Th


def _overflow(layer: int) -> None:
    raise ValueError(
        f"the recursion overflowed at layer {layer}: the kernel explodes for these "
        "hyperparameters (chi > 1). Use critical_point(activation) for C_b, C_W."
    )


def kernel_recursion(
    activation: Any,
    C_b: Scalars,
    C_W: Scalars,
    x: Tensor | None = None,
    depth: int | None = None,
    *,
    gram: Tensor | None = None,
    n_nodes: int | None = None,
) -> Tensor:
    r"""Infinite-width kernel :math:`K^{(\ell)}` for :math:`\ell = 1..L` (4.118), (5.1)–(5.2).

    Args:
        activation: name, ``nn.Module``, callable or :class:`Activation`.
        C_b: bias variance, scalar or per-layer sequence of length ``depth`` (``C_b^(1..L)``).
        C_W: rescaled weight variance, scalar or sequence of length ``depth``.
        x: inputs ``[N, n0]`` (or ``[n0]`` for one input); mutually exclusive with ``gram``.
        depth: number of layers :math:`L \ge 1`.
        gram: precomputed :math:`x x^\top / n_0`, ``[N, N]`` symmetric PSD.
        n_nodes: 2-D quadrature nodes per panel for activations without a closed form.

    Returns:
        ``[depth, N, N]``; entry ``[l-1]`` is :math:`K^{(\ell)}`. dtype of ``x``/``gram``
        (computed in float64).

    Raises:
        ValueError: depth < 1, wrong sequence lengths, negative variances, non-PSD gram,
            overflow (exploding kernel).
    """
    L = _depth(depth)
    act = activation if isinstance(activation, Activation) else get_activation(activation)
    g, dtype = _initial(x, gram)
    Ks, _ = _recurse(act, _per_layer(C_b, L, "C_b"), _per_layer(C_W, L, "C_W"), g, L, n_nodes=n_nodes)
    return Ks.to(dtype)


def kernel_and_ntk_recursion(
    activation: Any,
    C_b: Scalars,
    C_W: Scalars,
    lambda_b: Scalars,
    lambda_W: Scalars,
    x: Tensor | None = None,
    depth: int | None = None,
    *,
    gram: Tensor | None = None,
    n_nodes: int | None = None,
) -> KernelStacks:
    r"""Kernel (4.118) and frozen NTK (9.5) stacks in one pass.

    Args:
        activation, C_b, C_W, x, depth, gram, n_nodes: as :func:`kernel_recursion`.
        lambda_b: bias learning rates :math:`\lambda_b^{(\ell)}` (8.6), scalar or length ``depth``.
        lambda_W: weight learning rates :math:`\lambda_W^{(\ell)}` (the optimizer's rate for
            :math:`W^{(\ell)}` is :math:`\eta\lambda_W^{(\ell)}/n_{\ell-1}`), scalar or length ``depth``.

    Returns:
        :class:`KernelStacks` with ``K`` and ``Theta``, each ``[depth, N, N]``.
    """
    L = _depth(depth)
    act = activation if isinstance(activation, Activation) else get_activation(activation)
    g, dtype = _initial(x, gram)
    Ks, Th = _recurse(
        act, _per_layer(C_b, L, "C_b"), _per_layer(C_W, L, "C_W"), g, L,
        lambda_b=_per_layer(lambda_b, L, "lambda_b"), lambda_W=_per_layer(lambda_W, L, "lambda_W"),
        n_nodes=n_nodes,
    )
    return KernelStacks(K=Ks.to(dtype), Theta=Th.to(dtype))


def ntk_recursion(
    activation: Any,
    C_b: Scalars,
    C_W: Scalars,
    lambda_b: Scalars,
    lambda_W: Scalars,
    x: Tensor | None = None,
    depth: int | None = None,
    *,
    gram: Tensor | None = None,
    n_nodes: int | None = None,
) -> Tensor:
    r"""Frozen NTK :math:`\Theta^{(\ell)}`, :math:`\ell = 1..L` (9.5), (8.23); ``[depth, N, N]``.

    The empirical NTK :math:`\hat H = J\Lambda J^\top` of a network with weights' learning
    rates :math:`\lambda_W^{(\ell)}/n_{\ell-1}` and biases' :math:`\lambda_b^{(\ell)}` (8.7)
    converges to it as the width grows. See :func:`kernel_and_ntk_recursion` for arguments.
    """
    return kernel_and_ntk_recursion(
        activation, C_b, C_W, lambda_b, lambda_W, x, depth, gram=gram, n_nodes=n_nodes
    ).Theta
