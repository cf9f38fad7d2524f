r"""Infinite-width learning: Bayesian posterior, frozen-NTK training, generalization (Ch. 6, 10).

All functions are pure and work on kernels (Gram matrices) over the joint sample set
:math:`\mathcal{D} = \mathcal{A} \cup \mathcal{B}` with the **training inputs first**:
a full Gram matrix has shape ``[N_A + N_B, N_A + N_B]`` and ``N_A`` is read off the number of
training targets. Rectangular blocks can be passed instead as a :class:`GramBlocks`.
Kernels are either the infinite-width ones of the book's recursions
(:func:`infinite_width_kernels`: the NNGP kernel :math:`K^{(L)}` of (4.118) and the frozen NTK
:math:`\Theta^{(L)}` of (9.5)) or an empirical NTK of one network
(:func:`torch_crit.empirical_ntk`), in which case the network's initial outputs :math:`f_0` enter.

Loss convention. The book's MSE is *extensive*, (10.5):
:math:`\mathcal{L}_\mathcal{A} = \tfrac12 \sum_{i}\sum_{\tilde\alpha\in\mathcal{A}} (z_{i;\tilde\alpha} - y_{i;\tilde\alpha})^2`,
so one step of tensorial gradient descent (7.11) moves the outputs by
:math:`-\eta\,\Theta_{\delta\tilde\alpha}(z_{\tilde\alpha} - y_{\tilde\alpha})` (10.3). PyTorch's
``MSELoss()`` averages over the ``N_A k`` entries: with it, the same trajectory needs
``learning_rate = eta * N_A * k`` there (footnote (7.5): a per-sample mean just rescales
:math:`\eta`). With learning-rate parameter groups whose ``lr`` already contain :math:`\eta`
(``torch_crit.param_groups``), the empirical NTK computed with those groups is
:math:`\eta\hat\Theta` and ``learning_rate=1`` reproduces SGD on ``0.5 * ((z - y)**2).sum()``.

Example::

    >>> import torch
    >>> from torch_crit.theory.learning import ntk_prediction
    >>> theta = torch.tensor([[2.0, 0.5, 0.3], [0.5, 1.5, 0.2], [0.3, 0.2, 1.0]], dtype=torch.float64)
    >>> y = torch.tensor([1.0, -1.0], dtype=torch.float64)      # two training points, one test point
    >>> ntk_prediction(y, theta, learning_rate=0.1, steps=[0, 10]).mean.shape
    torch.Size([2, 1])
"""
from __future__ import annotations

from ..errors import SingularKernelError, SingularKernelWarning  # noqa: F401  (re-exported)
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch
from torch import Tensor

__all__ = [
    "BiasVariance",
    "GramBlocks",
    "InfiniteWidthKernels",
    "KernelPrediction",
    "SingularKernelError",
    "SingularKernelWarning",
    "bias_variance",
    "bias_variance_scan",
    "infinite_width_kernels",
    "linearized_dynamics",
    "nngp_posterior",
    "ntk_prediction",
    "soft_label_targets",
]

_DT = torch.float64
Steps = Union[int, Sequence[int], Tensor, None]
Hyper = Union[float, Sequence[float], Tensor]


# --------------------------------------------------------------------------------------
# containers
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GramBlocks:
    r"""A kernel split into its training/test blocks.

    Attributes:
        train_train: :math:`k_{\tilde\alpha_1\tilde\alpha_2}`, shape ``[N_A, N_A]`` (kernel shared by
            the ``k`` output components, :math:`\delta_{ij}` implied) or ``[N_A, N_A, k, k]``.
        test_train: :math:`k_{\dot\beta\tilde\alpha}`, shape ``[N_B, N_A]`` or ``[N_B, N_A, k, k]``.
        test_test: :math:`k_{\dot\beta_1\dot\beta_2}`, shape ``[N_B, N_B]`` or ``[N_B, N_B, k, k]``;
            ``None`` when only means are wanted.
    """

    train_train: Tensor
    test_train: Tensor
    test_test: Tensor | None = None

    @classmethod
    def from_full(cls, gram: Tensor, n_train: int) -> GramBlocks:
        """Split a Gram matrix over D (training inputs first) at ``n_train``.

        Args:
            gram: shape ``[N_D, N_D]`` or ``[N_D, N_D, k, k]``.
            n_train: ``N_A``, the number of leading training inputs (``0 < N_A <= N_D``).

        Returns:
            The three blocks (``test_test`` has ``N_B = N_D - N_A`` rows, possibly zero).
        """
        if not isinstance(gram, Tensor) or gram.dim() not in (2, 4) or gram.shape[0] != gram.shape[1]:
            shape = tuple(gram.shape) if isinstance(gram, Tensor) else type(gram).__name__
            raise ValueError(
                f"a full Gram matrix must be a square tensor of shape [N_D, N_D] or [N_D, N_D, k, k]; "
                f"got {shape}. Pass the kernel over train+test inputs (train first) or a GramBlocks."
            )
        if not 0 < n_train <= gram.shape[0]:
            raise ValueError(
                f"n_train={n_train} must lie in [1, N_D={gram.shape[0]}]: the Gram matrix must cover the "
                "training inputs first, then the test inputs. Check that y_train matches the kernel."
            )
        a = n_train
        return cls(gram[:a, :a], gram[a:, :a], gram[a:, a:])


@dataclass(frozen=True)
class InfiniteWidthKernels:
    r"""Output-layer kernels of an MLP at infinite width over D = A ∪ B (training inputs first).

    Attributes:
        nngp: :math:`K^{(L)}_{\delta_1\delta_2}` of (4.118), shape ``[N_D, N_D]``.
        ntk: :math:`\Theta^{(L)}_{\delta_1\delta_2}` of (9.5), shape ``[N_D, N_D]``.
        n_train: ``N_A``.
    """

    nngp: Tensor
    ntk: Tensor
    n_train: int


@dataclass(frozen=True)
class KernelPrediction:
    r"""Gaussian prediction of the outputs on the test inputs.

    Attributes:
        mean: shape ``[N_B, k]`` (``[N_B]`` when ``y_train`` was 1-D); with several ``steps``,
            a leading ``[T]`` axis.
        cov: covariance over test inputs. ``[N_B, N_B]`` (``[T, N_B, N_B]``) when the kernels are
            shared by the output components: :math:`\mathrm{Cov}[z_{i_1;\dot\beta_1}, z_{i_2;\dot\beta_2}]
            = \delta_{i_1 i_2}\,\mathrm{cov}_{\dot\beta_1\dot\beta_2}`; ``[N_B, N_B, k, k]``
            (``[T, N_B, N_B, k, k]``) for output-resolved kernels. ``None`` when not requested, when
            no NNGP kernel was given, or for a single network (``f0`` given: deterministic).
        steps: the step counts, shape ``[T]`` (int64), or ``None`` for the converged (t → ∞) solution.
        lambda_max: largest eigenvalue of the training block of the kernel that was inverted.
        lambda_min: smallest eigenvalue of that block (before any jitter).
        jitter: diagonal shift added to the training block (0.0 when none).
        log_evidence: :math:`\log p(y_\mathcal{A})` of (6.34) (NNGP posterior only, else ``None``).
    """

    mean: Tensor
    cov: Tensor | None
    steps: Tensor | None
    lambda_max: float
    lambda_min: float
    jitter: float
    log_evidence: float | None = None


@dataclass(frozen=True)
class BiasVariance:
    r"""Generalized bias–variance decomposition of the expected test loss, (10.52)/(10.55).

    Attributes:
        bias: :math:`\mathcal{L}_\mathcal{B}(m^\infty)`, scalar tensor (``[T]`` for several steps).
        variance: :math:`\tfrac12\sum \partial^2\mathcal{L}_\mathcal{B}\,\mathrm{Cov}`, same shape.
        total: ``bias + variance`` (exact for MSE, second-order for cross-entropy).
        per_sample_bias: shape ``[N_B]`` (``[T, N_B]``).
        per_sample_variance: shape ``[N_B]`` (``[T, N_B]``).
    """

    bias: Tensor
    variance: Tensor
    total: Tensor
    per_sample_bias: Tensor
    per_sample_variance: Tensor


# --------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------
def _as_targets(y_train: Tensor, name: str = "y_train") -> tuple[Tensor, bool]:
    if not isinstance(y_train, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [N_A] or [N_A, k]; got {type(y_train).__name__}.")
    if y_train.dim() not in (1, 2) or y_train.shape[0] == 0:
        raise ValueError(
            f"{name} must have shape [N_A] or [N_A, k] with N_A >= 1; got {tuple(y_train.shape)}. "
            "Reshape multi-dimensional targets to [N_A, k]."
        )
    if not torch.is_floating_point(y_train):
        y_train = y_train.to(_DT)
    squeeze = y_train.dim() == 1
    return (y_train.unsqueeze(1) if squeeze else y_train).to(_DT), squeeze


def _blocks(kernel: Tensor | GramBlocks, n_train: int, name: str) -> GramBlocks:
    if isinstance(kernel, GramBlocks):
        blocks = kernel
    elif isinstance(kernel, Tensor):
        blocks = GramBlocks.from_full(kernel, n_train)
    else:
        raise TypeError(
            f"{name} must be a Tensor (full Gram over train+test, train first), a GramBlocks or an "
            f"InfiniteWidthKernels; got {type(kernel).__name__}."
        )
    tt, st = blocks.train_train, blocks.test_train
    full = tt.dim() == 4
    want = 4 if full else 2
    for part, arr in (("train_train", tt), ("test_train", st), ("test_test", blocks.test_test)):
        if arr is not None and arr.dim() != want:
            raise ValueError(
                f"{name}.{part} has {arr.dim()} dimensions but train_train has {tt.dim()}: all blocks must be "
                "[N, N] (shared by outputs) or all [N, N, k, k] (output-resolved)."
            )
    if tt.shape[0] != n_train or tt.shape[1] != n_train:
        raise ValueError(
            f"{name}: training block has shape {tuple(tt.shape)} but y_train has N_A={n_train} rows; "
            "they must agree (training inputs first in a full Gram matrix)."
        )
    if st.shape[1] != n_train:
        raise ValueError(f"{name}.test_train has shape {tuple(st.shape)}; its second axis must be N_A={n_train}.")
    if blocks.test_test is not None and tuple(blocks.test_test.shape[:2]) != (st.shape[0], st.shape[0]):
        raise ValueError(
            f"{name}.test_test has shape {tuple(blocks.test_test.shape)}; expected N_B x N_B with "
            f"N_B={st.shape[0]} (rows of test_train)."
        )
    if full:
        k = tt.shape[2]
        for part, arr in (("train_train", tt), ("test_train", st), ("test_test", blocks.test_test)):
            if arr is not None and tuple(arr.shape[2:]) != (k, k):
                raise ValueError(f"{name}.{part} has output axes {tuple(arr.shape[2:])}; expected ({k}, {k}).")
    return GramBlocks(tt.to(_DT), st.to(_DT), None if blocks.test_test is None else blocks.test_test.to(_DT))


def _flat(a: Tensor) -> Tensor:
    """[N1, N2, k, k] → [N1 k, N2 k] with row index α k + i."""
    n1, n2, k1, k2 = a.shape
    return a.permute(0, 2, 1, 3).reshape(n1 * k1, n2 * k2)


def _unflat(a: Tensor, k: int) -> Tensor:
    """[..., N1 k, N2 k] → [..., N1, N2, k, k]."""
    *lead, m1, m2 = a.shape
    return a.reshape(*lead, m1 // k, k, m2 // k, k).movedim(-3, -2)


def _expand(blocks: GramBlocks, k: int) -> GramBlocks:
    """Output-shared blocks → flattened output-resolved blocks (Kronecker with I_k)."""
    if blocks.train_train.dim() == 4:
        if blocks.train_train.shape[2] != k:
            raise ValueError(
                f"output-resolved kernel has k={blocks.train_train.shape[2]} outputs but the targets have k={k}."
            )
        f = _flat
    else:
        eye = torch.eye(k, dtype=_DT)

        def f(a: Tensor) -> Tensor:
            return torch.kron(a, eye)

    return GramBlocks(f(blocks.train_train), f(blocks.test_train), None if blocks.test_test is None else f(blocks.test_test))


def _steps(steps: Steps) -> Tensor | None:
    if steps is None:
        return None
    t = torch.as_tensor(steps)
    if t.dim() > 1 or t.numel() == 0 or t.is_floating_point() and not torch.equal(t, t.round()):
        raise ValueError(f"steps must be None (t → ∞), an int or a 1-D sequence of ints; got {steps!r}.")
    t = t.to(torch.int64).reshape(-1)
    if (t < 0).any():
        raise ValueError(f"steps must be >= 0; got {t.tolist()}.")
    return t


@dataclass(frozen=True)
class _Spectrum:
    evals: Tensor  # [m], clipped at 0, jitter included
    evecs: Tensor  # [m, m]
    lambda_max: float
    lambda_min: float
    jitter: float


def _spectrum(block: Tensor, *, name: str, need_inverse: bool, jitter: float | Literal["auto"] | None, shift: float = 0.0) -> _Spectrum:
    m = block.shape[0]
    if not torch.isfinite(block).all():
        raise ValueError(f"{name}: the training block contains non-finite values (NaN/inf).")
    scale = float(block.abs().max()) if m else 0.0
    asym = float((block - block.T).abs().max()) if m else 0.0
    if asym > 1e-8 * max(scale, 1e-300):
        raise ValueError(
            f"{name}: the training block is not symmetric (max |k - kᵀ| = {asym:.3g}, scale {scale:.3g}); "
            "a kernel must be a symmetric positive-semidefinite Gram matrix."
        )
    evals, evecs = torch.linalg.eigh(0.5 * (block + block.T))
    lmax, lmin = float(evals[-1]), float(evals[0])
    tol = 10.0 * m * torch.finfo(_DT).eps * max(abs(lmax), 1e-300)
    if lmax <= 0.0:
        raise ValueError(f"{name}: the training block has no positive eigenvalue (λ_max = {lmax:.3g}); the kernel is zero or invalid.")
    if lmin < -1e3 * tol:
        raise ValueError(
            f"{name}: the training block is not positive semidefinite (λ_min = {lmin:.3g}, λ_max = {lmax:.3g}); "
            "a kernel must be a Gram matrix. Check how it was computed (dtype, symmetric inputs)."
        )
    evals = evals.clamp_min(0.0)
    added = 0.0
    if isinstance(jitter, (int, float)) and not isinstance(jitter, bool):
        if jitter < 0 or not math.isfinite(jitter):
            raise ValueError(f"jitter must be a finite float >= 0, 'auto' or None; got {jitter!r}.")
        added = float(jitter)
    elif need_inverse and lmin + shift <= tol:
        if jitter is None:
            raise SingularKernelError(
                f"{name}: the training block is numerically singular (λ_min = {lmin:.3g}, λ_max = {lmax:.3g}, "
                f"threshold {tol:.3g}): duplicate or collinear training inputs, or a degenerate kernel. "
                "Pass jitter='auto' or a float, add observation noise, or remove duplicate inputs."
            )
        if jitter != "auto":
            raise ValueError(f"jitter must be a finite float >= 0, 'auto' or None; got {jitter!r}.")
        added = max(1e-10 * lmax, 100.0 * tol)
        warnings.warn(
            f"{name}: the training block is numerically singular (λ_min = {lmin:.3g}, λ_max = {lmax:.3g}); "
            f"added jitter {added:.3g}·I. Pass jitter=None to raise instead, or a float to choose it.",
            SingularKernelWarning,
            stacklevel=3,
        )
    return _Spectrum(evals + added, evecs, lmax, lmin, added)


def _gd_filter(evals: Tensor, eta: float, steps: Tensor) -> Tensor:
    r"""φ_t(λ) = η Σ_{s<t} (1 - ηλ)^s = [1 - (1 - ηλ)^t] / λ  (η t at λ = 0); shape [T, m]."""
    x = eta * evals  # [m], in [0, 2)
    t = steps.to(_DT)[:, None]  # [T, 1]
    small = x < 0.5
    xs = torch.where(small, x, torch.zeros_like(x))
    one_minus_pow_small = -torch.expm1(t * torch.log1p(-xs))  # exact for small ηλ (no cancellation)
    base = 1.0 - x
    sign = torch.where((base < 0) & (steps[:, None] % 2 == 1), -1.0, 1.0).to(_DT)
    one_minus_pow_large = 1.0 - sign * base.abs().pow(t)
    one_minus_pow = torch.where(small, one_minus_pow_small, one_minus_pow_large)
    positive = evals > 0
    safe = torch.where(positive, evals, torch.ones_like(evals))
    return torch.where(positive, one_minus_pow / safe, eta * t.expand(-1, evals.shape[0]))


def _check_rate(learning_rate: float | None, spec: _Spectrum, name: str) -> float | None:
    if learning_rate is None:
        return None
    eta = float(learning_rate)
    if not math.isfinite(eta) or eta <= 0:
        raise ValueError(f"learning_rate must be a finite float > 0; got {learning_rate!r}.")
    lmax = spec.lambda_max + spec.jitter
    if eta * lmax >= 2.0:
        raise ValueError(
            f"learning_rate={eta:.6g} is at or above the stability limit 2/λ_max = {2.0 / lmax:.6g} of gradient "
            f"descent (λ_max = {lmax:.6g} is the largest eigenvalue of the training block of {name}): the "
            f"linearized dynamics diverge. Use learning_rate < {2.0 / lmax:.6g} (typically ≈ 1/λ_max)."
        )
    return eta


def _kernels_from_spec(
    activation: Any, C_b: Hyper | None, C_W: Hyper | None, depth: int | None, x_train: Tensor | None,
    x_test: Tensor | None, lambda_b: Hyper, lambda_W: Hyper, caller: str,
) -> InfiniteWidthKernels:
    missing = [n for n, v in (("activation", activation), ("C_b", C_b), ("C_W", C_W), ("depth", depth), ("x_train", x_train)) if v is None]
    if missing:
        raise ValueError(
            f"{caller}: pass a kernel, or all of activation, C_b, C_W, depth, x_train (and x_test) to build it "
            f"from the infinite-width recursions; missing: {', '.join(missing)}."
        )
    return infinite_width_kernels(activation, C_b, C_W, depth, x_train, x_test, lambda_b=lambda_b, lambda_W=lambda_W)


# --------------------------------------------------------------------------------------
# kernels from the recursions
# --------------------------------------------------------------------------------------
def infinite_width_kernels(
    activation: Any,
    C_b: Hyper,
    C_W: Hyper,
    depth: int,
    x_train: Tensor,
    x_test: Tensor | None = None,
    *,
    lambda_b: Hyper = 1.0,
    lambda_W: Hyper = 1.0,
    n_nodes: int | None = None,
) -> InfiniteWidthKernels:
    r"""Output-layer NNGP kernel and frozen NTK of a depth-``L`` MLP at infinite width.

    .. math::
        K^{(\ell+1)}_{\delta_1\delta_2} = C_b + C_W\langle\sigma_{\delta_1}\sigma_{\delta_2}\rangle_{K^{(\ell)}},\qquad
        \Theta^{(\ell+1)}_{\delta_1\delta_2} = \lambda_b^{(\ell+1)} + \lambda_W^{(\ell+1)}
        \langle\sigma_{\delta_1}\sigma_{\delta_2}\rangle_{K^{(\ell)}}
        + C_W\langle\sigma'_{\delta_1}\sigma'_{\delta_2}\rangle_{K^{(\ell)}}\Theta^{(\ell)}_{\delta_1\delta_2}

    ((4.118) and (9.5)), evaluated by :func:`torch_crit.theory.kernel_and_ntk_recursion`
    at ``ℓ = L`` on the inputs ``[x_train; x_test]``.

    Args:
        activation: anything :func:`torch_crit.theory.get_activation` accepts.
        C_b, C_W: initialization hyperparameters (scalars or per-layer sequences of length L).
        depth: ``L``, the number of weight layers.
        x_train: training inputs, shape ``[N_A, n_0]``.
        x_test: test inputs, shape ``[N_B, n_0]`` (``None``: ``N_B = 0``).
        lambda_b, lambda_W: training hyperparameters :math:`\lambda_b^{(\ell)}, \lambda_W^{(\ell)}`
            (scalars or per-layer sequences), as in (8.6).
        n_nodes: quadrature nodes per panel for activations without a closed-form kernel
            (default: the recursion's).

    Returns:
        :class:`InfiniteWidthKernels` with ``[N_D, N_D]`` float64 kernels, ``N_D = N_A + N_B``.
    """
    from torch_crit.theory.kernels import kernel_and_ntk_recursion

    if not isinstance(x_train, Tensor) or x_train.dim() != 2:
        raise ValueError(f"x_train must be a tensor of shape [N_A, n_0]; got {getattr(x_train, 'shape', type(x_train))}.")
    x = x_train
    if x_test is not None:
        if not isinstance(x_test, Tensor) or x_test.dim() != 2 or x_test.shape[1] != x_train.shape[1]:
            raise ValueError(
                f"x_test must have shape [N_B, n_0={x_train.shape[1]}]; got {getattr(x_test, 'shape', type(x_test))}."
            )
        x = torch.cat([x_train, x_test.to(x_train.dtype)], 0)
    x = x.to(_DT)
    stacks = kernel_and_ntk_recursion(activation, C_b, C_W, lambda_b, lambda_W, x, depth, n_nodes=n_nodes)
    return InfiniteWidthKernels(nngp=stacks.K[-1].to(_DT), ntk=stacks.Theta[-1].to(_DT), n_train=int(x_train.shape[0]))


# --------------------------------------------------------------------------------------
# Bayesian inference at infinite width, §6.3
# --------------------------------------------------------------------------------------
def nngp_posterior(
    y_train: Tensor,
    kernel: Tensor | GramBlocks | InfiniteWidthKernels | None = None,
    *,
    activation: Any = None,
    C_b: Hyper | None = None,
    C_W: Hyper | None = None,
    depth: int | None = None,
    x_train: Tensor | None = None,
    x_test: Tensor | None = None,
    noise: float = 0.0,
    compute_cov: bool = True,
    jitter: float | Literal["auto"] | None = "auto",
) -> KernelPrediction:
    r"""Exact Bayesian posterior of an infinite-width network on test inputs, §6.3.

    .. math::
        m^\infty_{i;\dot\beta} = \sum_{\tilde\alpha_1\tilde\alpha_2} K_{\dot\beta\tilde\alpha_1}
            \tilde K^{\tilde\alpha_1\tilde\alpha_2} y_{i;\tilde\alpha_2}\quad(6.64),\qquad
        \mathbb{K}_{\dot\beta_1\dot\beta_2} = K_{\dot\beta_1\dot\beta_2}
            - \sum K_{\dot\beta_1\tilde\alpha_3}\tilde K^{\tilde\alpha_3\tilde\alpha_4}K_{\tilde\alpha_4\dot\beta_2}\quad(6.57)

    with :math:`\tilde K` the training block inverted on A only, and the log evidence (6.34),
    :math:`\log p(y_\mathcal{A}) = -\tfrac{n_L}{2}\log|2\pi\tilde K| - \tfrac12\sum_i y_i^\top\tilde K^{-1}y_i`
    (maximal at criticality, §6.3.1). Output components are independent (6.66).

    Extension beyond the book: ``noise = s²`` replaces :math:`\tilde K` by :math:`\tilde K + s^2 I`
    (Gaussian observation noise / ridge); the book's setup has none.

    Args:
        y_train: targets, shape ``[N_A]`` or ``[N_A, k]``.
        kernel: :math:`K^{(L)}` over D (``[N_D, N_D]``, training inputs first), a :class:`GramBlocks`
            or an :class:`InfiniteWidthKernels` (its ``nngp``). ``None``: built by
            :func:`infinite_width_kernels` from ``activation, C_b, C_W, depth, x_train, x_test``.
        activation, C_b, C_W, depth, x_train, x_test: the architecture, used when ``kernel`` is None.
        noise: observation-noise variance ``s² >= 0`` (extension, default 0 as in the book).
        compute_cov: also return the posterior covariance (needs the test–test block).
        jitter: for a singular training block: ``"auto"`` adds a small ``ε I`` with a
            :class:`SingularKernelWarning`, ``None`` raises :class:`SingularKernelError`, a float
            is always added.

    Returns:
        :class:`KernelPrediction` with ``mean [N_B, k]``, ``cov [N_B, N_B]`` and ``log_evidence``.
    """
    y, squeeze = _as_targets(y_train)
    if kernel is None:
        kernel = _kernels_from_spec(activation, C_b, C_W, depth, x_train, x_test, 1.0, 1.0, "nngp_posterior")
    if isinstance(kernel, InfiniteWidthKernels):
        kernel = kernel.nngp
    blocks = _blocks(kernel, y.shape[0], "kernel")
    if blocks.train_train.dim() == 4:
        raise ValueError(
            "nngp_posterior: the NNGP kernel of an infinite-width network is shared by the output components "
            "(δ_ij, (6.66)); pass a [N_D, N_D] kernel, not an output-resolved [N_D, N_D, k, k] one."
        )
    noise = float(noise)
    if noise < 0 or not math.isfinite(noise):
        raise ValueError(f"noise must be a finite variance >= 0; got {noise!r}.")
    spec = _spectrum(blocks.train_train, name="kernel", need_inverse=True, jitter=jitter, shift=noise)
    ev = spec.evals + noise
    V = spec.evecs
    P = (blocks.test_train @ V) / ev @ V.T  # [N_B, N_A]
    mean = P @ y
    cov = None
    if compute_cov:
        if blocks.test_test is None:
            raise ValueError("compute_cov=True needs the test-test block of the kernel; pass it or compute_cov=False.")
        cov = blocks.test_test - P @ blocks.test_train.T
        cov = 0.5 * (cov + cov.T)
    Vy = V.T @ y  # [N_A, k]
    k = y.shape[1]
    log_ev = -0.5 * k * float(torch.log(2 * math.pi * ev).sum()) - 0.5 * float(((Vy**2) / ev[:, None]).sum())
    return KernelPrediction(
        mean=mean.squeeze(-1) if squeeze else mean, cov=cov, steps=None, lambda_max=spec.lambda_max,
        lambda_min=spec.lambda_min, jitter=spec.jitter + noise if noise else spec.jitter, log_evidence=log_ev,
    )


# --------------------------------------------------------------------------------------
# frozen-NTK gradient descent, §10.1–§10.2
# --------------------------------------------------------------------------------------
def soft_label_targets(p: Tensor, *, center: bool = True) -> Tensor:
    r"""Finite logit targets :math:`y_{i;\tilde\alpha}` for a cross-entropy target distribution, §10.2.3.

    The cross-entropy loss (10.36) is minimized at :math:`z = y` with :math:`p = \mathrm{softmax}(y)`
    (10.37), so :math:`y = \log p` up to a per-sample shift :math:`c_{\tilde\alpha}` that drops out
    of the softmax. Hard (one-hot) labels put :math:`y` at infinity; use label smoothing
    (:math:`p = 1-\epsilon` on the true class) or early stopping, as the book notes.

    Args:
        p: target distributions, shape ``[N_A, k]``, entries in (0, 1], rows summing to 1.
        center: remove the per-sample mean of the logits (fixes the shift ambiguity).

    Returns:
        Logit targets, shape ``[N_A, k]``, float64.
    """
    if not isinstance(p, Tensor) or p.dim() != 2:
        raise ValueError(f"p must be a tensor of shape [N_A, k]; got {getattr(p, 'shape', type(p))}.")
    p = p.to(_DT)
    if (p <= 0).any():
        raise ValueError(
            f"p has {int((p <= 0).sum())} entries <= 0 (min {float(p.min()):.3g}): hard labels put the logit "
            "targets at infinity and the converged solution does not exist (§10.2.3). Use label smoothing, "
            "e.g. p = (1 - eps) * onehot + eps / k."
        )
    rows = p.sum(1)
    if not torch.allclose(rows, torch.ones_like(rows), atol=1e-6):
        raise ValueError(f"rows of p must sum to 1; got sums in [{float(rows.min()):.6g}, {float(rows.max()):.6g}].")
    y = p.log()
    return y - y.mean(1, keepdim=True) if center else y


def ntk_prediction(
    y_train: Tensor,
    ntk: Tensor | GramBlocks | InfiniteWidthKernels | None = None,
    nngp: Tensor | GramBlocks | None = None,
    *,
    learning_rate: float | None = None,
    steps: Steps = None,
    f0: Tensor | None = None,
    activation: Any = None,
    C_b: Hyper | None = None,
    C_W: Hyper | None = None,
    lambda_b: Hyper = 1.0,
    lambda_W: Hyper = 1.0,
    depth: int | None = None,
    x_train: Tensor | None = None,
    x_test: Tensor | None = None,
    loss: Literal["mse", "cross_entropy"] = "mse",
    compute_cov: bool = True,
    jitter: float | Literal["auto"] | None = "auto",
) -> KernelPrediction:
    r"""Outputs on test inputs after ``t`` steps of gradient descent with a frozen NTK, Ch. 10.

    Gradient descent on the extensive MSE (10.5) with a frozen kernel moves the outputs by
    (10.3), :math:`z_\delta(t+1) = z_\delta(t) - \eta\sum_{\tilde\alpha}\Theta_{\delta\tilde\alpha}
    (z_{\tilde\alpha}(t) - y_{\tilde\alpha})`; summing the geometric series [derived here],

    .. math::
        z_{\dot\beta}(t) = z_{\dot\beta}(0) - \Theta_{\dot\beta\mathcal{A}}\,\phi_t(\tilde\Theta)\,
            \big(z_\mathcal{A}(0) - y_\mathcal{A}\big),\qquad
        \phi_t(\lambda) = \eta\sum_{s<t}(1-\eta\lambda)^s = \frac{1-(1-\eta\lambda)^t}{\lambda},

    and :math:`\phi_\infty(\lambda) = 1/\lambda` gives the converged "giant leap" (10.31)/(10.39),
    the same for every algorithm that reaches the minimum (10.35). With :math:`z(0)` the
    zero-mean Gaussian initial outputs of covariance :math:`K\delta_{ij}` and
    :math:`P_t = \Theta_{\mathcal{B}\mathcal{A}}\phi_t(\tilde\Theta)`, the ensemble mean and
    covariance are (10.40)–(10.41) at :math:`t\to\infty`:

    .. math::
        m_{\dot\beta}(t) = P_t\,y_\mathcal{A},\qquad
        \Sigma(t) = K_{\mathcal{BB}} - P_tK_{\mathcal{AB}} - K_{\mathcal{BA}}P_t^\top + P_tK_{\mathcal{AA}}P_t^\top .

    With ``f0`` (one network's initial outputs) and its empirical NTK the result is that network's
    linearized model: ``mean = f0_B - P_t (f0_A - y)`` and ``cov = None``. An output-resolved NTK
    ``[N_D, N_D, k, k]`` is inverted on the joint (sample, output) space, as in (∞.71).

    Cross-entropy (10.36): the converged solution is the same giant leap with the finite logit
    targets of :func:`soft_label_targets` (soft labels, §10.2.3), so ``loss="cross_entropy"``
    with ``steps=None`` takes target *distributions* ``p`` as ``y_train``. At finite ``t`` the
    softmax makes the output dynamics nonlinear: there is no closed form for the ensemble mean
    or covariance; one network's frozen-NTK trajectory is computed exactly by
    :func:`linearized_dynamics` (sample ``f0 ~ N(0, K)`` for ensemble statistics).

    Args:
        y_train: targets ``[N_A]`` or ``[N_A, k]`` (for ``loss="cross_entropy"``: distributions ``[N_A, k]``).
        ntk: :math:`\Theta` over D (``[N_D, N_D]`` or ``[N_D, N_D, k, k]``, training inputs first), a
            :class:`GramBlocks`, or an :class:`InfiniteWidthKernels` (which also supplies ``nngp``).
            ``None``: built from the architecture arguments.
        nngp: :math:`K` over D for the covariance (``[N_D, N_D]`` or ``[N_D, N_D, k, k]``); optional.
        learning_rate: :math:`\eta`; required for finite ``steps``; for ``steps=None`` it is only
            checked against the stability limit.
        steps: ``None`` (t → ∞), an int, or a 1-D sequence of ints (adds a leading ``[T]`` axis).
        f0: initial outputs of one network over D, shape ``[N_D]``/``[N_D, k]`` (training inputs first).
        activation, C_b, C_W, lambda_b, lambda_W, depth, x_train, x_test: architecture for the
            recursions, used when ``ntk`` is None (see :func:`infinite_width_kernels`).
        loss: ``"mse"`` (the book's extensive MSE) or ``"cross_entropy"`` (converged solution only).
        compute_cov: return the ensemble covariance when ``nngp`` is available and ``f0`` is None.
        jitter: singular training block at ``steps=None``: ``"auto"`` (warn and add ``ε I``),
            ``None`` (raise :class:`SingularKernelError`) or a float. Finite ``steps`` never need it.

    Returns:
        :class:`KernelPrediction`.

    Raises:
        ValueError: ``learning_rate >= 2/λ_max`` (message names λ_max), mismatched shapes,
            non-PSD kernel, ``steps`` given without ``learning_rate``.
        NotImplementedError: ``loss="cross_entropy"`` with finite ``steps``.
    """
    if loss not in ("mse", "cross_entropy"):
        raise ValueError(f"loss must be 'mse' or 'cross_entropy'; got {loss!r}.")
    t = _steps(steps)
    if loss == "cross_entropy":
        if t is not None:
            raise NotImplementedError(
                "cross-entropy training at finite steps has no closed form (the softmax makes the output "
                "dynamics nonlinear, §10.2.3); use linearized_dynamics(..., loss='cross_entropy') per network, "
                "or steps=None for the converged giant-leap solution."
            )
        y_train = soft_label_targets(y_train)
    y, squeeze = _as_targets(y_train)
    n_a, k = y.shape
    if ntk is None:
        ntk = _kernels_from_spec(activation, C_b, C_W, depth, x_train, x_test, lambda_b, lambda_W, "ntk_prediction")
    if isinstance(ntk, InfiniteWidthKernels):
        if nngp is None:
            nngp = ntk.nngp
        ntk = ntk.ntk
    tb = _blocks(ntk, n_a, "ntk")
    kb = _blocks(nngp, n_a, "nngp") if nngp is not None else None
    n_b = tb.test_train.shape[0]
    if kb is not None and kb.test_train.shape[0] != n_b:
        raise ValueError(f"nngp has N_B={kb.test_train.shape[0]} test inputs but ntk has N_B={n_b}.")
    resolved = tb.train_train.dim() == 4 or (kb is not None and kb.train_train.dim() == 4)
    if resolved:
        tb = _expand(tb, k)
        kb = _expand(kb, k) if kb is not None else None
        rhs = y.reshape(n_a * k, 1)
    else:
        rhs = y
    if t is not None and learning_rate is None:
        raise ValueError("finite steps need learning_rate (η); pass learning_rate=..., or steps=None for t → ∞.")
    spec = _spectrum(tb.train_train, name="ntk", need_inverse=t is None, jitter=jitter if t is None else 0.0)
    eta = _check_rate(learning_rate, spec, "ntk")
    V = spec.evecs
    if t is None:
        phi = (1.0 / spec.evals)[None]  # [1, m]
    else:
        phi = _gd_filter(spec.evals, eta, t)  # [T, m]
    BV = tb.test_train @ V  # [N_B', m]
    P = (BV[None] * phi[:, None, :]) @ V.T  # [T, N_B', m]

    def shape_mean(m: Tensor) -> Tensor:  # [T, N_B', c] → [T, N_B, k]
        return m.reshape(m.shape[0], n_b, k)

    if f0 is not None:
        f, _ = _as_targets(f0, "f0")
        if f.shape != (n_a + n_b, k):
            raise ValueError(f"f0 must have shape [N_D={n_a + n_b}, k={k}] (training inputs first); got {tuple(f0.shape)}.")
        fa, fb = (f[:n_a].reshape(n_a * k, 1), f[n_a:].reshape(n_b * k, 1)) if resolved else (f[:n_a], f[n_a:])
        mean = shape_mean(fb[None] - P @ (fa - rhs)[None])
        cov = None
    else:
        mean = shape_mean(P @ rhs)
        cov = None
        if compute_cov and kb is not None:
            if kb.test_test is None:
                raise ValueError("the covariance needs the test-test block of nngp; pass it or compute_cov=False.")
            PK = P @ kb.test_train.T  # [T, N_B', N_B']
            cov = kb.test_test[None] - PK - PK.transpose(-1, -2) + P @ kb.train_train @ P.transpose(-1, -2)
            cov = 0.5 * (cov + cov.transpose(-1, -2))
            if resolved:
                cov = _unflat(cov, k)
    if squeeze:
        mean = mean.squeeze(-1)
    if t is None or torch.as_tensor(steps).dim() == 0:  # converged or a single int: no [T] axis
        mean = mean[0]
        cov = cov[0] if cov is not None else None
    return KernelPrediction(mean=mean, cov=cov, steps=t, lambda_max=spec.lambda_max, lambda_min=spec.lambda_min, jitter=spec.jitter)


def linearized_dynamics(
    ntk: Tensor,
    f0: Tensor,
    targets: Tensor,
    *,
    learning_rate: float,
    steps: int,
    loss: Literal["mse", "cross_entropy"] = "mse",
    record_every: int = 1,
) -> Tensor:
    r"""Iterate frozen-NTK gradient descent in function space for one network, (10.3).

    .. math::
        z_{i;\delta}(t+1) = z_{i;\delta}(t) - \eta\sum_{j,\tilde\alpha}\Theta_{ij;\delta\tilde\alpha}\,
            \epsilon_{j;\tilde\alpha}(t),\qquad
        \epsilon = z - y\ \text{(MSE, (7.15))},\quad \epsilon = q - p\ \text{(cross-entropy, (10.6))}

    This is exact for a linearized network (or any network at infinite width), with any loss;
    for the MSE it agrees with the closed form of :func:`ntk_prediction`.

    Args:
        ntk: :math:`\Theta` over D, ``[N_D, N_D]`` (shared by outputs) or ``[N_D, N_D, k, k]``,
            training inputs first (``N_A`` = rows of ``targets``).
        f0: initial outputs over D, shape ``[N_D, k]``.
        targets: ``y`` (MSE) or target distributions ``p`` (cross-entropy), shape ``[N_A, k]``.
        learning_rate: :math:`\eta > 0`.
        steps: number of steps ``t >= 0``.
        loss: ``"mse"`` (extensive, (10.5)) or ``"cross_entropy"`` ((10.36), summed over samples).
        record_every: keep every ``record_every``-th step (always includes steps 0 and ``steps``).

    Returns:
        Outputs over D along the trajectory, shape ``[R, N_D, k]`` (``R`` recorded steps), float64.
    """
    if loss not in ("mse", "cross_entropy"):
        raise ValueError(f"loss must be 'mse' or 'cross_entropy'; got {loss!r}.")
    if not isinstance(f0, Tensor) or f0.dim() != 2:
        raise ValueError(f"f0 must have shape [N_D, k]; got {getattr(f0, 'shape', type(f0))}.")
    if not isinstance(targets, Tensor) or targets.dim() != 2 or targets.shape[1] != f0.shape[1]:
        raise ValueError(f"targets must have shape [N_A, k={f0.shape[1]}]; got {getattr(targets, 'shape', type(targets))}.")
    if int(steps) < 0 or int(record_every) < 1:
        raise ValueError(f"steps must be >= 0 and record_every >= 1; got steps={steps}, record_every={record_every}.")
    eta = float(learning_rate)
    if not eta > 0:
        raise ValueError(f"learning_rate must be > 0; got {learning_rate!r}.")
    n_d, k = f0.shape
    n_a = targets.shape[0]
    th = ntk.to(_DT)
    if th.shape[:2] != (n_d, n_d) or th.dim() not in (2, 4) or (th.dim() == 4 and th.shape[2:] != (k, k)):
        raise ValueError(f"ntk must have shape [{n_d}, {n_d}] or [{n_d}, {n_d}, {k}, {k}]; got {tuple(ntk.shape)}.")
    th_da = th[:, :n_a]
    z = f0.to(_DT).clone()
    y = targets.to(_DT)
    out = [z.clone()]
    for s in range(1, int(steps) + 1):
        eps = z[:n_a] - y if loss == "mse" else torch.softmax(z[:n_a], dim=1) - y
        if th.dim() == 2:
            z = z - eta * th_da @ eps
        else:
            z = z - eta * torch.einsum("dAij,Aj->di", th_da, eps)
        if s % record_every == 0 or s == int(steps):
            out.append(z.clone())
    return torch.stack(out)


# --------------------------------------------------------------------------------------
# generalization, §10.3
# --------------------------------------------------------------------------------------
def bias_variance(
    prediction: KernelPrediction,
    y_test: Tensor,
    *,
    loss: Literal["mse", "cross_entropy"] = "mse",
    reduction: Literal["sum", "mean"] = "sum",
) -> BiasVariance:
    r"""Generalized bias–variance decomposition of the ensemble-averaged test loss, §10.3.

    MSE, exact (10.52):
    :math:`\mathbb{E}[\mathcal{L}_\mathcal{B}] = \tfrac12\sum_{\dot\beta}\big[\sum_i(m_{i;\dot\beta}-y_{i;\dot\beta})^2
    + \sum_i \mathrm{Cov}[z_{i;\dot\beta}, z_{i;\dot\beta}]\big]`.
    Cross-entropy, to second order (10.55): bias :math:`\mathcal{L}_\mathcal{B}(m)` and variance
    :math:`\tfrac12\sum_{i_1i_2}(\mathrm{diag}\,q - qq^\top)_{i_1i_2}\mathrm{Cov}_{i_1i_2}` with
    :math:`q = \mathrm{softmax}(m)`.

    Args:
        prediction: from :func:`ntk_prediction` or :func:`nngp_posterior` with a covariance.
        y_test: targets ``[N_B]``/``[N_B, k]`` (MSE) or distributions ``[N_B, k]`` (cross-entropy).
        loss: ``"mse"`` or ``"cross_entropy"``.
        reduction: ``"sum"`` over test samples (the book's extensive loss) or ``"mean"``.

    Returns:
        :class:`BiasVariance` (a leading ``[T]`` axis when the prediction has several steps).
    """
    if prediction.cov is None:
        raise ValueError("the prediction has no covariance: pass the NNGP kernel (nngp=...) and no f0.")
    if loss not in ("mse", "cross_entropy") or reduction not in ("sum", "mean"):
        raise ValueError(f"loss must be 'mse'|'cross_entropy' and reduction 'sum'|'mean'; got {loss!r}, {reduction!r}.")
    m = prediction.mean
    y = y_test.to(_DT)
    if y.shape != m.shape[-y.dim():] or y.dim() not in (1, 2):
        raise ValueError(f"y_test has shape {tuple(y_test.shape)}; the prediction mean has shape {tuple(m.shape)}.")
    if y.dim() == 1:
        y, m = y[:, None], m[..., None]
    cov = prediction.cov
    k = y.shape[1]
    resolved = cov.dim() >= 4 and cov.shape[-1] == k and cov.shape[-2] == k and cov.shape[-3] == cov.shape[-4]
    if resolved:
        n_b = cov.shape[-3]
        idx = torch.arange(n_b)
        cdiag = cov[..., idx, idx, :, :]  # [..., N_B, k, k]
    else:
        n_b = cov.shape[-1]
        idx = torch.arange(n_b)
        d = cov[..., idx, idx]  # [..., N_B]
        cdiag = d[..., None, None] * torch.eye(k, dtype=_DT)
    if loss == "mse":
        bias = 0.5 * ((m - y) ** 2).sum(-1)
        var = 0.5 * cdiag.diagonal(dim1=-2, dim2=-1).sum(-1)
    else:
        q = torch.softmax(m, -1)
        bias = -(y * torch.log_softmax(m, -1)).sum(-1)
        hess = torch.diag_embed(q) - q[..., :, None] * q[..., None, :]
        var = 0.5 * (hess * cdiag).sum((-1, -2))
    red = (lambda a: a.sum(-1)) if reduction == "sum" else (lambda a: a.mean(-1))
    b, v = red(bias), red(var)
    return BiasVariance(bias=b, variance=v, total=b + v, per_sample_bias=bias, per_sample_variance=var)


def bias_variance_scan(
    activation: Any,
    depth: int,
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    hyperparameters: Sequence[Mapping[str, Hyper]],
    *,
    loss: Literal["mse", "cross_entropy"] = "mse",
    reduction: Literal["sum", "mean"] = "mean",
    jitter: float | Literal["auto"] | None = "auto",
    on_singular: Literal["skip", "raise"] = "skip",
) -> list[dict[str, Any]]:
    r"""Expected test loss of fully trained infinite-width networks over a hyperparameter grid, §10.3.

    For each setting of ``C_b, C_W, lambda_b, lambda_W`` the kernels are built by
    :func:`infinite_width_kernels`, the converged prediction by :func:`ntk_prediction` and the loss
    split by :func:`bias_variance` ((10.40), (10.41), (10.52)/(10.55)). Use it to choose the
    initialization and the learning-rate ratio :math:`\lambda_b/\lambda_W` (the overall η drops out
    of the converged solution, (10.35)). The book's argument (§10.3.1): away from criticality the
    deep kernel forgets the inputs (exploding/vanishing, K → fixed point), the prediction degenerates
    to a constant and the bias grows; at criticality it stays input-dependent at large depth.

    Args:
        activation: activation name/object.
        depth: ``L``.
        x_train, x_test: inputs ``[N_A, n_0]``, ``[N_B, n_0]``.
        y_train, y_test: targets ``[N_A(, k)]``, ``[N_B(, k)]`` (distributions for cross-entropy).
        hyperparameters: a sequence of mappings with keys ``C_b``, ``C_W`` and optionally
            ``lambda_b``, ``lambda_W`` (default 1.0).
        loss, reduction: as in :func:`bias_variance`.
        jitter: as in :func:`ntk_prediction`.
        on_singular: ``"skip"`` records a degenerate kernel as ``nan`` losses (with ``error``),
            ``"raise"`` re-raises.

    Returns:
        One dict per setting: the hyperparameters plus ``bias``, ``variance``, ``total`` (floats),
        ``lambda_min``, ``lambda_max`` of the training NTK block, and ``error`` (``None`` or a message).
    """
    out: list[dict[str, Any]] = []
    for hp in hyperparameters:
        unknown = set(hp) - {"C_b", "C_W", "lambda_b", "lambda_W"}
        if unknown or not {"C_b", "C_W"} <= set(hp):
            raise ValueError(f"each setting needs keys C_b, C_W (optional lambda_b, lambda_W); got {sorted(hp)}.")
        rec: dict[str, Any] = {"lambda_b": 1.0, "lambda_W": 1.0, **hp}
        try:
            kern = infinite_width_kernels(
                activation, hp["C_b"], hp["C_W"], depth, x_train, x_test,
                lambda_b=rec["lambda_b"], lambda_W=rec["lambda_W"],
            )
            pred = ntk_prediction(y_train, kern, loss=loss, jitter=jitter)
            bv = bias_variance(pred, y_test, loss=loss, reduction=reduction)
            rec.update(bias=float(bv.bias), variance=float(bv.variance), total=float(bv.total),
                       lambda_min=pred.lambda_min, lambda_max=pred.lambda_max, error=None)
        except SingularKernelError as exc:
            if on_singular == "raise":
                raise
            rec.update(bias=math.nan, variance=math.nan, total=math.nan, lambda_min=math.nan,
                       lambda_max=math.nan, error=str(exc))
        out.append(rec)
    return out

