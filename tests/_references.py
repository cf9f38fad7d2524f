"""Brute-force float64 references for the NTK (8.5), dNTK (11.8) and the common model builders.

One module shared by ``tests/ntk``, ``tests/monitor`` and ``tests/test_distributed.py`` (a plain
module, not a conftest: tests import it directly; ``tests/conftest.py`` puts ``tests/`` on the path).

The references deliberately use a different mechanism from the library: plain reverse-mode
autograd, one scalar at a time — per-sample gradients by ``torch.autograd.grad`` on each output
entry (``create_graph=True`` for the dNTK), Hessian-vector products by double backward, then naive
Python contractions. They are slow and only meant for models with a few hundred parameters.

Conventions (Roberts & Yaida, arXiv:2106.10165):

    H[a, b, i, j]  = sum_mu lam_mu J[a, i]_mu J[b, j]_mu                                 (8.5)
    dH[d0, d1, d2, i0, i1, i2] = sum_{mu, nu} (lam J[d1, i1])_mu Hess(z[d0, i0])_{mu nu} (lam J[d2, i2])_nu   (11.8)

with ``lam`` the diagonal learning-rate tensor (one scale per parameter tensor) and
``J[d, i] = dz[d, i]/dtheta``. Models are probed in eval mode and restored module by module.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

from torch_crit.ntk.inputs import call_model, flatten_output

__all__ = [
    "trainable", "lambda_of_groups", "jacobian_per_param", "jacobian_reference", "contract",
    "ntk_reference", "reference_ntk", "dntk_reference", "rel_err", "mlp", "small_mlp",
]


# ----------------------------------------------------------------------------- parameters and λ


def trainable(model: nn.Module, lam: Mapping[str, float] | None = None) -> tuple[list[str], list[torch.Tensor], list[float]]:
    """Names, tensors and λ of the trainable parameters (λ = 1 when ``lam`` is None; absent → skipped)."""
    names, params, lams = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or (lam is not None and name not in lam):
            continue
        names.append(name)
        params.append(p)
        lams.append(1.0 if lam is None else float(lam[name]))
    return names, params, lams


def lambda_of_groups(model: nn.Module, learning_rates: Any) -> Dict[str, float]:
    """``{name: λ}`` from optimizer-style groups ``[{"params": [...], "lr": ...}]`` (absent → 0)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if learning_rates is None:
        return {n: 1.0 for n in names}
    by_id = {id(p): n for n, p in model.named_parameters()}
    lam = {n: 0.0 for n in names}
    for g in learning_rates:
        for p in g["params"]:
            lam[by_id[id(p)]] = float(g["lr"])
    return lam


# ----------------------------------------------------------------------------- Jacobians and NTK


def _eval_modes(model: nn.Module) -> dict[nn.Module, bool]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    return modes


def _restore(modes: dict[nn.Module, bool]) -> None:
    for m, t in modes.items():
        m.training = t


def jacobian_per_param(model: nn.Module, x: Any) -> Dict[str, torch.Tensor]:
    """``{name: J [N, k, numel]}`` by one ``autograd.grad`` per output scalar (eval mode, restored).

    ``x`` is any input :func:`torch_crit.ntk.inputs.call_model` accepts (tensor, tuple, dict).
    """
    modes = _eval_modes(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    try:
        out = flatten_output(call_model(model, dict(model.named_parameters()), x))
        n, k = out.shape
        rows = {name: torch.zeros(n, k, p.numel(), dtype=out.dtype) for name, p in params.items()}
        for i in range(n):
            for a in range(k):
                gs = torch.autograd.grad(out[i, a], list(params.values()), retain_graph=True, allow_unused=True)
                for (name, _), g in zip(params.items(), gs):
                    if g is not None:
                        rows[name][i, a] = g.reshape(-1)
    finally:
        _restore(modes)
    return rows


def jacobian_reference(model: nn.Module, x: Any, lam: Mapping[str, float] | None = None) -> torch.Tensor:
    """Per-sample Jacobian ``J[N, k, P]`` over the parameters :func:`trainable` selects."""
    names, _, _ = trainable(model, lam)
    J = jacobian_per_param(model, x)
    return torch.cat([J[n] for n in names], dim=2)


def contract(J1: Dict[str, torch.Tensor], J2: Dict[str, torch.Tensor], lam: Optional[Mapping[str, float]] = None,
             per_layer: bool = False):
    """Σ_p λ_p J1_p J2_pᵀ as ``[N1, N2, k, k]`` (or ``{module path: contribution}``)."""
    parts: Dict[str, torch.Tensor] = {}
    for name in J1:
        scale = 1.0 if lam is None else lam.get(name, 0.0)
        g = name.rsplit(".", 1)[0] if "." in name else ""
        t = torch.einsum("iam,jbm->ijab", J1[name], J2[name]) * scale
        parts[g] = parts[g] + t if g in parts else t
    return parts if per_layer else sum(parts.values())


def ntk_reference(model: nn.Module, x1: Any, x2: Any = None, lam: Optional[Mapping[str, float]] = None,
                  per_layer: bool = False):
    """λ-weighted NTK (8.5) ``H[N1, N2, k, k]`` (or per module path) from full autograd Jacobians."""
    J1 = jacobian_per_param(model, x1)
    J2 = J1 if x2 is None else jacobian_per_param(model, x2)
    return contract(J1, J2, lam, per_layer)


def reference_ntk(model: nn.Module, x1: Any, x2: Any = None, *, output: str = "full", per_layer: bool = False,
                  learning_rates: Any = None, **_: Any) -> Any:
    """:func:`ntk_reference` with :func:`torch_crit.empirical_ntk`'s calling convention (for ``ntk_fn=``).

    ``learning_rates`` are optimizer-style groups; ``output="trace"`` gives ``[N1, N2]``.
    """
    res = ntk_reference(model, x1, x2, lambda_of_groups(model, learning_rates), per_layer)
    if output != "trace":
        return res
    tr = lambda t: torch.einsum("ijaa->ij", t)  # noqa: E731
    return {k: tr(v) for k, v in res.items()} if per_layer else tr(res)


def dntk_reference(model: nn.Module, x: torch.Tensor, lam: Mapping[str, float] | None = None) -> torch.Tensor:
    """Brute-force dNTK ``dH[N, N, N, k, k, k]`` (index order d0, d1, d2, i0, i1, i2), eq. (11.8).

    Gradients of every output entry with ``create_graph=True``; for each (d0, i0) and each
    direction u2 = Λ ∇z[d2, i2] one double-backward Hessian-vector product Hess(z[d0,i0]) u2, then
    the dot product with u1 = Λ ∇z[d1, i1] in plain loops.
    """
    _, params, lams = trainable(model, lam)
    z = model(x)
    z = z.reshape(z.shape[0], -1)
    N, k = z.shape
    grads = {}
    for d in range(N):
        for i in range(k):
            g = torch.autograd.grad(z[d, i], params, retain_graph=True, create_graph=True, allow_unused=True)
            grads[d, i] = [gg if gg is not None else torch.zeros_like(p) for gg, p in zip(g, params)]
    u = {key: [l * gg.detach() for gg, l in zip(g, lams)] for key, g in grads.items()}
    out = torch.zeros(N, N, N, k, k, k, dtype=z.dtype)
    for (d0, i0), g0 in grads.items():
        for (d2, i2), u2 in u.items():
            s = sum((a * b).sum() for a, b in zip(g0, u2))
            if not s.requires_grad:  # z[d0, i0] is linear in the parameters: zero Hessian
                continue
            hv = torch.autograd.grad(s, params, retain_graph=True, allow_unused=True)
            hv = [h if h is not None else torch.zeros_like(p) for h, p in zip(hv, params)]
            for (d1, i1), u1 in u.items():
                out[d0, d1, d2, i0, i1, i2] = sum((a * b).sum() for a, b in zip(u1, hv))
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max-norm relative error ``max|a - b| / max|b|`` (0 when both vanish)."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


# ----------------------------------------------------------------------------- model builders


def mlp(depth: int = 3, width: int = 16, d_in: int = 5, d_out: int = 2, act: type = nn.Tanh, dropout: float = 0.0,
        dtype: torch.dtype = torch.float64, seed: int = 0, bias: bool = True) -> nn.Sequential:
    """``depth`` Linear layers ``d_in → width … → d_out`` with ``act`` (and dropout) between them."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth - 1):
        layers += [nn.Linear(d, width, bias=bias), act()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        d = width
    layers.append(nn.Linear(d, d_out, bias=bias))
    return nn.Sequential(*layers).to(dtype)


def small_mlp(seed: int = 0) -> nn.Sequential:
    """The 3 → 5 → 4 → 2 tanh float64 MLP the dNTK reference checks use."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()
