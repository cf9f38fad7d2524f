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
:math:`N(N-1)/2` distinct pairs (plus the :math:`N` variances) are evaluated at once per layer
— closed forms (arc-cosine (5.158)–(5.161) for ReLU/leaky ReLU/linear, arcsine for erf, sin)
or 2-D quadrature (:func:`~torch_crit.theory.gaussian.expect2`, one shared grid for smooth
built-ins). The recursion state is packed (diagonal ``[N]`` + strict upper triangle
``[N(N-1)/2]``): each pair's transcendental functions are evaluated once per layer, and each
layer is written to the ``[depth, N, N]`` output once, exactly symmetric.

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
from functools import lru_cache
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
@lru_cache(maxsize=8)
def _triu(N: int) -> tuple[Tensor, Tensor]:
    """Row/column indices ``ii < jj`` of the strict upper triangle, ``[N(N-1)/2]`` each (cached)."""
    iu = torch.triu_indices(N, N, offset=1)
    return iu[0].contiguous(), iu[1].contiguous()


def _pl_pair_packed(
    ap: float, am: float, d: Tensor, Kp: Tensor, ii: Tensor, jj: Tensor, want_prime: bool
) -> list[tuple[Tensor, Tensor]]:
    r"""Arc-cosine kernels (5.159), (5.161) on packed pairs (fast path, exact diagonal).

    Args:
        ap, am: slopes :math:`a_\pm`.
        d: diagonal :math:`K_{\alpha\alpha}`, ``[N]``.
        Kp: off-diagonal entries :math:`K_{\alpha\beta}` for ``(ii, jj)``, ``[P]``.
        ii, jj: pair indices, ``[P]``.
        want_prime: also return :math:`\langle\sigma'\sigma'\rangle`.

    Returns:
        ``[(diag [N], off [P])]`` for order 0, then order 1 if requested. Only the ``P``
        distinct pairs are touched: one ``acos`` and one ``sqrt`` per pair and layer.
    """
    A2 = 0.5 * (ap * ap + am * am)
    d2 = (ap - am) ** 2
    if d2 == 0.0:
        out = [(A2 * d, A2 * Kp)]
        if want_prime:
            out.append((torch.full_like(d, A2), torch.full_like(Kp, A2)))
        return out
    n = torch.sqrt(torch.clamp(d, min=0.0))
    pos = n > 0
    nn = torch.index_select(n, 0, ii).mul_(torch.index_select(n, 0, jj))  # sqrt(K11 K22)
    if bool(pos.all()):
        c = torch.div(Kp, nn)
    else:  # cos(psi) := 0 for zero-variance inputs (their products vanish)
        c = torch.where(nn > 0, Kp / torch.where(nn > 0, nn, torch.ones_like(nn)), torch.zeros_like(nn))
    c.clamp_(-1.0, 1.0)
    psi = torch.acos(c)
    s = torch.addcmul(torch.ones_like(c), c, c, value=-1.0).clamp_(min=0.0).sqrt_()  # sin(psi)
    # A2 K + (d2 / 2 pi) |x||y| (sin psi - psi cos psi); on the diagonal psi = 0: A2 K
    ss = torch.addcmul(s, psi, c, value=-1.0).mul_(nn).mul_(d2 / (2 * math.pi)).add_(Kp, alpha=A2)
    out = [(A2 * d, ss)]
    if want_prime:
        # psi = 0 on the diagonal, pi/2 where the variance vanishes (convention of _angle)
        dp = torch.where(pos, torch.full_like(d, A2), torch.full_like(d, A2 - d2 / 4))
        out.append((dp, psi.mul_(-d2 / (2 * math.pi)).add_(A2)))
    return out


def _pairs_packed(
    act: Activation, d: Tensor, Kp: Tensor, ii: Tensor, jj: Tensor, orders: Sequence[int],
    n_nodes: int | None,
) -> list[tuple[Tensor, Tensor]]:
    """``[(diag [N], off [P])]`` of :math:`\\langle\\sigma^{(k)}\\sigma^{(k)}\\rangle` per order ``k``."""
    if act.slopes is not None and set(orders) <= {0, 1}:
        pl = _pl_pair_packed(act.slopes[0], act.slopes[1], d, Kp, ii, jj, 1 in orders)
        return [pl[o] for o in orders]
    out = []
    di, dj = torch.index_select(d, 0, ii), torch.index_select(d, 0, jj)
    for o in orders:
        f = act.fn(o)
        form = act.pair_closed_form(o, o)
        if form is not None:
            out.append((form(d, d, d), form(di, Kp, dj)))
            continue
        diag = expect1(lambda z, f=f: f(z) ** 2, d, kinks=act.kinks)
        off = expect2(f, f, di, Kp, dj, n_nodes=n_nodes) if Kp.numel() else Kp.clone()
        out.append((diag, off))
    return out


def _unpack(diag: Tensor, off: Tensor, ii: Tensor, jj: Tensor, out: Tensor | None = None) -> Tensor:
    """Symmetric ``[N, N]`` (or ``[..., N, N]`` for stacked ``[..., N]``/``[..., P]``) from packed parts."""
    N = diag.shape[-1]
    if out is None:
        out = torch.empty(diag.shape[:-1] + (N, N), dtype=diag.dtype, device=diag.device)
    flat = out.view(diag.shape[:-1] + (N * N,))
    flat[..., ii * N + jj] = off
    flat[..., jj * N + ii] = off
    out.diagonal(dim1=-2, dim2=-1).copy_(diag)
    return out


def pair_expectations(
    activation: Any, K: Tensor, orders: Sequence[int] = (0,), *, n_nodes: int | None = None
) -> list[Tensor]:
    r"""All pairwise :math:`\langle\sigma^{(k)}_\alpha\sigma^{(k)}_\beta\rangle_K` for a Gram ``K [N, N]``.

    Each of the :math:`N(N-1)/2` distinct pairs is evaluated once, from the upper triangle of
    ``K``; the result is exactly symmetric.

    Args:
        activation: anything :func:`get_activation` accepts.
        K: kernel ``[N, N]`` (symmetric PSD), float64.
        orders: derivative orders :math:`k` to compute (0: :math:`\sigma\sigma`, 1: :math:`\sigma'\sigma'`).
        n_nodes: quadrature nodes per panel (2-D), when no closed form exists.

    Returns:
        One ``[N, N]`` tensor per order.
    """
    act = activation if isinstance(activation, Activation) else get_activation(activation)
    ii, jj = _triu(K.shape[0])
    pe = _pairs_packed(act, K.diagonal(), K[ii, jj], ii, jj, orders, n_nodes)
    return [_unpack(dg, off, ii, jj) for dg, off in pe]


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
    """Shared core of the plain and residual (B.11) recursions; float64 throughout.

    The recursion runs on packed storage (diagonal ``[N]`` + strict upper triangle
    ``[N(N-1)/2]``), each pair once per layer; the ``[depth, N, N]`` stacks are filled at the end.
    """
    N = gram.shape[0]
    ii, jj = _triu(N)
    up, lo = ii * N + jj, jj * N + ii
    orders = (0, 1) if lambda_b is not None else (0,)
    cb, cw = C_b.tolist(), C_W.tolist()
    lb = lambda_b.tolist() if lambda_b is not None else None
    lw = lambda_W.tolist() if lambda_W is not None else None
    g2 = [float(v) ** 2 for v in gamma.tolist()] if gamma is not None else None
    Ks = torch.empty(depth, N, N, dtype=torch.float64)
    Th = torch.empty(depth, N, N, dtype=torch.float64) if lb is not None else None

    buf = torch.empty(N, N, dtype=torch.float64)  # cache-resident scatter target
    bflat = buf.view(-1)

    def store(stack: Tensor, l: int, dg: Tensor, off: Tensor) -> None:
        bflat.scatter_(0, up, off)
        bflat.scatter_(0, lo, off)
        buf.diagonal().copy_(dg)
        stack[l].copy_(buf)  # one streaming write into the (large) output stack

    gd, gp = gram.diagonal(), gram[ii, jj]
    k_cur = [C_b[0] + C_W[0] * gd, C_b[0] + C_W[0] * gp]  # packed state: diagonal [N], pairs [P]
    store(Ks, 0, *k_cur)
    t_cur = None
    if Th is not None:
        t_cur = [lambda_b[0] + lambda_W[0] * gd, lambda_b[0] + lambda_W[0] * gp]
        store(Th, 0, *t_cur)
    # sum of a layer is finite iff all its entries are (up to overflow of the sum: rechecked)
    sums = [k_cur[1].sum() + k_cur[0].sum()]
    for l in range(1, depth):
        pe = _pairs_packed(act, k_cur[0], k_cur[1], ii, jj, orders, n_nodes)
        k_new = []
        for part in (0, 1):
            new = pe[0][part].mul(cw[l]).add_(cb[l])
            if g2 is not None:
                new.add_(k_cur[part], alpha=g2[l])
            k_new.append(new)
            if t_cur is not None:
                chi = pe[1][part].mul_(cw[l])
                if g2 is not None:
                    chi.add_(g2[l])
                t_cur[part] = chi.mul_(t_cur[part]).add_(pe[0][part], alpha=lw[l]).add_(lb[l])
        k_cur = k_new
        store(Ks, l, *k_cur)
        if t_cur is not None:
            store(Th, l, *t_cur)
        sums.append(k_cur[1].sum() + k_cur[0].sum())
        if l % 64 == 0 and not math.isfinite(float(sums[-1])) and not bool(torch.isfinite(Ks[l]).all()):
            _overflow(l + 1)
    cand = ~torch.isfinite(torch.stack(sums))
    if Th is not None:
        cand |= ~torch.isfinite(Th.view(depth, -1).sum(1))
    for l in torch.nonzero(cand).reshape(-1).tolist():
        if not (bool(torch.isfinite(Ks[l]).all()) and (Th is None or bool(torch.isfinite(Th[l]).all()))):
            _overflow(l + 1)
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
