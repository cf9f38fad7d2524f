r"""Structured (layer-wise) NTK contributions of Linear and Conv layers.

Every covered layer is reduced to position-indexed features: for each call of the layer an
*unfolded input* :math:`X_{i;g,c,p}` (``g`` groups, ``c`` = input channels per group × kernel
positions, ``p`` output positions: tokens for Linear, output pixels for Conv) and the output
cotangents :math:`G_{i;a,g,o,p}` from :mod:`torch_crit.ntk.capture`. Calls of one shared
weight are concatenated along ``p`` (so the cross terms between calls are exact). The
per-example weight Jacobian is :math:`\partial f_{i;a}/\partial W_{g,o,c} = \sum_p
G_{i;a,g,o,p}X_{i;g,c,p}` and the layer's block of (8.5) with scales λ (8.6) is

.. math::
    \Theta_{ij;ab} = \sum_{g,p,q} (G_{i;a,g,\cdot,p}\cdot G_{j;b,g,\cdot,q})
        (\lambda_W X_{i;g,\cdot,p}\cdot X_{j;g,\cdot,q} + \lambda_b).

Two contraction orders give the same number (Novak et al., "Fast Finite Width Neural Tangent
Kernel", ICML 2022, §4: the cost of each order depends on where the sum over positions goes):

* ``position_pair`` (``gram`` when there is one position, the classic
  :math:`(G G^\top)\odot(\lambda_W X X^\top + \lambda_b)` of dense layers): one term of the
  fused primitive per (group, p, q), cost ∝ :math:`N_1N_2 P^2 (c + K^2 o)`;
* ``per_sample``: per-example weight gradients :math:`J_i` (``[N, k, g·o·c]``), then
  :math:`\lambda_W J_i J_j^\top`, cost ∝ :math:`N k P g o c + N_1N_2K^2 g o c`
  (what the Jacobian contraction does for this layer).

:func:`choose_contraction` picks the cheaper by a cost model: GEMM FLOPs, scaled up when the
GEMM's inner dimension is short, plus the memory traffic of temporaries and of the scalar
Hadamard epilogue (calibrated on this project's 2-core CPU: with 10 outputs a 4×4-position conv
layer of 32 channels is 1.8× faster per-sample, one of 128 channels 4.6× faster by position pairs).
A third order — the position Gram contracted with one side's cotangents first — was measured
and dropped: its ``N₁N₂·P·k·o`` temporary makes it memory-bound, slower than the better of these
two on every conv layer tried. The terms go to
``torch_crit._ops.gram_hadamard_accumulate_`` (backend ``"ext"``, the C++/CUDA kernel) or to its
pure-PyTorch reference (backend ``"torch"``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


__all__ = [
    "COVERED_TYPES",
    "coverable",
    "unfold_conv_input",
    "Unit",
    "call_features",
    "unit_features",
    "unit_terms",
    "unit_diagonal",
    "choose_contraction",
    "contraction_model",
]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
COVERED_TYPES: Tuple[type, ...] = (nn.Linear,) + _CONV


def coverable(module: nn.Module) -> Tuple[bool, str]:
    """Whether the structured path can handle ``module`` exactly, and why not.

    Covered: ``nn.Linear`` and ``nn.Conv1d/2d/3d`` (any stride, padding, dilation, groups;
    ``padding_mode="zeros"``), and subclasses that do not override ``forward``, whose
    ``weight``/``bias`` are plain parameters (no parametrizations).
    """
    if not isinstance(module, COVERED_TYPES):
        return False, f"{type(module).__name__} has no structured rule"
    base = nn.Linear if isinstance(module, nn.Linear) else next(t for t in _CONV if isinstance(module, t))
    if type(module).forward is not base.forward:
        return False, f"{type(module).__name__} overrides forward()"
    if isinstance(module, _CONV):
        if module.padding_mode != "zeros":
            return False, f"padding_mode={module.padding_mode!r} (only 'zeros' is structured)"
        if type(module)._conv_forward is not base._conv_forward:
            return False, f"{type(module).__name__} overrides _conv_forward()"
    if not isinstance(module._parameters.get("weight"), nn.Parameter):
        return False, "weight is not a plain parameter (parametrized or missing)"
    return True, ""


def _conv_padding(module: nn.Module) -> List[Tuple[int, int]]:
    d = len(module.kernel_size)
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return [(0, 0)] * d
        pads = []
        for k, dil in zip(module.kernel_size, module.dilation):
            total = dil * (k - 1)
            pads.append((total // 2, total - total // 2))
        return pads
    return [(p, p) for p in module.padding]


def unfold_conv_input(module: nn.Module, inp: torch.Tensor) -> torch.Tensor:
    r"""im2col for Conv1d/2d/3d: the input patches each output position sees.

    Args:
        module: an ``nn.Conv{1,2,3}d`` (zero padding, any stride/dilation/groups, string
            padding ``"same"``/``"valid"`` included).
        inp: ``[N, C_in, *S]`` (an unbatched ``[C_in, *S]`` input is not supported).

    Returns:
        ``[N, g, (C_in/g)·∏K, P]`` with ``P = ∏ output spatial size``; the conv output of group
        ``g`` is ``W_g.reshape(o, -1) @ X[:, g]``.
    """
    d = len(module.kernel_size)
    if inp.dim() != d + 2:
        raise ValueError(
            f"structured Conv{d}d needs a batched input [N, C, *S] with {d} spatial dims; got "
            f"shape {tuple(inp.shape)}."
        )
    pads = _conv_padding(module)
    flat: List[int] = []
    for lo, hi in reversed(pads):
        flat += [lo, hi]
    x = F.pad(inp, flat) if any(flat) else inp
    for i, (k, s, dil) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        x = x.unfold(2 + i, dil * (k - 1) + 1, s)
    if any(dil > 1 for dil in module.dilation):
        idx = (Ellipsis,) + tuple(slice(None, None, dil) for dil in module.dilation)
        x = x[idx]
    n, c = x.shape[:2]
    out_sp = x.shape[2 : 2 + d]
    g = module.groups
    # [N, C, O..., K...] -> [N, g, C/g, K..., O...]
    perm = [0, 1] + list(range(2 + d, 2 + 2 * d)) + list(range(2, 2 + d))
    x = x.permute(perm)
    return x.reshape(n, g, (c // g) * math.prod(module.kernel_size), math.prod(out_sp))


@dataclass
class Unit:
    """One structured contribution: a weight (and/or bias) parameter with all its calls.

    Attributes:
        group: the ``per_layer`` key (module path of the owning module).
        weight: canonical parameter name of the weight, or ``None`` (bias only).
        bias: canonical parameter name of the bias fused with this weight, or ``None``.
        modules: module paths whose calls feed this unit.
        lam_w, lam_b: learning-rate scales λ (8.6) of weight and bias (0 when absent).
        groups, c, o: conv groups, unfolded input size per group, outputs per group.
        positions: total positions per example over all calls (P, tokens × calls for Linear).
        contraction: ``"position_pair"`` or ``"per_sample"`` (set by the planner).
        reason: why that contraction was chosen.
    """

    group: str
    weight: Optional[str]
    bias: Optional[str]
    modules: Tuple[str, ...]
    lam_w: float
    lam_b: float
    groups: int = 1
    c: int = 0
    o: int = 0
    positions: int = 0
    contraction: str = "position_pair"
    reason: str = ""
    flops: Dict[str, float] = field(default_factory=dict)

    @property
    def params(self) -> Tuple[str, ...]:
        return tuple(p for p in (self.weight, self.bias) if p is not None)


def call_features(module: nn.Module, inp: torch.Tensor, cot: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-call features ``X [N, g, c, P]`` and ``G [N, k, g, o, P]`` of a Linear/Conv call.

    Args:
        module: the called ``nn.Linear``/``nn.Conv*d``.
        inp: the call's input ``[N, *, d]`` (Linear) or ``[N, C_in, *S]`` (Conv).
        cot: the call's cotangent ``[N, k, *out]`` from :func:`layer_inputs_and_cotangents`.
    """
    n, k = cot.shape[:2]
    if isinstance(module, nn.Linear):
        d = inp.shape[-1]
        m = cot.shape[-1]
        x = inp.reshape(n, -1, d).transpose(1, 2).unsqueeze(1)  # [N, 1, d, T]
        g = cot.reshape(n, k, -1, m).transpose(2, 3).unsqueeze(2)  # [N, k, 1, m, T]
        return x, g
    x = unfold_conv_input(module, inp)
    groups = module.groups
    g = cot.reshape(n, k, groups, cot.shape[2] // groups, -1)
    return x, g


def unit_features(
    unit: Unit,
    per_call: Sequence[Tuple[torch.Tensor, torch.Tensor]],
    *,
    trace: bool,
) -> Dict[str, torch.Tensor]:
    """Block features of a unit from its calls' ``(X, G)`` (concatenated over positions).

    Returns a dict with, by contraction: ``position_pair``: ``X`` ``[g, P, N, c]`` and ``G``
    ``[g, P, N, K, o']`` (``K`` = k, or 1 with ``o' = k·o`` for the output trace);
    ``per_sample``: ``J`` ``[N, K, g·o·c]`` (weight) and ``Gb`` ``[N, K, g·o]`` (bias).
    """
    X = per_call[0][0] if len(per_call) == 1 else torch.cat([x for x, _ in per_call], dim=-1)
    G = per_call[0][1] if len(per_call) == 1 else torch.cat([g for _, g in per_call], dim=-1)
    n, k = G.shape[:2]
    feats: Dict[str, torch.Tensor] = {}
    if unit.contraction == "per_sample":
        if unit.weight is not None and unit.lam_w != 0.0:
            J = torch.einsum("nkgop,ngcp->nkgoc", G, X).reshape(n, k, -1)
            feats["J"] = J.reshape(n, 1, -1) if trace else J
        if unit.bias is not None and unit.lam_b != 0.0:
            Gb = G.sum(-1).reshape(n, k, -1)
            feats["Gb"] = Gb.reshape(n, 1, -1) if trace else Gb
        return feats
    # position_pair: layouts whose [g, p] slices are contiguous primitive operands.
    Gp = G.permute(2, 4, 0, 1, 3)  # [g, P, N, k, o]
    if trace:
        Gp = Gp.reshape(Gp.shape[0], Gp.shape[1], n, 1, k * Gp.shape[-1])
    feats["G"] = Gp.contiguous()
    if unit.weight is not None and unit.lam_w != 0.0:
        feats["X"] = X.permute(1, 3, 0, 2).contiguous()  # [g, P, N, c]
    return feats


Term = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


def unit_terms(unit: Unit, fI: Dict[str, torch.Tensor], fJ: Dict[str, torch.Tensor]) -> List[Term]:
    r"""Terms ``(A [N1, K, M], B [N2, K, M], C [N1, N2] | None)`` of the fused primitive.

    Their accumulation :math:`\sum_t (A_t B_t^\top) \odot C_t` is the unit's NTK tile.
    """
    terms: List[Term] = []
    if unit.contraction == "per_sample":
        n1 = fI["J"].shape[0] if "J" in fI else fI["Gb"].shape[0]
        n2 = fJ["J"].shape[0] if "J" in fJ else fJ["Gb"].shape[0]
        for key, lam in (("J", unit.lam_w), ("Gb", unit.lam_b)):
            if key in fI:
                A = fI[key]
                C = None if lam == 1.0 else torch.full((n1, n2), lam, dtype=A.dtype, device=A.device)
                terms.append((A, fJ[key], C))
        return terms
    GI, GJ = fI["G"], fJ["G"]
    g, P = GI.shape[:2]
    Q = GJ.shape[1]
    if "X" in fI:
        XI, XJ = fI["X"], fJ["X"]
        # C[g, p, q] = λ_W X_{i,g,p}·X_{j,g,q} + λ_b: [g, P, Q, N1, N2]
        XX = torch.einsum("gpic,gqjc->gpqij", XI, XJ)
        if unit.lam_w != 1.0:
            XX.mul_(unit.lam_w)
        if unit.lam_b != 0.0:
            XX.add_(unit.lam_b)
        for gi in range(g):
            for p in range(P):
                for q in range(Q):
                    terms.append((GI[gi, p], GJ[gi, q], XX[gi, p, q]))
        return terms
    # bias only: (Σ_p G_p)·(Σ_q G_q) λ_b
    A = GI.sum(1).permute(1, 2, 0, 3).reshape(GI.shape[2], GI.shape[3], -1)
    B = GJ.sum(1).permute(1, 2, 0, 3).reshape(GJ.shape[2], GJ.shape[3], -1)
    C = None if unit.lam_b == 1.0 else torch.full((A.shape[0], B.shape[0]), unit.lam_b, dtype=A.dtype, device=A.device)
    return [(A.contiguous(), B.contiguous(), C)]


def unit_diagonal(unit: Unit, f: Dict[str, torch.Tensor]) -> torch.Tensor:
    r"""The unit's per-example block :math:`\Theta_{ii;ab}`: ``[N, K, K]`` (plain PyTorch, O(N))."""
    if unit.contraction == "per_sample":
        out = None
        for key, lam in (("J", unit.lam_w), ("Gb", unit.lam_b)):
            if key in f:
                t = torch.einsum("nam,nbm->nab", f[key], f[key]) * lam
                out = t if out is None else out + t
        return out
    G = f["G"]  # [g, P, N, K, o]
    if "X" in f:
        X = f["X"]
        C = torch.einsum("gpnc,gqnc->ngpq", X, X) * unit.lam_w + unit.lam_b
        return torch.einsum("gpnao,gqnbo,ngpq->nab", G, G, C)
    S = G.sum(1)  # [g, N, K, o]
    return torch.einsum("gnao,gnbo->nab", S, S) * unit.lam_b


# Cost model constants (2-core CPU measurements; the ratios, not the absolute values, matter):
# a GEMM reaches its full rate only with an inner dimension of about _GEMM_FULL_INNER or more, and
# moving one element through memory (a temporary written and read back, a scalar epilogue) costs
# about _ELEMENT_COST FLOPs of a full-rate GEMM.
_GEMM_FULL_INNER = 64.0
_ELEMENT_COST = 24.0


def _gemm(flops: float, inner: float) -> float:
    return flops * max(1.0, _GEMM_FULL_INNER / max(1.0, inner))


def contraction_model(unit: Unit, n1: int, n2: int, k: int, trace: bool) -> Dict[str, Tuple[float, float]]:
    """``{order: (FLOPs, modelled cost)}`` of both contraction orders for one ``n1 × n2`` tile
    (forming included). The cost is in FLOP-equivalents: GEMM FLOPs scaled up when the inner
    dimension is short, plus the memory traffic of temporaries and of the epilogue."""
    g, c, o, P = unit.groups, unit.c, unit.o, unit.positions
    kk = k if trace else k * k  # output pairs per example pair (trace: k diagonal ones)
    e = _ELEMENT_COST
    pairs = float(g * P * P * n1 * n2)
    # position pairs: per (g, p, q) a Gram over o (short inner dimension) and a scalar epilogue
    pair_f = 2.0 * pairs * (c + kk * o)
    pair_c = _gemm(2.0 * pairs * c, c) + _gemm(2.0 * pairs * kk * o, o) + e * pairs * kk
    # per-sample gradients: forming J (inner P), then one Gram over g·o·c
    form = 2.0 * (n1 + n2) * k * P * g * o * c
    gram = 2.0 * n1 * n2 * kk * g * o * c
    ps_f = form + gram
    ps_c = _gemm(form, P) + e * (n1 + n2) * k * g * o * c + _gemm(gram, g * o * c)
    return {"position_pair": (pair_f, pair_c), "per_sample": (ps_f, ps_c)}


def choose_contraction(unit: Unit, n1: int, n2: int, k: int, trace: bool, *, max_pair_terms: int = 4096) -> None:
    """Set ``unit.contraction`` (and ``reason``, ``flops``) by :func:`contraction_model`.

    A bias-only unit is always ``position_pair`` (its cost does not depend on ``P``²). Pair
    contraction needs ``g·P²`` primitive terms and is ruled out above ``max_pair_terms``.
    """
    if unit.weight is None or unit.lam_w == 0.0:
        unit.contraction, unit.reason = "position_pair", "bias only: summed cotangents, one term"
        unit.flops = {"position_pair": 2.0 * n1 * n2 * k * k * unit.groups * unit.o}
        return
    model = contraction_model(unit, n1, n2, k, trace)
    fl = {key: v[0] for key, v in model.items()}
    unit.flops = fl
    nterms = unit.groups * unit.positions ** 2
    allowed = {key: v[1] for key, v in model.items()}
    if nterms > max_pair_terms:
        del allowed["position_pair"]
    best = min(allowed, key=lambda key: (allowed[key], key != "position_pair"))
    unit.contraction = best
    others = ", ".join(f"{key} {v:.3g}" for key, v in sorted(allowed.items()) if key != best) or "the only order allowed"
    if best == "position_pair":
        kind = "activation Gram ⊙ cotangent Gram" if unit.groups * unit.positions == 1 else f"{nterms} position-pair Grams"
    else:
        kind = "per-sample weight gradients"
    unit.reason = f"{kind}: modelled cost {allowed[best]:.3g} (vs {others}; {fl[best]:.3g} FLOP)"
    if "position_pair" not in allowed:
        unit.reason += f"; g·P² = {nterms} position pairs > {max_pair_terms}"
