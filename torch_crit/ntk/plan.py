"""What :func:`torch_crit.empirical_ntk` decided, per layer and overall (``return_plan=True``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch

from torch_crit.ntk.memory import MemoryEstimate

__all__ = ["LayerPlan", "NTKPlan"]


@dataclass(frozen=True)
class LayerPlan:
    """How one parameter group's NTK contribution is computed.

    Attributes:
        group: the ``per_layer`` key (module path).
        params: canonical parameter names in this contribution.
        method: ``"structured"`` or ``"generic"``.
        contraction: ``"position_pair"`` (activation Gram ⊙ cotangent Gram, per position
            pair), ``"per_sample"`` (per-example weight gradients) or ``"jacobian"`` (generic
            Jacobian contraction).
        calls: number of module calls feeding it (shared weights: > 1); 0 for generic.
        lam: learning-rate scales λ (8.6) by parameter.
        flops: FLOP model of the candidate contractions for one full tile.
        reason: why this method and contraction.
    """

    group: str
    params: Tuple[str, ...]
    method: str
    contraction: str
    calls: int
    lam: Dict[str, float]
    flops: Dict[str, float]
    reason: str

    def __str__(self) -> str:
        return f"{self.group or '<root>'}: {self.method}/{self.contraction} ({', '.join(self.params)}) — {self.reason}"


@dataclass(frozen=True)
class NTKPlan:
    """The whole plan of an :func:`empirical_ntk` call.

    Attributes:
        layers: one :class:`LayerPlan` per contribution, in forward order where known.
        memory: the tiling and memory estimate.
        method, backend, output: the resolved options.
        dtype: the compute dtype.
        k: number of network outputs (flattened).
        n1, n2: example counts.
    """

    layers: Tuple[LayerPlan, ...]
    memory: MemoryEstimate
    method: str
    backend: str
    output: str
    dtype: torch.dtype
    k: int
    n1: int
    n2: int

    def __str__(self) -> str:
        lines = [
            f"empirical_ntk plan: N1={self.n1}, N2={self.n2}, k={self.k}, output={self.output!r}, "
            f"method={self.method!r}, backend={self.backend!r}, dtype={self.dtype}",
            f"  memory: {self.memory}",
        ]
        lines += [f"  {lp}" for lp in self.layers]
        return "\n".join(lines)
