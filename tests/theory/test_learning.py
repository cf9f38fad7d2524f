"""Tests of torch_crit.theory.learning: NNGP posterior, frozen-NTK training, bias–variance (Ch. 6, 10)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from torch_crit.theory.learning import (
    GramBlocks,
    SingularKernelError,
    SingularKernelWarning,
    bias_variance,
    bias_variance_scan,
    infinite_width_kernels,
    linearized_dynamics,
    nngp_posterior,
    ntk_prediction,
    soft_label_targets,
)

DT = torch.float64


# many small ops: single-threaded (shared fixture in tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def random_kernel(n: int, *, p: int = 40, seed: int = 0, offset: float = 0.3) -> torch.Tensor:
    """A generic positive-definite Gram matrix [n, n] (random features + a constant, like a bias term)."""
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(n, p, generator=g, dtype=DT)
    return phi @ phi.T / p + offset


def problem(n_a: int = 7, n_b: int = 5, k: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(100 + seed)
    theta = random_kernel(n_a + n_b, seed=seed)
    K = random_kernel(n_a + n_b, seed=seed + 1, offset=0.1)
    y = torch.randn(n_a, k, generator=g, dtype=DT)
    return theta, K, y


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# --------------------------------------------------------------------------------------
# frozen-NTK training: closed forms vs explicit iterations and direct solves
# --------------------------------------------------------------------------------------
def test_converged_prediction_is_kernel_regression_with_theta():
    """t → ∞: mean (10.40) = Θ_BA Θ_AA⁻¹ y and covariance (10.41), term by term as in the book."""
    theta, K, y = problem()
    n_a = y.shape[0]
    pred = ntk_prediction(y, theta, K)
    tba, taa = theta[n_a:, :n_a], theta[:n_a, :n_a]
    kba, kaa, kbb = K[n_a:, :n_a], K[:n_a, :n_a], K[n_a:, n_a:]
    assert rel(pred.mean, tba @ torch.linalg.solve(taa, y)) < 1e-10
    A = tba @ torch.linalg.inv(taa)  # Θ_{β α1} Θ~^{α1 α2}
    cov = kbb - (A @ kba.T).T - A @ kba.T + A @ kaa @ A.T  # (10.41), four terms
    assert rel(pred.cov, cov) < 1e-10
    assert pred.steps is None and pred.mean.shape == (5, 3) and pred.cov.shape == (5, 5)


def explicit_gd(theta: torch.Tensor, f0: torch.Tensor, y: torch.Tensor, eta: float, steps: int) -> list[torch.Tensor]:
    """Brute force: z(t+1) = z(t) - η Θ_{DA} (z_A(t) - y), (10.3), one step at a time."""
    n_a = y.shape[0]
    z = f0.clone()
    traj = [z.clone()]
    for _ in range(steps):
        if theta.dim() == 2:
            z = z - eta * theta[:, :n_a] @ (z[:n_a] - y)
        else:
            z = z - eta * torch.einsum("dAij,Aj->di", theta[:, :n_a], z[:n_a] - y)
        traj.append(z.clone())
    return traj


@pytest.mark.parametrize("eta_frac", [0.3, 0.95, 1.9])  # η λ_max: monotone, near-critical and oscillating
def test_finite_t_matches_explicit_gd_of_linearized_model(eta_frac):
    theta, K, y = problem()
    n_a = y.shape[0]
    lmax = float(torch.linalg.eigvalsh(theta[:n_a, :n_a])[-1])
    eta = eta_frac / lmax
    f0 = torch.randn(theta.shape[0], y.shape[1], generator=torch.Generator().manual_seed(3), dtype=DT)
    steps = [0, 1, 2, 7, 40, 200]
    traj = explicit_gd(theta, f0, y, eta, max(steps))
    pred = ntk_prediction(y, theta, learning_rate=eta, steps=steps, f0=f0)
    assert pred.mean.shape == (len(steps), 5, 3) and pred.cov is None
    for i, s in enumerate(steps):
        assert rel(pred.mean[i], traj[s][n_a:]) < 1e-10, s
    # ensemble mean (E f0 = 0): the same iteration started from zero outputs
    traj0 = explicit_gd(theta, torch.zeros_like(f0), y, eta, max(steps))
    pred0 = ntk_prediction(y, theta, K, learning_rate=eta, steps=steps)
    for i, s in enumerate(steps):
        assert (pred0.mean[i] - traj0[s][n_a:]).abs().max() < 1e-10 * traj0[max(steps)][n_a:].abs().max()


def test_finite_t_covariance_matches_explicit_linear_map():
    """Cov at step t = M_t K M_tᵀ with M_t the explicit linear map z(0) → z_B(t) (iterated on the identity)."""
    theta, K, y = problem(k=1)
    n_a, n_d = y.shape[0], theta.shape[0]
    eta = 0.7 / float(torch.linalg.eigvalsh(theta[:n_a, :n_a])[-1])
    M = torch.eye(n_d, dtype=DT)  # columns: response of z(t) to each initial output, targets 0
    for _ in range(25):
        M = M - eta * theta[:, :n_a] @ M[:n_a]
    cov_ref = (M @ K @ M.T)[n_a:, n_a:]
    pred = ntk_prediction(y, theta, K, learning_rate=eta, steps=25)
    assert pred.cov.shape == (5, 5)
    assert rel(pred.cov, cov_ref) < 1e-10


def test_output_resolved_ntk_matches_explicit_gd_and_shared_case():
    """[N, N, k, k] NTK (one network's empirical NTK) is inverted on the joint (sample, output) space."""
    theta, K, y = problem(k=2)
    n_d, n_a, k = theta.shape[0], y.shape[0], 2
    g = torch.Generator().manual_seed(5)
    phi = torch.randn(n_d, k, 60, generator=g, dtype=DT)
    full = torch.einsum("aip,bjp->abij", phi, phi) / 60  # generic output-mixing NTK
    f0 = torch.randn(n_d, k, generator=g, dtype=DT)
    lmax = float(torch.linalg.eigvalsh(full[:n_a, :n_a].permute(0, 2, 1, 3).reshape(n_a * k, n_a * k))[-1])
    eta = 1.2 / lmax
    traj = explicit_gd(full, f0, y, eta, 30)
    pred = ntk_prediction(y, full, learning_rate=eta, steps=[5, 30], f0=f0)
    assert rel(pred.mean[0], traj[5][n_a:]) < 1e-10 and rel(pred.mean[1], traj[30][n_a:]) < 1e-10
    # Kronecker-structured full kernel = shared kernel, including the covariance
    eye = torch.eye(k, dtype=DT)
    full_shared = theta[:, :, None, None] * eye
    a = ntk_prediction(y, full_shared, K)
    b = ntk_prediction(y, theta, K)
    assert a.cov.shape == (5, 5, k, k)
    assert rel(a.mean, b.mean) < 1e-10
    assert rel(a.cov, b.cov[:, :, None, None] * eye) < 1e-10


def test_linearized_dynamics_mse_agrees_with_closed_form():
    theta, _, y = problem()
    n_a = y.shape[0]
    eta = 0.5 / float(torch.linalg.eigvalsh(theta[:n_a, :n_a])[-1])
    f0 = torch.randn(theta.shape[0], 3, generator=torch.Generator().manual_seed(9), dtype=DT)
    traj = linearized_dynamics(theta, f0, y, learning_rate=eta, steps=60, record_every=20)
    assert traj.shape == (4, 12, 3)
    pred = ntk_prediction(y, theta, learning_rate=eta, steps=[0, 20, 40, 60], f0=f0)
    assert rel(traj[:, n_a:], pred.mean) < 1e-10


def test_cross_entropy_converges_to_giant_leap_with_soft_labels():
    """§10.2.3: the CE minimum is z_A = log p + c; the giant leap (10.35) gives the same softmax on B."""
    theta, _, _ = problem(n_a=4, n_b=3, k=3)
    n_a, k = 4, 3
    labels = torch.tensor([0, 1, 2, 1])
    eps = 0.2
    p = torch.full((n_a, k), eps / (k - 1), dtype=DT)
    p[torch.arange(n_a), labels] = 1 - eps
    f0 = 0.3 * torch.randn(theta.shape[0], k, generator=torch.Generator().manual_seed(1), dtype=DT)
    lmax = float(torch.linalg.eigvalsh(theta[:n_a, :n_a])[-1])
    traj = linearized_dynamics(theta, f0, p, learning_rate=1.0 / lmax, steps=1500, loss="cross_entropy", record_every=1500)
    leap = ntk_prediction(p, theta, f0=f0, loss="cross_entropy")
    q_gd, q_leap = torch.softmax(traj[-1, n_a:], 1), torch.softmax(leap.mean, 1)
    assert (torch.softmax(traj[-1, :n_a], 1) - p).abs().max() < 1e-9  # training set fit
    assert (q_gd - q_leap).abs().max() < 1e-9
    with pytest.raises(NotImplementedError, match="no closed form"):
        ntk_prediction(p, theta, loss="cross_entropy", learning_rate=0.1, steps=10)
    with pytest.raises(ValueError, match="label smoothing"):
        soft_label_targets(torch.eye(3, dtype=DT))


# --------------------------------------------------------------------------------------
# Bayesian posterior
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_nngp_posterior_matches_direct_gaussian_conditioning(noise):
    """(6.64)/(6.57) vs conditioning via the joint precision matrix; evidence (6.34) vs MultivariateNormal."""
    _, K, y = problem()
    n_a = y.shape[0]
    post = nngp_posterior(y, K, noise=noise)
    S = K.clone()
    S[:n_a, :n_a] += noise * torch.eye(n_a, dtype=DT)
    Lam = torch.linalg.inv(S)  # joint precision over (A, B)
    cov_ref = torch.linalg.inv(Lam[n_a:, n_a:])
    mean_ref = -cov_ref @ Lam[n_a:, :n_a] @ y
    assert rel(post.mean, mean_ref) < 1e-9 and rel(post.cov, cov_ref) < 1e-9
    mvn = torch.distributions.MultivariateNormal(torch.zeros(n_a, dtype=DT), S[:n_a, :n_a])
    assert abs(post.log_evidence - float(mvn.log_prob(y.T).sum())) < 1e-9 * abs(post.log_evidence)


def test_gradient_descent_equals_bayes_when_theta_is_k():
    """(10.44)–(10.49): with Θ = K the generalized posterior is the exact Bayesian posterior."""
    _, K, y = problem()
    a, b = ntk_prediction(y, K, K), nngp_posterior(y, K)
    assert rel(a.mean, b.mean) < 1e-10 and rel(a.cov, b.cov) < 1e-10


def test_covariances_are_psd_and_shapes_follow_targets():
    theta, K, y = problem(n_a=9, n_b=6, k=4)
    n_a = 9
    eta = 1.0 / float(torch.linalg.eigvalsh(theta[:n_a, :n_a])[-1])
    for pred in (
        nngp_posterior(y, K),
        ntk_prediction(y, theta, K),
        ntk_prediction(y, theta, K, learning_rate=eta, steps=13),
    ):
        ev = torch.linalg.eigvalsh(pred.cov)
        assert float(ev.min()) > -1e-10 * float(ev.max()), float(ev.min())
        assert pred.mean.shape == (6, 4)
    # 1-D targets give 1-D means; several steps add a leading axis; GramBlocks input is equivalent
    p1 = ntk_prediction(y[:, 0], theta, K, learning_rate=eta, steps=[1, 2, 3])
    assert p1.mean.shape == (3, 6) and p1.cov.shape == (3, 6, 6)
    blocks = GramBlocks.from_full(theta, n_a)
    kb = GramBlocks.from_full(K, n_a)
    p2 = ntk_prediction(y[:, 0], blocks, kb, learning_rate=eta, steps=[1, 2, 3])
    assert torch.equal(p1.mean, p2.mean)
    assert ntk_prediction(y, GramBlocks(theta[:n_a, :n_a], theta[n_a:, :n_a])).cov is None
    # t = 0 is the prior: zero mean, covariance K_BB
    p0 = ntk_prediction(y, theta, K, learning_rate=eta, steps=0)
    assert torch.equal(p0.mean, torch.zeros_like(p0.mean)) and rel(p0.cov, K[n_a:, n_a:]) < 1e-14
    # the package resolves these names lazily
    import torch_crit.theory as theory

    assert theory.ntk_prediction is ntk_prediction and theory.nngp_posterior is nngp_posterior


def test_ensemble_formulas_match_monte_carlo_over_initial_outputs():
    """Infinite-width ensemble: z(0) ~ N(0, K) (independent per output), GD map applied per draw.

    Tolerance: mean within 4 standard errors (SE = sqrt(diag cov / M)); covariance within
    4·sqrt(2/M) relative on the diagonal (Gaussian sample-variance SE).
    """
    theta, K, y = problem(k=1)
    n_a, n_d, M = y.shape[0], theta.shape[0], 20000
    eta = 0.8 / float(torch.linalg.eigvalsh(theta[:n_a, :n_a])[-1])
    L = torch.linalg.cholesky(K)
    z0 = (L @ torch.randn(n_d, M, generator=torch.Generator().manual_seed(11), dtype=DT)).T  # [M, N_D]
    Ma = torch.eye(n_d, dtype=DT)
    c = torch.zeros(n_d, dtype=DT)
    for _ in range(15):  # z(t) = Ma z(0) + c, both updated by the GD map
        Ma = Ma - eta * theta[:, :n_a] @ Ma[:n_a]
        c = c - eta * theta[:, :n_a] @ (c[:n_a] - y[:, 0])
    zt = z0 @ Ma.T + c
    pred = ntk_prediction(y[:, 0], theta, K, learning_rate=eta, steps=15)
    mc_mean, mc_cov = zt[:, n_a:].mean(0), torch.cov(zt[:, n_a:].T)
    se = (pred.cov.diagonal() / M).sqrt()
    assert ((mc_mean - pred.mean).abs() <= 4 * se).all()
    assert ((mc_cov.diagonal() / pred.cov.diagonal() - 1).abs() <= 4 * math.sqrt(2 / M)).all()


# --------------------------------------------------------------------------------------
# bias–variance
# --------------------------------------------------------------------------------------
def test_bias_variance_mse_decomposition():
    """(10.52): E[L_B] = ½Σ(m - y)² + ½Σ Var, and cross-entropy's second-order form (10.55)."""
    theta, K, y = problem()
    y_test = torch.randn(5, 3, generator=torch.Generator().manual_seed(4), dtype=DT)
    pred = ntk_prediction(y, theta, K)
    bv = bias_variance(pred, y_test)
    assert math.isclose(float(bv.bias), 0.5 * float(((pred.mean - y_test) ** 2).sum()), rel_tol=1e-12)
    assert math.isclose(float(bv.variance), 0.5 * 3 * float(pred.cov.diagonal().sum()), rel_tol=1e-12)
    assert math.isclose(float(bv.total), float(bv.bias + bv.variance), rel_tol=1e-14)
    mean_red = bias_variance(pred, y_test, reduction="mean")
    assert math.isclose(float(mean_red.total) * 5, float(bv.total), rel_tol=1e-12)
    p_test = torch.softmax(y_test, 1)
    ce = bias_variance(pred, p_test, loss="cross_entropy")
    q = torch.softmax(pred.mean, 1)
    assert math.isclose(float(ce.variance), 0.5 * float((pred.cov.diagonal() * (1 - (q**2).sum(1))).sum()), rel_tol=1e-12)
    with pytest.raises(ValueError, match="no covariance"):
        bias_variance(ntk_prediction(y, theta), y_test)


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------
def test_learning_rate_above_stability_limit_is_an_error_naming_lambda_max():
    theta, _, y = problem()
    lmax = float(torch.linalg.eigvalsh(theta[:7, :7])[-1])
    with pytest.raises(ValueError, match=r"λ_max = ") as info:
        ntk_prediction(y, theta, learning_rate=2.0 * (1 + 1e-9) / lmax, steps=10)
    assert f"{lmax:.6g}" in str(info.value)
    with pytest.raises(ValueError, match="stability limit"):
        ntk_prediction(y, theta, learning_rate=2.5 / lmax)
    with pytest.raises(ValueError, match="need learning_rate"):
        ntk_prediction(y, theta, steps=3)


def test_singular_kernels_jitter_with_warning_or_raise():
    theta, K, y = problem()
    dup = torch.cat([theta[:1], theta], 0)
    dup = torch.cat([dup[:, :1], dup], 1)  # first training input duplicated → singular training block
    y2 = torch.cat([y[:1], y], 0)
    with pytest.warns(SingularKernelWarning, match="jitter"):
        pred = ntk_prediction(y2, dup)
    assert pred.jitter > 0 and torch.isfinite(pred.mean).all()
    # consistent targets on duplicates: the jittered solution equals the non-duplicated one
    assert rel(pred.mean, ntk_prediction(y, theta).mean) < 1e-5
    with pytest.raises(SingularKernelError, match="singular"):
        ntk_prediction(y2, dup, jitter=None)
    with pytest.raises(SingularKernelError):
        nngp_posterior(y2, dup, jitter=None)
    assert nngp_posterior(y2, dup, noise=0.1, jitter=None).jitter == pytest.approx(0.1)  # noise regularizes
    # finite steps never need an inverse: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ntk_prediction(y2, dup, learning_rate=0.1 / float(torch.linalg.eigvalsh(dup[:8, :8])[-1]), steps=5)


def test_shape_and_kernel_validation_messages():
    theta, K, y = problem()
    with pytest.raises(ValueError, match="N_A=6"):
        ntk_prediction(y[:6], GramBlocks(theta[:7, :7], theta[7:, :7]))
    with pytest.raises(ValueError, match="f0 must have shape"):
        ntk_prediction(y, theta, f0=torch.zeros(3, 3))
    bad = theta.clone()
    bad[0, 1] += 1.0
    with pytest.raises(ValueError, match="not symmetric"):
        ntk_prediction(y, bad)
    with pytest.raises(ValueError, match="not positive semidefinite"):
        nngp_posterior(y, theta - 0.5 * torch.eye(12, dtype=DT))
    with pytest.raises(ValueError, match="shared by the output"):
        nngp_posterior(y, theta[:, :, None, None] * torch.eye(3, dtype=DT))
    with pytest.raises(ValueError, match="missing"):
        ntk_prediction(y, activation="tanh")
    with pytest.raises(ValueError, match="steps must be"):
        ntk_prediction(y, theta, learning_rate=0.01, steps=[-1])
    # inputs are not modified
    before = theta.clone()
    ntk_prediction(y, theta, K)
    assert torch.equal(before, theta)


# --------------------------------------------------------------------------------------
# kernels from the recursions
# --------------------------------------------------------------------------------------
def digits_like(n: int, d: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DT)
    return x / x.pow(2).mean(1, keepdim=True).sqrt()  # (1/n0) Σ x² = 1


def test_architecture_arguments_build_kernels_from_the_recursions():
    x_tr, x_te = digits_like(6), digits_like(4, seed=1)
    y = torch.sin(x_tr.sum(1))
    kern = infinite_width_kernels("erf", 0.0, 1.0, 4, x_tr, x_te, lambda_b=0.5, lambda_W=2.0)
    assert kern.nngp.shape == (10, 10) and kern.ntk.shape == (10, 10) and kern.n_train == 6
    a = ntk_prediction(y, kern)
    b = ntk_prediction(y, activation="erf", C_b=0.0, C_W=1.0, depth=4, x_train=x_tr, x_test=x_te, lambda_b=0.5, lambda_W=2.0)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.cov, b.cov)
    c = nngp_posterior(y, activation="erf", C_b=0.0, C_W=1.0, depth=4, x_train=x_tr, x_test=x_te)
    assert rel(c.mean, nngp_posterior(y, kern).mean) < 1e-12
    # training only the last layer with λ^(L) = (C_b, C_W): Θ^(L) = K^(L) and GD = Bayes (10.49)
    lam_b, lam_W = [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]
    last = infinite_width_kernels("erf", 0.0, 1.0, 4, x_tr, x_te, lambda_b=lam_b, lambda_W=lam_W)
    assert rel(last.ntk, last.nngp) < 1e-12


@pytest.mark.slow
def test_last_layer_training_ensemble_approaches_nngp_posterior():
    """Monte Carlo over finite networks, (10.44)–(10.49) and §12 C.21.

    Training only the last layer (λ^(L) = (C_b, C_W), others 0) of a width-n network to convergence
    is exactly random-feature regression: z_B(T) = z_B - k̂_BA k̂_AA⁻¹ (z_A - y) with
    k̂ = C_b + C_W σ·σ/n (10.135). Its ensemble mean/covariance → (6.64)/(6.57) with O(L/n) bias.
    Tolerance: 4 SE of the ensemble mean plus a 3·(L/n)·max|m| allowance for the 1/n bias;
    variances within 4·sqrt(2/M) + 3 L/n relative.
    """
    depth, n, M, cw = 3, 256, 400, 1.0
    x_tr, x_te = digits_like(5), digits_like(3, seed=1)
    y = torch.sin(2 * x_tr[:, 0]) + x_tr[:, 1]
    g = torch.Generator().manual_seed(7)
    h = torch.cat([x_tr, x_te]).expand(M, -1, -1)  # [M, N_D, n0]: M independent networks at once
    for _ in range(depth - 1):
        W = torch.randn(M, h.shape[2], n, generator=g, dtype=DT) * math.sqrt(cw / h.shape[2])
        h = torch.tanh(h @ W)
    kh = cw * h @ h.transpose(1, 2) / n  # stochastic last-layer kernel (10.135), C_b = 0
    z = (h @ torch.randn(M, n, 1, generator=g, dtype=DT))[..., 0] * math.sqrt(cw / n)  # [M, N_D]
    resid = torch.linalg.solve(kh[:, :5, :5], (z[:, :5] - y)[..., None])
    Z = z[:, 5:] - (kh[:, 5:, :5] @ resid)[..., 0]  # converged last-layer-only prediction per network
    post = nngp_posterior(y, activation="tanh", C_b=0.0, C_W=cw, depth=depth, x_train=x_tr, x_test=x_te)
    se = Z.std(0) / math.sqrt(M)
    allowance = 4 * se + 3 * depth / n * post.mean.abs().max()
    assert ((Z.mean(0) - post.mean).abs() <= allowance).all(), (Z.mean(0), post.mean, se)
    ratio = Z.var(0) / post.cov.diagonal()
    assert ((ratio - 1).abs() <= 4 * math.sqrt(2 / M) + 3 * depth / n).all(), ratio


def test_bias_variance_scan_prefers_criticality_for_deep_networks():
    """§10.3 / §6.3.1: off criticality a deep kernel forgets the inputs; the expected test loss
    (10.52) is smallest at the critical C_W. erf (K* = 0 class like tanh, closed-form kernel),
    depth 30: ordered phase → large bias and no variance, chaotic phase → large variance."""
    from torch_crit.theory import critical_point

    cw = critical_point("erf").C_W  # π/4
    x_tr, x_te = digits_like(10, seed=2), digits_like(8, seed=3)
    w = torch.randn(6, generator=torch.Generator().manual_seed(0), dtype=DT)
    y_tr, y_te = torch.tanh(x_tr @ w / 2), torch.tanh(x_te @ w / 2)
    grid = [{"C_b": 0.0, "C_W": f * cw} for f in (0.5, 1.0, 2.0)]
    rows = bias_variance_scan("erf", 30, x_tr, y_tr, x_te, y_te, grid)
    totals = [r["total"] for r in rows]
    assert all(r["error"] is None for r in rows)
    assert totals[1] < 0.9 * totals[0] and totals[1] < 0.9 * totals[2], totals
    assert rows[0]["variance"] < rows[1]["variance"] < rows[2]["variance"]  # the trade-off
