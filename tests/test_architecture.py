"""Tests for torch_crit.architecture.analyse (the shared model-analysis spine)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_crit.architecture import (
    ActivationNotFoundError,
    AmbiguousActivationError,
    TracingFallbackWarning,
    analyse,
    criticality_activation,
    unwrap_model,
)
from torch_crit.theory import get_activation


def names(plan):
    return [l.name for l in plan.layers]


def act_key(a):
    return None if a is None else a.key


# ------------------------------------------------------------------------------------------ basics
def test_sequential_mlp_layers_depth_readout_and_activations():
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    plan = analyse(net)
    assert plan.method == "fx"
    assert names(plan) == ["0", "2", "4"]
    assert [l.depth for l in plan.layers] == [1, 2, 3] and plan.depth == 3
    assert [l.is_readout for l in plan.layers] == [False, False, True]
    assert [(l.fan_in, l.fan_out) for l in plan.layers] == [(3, 5), (5, 7), (7, 2)]
    assert [act_key(l.input_activation) for l in plan.layers] == [None, "relu", "tanh"]
    assert [act_key(l.activation) for l in plan.layers] == ["relu", "tanh", None]
    assert plan.layer("2").params == (("weight", "2.weight"), ("bias", "2.bias"))
    assert plan.unplaced == () and plan.residual_blocks == ()
    # the plan's governing activation follows the book's convention (first layer: the one after it)
    assert [criticality_activation(l, plan).key for l in plan.layers] == ["relu", "relu", "tanh"]
    assert "ModelPlan" in str(plan) and "readout" in str(plan)


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.ModuleList(nn.Linear(4, 4) for _ in range(7))

    def forward(self, x):
        x = F.relu(self.l[0](x))
        x = torch.tanh(self.l[1](x))
        x = self.l[2](x).relu()
        x = F.gelu(self.l[3](x), approximate="tanh")
        x = F.leaky_relu(self.l[4](x), 0.2)
        x = torch.sin(self.l[5](x))
        return self.l[6](x)


def test_functional_and_method_activations_are_seen_by_fx():
    plan = analyse(Functional())
    got = [act_key(l.input_activation) for l in plan.layers]
    assert got == [None, "relu", "tanh", "relu", "gelu_tanh", "leaky_relu(a=0.2)", "sin"]
    assert plan.layers[-1].is_readout and plan.depth == 7


class Custom(nn.Module):
    """A parameter-free user activation module (read as a user callable)."""

    def forward(self, z):
        return torch.atan(z) * 1.5


def test_parameter_free_custom_module_is_a_user_activation():
    net = nn.Sequential(nn.Linear(3, 8), Custom(), nn.Linear(8, 1))
    plan = analyse(net)
    act = plan.layer("2").input_activation
    assert act is not None and act.is_custom
    z = torch.linspace(-2, 2, 5, dtype=torch.float64)
    assert torch.allclose(act.sigma(z), torch.atan(z) * 1.5)


def test_composed_activations_become_one_elementwise_function():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.b(torch.tanh(F.relu(self.a(x))))

    act = analyse(Twice()).layer("b").input_activation
    z = torch.linspace(-2, 2, 9, dtype=torch.float64)
    assert torch.allclose(act.sigma(z), torch.tanh(torch.relu(z)))


# ------------------------------------------------------------------------------------ residuals
class ResMLP(nn.Module):
    def __init__(self, n=8, blocks=3, gamma=None, xi=None, style="mul"):
        super().__init__()
        self.inp = nn.Linear(4, n)
        self.blocks = nn.ModuleList(nn.Linear(n, n) for _ in range(blocks))
        self.out = nn.Linear(n, 2)
        self.gamma, self.xi, self.style = gamma, xi, style

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            f = b(torch.relu(h))
            if self.style == "plain":
                h = h + f
            elif self.style == "mul":
                h = self.gamma * h + f * self.xi
            elif self.style == "alpha":
                h = torch.add(h * self.gamma, f, alpha=self.xi)
            elif self.style == "div":
                h = h / 2.0 + f
            elif self.style == "sub":
                h = h - f
        return self.out(torch.relu(h))


@pytest.mark.parametrize("style,gamma,xi,want", [
    ("plain", None, None, (1.0, 1.0)),
    ("mul", 0.6, 2.0, (0.6, 2.0)),
    ("alpha", 0.3, 0.5, (0.3, 0.5)),
    ("div", None, None, (0.5, 1.0)),
    ("sub", None, None, (1.0, 1.0)),
])
def test_residual_sums_and_scales_are_detected(style, gamma, xi, want):
    plan = analyse(ResMLP(gamma=gamma, xi=xi, style=style))
    assert len(plan.residual_blocks) == 3
    for i, b in enumerate(plan.residual_blocks):
        assert (b.gamma, b.xi) == pytest.approx(want)
        assert b.skip == "identity"
        assert b.branch_layers == (f"blocks.{i}",) and b.output_layers == (f"blocks.{i}",)
        info = plan.layer(f"blocks.{i}").residual
        assert info.role == "branch" and info.is_branch_output and info.block == i
    assert plan.layer("inp").residual is None and plan.layer("out").residual is None
    assert [l.depth for l in plan.layers] == [1, 2, 3, 4, 5]


class Bottleneck(nn.Module):
    """Two-layer branch with a projection shortcut (ResNet downsampling block)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.sc = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = self.c2(F.relu(self.bn(self.c1(x)))) + self.sc(x)
        return self.fc(F.adaptive_avg_pool2d(F.relu(h), 1).flatten(1))


def test_conv_fan_in_with_groups_projection_shortcut_and_norm():
    plan = analyse(Bottleneck())
    assert plan.layer("c1").fan_in == 3 * 9
    assert plan.layer("c2").fan_in == (8 // 4) * 9 and plan.layer("c2").fan_out == 8
    assert plan.layer("bn").kind == "norm" and plan.layer("bn").depth is None
    (b,) = plan.residual_blocks
    assert b.skip == "projection" and b.shortcut_layers == ("sc",)
    assert b.branch_layers == ("c1", "c2") and b.output_layers == ("c2",)
    assert plan.layer("c1").residual.is_branch_output is False
    assert plan.layer("sc").residual.role == "shortcut"
    assert plan.layer("fc").depth == 3 and plan.layer("fc").is_readout
    assert act_key(plan.layer("c2").input_activation) == "relu"


def test_conv_transpose_fan_in():
    net = nn.Sequential(nn.ConvTranspose2d(6, 4, kernel_size=4, stride=2, groups=2), nn.ReLU())
    plan = analyse(net)
    # each output sees in_channels/groups * prod(kernel/stride) inputs
    assert plan.layer("0").fan_in == 3 * 2 * 2


class Block(nn.Module):
    def __init__(self, d=16, V=20):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.head = nn.Linear(d, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        x = self.emb(idx)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(x)


def test_transformer_block_attention_norm_residual_and_tied_weights():
    plan = analyse(Block())
    assert [(l.name, l.kind) for l in plan.layers] == [
        ("emb", "embedding"), ("ln1", "norm"), ("attn", "attention"), ("ln2", "norm"),
        ("fc1", "linear"), ("fc2", "linear"), ("head", "linear")]
    attn = plan.layer("attn")
    assert attn.fan_in == 16 and {r for r, _ in attn.params} >= {"in_proj_weight", "out_proj.weight"}
    assert [b.gamma for b in plan.residual_blocks] == [1.0, 1.0]
    assert plan.residual_blocks[0].output_layers == ("attn",)
    assert plan.residual_blocks[1].output_layers == ("fc2",)
    assert plan.layer("head").tied == ("head.weight",)
    assert plan.owner_of("emb.weight").name == "emb"
    assert plan.layer("emb").fan_in == 1 and plan.layer("head").is_readout
    assert criticality_activation(attn, plan).key == "linear"
    assert plan.unplaced == ()


# ----------------------------------------------------------------------------------- bad input
class TwoActs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(8, 1)

    def forward(self, x):
        return self.c(torch.cat([torch.relu(self.a(x)), torch.tanh(self.b(x))], dim=-1))


def test_ambiguous_activations_raise_naming_the_layer_and_mapping_resolves():
    with pytest.raises(AmbiguousActivationError, match=r"layer 'c'.*mapping=\{'c'"):
        analyse(TwoActs())
    plan = analyse(TwoActs(), mapping={"c": "tanh"})
    assert plan.layer("c").input_activation.key == "tanh"
    assert "input activation from mapping" in plan.layer("c").notes


class Exp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 1)

    def forward(self, x):
        return self.b(torch.exp(self.a(x)) - 1.0)


def test_unidentified_operation_raises_and_activation_or_mapping_fix_it():
    with pytest.raises(ActivationNotFoundError, match=r"layer 'b'.*exp"):
        analyse(Exp())
    assert analyse(Exp(), mapping={"b": "elu"}).layer("b").input_activation.key.startswith("elu")
    plan = analyse(Exp(), activation="tanh")
    assert plan.layer("b").input_activation.key == "tanh"


def test_activation_argument_disagreeing_with_the_model_raises():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(ValueError, match="fed by 'relu'"):
        analyse(net, activation="tanh")
    assert analyse(net, activation="relu").default_activation.key == "relu"
    # a single layer: the activation argument governs it
    single = analyse(nn.Linear(3, 2), activation="relu")
    assert criticality_activation(single.layers[0], single).key == "relu"


def test_bad_mapping_key_lists_module_names():
    with pytest.raises(KeyError, match="name no module"):
        analyse(nn.Sequential(nn.Linear(2, 2)), mapping={"nope": "relu"})


def test_lazy_parameters_raise():
    with pytest.raises(ValueError, match="UninitializedParameter"):
        analyse(nn.Sequential(nn.LazyLinear(3), nn.ReLU(), nn.Linear(3, 1)))


class WithExtras(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 3, batch_first=True)
        self.fc = nn.Linear(3, 1)
        self.scale = nn.Parameter(torch.ones(()))
        self.unused = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.fc(self.rnn(x)[0]) * self.scale


def test_unplaced_parameters_are_listed_with_reasons():
    plan = analyse(WithExtras())
    reasons = {u.name: u.reason for u in plan.unplaced}
    assert set(reasons) == {"rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0",
                            "scale", "unused"}
    assert "GRU is not a supported layer" in reasons["rnn.weight_ih_l0"]
    assert "scalar parameter used as a scale" in reasons["scale"]
    assert "not used" in reasons["unused"]


class FunctionalLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 3))
        self.b1 = nn.Parameter(torch.zeros(6))
        self.out = nn.Linear(6, 1)

    def forward(self, x):
        return self.out(torch.tanh(F.linear(x, self.w1, self.b1)))


def test_f_linear_on_own_parameters_is_a_layer():
    plan = analyse(FunctionalLinear())
    first = plan.layers[0]
    assert first.kind == "linear" and first.fan_in == 3 and first.fan_out == 6
    assert first.params == (("weight", "w1"), ("bias", "b1"))
    assert plan.layer("out").input_activation.key == "tanh" and plan.unplaced == ()


# ------------------------------------------------------------------------------------- fallbacks
class Branchy(nn.Module):
    """Data-dependent control flow (fx cannot trace it); modules registered out of order."""

    def __init__(self):
        super().__init__()
        self.second = nn.Linear(8, 1)
        self.act = nn.Tanh()
        self.first = nn.Linear(3, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        h = self.act(self.bn(self.first(x)))
        if h.sum() > 1e9:
            h = h * 0
        return self.second(h)


def test_untraceable_model_is_recorded_by_execution():
    # registration order would say second, first, bn: the recorded forward pass says what runs
    plan = analyse(Branchy())  # inputs inferred: Linear(8, 1) is tried first, Linear(3, 8) fits
    assert plan.method == "execution" and names(plan) == ["first", "bn", "second"]
    assert any("inferred inputs [(2, 3)]" in n for n in plan.notes)
    net = Branchy()
    plan = analyse(net, example_inputs=torch.randn(4, 3))
    assert plan.method == "execution" and names(plan) == ["first", "bn", "second"]
    assert plan.layer("second").input_activation.key == "tanh" and plan.layer("second").is_readout
    # running the example did not touch the model (BatchNorm statistics, train mode)
    assert net.training and torch.equal(net.bn.running_mean, torch.zeros(8))
    assert int(net.bn.num_batches_tracked) == 0


def test_wrappers_are_unwrapped_and_model_is_not_modified():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    dp = nn.DataParallel(nn.DataParallel(net))  # torch.compile'd models: tests/test_optim.py
    assert unwrap_model(dp) is net
    assert names(analyse(dp)) == ["0", "2"]
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_float64_and_meta_models_analyse():
    net = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 1)).double()
    assert analyse(net).layer("2").input_activation.key == "gelu"
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    assert analyse(meta).depth == 2


def test_same_activation_spelled_differently_is_not_ambiguous():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 1)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.c(self.act(self.a(x)) + F.relu(self.b(x)))

    assert analyse(Two()).layer("c").input_activation.key == "relu"
