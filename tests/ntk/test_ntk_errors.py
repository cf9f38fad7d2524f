"""Bad input to ``empirical_ntk``: every error says what was wrong, what is accepted, the fix."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torch_crit
from torch_crit.ntk.empirical import NonDifferentiableError, ZeroJacobianWarning
from torch_crit.ntk.memory import NTKMemoryError, plan_memory


# tiny problems: one intra-op thread (shared fixture in tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))


def test_mismatched_feature_shapes():
    with pytest.raises(ValueError, match=r"per-example shapes.*\(4, 3\).*\(2, 4\)"):
        torch_crit.empirical_ntk(mlp(), torch.randn(4, 3), torch.randn(2, 4))


def test_mismatched_dtypes():
    with pytest.raises(ValueError, match="different dtypes"):
        torch_crit.empirical_ntk(mlp().double(), torch.randn(4, 3, dtype=torch.float64), torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"does not match the model's dtype.*dtype=torch.float64"):
        torch_crit.empirical_ntk(mlp(), torch.randn(4, 3, dtype=torch.float64))


def test_mismatched_devices():
    meta = torch.empty(2, 3, device="meta")
    with pytest.raises(ValueError, match="different devices"):
        torch_crit.empirical_ntk(mlp(), torch.randn(4, 3), meta)
    with pytest.raises(ValueError, match="not on the model's device"):
        torch_crit.empirical_ntk(mlp(), meta)


def test_inconsistent_batch_and_structure():
    with pytest.raises(ValueError, match="disagree on the batch size"):
        torch_crit.empirical_ntk(mlp(), (torch.randn(4, 3), torch.randn(3, 3)))
    with pytest.raises(ValueError, match="same structure"):
        torch_crit.empirical_ntk(mlp(), torch.randn(4, 3), (torch.randn(2, 3),))
    with pytest.raises(ValueError, match="takes no x2"):
        torch_crit.empirical_ntk(mlp(), torch.randn(4, 3), torch.randn(2, 3), output="diagonal")


def test_bad_options():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="output must be one of"):
        torch_crit.empirical_ntk(mlp(), x, output="diag")
    with pytest.raises(ValueError, match="method must be one of"):
        torch_crit.empirical_ntk(mlp(), x, method="fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        torch_crit.empirical_ntk(mlp(), x, backend="cuda")
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        torch_crit.empirical_ntk(mlp(), x, block_size=0)


def test_no_trainable_parameters():
    net = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters.*requires_grad_"):
        torch_crit.empirical_ntk(net, torch.randn(4, 3))
    with pytest.raises(ValueError, match="learning rate 0"):
        torch_crit.empirical_ntk(mlp(), torch.randn(4, 3), learning_rates=0.0)


class Argmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(3, 4)

    def forward(self, x):
        return self.l(x).argmax(-1, keepdim=True)


class Rounded(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.round(self.a(x)))


def test_non_differentiable_ops_are_named():
    with pytest.raises(NonDifferentiableError, match=r"argmax.*softmax"):
        torch_crit.empirical_ntk(Argmax(), torch.randn(4, 3))
    with pytest.raises(NonDifferentiableError, match=r"\['a.weight', 'a.bias'\].*round"):
        torch_crit.empirical_ntk(Rounded(), torch.randn(4, 3))
    # freezing the cut-off layer (as the message suggests) makes it valid
    net = Rounded()
    net.a.requires_grad_(False)
    assert torch_crit.empirical_ntk(net, torch.randn(4, 3)).shape == (4, 4, 2, 2)


def test_unused_parameter_warns():
    class WithSpareHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = mlp()
            self.extra = nn.Linear(2, 2)  # never called

        def forward(self, x):
            return self.body(x)

    net = WithSpareHead()
    x = torch.randn(4, 3)
    with pytest.warns(ZeroJacobianWarning, match="extra.weight"):
        T = torch_crit.empirical_ntk(net, x)
    torch.testing.assert_close(T, torch_crit.empirical_ntk(net.body, x), rtol=1e-6, atol=1e-7)


def test_model_output_checks():
    class Scalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 1)

        def forward(self, x):
            return self.l(x).sum()

    with pytest.raises(ValueError, match="no batch dimension 0"):
        torch_crit.empirical_ntk(Scalar(), torch.randn(4, 3))

    class NotTensors(nn.Module):  # dicts of tensors are accepted (test_real_model_fixes.py); this is not
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 1)

        def forward(self, x):
            return {"y": self.l(x), "n": 3}

    with pytest.raises(TypeError, match="must return a tensor"):
        torch_crit.empirical_ntk(NotTensors(), torch.randn(4, 3))


def test_result_larger_than_memory(monkeypatch):
    import torch_crit.ntk.empirical as emp

    monkeypatch.setattr(emp, "available_memory", lambda device: 20_000)
    x = torch.randn(40, 3)
    with pytest.raises(NTKMemoryError, match=r"result alone needs .*25600 bytes.*output='trace'"):
        torch_crit.empirical_ntk(mlp(), x)
    # the trace fits the result, but the requested tile does not: the fix names a block size
    with pytest.raises(NTKMemoryError, match=r"40×40 tile needs .* Use block_size=\d+"):
        torch_crit.empirical_ntk(mlp(), x, output="trace", block_size=40)
    # automatic tiling then fits and is exact
    net = mlp()
    T, plan = torch_crit.empirical_ntk(net, x, output="trace", return_plan=True)
    assert plan.memory.block_size < 40 and plan.memory.n_row_blocks > 1
    assert plan.memory.total_bytes <= 0.8 * 20_000
    monkeypatch.setattr(emp, "available_memory", lambda device: 1 << 34)
    T_ref, plan_ref = torch_crit.empirical_ntk(net, x, output="trace", return_plan=True)
    assert plan_ref.memory.n_row_blocks == 1
    torch.testing.assert_close(T, T_ref, rtol=1e-5, atol=1e-6)


def test_plan_memory_pure_function():
    est = plan_memory(n1=100, n2=100, symmetric=True, result_bytes=40_000, feature_bytes_per_example=1000,
                      transient_bytes_per_example=500, pair_bytes=16, available_bytes=10**9)
    assert est.block_size == 100 and est.n_row_blocks == 1 and est.cache_features
    est = plan_memory(n1=100, n2=100, symmetric=True, result_bytes=40_000, feature_bytes_per_example=1000,
                      transient_bytes_per_example=500, pair_bytes=16, available_bytes=200_000)
    assert est.block_size < 100 and est.workspace_bytes + est.result_bytes <= 0.8 * 200_000
    assert est.n_row_blocks == est.n_col_blocks == -(-100 // est.block_size)
    est = plan_memory(n1=100, n2=30, symmetric=False, result_bytes=0, feature_bytes_per_example=10,
                      transient_bytes_per_example=0, pair_bytes=4, available_bytes=10**9, block_size=16)
    assert (est.n_row_blocks, est.n_col_blocks) == (7, 2)
    with pytest.raises(NTKMemoryError, match="even a 1×1 tile"):
        plan_memory(n1=10, n2=10, symmetric=True, result_bytes=0, feature_bytes_per_example=10**9,
                    transient_bytes_per_example=0, pair_bytes=4, available_bytes=10**6)


def test_estimate_ntk_memory_matches_the_call():
    net, x = mlp(), torch.randn(6, 3)
    est = torch_crit.ntk.estimate_ntk_memory(net, x, output="trace")
    _, plan = torch_crit.empirical_ntk(net, x, output="trace", return_plan=True)
    assert est.result_bytes == 6 * 6 * 4 == plan.memory.result_bytes
    assert est.block_size == plan.memory.block_size
