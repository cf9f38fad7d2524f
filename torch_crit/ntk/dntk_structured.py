r"""Structured dNTK (11.8) and NTK velocity (11.10) for Linear/Conv layers.

For a layer with per-example weight gradient :math:`\partial z_{i;\delta}/\partial W = \Phi(G_{\delta i}, X_\delta)`
— bilinear in the layer input :math:`X` and the output cotangent :math:`G` captured by
:func:`torch_crit.ntk.capture.layer_inputs_and_cotangents` (for ``nn.Linear`` on ``[N, d]``
inputs :math:`\Phi = G\,X^\top`) — the part of (11.8) whose contracted parameter index runs
over this layer is

.. math::
    \widehat{dH}^{\text{layer}}_{i_0 i_1 i_2;\delta_0\delta_1\delta_2}
    = \big\langle D_{u_2}\,\partial_\theta z_{i_0;\delta_0},\ \Lambda\,\partial_\theta z_{i_1;\delta_1}\big\rangle
    = \lambda_W\big[(\dot G_0\!\cdot G_1)(X_0\!\cdot X_1) + (G_0\!\cdot G_1)(\dot X_0\!\cdot X_1)\big]
      + \lambda_b\,(\dot G_0\!\cdot G_1),

where the dots are directional derivatives along :math:`u_2 = \Lambda\nabla_\theta z_{i_2;\delta_2}`:
the derivative of :math:`\Phi(G_0, X_0)` is :math:`\Phi(\dot G_0, X_0) + \Phi(G_0, \dot X_0)` by
bilinearity, and the bias gradient is :math:`G` itself. This is the layer-sum form of the book's
forward equation (11.24): its first two lines are the :math:`\dot G` term, its last two the
:math:`\dot X` term.

**Directional derivatives by low-rank injection.** For a Linear layer on ``[N, d]`` inputs the
component of :math:`u_2` on the layer is rank one,
:math:`\dot W = \lambda_W\, g_{\delta_2 i_2} x_{\delta_2}^\top`, :math:`\dot b = \lambda_b\, g_{\delta_2 i_2}`
(:math:`g = G`, :math:`x = X` of that layer; a layer called several times sums over its calls).
Perturbing the weights changes the network in two places only: the layer's output moves by
:math:`\epsilon_{\delta_0} = \dot W x_{\delta_0} + \dot b = g_{\delta_2 i_2}(\lambda_W\, x_{\delta_2}\!\cdot x_{\delta_0} + \lambda_b)`
(from the Gram :math:`XX^\top`), and the backward pass through it gains
:math:`s_{i_0;\delta_0} = \dot W^\top g_{\delta_0 i_0} = \lambda_W\, x_{\delta_2}(g_{\delta_2 i_2}\!\cdot g_{\delta_0 i_0})`
(from the Gram :math:`GG^\top`). With :math:`F = \sum_i e_i\cdot f` and the probes :math:`p` (zeros
added to the layer outputs, :math:`G = \nabla_p F`), :math:`\nabla_\theta F\cdot u = \sum_\ell
\langle G^{(\ell)}, \dot W^{(\ell)} X^{(\ell)} + \dot b^{(\ell)}\rangle`, so

.. math::
    \dot X^{(\ell)} = D_p X^{(\ell)}[\epsilon], \qquad
    \dot G^{(\ell)} = \nabla_{p^{(\ell)}}\big(\nabla_\theta F\cdot u\big)
      = D_p G^{(\ell)}[\epsilon] + \sum_{\ell'} \nabla_{p^{(\ell)}}\big\langle s^{(\ell')}, X^{(\ell')}\big\rangle

exactly (product rule; mixed partials commute). Both come out of one forward-over-reverse pass:
the capture takes the probes and extra cotangent *seeds* on the recorded inputs as arguments, and
one ``torch.func.jvp`` with primals (probes = 0, seeds = 0) and tangents (:math:`\epsilon`,
:math:`s`), vmapped over a block of directions, returns :math:`\dot X, \dot G` — one batched
forward tangent pass (:math:`W\dot x`) and one backward tangent pass (:math:`W^\top\dot g`), no
dense :math:`\dot W` and no :math:`[Nk, P]` tangent tensor. The primals do not depend on the
vmapped tangents, so the primal pass runs once per block, unbatched. The injected
:math:`\epsilon, s` carry the mixed second derivatives :math:`\partial^2 z/\partial W^{(\ell)}\partial\theta`
(the :math:`\delta`-terms of (11.24)); propagating them through the network adds the rest.

* ``nn.Linear`` on ``[N, d]`` inputs (*Gram groups*): injection as above; the :math:`\dot G` term
  through the fused primitive :func:`torch_crit._ops.gram_hadamard_accumulate_` (``A = Ġ₀``,
  ``B = G₁``, ``C = λ_W X₀X₁ᵀ + λ_b``, ``[B·N, N]``), the :math:`\dot X` term with the
  precomputed cotangent Gram :math:`GG^\top` as the factor (one more primitive term when one
  output pair is computed, else a Hadamard product with :math:`\dot X X^\top`, ``k`` times
  cheaper than a Gram over the units).
* ``nn.Linear`` on ``[N, ..., d]`` inputs and ``nn.Conv1d/2d/3d`` (``padding_mode="zeros"``):
  dense parameter tangents :math:`u_2` in the same ``jvp``; per-example weight gradients
  :math:`\Phi` (the module's own VJP, vmapped) and their derivatives, one primitive term each.
* A module called several times (shared weights) sums over its calls (cross terms included, in
  :math:`\epsilon`, :math:`s` and the contraction); parameters of other modules — or shared
  between a covered and an uncovered module — get dense tangents in the same ``jvp`` and their
  own contraction by the exact generic path of :mod:`torch_crit.ntk.dntk`.

The NTK velocity (:func:`structured_velocity`) has one dense direction (the update step), so it
keeps the plain ``jvp`` along the parameters.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Literal, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call, jvp, vjp, vmap

from torch_crit import _ops
from torch_crit.ntk.capture import CallInfo, layer_inputs_and_cotangents, trace_calls

if TYPE_CHECKING:  # pragma: no cover
    from torch_crit.ntk.dntk import _Functional

__all__ = ["covers_any", "structured_dntk_into", "structured_velocity", "StructuredPlan", "plan_structured"]

_COVERED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
Backend = Literal["ext", "torch"]


@dataclass
class _Group:
    """One covered parameter pair (weight, bias) and the calls that use it."""

    weight: Optional[str]  # canonical parameter name (None: weight not trained)
    bias: Optional[str]
    lam_w: float
    lam_b: float
    module: nn.Module
    calls: List[int] = field(default_factory=list)  # indices into StructuredPlan.calls
    gram: bool = True  # Linear on [N, d] inputs: Gram–Hadamard form; else per-example gradients


@dataclass
class StructuredPlan:
    """Which parameters the structured path covers, and how."""

    modules: List[str]
    calls: List[CallInfo]
    groups: List[_Group]
    generic: List[str]  # trainable parameter names left to the generic path


def _canonical(model: nn.Module) -> Dict[int, str]:
    out: Dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), name)
    return out


def plan_structured(setup: "_Functional") -> StructuredPlan:
    """Split the trainable parameters of ``setup`` into covered (weight, bias) groups and the rest."""
    model = setup.model
    canon = _canonical(model)
    params = setup.params
    # every module that uses each trainable parameter
    users: Dict[str, List[Tuple[str, nn.Module, str]]] = {}
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            cname = canon[id(p)]
            if cname in params:
                users.setdefault(cname, []).append((mname, mod, pname))
    covered_params: Dict[str, str] = {}  # param -> module name
    candidates: Dict[str, nn.Module] = {}
    for cname, us in users.items():
        if len(us) != 1:
            continue  # shared between modules: exact generic path
        mname, mod, pname = us[0]
        if type(mod) in _COVERED and pname in ("weight", "bias"):
            if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and mod.padding_mode != "zeros":
                continue
            covered_params[cname] = mname
            candidates[mname] = mod
    modules = sorted(candidates, key=list(dict(model.named_modules())).index)
    if not modules:
        return StructuredPlan([], [], [], list(params))
    calls = trace_calls(model, setup.x, modules, params={**params, **setup.constants}, buffers={})
    bad = {c.module for c in calls if not c.batch_first}
    modules = [m for m in modules if m not in bad]
    calls = [c for c in calls if c.module not in bad]
    groups: List[_Group] = []
    for mname in modules:
        mod = candidates[mname]
        w = canon[id(mod.weight)]
        b = canon[id(mod.bias)] if mod.bias is not None else None
        w = w if w in covered_params else None
        b = b if b is not None and b in covered_params else None
        if w is None and b is None:
            continue
        idx = [i for i, c in enumerate(calls) if c.module == mname]
        gram = isinstance(mod, nn.Linear) and all(len(calls[i].input_shape) == 2 for i in idx)
        groups.append(_Group(w, b, setup.lam.get(w, 0.0) if w else 0.0, setup.lam.get(b, 0.0) if b else 0.0, mod, idx, gram))
    done = {g.weight for g in groups} | {g.bias for g in groups}
    generic = [n for n in params if n not in done]
    return StructuredPlan(modules, calls, groups, generic)


def _checked_plan(setup: "_Functional", what: str, strict: bool) -> StructuredPlan:
    """:func:`plan_structured`, refusing (``strict``: method='structured') a model it cannot cover."""
    plan = plan_structured(setup)
    if strict and not plan.groups:
        raise ValueError(
            f"{what}: method='structured' but the model has no nn.Linear / nn.Conv1d/2d/3d layer "
            f"with trainable parameters (of its own, batch-first); use method='generic' or 'auto'."
        )
    return plan


def covers_any(setup: "_Functional") -> bool:
    """Whether the structured path covers at least one trainable parameter of ``setup``."""
    return any(type(m) in _COVERED for m in setup.model.modules())


# ----------------------------------------------------------------------------- per-example gradients


def _phi(group: _Group, X: torch.Tensor, G: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    r"""Per-example, per-output gradients of the layer's weight and bias: ``[M, k, P_w]``, ``[M, k, P_b]``.

    ``X`` ``[M, *S_in]`` (layer inputs), ``G`` ``[M, k, *S_out]`` (output cotangents); bilinear in
    (X, G): :math:`\Phi(G, X) = \partial\langle G, \mathrm{layer}(X)\rangle/\partial(W, b)`.
    """
    mod = group.module
    if group.gram:  # Linear on [M, d]
        w = torch.einsum("nkm,nd->nkmd", G, X).flatten(2) if group.weight else None
        b = G if group.bias else None
        return w, b
    weight, bias = mod.weight.detach(), (mod.bias.detach() if mod.bias is not None else None)

    def one(x1: torch.Tensor, g1: torch.Tensor):
        def f(wt: torch.Tensor, bt: Optional[torch.Tensor]) -> torch.Tensor:
            t = {"weight": wt} if bt is None else {"weight": wt, "bias": bt}
            return functional_call(mod, t, (x1.unsqueeze(0),))

        _, pull = vjp(f, weight, bias)
        gw, gb = pull(g1.unsqueeze(0))
        return gw.reshape(-1), (gb.reshape(-1) if gb is not None else torch.zeros(0, dtype=gw.dtype, device=gw.device))

    gw, gb = vmap(vmap(one, in_dims=(None, 0)), in_dims=(0, 0))(X, G)
    return (gw if group.weight else None), (gb if group.bias else None)


def _psi(group: _Group, X: torch.Tensor, G: torch.Tensor, scaled: bool, bias: bool = True) -> torch.Tensor:
    """``[M, k, P_w + P_b]``: per-example gradients concatenated, λ-scaled when ``scaled``.

    With ``bias=False`` the bias columns are zero: the tangent term Φ(G, Ẋ) of a derivative,
    since the bias gradient depends on G only (the constant input 1 has no derivative).
    """
    w, b = _phi(group, X, G)
    parts = []
    if w is not None:
        parts.append(w * group.lam_w if scaled else w)
    if b is not None:
        b = b.reshape(b.shape[0], b.shape[1], -1)
        parts.append(torch.zeros_like(b) if not bias else (b * group.lam_b if scaled else b))
    return torch.cat(parts, dim=2)


def _accumulate(out: torch.Tensor, A: List[torch.Tensor], B: List[torch.Tensor], C: List[Optional[torch.Tensor]], backend: Backend) -> None:
    if not A:
        return
    if backend == "ext":
        _ops.gram_hadamard_accumulate_(out, A, B, C)
    else:
        _ops.gram_hadamard_accumulate_reference_(out, A, B, C)


# ----------------------------------------------------------------------------- directions


def _directions(
    setup: "_Functional", plan: StructuredPlan, xs: List[torch.Tensor], gs: List[torch.Tensor], what: str, names: Optional[Sequence[str]] = None
) -> Dict[str, torch.Tensor]:
    r"""``u[(δ, i)] = Λ ∇z[δ, i]`` as ``{name: [N·k, *shape]}`` for ``names`` (default: every trainable parameter)."""
    from torch_crit.ntk.dntk import _run_second_order

    n, k = setup.n, setup.k
    wanted = set(setup.params if names is None else names)
    U: Dict[str, torch.Tensor] = {}
    for g in plan.groups:
        if g.weight not in wanted and g.bias not in wanted:
            continue
        w = b = None
        for c in g.calls:
            pw, pb = _phi(g, xs[c], gs[c])
            w = pw if w is None else (w + pw if pw is not None else w)
            b = pb if b is None else (b + pb if pb is not None else b)
        if g.weight:
            U[g.weight] = (g.lam_w * w).reshape(n * k, *setup.params[g.weight].shape)
        if g.bias:
            U[g.bias] = (g.lam_b * b).reshape(n * k, *setup.params[g.bias].shape)
    if wanted & set(plan.generic):
        J = _run_second_order(lambda: setup.per_sample(plan.generic)(setup.params), what)
        for name in plan.generic:
            U[name] = (setup.lam[name] * J[name]).reshape(n * k, *J[name].shape[2:])
    return {name: U[name] for name in setup.params if name in wanted}


def _capture_fn(setup: "_Functional", plan: StructuredPlan) -> Callable[[Dict[str, torch.Tensor]], Tuple[List[torch.Tensor], List[torch.Tensor]]]:
    from torch_crit.ntk.dntk import _SecondOrderSafe

    def cap(p: Dict[str, torch.Tensor]):
        with _SecondOrderSafe():  # LayerNorm through its composite form (exact second derivatives)
            _, xs, gs = layer_inputs_and_cotangents(setup.model, {**p, **setup.constants}, setup.x, plan.modules, buffers={}, calls=plan.calls)
        return xs, gs

    return cap


def _injected_capture_fn(
    setup: "_Functional", plan: StructuredPlan, dense: Sequence[str]
) -> Callable[[Dict[str, torch.Tensor], Dict[int, torch.Tensor], Dict[int, torch.Tensor]], Tuple[List[torch.Tensor], List[torch.Tensor]]]:
    """``(p_dense, probes, seeds) -> (X, G)``: the capture with the parameters outside ``dense`` held fixed."""
    from torch_crit.ntk.dntk import _SecondOrderSafe

    fixed = {name: t for name, t in setup.params.items() if name not in set(dense)}

    def cap(p: Dict[str, torch.Tensor], probes: Dict[int, torch.Tensor], seeds: Dict[int, torch.Tensor]):
        with _SecondOrderSafe():  # LayerNorm through its composite form (exact second derivatives)
            _, xs, gs = layer_inputs_and_cotangents(
                setup.model, {**fixed, **p, **setup.constants}, setup.x, plan.modules, buffers={}, calls=plan.calls, probes=probes, seeds=seeds
            )
        return xs, gs

    return cap


def _injection(
    plan: StructuredPlan,
    xs: List[torch.Tensor],
    gs: List[torch.Tensor],
    XX: Dict[Tuple[int, int], torch.Tensor],
    GG: Dict[Tuple[int, int], torch.Tensor],
    d2: torch.Tensor,
    i2: torch.Tensor,
) -> Tuple[Dict[int, torch.Tensor], Dict[int, torch.Tensor]]:
    r"""Probe tangents :math:`\epsilon` ``{c: [B, N, n_out]}`` and seed tangents :math:`s` ``{c: [B, k, N, n_in]}``.

    For the directions :math:`(\delta_2, i_2)` = ``(d2[b], i2[b])`` and every call ``c`` of a Gram
    group (Linear on ``[N, d]``), the rank-one weight tangent
    :math:`\dot W = \lambda_W \sum_{c_2} g^{(c_2)}_{\delta_2 i_2} x^{(c_2)\top}_{\delta_2}`,
    :math:`\dot b = \lambda_b \sum_{c_2} g^{(c_2)}_{\delta_2 i_2}` gives

    .. math::
        \epsilon^{(c)}_{\delta_0} = \dot W x^{(c)}_{\delta_0} + \dot b
          = \sum_{c_2} g^{(c_2)}_{\delta_2 i_2}\,(\lambda_W\, x^{(c_2)}_{\delta_2}\!\cdot x^{(c)}_{\delta_0} + \lambda_b),
        \qquad
        s^{(c)}_{i_0;\delta_0} = \dot W^\top g^{(c)}_{\delta_0 i_0}
          = \lambda_W \sum_{c_2} x^{(c_2)}_{\delta_2}\,(g^{(c_2)}_{\delta_2 i_2}\!\cdot g^{(c)}_{\delta_0 i_0}),

    from the primal Grams ``XX[c2, c]`` ``[N, N]`` and ``GG[c2, c]`` ``[N, N, k, k]`` (cost
    :math:`O(BNn)` and :math:`O(BkNn)`, no dense :math:`\dot W`). The seed of a call whose input
    cannot depend on any probe (the first captured call) is skipped: it would back-propagate to
    nothing.
    """
    eps: Dict[int, torch.Tensor] = {}
    seeds: Dict[int, torch.Tensor] = {}
    for g in plan.groups:
        if not g.gram:
            continue
        for c in g.calls:
            e: Optional[torch.Tensor] = None
            s: Optional[torch.Tensor] = None
            for c2 in g.calls:
                gd = gs[c2][d2, i2]  # [B, n_out]
                coef = g.lam_w * XX[c2, c][d2] + g.lam_b if g.weight else torch.full((d2.numel(), 1), g.lam_b, dtype=gd.dtype, device=gd.device)
                term = coef.unsqueeze(2) * gd.unsqueeze(1)  # [B, N, n_out]
                e = term if e is None else e.add_(term)
                if g.weight and c > 0:
                    cg = GG[c2, c][d2, :, i2, :].transpose(1, 2)  # [B, k(i0), N(δ0)]
                    term_s = (g.lam_w * cg).unsqueeze(3) * xs[c2][d2][:, None, None, :]  # [B, k, N, n_in]
                    s = term_s if s is None else s.add_(term_s)
            if e is not None and e.shape[1] != xs[c].shape[0]:  # bias-only group: one row for every δ0
                e = e.expand(-1, xs[c].shape[0], -1)
            eps[c] = e.contiguous()
            if s is not None:
                seeds[c] = s
    return eps, seeds


def _contract_block(
    plan: StructuredPlan,
    xs: List[torch.Tensor],
    gs: List[torch.Tensor],
    dxs: List[torch.Tensor],
    dgs: List[torch.Tensor],
    XX: Dict[Tuple[int, int], torch.Tensor],
    GG: Dict[Tuple[int, int], torch.Tensor],
    PSI: Dict[int, torch.Tensor],
    i2: Optional[int],
    backend: Backend,
) -> torch.Tensor:
    r"""``[B, N(δ0), N(δ1), kk(i0), kk(i1)]``: the dNTK (11.8) of the covered groups for one block of directions.

    ``dxs``/``dgs`` are the block's directional derivatives ``[B, N, ...]``/``[B, N, k, ...]``;
    ``i2`` ``None``: all output pairs (``kk = k``), an int: only ``i0 = i1 = i2`` (``kk = 1``).
    """
    n = xs[0].shape[0] if xs else gs[0].shape[0]
    B = (dgs[0] if dgs else dxs[0]).shape[0]
    k = gs[0].shape[1]
    kk = k if i2 is None else 1
    sel = slice(None) if i2 is None else slice(i2, i2 + 1)
    dtype, device = gs[0].dtype, gs[0].device
    tile = torch.zeros(B * n, n, kk, kk, dtype=dtype, device=device)
    extra: Optional[torch.Tensor] = None
    A_t: List[torch.Tensor] = []
    B_t: List[torch.Tensor] = []
    C_t: List[Optional[torch.Tensor]] = []
    for gi, g in enumerate(plan.groups):
        if g.gram:
            for c in g.calls:
                dG0 = dgs[c][:, :, sel].reshape(B * n, kk, -1)
                for c2 in g.calls:
                    # λ_W (Ġ0·G1)(X0·X1) + λ_b (Ġ0·G1): the fused primitive
                    A_t.append(dG0)
                    B_t.append(gs[c2][:, sel].reshape(n, kk, -1))
                    C_t.append((g.lam_w * XX[c, c2] + g.lam_b).expand(B, n, n).reshape(B * n, n))
                    if g.weight and kk == 1:  # λ_W (Ẋ0·X1)(G0·G1): one more primitive term
                        A_t.append(dxs[c].reshape(B * n, 1, -1))
                        B_t.append(xs[c2].reshape(n, 1, -1))
                        C_t.append((g.lam_w * GG[c, c2][:, :, sel, sel].reshape(n, n)).expand(B, n, n).reshape(B * n, n))
                    elif g.weight:  # Hadamard with the precomputed cotangent Gram (k× cheaper than k² GEMMs)
                        dXX = torch.matmul(dxs[c], xs[c2].T)  # [B, N(δ0), N(δ1)]
                        gg = GG[c, c2][:, :, sel, sel]
                        if extra is None:
                            extra = torch.zeros(B, n, n, kk, kk, dtype=dtype, device=device)
                        extra.addcmul_(dXX[:, :, :, None, None], gg.unsqueeze(0), value=g.lam_w)
        else:
            dpsi = sum(
                _psi(g, dxs[c].reshape(B * n, *dxs[c].shape[2:]), gs[c].unsqueeze(0).expand(B, *gs[c].shape).reshape(B * n, *gs[c].shape[1:]), scaled=True, bias=False)
                + _psi(g, xs[c].unsqueeze(0).expand(B, *xs[c].shape).reshape(B * n, *xs[c].shape[1:]), dgs[c].reshape(B * n, *dgs[c].shape[2:]), scaled=True)
                for c in g.calls
            )
            A_t.append(dpsi[:, sel].contiguous())
            B_t.append(PSI[gi][:, sel].contiguous())
            C_t.append(None)
    _accumulate(tile, A_t, B_t, C_t, backend)
    tile = tile.reshape(B, n, n, kk, kk)
    return tile if extra is None else tile.add_(extra)


# ----------------------------------------------------------------------------- dNTK


def structured_dntk_into(
    setup: "_Functional",
    out: torch.Tensor,
    *,
    diagonal: bool,
    block_size: Optional[int],
    what: str,
    strict: bool,
    backend: Backend = "ext",
) -> StructuredPlan:
    r"""Add the dNTK (11.8) into ``out`` (``[N,N,N,k,k,k]`` or, with ``diagonal``, ``[N,N,N,k]``).

    Per block of directions :math:`(\delta_2, i_2)`: :math:`\dot X, \dot G` of every covered call
    by one vmapped ``jvp`` of the capture — Gram groups through the low-rank injection of
    :func:`_injection` (probe and seed tangents), the other covered groups and the uncovered
    parameters through dense parameter tangents :math:`u = \Lambda\nabla z`, all in the same
    ``jvp``; then per covered group one fused-primitive term
    (:math:`\dot G_0 G_1^\top \odot (\lambda_W X_0X_1^\top + \lambda_b)`) accumulated into the
    block's ``[B·N, N, k, k]`` tile, plus :math:`\lambda_W (G_0G_1^\top) \odot (\dot X_0 X_1^\top)`;
    uncovered parameters by the generic path. With ``diagonal`` the directions are ordered
    output-major, so one block may span several :math:`i_2` (one ``jvp``, one contraction per
    :math:`i_2`). Returns the plan used.
    """
    from torch_crit.ntk.dntk import _auto_block, _blocks, _generic_dntk_into, _run_second_order

    plan = _checked_plan(setup, what, strict)
    n, k = setup.n, setup.k
    params = setup.params
    xs, gs = _run_second_order(lambda: _capture_fn(setup, plan)(params), what)
    # parameters with dense tangents: non-Gram covered groups and the generic ones
    dense_set = {name for g in plan.groups if not g.gram for name in (g.weight, g.bias) if name} | set(plan.generic)
    dense = [name for name in params if name in dense_set]
    if plan.generic:
        U_all = _directions(setup, plan, xs, gs, what)
        _generic_dntk_into(setup, out, plan.generic, diagonal=diagonal, block_size=block_size, what=what, directions=U_all)
        U = {name: U_all[name] for name in dense}
        del U_all
    else:
        U = _directions(setup, plan, xs, gs, what, names=dense)
    if not plan.groups:
        return plan
    U = {name: t.reshape(n, k, *t.shape[1:]) for name, t in U.items()}
    # primal, direction-independent pieces: per covered pair of calls X·X and G·G Grams, Ψ for the rest
    XX: Dict[Tuple[int, int], torch.Tensor] = {}
    GG: Dict[Tuple[int, int], torch.Tensor] = {}
    PSI: Dict[int, torch.Tensor] = {}
    for gi, g in enumerate(plan.groups):
        if g.gram:
            for c in g.calls:
                for c2 in g.calls:
                    XX[c, c2] = xs[c] @ xs[c2].T
                    if g.weight:
                        GG[c, c2] = torch.einsum("pim,qjm->pqij", gs[c], gs[c2])  # [N, N, k, k]
        else:
            PSI[gi] = sum(_psi(g, xs[c], gs[c], scaled=False) for c in g.calls)
    # the jvp's primals: dense parameters, zero probes/seeds — none depends on the vmapped tangents,
    # so vmap batches only the tangent computations, never the primal pass
    p_dense = {name: params[name] for name in dense}
    gram_calls = [c for g in plan.groups if g.gram for c in g.calls]
    probes0 = {c: torch.zeros(plan.calls[c].output_shape, dtype=out.dtype, device=out.device) for c in gram_calls}
    seeds0 = {
        c: torch.zeros(k, *plan.calls[c].input_shape, dtype=out.dtype, device=out.device)
        for g in plan.groups if g.gram and g.weight for c in g.calls if c > 0
    }
    cap = _injected_capture_fn(setup, plan, dense)

    def along(u: Dict[str, torch.Tensor], e: Dict[int, torch.Tensor], s: Dict[int, torch.Tensor]):
        return jvp(cap, (p_dense, probes0, seeds0), (u, e, s))[1]

    feat = sum(gs[c][0].numel() + 2 * xs[c][0].numel() for g in plan.groups for c in g.calls)
    itemsize = out.element_size()
    per_dir = (4 * n * feat + n * n * k * k + sum(p.shape[2] for p in PSI.values()) * n * k) * itemsize
    bs = block_size or _auto_block(n * k, per_dir, setup.device)
    view = out.permute(2, 5, 0, 3, 1, 4) if not diagonal else out.permute(2, 3, 0, 1)
    for s, e in _blocks(n * k, bs):
        j = torch.arange(s, e, device=out.device)
        if not diagonal:  # flattened (δ2, i2), i2 fastest
            d2, i2 = j // k, j % k
            Ub = {name: t.flatten(0, 1)[s:e] for name, t in U.items()}
        else:  # output-major (i2, δ2): the rows of one i2 are contiguous
            d2, i2 = j % n, j // n
            Ub = {name: t[d2, i2] for name, t in U.items()}
        Eb, Sb = _injection(plan, xs, gs, XX, GG, d2, i2)
        dxs, dgs = _run_second_order(lambda: vmap(along)(Ub, Eb, Sb), what)  # [B, N, ...], [B, N, k, ...]
        del Ub, Eb, Sb
        if not diagonal:
            tile = _contract_block(plan, xs, gs, dxs, dgs, XX, GG, PSI, None, backend)
            view[d2, i2] += tile.permute(0, 1, 3, 2, 4)  # [B, δ0, i0, δ1, i1]
        else:
            for r0, r1, o in _runs(i2.tolist()):
                rows = slice(r0, r1)
                tile = _contract_block(plan, xs, gs, [t[rows] for t in dxs], [t[rows] for t in dgs], XX, GG, PSI, o, backend)
                view[d2[rows], o] += tile[..., 0, 0]
    return plan


def _runs(values: List[int]) -> Iterator[Tuple[int, int, int]]:
    """``(start, stop, value)`` of the maximal runs of equal consecutive values."""
    start = 0
    for r in range(1, len(values) + 1):
        if r == len(values) or values[r] != values[start]:
            yield start, r, values[start]
            start = r


# ----------------------------------------------------------------------------- velocity


def structured_velocity(setup: "_Functional", step: Dict[str, torch.Tensor], *, what: str, strict: bool, backend: Backend = "ext") -> torch.Tensor:
    r"""``d/dt H(θ + t·step)`` on the probe inputs, ``[N, N, k, k]`` (see :func:`torch_crit.ntk_velocity`).

    One ``jvp`` of the capture along ``step`` gives :math:`X, G, \dot X, \dot G`; per covered layer
    :math:`S = (\dot G G^\top)\odot(\lambda_W XX^\top + \lambda_b) + \lambda_W (GG^\top)\odot(\dot X X^\top)`
    (fused primitive) and :math:`\dot H = S + S^\top`; uncovered parameters by the generic path.
    """
    from torch_crit.ntk.dntk import _generic_velocity, _run_second_order

    plan = _checked_plan(setup, what, strict)
    n, k = setup.n, setup.k
    out = _generic_velocity(setup, step, plan.generic, what)
    if not plan.groups:
        return out
    cap = _capture_fn(setup, plan)
    (xs, gs), (dxs, dgs) = _run_second_order(lambda: jvp(cap, (setup.params,), (step,)), what)
    S = torch.zeros(n, n, k, k, dtype=out.dtype, device=out.device)
    A_t: List[torch.Tensor] = []
    B_t: List[torch.Tensor] = []
    C_t: List[Optional[torch.Tensor]] = []
    for g in plan.groups:
        if g.gram:
            for c in g.calls:
                for c2 in g.calls:
                    A_t.append(dgs[c])
                    B_t.append(gs[c2])
                    C_t.append(g.lam_w * (xs[c] @ xs[c2].T) + g.lam_b)
                    if g.weight:
                        A_t.append(gs[c])
                        B_t.append(gs[c2])
                        C_t.append(g.lam_w * (dxs[c] @ xs[c2].T))
        else:
            dpsi = sum(_psi(g, dxs[c], gs[c], scaled=True, bias=False) + _psi(g, xs[c], dgs[c], scaled=True) for c in g.calls)
            psi = sum(_psi(g, xs[c], gs[c], scaled=False) for c in g.calls)
            A_t.append(dpsi)
            B_t.append(psi)
            C_t.append(None)
    _accumulate(S, [a.contiguous() for a in A_t], [b.contiguous() for b in B_t], C_t, backend)
    return out + S + S.permute(1, 0, 3, 2)
