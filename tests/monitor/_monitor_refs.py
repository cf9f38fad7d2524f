"""Brute-force float64 references for the monitor tests (full Jacobians by autograd).

(A plain module with a unique name, not a conftest: the tests import it directly.)

``reference_ntk`` has :func:`torch_crit.empirical_ntk`'s calling convention, so tests can pass it
as ``ntk_fn=`` and compare the monitor's records with direct computations. It is a reference,
not an implementation for users: one backward pass per (sample, output).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn


def jacobian_rows(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], int, int]:
    """Per-parameter Jacobians ``{name: [N, k, numel]}`` by one autograd pass per output entry."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = model(x)
    out = out.reshape(out.shape[0], -1)
    n, k = out.shape
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in params}
    for a in range(n):
        for i in range(k):
            g = torch.autograd.grad(out[a, i], list(params.values()), retain_graph=True, allow_unused=True)
            for (name, p), gi in zip(params.items(), g):
                rows[name].append((torch.zeros_like(p) if gi is None else gi).reshape(-1))
    return {name: torch.stack(r).reshape(n, k, -1) for name, r in rows.items()}, n, k


def _lambda(model: nn.Module, learning_rates: Any) -> dict[str, float]:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if learning_rates is None:
        return {n: 1.0 for n in names}
    by_id = {id(p): n for n, p in model.named_parameters()}
    lam = {n: 0.0 for n in names}
    for g in learning_rates:
        for p in g["params"]:
            lam[by_id[id(p)]] = float(g["lr"])
    return lam


def reference_ntk(
    model: nn.Module,
    x1: torch.Tensor,
    x2: Optional[torch.Tensor] = None,
    *,
    output: str = "full",
    per_layer: bool = False,
    learning_rates: Any = None,
    **_: Any,
) -> Any:
    """Θ = Σ_p λ_p J_p J_pᵀ, ``[N, N, k, k]`` / trace ``[N, N]``; per layer keyed by module name."""
    if x2 is not None:
        raise NotImplementedError("reference_ntk: x2 is not needed by the monitor tests")
    J, n, k = jacobian_rows(model, x1)
    lam = _lambda(model, learning_rates)
    per: dict[str, torch.Tensor] = {}
    for name, j in J.items():
        a = j.reshape(n * k, -1)
        th = lam[name] * (a @ a.T)
        th = th.reshape(n, k, n, k).permute(0, 2, 1, 3)
        if output == "trace":
            th = torch.einsum("ijaa->ij", th)
        layer = name.rsplit(".", 1)[0] if "." in name else ""
        per[layer] = per[layer] + th if layer in per else th
    if per_layer:
        return per
    return sum(per.values())


def mlp(depth: int = 3, width: int = 16, d_in: int = 5, d_out: int = 2, act: type = nn.Tanh, dropout: float = 0.0,
        dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth - 1):
        layers += [nn.Linear(d, width), act()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        d = width
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers).to(dtype)
