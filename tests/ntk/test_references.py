"""Checks of the brute-force references in ``tests/_references.py`` (dNTK (11.8) vs finite differences)."""
from __future__ import annotations

import torch
from torch import nn

from _references import dntk_reference, jacobian_reference, ntk_reference, small_mlp as _mlp, trainable


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
        return ntk_reference(m, x, lam=lam)

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
