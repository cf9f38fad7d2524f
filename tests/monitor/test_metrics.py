"""The pure metric functions against direct (numpy / hand-written) computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from torch_crit.monitor import metrics as M


def test_preactivation_kernel_is_neuron_average():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 40, dtype=torch.float64, generator=g)
    K = M.preactivation_kernel(z)
    ref = np.einsum("ai,bi->ab", z.numpy(), z.numpy()) / 40
    np.testing.assert_allclose(K.numpy(), ref, rtol=1e-14, atol=0)
    zc = torch.randn(4, 3, 5, 5, generator=g)  # conv: channels and positions averaged
    Kc = M.preactivation_kernel(zc)
    flat = zc.reshape(4, -1).double().numpy()
    np.testing.assert_allclose(Kc.numpy(), flat @ flat.T / 75, rtol=1e-12)
    assert Kc.dtype == torch.float64
    with pytest.raises(ValueError, match="batch dimension"):
        M.preactivation_kernel(torch.ones(3))


def test_kernel_summary_by_hand():
    K = torch.tensor([[4.0, 1.0, -2.0], [1.0, 1.0, 0.5], [-2.0, 0.5, 9.0]], dtype=torch.float64)
    d, rho = M.kernel_summary(K)
    assert d == pytest.approx((4 + 1 + 9) / 3, rel=1e-15)
    pairs = [1 / math.sqrt(4 * 1), -2 / math.sqrt(4 * 9), 0.5 / math.sqrt(1 * 9)]
    assert rho == pytest.approx(2 * sum(pairs) / 6, rel=1e-14)
    with pytest.raises(ValueError, match="square"):
        M.kernel_summary(torch.ones(2, 3))


def test_spectrum_effective_rank_participation():
    g = torch.Generator().manual_seed(2)
    A = torch.randn(5, 5, 2, 2, dtype=torch.float64, generator=g)
    mat = M.ntk_as_matrix(A)
    # row index α k + a
    assert mat[1 * 2 + 1, 3 * 2 + 0] == A[1, 3, 1, 0]
    S = mat @ mat.T
    threads = torch.get_num_threads()
    lam = M.top_eigenvalues(S)
    assert torch.get_num_threads() == threads  # the one-thread solve restores the caller's setting
    np.testing.assert_allclose(lam.numpy(), np.sort(np.linalg.eigvalsh(S.numpy()))[::-1], rtol=1e-10)
    p = lam / lam.sum()
    assert M.effective_rank(lam) == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-12)
    assert M.participation_ratio(lam) == pytest.approx(float(torch.trace(S) ** 2 / (S * S).sum()), rel=1e-10)
    assert M.effective_rank(torch.tensor([3.0, 0.0, -1e-18])) == pytest.approx(1.0)
    assert M.effective_rank(torch.ones(7)) == pytest.approx(7.0)


def test_alignment_trace_full_and_centered():
    g = torch.Generator().manual_seed(3)
    n, k = 6, 3
    X = torch.randn(n, k, 4, dtype=torch.float64, generator=g).reshape(n * k, 4)
    full = (X @ X.T).reshape(n, k, n, k).permute(0, 2, 1, 3)
    y = torch.randn(n, k, dtype=torch.float64, generator=g)
    trace = torch.einsum("ijaa->ij", full)
    T = y @ y.T
    ref = float((trace * T).sum() / (trace.norm() * T.norm()))
    assert M.kernel_target_alignment(trace, y) == pytest.approx(ref, rel=1e-13)
    Tf = torch.einsum("ia,jb->ijab", y, y)
    ref_full = float((full * Tf).sum() / (full.norm() * Tf.norm()))
    assert M.kernel_target_alignment(full, y) == pytest.approx(ref_full, rel=1e-13)
    C = torch.eye(n, dtype=torch.float64) - 1.0 / n
    Kc, Tc = C @ trace @ C, C @ T @ C
    ref_c = float((Kc * Tc).sum() / (Kc.norm() * Tc.norm()))
    assert M.kernel_target_alignment(trace, y, centered=True) == pytest.approx(ref_c, rel=1e-12)
    # a kernel equal to the target kernel is perfectly aligned
    assert M.kernel_target_alignment(T, y) == pytest.approx(1.0, rel=1e-14)
    with pytest.raises(ValueError, match="samples"):
        M.kernel_target_alignment(trace, y[:3])


def test_relative_change_and_registry():
    A0 = torch.ones(3, 3, dtype=torch.float64)
    assert M.relative_change(A0 * 1.5, A0) == pytest.approx(0.5)
    assert math.isnan(M.relative_change(A0, torch.zeros(3, 3, dtype=torch.float64)))
    with pytest.raises(ValueError, match="already registered"):
        M.register_metric("ntk", lambda s: {})
    with pytest.raises(ValueError, match="unknown metric"):
        M.resolve_metrics(["no_such_metric"])
    with pytest.raises(ValueError, match="unknown needs"):
        M.Metric("x", lambda s: {}, frozenset({"gradients"}))
    m = M.register_metric("test_only_metric", lambda s: {"x": 1.0}, needs=("outputs",))
    try:
        assert M.resolve_metrics(["test_only_metric"]) == (m,)
    finally:
        del M.METRICS["test_only_metric"]
