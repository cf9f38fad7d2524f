"""Fixes for real models (issue #16): RNNs without vmap, torch.compile'd models, bad-input errors,
per-module mode restore. Every result is checked against the brute-force float64 reference."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import torch_crit
from torch_crit.errors import FallbackPathWarning, InvalidArgumentError
from _references import ntk_reference, rel_err, small_mlp


class _RNNClassifier(nn.Module):
    def __init__(self, cell: type) -> None:
        super().__init__()
        self.rnn = cell(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_models_fall_back_to_an_exact_loop(cell):
    torch.manual_seed(0)
    model = _RNNClassifier(cell).double()
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = torch_crit.empirical_ntk(model, x, output="full", dtype=torch.float64)
    ref = ntk_reference(model, x)
    assert rel_err(got.reshape(ref.shape) if got.shape != ref.shape else got, ref) < 1e-10
    if cell is not nn.RNN:  # vmap has no batching rule for _VF.lstm / _VF.gru on CPU
        assert any(issubclass(w.category, FallbackPathWarning) for w in rec)


def test_compiled_model_is_probed_through_its_original_module():
    model = small_mlp().double()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(4, 3, dtype=torch.float64)
    got = torch_crit.empirical_ntk(compiled, x, output="full")
    assert rel_err(got, torch_crit.empirical_ntk(model, x, output="full")) == 0.0
    assert rel_err(got, ntk_reference(model, x)) < 1e-10


@pytest.mark.parametrize(
    "x, kwargs, needle",
    [
        (torch.full((3, 3), float("nan"), dtype=torch.float64), {}, "x1"),
        (torch.randn(0, 3, dtype=torch.float64), {}, "x1"),
        (torch.randn(4, 3, dtype=torch.float64), {"block_size": 2.5}, "block_size"),
    ],
    ids=["nan", "empty", "fractional-block"],
)
def test_bad_inputs_raise_naming_the_argument(x, kwargs, needle):
    model = small_mlp().double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InvalidArgumentError, match=needle):
        torch_crit.empirical_ntk(model, x, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_plain_function_is_refused_clearly():
    with pytest.raises((InvalidArgumentError, TypeError), match="model"):
        torch_crit.empirical_ntk(lambda x: x.sum(-1, keepdim=True), torch.randn(3, 2))


def test_dntk_restores_each_modules_own_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).double()
    model.train()
    model[1].eval()  # the user keeps this BatchNorm in eval mode
    x = torch.randn(3, 3, dtype=torch.float64)
    torch_crit.empirical_dntk(model, x)
    assert model.training and model[0].training and not model[1].training


def test_monitor_rejects_a_wrong_probe_shape_at_construction():
    model = small_mlp().double()
    with pytest.raises(InvalidArgumentError, match="probe_inputs"):
        torch_crit.KernelFlowMonitor(model, torch.randn(4, 7, dtype=torch.float64), every=1)


def test_dntk_of_a_transformer_layer_runs_on_the_math_attention_backend():
    """nn.TransformerEncoderLayer calls scaled_dot_product_attention, whose fused CPU kernel has no
    forward-mode derivative; the second-order passes run under the math backend, exactly."""
    from _references import dntk_reference

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=4, nhead=1, dim_feedforward=4, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(8, 1)).double()
    x = torch.randn(2, 2, 4, dtype=torch.float64)
    got = torch_crit.empirical_dntk(model, x)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # the reference's double backward needs it too
        ref = dntk_reference(model, x)
    assert rel_err(got.reshape(ref.shape), ref) < 1e-9


class _TwoHeads(nn.Module):
    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        self.as_dict = as_dict
        self.body = nn.Sequential(nn.Linear(3, 5), nn.Tanh())
        self.a, self.b = nn.Linear(5, 2), nn.Linear(5, 1)

    def forward(self, x):
        h = self.body(x)
        return {"logits": self.a(h), "value": self.b(h)} if self.as_dict else (self.a(h), self.b(h))


@pytest.mark.parametrize("method", ["auto", "generic", "structured"])
def test_dict_outputs_flatten_like_tuples_in_key_order(method):
    torch.manual_seed(0)
    tup = _TwoHeads(as_dict=False).double()
    dic = _TwoHeads(as_dict=True).double()
    dic.load_state_dict(tup.state_dict())
    x = torch.randn(4, 3, dtype=torch.float64)
    got = torch_crit.empirical_ntk(dic, x, output="full", method=method)
    assert rel_err(got, ntk_reference(tup, x)) < 1e-10
