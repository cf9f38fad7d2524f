r"""Model analysis: the parameterised layers of an ``nn.Module`` in forward order.

:func:`analyse` turns a PyTorch model into a :class:`ModelPlan`, the one description of the
architecture that :func:`torch_crit.init_`, :func:`torch_crit.param_groups`, the structured NTK
path and the monitor share. For each parameterised layer the plan records

* its kind (``'linear'``, ``'conv'``, ``'embedding'``, ``'norm'``, ``'attention'``), fan-in
  :math:`n_{\ell-1}` and fan-out :math:`n_\ell`;
* the activation :math:`\sigma` applied to its output and the activation feeding its input (the
  book's layer :math:`\ell+1` multiplies :math:`\sigma(z^{(\ell)})`, eq. (2.5));
* its depth index :math:`\ell` (1-based) among the affine layers and the total depth :math:`L`;
* whether it is a readout layer (eq. (2.6): no activation on the output);
* residual membership (Appendix B, eq. (B.3)): inside a residual branch, with the skip scale
  :math:`\gamma` and branch scale :math:`\xi` of :math:`z^{(\ell+1)} = \xi R(z^{(\ell)}) + \gamma z^{(\ell)}`;
* the names of its parameters,

and lists every parameter it could not place, with the reason.

How the plan is found
---------------------
1. **torch.fx** symbolic tracing (when the model traces). Module activations (``nn.ReLU`` …),
   functional ones (``F.relu``, ``torch.tanh``, ``F.gelu(x, approximate='tanh')``,
   ``F.leaky_relu(x, 0.2)``), method calls (``x.relu()``), residual sums ``x + f(x)`` and scaled
   sums ``a * x + b * f(x)`` (also ``torch.add(x, f, alpha=b)``, ``f(x) / c``) are all seen.
   Parameter-free custom modules are traced as leaves and read as user activations
   (``get_activation(module)``); ``F.linear``/``F.conv*`` applied to a module's own parameters are
   read as layers.
2. **Execution** when tracing fails or leaves a gap (an operation it cannot identify in front of
   a layer, two activations feeding one layer), or whenever ``example_inputs`` is given: one
   forward pass is recorded (:mod:`torch_crit.execution_trace`) into a graph of the same node
   kinds, read by the same handlers. Inputs are inferred from the first layer when not given
   (``Linear``/``Conv``/``Embedding``/RNN/attention); if they cannot be, the error says to pass
   ``example_inputs=``. Registration order is never used.
   Products of two data tensors where one side ends in a sigmoid/hard-sigmoid gate
   (squeeze-excite) keep the other side's activation (``docs/model_analysis.md``).
3. **mapping** ``{module_name: activation}`` overrides detection. For a parameterised layer the
   value is the activation *feeding* that layer (what its weights multiply); for a parameter-free
   module it is the activation that module computes. ``None`` means the identity.

Example:
    >>> import torch.nn as nn
    >>> from torch_crit.architecture import analyse
    >>> plan = analyse(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)))
    >>> [(l.name, l.depth, l.is_readout) for l in plan.layers]
    [('0', 1, False), ('2', 2, True)]
"""
from __future__ import annotations

from .errors import TracingFallbackWarning, AmbiguousActivationError, ActivationNotFoundError  # noqa: F401  (re-exported)
from .errors import ModelAnalysisError
from .execution_trace import infer_example_inputs, record_forward
import math
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "AmbiguousActivationError",
    "ActivationNotFoundError",
    "LayerInfo",
    "ModelPlan",
    "ResidualBlock",
    "ResidualInfo",
    "TracingFallbackWarning",
    "UnplacedParameter",
    "analyse",
    "criticality_activation",
    "unwrap_model",
]

LayerKind = Literal["linear", "conv", "embedding", "norm", "attention", "other"]
AFFINE_KINDS: frozenset[str] = frozenset({"linear", "conv", "embedding", "attention"})


# --------------------------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResidualInfo:
    """Residual membership of one layer (Appendix B, (B.3) and (B.39)).

    Attributes:
        block: index of the residual block in :attr:`ModelPlan.residual_blocks`.
        role: ``'branch'`` (inside the residual branch R) or ``'shortcut'`` (a projection on the
            skip path).
        gamma: skip scale γ of the block, ``None`` when it is not a constant.
        xi: branch scale ξ of the block, ``None`` when it is not a constant.
        is_branch_output: the layer's output reaches the residual sum without passing another
            affine layer of the branch (its variance sets the branch's contribution).
    """

    block: int
    role: Literal["branch", "shortcut"]
    gamma: float | None
    xi: float | None
    is_branch_output: bool


@dataclass(frozen=True)
class ResidualBlock:
    r"""One residual sum :math:`z = \gamma\, s(x) + \xi\, R(x)` found in the forward pass.

    Attributes:
        index: position in :attr:`ModelPlan.residual_blocks` (forward order).
        join: name of the fx node that adds the two paths.
        gamma: skip scale γ (``None`` if not a constant; the value of a scalar parameter is read).
        xi: branch scale ξ (same convention).
        skip: ``'identity'`` (skip path without affine layers) or ``'projection'``.
        branch_layers: names of the affine layers in the branch R, forward order.
        output_layers: the branch layers whose output reaches the sum directly.
        shortcut_layers: names of the affine layers on a projection skip path.
        notes: anything worth knowing (learnable scale, nested block …).
    """

    index: int
    join: str
    gamma: float | None
    xi: float | None
    skip: Literal["identity", "projection"]
    branch_layers: tuple[str, ...]
    output_layers: tuple[str, ...]
    shortcut_layers: tuple[str, ...]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class UnplacedParameter:
    """A parameter the plan could not attach to a supported layer.

    Attributes:
        name: qualified parameter name (``model.named_parameters()`` convention).
        module: qualified name of the module that owns it.
        reason: why it could not be placed.
    """

    name: str
    module: str
    reason: str


@dataclass(frozen=True)
class LayerInfo:
    r"""One parameterised layer.

    Attributes:
        name: module path (``model.get_submodule(name)``); for ``F.linear``/``F.conv*`` applied
            to a module's own parameters, the owning module's path.
        module_type: class name of the module (``'Linear'``, ``'Conv2d'`` …).
        kind: ``'linear'``, ``'conv'``, ``'embedding'``, ``'norm'``, ``'attention'`` or ``'other'``.
        fan_in: :math:`n_{\ell-1}`, inputs summed per output unit. Linear: ``in_features``;
            Conv: ``in_channels / groups × prod(kernel_size)``; ConvTranspose:
            ``in_channels / groups × prod(kernel_size / stride)`` (exact when the kernel is a
            multiple of the stride); Embedding: 1 (one-hot input); attention: ``embed_dim``;
            norm: number of normalised features.
        fan_out: :math:`n_\ell`, output units (channels for Conv).
        activation: activation applied to the layer's output (``None`` = none found).
        input_activation: activation that feeds the layer's input (``None`` = raw input,
            normalised or linear path).
        depth: :math:`\ell`, 1-based index along the longest chain of affine layers
            (linear/conv/embedding/attention) from the input; ``None`` for norm/other layers.
        position: depth of the nearest preceding affine layer (the layer's own depth for affine
            layers; 0 before the first one). Lets vector-like parameters follow depth rules.
        is_readout: an affine layer whose output reaches the model output without another
            affine layer (eq. (2.6)).
        residual: residual membership (innermost block), ``None`` outside residual blocks.
        params: ``(role, qualified parameter name)`` pairs, e.g. ``('weight', 'fc1.weight')``.
        tied: qualified names of parameters of this layer owned by an earlier layer (shared
            weights); they are initialised and optimised with their owner.
        notes: provenance and caveats (``'activation from mapping'``, …).
        fed_by: the unsupported parameterised module (an RNN, a custom layer) whose output feeds
            this layer directly, ``None`` otherwise.
        input_second_moment: :math:`\frac1n\sum_j x_j^2` of this layer's input measured on the
            recorded forward pass (execution analysis only), ``None`` otherwise.
    """

    name: str
    module_type: str
    kind: LayerKind
    fan_in: int
    fan_out: int
    activation: Any | None
    input_activation: Any | None
    depth: int | None
    position: int
    is_readout: bool
    residual: ResidualInfo | None
    params: tuple[tuple[str, str], ...]
    tied: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    fed_by: str | None = None
    input_second_moment: float | None = None

    def param(self, role: str) -> str | None:
        """Qualified name of the parameter with the given role, or ``None``."""
        for r, n in self.params:
            if r == role:
                return n
        return None


@dataclass(frozen=True)
class ModelPlan:
    r"""The parameterised layers of a model in forward order (see :func:`analyse`).

    Attributes:
        layers: every placed layer, forward (topological) order.
        depth: :math:`L`, the largest :attr:`LayerInfo.depth` (0 if the model has no affine
            layer).
        residual_blocks: residual sums found, forward order.
        unplaced: parameters not attached to a supported layer, with reasons.
        method: ``'fx'`` (symbolic tracing) or ``'execution'`` (one forward pass recorded on
            ``example_inputs``, given or inferred; :mod:`torch_crit.execution_trace`).
        default_activation: the ``activation`` argument of :func:`analyse`, resolved.
        notes: model-level caveats.
    """

    layers: tuple[LayerInfo, ...]
    depth: int
    residual_blocks: tuple[ResidualBlock, ...]
    unplaced: tuple[UnplacedParameter, ...]
    method: Literal["fx", "execution"]
    default_activation: Any | None = None
    notes: tuple[str, ...] = ()

    @property
    def affine_layers(self) -> tuple[LayerInfo, ...]:
        """Layers with a depth index (linear, conv, embedding, attention)."""
        return tuple(l for l in self.layers if l.kind in AFFINE_KINDS)

    def layer(self, name: str) -> LayerInfo:
        """The layer called ``name``.

        Raises:
            KeyError: no layer has that name; the message lists the names.
        """
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(f"no layer named {name!r} in the plan; layers are {[l.name for l in self.layers]}")

    def owner_of(self, param_name: str) -> LayerInfo | None:
        """The layer that owns the parameter (tied aliases resolve to the owner), or ``None``."""
        for l in self.layers:
            if any(n == param_name for _, n in l.params):
                return l
        return None

    def __str__(self) -> str:
        head = ("layer", "kind", "fan_in", "fan_out", "l", "input σ", "σ after", "residual")
        rows = [head]
        for l in self.layers:
            res = "" if l.residual is None else (
                f"{l.residual.role}#{l.residual.block} γ={_fmt(l.residual.gamma)}"
                + (" out" if l.residual.is_branch_output else ""))
            rows.append((l.name + (" (readout)" if l.is_readout else ""), l.kind, str(l.fan_in),
                         str(l.fan_out), "" if l.depth is None else str(l.depth),
                         _act_name(l.input_activation), _act_name(l.activation), res))
        out = [f"ModelPlan(method={self.method!r}, L={self.depth}, {len(self.layers)} layers, "
               f"{len(self.residual_blocks)} residual blocks)", _table(rows)]
        for u in self.unplaced:
            out.append(f"  unplaced {u.name}: {u.reason}")
        out.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(out)


def _fmt(x: float | None) -> str:
    return "?" if x is None else f"{x:.4g}"


def _act_name(act: Any | None) -> str:
    if act is None:
        return "-"
    return str(getattr(act, "name", act))


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Helpers shared with init/optim
# --------------------------------------------------------------------------------------------
def unwrap_model(model: nn.Module) -> nn.Module:
    """The module that holds the parameters: unwraps ``torch.compile`` and (Distributed)DataParallel.

    Args:
        model: any ``nn.Module``; ``OptimizedModule`` (``_orig_mod``), ``DataParallel`` and
            ``DistributedDataParallel`` (``.module``) are unwrapped, repeatedly.

    Returns:
        The innermost wrapped module (the model itself if it is not a wrapper).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}; pass the model itself")
    seen = 0
    while seen < 16:
        seen += 1
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule":
            model = inner
            continue
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
            continue
        break
    return model


def _identity_activation() -> Any:
    from torch_crit.theory import get_activation

    return get_activation("linear")


def criticality_activation(layer: LayerInfo, plan: ModelPlan) -> Any:
    r"""The activation whose critical :math:`(C_b, C_W)` and learning-rate class govern ``layer``.

    Convention (the book's (2.5), (5.1), THEORY.md §1.2 and §11): the weights of layer
    :math:`\ell+1` multiply :math:`\sigma(z^{(\ell)})`, so a layer is governed by the activation
    that *feeds* it; the readout therefore uses the last hidden activation. The first layer sees
    the raw input, and the book gives it the same :math:`(C_b, C_W)` as every other layer, so a
    layer with no activation in front of it is governed by the activation that *follows* it.
    Attention projections are governed by the identity (no activation). A layer with neither
    uses the plan's ``default_activation`` (the ``activation`` argument) or the identity.

    Args:
        layer: a layer of ``plan``.
        plan: the plan from :func:`analyse`.

    Returns:
        A theory ``Activation``.
    """
    if layer.kind == "attention":
        return _identity_activation()
    if layer.input_activation is not None:
        return layer.input_activation
    if layer.activation is not None:
        return layer.activation
    if plan.default_activation is not None:
        return plan.default_activation
    return _identity_activation()


# --------------------------------------------------------------------------------------------
# Activation references (resolved lazily through torch_crit.theory.get_activation)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Act:
    """An activation as seen in the model: ``key`` decides equality, ``obj`` is resolved."""

    key: str
    obj: Any = field(compare=False, hash=False)
    opaque: bool = False  # an unidentified operation (needs mapping/activation)


_ACT_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU,
    nn.Softplus, nn.Mish, nn.Hardtanh, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid,
    nn.Softsign, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.Threshold, nn.RReLU,
)


def _arg(node: fx.Node, idx: int, name: str, default: Any) -> Any:
    if len(node.args) > idx:
        return node.args[idx]
    return node.kwargs.get(name, default)


def _module_act(m: nn.Module) -> _Act:
    return _Act(key=repr(m), obj=m)


_SHAPE_METHODS = {"size", "dim", "numel", "__len__", "nelement", "ndimension", "stride",
                  # new tensors shaped like the input, and comparisons (masks): no data flows through them
                  "new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "eq", "ne", "gt", "ge", "lt", "le",
                  "__eq__", "__ne__", "__gt__", "__ge__", "__lt__", "__le__", "logical_not", "isnan", "isinf",
                  "bool", "long", "int", "argmax", "argmin", "argsort"}
_NO_DATA_FUNCS = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like,
                  torch.randn_like, torch.randint_like, torch.eq, torch.ne, torch.gt, torch.ge, torch.lt, torch.le,
                  torch.argmax, torch.argmin, torch.argsort, torch.isnan, torch.isinf, torch.logical_not,
                  operator.eq, operator.ne, operator.gt, operator.ge, operator.lt, operator.le}
_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device"}
_GATES = {"sigmoid", "hardsigmoid"}


def _call_activation(n: fx.Node) -> _Act | None:
    """The activation an fx call node applies (the one coercion, ``activation_from_call``), or None."""
    from torch_crit.theory.activations import activation_from_call

    if n.op == "call_function":
        func = n.target
    elif n.op == "call_method":
        func = getattr(torch.Tensor, str(n.target), None)
    else:
        return None
    if func is None:
        return None
    try:
        act = activation_from_call(func, n.args, n.kwargs)
    except (TypeError, ValueError):  # parameters computed at run time (an fx.Node): not one σ
        return None
    return None if act is None else _Act(key=f"activation:{act.key}", obj=act)


def _gated_product(ana: "_Analysis", sides: list[frozenset[_Tag]]) -> frozenset[_Tag]:
    r"""Tags of ``a * b`` for two data tensors.

    [choice, not in the book] A side whose every path ends in a gate — sigmoid or hard-sigmoid
    (squeeze-excite, GLU-style gates) or an unidentified op of the same stream (the
    :math:`1/\sqrt{\langle x^2\rangle}` of RMS normalisation) — is a data-dependent scale: the
    product keeps the other side's activation. Two ungated sides (SwiGLU's ``silu(a) * b``) keep
    both, and a layer they feed asks for ``mapping=``.
    """
    def gating(a: _Act | None) -> bool:
        if a is None:
            return False
        if a.opaque:
            return True
        try:
            return _act_name(_resolve(a, ana.cache)) in _GATES
        except (TypeError, ValueError):
            return False

    gate = [bool(side) and all(gating(t.act) for t in side) for side in sides]
    if gate[0] and not gate[1]:
        return sides[1]
    if gate[1] and not gate[0]:
        return sides[0]
    return sides[0] | sides[1]


def _user_act(value: Any) -> _Act | None:
    """A mapping/``activation`` value as an _Act (``None`` = identity)."""
    if value is None:
        return None
    if isinstance(value, str):
        return _Act(key=f"name:{value.lower()}", obj=value)
    if isinstance(value, nn.Module):
        return _Act(key=f"user-module:{type(value).__qualname__}:{value!r}", obj=value)
    name = getattr(value, "name", None)
    if isinstance(name, str) and hasattr(value, "__call__") and not callable(getattr(value, "forward", None)):
        return _Act(key=f"activation:{name}:{id(value)}", obj=value)
    return _Act(key=f"user-callable:{id(value)}", obj=value)


# --------------------------------------------------------------------------------------------
# Module classification
# --------------------------------------------------------------------------------------------
_NORM_TYPES: tuple[type, ...] = tuple(t for t in (
    nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, getattr(nn, "RMSNorm", None),
    nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
) if t is not None)
_CONV_TYPES = (nn.modules.conv._ConvNd,)
_EMB_TYPES = (nn.Embedding, nn.EmbeddingBag)
_NONELEMENTWISE_ACT_MODULES = (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d, nn.GLU,
                               nn.MultiheadAttention, nn.PReLU)


def _kind(m: nn.Module) -> LayerKind | None:
    if isinstance(m, nn.MultiheadAttention):
        return "attention"
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, _CONV_TYPES):
        return "conv"
    if isinstance(m, _EMB_TYPES):
        return "embedding"
    if isinstance(m, _NORM_TYPES):
        return "norm"
    return None


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _is_activation_module(m: nn.Module) -> bool:
    return isinstance(m, _ACT_MODULES)


def _check_materialised(p: torch.Tensor, pname: str) -> None:
    if isinstance(p, nn.parameter.UninitializedParameter):
        raise ValueError(
            f"parameter {pname!r} is an UninitializedParameter (a Lazy module); its shape is unknown. "
            "Run one forward pass (or torch.nn.modules.lazy's initialize) before analysing the model.")


def _module_fans(m: nn.Module, kind: LayerKind, name: str) -> tuple[int, int]:
    for pn, p in m.named_parameters(recurse=True):
        _check_materialised(p, f"{name}.{pn}" if name else pn)
    if kind == "linear":
        return int(m.in_features), int(m.out_features)
    if kind == "conv":
        k = math.prod(int(s) for s in m.kernel_size)
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            per = math.prod(max(1.0, int(k_) / int(s_)) for k_, s_ in zip(m.kernel_size, m.stride))
            return max(1, int(round(m.in_channels // m.groups * per))), int(m.out_channels)
        return int(m.in_channels // m.groups * k), int(m.out_channels)
    if kind == "embedding":
        return 1, int(m.embedding_dim)
    if kind == "attention":
        return int(m.embed_dim), int(m.embed_dim)
    if kind == "norm":
        w = getattr(m, "weight", None)
        n = int(w.numel()) if isinstance(w, torch.Tensor) else int(getattr(m, "num_features", 0) or 0)
        return n, n
    raise AssertionError(kind)  # pragma: no cover - internal invariant


def _module_params(m: nn.Module, name: str) -> tuple[tuple[str, str], ...]:
    out = []
    for pn, p in m.named_parameters(recurse=True):
        if p is None:
            continue
        out.append((pn, f"{name}.{pn}" if name else pn))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Tracer
# --------------------------------------------------------------------------------------------
class _Tracer(fx.Tracer):
    def __init__(self, mapped: set[str]) -> None:
        super().__init__()
        self._mapped = mapped

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:  # noqa: D401
        if qualname in self._mapped and not _has_params(m):
            return True
        if _kind(m) is not None or _is_activation_module(m):
            return True
        if isinstance(m, nn.Sequential) or isinstance(m, (nn.ModuleList, nn.ModuleDict)):
            return False
        if not _has_params(m) and not any(True for _ in m.children()):
            return True  # parameter-free custom/torch leaf: activation candidate or shape op
        if super().is_leaf_module(m, qualname):
            # a torch.nn module with parameters we do not support (RNN, Bilinear, PReLU, ...)
            # or a torch.nn container (TransformerEncoderLayer): trace into containers.
            return not any(True for _ in m.children())
        return False


@dataclass(frozen=True)
class _Tag:
    origin: str  # producing layer name, or "<input>"
    act: _Act | None


_PASS_FUNCS = {
    operator.getitem, torch.flatten, torch.reshape, torch.cat, torch.concat, torch.stack,
    torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze, torch.chunk, torch.split,
    torch.mean, torch.sum, torch.narrow, torch.select, torch.flip, torch.roll, torch.clone,
    torch.detach, torch.movedim, torch.swapaxes, torch.unbind, torch.t,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.pad, F.interpolate, F.pixel_shuffle,
    F.pixel_unshuffle, F.layer_norm, F.group_norm, F.batch_norm, F.instance_norm, F.normalize,
    F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, torch.matmul, torch.bmm,
    torch.einsum, F.scaled_dot_product_attention, torch.where, torch.masked_fill, getattr,
    torch.nn.functional.embedding,
}
_PASS_METHODS = {
    "view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
    "expand", "expand_as", "repeat", "chunk", "split", "size", "dim", "to", "float", "double",
    "half", "bfloat16", "type", "type_as", "clone", "detach", "mean", "sum", "t", "unbind",
    "masked_fill", "masked_fill_", "narrow", "select", "view_as", "reshape_as", "flip", "roll",
    "softmax", "log_softmax", "matmul", "bmm", "__getitem__", "movedim", "swapaxes", "unflatten",
    "split_with_sizes", "cpu", "cuda", "numel", "__len__",
}
_ADD_FUNCS = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub}
_ADD_METHODS = {"add", "add_", "sub", "sub_"}
_MUL_FUNCS = {operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div,
              operator.neg, torch.neg}
_MUL_METHODS = {"mul", "mul_", "div", "div_", "neg", "neg_"}
_LINEAR_FUNCS = {F.linear: "linear", F.conv1d: "conv", F.conv2d: "conv", F.conv3d: "conv"}


def _is_sub(n: fx.Node) -> bool:
    return n.target in (operator.sub, operator.isub, torch.sub) or n.target in ("sub", "sub_")


def _is_div(n: fx.Node) -> bool:
    return n.target in (operator.truediv, operator.itruediv, torch.div) or n.target in ("div", "div_")


class _Analysis:
    """One pass over an fx graph (or a module sequence) collecting layers and flows."""

    def __init__(self, root: nn.Module, mapping: Mapping[str, Any], default: _Act | None) -> None:
        self.root = root
        self.mapping = dict(mapping)
        self.default = default
        self.param_names: dict[int, list[str]] = {}
        for n, p in root.named_parameters(remove_duplicate=False):
            self.param_names.setdefault(id(p), []).append(n)
        self.module_names: dict[int, str] = {}
        for n, m in root.named_modules(remove_duplicate=False):
            self.module_names.setdefault(id(m), n)
        # collected
        self.layers: dict[str, dict[str, Any]] = {}  # name -> record (insertion = forward order)
        self.following: dict[str, list[_Act]] = {}
        self.used_params: dict[int, str] = {}  # id(param) -> owning layer name
        self.unplaced: list[UnplacedParameter] = []
        self.notes: list[str] = []
        self.blocks: list[dict[str, Any]] = []
        self.cache: dict[str, Any] = {}

    # ---- layers -----------------------------------------------------------------------------
    def add_layer(self, name: str, module: nn.Module | None, kind: LayerKind, fan_in: int, fan_out: int,
                  params: Sequence[tuple[str, str]], tensors: Sequence[torch.Tensor], in_tags: frozenset[_Tag],
                  chain: int, notes: Sequence[str] = ()) -> None:
        if name in self.layers:  # module called twice (weight sharing across positions)
            rec = self.layers[name]
            rec["in_tags"] = rec["in_tags"] | in_tags
            rec["calls"] += 1
            rec["chain"] = max(rec["chain"], chain)
            return
        tied, own = [], []
        for (role, pname), t in zip(params, tensors):
            owner = self.used_params.get(id(t))
            if owner is not None and owner != name:
                tied.append(pname)
            else:
                self.used_params[id(t)] = name
            own.append((role, pname))
        if tied:
            notes = tuple(notes) + tuple(
                f"{p} is shared with layer {self.used_params[id(t)]!r}" for (r, p), t in zip(params, tensors)
                if p in tied)
        self.layers[name] = dict(name=name, module_type=type(module).__name__ if module is not None else "functional",
                                 kind=kind, fan_in=fan_in, fan_out=fan_out, params=tuple(own), tied=tuple(tied),
                                 in_tags=in_tags, chain=chain, calls=1, notes=list(notes), consumers=False)

    # ---- activations -------------------------------------------------------------------------
    def apply_act(self, tags: frozenset[_Tag], act: _Act) -> frozenset[_Tag]:
        out = set()
        for t in tags:
            if t.act is None:
                if t.origin != "<input>":
                    self.following.setdefault(t.origin, [])
                    if act not in self.following[t.origin]:
                        self.following[t.origin].append(act)
                out.add(_Tag(t.origin, act))
            else:  # composition of two activations: σ = act ∘ t.act, itself elementwise
                out.add(_Tag(t.origin, _compose(t.act, act)))
        return frozenset(out)


_IDEMPOTENT = {"ReLU()", "ReLU(inplace=True)", "ReLU6()", "Hardtanh(min_val=-1.0, max_val=1.0)"}


class _Composed(nn.Module):
    """σ = outer(inner(z)), a parameter-free elementwise module (two activations in a row)."""

    def __init__(self, inner: Any, outer: Any) -> None:
        super().__init__()
        self.inner, self.outer = inner, outer

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.outer(self.inner(z))

    def extra_repr(self) -> str:
        return f"{self.inner!r} then {self.outer!r}"


def _compose(inner: _Act, outer: _Act) -> _Act:
    if inner.opaque or outer.opaque:
        return _Act(key=f"{inner.key} then {outer.key}", obj=f"{inner.obj} then {outer.obj}", opaque=True)
    if inner.key == outer.key and inner.key in _IDEMPOTENT:
        return inner
    if isinstance(inner.obj, str) or isinstance(outer.obj, str):
        return _Act(key=f"{inner.key} then {outer.key}", obj=f"{inner.obj} then {outer.obj}", opaque=True)
    return _Act(key=f"composed:{inner.key} then {outer.key}", obj=_Composed(inner.obj, outer.obj))


def _scalar_value(root: nn.Module, a: Any) -> tuple[float | None, bool]:
    """(value, is_scalar) of an fx argument that may be a constant scale."""
    if isinstance(a, bool):
        return None, False
    if isinstance(a, (int, float)):
        return float(a), True
    if isinstance(a, fx.Node) and a.op == "get_attr":
        try:
            v = _get_attr(root, a.target)
        except AttributeError:
            return None, False
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            if v.is_meta:
                return None, True
            return float(v.detach().reshape(())), True
    return None, False


def _get_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _trace(root: nn.Module, mapped: set[str]) -> fx.Graph:
    tracer = _Tracer(mapped)
    return tracer.trace(root)


def _fx_analysis(root: nn.Module, graph: fx.Graph, ana: _Analysis) -> None:
    flows: dict[fx.Node, frozenset[_Tag]] = {}
    chain: dict[fx.Node, int] = {}
    layer_of: dict[fx.Node, str] = {}  # node -> affine layer name if node is an affine layer call
    anc_layers: dict[fx.Node, frozenset[str]] = {}
    # scale tracking: node -> (base node, scale) for scalar multiples
    scaled: dict[fx.Node, tuple[fx.Node, float | None]] = {}
    nodes = list(graph.nodes)

    def data_inputs(n: fx.Node) -> list[fx.Node]:
        return [a for a in n.all_input_nodes if a in flows and flows[a]]

    def union(ns: Iterable[fx.Node]) -> frozenset[_Tag]:
        out: frozenset[_Tag] = frozenset()
        for a in ns:
            out = out | flows.get(a, frozenset())
        return out

    param_ids = set(ana.param_names)
    param_used_in: dict[int, str] = {}

    for n in nodes:
        ins = data_inputs(n)
        chain[n] = max((chain.get(a, 0) for a in n.all_input_nodes), default=0)
        anc = frozenset().union(*(anc_layers.get(a, frozenset()) for a in n.all_input_nodes)) \
            if n.all_input_nodes else frozenset()
        anc_layers[n] = anc
        if n.op == "placeholder":
            flows[n] = frozenset({_Tag("<input>", None)})
            continue
        if n.op == "get_attr":
            flows[n] = frozenset()
            continue
        if n.op == "output":
            for a in ins:
                for t in flows[a]:
                    if t.origin in ana.layers:
                        ana.layers[t.origin]["reaches_output"] = True
            flows[n] = union(ins)
            continue
        if n.op == "call_module":
            m = root.get_submodule(n.target)
            name = str(n.target)
            kind = _kind(m)
            if name in ana.mapping and not _has_params(m):
                act = _user_act(ana.mapping[name])
                flows[n] = union(ins) if act is None else ana.apply_act(union(ins), act)
                continue
            if kind is not None:
                fi, fo = _module_fans(m, kind, name)
                params = _module_params(m, name)
                tensors = [p for _, p in m.named_parameters(recurse=True)]
                in_tags = union(ins) if kind == "attention" else union(ins[:1])
                if kind in AFFINE_KINDS:
                    chain[n] += 1
                    layer_of[n] = name
                    anc_layers[n] = anc | {name}
                ana.add_layer(name, m, kind, fi, fo, params, tensors, in_tags, chain[n])
                if "input_ms" in n.meta:
                    ana.layers[name].setdefault("input_ms", n.meta["input_ms"])
                if kind == "norm":
                    flows[n] = union(ins[:1])
                else:
                    flows[n] = frozenset({_Tag(name, None)})
                continue
            if _is_activation_module(m):
                flows[n] = ana.apply_act(union(ins), _module_act(m))
                continue
            if _has_params(m):
                for pn, p in m.named_parameters():
                    ana.unplaced.append(UnplacedParameter(
                        f"{name}.{pn}", name, f"{type(m).__name__} is not a supported layer type "
                        "(supported: Linear, Conv*, Embedding*, norms, MultiheadAttention)"))
                    ana.used_params[id(p)] = "<unplaced>"
                flows[n] = frozenset({_Tag(f"<opaque:{name}>", None)})
                continue
            if m.__module__.startswith("torch.nn") and not isinstance(m, _NONELEMENTWISE_ACT_MODULES):
                flows[n] = union(ins)  # dropout, identity, flatten, pooling, upsample ...
                continue
            if isinstance(m, _NONELEMENTWISE_ACT_MODULES):
                flows[n] = union(ins)
                continue
            # parameter-free custom leaf: a user activation
            flows[n] = ana.apply_act(union(ins), _Act(
                key=f"user-module:{type(m).__module__}.{type(m).__qualname__}:{m!r}", obj=m))
            continue
        # call_function / call_method
        tgt = n.target
        if n.op == "call_function" and tgt in _LINEAR_FUNCS and len(n.args) >= 2 and isinstance(n.args[1], fx.Node) \
                and n.args[1].op == "get_attr":
            w = _get_attr(root, n.args[1].target)
            b_node = _arg(n, 2, "bias", None)
            owner = n.args[1].target.rsplit(".", 1)[0] if "." in n.args[1].target else ""
            kind = _LINEAR_FUNCS[tgt]
            params = [("weight", n.args[1].target)]
            tensors = [w]
            if isinstance(b_node, fx.Node) and b_node.op == "get_attr":
                params.append(("bias", b_node.target))
                tensors.append(_get_attr(root, b_node.target))
            _check_materialised(w, n.args[1].target)
            fi = int(w.shape[1]) * (math.prod(int(s) for s in w.shape[2:]) if kind == "conv" else 1)
            lname = owner or n.args[1].target
            x_in = n.args[0] if isinstance(n.args[0], fx.Node) else None
            chain[n] += 1
            layer_of[n] = lname
            anc_layers[n] = anc | {lname}
            ana.add_layer(lname, _get_attr(root, owner) if owner else None, kind, fi, int(w.shape[0]),
                          params, tensors, flows.get(x_in, frozenset()) if x_in is not None else frozenset(),
                          chain[n], notes=(f"read from {getattr(tgt, '__name__', tgt)} on the module's own parameters",))
            flows[n] = frozenset({_Tag(lname, None)})
            continue
        # parameters used directly by an operation we do not model
        for a in n.all_input_nodes:
            if a.op == "get_attr":
                v = _get_attr(root, a.target)
                if isinstance(v, nn.Parameter) and id(v) in param_ids and id(v) not in ana.used_params:
                    is_scale = (tgt in _MUL_FUNCS or tgt in _MUL_METHODS or tgt in _ADD_FUNCS or tgt in _ADD_METHODS) \
                        and v.numel() == 1
                    param_used_in.setdefault(id(v), (
                        "scalar parameter used as a scale" if is_scale else
                        f"used directly by {getattr(tgt, '__name__', tgt)!s} in forward (not a supported layer)"))
        call_act = _call_activation(n)
        if call_act is not None:
            src = [n.args[0]] if n.args and isinstance(n.args[0], fx.Node) else ins
            flows[n] = ana.apply_act(union(src), call_act)
            continue
        if n.op == "call_method" and tgt in _SHAPE_METHODS or (n.op == "call_function" and tgt in _NO_DATA_FUNCS) or (
                n.op == "call_function" and tgt is getattr and len(n.args) > 1 and n.args[1] in _SHAPE_ATTRS):
            flows[n] = frozenset()  # shapes and sizes are not data: x.shape[1] // p is no activation
            continue
        if (n.op == "call_function" and tgt in _MUL_FUNCS) or (n.op == "call_method" and tgt in _MUL_METHODS):
            tensor_args = [a for a in n.args if isinstance(a, fx.Node) and flows.get(a)]
            if len(tensor_args) == 1:
                base = tensor_args[0]
                others = [a for a in n.args if a is not base]
                if n.target in (operator.neg, torch.neg, "neg", "neg_"):
                    val, ok = -1.0, True
                elif len(others) == 1:
                    val, ok = _scalar_value(root, others[0])
                    if ok and val is not None and _is_div(n):
                        val = (1.0 / val) if val != 0 else None
                    if _is_div(n) and others[0] is n.args[0]:
                        ok = False  # c / x is not a scale
                else:
                    val, ok = None, False
                flows[n] = flows[base]
                if ok:
                    b0, s0 = scaled.get(base, (base, 1.0))
                    scaled[n] = (b0, None if (s0 is None or val is None) else s0 * val)
                continue
            flows[n] = _gated_product(ana, [flows[a] for a in tensor_args]) if len(tensor_args) == 2 else union(ins)
            continue
        if (n.op == "call_function" and tgt in _ADD_FUNCS) or (n.op == "call_method" and tgt in _ADD_METHODS):
            tensor_args = [a for a in n.args if isinstance(a, fx.Node) and flows.get(a)]
            flows[n] = union(tensor_args)
            if len(tensor_args) == 2:
                alpha = n.kwargs.get("alpha", 1.0)
                _join(ana, n, tensor_args, scaled, anc_layers, layer_of, alpha, _is_sub(n))
            continue
        if (n.op == "call_function" and tgt in _PASS_FUNCS) or (n.op == "call_method" and tgt in _PASS_METHODS):
            flows[n] = union(ins)
            continue
        if not ins:
            flows[n] = frozenset()
            continue
        # unknown operation on data: opaque (an activation we cannot identify)
        label = getattr(tgt, "__qualname__", None) or getattr(tgt, "__name__", None) or str(tgt)
        flows[n] = ana.apply_act(union(ins), _Act(key=f"opaque:{label}", obj=label, opaque=True))

    for pid, reason in param_used_in.items():
        if pid not in ana.used_params:
            for pname in ana.param_names[pid][:1]:
                ana.unplaced.append(UnplacedParameter(pname, pname.rsplit(".", 1)[0] if "." in pname else "", reason))
            ana.used_params[pid] = "<unplaced>"
    # readout: affine layers without affine descendants
    has_affine_desc: dict[fx.Node, bool] = {}
    for n in reversed(nodes):
        has_affine_desc[n] = any((u in layer_of) or has_affine_desc.get(u, False) for u in n.users)
    for n, lname in layer_of.items():
        if not has_affine_desc[n]:
            ana.layers[lname]["readout"] = True


def _join(ana: _Analysis, n: fx.Node, args: list[fx.Node], scaled: dict, anc_layers: dict, layer_of: dict,
          alpha: Any, is_sub: bool) -> None:
    """Detect a residual sum at add node ``n``."""
    sides = []
    for i, a in enumerate(args):
        base, s = scaled.get(a, (a, 1.0))
        if i == 1:
            if isinstance(alpha, (int, float)):
                s = None if s is None else s * float(alpha)
            else:
                s = None
            if is_sub:
                s = None if s is None else -s
        lay = set(anc_layers.get(a, frozenset()))
        if a in layer_of:
            lay.add(layer_of[a])
        sides.append((a, base, s, frozenset(lay)))
    (a0, b0, s0, l0), (a1, b1, s1, l1) = sides
    d0, d1 = l0 - l1, l1 - l0
    if not d0 and not d1:
        return
    if not d0:  # side 0 is the identity skip
        skip, branch, skip_layers, branch_layers, kind = sides[0], sides[1], frozenset(), d1, "identity"
    elif not d1:
        skip, branch, skip_layers, branch_layers, kind = sides[1], sides[0], frozenset(), d0, "identity"
    else:
        c0 = max(ana.layers[x]["chain"] for x in d0)
        c1 = max(ana.layers[x]["chain"] for x in d1)
        if c0 == c1 and len(d0) == len(d1):
            return  # two parallel paths of equal depth: a sum, not a residual connection
        if (c0, len(d0)) < (c1, len(d1)):
            skip, branch, skip_layers, branch_layers, kind = sides[0], sides[1], d0, d1, "projection"
        else:
            skip, branch, skip_layers, branch_layers, kind = sides[1], sides[0], d1, d0, "projection"
    gamma = None if skip[2] is None else abs(skip[2])
    xi = None if branch[2] is None else abs(branch[2])
    # branch outputs: branch layers that reach the sum without passing another branch layer
    out_layers = set()
    stack = [branch[0]]
    seen = set()
    while stack:
        x = stack.pop()
        if x in seen:
            continue
        seen.add(x)
        if x in layer_of and layer_of[x] in branch_layers:
            out_layers.add(layer_of[x])
            continue
        for a in x.all_input_nodes:
            if anc_layers.get(a, frozenset()) & branch_layers or (a in layer_of and layer_of[a] in branch_layers):
                stack.append(a)
    order = list(ana.layers)
    ana.blocks.append(dict(
        join=n.name, gamma=gamma, xi=xi, skip=kind,
        branch=tuple(sorted(branch_layers, key=order.index)),
        output=tuple(sorted(out_layers, key=order.index)),
        shortcut=tuple(sorted(skip_layers, key=order.index)),
        notes=tuple(x for x in (
            None if skip[2] is not None else "skip scale is not a constant",
            None if branch[2] is not None else "branch scale is not a constant") if x)))


def _resolve(act: _Act | None, cache: dict[str, Any]) -> Any | None:
    if act is None:
        return None
    if act.key not in cache:
        from torch_crit.theory import get_activation

        cache[act.key] = get_activation(act.obj)
    return cache[act.key]


def analyse(model: nn.Module, activation: Any | None = None, *, mapping: Mapping[str, Any] | None = None,
            example_inputs: Any | None = None) -> ModelPlan:
    r"""Find the parameterised layers of ``model`` in forward order (see the module docstring).

    Args:
        model: any ``nn.Module`` (``torch.compile``'d and (Distributed)DataParallel models are
            unwrapped). Not modified.
        activation: the network's activation (name, ``nn.Module``, callable or theory
            ``Activation``), used where the model applies an operation the analysis cannot
            identify and for layers with no activation on either side. Activations the analysis
            does identify are kept; use ``mapping`` to override them.
        mapping: ``{module_name: activation}`` overrides. For a parameterised layer the value is
            the activation *feeding* it (its weights multiply σ of its input); for a
            parameter-free module, the activation it computes. ``None`` = identity.
        example_inputs: a tensor or tuple of positional inputs. Given, the analysis records one
            forward pass on them (exact about what runs); otherwise fx is tried first and inputs
            are inferred from the first layer when fx fails or leaves a gap.

    Returns:
        The :class:`ModelPlan`.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        KeyError: a ``mapping`` key names no module of the model.
        AmbiguousActivationError: two different activations feed one layer (the message names
            the layer and the activations; fix with ``mapping={layer: activation}``).
        ActivationNotFoundError: an operation in front of a layer is not a known activation and
            neither ``mapping`` nor ``activation`` says what it is.
        ValueError: lazy (uninitialised) parameters.
        ModelAnalysisError: a model that cannot run on the inferred or
            given inputs; inputs that cannot be inferred (each message says what to pass).
    """
    root = unwrap_model(model)
    mapping = dict(mapping or {})
    module_names = {n for n, _ in root.named_modules()}
    bad = sorted(k for k in mapping if k not in module_names)
    if bad:
        raise KeyError(f"mapping keys {bad} name no module of the model; module names are "
                       f"{sorted(n for n in module_names if n)[:40]} (use model.named_modules() paths)")
    for pname, p in root.named_parameters():
        _check_materialised(p, pname)
    default = _user_act(activation)
    mapped_leaves = {k for k in mapping if not _has_params(root.get_submodule(k))}
    fx_error: Exception | None = None
    if example_inputs is None:
        try:
            graph = _trace(root, mapped_leaves)
            ana = _Analysis(root, mapping, default)
            _fx_analysis(root, graph, ana)
            plan = _build_plan(root, ana, "fx")
            if not any(l.fed_by is not None and l.kind in AFFINE_KINDS for l in plan.layers):
                return plan
            fx_error = None  # a layer reads an unsupported module's output: measure it on a real pass
        except (ActivationNotFoundError, AmbiguousActivationError) as exc:
            fx_error = exc  # a gap in what fx sees: record the real forward pass instead
        except Exception as exc:  # noqa: BLE001 - tracing failed: record the real forward pass
            if isinstance(exc, (KeyError, ModelAnalysisError)):
                raise
            fx_error = exc
        candidates = infer_example_inputs(root)
        if candidates is None:
            if isinstance(fx_error, ModelAnalysisError):
                raise fx_error
            raise ModelAnalysisError(
                f"torch.fx could not analyse {type(root).__name__} ({type(fx_error).__name__}: "
                f"{str(fx_error).splitlines()[0][:200] if str(fx_error) else ''}) and its inputs cannot be inferred "
                "(no Linear/Conv/Embedding/RNN/attention layer to read them from). Fix: pass example_inputs=<a small "
                "batch the model accepts> so one forward pass can be recorded.") from fx_error
    else:
        candidates = [example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)]
    graph = None
    last: Exception | None = None
    for inputs in candidates:
        try:
            graph = record_forward(root, inputs, lambda m, name: _execution_leaf(m, name, mapped_leaves))
            break
        except ModelAnalysisError as exc:
            last = exc
    if graph is None:
        assert last is not None
        raise last
    ana = _Analysis(root, mapping, default)
    ana.notes.append("analysed by recording one forward pass" + (
        f" (torch.fx: {type(fx_error).__name__})" if fx_error is not None else "") + (
        " on inferred inputs " + str([tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor)])
        if example_inputs is None else ""))
    _fx_analysis(root, graph, ana)
    return _build_plan(root, ana, "execution")


def _execution_leaf(m: nn.Module, name: str, mapped: set[str]) -> bool | None:
    """Leaf rule of the execution recorder: as fx's, but a parameter-free custom module is decided
    by the elementwise test on its real input (``None``)."""
    if name in mapped and not _has_params(m):
        return True
    if _kind(m) is not None or _is_activation_module(m):
        return True
    if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return False
    if not any(True for _ in m.children()):
        if m.__module__.startswith("torch.nn"):
            return True  # dropout, pooling, flatten, softmax, RNN, PReLU ...
        if not _has_params(m):
            return None
        return True  # a custom module with its own parameters and no submodules: unsupported leaf
    return False


def _build_plan(root: nn.Module, ana: _Analysis, method: Literal["fx", "execution"]) -> ModelPlan:
    cache: dict[str, Any] = {}
    default = _resolve(ana.default, cache)
    names = list(ana.layers)
    # residual membership (innermost = first block that contains the layer)
    res: dict[str, ResidualInfo] = {}
    blocks = []
    for i, b in enumerate(ana.blocks):
        blocks.append(ResidualBlock(index=i, join=b["join"], gamma=b["gamma"], xi=b["xi"], skip=b["skip"],
                                    branch_layers=b["branch"], output_layers=b["output"],
                                    shortcut_layers=b["shortcut"], notes=b["notes"]))
        for lname in b["branch"]:
            res.setdefault(lname, ResidualInfo(i, "branch", b["gamma"], b["xi"], lname in b["output"]))
        for lname in b["shortcut"]:
            res.setdefault(lname, ResidualInfo(i, "shortcut", b["gamma"], b["xi"], False))
    layers: list[LayerInfo] = []
    position = 0
    for name in names:
        rec = ana.layers[name]
        notes = list(rec["notes"])
        kind = rec["kind"]
        # following activation
        foll = [a for a in ana.following.get(name, []) if not a.opaque]
        following = None
        if len({a.key for a in foll}) == 1:
            following = _resolve(foll[0], cache)
        elif len(foll) > 1:
            notes.append(f"output feeds several activations ({', '.join(a.key for a in foll)})")
        # input activation
        if name in ana.mapping:
            in_act = _resolve(_user_act(ana.mapping[name]), cache)
            notes.append("input activation from mapping")
        elif kind in ("embedding", "norm", "attention"):
            in_act = None
        else:
            acts = {t.act for t in rec["in_tags"]}
            opaque = [a for a in acts if a is not None and a.opaque]
            if opaque:
                if default is None:
                    raise ActivationNotFoundError(
                        f"layer {name!r} is fed by {opaque[0].key.split(':', 1)[-1]!r}, which torch_crit cannot "
                        "identify as an activation. Fix: pass mapping={" + repr(name) + ": <activation>} (the σ "
                        "its weights multiply; None for the identity), wrap the function in a parameter-free "
                        "nn.Module, or pass activation= for the whole network.")
                acts = {a for a in acts if not (a is not None and a.opaque)} | {ana.default}
                notes.append(f"input op {opaque[0].key!r} not identified; using activation= ({_act_name(default)})")
            resolved: dict[Any, str] = {}
            for a in acts:  # compare the functions, not their spelling (ReLU(inplace=True) == F.relu)
                resolved.setdefault(_resolve(a, cache), "identity (no activation)" if a is None else a.key)
            if len(resolved) > 1:
                shown = sorted(resolved.values())
                raise AmbiguousActivationError(
                    f"layer {name!r} is fed by {len(resolved)} different activations: {shown}. torch_crit needs "
                    "one σ per layer (its weights multiply σ(z), eq. (2.5)). Fix: pass mapping={"
                    + repr(name) + ": <activation>} saying which σ to use for it (None for the identity).")
            in_act = next(iter(resolved)) if resolved else None
        fed_by = next((t.origin[len("<opaque:"):-1] for t in rec["in_tags"] if t.origin.startswith("<opaque:")), None)
        if fed_by is not None:
            notes.append(f"fed by {fed_by!r}, a module torch_crit does not initialise")
        depth = rec["chain"] if kind in AFFINE_KINDS else None
        position = rec["chain"]
        if rec["calls"] > 1:
            notes.append(f"module called {rec['calls']} times in forward (shared weights)")
        layers.append(LayerInfo(
            name=name, module_type=rec["module_type"], kind=kind, fan_in=rec["fan_in"], fan_out=rec["fan_out"],
            activation=following, input_activation=in_act, depth=depth, position=position,
            is_readout=bool(rec.get("readout", False)) and kind in AFFINE_KINDS, residual=res.get(name),
            params=rec["params"], tied=rec["tied"], notes=tuple(notes), fed_by=fed_by,
            input_second_moment=rec.get("input_ms")))
    if default is not None:
        _check_default(layers, default)
    # parameters nobody placed
    unplaced = list(ana.unplaced)
    for pname, p in root.named_parameters():
        if id(p) not in ana.used_params:
            owner = pname.rsplit(".", 1)[0] if "." in pname else ""
            unplaced.append(UnplacedParameter(pname, owner, "not used by any supported layer in forward"))
    depth = max((l.depth for l in layers if l.depth is not None), default=0)
    return ModelPlan(layers=tuple(layers), depth=depth, residual_blocks=tuple(blocks), unplaced=tuple(unplaced),
                     method=method, default_activation=default, notes=tuple(ana.notes))


def _same_activation(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - foreign objects compare unequal
        return a is b


def _check_default(layers: Sequence[LayerInfo], default: Any) -> None:
    for l in layers:
        act = l.input_activation
        if act is not None and "input activation from mapping" not in l.notes and not _same_activation(act, default) \
                and not any(n.startswith("input op") for n in l.notes):
            raise ValueError(
                f"activation={_act_name(default)!r} was given, but layer {l.name!r} is fed by "
                f"{_act_name(act)!r} in the model's forward. Fix: drop activation= (the model's own activations "
                "are used) or override that layer with mapping={" + repr(l.name) + ": ...}.")
