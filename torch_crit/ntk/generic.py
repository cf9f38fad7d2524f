r"""Generic (any differentiable model) NTK contributions by per-example Jacobians.

For a set of parameters :math:`p` with scale :math:`\lambda` the contribution to (8.5) is
:math:`\lambda J_p J_p^\top` with :math:`J_{i;a} = \partial f_{i;a}/\partial p`. The Jacobians are
computed as in the ``torch.func`` NTK tutorial (``vmap(jacrev(f_single))`` over the examples of
a block; Jacobian-contraction cost :math:`N k [FP] + N_1 N_2 k^2 P`), blocked over parameter
chunks to bound the temporary memory, and contracted by the same fused primitive as the
structured layers. This path is exact for any model whose examples are independent; it is
used for everything the structured rules do not cover (norms, embeddings, attention
internals, custom parameters…).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from torch_crit.errors import FallbackPathWarning
from torch_crit.ntk.inputs import ModelInput, batch_size, call_model, flatten_output, slice_batch

__all__ = ["GenericUnit", "per_sample_jacobians", "generic_terms", "generic_diagonal"]


@dataclass
class GenericUnit:
    """Parameters of one module path sharing one λ, handled by Jacobian contraction.

    Attributes:
        group: the ``per_layer`` key (module path; the parameter name for top-level ones).
        names: canonical parameter names.
        lam: the learning-rate scale λ (8.6).
        numel: total number of parameter entries.
        reason: why the structured path does not handle them.
    """

    group: str
    names: Tuple[str, ...]
    lam: float
    numel: int
    reason: str = ""


def _in_dims(x: ModelInput) -> Any:
    def d(e: Any) -> Optional[int]:
        return 0 if isinstance(e, torch.Tensor) and e.dim() >= 1 else None

    if isinstance(x, torch.Tensor):
        return 0
    if isinstance(x, Mapping):
        return {k: d(v) for k, v in x.items()}
    return tuple(d(e) for e in x)


def _unsqueeze(xi: ModelInput, dims: Any) -> ModelInput:
    if isinstance(xi, torch.Tensor):
        return xi.unsqueeze(0)
    if isinstance(xi, Mapping):
        return {k: (v.unsqueeze(0) if dims[k] == 0 else v) for k, v in xi.items()}
    return tuple(e.unsqueeze(0) if dd == 0 else e for e, dd in zip(xi, dims))


def vmap_or_loop(batched: Callable[[], Dict[str, torch.Tensor]], single: Callable[[int], Dict[str, torch.Tensor]],
                 n: int, what: str) -> Dict[str, torch.Tensor]:
    """``batched()`` (a ``vmap`` over ``n`` items), or, when ``vmap`` cannot batch the model, the
    same result by a Python loop ``single(i)`` stacked along a new dimension 0 (exact, slower).

    ``vmap`` has no batching rule for some kernels (``nn.LSTM``/``GRU``/``RNN`` on CPU: ``_VF.lstm``
    breaks the batch dimension; data-dependent control flow); every probe (NTK, dNTK, velocity,
    monitor) falls back through here, with a :class:`~torch_crit.errors.FallbackPathWarning`.
    When the loop fails too, its own error (not vmap's) is raised.
    """
    try:
        return batched()
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        warnings.warn(
            f"vmap could not batch {what} ({first}); computing them one item at a time "
            f"(exact, slower; {n} passes).",
            FallbackPathWarning,
            stacklevel=3,
        )
        rows = [single(i) for i in range(n)]
        return {key: torch.stack([r[key] for r in rows]) for key in rows[0]}


def per_sample_jacobians(
    model: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    x: ModelInput,
    names: Sequence[str],
    *,
    max_chunk_numel: int = 1 << 22,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    r"""Per-example Jacobians :math:`J_{i;a,\mu} = \partial f_{i;a}/\partial\theta_\mu`.

    Args:
        model: the network (evaluated with ``functional_call``; put it in eval mode first).
        tensors: every parameter and buffer by name (the values to differentiate at).
        x: inputs (tensor ``[N, ...]``, tuple or dict of batched tensors).
        names: the parameters to differentiate, in the column order of the result.
        max_chunk_numel: parameters are differentiated in chunks of at most this many entries
            (one ``jacrev`` per chunk) to bound the temporaries.
        chunk_size: examples per ``vmap`` chunk (``None``: the whole block at once).

    Returns:
        ``J`` ``[N, k, Σ numel]``, columns in the order of ``names`` (each flattened).
    """
    dims = _in_dims(x)
    chunks: List[List[str]] = []
    cur: List[str] = []
    size = 0
    for nme in names:
        ne = tensors[nme].numel()
        if cur and size + ne > max_chunk_numel:
            chunks.append(cur)
            cur, size = [], 0
        cur.append(nme)
        size += ne
    if cur:
        chunks.append(cur)

    pieces: List[torch.Tensor] = []
    for chunk in chunks:
        sel = {nme: tensors[nme] for nme in chunk}
        rest = {kk: v for kk, v in tensors.items() if kk not in sel}

        def f_single(p: Dict[str, torch.Tensor], xi: ModelInput) -> torch.Tensor:
            out = call_model(model, {**rest, **p}, _unsqueeze(xi, dims))
            return flatten_output(out, 1)[0]

        def batched() -> Dict[str, torch.Tensor]:
            return torch.func.vmap(torch.func.jacrev(f_single), in_dims=(None, dims), chunk_size=chunk_size)(sel, x)

        def single(i: int) -> Dict[str, torch.Tensor]:
            xi = slice_batch(x, i, i + 1)
            return torch.func.jacrev(lambda p: flatten_output(call_model(model, {**rest, **p}, xi), 1)[0])(sel)

        jac = vmap_or_loop(batched, single, batch_size(x), "the per-example Jacobians")
        n, k = next(iter(jac.values())).shape[:2]
        pieces.extend(jac[nme].reshape(n, k, -1) for nme in chunk)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)


def generic_terms(unit: GenericUnit, JI: torch.Tensor, JJ: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
    """The primitive term ``(J_I, J_J, λ)`` of a generic unit (``C=None`` when λ = 1)."""
    C = None if unit.lam == 1.0 else torch.full((JI.shape[0], JJ.shape[0]), unit.lam, dtype=JI.dtype, device=JI.device)
    return [(JI, JJ, C)]


def generic_diagonal(unit: GenericUnit, J: torch.Tensor) -> torch.Tensor:
    r"""Per-example block :math:`\lambda J_i J_i^\top`: ``[N, K, K]``."""
    return torch.einsum("nam,nbm->nab", J, J) * unit.lam
