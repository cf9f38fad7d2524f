r"""``empirical_ntk``: the exact empirical NTK of any differentiable PyTorch model, fast.

The book's NTK (8.5) with the learning-rate tensor (8.6), for network outputs
:math:`f_{i;a}` (example ``i``, flattened output ``a``) and parameter tensors :math:`p` with
scales :math:`\lambda_p`:

.. math::
    H_{ij;ab} = \sum_p \lambda_p \sum_{\mu \in p}
        \frac{\partial f_{i;a}}{\partial\theta_\mu}\frac{\partial f_{j;b}}{\partial\theta_\mu}
    \;=\; \sum_{\text{layers }\ell} H^{(\ell)}_{ij;ab}\quad\text{(the layer sum of (8.7))}.

With λ = 1 this is the plain Jacobian Gram :math:`\Theta = J J^\top` of ``torch.func``'s NTK
tutorial and neural-tangents' ``empirical_ntk_fn``.

How it is computed (``return_plan=True`` says, per layer, what was chosen and why):

* **structured** for ``nn.Linear`` (inputs ``[N, *, d]``) and ``nn.Conv1d/2d/3d`` (any stride,
  padding, dilation, groups; zero padding) and their biases: one forward pass storing each
  layer's input and ``k`` vmapped backward passes for the output cotangents
  (:mod:`torch_crit.ntk.capture`), then per layer the cheaper of *activation Gram ⊙ cotangent
  Gram* over position pairs and *per-example weight gradients* (Novak et al., ICML 2022;
  :mod:`torch_crit.ntk.structured`). Modules called several times (shared weights) and
  weights shared between modules are exact, cross terms between calls included.
* **generic** for everything else (LayerNorm, Embedding, attention internals, custom
  parameters, parameters also used outside their module…): per-example Jacobians restricted
  to those parameters (``vmap(jacrev)``), exact (:mod:`torch_crit.ntk.generic`).
* Both feed one fused primitive per tile, :math:`\mathrm{out}_{ij;ab} \mathrel{+}= \sum_t
  (A_t B_t^\top)_{ij;ab}\, C_{t;ij}` (``torch_crit._ops.gram_hadamard_accumulate_``: C++/CUDA
  with ``backend="ext"``, plain PyTorch with ``backend="torch"``).
* The ``N1 × N2`` example pairs are tiled (``block_size``) so that memory stays bounded; the
  plan is checked against the available memory before anything large is allocated.

Example:
    >>> import torch, torch_crit
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    >>> x = torch.randn(8, 4)
    >>> torch_crit.empirical_ntk(net, x).shape
    torch.Size([8, 8, 3, 3])
    >>> torch_crit.empirical_ntk(net, x, output="trace").shape
    torch.Size([8, 8])
"""
from __future__ import annotations

from ..errors import NonDifferentiableError, ZeroJacobianWarning  # noqa: F401  (re-exported)
import contextlib
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Literal, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from torch_crit import _ops
from torch_crit.ntk.capture import CallInfo, layer_inputs_and_cotangents, module_input
from torch_crit.ntk.generic import GenericUnit, generic_diagonal, generic_terms, per_sample_jacobians
from torch_crit.ntk.inputs import (
    check_probe,
    unwrap_model,
    ModelInput,
    batch_size,
    call_model,
    cast_inputs,
    flatten_output,
    slice_batch,
    validate_inputs,
)
from torch_crit.ntk.learning_rates import LearningRates, resolve_learning_rates
from torch_crit.ntk.memory import available_memory, plan_memory
from torch_crit.ntk.plan import LayerPlan, NTKPlan
from torch_crit.ntk.structured import (
    Unit,
    call_features,
    choose_contraction,
    coverable,
    unit_diagonal,
    unit_features,
    unit_terms,
)

__all__ = [
    "empirical_ntk",
    "plan_ntk",
    "NonDifferentiableError",
    "ZeroJacobianWarning",
    "OUTPUTS",
    "METHODS",
    "BACKENDS",
]

Output = Literal["full", "trace", "diagonal", "diagonal_trace"]
OUTPUTS = ("full", "trace", "diagonal", "diagonal_trace")
METHODS = ("auto", "structured", "generic")
BACKENDS = ("ext", "torch")
NTKResult = Union[torch.Tensor, Dict[str, torch.Tensor]]


# Ops whose derivative is zero almost everywhere (or that cut the graph).
_ZERO_GRAD_OPS = frozenset(
    {"round", "floor", "ceil", "sign", "trunc", "fix", "argmax", "argmin", "argsort", "heaviside",
     "bucketize", "searchsorted", "detach", "detach_", "round_", "floor_", "ceil_", "sign_", "trunc_"}
)


class _OpRecorder(TorchFunctionMode):
    """Records ops applied to grad-requiring tensors that have zero or no derivative."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D401
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", None) or str(func)
        if name.startswith("__") and name not in ("__gt__", "__lt__", "__ge__", "__le__", "__eq__", "__ne__"):
            return out
        if any(isinstance(a, torch.Tensor) and a.requires_grad for a in tree_leaves((args, kwargs))):
            flagged = name in _ZERO_GRAD_OPS
            if not flagged and isinstance(out, torch.Tensor):
                flagged = not (out.is_floating_point() or out.is_complex())
            if flagged:
                self.ops[name] = self.ops.get(name, 0) + 1
        return out


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, t in modes:
            m.training = t


def _group_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


@dataclass
class _Setup:
    model: nn.Module
    x1: ModelInput
    x2: Optional[ModelInput]
    n1: int
    n2: int
    k: int
    output: str
    trace: bool
    per_layer: bool
    backend: str
    accumulate_fp64: bool
    dtype: torch.dtype
    params: Dict[str, torch.Tensor]
    buffers: Dict[str, torch.Tensor]
    units: List[Unit]
    gunits: List[GenericUnit]
    modules: Dict[str, nn.Module]
    struct_modules: List[str]
    groups: List[str]
    plan: NTKPlan
    progress: bool
    generic_names: List[str] = field(default_factory=list)
    call_shapes: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)

    @property
    def tensors(self) -> Dict[str, torch.Tensor]:
        return {**self.buffers, **self.params}


def _diagnose(model: nn.Module, tensors: Dict[str, torch.Tensor], xs: ModelInput, lam: Dict[str, float]) -> Tuple[int, int]:
    """Differentiability check on a slice; returns ``(k, activation numel per example)``."""
    ns = batch_size(xs)
    p_req = {n: tensors[n].detach().requires_grad_(True) for n in lam}
    act = [0]

    def count(_m: nn.Module, _a: Any, out: Any) -> None:
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                act[0] += t.numel()

    handles = [m.register_forward_hook(count) for m in model.modules()]
    rec = _OpRecorder()
    try:
        with torch.enable_grad(), rec:
            out = call_model(model, {**tensors, **p_req}, xs)
    finally:
        for h in handles:
            h.remove()
    out = flatten_output(out, ns)
    ops = ", ".join(f"{o} (×{c})" for o, c in rec.ops.items())
    if not out.requires_grad or not out.is_floating_point():
        raise NonDifferentiableError(
            f"the model output (dtype {out.dtype}) does not depend differentiably on any trainable "
            f"parameter, so its NTK is zero/undefined. "
            + (f"The forward pass applies non-differentiable ops to parameter-dependent tensors: {ops}. " if ops else "")
            + "Use a differentiable surrogate (e.g. softmax instead of argmax, a straight-through "
            "estimator for round), or return the pre-decision outputs (logits)."
        )
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
    names = list(p_req)
    grads = torch.autograd.grad((out * v).sum(), [p_req[n] for n in names], allow_unused=True)
    zero = [n for n, g in zip(names, grads) if g is None or not bool(g.abs().max() > 0)]
    if zero and rec.ops:
        raise NonDifferentiableError(
            f"trainable parameters {zero} get no gradient through the model outputs, and the "
            f"forward pass applies non-differentiable ops to parameter-dependent tensors: {ops}. "
            f"Their NTK contribution would be silently zero. Use a differentiable surrogate "
            f"(softmax for argmax, a straight-through estimator for round/sign), or freeze those "
            f"parameters with requires_grad_(False) if this is intended."
        )
    if zero:
        warnings.warn(
            f"trainable parameters {zero} have an identically zero Jacobian on the first {ns} "
            f"example(s) (unused by the forward pass?); they contribute nothing where that holds.",
            ZeroJacobianWarning,
            stacklevel=4,
        )
    return int(out.shape[1]), int(act[0] // max(ns, 1))


def _structured_units(
    model: nn.Module,
    tensors: Dict[str, torch.Tensor],
    xs: ModelInput,
    lam: Dict[str, float],
) -> Tuple[List[Unit], Dict[str, nn.Module], Dict[str, str]]:
    """Find the Linear/Conv contributions the structured path handles exactly.

    Returns ``(units, modules by path, reason by excluded parameter, per-example shapes of
    the covered calls in forward order as (module, input shape, output shape))``.
    """
    ns = batch_size(xs)
    canon: Dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        canon.setdefault(id(p), n)
    cands: Dict[str, nn.Module] = {}
    why: Dict[str, str] = {}
    for mname, m in model.named_modules():
        direct = [(r, p) for r, p in m._parameters.items() if p is not None]
        if not direct:
            continue
        ok, reason = coverable(m)
        if ok:
            cands[mname] = m
        else:
            for r, p in direct:
                why.setdefault(canon[id(p)], reason)
    if not cands:
        return [], {}, why, []
    # usage pass: recompute covered calls with detached own parameters; a parameter that
    # still receives a gradient is used outside its module calls (e.g. tied to an embedding).
    p_req = {n: tensors[n].detach().requires_grad_(True) for n in lam}
    calls: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = []

    def make_hook(mname: str):
        def hook(m: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], out: Any) -> Any:
            inp = module_input(args, kwargs)
            w = m.weight.detach()
            b = m.bias.detach() if m.bias is not None else None
            calls.append((mname, tuple(inp.shape) if inp is not None else (), tuple(out.shape)))
            if isinstance(m, nn.Linear):
                return F.linear(inp, w, b)
            return m._conv_forward(inp, w, b)

        return hook

    handles = [m.register_forward_hook(make_hook(n), with_kwargs=True) for n, m in cands.items()]
    try:
        with torch.enable_grad():
            out = flatten_output(call_model(model, {**tensors, **p_req}, xs), ns)
    finally:
        for h in handles:
            h.remove()
    names = list(p_req)
    grads = torch.autograd.grad(out.sum(), [p_req[n] for n in names], allow_unused=True) if out.requires_grad else [None] * len(names)
    used_outside = {n for n, g in zip(names, grads) if g is not None}
    # per module: its calls; batch-first check
    mod_calls: Dict[str, List[Tuple[Tuple[int, ...], Tuple[int, ...]]]] = {}
    for mname, ishape, oshape in calls:
        mod_calls.setdefault(mname, []).append((ishape, oshape))
    bad_mod: Dict[str, str] = {}
    for mname, m in cands.items():
        cl = mod_calls.get(mname, [])
        if not cl:
            bad_mod[mname] = "module is never called by forward() (its parameters are used some other way)"
            continue
        for ishape, oshape in cl:
            nd = 2 if isinstance(m, nn.Linear) else len(m.kernel_size) + 2
            if len(ishape) < 2 or ishape[0] != ns or oshape[0] != ns or (not isinstance(m, nn.Linear) and len(ishape) != nd):
                bad_mod[mname] = f"called on input {ishape} without batch dimension 0 of size N"
                break

    def owners(role: str, pname: str) -> List[str]:
        return [mn for mn, m in cands.items() if m._parameters.get(role) is not None and canon[id(m._parameters[role])] == pname]

    units: List[Unit] = []
    done: set = set()
    for mname, m in cands.items():
        for role in ("weight", "bias"):
            p = m._parameters.get(role)
            if p is None:
                continue
            pname = canon[id(p)]
            if pname in done or pname not in lam:
                continue
            done.add(pname)
            own = owners(role, pname)
            bad = [o for o in own if o in bad_mod]
            if bad:
                why[pname] = f"{bad[0]}: {bad_mod[bad[0]]}"
                continue
            if pname in used_outside:
                why[pname] = "also used outside its Linear/Conv module calls (tied to another op)"
                continue
            if len({(type(cands[o]), getattr(cands[o], "groups", 1)) for o in own}) > 1:
                why[pname] = "shared between modules of different kinds"
                continue
            units.append(Unit(group=_group_of(pname), weight=pname if role == "weight" else None,
                              bias=pname if role == "bias" else None, modules=tuple(own),
                              lam_w=lam[pname] if role == "weight" else 0.0,
                              lam_b=lam[pname] if role == "bias" else 0.0))
    # fuse a weight unit with the bias unit of exactly the same calls
    fused: List[Unit] = []
    biases = {u.modules: u for u in units if u.weight is None}
    used_b: set = set()
    for u in units:
        if u.weight is None:
            continue
        b = biases.get(u.modules)
        if b is not None and id(b) not in used_b:
            used_b.add(id(b))
            u.bias, u.lam_b = b.bias, b.lam_b
        fused.append(u)
    fused += [u for u in units if u.weight is None and id(u) not in used_b]
    # geometry
    for u in fused:
        m0 = cands[u.modules[0]]
        P = 0
        for mn in u.modules:
            for ishape, oshape in mod_calls[mn]:
                P += math.prod(oshape[1:-1]) if isinstance(m0, nn.Linear) else math.prod(oshape[2:])
        if isinstance(m0, nn.Linear):
            u.groups, u.c, u.o = 1, m0.in_features, m0.out_features
        else:
            u.groups = m0.groups
            u.c = (m0.in_channels // m0.groups) * math.prod(m0.kernel_size)
            u.o = m0.out_channels // m0.groups
        u.positions = P
    modules = {mn: cands[mn] for u in fused for mn in u.modules}
    shapes = [(mn, ish[1:], osh[1:]) for mn, ish, osh in calls if mn in modules]
    return fused, modules, why, shapes


def _prepare(
    model: nn.Module,
    x1: ModelInput,
    x2: Optional[ModelInput],
    *,
    output: str,
    per_layer: bool,
    learning_rates: LearningRates,
    method: str,
    block_size: Optional[int],
    dtype: Optional[torch.dtype],
    backend: str,
    accumulate_fp64: bool,
    progress: bool,
) -> _Setup:
    model = unwrap_model(model, "empirical_ntk")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}.")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if output.startswith("diagonal") and x2 is not None:
        raise ValueError(
            f"output={output!r} gives Θ(x_i, x_i) for the examples of x1 and takes no x2; "
            f"pass x2=None (or output='full'/'trace' for Θ(x1, x2))."
        )
    lam_all = resolve_learning_rates(model, learning_rates)
    if not lam_all:
        raise ValueError(
            "the model has no trainable parameters (none with requires_grad=True), so its NTK "
            "is zero; unfreeze the parameters to probe with requires_grad_(True)."
        )
    lam = {n: v for n, v in lam_all.items() if v != 0.0}
    if not lam:
        raise ValueError("every trainable parameter has learning rate 0, so the NTK is zero; check learning_rates.")
    named = dict(model.named_parameters())
    devices = {p.device for p in named.values()}
    if len(devices) > 1:
        raise ValueError(f"the model's parameters are on several devices {sorted(map(str, devices))}; the NTK probes need one device.")
    device = next(iter(devices))
    if dtype is None:
        dts = {named[n].dtype for n in lam}
        if len(dts) > 1:
            raise ValueError(f"the trainable parameters have mixed dtypes {sorted(map(str, dts))}; pass dtype= to compute in one dtype.")
        cdtype = next(iter(dts))
    else:
        cdtype = dtype
    if not cdtype.is_floating_point:
        raise ValueError(f"the compute dtype must be floating point, got {cdtype}.")
    params = {n: (p.detach().to(cdtype) if p.is_floating_point() else p.detach()) for n, p in named.items()}
    buffers = {n: (b.detach().to(cdtype) if b.is_floating_point() else b.detach()) for n, b in model.named_buffers()}
    if dtype is not None:
        x1 = cast_inputs(x1, dtype)
        x2 = cast_inputs(x2, dtype) if x2 is not None else None
    n1, n2o = validate_inputs(x1, x2, device=device, dtype=cdtype)
    check_probe(x1, "empirical_ntk", "x1", block_size)
    if x2 is not None:
        check_probe(x2, "empirical_ntk", "x2")
    n2 = n1 if n2o is None else n2o
    tensors = {**buffers, **params}
    xs = slice_batch(x1, 0, min(n1, 2))
    k, act = _diagnose(model, tensors, xs, lam)
    trace = output in ("trace", "diagonal_trace")

    units: List[Unit] = []
    modules: Dict[str, nn.Module] = {}
    why: Dict[str, str] = {}
    call_shapes: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = []
    if method != "generic":
        units, modules, why, call_shapes = _structured_units(model, tensors, xs, lam)
    covered = {p for u in units for p in u.params}
    gmap: Dict[Tuple[str, float], List[str]] = {}
    for n in lam:
        if n not in covered:
            gmap.setdefault((_group_of(n), lam[n]), []).append(n)
    gunits = [
        GenericUnit(group=g, names=tuple(ns), lam=lv, numel=sum(params[n].numel() for n in ns),
                    reason=("method='generic'" if method == "generic" else
                            "; ".join(sorted({why.get(n, 'no structured rule') for n in ns}))))
        for (g, lv), ns in gmap.items()
    ]
    # order groups by first parameter
    order = {n: i for i, n in enumerate(named)}
    units.sort(key=lambda u: order[u.params[0]])
    gunits.sort(key=lambda g: order[g.names[0]])
    groups: List[str] = []
    for key in sorted([(order[u.params[0]], u.group) for u in units] + [(order[g.names[0]], g.group) for g in gunits]):
        if key[1] not in groups:
            groups.append(key[1])

    # memory plan (contraction chosen for the largest tile first, then refined for the block)
    es = torch.empty((), dtype=cdtype).element_size()
    kk = 1 if trace else k * k
    for u in units:
        choose_contraction(u, n1, n2, k, trace)

    def sizes() -> Tuple[int, int, int]:
        feat = trans = 0
        pair = kk * (len(groups) if per_layer else 1) * 2
        for u in units:
            g, P, c, o = u.groups, u.positions, u.c, u.o
            trans += g * c * P + k * g * o * P
            if u.contraction == "per_sample":
                feat += (k * g * o * c if u.weight and u.lam_w else 0) + (k * g * o if u.bias and u.lam_b else 0)
                pair += 2
            else:
                feat += g * P * k * o + (g * P * c if u.weight and u.lam_w else 0)
                pair += (g * P * P if u.weight and u.lam_w else 1)
            if backend == "torch":
                pair += kk
        gnumel = sum(g.numel for g in gunits)
        feat += k * gnumel
        pair += len(gunits) * (1 + (kk if backend == "torch" else 0))
        trans += 2 * (k + 1) * act + (k * min(gnumel, 1 << 22) * 2 if gunits else 0)
        return feat * es, trans * es, pair * es

    n_out = (n1 * n2 * kk) if not output.startswith("diagonal") else (n1 * kk)
    result_bytes = n_out * es * (len(groups) if per_layer else 1)
    feat_b, trans_b, pair_b = sizes()
    mem = plan_memory(n1=n1, n2=n2, symmetric=x2 is None, result_bytes=result_bytes,
                      feature_bytes_per_example=feat_b, transient_bytes_per_example=trans_b,
                      pair_bytes=pair_b if not output.startswith("diagonal") else 0,
                      output=output, available_bytes=available_memory(device), block_size=block_size)
    b = mem.block_size
    if b < max(n1, n2):
        for u in units:
            choose_contraction(u, min(b, n1), min(b, n2), k, trace)
        feat_b, trans_b, pair_b = sizes()
        mem = plan_memory(n1=n1, n2=n2, symmetric=x2 is None, result_bytes=result_bytes,
                          feature_bytes_per_example=feat_b, transient_bytes_per_example=trans_b,
                          pair_bytes=pair_b if not output.startswith("diagonal") else 0,
                          output=output, available_bytes=available_memory(device), block_size=block_size if block_size is not None else b)

    layers: List[LayerPlan] = []
    for u in units:
        # what vmap(jacrev) + einsum does for this layer: per-example gradients of all its
        # parameters (the per-sample order's FLOPs, bias columns included), then their Gram
        jac = u.flops.get("per_sample", 0.0) + 2.0 * (n1 + n2 + n1 * n2 * kk / k) * k * u.groups * u.o
        flops = {**u.flops, "jacobian": jac}
        why_m = (f"auto: structured ({min(u.flops.values()):.3g} FLOP ≤ Jacobian contraction {jac:.3g}); "
                 if method == "auto" else "")
        layers.append(LayerPlan(group=u.group, params=u.params, method="structured", contraction=u.contraction,
                                calls=sum(1 for _ in u.modules), lam={p: (u.lam_w if p == u.weight else u.lam_b) for p in u.params},
                                flops=flops, reason=why_m + u.reason))
    for g in gunits:
        fl = {"jacobian": 2.0 * n1 * n2 * kk * g.numel}
        layers.append(LayerPlan(group=g.group, params=g.names, method="generic", contraction="jacobian", calls=0,
                                lam={p: g.lam for p in g.names}, flops=fl,
                                reason=f"per-example Jacobians (vmap(jacrev)): {g.reason}"))
    layers.sort(key=lambda lp: order[lp.params[0]])
    plan = NTKPlan(layers=tuple(layers), memory=mem, method=method, backend=backend, output=output,
                   dtype=cdtype, k=k, n1=n1, n2=n2)
    struct_modules = list(modules)
    return _Setup(model=model, x1=x1, x2=x2, n1=n1, n2=n2, k=k, output=output, trace=trace, per_layer=per_layer,
                  backend=backend, accumulate_fp64=accumulate_fp64, dtype=cdtype, params=params, buffers=buffers,
                  units=units, gunits=gunits, modules=modules, struct_modules=struct_modules, groups=groups,
                  plan=plan, progress=progress, generic_names=[n for g in gunits for n in g.names],
                  call_shapes=call_shapes)


def _block_features(s: _Setup, xb: ModelInput) -> Dict[Tuple[str, int], Any]:
    feats: Dict[Tuple[str, int], Any] = {}
    n = batch_size(xb)
    if s.units:
        # the calls' shapes are known per example from the planning pass: no extra forward
        seen: Dict[str, int] = {}
        calls = []
        for ci, (mn, ish, osh) in enumerate(s.call_shapes):
            calls.append(CallInfo(mn, ci, seen.get(mn, 0), (n,) + ish, (n,) + osh, True))
            seen[mn] = seen.get(mn, 0) + 1
        try:
            _, inputs, cots = layer_inputs_and_cotangents(s.model, s.params, xb, s.struct_modules,
                                                          buffers=s.buffers, calls=calls)
        except RuntimeError as exc:
            if "traced" not in str(exc):
                raise
            raise RuntimeError(
                f"the model's Linear/Conv call pattern on a block of {n} examples differs from the "
                f"planning pass on the first examples (input-dependent control flow?): {exc} "
                f"Use method='generic' for such models."
            ) from exc
        cache: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        for ui, u in enumerate(s.units):
            per_call = []
            for ci, c in enumerate(calls):
                if c.module in u.modules:
                    if ci not in cache:
                        cache[ci] = call_features(s.modules[c.module], inputs[ci], cots[ci])
                    per_call.append(cache[ci])
            P = sum(x.shape[-1] for x, _ in per_call)
            if P != u.positions:
                raise RuntimeError(
                    f"layer {u.group!r} has {P} positions per example in this block but {u.positions} "
                    f"on the probe examples: the call pattern depends on the inputs; use method='generic'."
                )
            feats[("s", ui)] = unit_features(u, per_call, trace=s.trace)
        del cache, inputs, cots
    if s.gunits:
        J = per_sample_jacobians(s.model, s.tensors, xb, s.generic_names)
        off = 0
        for gi, g in enumerate(s.gunits):
            Jg = J if len(s.gunits) == 1 else J[:, :, off : off + g.numel].contiguous()
            off += g.numel
            feats[("g", gi)] = Jg.reshape(n, 1, -1) if s.trace else Jg
    return feats


_NO_KERNEL_WARNED: Dict[str, bool] = {}


def _accumulate(s: _Setup, out: torch.Tensor, terms: List[Tuple[Any, Any, Any]], symmetric: bool) -> None:
    if not terms:
        return
    A, B, C = (list(t) for t in zip(*terms))
    if s.backend == "torch":
        _ops.gram_hadamard_accumulate_reference_(out, A, B, C, s.accumulate_fp64)
        return
    if not _ops.has_device_kernel(out.device):
        if not _NO_KERNEL_WARNED.get(out.device.type):
            _NO_KERNEL_WARNED[out.device.type] = True
            warnings.warn(
                f"torch_crit._C has no kernel for {out.device.type} tensors; using the pure-PyTorch "
                f"contraction (backend='torch') instead. Rebuild the extension with "
                f"TORCH_CRIT_CUDA=1 for the fused kernel.",
                RuntimeWarning,
                stacklevel=4,
            )
        _ops.gram_hadamard_accumulate_reference_(out, A, B, C, s.accumulate_fp64)
        return
    _ops.gram_hadamard_accumulate_(out, A, B, C, s.accumulate_fp64, symmetric=symmetric)


def _tile_terms(s: _Setup, fI: Dict, fJ: Dict) -> Dict[str, List[Tuple[Any, Any, Any]]]:
    by_group: Dict[str, List[Tuple[Any, Any, Any]]] = {}
    for ui, u in enumerate(s.units):
        by_group.setdefault(u.group, []).extend(unit_terms(u, fI[("s", ui)], fJ[("s", ui)]))
    for gi, g in enumerate(s.gunits):
        by_group.setdefault(g.group, []).extend(generic_terms(g, fI[("g", gi)], fJ[("g", gi)]))
    return by_group



def _compute(s: _Setup) -> NTKResult:
    mem = s.plan.memory
    b = mem.block_size
    K = 1 if s.trace else s.k
    dev = next(iter(s.params.values())).device
    keys = s.groups if s.per_layer else ["__total__"]
    log = (lambda msg: print(f"[empirical_ntk] {msg}", file=sys.stderr, flush=True)) if s.progress else (lambda msg: None)
    log(str(s.plan))

    if s.output.startswith("diagonal"):
        res = {key: torch.zeros((s.n1, K, K), dtype=s.dtype, device=dev) for key in keys}
        nb = math.ceil(s.n1 / b)
        for bi in range(nb):
            t0 = time.perf_counter()
            lo, hi = bi * b, min(s.n1, (bi + 1) * b)
            f = _block_features(s, slice_batch(s.x1, lo, hi))
            for ui, u in enumerate(s.units):
                res[u.group if s.per_layer else "__total__"][lo:hi] += unit_diagonal(u, f[("s", ui)])
            for gi, g in enumerate(s.gunits):
                res[g.group if s.per_layer else "__total__"][lo:hi] += generic_diagonal(g, f[("g", gi)])
            log(f"block {bi + 1}/{nb} (examples {lo}:{hi}) {time.perf_counter() - t0:.3f} s")
        shaped = {key: (r[:, 0, 0] if s.trace else r) for key, r in res.items()}
        return shaped if s.per_layer else shaped["__total__"]

    symmetric = s.x2 is None
    xr, xc = s.x1, (s.x1 if symmetric else s.x2)
    res = {key: torch.zeros((s.n1, s.n2, K, K), dtype=s.dtype, device=dev) for key in keys}
    rows = [(i * b, min(s.n1, (i + 1) * b)) for i in range(math.ceil(s.n1 / b))]
    cols = rows if symmetric else [(j * b, min(s.n2, (j + 1) * b)) for j in range(math.ceil(s.n2 / b))]
    cache_r: Dict[int, Dict] = {}
    cache_c: Dict[int, Dict] = {}
    tiles = [(i, j) for i in range(len(rows)) for j in range(len(cols)) if not symmetric or j >= i]
    for t, (i, j) in enumerate(tiles):
        t0 = time.perf_counter()
        (r0, r1), (c0, c1) = rows[i], cols[j]
        if i not in cache_r:
            if not mem.cache_features:
                cache_r.clear()  # keep only the current row block
            cache_r[i] = _block_features(s, slice_batch(xr, r0, r1))
        fI = cache_r[i]
        if symmetric and j == i:
            fJ = fI
        elif mem.cache_features:
            store = cache_r if symmetric else cache_c
            if j not in store:
                store[j] = _block_features(s, slice_batch(xc, c0, c1))
            fJ = store[j]
        else:
            fJ = _block_features(s, slice_batch(xc, c0, c1))
        by_group = _tile_terms(s, fI, fJ)
        diag_tile = symmetric and i == j
        for key in keys:
            terms = by_group.get(key, []) if s.per_layer else [t_ for ts in by_group.values() for t_ in ts]
            tile = torch.zeros((r1 - r0, c1 - c0, K, K), dtype=s.dtype, device=dev)
            _accumulate(s, tile, terms, diag_tile)
            res[key][r0:r1, c0:c1] = tile
            if symmetric and j != i:
                res[key][c0:c1, r0:r1] = tile.permute(1, 0, 3, 2)
        del by_group
        log(f"tile {t + 1}/{len(tiles)} (rows {r0}:{r1}, cols {c0}:{c1}) {time.perf_counter() - t0:.3f} s")
    shaped = {key: (r[:, :, 0, 0] if s.trace else r) for key, r in res.items()}
    return shaped if s.per_layer else shaped["__total__"]


def plan_ntk(
    model: nn.Module,
    x1: ModelInput,
    x2: Optional[ModelInput] = None,
    *,
    output: Output = "full",
    per_layer: bool = False,
    learning_rates: LearningRates = None,
    method: str = "auto",
    block_size: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
    backend: str = "ext",
    accumulate_fp64: bool = False,
    progress: bool = False,
) -> NTKPlan:
    """The :class:`~torch_crit.ntk.plan.NTKPlan` :func:`empirical_ntk` would follow (cheap).

    Same arguments as :func:`empirical_ntk`; runs the model on at most two examples.
    """
    model = unwrap_model(model, "plan_ntk")
    with _eval_mode(model):
        return _prepare(model, x1, x2, output=output, per_layer=per_layer, learning_rates=learning_rates,
                        method=method, block_size=block_size, dtype=dtype, backend=backend,
                        accumulate_fp64=accumulate_fp64, progress=progress).plan


def empirical_ntk(
    model: nn.Module,
    x1: ModelInput,
    x2: Optional[ModelInput] = None,
    *,
    output: Output = "full",
    per_layer: bool = False,
    learning_rates: LearningRates = None,
    method: Literal["auto", "structured", "generic"] = "auto",
    block_size: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
    progress: bool = False,
    return_plan: bool = False,
    backend: Literal["ext", "torch"] = "ext",
    accumulate_fp64: bool = False,
) -> Union[NTKResult, Tuple[NTKResult, NTKPlan]]:
    r"""The empirical NTK :math:`H_{ij;ab}` (8.5) of ``model`` between ``x1`` and ``x2``.

    .. math::
        H_{ij;ab} = \sum_{p} \lambda_p\, \frac{\partial f_{i;a}}{\partial p}\cdot
        \frac{\partial f_{j;b}}{\partial p}
        = \sum_\ell H^{(\ell)}_{ij;ab},

    with :math:`f_{i;a}` the flattened model output ``a`` of example ``i``, the sum over the
    trainable parameter tensors :math:`p` (tied parameters once), and :math:`\lambda_p` the
    learning-rate tensor (8.6) (λ = 1: the Jacobian Gram :math:`J J^\top`).

    Args:
        model: any differentiable ``nn.Module``. It is evaluated in **eval mode** (dropout
            off, BatchNorm with running statistics — examples must be independent) and its
            modes are restored afterwards; parameters and buffers are never modified
            (BatchNorm running statistics stay as they were).
        x1: inputs: tensor ``[N1, ...]``, or a tuple (positional) / dict (keyword) of tensors
            with batch dimension 0. Floating inputs must have the model's dtype (or pass
            ``dtype``).
        x2: second inputs of the same structure and per-example shapes ``[N2, ...]``;
            ``None`` gives Θ(x1, x1), computed once per symmetric pair of tiles.
        output:
            * ``"full"`` — ``[N1, N2, k, k]`` (``k`` = outputs per example, flattened);
            * ``"trace"`` — ``[N1, N2]``, :math:`\sum_a H_{ij;aa}`;
            * ``"diagonal"`` — ``[N1, k, k]``, the per-example blocks :math:`H_{ii;ab}`
              (``x2`` must be ``None``; costs O(N1));
            * ``"diagonal_trace"`` — ``[N1]``, :math:`\sum_a H_{ii;aa}`.
        per_layer: return ``{group: contribution}`` instead of the total; groups are module
            paths (parameter name for top-level parameters) in forward order; their sum is
            the total.
        learning_rates: λ (8.6): ``None`` (1), a number, ``{param name: λ}`` or a list of
            param groups with ``"params"`` and ``"lr"`` (e.g. :func:`torch_crit.param_groups`);
            see :func:`~torch_crit.ntk.learning_rates.resolve_learning_rates`. Frozen
            parameters (``requires_grad=False``) never contribute.
        method: ``"auto"`` (cost model), ``"structured"`` (layer rules for Linear/Conv, the
            rest generic), ``"generic"`` (per-example Jacobians for everything).
        block_size: examples per tile side; ``None`` picks the largest that fits in memory.
        dtype: compute on a copy of the parameters/inputs cast to this dtype (the model is
            not changed); default: the parameters' dtype (float32: fast; float64: exact).
        progress: print the plan and per-tile timings to stderr.
        return_plan: also return the :class:`~torch_crit.ntk.plan.NTKPlan`.
        backend: ``"ext"`` (the compiled C++/CUDA primitive, default) or ``"torch"`` (the
            pure-PyTorch contraction of the same terms).
        accumulate_fp64: accumulate float32 inner products in float64.

    Returns:
        The kernel (shape per ``output``) or the per-layer dict; with ``return_plan=True`` a
        tuple ``(result, plan)``.

    Raises:
        InvalidArgumentError: ``model`` is not an ``nn.Module``; an empty batch, NaN/Inf inputs
            or a non-integer ``block_size`` (the message names the argument). A ``torch.compile``d
            model is probed through its original module ``_orig_mod``.
        ValueError: bad options or inputs (mismatched shapes/dtypes/devices, no trainable
            parameters).
        NonDifferentiableError: the outputs do not depend differentiably on the parameters
            (e.g. ``argmax``/``round`` in the forward pass); the message names the ops.
        NTKMemoryError: the result or one tile cannot fit; the message gives the estimate
            and the fix (``block_size``, ``output="trace"``/``"diagonal"``).
    """
    model = unwrap_model(model, "empirical_ntk")
    with _eval_mode(model):
        s = _prepare(model, x1, x2, output=output, per_layer=per_layer, learning_rates=learning_rates,
                     method=method, block_size=block_size, dtype=dtype, backend=backend,
                     accumulate_fp64=accumulate_fp64, progress=progress)
        with torch.no_grad():
            result = _compute(s)
    return (result, s.plan) if return_plan else result
