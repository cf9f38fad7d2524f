r"""``predict(model_or_spec, x)``: every prediction of the effective theory as one named result.

The front door of the theory engine. Given an MLP — as an :class:`ArchitectureSpec` or as an
``nn.Module`` initialised by :func:`torch_crit.init_` — and a set of inputs, it runs the
infinite-width recursions (kernel :math:`K`, frozen NTK :math:`\Theta`) and the leading
finite-width recursions (:math:`V, G^{\{1\}}, A, B, D, F, P, Q`) of
:mod:`torch_crit.theory.finite_width` at the network's actual widths, and reports the
normalised ratios (:math:`V/(nK^2)` …, (5.128), (9.23)–(9.24), (11.62)), the depth-to-width
ratio :math:`r = L/n` (3.52) and the regime it implies (THEORY.md §4.8, §12):

* ``"lazy"`` — normalised vertex at the output :math:`\epsilon = V/(nK^2) < 0.05`: the network
  behaves like its infinite-width limit (frozen NTK, no representation learning);
* ``"effective-theory"`` — :math:`0.05 \le \epsilon < 0.5`: 1/n corrections are visible and
  perturbation theory is reliable (quantitatively to ~:math:`\epsilon` relative; keep
  :math:`\epsilon \lesssim 0.2`–0.3 for 10% accuracy);
* ``"strongly-coupled"`` — :math:`\epsilon \ge 0.5`: the 1/n expansion breaks down
  (chaotic, untrainable deep-narrow networks, §3.4, §5.4).

Example:
    >>> import torch
    >>> from torch_crit.theory.predict import ArchitectureSpec, predict
    >>> spec = ArchitectureSpec("relu", widths=(128,) * 3, C_b=0.0, C_W=2.0)
    >>> p = predict(spec, torch.ones(1, 8))
    >>> round(float(p.ratios["V/(nK^2)"][-1, 0]), 4), p.regime   # 5 (L-1)/n = 15/128
    (0.1172, 'effective-theory')
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .activations import Activation, get_activation
from .finite_width import (
    ExactMetricMoments,
    FiniteWidthTensors,
    SingleInputTheory,
    exact_metric_moments,
    finite_width_tensors,
    single_input_recursions,
)

__all__ = ["ArchitectureSpec", "Prediction", "predict", "REGIME_THRESHOLDS"]

#: Normalised-vertex thresholds separating the regimes ("lazy" < 0.05 <= "effective-theory" < 0.5).
REGIME_THRESHOLDS = (0.05, 0.5)

Hyper = float | tuple[float, ...]


def _tuple(v: Any, name: str) -> Hyper:
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, Tensor):
        v = v.tolist()
    try:
        return tuple(float(t) for t in v)
    except TypeError:
        raise TypeError(f"{name} must be a number or a sequence of numbers (one per layer), got {type(v).__name__}.") from None


@dataclass(frozen=True)
class ArchitectureSpec:
    r"""An MLP (2.5) with its initialization and training hyperparameters.

    Attributes:
        activation: name, module, callable or :class:`Activation`.
        widths: hidden widths :math:`(n_1, \dots, n_{L-1})`; the depth is ``len(widths) + 1``
            (the input dimension :math:`n_0` comes from ``x``). Each must be ``>= 2``.
        C_b, C_W: (2.19)–(2.20): scalar or one value per layer (length :math:`L`).
        lambda_b, lambda_W: learning rates of the book's tensor (8.6), scalar or per layer.
        n_out: output width :math:`n_L` (``>= 1``).
    """

    activation: Any
    widths: tuple[int, ...]
    C_b: Hyper = 0.0
    C_W: Hyper = 1.0
    lambda_b: Hyper = 1.0
    lambda_W: Hyper = 1.0
    n_out: int = 1

    def __post_init__(self) -> None:
        w = tuple(int(v) for v in self.widths)
        if any(v < 2 for v in w):
            raise ValueError(f"hidden widths must be >= 2, got {w}; the 1/n expansion needs wide layers.")
        object.__setattr__(self, "widths", w)
        object.__setattr__(self, "activation", get_activation(self.activation))
        for name in ("C_b", "C_W", "lambda_b", "lambda_W"):
            v = _tuple(getattr(self, name), name)
            if isinstance(v, tuple) and len(v) != self.depth:
                raise ValueError(
                    f"{name} has {len(v)} values but the network has depth L={self.depth} "
                    f"(len(widths) + 1); give one value per layer or a scalar."
                )
            object.__setattr__(self, name, v)
        if int(self.n_out) < 1:
            raise ValueError(f"n_out must be >= 1, got {self.n_out}.")
        object.__setattr__(self, "n_out", int(self.n_out))

    @property
    def depth(self) -> int:
        """Number of weight layers :math:`L`."""
        return len(self.widths) + 1

    def layer_value(self, name: str, layer: int) -> float:
        """Hyperparameter ``name`` of layer ``layer`` (1-based)."""
        v = getattr(self, name)
        return float(v if isinstance(v, float) else v[layer - 1])

    @classmethod
    def critical(
        cls,
        activation: Any,
        depth: int,
        width: int,
        *,
        n_out: int = 1,
        n_in: int | None = None,
        lambda_b: float = 1.0,
        lambda_W: float = 1.0,
        learning_rates: str = "equivalence",
    ) -> "ArchitectureSpec":
        r"""A depth-``depth`` MLP of equal hidden width at the activation's critical point.

        Args:
            activation: an activation with a critical point (:func:`~torch_crit.theory.critical_point`).
            depth: :math:`L \ge 1`; width: hidden width :math:`n`.
            n_out: output width.
            n_in: input width :math:`n_0` (fan-in of layer 1, for the learning-rate helper).
            lambda_b, lambda_W: :math:`\tilde\lambda_b, \tilde\lambda_W`.
            learning_rates: ``"equivalence"`` — the per-layer rates of the learning-rate
                equivalence principle (9.94)–(9.96); ``"uniform"`` — :math:`\lambda` constant.

        Returns:
            :class:`ArchitectureSpec`.
        """
        from .criticality import critical_point

        cp = critical_point(activation)
        if learning_rates == "uniform":
            lb, lw = float(lambda_b), float(lambda_W)
        elif learning_rates == "equivalence":
            from .learning_rates import layer_learning_rates

            rates = [layer_learning_rates(cp, l, depth, n_in if (l == 1 and n_in) else width,
                                          lambda_b=lambda_b, lambda_W=lambda_W) for l in range(1, depth + 1)]
            lb = tuple(r.lambda_b for r in rates)
            lw = tuple(r.lambda_W for r in rates)
        else:
            raise ValueError(f"learning_rates must be 'equivalence' or 'uniform', got {learning_rates!r}.")
        return cls(cp.activation, (int(width),) * (depth - 1), cp.C_b, cp.C_W, lb, lw, n_out)


@dataclass(frozen=True)
class Prediction:
    r"""Everything the theory predicts for one network and one set of inputs.

    Layer :math:`\ell = 1..L` is always dim 0; :math:`N` inputs.

    Attributes:
        spec: the :class:`ArchitectureSpec` used.
        gram: ``[N, N]`` input Gram :math:`x x^\top/n_0`.
        fan_in: ``[L]`` :math:`n_{\ell-1}` (the width normalising layer-:math:`\ell` tensors).
        K, Theta: ``[L, N, N]`` kernel (4.118) and frozen NTK (9.5).
        V: ``[L, N, N, N, N]`` four-point vertex (4.119) (``None`` when ``multi_input=False``).
        G1: ``[L, N, N]`` NLO metric (4.115), or its diagonal from (5.110) embedded in a
            diagonal matrix when ``multi_input=False``.
        mean_metric: ``[L, N, N]`` :math:`K + G^{\{1\}}/n_{\ell-1}` (5.135).
        single: :class:`SingleInputTheory` (per-input ``[L, N]``: K, Θ, V, G1, A, B, D, F, P, Q, χ).
        multi: :class:`FiniteWidthTensors` (multi-input V, G1 and, if requested, A, B, D, F) or ``None``.
        ratios: per-input normalised ratios ``[L, N]`` (keys ``"V/(nK^2)"``, ``"A/(nTheta^2)"``,
            ``"B/(nTheta^2)"``, ``"D/(nKTheta)"``, ``"F/(nKTheta)"``, ``"P/(nTheta^2)"``,
            ``"Q/(nTheta^2)"``, ``"G1/(nK)"``), with :math:`n = n_{\ell-1}`.
        exact: all-orders single-input metric moments for scale-invariant activations
            (:func:`~torch_crit.theory.finite_width.exact_metric_moments`), else ``None``.
        aspect_ratio: :math:`r = L/n` with :math:`n` the mean hidden width (3.52).
        expansion_parameter: :math:`\epsilon` = the largest output-layer :math:`V/(nK^2)` over inputs.
        nu: :math:`\epsilon/r`, the effective coefficient of :math:`V/(nK^2) = \nu r` (5.130)–(5.131).
        optimal_aspect_ratio: :math:`r^\star = 4/((20 + 3n_L)\nu)` (A.73).
        regime: ``"lazy"``, ``"effective-theory"`` or ``"strongly-coupled"``.
        notes: remarks (divergences, assumptions made reading a model).
    """

    spec: ArchitectureSpec
    gram: Tensor
    fan_in: Tensor
    K: Tensor
    Theta: Tensor
    V: Tensor | None
    G1: Tensor
    mean_metric: Tensor
    single: SingleInputTheory
    multi: FiniteWidthTensors | None
    ratios: dict[str, Tensor]
    exact: ExactMetricMoments | None
    aspect_ratio: float
    expansion_parameter: float
    nu: float
    optimal_aspect_ratio: float
    regime: str
    notes: tuple[str, ...] = field(default=())

    def summary(self) -> str:
        """A few lines: depth, widths, r, ε, regime and the output-layer ratios."""
        L = self.spec.depth
        lines = [
            f"{self.spec.activation.key} MLP: L={L}, hidden widths={self.spec.widths}, n_out={self.spec.n_out}",
            f"r = L/n = {self.aspect_ratio:.4g}; normalised vertex at the output eps = {self.expansion_parameter:.4g} "
            f"(nu = {self.nu:.4g}); regime: {self.regime}; optimal r* (A.73) = {self.optimal_aspect_ratio:.4g}",
        ]
        for k, v in self.ratios.items():
            lines.append(f"  {k:>14s} at l=L: " + ", ".join(f"{float(t):.4g}" for t in v[-1]))
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def _regime(eps: float) -> str:
    lo, hi = REGIME_THRESHOLDS
    if eps < lo:
        return "lazy"
    if eps < hi:
        return "effective-theory"
    return "strongly-coupled"


def _spec_from_model(model: nn.Module, activation: Any | None, C_b: Any, C_W: Any,
                     lambda_b: Any, lambda_W: Any) -> tuple[ArchitectureSpec, list[str]]:
    """Read the Linear layers of a plain MLP (via ``torch_crit.architecture.analyse`` if available)."""
    notes: list[str] = []
    linears: list[nn.Linear]
    act: Any = activation
    try:
        from torch_crit.architecture import analyse, criticality_activation

        plan = analyse(model, activation)
        layers = [l for l in plan.layers if l.kind != "norm"]
        bad = [l.name for l in layers if l.kind != "linear" or l.residual is not None]
        if bad:
            raise NotImplementedError(
                f"predict reads plain MLPs (Linear layers and activations); layers {bad} are not plain Linear "
                "layers. Use an ArchitectureSpec, or torch_crit.theory.residual for residual networks."
            )
        linears = [model.get_submodule(l.name) for l in layers]
        if act is None:
            found = [criticality_activation(l, plan) for l in layers]
            keys = sorted({a.key for a in found})
            if len(keys) != 1:
                raise ValueError(f"predict needs one activation throughout; found {keys}. Pass activation=.")
            act = found[-1]
        notes.append(f"architecture read with torch_crit.architecture.analyse ({plan.method})")
    except ImportError:  # documented fallback: nn.Sequential of Linear and activation modules
        if not isinstance(model, nn.Sequential):
            raise TypeError("without torch_crit.architecture, predict reads only nn.Sequential MLPs.") from None
        linears = [m for m in model if isinstance(m, nn.Linear)]
        others = [m for m in model if not isinstance(m, nn.Linear)]
        if act is None:
            if not others:
                act = "linear"
            else:
                keys = {get_activation(m).key for m in others}
                if len(keys) != 1:
                    raise ValueError(f"predict needs one activation; found {sorted(keys)}. Pass activation=.")
                act = others[0]
        notes.append("architecture read from nn.Sequential (fallback)")
    if not linears:
        raise ValueError("the model has no Linear layers.")
    act = get_activation(act)
    widths = tuple(int(m.out_features) for m in linears[:-1])
    for a, b in zip(linears[:-1], linears[1:]):
        if a.out_features != b.in_features:
            raise ValueError(f"consecutive Linear layers do not chain ({a} -> {b}); predict needs a plain MLP.")
    if C_b is None or C_W is None:
        from .criticality import critical_point

        cp = critical_point(act)
        C_b = cp.C_b if C_b is None else C_b
        C_W = cp.C_W if C_W is None else C_W
        notes.append(f"C_b, C_W taken from the critical point of {act.key} (as torch_crit.init_ sets them)")
        with torch.no_grad():
            for l, m in enumerate(linears, start=1):
                cw_hat = float(m.weight.double().pow(2).mean()) * m.in_features
                cw = float(C_W if isinstance(C_W, (int, float)) else C_W[l - 1])
                n_el = m.weight.numel()
                if n_el >= 64 and abs(cw_hat / cw - 1) > 6 * math.sqrt(2 / n_el) + 0.05:
                    warnings.warn(
                        f"layer {l}: weights have fan_in * mean(W^2) = {cw_hat:.4g}, not C_W = {cw:.4g}; the model "
                        "does not look critically initialised. Call torch_crit.init_(model) or pass C_W=.",
                        UserWarning, stacklevel=3,
                    )
    spec = ArchitectureSpec(act, widths, _tuple(C_b, "C_b"), _tuple(C_W, "C_W"), _tuple(lambda_b, "lambda_b"),
                            _tuple(lambda_W, "lambda_W"), int(linears[-1].out_features))
    return spec, notes


def predict(
    model_or_spec: ArchitectureSpec | nn.Module,
    x: Tensor,
    *,
    multi_input: bool | None = None,
    ntk_multi_input: bool = False,
    activation: Any | None = None,
    C_b: Any = None,
    C_W: Any = None,
    lambda_b: Any = 1.0,
    lambda_W: Any = 1.0,
) -> Prediction:
    r"""All theory predictions for an MLP on inputs ``x``.

    Args:
        model_or_spec: an :class:`ArchitectureSpec`, or an ``nn.Module`` MLP (Linear layers and
            one activation) initialised by :func:`torch_crit.init_`; its widths are read from the
            Linear layers and :math:`(C_b, C_W)` from the activation's critical point unless given.
        x: inputs ``[N, n0]`` (or ``[n0]``).
        multi_input: run the multi-input recursions (4.115), (4.119) (default: when
            :math:`2 \le N \le 4`).
        ntk_multi_input: also the multi-input :math:`A, B, D, F` (8.77)–(8.97) (costly).
        activation, C_b, C_W, lambda_b, lambda_W: overrides when reading a model.

    Returns:
        :class:`Prediction`.

    Raises:
        ValueError: malformed inputs or specs; RecursionDivergenceError: the recursion blew up
            (the message names layer and tensor).
    """
    notes: list[str] = []
    if isinstance(model_or_spec, ArchitectureSpec):
        spec = model_or_spec
    elif isinstance(model_or_spec, nn.Module):
        spec, notes = _spec_from_model(model_or_spec, activation, C_b, C_W, lambda_b, lambda_W)
    else:
        raise TypeError(f"predict takes an ArchitectureSpec or an nn.Module, got {type(model_or_spec).__name__}.")
    xt = torch.as_tensor(x, dtype=torch.float64)
    if xt.dim() == 1:
        xt = xt[None]
    if xt.dim() != 2:
        raise ValueError(f"x must be [N, n0], got shape {tuple(xt.shape)}.")
    N = xt.shape[0]
    L = spec.depth
    gram = xt @ xt.T / xt.shape[1]
    widths = spec.widths if L > 1 else None
    kw = dict(lambda_b=spec.lambda_b, lambda_W=spec.lambda_W, widths=widths, gram=gram)
    single = single_input_recursions(spec.activation, spec.C_b, spec.C_W, None, L, **kw)
    if multi_input is None:
        multi_input = 2 <= N <= 4
    multi = None
    if multi_input:
        try:
            multi = finite_width_tensors(spec.activation, spec.C_b, spec.C_W, None, L, nlo=True, ntk=ntk_multi_input, **kw)
        except ValueError as err:
            if "degenerate" not in str(err) and "linearly independent" not in str(err):
                raise
            warnings.warn(f"multi-input recursions skipped: {err}", UserWarning, stacklevel=2)
            notes.append("multi-input recursions skipped (degenerate inputs); single-input only")
    if multi is not None:
        K, Theta, G1 = multi.K, multi.Theta, multi.G1
    else:
        from .kernels import kernel_and_ntk_recursion

        st = kernel_and_ntk_recursion(spec.activation, spec.C_b, spec.C_W, spec.lambda_b, spec.lambda_W,
                                      gram=gram, depth=L)
        K, Theta = st.K.to(torch.float64), st.Theta.to(torch.float64)
        G1 = torch.diag_embed(single.G1)
    fan_in = torch.tensor([xt.shape[1]] + list(spec.widths), dtype=torch.float64)
    mean_metric = K + G1 / fan_in[:, None, None]
    ratios = single.normalized(fan_in)
    exact = None
    if spec.activation.slopes is not None and L > 1:
        exact = exact_metric_moments(spec.activation, spec.C_b, spec.C_W, None, L, widths=spec.widths, gram=gram)
    n_mean = float(sum(spec.widths) / len(spec.widths)) if spec.widths else float(xt.shape[1])
    r = L / n_mean
    eps = float(ratios["V/(nK^2)"][-1].max())
    nu = eps / r if r > 0 else float("nan")
    r_star = 4.0 / ((20 + 3 * spec.n_out) * nu) if nu > 0 else float("inf")
    regime = _regime(eps)
    if regime == "effective-theory" and eps > 0.3:
        notes.append(f"eps = {eps:.3g} > 0.3: next-order (L/n)^2 corrections are of relative size ~eps")
    return Prediction(spec=spec, gram=gram, fan_in=fan_in, K=K, Theta=Theta, V=None if multi is None else multi.V,
                      G1=G1, mean_metric=mean_metric, single=single, multi=multi, ratios=ratios, exact=exact,
                      aspect_ratio=r, expansion_parameter=eps, nu=nu, optimal_aspect_ratio=r_star,
                      regime=regime, notes=tuple(notes))
