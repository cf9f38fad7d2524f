r"""Critical initialization of any PyTorch model, in place: :func:`init_`.

Each affine layer is drawn as in the book's (2.19)–(2.22)::

    W_ij ~ N(0, C_W / fan_in),      b_i ~ N(0, C_b)

with :math:`(C_b, C_W)` at criticality, :math:`\chi_\parallel(K^\star) = \chi_\perp(K^\star) = 1`
(5.55), for the activation that governs the layer (see
:func:`torch_crit.architecture.criticality_activation`): the weights of layer :math:`\ell+1`
multiply :math:`\sigma(z^{(\ell)})` (2.5), so a layer takes the critical point of the activation
*feeding* it. The first layer sees the raw input; the book gives it the same :math:`(C_b, C_W)`
as every other layer ((5.1), THEORY.md §1.2 and §11), so it takes the critical point of the
activation that *follows* it. The readout (no activation after it, (2.6)) takes the critical
point of the last hidden activation, like every other layer. With one activation throughout,
every layer gets the same :math:`(C_b, C_W)`, exactly the book's convention, and the kernel
follows :func:`torch_crit.theory.kernel_recursion` with those constants.

Residual blocks :math:`z^{(\ell+1)} = \xi R(z^{(\ell)}) + \gamma z^{(\ell)}` (Appendix B, (B.3),
(B.39)) are found by :func:`torch_crit.architecture.analyse`. Layers inside the branch are made
critical on their own (§B.4: "first make the block itself critical"); the branch's *output*
layer gets the residual critical point :math:`C_W(\gamma) = (1-\gamma^2) C_W^\star` (B.20)/(B.21),
divided by :math:`\xi^2`, so that :math:`(1-\gamma^2) G_{zz} = \xi^2 G_{RR}` (B.45) holds. For a
plain skip, :math:`\gamma = 1`, criticality is unsatisfiable (B.21): the kernel can only grow.
``init_`` then scales the branch output by :math:`1/B` (:math:`B` = number of such blocks):
each block adds :math:`G/B`, so the kernel grows by at most :math:`(1+1/B)^B < e` over the
whole network. This is the book's large-depth optimum read backwards: :math:`1-\gamma^{\star 2}
\sim 1/r` and :math:`C_W(\gamma^\star) \sim 1/r` (footnote 7 of Appendix B) — the branch
variance goes like one over the depth. The report says so.

Other parameters (documented choices):

* **Embedding**: rows :math:`\sim N(0, C_W)` — the first-layer rule for a one-hot input
  normalised to :math:`\frac{1}{n_0}\sum_j x_j^2 = 1` (the input kernel of (4.8) equals
  :math:`C_W`); ``padding_idx`` rows are zero. With no activation after it, :math:`C_W = 1`,
  PyTorch's own ``N(0, 1)``.
* **LayerNorm / BatchNorm / GroupNorm / RMSNorm**: weight 1, bias 0, BatchNorm running
  statistics reset.
* **nn.MultiheadAttention**: projections are Linear layers with fan-in ``embed_dim``
  (``kdim``/``vdim`` for separate key/value projections) and no activation: identity
  criticality, :math:`(C_b, C_W) = (0, 1)`; all attention biases 0.
* **Tied parameters** are drawn once, by the first layer that uses them, and reported.
* **Frozen parameters** (``requires_grad=False``) are initialised like the rest, as
  ``torch.nn.init`` does; the report lists them.
* **Meta-device** parameters raise (there is no storage to write): materialise with
  ``model.to_empty(device=...)`` first. Lazy (uninitialised) parameters raise too.
* Parameters the analysis could not place (recurrent layers, custom uses) are left untouched,
  listed in the report and announced by an :class:`UntouchedParameterWarning`.

Example:
    >>> import torch, torch.nn as nn
    >>> import torch_crit
    >>> net = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 1))
    >>> report = torch_crit.init_(net, generator=torch.Generator().manual_seed(0))
    >>> [round(l.C_W, 6) for l in report.layers]
    [1.0, 1.0]
"""
from __future__ import annotations

from .errors import UntouchedParameterWarning  # noqa: F401  (re-exported)
from .errors import NoCriticalPointWarning
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn as nn

from torch_crit.architecture import (
    AFFINE_KINDS,
    LayerInfo,
    ModelPlan,
    UnplacedParameter,
    analyse,
    criticality_activation,
    unwrap_model,
)

__all__ = ["InitReport", "LayerInit", "UntouchedParameterWarning", "critical_constants", "init_"]


@dataclass(frozen=True)
class LayerInit:
    r"""What :func:`init_` did to one layer.

    Attributes:
        name: module path of the layer.
        kind: layer kind (see :class:`torch_crit.architecture.LayerInfo`).
        fan_in: :math:`n_{\ell-1}`; weights have variance ``C_W / fan_in``.
        depth: :math:`\ell` (``None`` for norm layers).
        activation: key of the activation whose critical point was used (``None`` for norms).
        activation_after: key of the activation applied to the layer's output (``None``: none).
        C_b: bias variance used (``None`` for norm layers: bias 0).
        C_W: rescaled weight variance used (``None`` for norm layers: weight 1).
        universality_class: name of the critical point's class (``'SCALE_INVARIANT'``,
            ``'K_STAR_ZERO'``, ``'HALF_STABLE'``, ``'NONE'``), or ``None``.
        gamma: skip scale γ of the residual block the layer belongs to (``None`` outside).
        xi: branch scale ξ of that block.
        residual: what the residual rule did (``''`` outside residual blocks).
        params: qualified names of the parameters written.
        tied: parameters of this layer initialised by an earlier layer (shared).
        frozen: parameters written although ``requires_grad=False``.
        notes: everything else worth knowing (nearest setting used, overrides …).
    """

    name: str
    kind: str
    fan_in: int
    depth: int | None
    activation: str | None
    activation_after: str | None
    C_b: float | None
    C_W: float | None
    universality_class: str | None
    gamma: float | None
    xi: float | None
    residual: str
    params: tuple[str, ...]
    tied: tuple[str, ...] = ()
    frozen: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class InitReport:
    """The result of :func:`init_`: one :class:`LayerInit` per layer, plus what was left alone.

    Attributes:
        layers: per-layer record, forward order.
        untouched: parameters left unchanged, with reasons.
        plan: the :class:`~torch_crit.architecture.ModelPlan` used (reusable by
            :func:`torch_crit.param_groups`).
        notes: model-level remarks (γ = 1 residual blocks, fallbacks …).
    """

    layers: tuple[LayerInit, ...]
    untouched: tuple[UnplacedParameter, ...]
    plan: ModelPlan = field(repr=False)
    notes: tuple[str, ...] = ()

    def layer(self, name: str) -> LayerInit:
        """The record of layer ``name``.

        Raises:
            KeyError: unknown name (the message lists the layer names).
        """
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(f"no layer {name!r} in the report; layers are {[l.name for l in self.layers]}")

    def __str__(self) -> str:
        rows = [("layer", "kind", "fan_in", "σ (C from)", "σ after", "C_b", "C_W", "class", "residual", "params")]
        for l in self.layers:
            tags = []
            if l.tied:
                tags.append(f"{len(l.tied)} tied")
            if l.frozen:
                tags.append(f"{len(l.frozen)} frozen")
            rows.append((l.name or "<root>", l.kind, str(l.fan_in), l.activation or "-", l.activation_after or "-",
                         "1/0 (w/b)" if l.C_b is None and l.kind == "norm" else _f(l.C_b),
                         "" if l.C_W is None else _f(l.C_W), l.universality_class or "-", l.residual or "-",
                         f"{len(l.params)}" + (f" ({', '.join(tags)})" if tags else "")))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"InitReport: {len(self.layers)} layers, L={self.plan.depth}, analysis={self.plan.method}"]
        for i, r in enumerate(rows):
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
            if i == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        for l in self.layers:
            lines.extend(f"  {l.name}: {n}" for n in l.notes)
        for u in self.untouched:
            lines.append(f"  untouched {u.name}: {u.reason}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.6g}"


def _key(act: Any) -> str | None:
    return None if act is None else str(getattr(act, "key", getattr(act, "name", act)))


def critical_constants(activation: Any, *, strict: bool = True) -> tuple[Any, str | None]:
    r"""The critical point of ``activation`` (5.55)–(5.73), or its nearest setting.

    Args:
        activation: a theory ``Activation`` (or anything ``get_activation`` accepts).
        strict: if False, an activation without a critical point (sigmoid, softplus, (5.78))
            returns ``NoCriticalPointError.nearest`` instead of raising.

    Returns:
        ``(critical_point, note)``: a ``CriticalPoint`` (fields ``C_b``, ``C_W``, ``K_star``,
        ``universality_class``) and a note (``None`` unless the nearest setting was used).

    Raises:
        NoCriticalPointError: ``strict`` and no critical point exists.
    """
    from torch_crit.theory import NoCriticalPointError, critical_point

    try:
        return critical_point(activation), None
    except NoCriticalPointError as exc:
        if strict:
            raise
        return exc.nearest, (f"{_key(activation)} has no critical point; using the nearest setting "
                             f"(C_b={exc.nearest.C_b:.6g}, C_W={exc.nearest.C_W:.6g}). {exc.suggestion}")


def _class_name(cp: Any) -> str | None:
    uc = getattr(cp, "universality_class", None)
    return None if uc is None else str(getattr(uc, "name", uc))


@dataclass
class _Plan1:
    layer: LayerInfo
    act: Any
    C_b: float | None
    C_W: float | None
    out_C_b: float | None  # for the branch-output parameters (attention: out_proj)
    out_C_W: float | None
    cls: str | None
    residual: str
    notes: list[str]


def _residual_rule(layer: LayerInfo, act: Any, C_b: float, C_W: float, n_unsat: int, strict: bool,
                   overridden: bool) -> tuple[float, float, str, list[str]]:
    res = layer.residual
    notes: list[str] = []
    if res is None or res.role != "branch" or not res.is_branch_output:
        if res is not None and res.role == "branch":
            return C_b, C_W, "branch (internal: critical on its own, §B.4)", notes
        if res is not None and res.role == "shortcut":
            return C_b, C_W, "shortcut projection (critical, plays the identity)", notes
        return C_b, C_W, "", notes
    gamma, xi = res.gamma, res.xi if res.xi not in (None, 0.0) else 1.0
    if gamma is None:
        notes.append("skip scale γ is not a constant: plain critical initialization of the branch output")
        return C_b, C_W, "branch output, γ unknown", notes
    if gamma < 1.0 - 1e-12:
        if overridden:
            f = (1.0 - gamma ** 2) / xi ** 2
            return C_b * f, C_W * f, f"branch output: C_W(γ) = (1-γ²)·C_W/ξ² (B.20), γ={gamma:.4g}", notes
        from torch_crit.theory import NoCriticalPointError, residual_critical_point

        try:
            rcp = residual_critical_point(act, gamma)
        except NoCriticalPointError as exc:
            if strict:
                raise
            rcp = exc.nearest
            notes.append(f"no residual critical point for {_key(act)} at γ={gamma:.4g}; nearest setting used")
        return (float(rcp.C_b) / xi ** 2, float(rcp.C_W) / xi ** 2,
                f"branch output: C_W(γ) (B.20)/(B.21), γ={gamma:.4g}" + (f", ξ={xi:.4g}" if xi != 1.0 else ""), notes)
    if gamma > 1.0 + 1e-12 and strict:
        raise ValueError(
            f"residual block of layer {layer.name!r} has skip scale γ={gamma:.6g} > 1: the skip alone makes "
            "χ = γ² + … > 1 (B.15)–(B.16), so the kernel explodes whatever the weights are. Fix: use |γ| ≤ 1 in the "
            "model's forward, or pass strict=False to apply the γ = 1 rule (branch variance / number of blocks).")
    f = 1.0 / (max(n_unsat, 1) * xi ** 2)
    notes.append(f"γ={gamma:.4g}: criticality is unsatisfiable (B.21); branch output variance scaled by 1/B, "
                 f"B={n_unsat} blocks, so the kernel grows at most by (1+1/B)^B < e (App. B footnote 7: C_W ~ 1/r)")
    return C_b * f, C_W * f, f"branch output, γ={gamma:.4g}: ×1/B (B={n_unsat})", notes


def _decide(plan: ModelPlan, C_b: float | None, C_W: float | None, strict: bool) -> list[_Plan1]:
    n_unsat = sum(1 for b in plan.residual_blocks if b.gamma is not None and b.gamma >= 1.0 - 1e-12
                  and b.output_layers)
    out: list[_Plan1] = []
    cache: dict[Any, tuple[Any, str | None]] = {}
    warned: set[Any] = set()
    for layer in plan.layers:
        if layer.kind == "norm":
            out.append(_Plan1(layer, None, None, None, None, None, None, "", ["weight=1, bias=0"]))
            continue
        if layer.kind not in AFFINE_KINDS:  # pragma: no cover - plan has no other kinds today
            continue
        act = criticality_activation(layer, plan)
        notes: list[str] = []
        overridden = layer.kind != "attention" and (C_b is not None or C_W is not None)
        need_cp = not (overridden and C_b is not None and C_W is not None)
        cp, note = None, None
        try:
            if act not in cache:
                cache[act] = critical_constants(act, strict=strict and need_cp)
            cp, note = cache[act]
        except Exception as exc:  # NoCriticalPointError with strict: say which layer
            if hasattr(exc, "add_note"):
                exc.add_note(f"(layer {layer.name!r} is governed by {_key(act)}; pass strict=False to use the "
                             "nearest setting, C_b=/C_W= to choose them, or mapping= to change the activation)")
            raise
        if note:
            notes.append(note)
            if act not in warned:
                warned.add(act)
                warnings.warn(f"layer {layer.name!r}: {note} Measured: {getattr(cp, 'notes', '')}",
                              NoCriticalPointWarning, stacklevel=3)
        cb = float(cp.C_b) if cp is not None else None
        cw = float(cp.C_W) if cp is not None else None
        if overridden:
            if C_b is not None:
                cb = float(C_b)
            if C_W is not None:
                cw = float(C_W)
            notes.append("C_b/C_W given by the caller")
        if layer.kind == "attention":
            notes.append("attention projections: Linear with fan-in embed_dim, identity criticality, biases 0")
        ms = layer.input_second_moment
        if layer.fed_by is not None and ms is not None and ms > 0 and cw is not None and not overridden:
            # [choice] the input comes from a module init_ leaves alone (an RNN's tanh-bounded state):
            # its measured second moment replaces the book's normalised input, so C_b + C_W·E[x²] stays critical
            cw = cw / ms
            notes.append(f"fed by {layer.fed_by!r} (not initialised by torch_crit): input E[x²] = {ms:.4g} measured on "
                         f"the recorded forward pass, so C_W is divided by it (C_W = {cw:.6g})")
        ocb, ocw, rdesc, rnotes = _residual_rule(layer, act, cb, cw, n_unsat, strict, overridden)
        notes.extend(rnotes)
        if layer.kind == "attention" and (ocb, ocw) != (cb, cw):
            notes.append(f"out_proj drawn with C_b={ocb:.6g}, C_W={ocw:.6g} (residual rule); in_proj with C_W={cw:.6g}")
        if layer.kind == "attention":
            out.append(_Plan1(layer, act, cb, cw, ocb, ocw, _class_name(cp), rdesc, notes))
        else:
            out.append(_Plan1(layer, act, ocb, ocw, ocb, ocw, _class_name(cp), rdesc, notes))
    return out


def _tied_readout_rule(decisions: list[_Plan1], root: nn.Module) -> dict[int, tuple[float, str]]:
    r"""Standard deviations for weights an embedding shares with a Linear readout (tied ``lm_head``).

    [choice, not in the book] The shared matrix is drawn with the *readout's* variance
    :math:`C_W/n` (fan-in :math:`n` = embedding width), not the embedding's :math:`N(0, C_W)`:
    the logits :math:`z_v = \sum_j W_{vj} h_j` of a normalised :math:`h` then have variance
    :math:`C_W` (O(1)) instead of :math:`n\,C_W`. The token embeddings come out with per-unit
    variance :math:`C_W/n`; a pre-LN stack normalises them before the first block
    (``docs/transformers.md`` measures both).
    """
    out: dict[int, tuple[float, str]] = {}
    kinds = {d.layer.name: d.layer.kind for d in decisions}
    for d in decisions:
        layer = d.layer
        if layer.kind != "linear" or not layer.tied or d.C_W is None:
            continue
        for role, pname in layer.params:
            if pname not in layer.tied or role != "weight":
                continue
            p = root.get_parameter(pname)
            owner = next((o.layer.name for o in decisions for r, n in o.layer.params
                          if n != pname and root.get_parameter(n) is p), None)
            if owner is None or kinds.get(owner) != "embedding":
                continue
            std = math.sqrt(d.C_W / layer.fan_in)
            out[id(p)] = (std, f"weight tied with readout {layer.name!r}: drawn with the readout's variance "
                               f"C_W/fan_in = {d.C_W:.4g}/{layer.fan_in} so the logits are O(1) (docs/transformers.md)")
    return out


def _normal_(p: torch.Tensor, std: float, generator: torch.Generator | None) -> None:
    if p.numel() == 0:
        return
    if std == 0.0:
        p.zero_()
        return
    if generator is None or generator.device == p.device:
        p.normal_(0.0, std, generator=generator)
    else:
        tmp = torch.empty(p.shape, dtype=p.dtype, device=generator.device)
        tmp.normal_(0.0, std, generator=generator)
        p.copy_(tmp)


def _param_spec(d: _Plan1, role: str, p: torch.Tensor, root: nn.Module) -> tuple[str, float]:
    """('normal', std) or ('const', value) for one parameter of an affine layer."""
    layer = d.layer
    if layer.kind == "attention":
        is_out = role.startswith("out_proj.")
        cb, cw = (d.out_C_b, d.out_C_W) if is_out else (d.C_b, d.C_W)
        if role.endswith("weight"):
            fan_in = int(p.shape[1]) if p.dim() == 2 else layer.fan_in
            return "normal", math.sqrt(cw / fan_in)
        return "const", 0.0  # in_proj_bias, out_proj.bias, bias_k, bias_v
    if role == "weight":
        if layer.kind == "embedding":
            return "normal", math.sqrt(d.C_W)
        return "normal", math.sqrt(d.C_W / layer.fan_in)
    if role == "bias":
        return "normal", math.sqrt(max(d.C_b, 0.0))
    raise ValueError(
        f"layer {layer.name!r} ({layer.module_type}) has a parameter with role {role!r} that init_ does not know "
        "how to draw; remove it from the layer or initialise that layer yourself and exclude it with mapping.")


def init_(model: nn.Module, activation: Any | None = None, *, C_b: float | None = None, C_W: float | None = None,
          generator: torch.Generator | None = None, strict: bool = True, mapping: Mapping[str, Any] | None = None,
          example_inputs: Any | None = None) -> InitReport:
    r"""Initialise ``model`` at criticality, in place (like ``torch.nn.init``), and report what was done.

    .. math::
        W^{(\ell)}_{ij} \sim \mathcal N\!\left(0, \frac{C_W}{n_{\ell-1}}\right),\qquad
        b^{(\ell)}_i \sim \mathcal N(0, C_b)   \quad (2.19)\text{–}(2.22)

    with :math:`(C_b, C_W)` the critical point (5.55)/(5.67)/(5.90)/(5.101)/(5.105) of the
    activation that governs each layer, residual branches at :math:`C_W(\gamma)` (B.20)/(B.21).
    See the module docstring for the conventions (first layer, readout, residual, embedding,
    norm, attention, tied, frozen and meta parameters).

    Args:
        model: the model (``torch.compile``'d and (Distributed)DataParallel models are
            unwrapped). Modified in place, under ``torch.no_grad()``.
        activation: the network's activation (name, module, callable or ``Activation``) where
            the analysis cannot see one (see :func:`torch_crit.architecture.analyse`).
        C_b: bias variance for every Linear/Conv/Embedding layer instead of the critical one
            (residual scaling still applies). ``None``: critical.
        C_W: rescaled weight variance, same convention.
        generator: the random generator for every draw (same seed → bitwise-equal weights);
            default: the global RNG of each parameter's device.
        strict: if False, an activation without a critical point uses
            ``NoCriticalPointError.nearest`` and the report says so; a skip scale γ > 1 uses the
            γ = 1 rule instead of raising.
        mapping: ``{module_name: activation}`` overrides (see ``analyse``).
        example_inputs: passed to ``analyse`` (used only if fx tracing fails).

    Returns:
        The :class:`InitReport` (``print(report)`` shows a table).

    Raises:
        ValueError: no supported layer; meta-device or lazy parameters; γ > 1 with ``strict``.
        NoCriticalPointError: an activation without a critical point and ``strict=True``
            (fix: ``strict=False``, or choose ``C_b``/``C_W``).
        AmbiguousActivationError, ActivationNotFoundError: from ``analyse``.

    Example:
        >>> import torch, torch.nn as nn, torch_crit
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> rep = torch_crit.init_(net)
        >>> rep.layer("2").C_W, rep.layer("2").C_b
        (2.0, 0.0)
    """
    root = unwrap_model(model)
    if C_W is not None and not (C_W > 0 and math.isfinite(C_W)):
        raise ValueError(f"C_W must be a finite positive number, got {C_W!r}; C_W = 0 is never critical "
                         "(footnote 10 of §5.1). Pass None for the critical value.")
    if C_b is not None and not (C_b >= 0 and math.isfinite(C_b)):
        raise ValueError(f"C_b must be a finite number >= 0 (a variance), got {C_b!r}. Pass None for the critical value.")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    meta = [n for n, p in root.named_parameters() if p.is_meta]
    if meta:
        raise ValueError(
            f"{len(meta)} parameters are on the meta device (e.g. {meta[0]!r}); there is no storage to initialise. "
            "Fix: model.to_empty(device='cpu' or 'cuda') first, then call init_.")
    plan = analyse(root, activation, mapping=mapping, example_inputs=example_inputs)
    if not plan.affine_layers:
        kinds = sorted({type(m).__name__ for m in root.modules() if any(True for _ in m.parameters(recurse=False))})
        raise ValueError(
            f"{type(root).__name__} has no Linear, Conv, Embedding or MultiheadAttention layer that torch_crit can "
            f"initialise (modules with parameters: {kinds or 'none'}). init_ needs at least one affine layer.")
    decisions = _decide(plan, C_b, C_W, strict)  # everything that can raise happens before writing
    shared_std = _tied_readout_rule(decisions, root)
    done: set[int] = set()
    records: list[LayerInit] = []
    with torch.no_grad():
        for d in decisions:
            layer = d.layer
            written, tied, frozen, notes_tied = [], [], [], []
            for role, pname in layer.params:
                p = root.get_parameter(pname)
                if pname in layer.tied or id(p) in done:
                    tied.append(pname)
                    continue
                done.add(id(p))
                if layer.kind == "norm":
                    if role.endswith("weight"):
                        p.fill_(1.0)
                    else:
                        p.zero_()
                else:
                    how, val = _param_spec(d, role, p, root)
                    if id(p) in shared_std:
                        how, val = "normal", shared_std[id(p)][0]
                        notes_tied.append(shared_std[id(p)][1])
                    if how == "normal":
                        _normal_(p, val, generator)
                    else:
                        p.fill_(val)
                written.append(pname)
                if not p.requires_grad:
                    frozen.append(pname)
            notes = list(d.notes) + notes_tied
            if layer.kind == "embedding" and written:
                m = root.get_submodule(layer.name)
                pad = getattr(m, "padding_idx", None)
                if pad is not None:
                    m.weight[pad].zero_()
                    notes.append(f"padding_idx {pad} row set to 0")
            if layer.kind == "norm":
                m = root.get_submodule(layer.name)
                if hasattr(m, "reset_running_stats") and getattr(m, "track_running_stats", False):
                    m.reset_running_stats()
                    notes.append("running statistics reset")
            if tied:
                notes.append(f"tied parameters initialised by their first user: {', '.join(tied)}")
            if frozen:
                notes.append("frozen parameters initialised too (as torch.nn.init does)")
            res = layer.residual
            records.append(LayerInit(
                name=layer.name, kind=layer.kind, fan_in=layer.fan_in, depth=layer.depth,
                activation=_key(d.act), activation_after=_key(layer.activation), C_b=d.C_b, C_W=d.C_W,
                universality_class=d.cls, gamma=None if res is None else res.gamma,
                xi=None if res is None else res.xi, residual=d.residual, params=tuple(written), tied=tuple(tied),
                frozen=tuple(frozen), notes=tuple(notes)))
    model_notes = list(plan.notes)
    n_unsat = sum(1 for b in plan.residual_blocks if b.gamma is not None and b.gamma >= 1.0 - 1e-12 and b.output_layers)
    if n_unsat:
        model_notes.append(
            f"{n_unsat} residual blocks with γ=1 (x + f(x)): criticality is unsatisfiable (B.21); their branch "
            "outputs were scaled by 1/B. For exact criticality use a skip scale γ<1 in forward "
            "(torch_crit.theory.optimal_residual_gamma suggests one).")
    untouched = tuple(u for u in plan.unplaced)
    if untouched:
        warnings.warn(
            f"init_ left {len(untouched)} parameters unchanged because no supported layer uses them: "
            + "; ".join(f"{u.name} ({u.reason})" for u in untouched[:5]) + (" …" if len(untouched) > 5 else "")
            + ". They are listed in InitReport.untouched; initialise them yourself.",
            UntouchedParameterWarning, stacklevel=2)
    return InitReport(layers=tuple(records), untouched=untouched, plan=plan, notes=tuple(model_notes))
