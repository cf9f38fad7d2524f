"""predict(): spec and model front doors, regimes, errors."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from torch_crit.theory.finite_width import single_input_recursions
from torch_crit.theory.predict import ArchitectureSpec, predict

D64 = torch.float64


def test_predict_spec_fields_and_relu_numbers():
    spec = ArchitectureSpec("relu", (128,) * 3, C_b=0.0, C_W=2.0, lambda_b=0.5, lambda_W=1.0, n_out=2)
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0), dtype=D64)
    p = predict(spec, x)
    L = 4
    assert p.K.shape == (L, 2, 2) and p.Theta.shape == (L, 2, 2) and p.V.shape == (L, 2, 2, 2, 2)
    assert p.G1.shape == (L, 2, 2) and p.single.A.shape == (L, 2)
    # (5.120): V/(nK^2) = 5 (l-1)/n at every layer (n = 128 for l >= 2)
    want = 5 * torch.arange(L, dtype=D64) / torch.tensor([8.0, 128, 128, 128], dtype=D64)
    torch.testing.assert_close(p.ratios["V/(nK^2)"][:, 0], want, rtol=1e-10, atol=1e-12)
    assert p.aspect_ratio == pytest.approx(4 / 128)
    assert p.nu == pytest.approx(5 * 3 / 4, rel=1e-9)  # eps / r with eps = 15/128
    assert p.optimal_aspect_ratio == pytest.approx(4 / (26 * p.nu))  # (A.73)
    assert p.regime == "effective-theory"
    assert p.exact is not None and float(p.exact.V_exact[-1, 0]) > float(p.single.V[-1, 0])
    # mean metric = K + G1/n, and G1 = 0 on the diagonal for ReLU (5.117)
    assert float(torch.diagonal(p.G1, dim1=1, dim2=2).abs().max()) < 1e-12
    assert "regime" in p.summary()


@pytest.mark.parametrize("act,L,n,regime", [("tanh", 3, 1024, "lazy"), ("tanh", 12, 64, "effective-theory"),
                                            ("relu", 20, 32, "strongly-coupled")])
def test_regimes(act, L, n, regime):
    from torch_crit.theory.criticality import critical_point

    cp = critical_point(act)
    p = predict(ArchitectureSpec(act, (n,) * (L - 1), cp.C_b, cp.C_W), torch.ones(1, 4), multi_input=False)
    assert p.regime == regime


def test_predict_from_initialised_model_matches_spec():
    import torch_crit

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 3)).double()
    torch_crit.init_(model)
    x = torch.randn(1, 6, dtype=D64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pm = predict(model, x)
    ps = predict(ArchitectureSpec("tanh", (48, 48), 0.0, 1.0, n_out=3), x)
    assert pm.spec.widths == (48, 48) and pm.spec.n_out == 3 and pm.spec.activation.key == "tanh"
    torch.testing.assert_close(pm.single.V, ps.single.V)
    torch.testing.assert_close(pm.single.B, ps.single.B)
    torch.testing.assert_close(pm.K, ps.K)
    # a default-initialised model (C_W = 1/3) is flagged
    fresh = nn.Sequential(nn.Linear(6, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 3)).double()
    with pytest.warns(UserWarning, match="critically initialised"):
        predict(fresh, x)


def test_critical_spec_uses_equivalence_principle_rates():
    spec = ArchitectureSpec.critical("tanh", depth=5, width=32, n_out=2, n_in=8)
    # (9.96): lambda_b ~ 1/l, lambda_W ~ l^0
    lb = torch.tensor(spec.lambda_b)
    torch.testing.assert_close(lb * torch.arange(1, 6, dtype=D64), torch.full((5,), float(lb[0]), dtype=D64))
    assert len(set(spec.lambda_W)) == 1
    p = predict(spec, torch.ones(1, 8))
    th = single_input_recursions("tanh", 0.0, 1.0, torch.ones(1, 8), 5, lambda_b=spec.lambda_b,
                                 lambda_W=spec.lambda_W, widths=(32,) * 4)
    torch.testing.assert_close(p.single.Theta, th.Theta)


def test_spec_errors():
    with pytest.raises(ValueError, match=">= 2"):
        ArchitectureSpec("relu", (8, 1), 0.0, 2.0)
    with pytest.raises(ValueError, match="depth L=3"):
        ArchitectureSpec("relu", (8, 8), 0.0, (2.0, 2.0))
    with pytest.raises(ValueError, match="n_out"):
        ArchitectureSpec("relu", (8, 8), 0.0, 2.0, n_out=0)
    with pytest.raises(TypeError, match="ArchitectureSpec or an nn.Module"):
        predict("relu", torch.ones(1, 3))
