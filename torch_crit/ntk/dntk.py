r"""The empirical dNTK (11.8) and the first-order NTK velocity (11.10) of any PyTorch model.

The book's differential of the neural tangent kernel (Roberts & Yaida, §11.1, eq. (11.8)) is

.. math::
    \widehat{dH}_{i_0 i_1 i_2;\delta_0\delta_1\delta_2}
      = \sum_{\mu_1\nu_1\mu_2\nu_2} \lambda_{\mu_1\nu_1}\lambda_{\mu_2\nu_2}
        \frac{\partial^2 z_{i_0;\delta_0}}{\partial\theta_{\mu_1}\partial\theta_{\mu_2}}
        \frac{\partial z_{i_1;\delta_1}}{\partial\theta_{\nu_1}}
        \frac{\partial z_{i_2;\delta_2}}{\partial\theta_{\nu_2}}
      = u_{i_1;\delta_1}^{\top}\,\big(\nabla^2_\theta z_{i_0;\delta_0}\big)\,u_{i_2;\delta_2},
    \qquad u_{i;\delta} = \Lambda\,\nabla_\theta z_{i;\delta},

with :math:`\Lambda` the diagonal learning-rate tensor (one scale :math:`\lambda` per parameter
tensor, the book's :math:`\lambda_b`, :math:`\lambda_W/n_{\ell-1}` when the groups of
:func:`torch_crit.param_groups` are passed). It carries *two* factors of :math:`\lambda`, is
symmetric under :math:`(i_1,\delta_1)\leftrightarrow(i_2,\delta_2)`, and the first pair
:math:`(i_0,\delta_0)` — the output whose Hessian is taken — is distinguished. It vanishes for a
network that is linear in its parameters (the first layer, (11.26)).

Its role in training is (11.10): after one step of gradient descent
:math:`\Delta\theta = -\eta\,\Lambda \sum_{j,\tilde\alpha}\epsilon_{j;\tilde\alpha}\,\nabla_\theta z_{j;\tilde\alpha}`
with error factors :math:`\epsilon_{j;\tilde\alpha} = \partial\mathcal{L}_A/\partial z_{j;\tilde\alpha}` (11.5),

.. math::
    \Delta H_{i_1 i_2;\delta_1\delta_2} = -\eta \sum_{j,\tilde\alpha}
      \big(\widehat{dH}_{i_1 i_2 j;\delta_1\delta_2\tilde\alpha}
         + \widehat{dH}_{i_2 i_1 j;\delta_2\delta_1\tilde\alpha}\big)\,\epsilon_{j;\tilde\alpha}
      + O(\eta^2),

which :func:`ntk_velocity` computes as a single directional derivative of the NTK along
:math:`\Delta\theta` (no :math:`N^3` tensor).

Layouts follow :func:`torch_crit.empirical_ntk` (sample indices first, then output indices):
``empirical_dntk(...)[d0, d1, d2, i0, i1, i2]`` ``[N, N, N, k, k, k]``, and ``ntk_velocity``
returns ``[N, N, k, k]``.

Example:
    >>> import torch, torch_crit
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> dH = torch_crit.empirical_dntk(net, torch.randn(4, 3))
    >>> dH.shape
    torch.Size([4, 4, 4, 1, 1, 1])
"""
from __future__ import annotations

from ..errors import DNTKMemoryError, SecondDerivativeError  # noqa: F401  (re-exported)
import copy
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Literal, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev, jvp, vjp, vmap
from torch.overrides import TorchFunctionMode

from torch_crit.ntk.memory import available_memory
from torch_crit.ntk.generic import vmap_or_loop
from torch_crit.ntk.inputs import ModelInput, batch_size, batched_tensors, call_model, cast_inputs, flatten_output, validate_inputs, check_probe, unwrap_model

__all__ = ["empirical_dntk", "ntk_velocity", "estimate_dntk_memory", "DNTKMemoryError", "SecondDerivativeError"]

DNTKOutput = Literal["full", "diagonal_outputs"]
DNTKMethod = Literal["auto", "generic", "structured"]
Backend = Literal["ext", "torch"]


# ----------------------------------------------------------------------------- setup


@dataclass
class _Functional:
    """A model as a pure function of its trainable parameters (evaluated in eval mode)."""

    model: nn.Module
    params: Dict[str, torch.Tensor]  # trainable, λ != 0, detached
    constants: Dict[str, torch.Tensor]  # other parameters and buffers
    lam: Dict[str, float]
    x: ModelInput
    n: int
    k: int
    dtype: torch.dtype
    device: torch.device

    def f(self, p: Mapping[str, torch.Tensor], x: ModelInput) -> torch.Tensor:
        """Outputs ``[N, k]`` at parameters ``p`` (the others held at their values)."""
        with _SecondOrderSafe():
            return flatten_output(call_model(self.model, {**self.constants, **p}, x))

    def per_sample(self, names: Sequence[str]) -> Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]:
        """``p -> J`` with ``J[name]`` ``[N, k, *shape]``: per-sample Jacobians w.r.t. ``names``."""
        x = self.x
        batched = batched_tensors(x)
        names = list(names)

        def rebuild(rows: List[torch.Tensor]) -> ModelInput:
            it = iter(rows)

            def put(e: Any) -> Any:
                return next(it).unsqueeze(0) if isinstance(e, torch.Tensor) and e.dim() >= 1 else e

            if isinstance(x, torch.Tensor):
                return put(x)
            if isinstance(x, Mapping):
                return {key: put(v) for key, v in x.items()}
            return tuple(put(e) for e in x)

        def jac(p: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
            rest = {n_: t for n_, t in p.items() if n_ not in names}

            def single(pa: Dict[str, torch.Tensor], rows: List[torch.Tensor]) -> torch.Tensor:
                return self.f({**rest, **pa}, rebuild(rows)).reshape(-1)

            pa = {n_: p[n_] for n_ in names}
            return vmap_or_loop(lambda: vmap(jacrev(single), in_dims=(None, 0))(pa, batched),
                                lambda i: jacrev(single)(pa, [t[i] for t in batched]),
                                self.n, "the per-sample Jacobians")

        return jac


def _prepare(
    model: nn.Module,
    x: ModelInput,
    learning_rates: Any,
    dtype: Optional[torch.dtype],
    what: str,
) -> Tuple[_Functional, Callable[[], None]]:
    """Resolve λ, cast (a copy) if asked, switch to eval mode; returns the setup and a restore callback."""
    from torch_crit.ntk.learning_rates import resolve_learning_rates

    model = unwrap_model(model, what)
    first = next(iter(model.parameters()), None)
    if first is None:
        raise ValueError(f"{what}: the model has no parameters; the dNTK of a parameter-free model is undefined.")
    lam_all = resolve_learning_rates(model, learning_rates)  # on the user's model: groups hold its parameters
    if dtype is not None:
        if not dtype.is_floating_point:
            raise TypeError(f"{what}: dtype must be a floating dtype (torch.float32 or torch.float64), got {dtype}.")
        model = copy.deepcopy(model).to(dtype)
        x = cast_inputs(x, dtype)
    pdtype = next(iter(model.parameters())).dtype
    device = next(iter(model.parameters())).device
    validate_inputs(x, None, device=device, dtype=pdtype)
    n = check_probe(x, what)
    params: Dict[str, torch.Tensor] = {}
    lam: Dict[str, float] = {}
    for name, p in model.named_parameters():
        scale = float(lam_all.get(name, 0.0))
        if p.requires_grad and scale != 0.0:
            params[name] = p.detach()
            lam[name] = scale
    if not params:
        raise ValueError(
            f"{what}: no trainable parameter with a non-zero learning rate (requires_grad=False "
            f"everywhere, or every λ is 0); nothing to differentiate."
        )
    constants = {n_: p.detach() for n_, p in model.named_parameters() if n_ not in params}
    constants.update({n_: b for n_, b in model.named_buffers()})
    modes = [(m, m.training) for m in model.modules()]
    model.eval()

    def restore() -> None:  # each module's own flag (a root .train() would reset every submodule)
        for m, flag in modes:
            m.training = flag

    try:
        with torch.no_grad():
            z = flatten_output(call_model(model, {**constants, **params}, x), n)
    except BaseException:
        restore()
        raise
    setup = _Functional(model, params, constants, lam, x, n, int(z.shape[1]), pdtype, device)
    return setup, restore


# ----------------------------------------------------------------------------- memory


def estimate_dntk_memory(
    n: int,
    k: int,
    num_params: int,
    *,
    output: DNTKOutput = "full",
    block_size: int = 1,
    itemsize: int = 4,
    method: Literal["generic", "structured"] = "generic",
    features: int = 0,
) -> Dict[str, int]:
    """Bytes needed by :func:`empirical_dntk`.

    Args:
        n: number of inputs ``N``.
        k: number of outputs ``k``.
        num_params: trainable parameters ``P`` (generic path).
        output: ``"full"`` (result ``N³k³``) or ``"diagonal_outputs"`` (``N³k``).
        block_size: gradient directions ``(δ2, i2)`` processed together.
        itemsize: bytes per element (4 for float32, 8 for float64).
        method: ``"generic"`` (per-direction Jacobian derivatives ``[B, N, k, P]``) or
            ``"structured"`` (per-direction layer inputs/cotangents ``[B, N, k, F]``).
        features: ``F``, total layer width summed over covered layer calls (structured).

    Returns:
        ``{"result": …, "per_block": …, "jacobian": …, "total": …}`` in bytes.
    """
    result = n**3 * (k**3 if output == "full" else k) * itemsize
    jac = n * k * num_params * itemsize
    width = num_params if method == "generic" else max(features, 1)
    # directional derivatives + forward-mode intermediates (≈ 3 copies) + the block's output
    per_block = block_size * (3 * n * k * width + n * n * k * k) * itemsize
    return {"result": result, "per_block": per_block, "jacobian": jac, "total": result + jac + per_block}


def _check_result_fits(n: int, k: int, output: str, itemsize: int, device: torch.device, what: str) -> None:
    need = n**3 * (k**3 if output == "full" else k) * itemsize
    avail = available_memory(device)
    if need > 0.8 * avail:
        raise DNTKMemoryError(
            f"{what}: the result alone needs {need / 2**30:.2f} GiB (N={n}, k={k}, output={output!r}, "
            f"{itemsize}-byte elements: N³·{'k³' if output == 'full' else 'k'} entries) but only "
            f"{avail / 2**30:.2f} GiB is available on {device}. Use output='diagonal_outputs', fewer "
            f"inputs, or ntk_velocity (which never forms the N³ tensor)."
        )


def _check_directions_fit(n: int, k: int, num_params: int, itemsize: int, device: torch.device, what: str) -> None:
    need = 2 * n * k * num_params * itemsize  # Λ∇z for every direction, plus one block's derivatives
    avail = available_memory(device)
    if need > 0.8 * avail:
        raise DNTKMemoryError(
            f"{what}: the N·k = {n * k} gradient directions over P = {num_params} parameters need about "
            f"{need / 2**30:.2f} GiB ({itemsize}-byte elements) but only {avail / 2**30:.2f} GiB is available "
            f"on {device}. Use fewer inputs, or ntk_velocity for a single update direction."
        )


def _auto_block(n_dirs: int, per_dir_bytes: int, device: torch.device) -> int:
    budget = min(available_memory(device) // 4, int(os.environ.get("TORCH_CRIT_DNTK_BLOCK_BYTES", 1 << 30)))
    return int(max(1, min(n_dirs, budget // max(per_dir_bytes, 1))))


def _blocks(total: int, size: int) -> Iterator[Tuple[int, int]]:
    for s in range(0, total, size):
        yield s, min(total, s + size)


# ----------------------------------------------------------------------------- PyTorch workarounds


class _SecondOrderSafe(TorchFunctionMode):
    r"""Route ``F.layer_norm`` through its composite form (mean, variance, rsqrt) while active.

    In torch 2.x the forward-mode derivative of ``native_layer_norm_backward`` is wrong under
    ``vmap`` (the affine-weight gradient's tangent along the layer input; see also
    pytorch/pytorch#196700 on nested forward-mode derivatives of ``layer_norm``), which breaks
    every forward-over-reverse Hessian-vector product through a LayerNorm. The composite form
    is mathematically identical, :math:`y = (x-\mu)\,(\sigma^2+\epsilon)^{-1/2}\,w + b` over
    the normalized dimensions, and its second derivatives are exact (tested against
    double-backward references). Other normalisations (BatchNorm in eval, GroupNorm, RMSNorm)
    were checked and are not affected.

    Entered around each differentiated model evaluation only (:meth:`_Functional.f` and the
    structured path's capture), not around the library's own tensor code: an active
    ``TorchFunctionMode`` costs a Python call per torch function, a large share of the run time
    of a small structured dNTK.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        if func is F.layer_norm:
            return _layer_norm_composite(*args, **kwargs)
        return func(*args, **kwargs)


def _layer_norm_composite(
    input: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    mu = input.mean(dims, keepdim=True)
    var = (input - mu).pow(2).mean(dims, keepdim=True)
    y = (input - mu) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


# ----------------------------------------------------------------------------- errors


_SECOND_ORDER_HINTS = (
    "forward ad",
    "forward-mode",
    "forward mode",
    "jvp",
    "setup_context",
    "functorch",
    "vmap",
    "not implemented",
    "batching rule",
)


def _second_order_error(exc: BaseException, what: str) -> SecondDerivativeError:
    return SecondDerivativeError(
        f"{what}: the model has an operation whose second derivatives cannot be taken by "
        f"forward-over-reverse automatic differentiation (torch.func.jvp of torch.func.vjp, vmapped): "
        f"{type(exc).__name__}: {exc}\n"
        f"The dNTK (11.8) needs the Hessian of the outputs with respect to the parameters. Fix: "
        f"replace the operation by a differentiable one, or give the custom torch.autograd.Function "
        f"a `setup_context`, a `jvp` and `generate_vmap_rule = True` (see 'Extending torch.func with "
        f"autograd.Function' in the PyTorch docs)."
    )


def _run_second_order(fn: Callable[[], Any], what: str) -> Any:
    """Run a second-order pass; attention runs on the math SDPA backend (the fused CPU/flash
    kernels have no forward-mode derivative), which computes the same function."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel(SDPBackend.MATH):
            return fn()
    except (RuntimeError, NotImplementedError) as exc:
        msg = str(exc).lower()
        if any(h in msg for h in _SECOND_ORDER_HINTS):
            raise _second_order_error(exc, what) from exc
        raise


# ----------------------------------------------------------------------------- generic path


def _flat_dirs(J: Mapping[str, torch.Tensor], lam: Mapping[str, float], n: int, k: int) -> Dict[str, torch.Tensor]:
    """Directions ``u[(δ, i)] = Λ ∇z[δ, i]`` as ``{name: [N·k, *shape]}``."""
    return {name: (lam[name] * t).reshape(n * k, *t.shape[2:]) for name, t in J.items()}


def _generic_dntk_into(
    setup: _Functional,
    out: torch.Tensor,
    contract: Sequence[str],
    *,
    diagonal: bool,
    block_size: Optional[int],
    what: str,
    directions: Optional[Dict[str, torch.Tensor]] = None,
) -> None:
    r"""Add the dNTK contracted over the parameter tensors ``contract`` into ``out``.

    For a block ``A`` of parameters, the part of (11.8) whose contracted index :math:`\mu_1` runs
    over ``A`` is :math:`\sum_{\mu\in A} (u_{1})_\mu\, D_{u_2}[\partial_\mu z_0]`, the
    derivative of the ``A``-columns of the per-sample Jacobian along the full direction ``u_2``
    (forward-over-reverse: ``jvp`` of ``vmap(jacrev)``), contracted with ``u_1`` by one GEMM per
    parameter tensor and block of directions.

    Args:
        out: ``[N, N, N, k, k, k]`` or, with ``diagonal``, ``[N, N, N, k]``; accumulated into.
        directions: precomputed ``{name: [N·k, *shape]}`` = Λ∇z for every trainable parameter
            (computed here by ``vmap(jacrev)`` when None).
    """
    n, k = setup.n, setup.k
    params = setup.params
    contract = [c for c in contract if c in params]
    if not contract:
        return
    if directions is None:
        jac_all = setup.per_sample(list(params))
        J = _run_second_order(lambda: jac_all(params), what)
        directions = _flat_dirs(J, setup.lam, n, k)  # tangents over every parameter
    U = directions
    UA = {name: U[name].reshape(n, k, -1) for name in contract}  # [N, k, P_n]
    jac_A = setup.per_sample(contract)
    pa = sum(UA[c].shape[-1] for c in contract)
    itemsize = out.element_size()
    per_dir = (3 * n * k * pa + n * n * k * k) * itemsize
    nd = n * k
    bs = block_size or _auto_block(nd, per_dir, setup.device)

    def along(u: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return jvp(jac_A, (params,), (u,))[1]

    # view of out with the direction (δ2, i2) first: [δ2, i2, δ0, i0, δ1, i1] or [δ2, i2, δ0, δ1]
    view = out.permute(2, 5, 0, 3, 1, 4) if not diagonal else out.permute(2, 3, 0, 1)
    for s, e in _blocks(nd, bs):
        Ub = {name: t[s:e] for name, t in U.items()}
        D = _run_second_order(lambda: vmap_or_loop(
            lambda: vmap(along)(Ub), lambda i: along({nm: t[i] for nm, t in Ub.items()}), e - s,
            "the directional derivatives"), what)  # [B, N, k, *shape]
        B = e - s
        d_idx = torch.arange(s, e, device=out.device)
        d2, i2 = d_idx // k, d_idx % k
        if not diagonal:
            acc = None
            for name in contract:
                Dn = D[name].reshape(B * n * k, -1)
                term = Dn @ UA[name].reshape(n * k, -1).T
                acc = term if acc is None else acc.add_(term)
            view[d2, i2] += acc.reshape(B, n, k, n, k)
        else:
            acc = None
            for name in contract:
                Dn = D[name].reshape(B, n, k, -1)[torch.arange(B), :, i2]  # [B, N(δ0), P]
                Un = UA[name][:, i2].transpose(0, 1)  # [B, N(δ1), P]
                term = torch.bmm(Dn, Un.transpose(1, 2))
                acc = term if acc is None else acc.add_(term)
            view[d2, i2] += acc


# ----------------------------------------------------------------------------- public API


def _check_options(output: str, method: str, block_size: Optional[int], what: str, backend: str = "ext") -> None:
    if backend not in ("ext", "torch"):
        raise ValueError(f"{what}: backend must be 'ext' (compiled kernel) or 'torch' (pure-PyTorch reference), got {backend!r}.")
    if output not in ("full", "diagonal_outputs"):
        raise ValueError(f"{what}: output must be 'full' or 'diagonal_outputs', got {output!r}.")
    if method not in ("auto", "generic", "structured"):
        raise ValueError(f"{what}: method must be 'auto', 'generic' or 'structured', got {method!r}.")
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"{what}: block_size must be a positive int (gradient directions per block) or None, got {block_size!r}.")


def empirical_dntk(
    model: nn.Module,
    x: ModelInput,
    *,
    learning_rates: Any = None,
    output: DNTKOutput = "full",
    method: DNTKMethod = "auto",
    block_size: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
    backend: Backend = "ext",
) -> torch.Tensor:
    r"""The empirical dNTK (11.8) of ``model`` on the inputs ``x``.

    .. math::
        \widehat{dH}_{i_0 i_1 i_2;\delta_0\delta_1\delta_2}
          = \sum_{\mu_1\nu_1\mu_2\nu_2}\lambda_{\mu_1\nu_1}\lambda_{\mu_2\nu_2}
            \frac{\partial^2 z_{i_0;\delta_0}}{\partial\theta_{\mu_1}\partial\theta_{\mu_2}}
            \frac{\partial z_{i_1;\delta_1}}{\partial\theta_{\nu_1}}
            \frac{\partial z_{i_2;\delta_2}}{\partial\theta_{\nu_2}}

    (two factors of λ; symmetric under :math:`(i_1,\delta_1)\leftrightarrow(i_2,\delta_2)`; zero
    for a model linear in its parameters, (11.26)). Contracted with error factors it gives the
    NTK update of one gradient step, (11.10) — see :func:`ntk_velocity`.

    Methods:

    * ``"generic"`` — any model differentiable twice: per-sample Jacobians by ``vmap(jacrev)``,
      their derivatives along blocks of the :math:`Nk` directions :math:`u = \Lambda\nabla z`
      by ``jvp`` (forward-over-reverse), contracted with :math:`u` by GEMMs. Cost
      :math:`O(N^3k^3P)`; memory :math:`O(NkP)` per direction in a block.
    * ``"structured"`` — Linear/Conv layers through their inputs ``X`` and output cotangents
      ``G`` and the directional derivatives ``Ẋ``, ``Ġ`` along each direction (one vmapped
      forward-mode pass over the capture of :mod:`torch_crit.ntk.capture`); per layer the terms
      :math:`\lambda_W[(\dot G G^\top)\odot(XX^\top) + (GG^\top)\odot(\dot X X^\top)] + \lambda_b\,\dot G G^\top`
      go through the fused primitive :func:`torch_crit._ops.gram_hadamard_accumulate_`;
      other parameters go through the generic path and are added in.
    * ``"auto"`` — structured when the model has Linear/Conv layers, else generic.

    Note:
        Non-smooth activations (ReLU, leaky ReLU, hard-tanh…): autograd takes
        :math:`\sigma''=0` away from the kinks and drops the delta functions at the kinks. The
        result is then the exact dNTK of the piecewise-smooth network at the given parameters
        (nonzero: products of weights across layers are still curved), valid as long as no
        preactivation sits exactly on a kink. The first-order NTK update it predicts misses the
        O(1) jumps of units that cross their threshold during a finite step — the book's
        reason why the η-expansion fails for ReLU networks (§∞.3, (∞.41)–(∞.44)).

    The model is evaluated in eval mode (dropout off; BatchNorm uses its running statistics)
    and restored to its mode afterwards; buffers are not updated; nothing the caller passed is
    modified (``dtype`` casts a copy).

    Args:
        model: any ``nn.Module`` returning ``[N, ...]`` (flattened to ``[N, k]``).
        x: a tensor ``[N, ...]``, a tuple of positional inputs or a dict of keyword inputs
            (batch dimension 0).
        learning_rates: the book's λ: None (λ = 1), a float, a dict ``{param_name: λ}`` or the
            param groups of :func:`torch_crit.param_groups` / any optimizer-style groups; see
            :func:`torch_crit.ntk.learning_rates.resolve_learning_rates`. Parameters with
            ``requires_grad=False`` or λ = 0 do not contribute.
        output: ``"full"`` → ``[N, N, N, k, k, k]`` indexed ``[δ0, δ1, δ2, i0, i1, i2]``;
            ``"diagonal_outputs"`` → ``[N, N, N, k]``, the entries with ``i0 = i1 = i2``.
        method: ``"auto"``, ``"generic"`` or ``"structured"``.
        block_size: number of directions :math:`(\delta_2, i_2)` processed together (None: as
            many as fit in ~1 GiB / a quarter of the free memory).
        dtype: compute in this dtype on a cast copy of the model (e.g. ``torch.float64``).
        backend: structured path only: ``"ext"`` runs the fused primitive's compiled kernel
            (C++/CUDA), ``"torch"`` its pure-PyTorch reference (same contraction; for comparison).

    Returns:
        The dNTK, ``[N, N, N, k, k, k]`` or ``[N, N, N, k]``, in the model's (or ``dtype``'s) dtype.

    Raises:
        DNTKMemoryError: the result does not fit in the available memory (the estimate is in
            the message; use ``output="diagonal_outputs"``, fewer inputs, or :func:`ntk_velocity`).
        SecondDerivativeError: an operation of the model has no forward-over-reverse second
            derivative (e.g. a custom ``autograd.Function`` without ``jvp``).
        ValueError: bad options or inputs.
    """
    what = "empirical_dntk"
    _check_options(output, method, block_size, what, backend)
    setup, restore = _prepare(model, x, learning_rates, dtype, what)
    try:
        return _empirical_dntk(setup, output, method, block_size, backend, what)
    finally:
        restore()


def _empirical_dntk(setup: _Functional, output: str, method: str, block_size: Optional[int], backend: str, what: str) -> torch.Tensor:
    n, k = setup.n, setup.k
    diagonal = output == "diagonal_outputs"
    itemsize = torch.empty((), dtype=setup.dtype).element_size()
    _check_result_fits(n, k, output, itemsize, setup.device, what)
    _check_directions_fit(n, k, sum(p.numel() for p in setup.params.values()), itemsize, setup.device, what)
    shape = (n, n, n, k, k, k) if not diagonal else (n, n, n, k)
    out = torch.zeros(shape, dtype=setup.dtype, device=setup.device)
    use_structured = method == "structured" or (method == "auto" and _structured_available(setup))
    if use_structured:
        from torch_crit.ntk.dntk_structured import structured_dntk_into

        structured_dntk_into(
            setup, out, diagonal=diagonal, block_size=block_size, what=what, strict=method == "structured", backend=backend
        )
    else:
        _generic_dntk_into(setup, out, list(setup.params), diagonal=diagonal, block_size=block_size, what=what)
    return out


def _structured_available(setup: _Functional) -> bool:
    try:
        from torch_crit.ntk.dntk_structured import covers_any
    except ImportError:  # the capture module is not there
        return False
    return covers_any(setup)


def _error_matrix(error: Any, n_train: int, k: int, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(error, torch.Tensor):
        raise TypeError(f"ntk_velocity: error must be a tensor [N_train, k] (dL/dz at the training inputs), got {type(error).__name__}.")
    if error.numel() != n_train * k or error.shape[0] != n_train:
        raise ValueError(
            f"ntk_velocity: error has shape {tuple(error.shape)} but the model outputs on x_train are "
            f"[N_train={n_train}, k={k}] once flattened; pass the error factors ε = dL/dz with that "
            f"shape (e.g. z - y for the loss ½Σ(z - y)²)."
        )
    return error.reshape(n_train, k).to(dtype=like.dtype, device=like.device)


def ntk_velocity(
    model: nn.Module,
    x_probe: ModelInput,
    x_train: ModelInput,
    error: torch.Tensor,
    *,
    learning_rates: Any = None,
    eta: float = 1.0,
    method: DNTKMethod = "auto",
    dtype: Optional[torch.dtype] = None,
    backend: Backend = "ext",
) -> torch.Tensor:
    r"""First-order change of the probe NTK for one gradient-descent step, (11.10).

    .. math::
        \Delta H_{i_1 i_2;\delta_1\delta_2}
          = -\eta\sum_{j,\tilde\alpha}\big(\widehat{dH}_{i_1 i_2 j;\delta_1\delta_2\tilde\alpha}
            + \widehat{dH}_{i_2 i_1 j;\delta_2\delta_1\tilde\alpha}\big)\epsilon_{j;\tilde\alpha}
          = \frac{d}{dt} H_{i_1 i_2;\delta_1\delta_2}(\theta + t\,\Delta\theta)\Big|_{t=0},
        \qquad \Delta\theta = -\eta\,\Lambda\sum_{j,\tilde\alpha}\epsilon_{j;\tilde\alpha}
          \nabla_\theta z_{j;\tilde\alpha}(x_{\text{train}})\quad(11.4)

    with the NTK :math:`H = J\Lambda J^\top` of (8.5)/(11.7) on the probe inputs. Computed as
    one directional derivative: :math:`\Delta\theta` by one vector–Jacobian product on the
    training batch, then one forward-mode pass — the full :math:`N^3` dNTK is never formed.
    The true change after a step :math:`\theta\to\theta+\Delta\theta` (SGD with per-parameter
    learning rates :math:`\eta\lambda`, gradients :math:`\sum\epsilon\nabla z`) equals this plus
    :math:`O(\eta^2)`. Sign: ``error`` is :math:`\epsilon = \partial\mathcal{L}/\partial z`
    (11.5), e.g. ``z - y`` for :math:`\mathcal{L} = \tfrac12\sum(z-y)^2`; the step goes downhill.

    Methods as in :func:`empirical_dntk` (structured: per Linear/Conv layer
    :math:`\dot H = S + S^\top`, :math:`S = \lambda_W[(\dot G G^\top)\odot XX^\top + (GG^\top)\odot \dot XX^\top] + \lambda_b\dot GG^\top`).
    For ReLU-like activations see the note of :func:`empirical_dntk`.

    Args:
        model: the network.
        x_probe: probe inputs ``[N, ...]`` (tensor / tuple / dict as in :func:`empirical_dntk`).
        x_train: training inputs ``[N_train, ...]`` of the step.
        error: ``[N_train, k]`` error factors :math:`\epsilon_{j;\tilde\alpha}` (or any shape
            with ``N_train·k`` entries and leading ``N_train``).
        learning_rates: the book's λ (see :func:`empirical_dntk`).
        eta: the global learning rate η.
        method: ``"auto"``, ``"generic"`` or ``"structured"``.
        dtype: compute in this dtype on a cast copy of the model.
        backend: ``"ext"`` (compiled fused primitive) or ``"torch"`` (its pure-PyTorch reference).

    Returns:
        ``[N, N, k, k]`` indexed ``[δ1, δ2, i1, i2]`` (the layout of :func:`torch_crit.empirical_ntk`).
    """
    what = "ntk_velocity"
    _check_options("full", method, None, what, backend)
    if not isinstance(eta, (int, float)) or not math.isfinite(float(eta)):
        raise ValueError(f"ntk_velocity: eta must be a finite number, got {eta!r}.")
    setup, restore = _prepare(model, x_probe, learning_rates, dtype, what)
    try:
        return _ntk_velocity(setup, x_probe, x_train, error, eta, method, dtype, backend, what)
    finally:
        restore()


def _ntk_velocity(
    setup: _Functional, x_probe: ModelInput, x_train: ModelInput, error: Any, eta: float, method: str,
    dtype: Optional[torch.dtype], backend: str, what: str,
) -> torch.Tensor:
    if dtype is not None:
        x_train = cast_inputs(x_train, dtype)
    validate_inputs(x_probe if dtype is None else setup.x, x_train, device=setup.device, dtype=setup.dtype)
    n_train = batch_size(x_train)
    params = setup.params
    z_train, pull = vjp(lambda p: setup.f(p, x_train), params)
    eps = _error_matrix(error, n_train, setup.k, z_train)
    (g,) = pull(eps)
    step = {name: -float(eta) * setup.lam[name] * g[name] for name in params}
    use_structured = method == "structured" or (method == "auto" and _structured_available(setup))
    if use_structured:
        from torch_crit.ntk.dntk_structured import structured_velocity

        return structured_velocity(setup, step, what=what, strict=method == "structured", backend=backend)
    return _generic_velocity(setup, step, list(params), what)


def _generic_velocity(setup: _Functional, step: Dict[str, torch.Tensor], contract: Sequence[str], what: str) -> torch.Tensor:
    """``d/dt H(θ + t·step)`` contracted over the parameter tensors ``contract``: ``[N, N, k, k]``."""
    n, k = setup.n, setup.k
    out = torch.zeros(n, n, k, k, dtype=setup.dtype, device=setup.device)
    contract = [c for c in contract if c in setup.params]
    if not contract:
        return out
    jac = setup.per_sample(contract)
    J, Jdot = _run_second_order(lambda: jvp(jac, (setup.params,), (step,)), what)
    for name in contract:
        a = J[name].reshape(n * k, -1)
        b = Jdot[name].reshape(n * k, -1)
        s = setup.lam[name] * (b @ a.T)
        out += (s + s.T).reshape(n, k, n, k).permute(0, 2, 1, 3)
    return out
