r"""Ensemble validation: draw many finite networks at once and compare with the finite-width theory.

:func:`sample_ensemble` draws ``M`` independent MLPs at initialization with *batched* weights
(``W`` of shape ``[M, n_out, n_in]``, one :func:`torch.baddbmm` per layer, processed in chunks of
networks) and measures, per layer :math:`\ell`, with exact per-network quantities:

* the stochastic metric :math:`\widehat G^{(\ell)}_{\alpha_1\alpha_2} = C_b + C_W\frac1{n_{\ell-1}}
  \sum_j\sigma_{j;\alpha_1}\sigma_{j;\alpha_2}` (4.70): its ensemble mean is the mean metric
  :math:`G = K + G^{\{1\}}/n` and :math:`n_{\ell-1}\mathrm{Cov}(\widehat G_{\alpha_1\alpha_2},
  \widehat G_{\alpha_3\alpha_4})` is the four-point vertex :math:`V` (4.76) — a within-network
  average over all neurons, the lowest-variance estimator (THEORY.md §11);
* the NTK of probe neurons of layer :math:`\ell` (8.5)/(8.7), exactly, by the layer-sum formula
  with batched backward cotangents (:math:`O(k\,n^2 N)` per layer for :math:`k` probes): its
  mean :math:`\Theta` and, from pairs of distinct probes, :math:`A` (Cov of diagonal entries),
  :math:`B` (second moment of off-diagonal entries), :math:`D` (with all other neurons'
  :math:`z_iz_i`), :math:`F` (:math:`z_iz_jH_{ij}`) (8.67), (8.82);
* optionally (``dntk_networks > 0``) :math:`P, Q` of the output layer for a sub-ensemble, by
  torch.func Hessian-vector products per network (§6.1, §6.3 identities; the dNTK is needed for
  one input and the few output neurons only, which the HVP form gives directly).

Every measured value has a standard error from the spread over independent networks
(per-network statistics, so heavy tails are accounted for). :func:`validate` puts the
measurements next to :func:`torch_crit.theory.predict.predict` and returns a
:class:`ValidationResult` (table, JSON, plots). ``torch-crit validate`` is the CLI.

Example:
    >>> import torch
    >>> from torch_crit.validate import validate
    >>> from torch_crit.theory.predict import ArchitectureSpec
    >>> spec = ArchitectureSpec("relu", (64,) * 3, C_b=0.0, C_W=2.0)
    >>> res = validate(spec, torch.randn(2, 8), ensemble=200, seed=0)
    >>> row = res.row("V/(nK^2)", layer=4, inputs=(0, 0, 0, 0))
    >>> abs(row.z) < 5
    True
"""
from __future__ import annotations

import argparse
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from torch_crit._io import atomic_savefig, atomic_write_json, atomic_write_text
from torch_crit.theory.activations import get_activation
from torch_crit.theory.predict import ArchitectureSpec, Prediction, predict

__all__ = [
    "Estimate",
    "EnsembleMeasurement",
    "sample_ensemble",
    "ComparisonRow",
    "ValidationResult",
    "validate",
    "add_arguments",
    "run",
]


# ============================================================================ estimators
@dataclass(frozen=True)
class Estimate:
    """A measured tensor and its standard error (same shape)."""

    value: Tensor
    stderr: Tensor


def _mean_se(y: Tensor) -> Estimate:
    """Mean over dim 0 (independent networks) and its standard error."""
    M = y.shape[0]
    mean = y.mean(0)
    se = y.std(0, unbiased=True) / math.sqrt(M) if M > 1 else torch.full_like(mean, float("inf"))
    return Estimate(mean, se)


_STAT_CHUNK = 256  # networks per block when forming per-network [.., N, N, N, N] statistics


def _chunked_mean_se(fn: Callable[[int, int], Tensor], M: int) -> Estimate:
    """Mean and SE over ``M`` networks of a per-network statistic built block by block.

    ``fn(lo, hi)`` returns the statistic of networks ``lo:hi`` (``[hi - lo, ...]``); only sums
    and sums of squares are kept, so ``[M, N, N, N, N]`` temporaries are never formed.
    """
    s1 = s2 = None
    for lo in range(0, M, _STAT_CHUNK):
        y = fn(lo, min(M, lo + _STAT_CHUNK))
        a, b = y.sum(0), (y * y).sum(0)
        s1 = a if s1 is None else s1 + a
        s2 = b if s2 is None else s2 + b
    mean = s1 / M
    var = (s2 - M * mean * mean).clamp(min=0.0) / max(M - 1, 1)
    return Estimate(mean, torch.sqrt(var / M))


@dataclass(frozen=True)
class EnsembleMeasurement:
    r"""Ensemble statistics of ``M`` networks, per layer :math:`\ell = 1..L` (dim 0).

    Attributes:
        ensemble: number of networks :math:`M`.
        fan_in: ``[L]`` :math:`n_{\ell-1}`.
        G: mean metric :math:`\mathbb E\widehat G^{(\ell)}` ``[L, N, N]``.
        V: :math:`n_{\ell-1}\mathrm{Cov}(\widehat G, \widehat G)` ``[L, N, N, N, N]``.
        ntk_layers: layers where the NTK was measured (others are NaN).
        Theta: NTK mean (diagonal neurons) ``[L, N, N]``.
        A: :math:`n\,\mathrm{Cov}(H_{ii;\alpha_1\alpha_2}, H_{jj;\alpha_3\alpha_4})` ``[L, N, N, N, N]``.
        B: ``B[l, a1, a3, a2, a4]`` = :math:`n\,\mathbb E[H_{ij;\alpha_1\alpha_2}H_{ij;\alpha_3\alpha_4}]`.
        D: :math:`n\,\mathbb E[z_{i;\alpha_1}z_{i;\alpha_2}\Delta H_{jj;\alpha_3\alpha_4}]` ``[L, N, N, N, N]``.
        F: ``F[l, a1, a3, a2, a4]`` = :math:`n\,\mathbb E[z_{i;\alpha_1}z_{j;\alpha_2}H_{ij;\alpha_3\alpha_4}]`.
        P, Q: output layer only, ``[N]`` (single-input identities, each input), or ``None``.
        probe_neurons: number of probe neurons per layer for the NTK statistics.
        seconds: wall time of the sampling.
    """

    ensemble: int
    fan_in: Tensor
    G: Estimate
    V: Estimate
    ntk_layers: tuple[int, ...]
    Theta: Estimate | None
    A: Estimate | None
    B: Estimate | None
    D: Estimate | None
    F: Estimate | None
    P: Estimate | None
    Q: Estimate | None
    probe_neurons: int
    seconds: float


def _hyper(spec: ArchitectureSpec, name: str, layer: int) -> float:
    return spec.layer_value(name, layer)


def sample_ensemble(
    spec: ArchitectureSpec,
    x: Tensor,
    ensemble: int,
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
    ntk_layers: Sequence[int] | None = None,
    probe_neurons: int = 4,
    chunk: int | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    dntk_networks: int = 0,
) -> EnsembleMeasurement:
    r"""Draw ``ensemble`` independent networks of ``spec`` and measure their statistics on ``x``.

    Weights :math:`W^{(\ell)}\sim\mathcal N(0, C_W^{(\ell)}/n_{\ell-1})`, biases
    :math:`\mathcal N(0, C_b^{(\ell)})` (2.19)–(2.20), drawn as ``[M_chunk, n_ℓ, n_{ℓ-1}]``
    tensors; the forward pass is one ``baddbmm`` per layer. See the module docstring for the
    estimators.

    Args:
        spec: the architecture.
        x: inputs ``[N, n0]``.
        ensemble: number of networks :math:`M \ge 2`.
        seed: seed of the generator (ignored when ``generator`` is given).
        generator: a ``torch.Generator`` on ``device`` for all draws.
        ntk_layers: layers :math:`\ell` whose NTK statistics are measured (default: all; the
            cost of layer :math:`\ell` is :math:`\propto \ell`); ``()`` for none.
        probe_neurons: neurons of each layer whose NTK is computed (``>= 2`` for A, B, F).
        chunk: networks per batch (default: from a ~256 MB budget).
        dtype: float64 (default) or float32.
        device: where to compute (default CPU).
        dntk_networks: networks (a sub-ensemble) for the output-layer dNTK statistics P, Q; 0 = skip.

    Returns:
        :class:`EnsembleMeasurement`.

    Raises:
        ValueError: ``ensemble < 2``, ``probe_neurons < 1``, bad layers or inputs.
    """
    if int(ensemble) < 2:
        raise ValueError(f"ensemble must be >= 2 networks (standard errors need a spread), got {ensemble}.")
    if int(probe_neurons) < 1:
        raise ValueError(f"probe_neurons must be >= 1, got {probe_neurons}.")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    xt = torch.as_tensor(x, dtype=dtype, device=dev)
    if xt.dim() == 1:
        xt = xt[None]
    if xt.dim() != 2:
        raise ValueError(f"x must be [N, n0], got shape {tuple(xt.shape)}.")
    act = spec.activation
    L = spec.depth
    N, n0 = xt.shape
    widths = [n0] + list(spec.widths) + [spec.n_out]
    layers = tuple(range(1, L + 1)) if ntk_layers is None else tuple(sorted({int(l) for l in ntk_layers}))
    if any(l < 1 or l > L for l in layers):
        raise ValueError(f"ntk_layers must lie in 1..{L}, got {list(layers)}.")
    M = int(ensemble)
    if chunk is None:
        per_net = sum(widths[l] * widths[l - 1] for l in range(1, L + 1)) + N * sum(widths) * 3
        per_net += len(layers) * probe_neurons * N * max(widths) * 4
        chunk = max(1, min(M, (256 << 20) // (8 * per_net)))
    gen = generator if generator is not None else torch.Generator(device=dev).manual_seed(int(seed))
    t0 = time.perf_counter()
    Gs: list[Tensor] = []  # [Mc, L, N, N] stochastic metric per network
    ntk_parts: dict[int, list[tuple[Tensor, Tensor, Tensor]]] = {l: [] for l in layers}
    gram0 = xt @ xt.T / n0
    for lo in range(0, M, chunk):
        mc = min(chunk, M - lo)
        Ws: list[Tensor] = []
        zs: list[Tensor] = []  # z^{(l)} [mc, N, n_l]
        acts: list[Tensor] = [xt.expand(mc, N, n0)]  # σ^{(l-1)} feeding layer l (x for l = 1)
        Gc = torch.empty(mc, L, N, N, dtype=dtype, device=dev)
        for l in range(1, L + 1):
            nin, nout = widths[l - 1], widths[l]
            cb, cw = _hyper(spec, "C_b", l), _hyper(spec, "C_W", l)
            W = torch.randn(mc, nout, nin, generator=gen, dtype=dtype, device=dev) * math.sqrt(cw / nin)
            b = torch.randn(mc, 1, nout, generator=gen, dtype=dtype, device=dev) * math.sqrt(cb)
            a_in = acts[-1]
            Gc[:, l - 1] = cb + cw * (gram0 if l == 1 else torch.bmm(a_in, a_in.transpose(1, 2)) / nin)
            z = torch.baddbmm(b, a_in, W.transpose(1, 2))
            Ws.append(W)
            zs.append(z)
            if l < L:
                acts.append(act.sigma(z))
        Gs.append(Gc)
        for l in layers:
            ntk_parts[l].append(_probe_ntk(spec, act, Ws, zs, acts, l, min(probe_neurons, widths[l]), dtype))
    G_all = torch.cat(Gs).to(torch.float64)
    fan_in = torch.tensor(widths[:-1], dtype=torch.float64)
    G_est = _mean_se(G_all)
    dG = G_all - G_est.value

    def cov(lo: int, hi: int) -> Tensor:  # per-network dG ⊗ dG, [hi - lo, L, N, N, N, N]
        d = dG[lo:hi]
        return d[:, :, :, :, None, None] * d[:, :, None, None, :, :]

    V_raw = _chunked_mean_se(cov, M)
    scale = fan_in.view(L, 1, 1, 1, 1) * M / (M - 1)
    V_est = Estimate(V_raw.value * scale, V_raw.stderr * scale)
    Th = A = B = D = F = None
    if layers:
        nanN2 = torch.full((L, N, N), float("nan"), dtype=torch.float64)
        nanN4 = torch.full((L,) + (N,) * 4, float("nan"), dtype=torch.float64)
        out = {k: (nanN2.clone() if k == "Theta" else nanN4.clone()) for k in ("Theta", "A", "B", "D", "F")}
        ses = {k: v.clone() for k, v in out.items()}
        for l in layers:
            H = torch.cat([p[0] for p in ntk_parts[l]]).to(torch.float64)  # [M, k, k, N, N]
            zp = torch.cat([p[1] for p in ntk_parts[l]]).to(torch.float64)  # [M, k, N] probe preactivations
            zz = torch.cat([p[2] for p in ntk_parts[l]]).to(torch.float64)  # [M, N, N] sum_i z_i z_i over all neurons
            stats = _ntk_statistics(H, zp, zz, widths[l], float(fan_in[l - 1]))
            for k, est in stats.items():
                out[k][l - 1] = est.value
                ses[k][l - 1] = est.stderr
        Th, A, B, D, F = (Estimate(out[k], ses[k]) for k in ("Theta", "A", "B", "D", "F"))
    P = Q = None
    if dntk_networks > 0:
        P, Q = _measure_dntk(spec, xt, int(dntk_networks), gen, dtype)
    return EnsembleMeasurement(
        ensemble=M, fan_in=fan_in, G=G_est, V=V_est, ntk_layers=layers, Theta=Th, A=A, B=B, D=D, F=F,
        P=P, Q=Q, probe_neurons=int(probe_neurons), seconds=time.perf_counter() - t0,
    )


def _probe_ntk(spec: ArchitectureSpec, act: Any, Ws: list[Tensor], zs: list[Tensor], acts: list[Tensor],
               layer: int, k: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    r"""Exact NTK :math:`H^{(\ell)}_{ij;\alpha\beta}` of the first ``k`` neurons of layer ``layer`` (8.7).

    Backward cotangents :math:`g_{p,u;\alpha} = \partial z^{(\ell)}_{p;\alpha}/\partial z^{(l')}_{u;\alpha}`
    for :math:`l' = \ell, \dots, 1` (batched over networks), with
    :math:`H \mathrel{+}= \lambda_b^{(l')} g g^\top + \frac{\lambda_W^{(l')}}{n_{l'-1}}
    (g g^\top)\odot(\sigma^{(l'-1)}\cdot\sigma^{(l'-1)})`.

    Returns:
        H ``[mc, k, k, N, N]``, probe preactivations ``[mc, k, N]``, and
        :math:`\sum_i z_{i;\alpha}z_{i;\beta}` over all neurons of the layer ``[mc, N, N]``.
    """
    z = zs[layer - 1]  # [mc, N, n]
    mc, N, n = z.shape
    g = torch.zeros(mc, k, N, n, dtype=dtype, device=z.device)
    idx = torch.arange(k)
    g[:, idx, :, idx] = 1.0
    H = torch.zeros(mc, k, k, N, N, dtype=dtype, device=z.device)
    for lp in range(layer, 0, -1):
        a_in = acts[lp - 1]  # [mc, N, n_{lp-1}]
        nin = a_in.shape[-1]
        gg = torch.einsum("mpau,mqbu->mpqab", g, g)
        ss = torch.bmm(a_in, a_in.transpose(1, 2)) / nin  # [mc, N, N]
        H += gg * (_hyper(spec, "lambda_b", lp) + _hyper(spec, "lambda_W", lp) * ss[:, None, None])
        if lp > 1:
            dsig = act.derivative(zs[lp - 2], 1)  # [mc, N, n_{lp-1}]
            g = torch.bmm(g.reshape(mc, k * N, -1), Ws[lp - 1]).reshape(mc, k, N, -1) * dsig[:, None]
    zz = torch.einsum("mau,mbu->mab", z, z)
    return H, z[:, :, :k].transpose(1, 2).contiguous(), zz


def _ntk_statistics(H: Tensor, zp: Tensor, zz: Tensor, n_layer: int, n_prev: float) -> dict[str, Estimate]:
    """A, B, D, F and Θ from probe NTKs of one layer (see :class:`EnsembleMeasurement`)."""
    M, k, _, N, _ = H.shape
    diag = torch.diagonal(H, dim1=1, dim2=2).permute(0, 3, 1, 2)  # [M, k, N, N]
    Th = _mean_se(diag.mean(1))
    dH = diag - Th.value
    res = {"Theta": Th}
    nan4 = torch.full((N,) * 4, float("nan"), dtype=torch.float64)
    if k >= 2:
        off = ~torch.eye(k, dtype=torch.bool)
        npair = k * (k - 1)

        def a_stat(lo: int, hi: int) -> Tensor:  # mean over ordered pairs i != j of dH_ii ⊗ dH_jj
            d = dH[lo:hi]
            s = d.sum(1)
            return (s[:, :, :, None, None] * s[:, None, None] - torch.einsum("mkab,mkcd->mabcd", d, d)) / npair * n_prev

        def b_stat(lo: int, hi: int) -> Tensor:  # mean over i != j of H_ij ⊗ H_ij
            h = H[lo:hi][:, off]
            return torch.einsum("mpab,mpcd->mabcd", h, h) / npair * n_prev

        def f_stat(lo: int, hi: int) -> Tensor:  # mean over i != j of z_i z_j H_ij
            h = H[lo:hi][:, off]
            m = hi - lo
            zi = zp[lo:hi, :, None, :].expand(m, k, k, N)[:, off]
            zj = zp[lo:hi, None, :, :].expand(m, k, k, N)[:, off]
            return torch.einsum("mpa,mpb,mpcd->mabcd", zi, zj, h) / npair * n_prev

        A = _chunked_mean_se(a_stat, M)
        Bm = _chunked_mean_se(b_stat, M)
        B = Estimate(Bm.value.permute(0, 2, 1, 3), Bm.stderr.permute(0, 2, 1, 3))
        Fm = _chunked_mean_se(f_stat, M)
        F = Estimate(Fm.value.permute(0, 2, 1, 3), Fm.stderr.permute(0, 2, 1, 3))
        res.update(A=A, B=B, F=F)
    else:
        res.update(A=Estimate(nan4, nan4), B=Estimate(nan4, nan4), F=Estimate(nan4, nan4))
    if n_layer >= 2:

        def d_stat(lo: int, hi: int) -> Tensor:  # z_i z_i (all i != j) with dH_jj for probes j
            z = zp[lo:hi]
            others = (zz[lo:hi, None] - torch.einsum("mka,mkb->mkab", z, z)) / (n_layer - 1)
            return torch.einsum("mkab,mkcd->mabcd", others, dH[lo:hi]) / k * n_prev

        res["D"] = _chunked_mean_se(d_stat, M)
    else:
        res["D"] = Estimate(nan4, nan4)
    return res


def _measure_dntk(spec: ArchitectureSpec, x: Tensor, M: int, gen: torch.Generator,
                  dtype: torch.dtype) -> tuple[Estimate, Estimate]:
    r"""Output-layer :math:`P, Q` per input from a sub-ensemble of ``M`` networks (§6.3 identities).

    :math:`\widehat{dH}_{i_0i_1i_2} = u_{i_1}^\top(\nabla^2 z_{i_0})u_{i_2}` with
    :math:`u_i = \Lambda\nabla z_i` (THEORY.md §6.1), single input each; :math:`P/n =
    \mathbb E[\widehat{dH}_{ijj}z_i]`, :math:`Q/n = \mathbb E[\widehat{dH}_{iij}z_j]` over ordered
    output pairs :math:`i \ne j`. Forward-over-reverse HVPs (torch.func), one network at a time.
    """
    from torch.func import grad, jvp

    if spec.n_out < 2:
        raise ValueError("measuring P and Q needs n_out >= 2 output neurons.")
    act = spec.activation
    L = spec.depth
    N, n0 = x.shape
    widths = [n0] + list(spec.widths) + [spec.n_out]
    n_prev = widths[-2]
    Ps, Qs = [], []
    for _ in range(M):
        params = {}
        lam = {}
        for l in range(1, L + 1):
            cw, cb = _hyper(spec, "C_W", l), _hyper(spec, "C_b", l)
            params[f"W{l}"] = torch.randn(widths[l], widths[l - 1], generator=gen, dtype=dtype) * math.sqrt(cw / widths[l - 1])
            params[f"b{l}"] = torch.randn(widths[l], generator=gen, dtype=dtype) * math.sqrt(cb)
            lam[f"W{l}"] = _hyper(spec, "lambda_W", l) / widths[l - 1]
            lam[f"b{l}"] = _hyper(spec, "lambda_b", l)

        def f(p: dict[str, Tensor], xa: Tensor) -> Tensor:
            h = xa
            for l in range(1, L + 1):
                h = p[f"W{l}"] @ h + p[f"b{l}"]
                if l < L:
                    h = act.sigma(h)
            return h

        P_a, Q_a = [], []
        for a in range(N):
            xa = x[a]
            z = f(params, xa)
            grads = [grad(lambda p, i=i: f(p, xa)[i])(params) for i in range(spec.n_out)]
            us = [{k: g[k] * lam[k] for k in g} for g in grads]
            # dH_{i0 i1 i2} = u_{i1}^T (Hess z_{i0}) u_{i2}: forward-over-reverse HVP, then a dot product
            dH = torch.zeros(spec.n_out, spec.n_out, spec.n_out, dtype=dtype)
            for i0 in range(spec.n_out):
                g0 = lambda p, i0=i0: grad(lambda q: f(q, xa)[i0])(p)
                for i2 in range(spec.n_out):
                    _, hvp = jvp(g0, (params,), (us[i2],))
                    for i1 in range(spec.n_out):
                        dH[i0, i1, i2] = sum((hvp[k] * us[i1][k]).sum() for k in hvp)
            k = spec.n_out
            pv = [dH[i, j, j] * z[i] for i in range(k) for j in range(k) if i != j]
            qv = [dH[i, i, j] * z[j] for i in range(k) for j in range(k) if i != j]
            P_a.append(torch.stack(pv).mean())
            Q_a.append(torch.stack(qv).mean())
        Ps.append(torch.stack(P_a))
        Qs.append(torch.stack(Q_a))
    P = _mean_se(torch.stack(Ps).to(torch.float64) * n_prev)
    Q = _mean_se(torch.stack(Qs).to(torch.float64) * n_prev)
    return P, Q


# ============================================================================ comparison
@dataclass(frozen=True)
class ComparisonRow:
    """One measured quantity next to its prediction.

    Attributes:
        quantity: e.g. ``"V/(nK^2)"``; normalised by the *theory* K, Θ of the layer.
        layer: :math:`\\ell`.
        inputs: sample indices of the entry.
        measured, stderr: ensemble estimate and its standard error.
        predicted: leading-order theory.
        predicted_exact: all-orders value where known (scale-invariant metric moments), else ``None``.
        z: (measured - predicted_exact or predicted) / stderr.
    """

    quantity: str
    layer: int
    inputs: tuple[int, ...]
    measured: float
    stderr: float
    predicted: float
    predicted_exact: float | None
    z: float


@dataclass(frozen=True)
class ValidationResult:
    """Measurements of an ensemble next to the theory.

    Attributes:
        prediction: the :class:`~torch_crit.theory.predict.Prediction`.
        measurement: the :class:`EnsembleMeasurement`.
        rows: :class:`ComparisonRow` list (single-input quantities per input, plus multi-input
            entries of V when the prediction has them).
    """

    prediction: Prediction
    measurement: EnsembleMeasurement
    rows: tuple[ComparisonRow, ...]

    def row(self, quantity: str, layer: int, inputs: tuple[int, ...]) -> ComparisonRow:
        """The row of ``quantity`` at ``layer`` and ``inputs``.

        Raises:
            KeyError: no such row (the message lists the quantities).
        """
        for r in self.rows:
            if r.quantity == quantity and r.layer == layer and tuple(r.inputs) == tuple(inputs):
                return r
        raise KeyError(f"no row {quantity!r} at layer {layer} inputs {inputs}; quantities: "
                       f"{sorted({r.quantity for r in self.rows})}")

    def series(self, quantity: str, inputs: tuple[int, ...]) -> list[ComparisonRow]:
        """Rows of ``quantity`` for ``inputs``, ordered by layer."""
        return sorted((r for r in self.rows if r.quantity == quantity and tuple(r.inputs) == tuple(inputs)),
                      key=lambda r: r.layer)

    def table(self) -> str:
        """Plain-text table: quantity, layer, inputs, measured ± SE, theory, exact, z."""
        head = f"{'quantity':<14} {'l':>3} {'inputs':<10} {'measured':>11} {'± SE':>9} {'theory':>11} {'exact':>11} {'z':>6}"
        lines = [self._header(), head, "-" * len(head)]
        for r in self.rows:
            ex = "" if r.predicted_exact is None else f"{r.predicted_exact:11.5g}"
            lines.append(f"{r.quantity:<14} {r.layer:>3} {','.join(map(str, r.inputs)):<10} {r.measured:11.5g} "
                         f"{r.stderr:9.2g} {r.predicted:11.5g} {ex:>11} {r.z:6.2f}")
        return "\n".join(lines)

    def _header(self) -> str:
        p, m = self.prediction, self.measurement
        return (f"{p.spec.activation.key} MLP, L={p.spec.depth}, widths={p.spec.widths}, n_out={p.spec.n_out}, "
                f"M={m.ensemble} networks ({m.seconds:.1f} s); r=L/n={p.aspect_ratio:.3g}, eps={p.expansion_parameter:.3g}, "
                f"regime={p.regime}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (spec, regime, rows)."""
        p = self.prediction
        spec = p.spec
        return {
            "spec": {"activation": spec.activation.key, "widths": list(spec.widths), "C_b": spec.C_b, "C_W": spec.C_W,
                     "lambda_b": spec.lambda_b, "lambda_W": spec.lambda_W, "n_out": spec.n_out, "depth": spec.depth},
            "ensemble": self.measurement.ensemble,
            "seconds": self.measurement.seconds,
            "aspect_ratio": p.aspect_ratio,
            "expansion_parameter": p.expansion_parameter,
            "regime": p.regime,
            "rows": [asdict(r) | {"inputs": list(r.inputs)} for r in self.rows],
        }

    def save(self, out_dir: str | Path, *, plots: bool = True) -> list[Path]:
        """Write ``validation.json``, ``validation.txt`` and (matplotlib permitting) plots, atomically.

        Returns:
            The written paths. Without matplotlib a note is written instead of the plots.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = [atomic_write_json(out / "validation.json", self.to_dict()),
                 atomic_write_text(out / "validation.txt", self.table() + "\n")]
        if plots:
            paths.extend(self._plots(out))
        return paths

    def _plots(self, out: Path) -> list[Path]:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return [atomic_write_text(out / "PLOTS_SKIPPED.txt", "matplotlib is not installed; plots skipped.\n")]
        quantities = [q for q in ("V/(nK^2)", "G/K", "Theta_hat/Theta", "A/(nTheta^2)", "B/(nTheta^2)",
                                  "D/(nKTheta)", "F/(nKTheta)") if any(r.quantity == q for r in self.rows)]
        ncol = min(3, len(quantities))
        nrow = math.ceil(len(quantities) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.5 * ncol, 3.4 * nrow), squeeze=False)
        N = self.prediction.gram.shape[0]
        for ax, q in zip(axes.flat, quantities):
            for a in range(N):
                key = (a,) * (4 if q[0] in "VABDF" else 2)
                rows = self.series(q, key)
                if not rows:
                    continue
                ls = [r.layer for r in rows]
                ax.plot(ls, [r.predicted for r in rows], "-", color=f"C{a}", label=f"theory, x{a}")
                if rows[0].predicted_exact is not None:
                    ax.plot(ls, [r.predicted_exact for r in rows], ":", color=f"C{a}", label=f"all orders, x{a}")
                ax.errorbar(ls, [r.measured for r in rows], yerr=[r.stderr for r in rows], fmt="o", ms=3,
                            color=f"C{a}", label=f"measured, x{a}")
            ax.set_title(q)
            ax.set_xlabel("layer l")
        for ax in list(axes.flat)[len(quantities):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(self._header(), fontsize=8)
        fig.tight_layout()
        path = atomic_savefig(fig, out / "validation.png", dpi=110)
        plt.close(fig)
        return [path]


def _rows(pred: Prediction, meas: EnsembleMeasurement) -> list[ComparisonRow]:
    rows: list[ComparisonRow] = []
    L = pred.spec.depth
    N = pred.gram.shape[0]
    s = pred.single
    n = meas.fan_in

    def add(q: str, l: int, inp: tuple[int, ...], m: float, se: float, p: float, ex: float | None = None) -> None:
        ref = ex if ex is not None else p
        z = (m - ref) / se if se > 0 and math.isfinite(se) else float("nan")
        rows.append(ComparisonRow(q, l, inp, float(m), float(se), float(p), None if ex is None else float(ex), float(z)))

    for l in range(1, L + 1):
        i = l - 1
        for a in range(N):
            K, Th = float(s.K[i, a]), float(s.Theta[i, a])
            nn_ = float(n[i])
            d4 = (a, a, a, a)
            ex_mean = None if pred.exact is None else float(pred.exact.mean[i, a]) / K
            add("G/K", l, (a, a), float(meas.G.value[i, a, a]) / K, float(meas.G.stderr[i, a, a]) / K,
                1 + float(s.G1[i, a]) / (nn_ * K), ex_mean)
            if l >= 2:
                ex = None if pred.exact is None else float(pred.exact.V_exact[i, a]) / (nn_ * K * K)
                add("V/(nK^2)", l, d4, float(meas.V.value[i, a, a, a, a]) / (nn_ * K * K),
                    float(meas.V.stderr[i, a, a, a, a]) / (nn_ * K * K), float(s.V[i, a]) / (nn_ * K * K), ex)
            if l in meas.ntk_layers and meas.Theta is not None:
                add("Theta_hat/Theta", l, (a, a), float(meas.Theta.value[i, a, a]) / Th,
                    float(meas.Theta.stderr[i, a, a]) / Th, 1.0)
                if l >= 2:
                    for q, t, norm in (("A", s.A, Th * Th), ("B", s.B, Th * Th), ("D", s.D, K * Th), ("F", s.F, K * Th)):
                        est = getattr(meas, q)
                        v = float(est.value[i, a, a, a, a])
                        if not math.isfinite(v):
                            continue
                        name = f"{q}/(nTheta^2)" if q in "AB" else f"{q}/(nKTheta)"
                        add(name, l, d4, v / (nn_ * norm), float(est.stderr[i, a, a, a, a]) / (nn_ * norm),
                            float(t[i, a]) / (nn_ * norm))
        if pred.V is not None and l >= 2 and N >= 2:
            Kd = torch.diagonal(pred.K[i])
            for idx in ((0, 1, 0, 1), (0, 0, 1, 1), (0, 0, 0, 1)):
                norm = float(n[i]) * float(torch.sqrt(Kd[list(idx)].prod()))
                add("V/(nK^2)", l, idx, float(meas.V.value[(i,) + idx]) / norm, float(meas.V.stderr[(i,) + idx]) / norm,
                    float(pred.V[(i,) + idx]) / norm)
    if meas.P is not None:
        for a in range(N):
            Th = float(s.Theta[L - 1, a])
            nn_ = float(n[L - 1])
            for q, est, t in (("P/(nTheta^2)", meas.P, s.P), ("Q/(nTheta^2)", meas.Q, s.Q)):
                add(q, L, (a,), float(est.value[a]) / (nn_ * Th * Th), float(est.stderr[a]) / (nn_ * Th * Th),
                    float(t[L - 1, a]) / (nn_ * Th * Th))
    return rows


def validate(
    model_or_spec: ArchitectureSpec | nn.Module,
    x: Tensor,
    *,
    ensemble: int = 1000,
    seed: int = 0,
    ntk_layers: Sequence[int] | None = None,
    probe_neurons: int = 4,
    chunk: int | None = None,
    dntk_networks: int = 0,
    multi_input: bool | None = None,
    dtype: torch.dtype = torch.float64,
) -> ValidationResult:
    r"""Draw an ensemble of ``model_or_spec`` and compare its statistics with :func:`predict`.

    Args:
        model_or_spec: :class:`ArchitectureSpec` or an MLP initialised by ``torch_crit.init_``
            (its architecture is read by :func:`~torch_crit.theory.predict.predict`; the ensemble
            redraws its weights from the same distribution).
        x: inputs ``[N, n0]``.
        ensemble: number of networks.
        seed: random seed.
        ntk_layers, probe_neurons, chunk, dntk_networks, dtype: see :func:`sample_ensemble`.
        multi_input: passed to :func:`predict` (multi-input V rows when true).

    Returns:
        :class:`ValidationResult`.
    """
    pred = predict(model_or_spec, x, multi_input=multi_input)
    meas = sample_ensemble(pred.spec, x, ensemble, seed=seed, ntk_layers=ntk_layers, probe_neurons=probe_neurons,
                           chunk=chunk, dtype=dtype, dntk_networks=dntk_networks)
    return ValidationResult(pred, meas, tuple(_rows(pred, meas)))


# ============================================================================ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``torch-crit validate``."""
    parser.add_argument("--activation", default="tanh", help="activation name (e.g. relu, tanh, gelu, swish, leaky_relu:0.1)")
    parser.add_argument("--depth", type=int, default=8, help="number of weight layers L")
    parser.add_argument("--width", type=int, default=64, help="hidden width n")
    parser.add_argument("--n-out", type=int, default=4, help="output width n_L (>= 2 to separate A and B)")
    parser.add_argument("--n-in", type=int, default=16, help="input dimension n0")
    parser.add_argument("--ensemble", type=int, default=1000, help="number of networks M")
    parser.add_argument("--inputs", type=int, default=2, help="number of random inputs N")
    parser.add_argument("--ntk-layers", default="all", help="'all', 'none' or comma-separated layers for NTK statistics")
    parser.add_argument("--probes", type=int, default=4, help="probe neurons per layer for NTK statistics")
    parser.add_argument("--learning-rates", choices=("equivalence", "uniform"), default="equivalence")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="directory for validation.json/.txt/.png")
    parser.add_argument("--no-plots", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Run ``torch-crit validate``: print the table, write JSON and plots to ``--out``."""
    spec = ArchitectureSpec.critical(get_activation(args.activation) if ":" not in args.activation
                                     else _parse(args.activation), args.depth, args.width, n_out=args.n_out,
                                     n_in=args.n_in, learning_rates=args.learning_rates)
    g = torch.Generator().manual_seed(args.seed + 12345)
    x = torch.randn(args.inputs, args.n_in, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * math.sqrt(args.n_in)  # unit (1/n0) x.x
    layers: Sequence[int] | None
    if args.ntk_layers == "all":
        layers = None
    elif args.ntk_layers == "none":
        layers = ()
    else:
        layers = [int(v) for v in args.ntk_layers.split(",") if v]
    res = validate(spec, x, ensemble=args.ensemble, seed=args.seed, ntk_layers=layers, probe_neurons=args.probes)
    print(res.table())
    if args.out:
        for p in res.save(args.out, plots=not args.no_plots):
            print(f"wrote {p}")
    return 0


def _parse(spec: str) -> Any:
    from torch_crit.theory.activations import parse_activation_spec

    return parse_activation_spec(spec)
