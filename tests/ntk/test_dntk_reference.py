"""Brute-force float64 references for the dNTK (11.8) and its NTK update (11.10), and their own checks.

The references deliberately use a different mechanism from the library: plain reverse-mode
autograd, one scalar at a time — per-sample gradients by ``torch.autograd.grad`` on each output
entry (``create_graph=True``), Hessian-vector products by double backward, then naive Python
contractions. They are slow and only meant for models with a few hundred parameters.

Conventions (the book's, Roberts & Yaida (11.8)):

    dH[d0, d1, d2, i0, i1, i2] = sum_{mu, nu} (lam J[d1, i1])_mu  Hess(z[d0, i0])_{mu nu}  (lam J[d2, i2])_nu

with ``lam`` the diagonal learning-rate tensor (one scale per parameter tensor) and
``J[d, i] = dz[d, i]/dtheta``.
"""
from __future__ import annotations

from typing import Mapping

import pytest
import torch
from torch import nn

__all__ = ["trainable", "jacobian_reference", "dntk_reference", "ntk_reference"]


def trainable(model: nn.Module, lam: Mapping[str, float] | None = None) -> tuple[list[str], list[torch.Tensor], list[float]]:
    """Names, tensors and λ of the trainable parameters (λ = 1 when ``lam`` is None; absent → skipped)."""
    names, params, lams = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if lam is not None and name not in lam:
            continue
        names.append(name)
        params.append(p)
        lams.append(1.0 if lam is None else float(lam[name]))
    return names, params, lams


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    z = model(x)
    return z.reshape(z.shape[0], -1)


def jacobian_reference(model: nn.Module, x: torch.Tensor, lam: Mapping[str, float] | None = None) -> torch.Tensor:
    """Per-sample Jacobian ``J[N, k, P]`` by one reverse pass per output entry (float64 expected)."""
    _, params, _ = trainable(model, lam)
    z = _outputs(model, x)
    N, k = z.shape
    rows = []
    for d in range(N):
        for i in range(k):
            g = torch.autograd.grad(z[d, i], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(gg if gg is not None else torch.zeros_like(p)).reshape(-1) for gg, p in zip(g, params)]))
    return torch.stack(rows).reshape(N, k, -1)


def ntk_reference(model: nn.Module, x: torch.Tensor, lam: Mapping[str, float] | None = None) -> torch.Tensor:
    """λ-weighted NTK (8.5) ``H[N, N, k, k] = J Λ Jᵀ`` from :func:`jacobian_reference`."""
    _, params, lams = trainable(model, lam)
    J = jacobian_reference(model, x, lam)
    scale = torch.cat([torch.full((p.numel(),), l, dtype=J.dtype) for p, l in zip(params, lams)])
    return torch.einsum("aip,bjp->abij", J * scale, J)


def dntk_reference(model: nn.Module, x: torch.Tensor, lam: Mapping[str, float] | None = None) -> torch.Tensor:
    """Brute-force dNTK ``dH[N, N, N, k, k, k]`` (index order d0, d1, d2, i0, i1, i2), eq. (11.8).

    Gradients of every output entry with ``create_graph=True``; for each (d0, i0) and each
    direction u2 = Λ ∇z[d2, i2] one double-backward Hessian-vector product Hess(z[d0,i0]) u2, then
    the dot product with u1 = Λ ∇z[d1, i1] in plain loops.
    """
    _, params, lams = trainable(model, lam)
    z = _outputs(model, x)
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


# ----------------------------------------------------------------------------- checks of the references


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def test_reference_dntk_matches_finite_difference_of_ntk():
    """Central difference of H along u2: dH/dt = dH[1,2,·] + dH[2,1,·] (the derivative of (11.7))."""
    model = _mlp()
    x = torch.randn(3, 3, dtype=torch.float64)
    lam = {n: 0.5 + 0.1 * j for j, (n, _) in enumerate(model.named_parameters())}
    dH = dntk_reference(model, x, lam)
    names, params, lams = trainable(model, lam)
    J = jacobian_reference(model, x, lam)
    d2, i2 = 1, 0
    sizes = [p.numel() for p in params]
    u2 = torch.cat([torch.full((s,), l, dtype=J.dtype) for s, l in zip(sizes, lams)]) * J[d2, i2]
    h = 1e-5

    def shifted(sign: float) -> torch.Tensor:
        m = _mlp()
        with torch.no_grad():
            off = 0
            for (_, p), s in zip(m.named_parameters(), sizes):
                p.add_(sign * h * u2[off:off + s].reshape(p.shape))
                off += s
        return ntk_reference(m, x, lam)

    fd = (shifted(1.0) - shifted(-1.0)) / (2 * h)
    # d/dt H[a, b, i, j] along u2 = dH[a, b, d2, i, j, i2] + dH[b, a, d2, j, i, i2]
    pred = dH[:, :, d2, :, :, i2] + dH[:, :, d2, :, :, i2].permute(1, 0, 3, 2)
    # central difference error O(h^2 * third derivative) ~ 1e-10 relative here
    torch.testing.assert_close(fd, pred, rtol=1e-7, atol=1e-9)


def test_reference_first_layer_vanishes_and_symmetry():
    torch.manual_seed(1)
    one = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    assert dntk_reference(one, x).abs().max() == 0  # (11.26): z^(1) is linear in its parameters
    dH = dntk_reference(_mlp(2), x[:2])
    torch.testing.assert_close(dH, dH.permute(0, 2, 1, 3, 5, 4), rtol=1e-12, atol=1e-14)
    assert dH.abs().max() > 1e-3


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
