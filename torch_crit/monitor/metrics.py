r"""Kernel-flow metrics: pure functions of the tensors a probe pass captured.

A metric is a :class:`Metric`: a name, a function ``fn(state: ProbeState) -> dict`` returning a
*flat* record (``str`` key → ``float``/``int``/``str``/``None``), and the set of captured
quantities it ``needs`` (so the monitor computes only what the chosen metrics read). The
built-in metrics live in the registry :data:`METRICS`; users extend it with
:func:`register_metric` (like mup's ``coord_check`` statistics dictionary)::

    from torch_crit.monitor import register_metric

    def output_norm(state):
        return {"probe/output_rms": state.outputs.double().pow(2).mean().sqrt().item()}

    register_metric("output_norm", output_norm, needs=("outputs",))

Key convention: ``<group>/<layer label>/<quantity>``; the layer label is ``l<ℓ:02d>.<module
name>`` with ℓ the 1-based forward-order depth index of the layer (so files sort by depth and
TensorBoard groups by metric). Non-finite values are recorded as ``nan``/``inf`` floats (JSON
writers write them as ``null``).

Formulas (book = Roberts & Yaida, *The Principles of Deep Learning Theory*):

* preactivation kernel of layer ℓ, the empirical estimate of the metric :math:`G^{(\ell)}`
  ((4.116); at infinite width the kernel :math:`K^{(\ell)}` of (4.118)):
  :math:`\hat K^{(\ell)}_{\alpha\beta} = \frac{1}{n_\ell}\sum_{i=1}^{n_\ell}
  z^{(\ell)}_{i;\alpha} z^{(\ell)}_{i;\beta}` (convolutions: also averaged over positions);
* NTK :math:`\hat H_{i_1 i_2;\alpha_1\alpha_2}` (7.17), (8.5), its per-layer split (8.7),
  and its relative change from the reference step, :math:`\lVert\Theta_t-\Theta_0\rVert_F /
  \lVert\Theta_0\rVert_F`;
* effective rank (Roy & Vetterli 2007) :math:`\exp(-\sum_i p_i \log p_i)`,
  :math:`p_i = \lambda_i / \sum_j \lambda_j` over the non-negative eigenvalues, and the
  participation ratio :math:`(\sum_i\lambda_i)^2/\sum_i\lambda_i^2`;
* kernel–target alignment (Cristianini et al. 2002) :math:`A(\Theta, yy^\top) =
  \langle\Theta, yy^\top\rangle_F / (\lVert\Theta\rVert_F \lVert yy^\top\rVert_F)` and its
  centred version (Cortes, Mohri & Rostamizadeh 2012) with :math:`\Theta \to C\Theta C`,
  :math:`C = I - \mathbf{1}\mathbf{1}^\top/N` over samples;
* the dNTK-predicted one-step change of the NTK (11.10) against the measured one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch

__all__ = [
    "NEEDS",
    "LayerInfo",
    "ProbeState",
    "Metric",
    "METRICS",
    "register_metric",
    "resolve_metrics",
    "preactivation_kernel",
    "kernel_summary",
    "relative_change",
    "ntk_as_matrix",
    "top_eigenvalues",
    "effective_rank",
    "participation_ratio",
    "kernel_target_alignment",
    "is_finite",
]

Scalar = Union[float, int, str, None]
Record = dict[str, Scalar]

#: Quantities a metric may ask the probe pass to capture.
NEEDS = frozenset({"outputs", "preacts", "ntk", "ntk_per_layer", "targets", "velocity", "theory"})


@dataclass(frozen=True)
class LayerInfo:
    r"""One monitored layer (a Linear or Conv module), in forward order.

    Attributes:
        name: qualified module name in the model (``"net.0"``; ``""`` for the model itself).
        label: record label ``l<depth:02d>.<name>``.
        depth: 1-based forward-order index ℓ among the monitored layers.
        kind: module class name (``"Linear"``, ``"Conv2d"``, …).
        fan_in: fan-in :math:`n_{\ell-1}` (in_features, or in_channels/groups × kernel size).
        width: number of output units :math:`n_\ell` (out_features or out_channels).
        activation: name of the activation that follows the layer, if known.
    """

    name: str
    label: str
    depth: int
    kind: str
    fan_in: int
    width: int
    activation: Optional[str] = None


@dataclass(frozen=True)
class ProbeState:
    r"""Everything one probe pass captured; the only input of a metric.

    ``N`` = number of probe inputs, ``k`` = number of network outputs. Tensors are detached;
    kernels are float64.

    Attributes:
        step: optimizer steps taken when the probe ran (0 = before training).
        layers: the monitored layers in forward order.
        outputs: network outputs on the probe batch, ``[N, k]`` (``None`` if the model does not
            return a tensor).
        targets: probe targets ``[N, k]`` (float64) or ``None``.
        preact_kernels: label → :math:`\hat K^{(\ell)}` ``[N, N]``.
        preact_kernels0: the same at the reference step (for relative change), or empty.
        ntk: the NTK, ``[N, N]`` (output trace :math:`\sum_a \Theta_{\alpha\beta;aa}`) or
            ``[N, N, k, k]`` (full), or ``None``.
        ntk0: the NTK at the reference step, same shape, or ``None``.
        ntk_layers: parameter-group label → that group's NTK contribution (same shape as
            ``ntk``; the contributions sum to ``ntk``).
        ntk_layers0: the same at the reference step.
        ntk_output: ``"trace"`` or ``"full"``.
        ref_step: the step at which ``ntk0``/``preact_kernels0`` were taken.
        theory_kernels: label → theory kernel :math:`K^{(\ell)}` ``[N, N]`` (step 0 only).
        theory_info: flat description of the theory inputs (activation, C_b, C_W, source).
        theory_ntk: the frozen NTK of the theory (9.5) in the layout of ``ntk``
            (:math:`k\Theta^{(L)}` for the trace, :math:`\delta_{ab}\Theta^{(L)}` for the full
            kernel), or ``None``.
        velocity: ``(predicted, measured)`` one-step NTK changes (same shape as ``ntk``) or
            ``None``.
        extras: free-form tensors a custom capture may add.
    """

    step: int
    layers: tuple[LayerInfo, ...] = ()
    outputs: Optional[torch.Tensor] = None
    targets: Optional[torch.Tensor] = None
    preact_kernels: Mapping[str, torch.Tensor] = field(default_factory=dict)
    preact_kernels0: Mapping[str, torch.Tensor] = field(default_factory=dict)
    ntk: Optional[torch.Tensor] = None
    ntk0: Optional[torch.Tensor] = None
    ntk_layers: Mapping[str, torch.Tensor] = field(default_factory=dict)
    ntk_layers0: Mapping[str, torch.Tensor] = field(default_factory=dict)
    ntk_output: str = "trace"
    ref_step: Optional[int] = None
    theory_kernels: Mapping[str, torch.Tensor] = field(default_factory=dict)
    theory_info: Mapping[str, Scalar] = field(default_factory=dict)
    theory_ntk: Optional[torch.Tensor] = None
    velocity: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    extras: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Metric:
    """A named metric: ``fn(state) -> flat record`` and the captured quantities it reads.

    Attributes:
        name: registry name.
        fn: pure function of a :class:`ProbeState` returning ``dict[str, scalar]``.
        needs: subset of :data:`NEEDS`.
    """

    name: str
    fn: Callable[[ProbeState], Mapping[str, Scalar]]
    needs: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        unknown = set(self.needs) - NEEDS
        if unknown:
            raise ValueError(
                f"Metric {self.name!r}: unknown needs {sorted(unknown)}; accepted: {sorted(NEEDS)}."
            )


#: name → :class:`Metric`; extend with :func:`register_metric`.
METRICS: dict[str, Metric] = {}


def register_metric(
    name: str,
    fn: Callable[[ProbeState], Mapping[str, Scalar]],
    *,
    needs: Iterable[str] = (),
    overwrite: bool = False,
) -> Metric:
    """Add a metric to the registry :data:`METRICS` and return it.

    Args:
        name: registry name (what users pass in ``metrics=``).
        fn: ``fn(state: ProbeState) -> dict[str, float | int | str | None]``.
        needs: captured quantities ``fn`` reads, a subset of :data:`NEEDS`.
        overwrite: replace an existing entry of the same name.

    Returns:
        The registered :class:`Metric`.
    """
    if name in METRICS and not overwrite:
        raise ValueError(
            f"a metric named {name!r} is already registered; pass overwrite=True to replace it "
            f"or choose another name (registered: {sorted(METRICS)})."
        )
    if not callable(fn):
        raise TypeError(f"register_metric({name!r}): fn must be callable, got {type(fn).__name__}.")
    metric = Metric(name, fn, frozenset(needs))
    METRICS[name] = metric
    return metric


def resolve_metrics(
    metrics: Iterable[Union[str, Metric, Callable[[ProbeState], Mapping[str, Scalar]]]],
) -> tuple[Metric, ...]:
    """Turn names, :class:`Metric` objects and bare callables into a tuple of metrics.

    A bare callable becomes a metric named after it that needs every quantity a plain
    probe computes (``outputs``, ``preacts``, ``ntk``).
    """
    out: list[Metric] = []
    for m in metrics:
        if isinstance(m, Metric):
            out.append(m)
        elif isinstance(m, str):
            if m not in METRICS:
                raise ValueError(f"unknown metric {m!r}; registered metrics: {sorted(METRICS)}. "
                                 "Add one with torch_crit.monitor.register_metric(name, fn, needs=...).")
            out.append(METRICS[m])
        elif callable(m):
            out.append(Metric(getattr(m, "__name__", "custom"), m, frozenset({"outputs", "preacts", "ntk"})))
        else:
            raise TypeError(f"metrics entries must be names, Metric objects or callables; got {m!r}.")
    names = [m.name for m in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"metric names must be unique, got duplicates {sorted(dup)}.")
    return tuple(out)


# ----------------------------------------------------------------------------------------
# pure numerical helpers
# ----------------------------------------------------------------------------------------


def is_finite(t: torch.Tensor) -> bool:
    """``True`` iff every entry of ``t`` is finite."""
    return bool(torch.isfinite(t).all())


def preactivation_kernel(z: torch.Tensor) -> torch.Tensor:
    r"""Empirical preactivation kernel :math:`\hat K_{\alpha\beta} = \frac1{n}\sum_i z_{i;\alpha}z_{i;\beta}`.

    The neuron average estimates the metric :math:`G^{(\ell)}` of (4.116) (the kernel
    :math:`K^{(\ell)}` of (4.118) at infinite width). For a convolution the average runs over
    channels *and* positions.

    Args:
        z: preactivations ``[N, n]`` or ``[N, C, *spatial]`` (any float dtype).

    Returns:
        ``[N, N]`` float64 kernel.
    """
    if z.dim() < 2:
        raise ValueError(f"preactivation_kernel expects [N, n] or [N, C, ...] preactivations, got shape "
                         f"{tuple(z.shape)}; add a batch dimension.")
    z = z.detach().reshape(z.shape[0], -1).to(torch.float64)
    return z @ z.T / z.shape[1]


def kernel_summary(K: torch.Tensor) -> tuple[float, float]:
    r"""Mean diagonal and mean off-diagonal correlation of a kernel.

    .. math::
        \bar K_d = \frac1N\sum_\alpha K_{\alpha\alpha},\qquad
        \bar\rho = \frac{1}{N(N-1)}\sum_{\alpha\ne\beta}
        \frac{K_{\alpha\beta}}{\sqrt{K_{\alpha\alpha}K_{\beta\beta}}}

    Args:
        K: ``[N, N]`` kernel, ``N >= 2``.

    Returns:
        ``(mean diagonal, mean off-diagonal correlation)``; ``nan`` where undefined (zero or
        non-finite diagonal).
    """
    if K.dim() != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"kernel_summary expects a square [N, N] kernel, got shape {tuple(K.shape)}.")
    K = K.to(torch.float64)
    n = K.shape[0]
    d = torch.diagonal(K)
    diag_mean = float(d.mean())
    if n < 2:
        return diag_mean, float("nan")
    denom = torch.sqrt(torch.outer(d, d))
    rho = K / denom
    off = ~torch.eye(n, dtype=torch.bool, device=K.device)
    return diag_mean, float(rho[off].mean())


def relative_change(A: torch.Tensor, A0: torch.Tensor) -> float:
    r""":math:`\lVert A - A_0\rVert_F / \lVert A_0\rVert_F` (``nan`` if :math:`A_0 = 0`)."""
    if A.shape != A0.shape:
        raise ValueError(f"relative_change: shapes differ, {tuple(A.shape)} vs reference {tuple(A0.shape)}.")
    den = torch.linalg.vector_norm(A0.to(torch.float64))
    if den == 0:
        return float("nan")
    return float(torch.linalg.vector_norm((A - A0).to(torch.float64)) / den)


def ntk_as_matrix(ntk: torch.Tensor) -> torch.Tensor:
    r"""The NTK as a symmetric matrix over (sample, output) pairs.

    Args:
        ntk: ``[N, N]`` (output trace) or ``[N, N, k, k]`` (full).

    Returns:
        ``[N, N]`` or ``[N k, N k]`` with row index ``α k + a``.
    """
    if ntk.dim() == 2:
        return ntk
    if ntk.dim() == 4:
        n, _, k, _ = ntk.shape
        return ntk.permute(0, 2, 1, 3).reshape(n * k, n * k)
    raise ValueError(f"an NTK is [N, N] or [N, N, k, k]; got shape {tuple(ntk.shape)}.")


def top_eigenvalues(ntk: torch.Tensor) -> torch.Tensor:
    """All eigenvalues of the (symmetrised) NTK matrix, largest first, ``[N]`` or ``[N k]``.

    The decomposition runs in the kernel's own precision (float32 or float64) and, on CPU, on
    one thread (the caller's thread count is restored); the result is float64.
    """
    M = ntk_as_matrix(ntk)
    if not M.is_floating_point() or M.dtype in (torch.float16, torch.bfloat16):
        M = M.to(torch.float32)
    M = 0.5 * (M + M.T)
    # On CPU the LAPACK eigensolver runs on one thread: for these sizes threads barely help,
    # and on a loaded machine OpenMP barriers made a 640×640 solve 70x slower (10 s vs 0.14 s
    # measured with 2 threads). The caller's thread count is restored at once.
    n_threads = torch.get_num_threads()
    try:
        if M.device.type == "cpu" and n_threads > 1:
            torch.set_num_threads(1)
        lam = torch.linalg.eigvalsh(M)
    finally:
        if torch.get_num_threads() != n_threads:
            torch.set_num_threads(n_threads)
    return lam.flip(0).to(torch.float64)


def effective_rank(eigenvalues: torch.Tensor) -> float:
    r"""Entropy effective rank (Roy & Vetterli 2007) :math:`\exp(-\sum_i p_i\log p_i)`.

    ``p_i = λ_i⁺ / Σ_j λ_j⁺`` with negative round-off eigenvalues clipped to 0. Ranges from 1
    (one direction) to the matrix size (flat spectrum).
    """
    lam = eigenvalues.to(torch.float64).clamp_min(0)
    s = lam.sum()
    if s <= 0:
        return float("nan")
    p = lam / s
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def participation_ratio(eigenvalues: torch.Tensor) -> float:
    r"""Participation ratio :math:`(\sum_i\lambda_i)^2 / \sum_i\lambda_i^2` (= tr(Θ)²/‖Θ‖_F²)."""
    lam = eigenvalues.to(torch.float64)
    den = (lam * lam).sum()
    if den <= 0:
        return float("nan")
    return float(lam.sum() ** 2 / den)


def kernel_target_alignment(ntk: torch.Tensor, targets: torch.Tensor, *, centered: bool = False) -> float:
    r"""Kernel–target alignment of the NTK with the targets.

    .. math::
        A(\Theta, T) = \frac{\langle \Theta, T\rangle_F}{\lVert\Theta\rVert_F\,\lVert T\rVert_F},

    with :math:`T_{\alpha\beta} = \sum_a y_{\alpha a}y_{\beta a}` for the output-trace NTK and
    :math:`T_{\alpha a,\beta b} = y_{\alpha a}y_{\beta b}` for the full NTK (Cristianini et al.
    2002). ``centered=True`` first centres both over samples, :math:`\Theta \to C\Theta C`
    with :math:`C = I_N - \mathbf 1\mathbf 1^\top/N` (Cortes et al. 2012).

    Args:
        ntk: ``[N, N]`` or ``[N, N, k, k]``.
        targets: ``[N]`` or ``[N, k]``.
        centered: centre over samples first.

    Returns:
        The alignment in ``[-1, 1]`` (``nan`` if either kernel vanishes).
    """
    y = targets.detach().to(torch.float64)
    if y.dim() == 1:
        y = y[:, None]
    y = y.reshape(y.shape[0], -1)
    n = y.shape[0]
    if ntk.shape[0] != n:
        raise ValueError(f"kernel_target_alignment: NTK has {ntk.shape[0]} samples, targets {n}.")
    th = ntk.to(torch.float64)
    if centered:
        y = y - y.mean(0, keepdim=True)  # C y: centring T = y yᵀ on both sides
        th = th - th.mean(0, keepdim=True)
        th = th - th.mean(1, keepdim=True)
    if th.dim() == 2:
        T = y @ y.T
        num = (th * T).sum()
    else:
        if th.shape[2] != y.shape[1]:
            raise ValueError(f"kernel_target_alignment: full NTK has k={th.shape[2]} outputs, targets "
                             f"have {y.shape[1]} columns.")
        T = torch.einsum("ia,jb->ijab", y, y)
        num = (th * T).sum()
    den = torch.linalg.vector_norm(th) * torch.linalg.vector_norm(T)
    if den == 0:
        return float("nan")
    return float(num / den)


# ----------------------------------------------------------------------------------------
# built-in metrics
# ----------------------------------------------------------------------------------------


def _f(x: Union[float, torch.Tensor]) -> float:
    return float(x)


def _kernel_fields(prefix: str, K: torch.Tensor) -> Record:
    """``{prefix}/K_diag`` and ``{prefix}/corr_offdiag`` of a kernel matrix (:func:`kernel_summary`)."""
    d, rho = kernel_summary(K)
    return {f"{prefix}/K_diag": d, f"{prefix}/corr_offdiag": rho}


def _preact_kernel_metric(state: ProbeState) -> Record:
    rec: Record = {}
    for layer in state.layers:
        K = state.preact_kernels.get(layer.label)
        if K is None:
            continue
        rec.update(_kernel_fields(f"preact/{layer.label}", K))
        K0 = state.preact_kernels0.get(layer.label)
        if K0 is not None:
            rec[f"preact/{layer.label}/rel_change"] = relative_change(K, K0)
    return rec


def _ntk_metric(state: ProbeState) -> Record:
    if state.ntk is None:
        return {}
    M = ntk_as_matrix(state.ntk).to(torch.float64)
    rec: Record = {
        "ntk/diag_mean": _f(torch.diagonal(M).mean()),
        "ntk/frobenius": _f(torch.linalg.vector_norm(M)),
    }
    if state.ntk0 is not None:
        rec["ntk/rel_change"] = relative_change(state.ntk, state.ntk0)
        rec["ntk/ref_step"] = state.ref_step
    return rec


def _ntk_per_layer_metric(state: ProbeState) -> Record:
    if not state.ntk_layers:
        return {}
    total = sum(float(torch.diagonal(ntk_as_matrix(t).to(torch.float64)).sum()) for t in state.ntk_layers.values())
    rec: Record = {}
    for label, t in state.ntk_layers.items():
        tr = float(torch.diagonal(ntk_as_matrix(t).to(torch.float64)).sum())
        rec[f"ntk_layer/{label}/share"] = tr / total if total != 0 else float("nan")
        t0 = state.ntk_layers0.get(label)
        if t0 is not None:
            rec[f"ntk_layer/{label}/rel_change"] = relative_change(t, t0)
    return rec


#: how many leading eigenvalues the spectrum metric records.
TOP_EIGENVALUES = 8


def _ntk_spectrum_metric(state: ProbeState) -> Record:
    if state.ntk is None or not is_finite(state.ntk):
        return {}
    lam = top_eigenvalues(state.ntk)
    rec: Record = {f"ntk/eig/{i}": _f(lam[i]) for i in range(min(TOP_EIGENVALUES, lam.numel()))}
    rec["ntk/eig_min"] = _f(lam[-1])
    rec["ntk/effective_rank"] = effective_rank(lam)
    rec["ntk/participation_ratio"] = participation_ratio(lam)
    rec["ntk/condition"] = _f(lam[0] / lam[-1]) if lam[-1] > 0 else float("inf")
    return rec


def _ntk_alignment_metric(state: ProbeState) -> Record:
    if state.ntk is None or state.targets is None:
        return {}
    return {
        "ntk/alignment": kernel_target_alignment(state.ntk, state.targets),
        "ntk/alignment_centered": kernel_target_alignment(state.ntk, state.targets, centered=True),
    }


def _ntk_velocity_metric(state: ProbeState) -> Record:
    if state.velocity is None:
        return {}
    pred, meas = (t.to(torch.float64) for t in state.velocity)
    num = torch.linalg.vector_norm(pred - meas)
    den = torch.linalg.vector_norm(meas)
    cos = (pred * meas).sum() / (torch.linalg.vector_norm(pred) * den)
    return {
        "dntk/predicted_norm": _f(torch.linalg.vector_norm(pred)),
        "dntk/measured_norm": _f(den),
        "dntk/rel_error": _f(num / den) if den > 0 else float("nan"),
        "dntk/cosine": _f(cos) if den > 0 else float("nan"),
    }


def _theory_metric(state: ProbeState) -> Record:
    if not state.theory_kernels:
        return {}
    rec: Record = {f"theory/{k}": v for k, v in state.theory_info.items()}
    for layer in state.layers:
        Kth = state.theory_kernels.get(layer.label)
        if Kth is None:
            continue
        rec.update(_kernel_fields(f"theory/preact/{layer.label}", Kth))
        K = state.preact_kernels.get(layer.label)
        if K is not None:
            rec[f"theory/preact/{layer.label}/rel_error"] = relative_change(K, Kth)
    if state.theory_ntk is not None and state.ntk is not None:
        M = ntk_as_matrix(state.theory_ntk).to(torch.float64)
        rec["theory/ntk/diag_mean"] = _f(torch.diagonal(M).mean())
        rec["theory/ntk/rel_error"] = relative_change(state.ntk.to(torch.float64), state.theory_ntk.to(torch.float64))
    return rec


for _name, _fn, _needs in (
    ("preact_kernel", _preact_kernel_metric, ("preacts",)),
    ("ntk", _ntk_metric, ("ntk",)),
    ("ntk_per_layer", _ntk_per_layer_metric, ("ntk_per_layer",)),
    ("ntk_spectrum", _ntk_spectrum_metric, ("ntk",)),
    ("ntk_alignment", _ntk_alignment_metric, ("ntk", "targets")),
    ("ntk_velocity", _ntk_velocity_metric, ("velocity",)),
    ("theory", _theory_metric, ("preacts", "theory")),
):
    register_metric(_name, _fn, needs=_needs)
del _name, _fn, _needs
