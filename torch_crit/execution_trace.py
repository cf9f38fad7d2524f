r"""Model analysis by execution: one forward pass recorded as an ``fx.Graph``.

``torch.fx`` symbolic tracing fails on data-dependent Python (``torch.ones(T, T)`` from a shape,
``if`` on a tensor, the fused fast paths of ``nn.TransformerEncoderLayer``) and sees shape
arithmetic as data. This module runs the model once on example inputs under a
:class:`torch.overrides.TorchFunctionMode` and records every top-level torch call (functional
activations, in-place variants, ``Tensor`` methods, residual sums and scales, reshapes,
``scaled_dot_product_attention`` …) between *leaf* modules, which forward hooks record as
``call_module`` nodes. The result is a graph of the same node kinds symbolic tracing produces
(``placeholder``, ``get_attr``, ``call_module``, ``call_function``, ``call_method``, ``output``),
so :mod:`torch_crit.architecture` reads both with one set of handlers.

What is recorded exactly as it ran: which module and which function touched which tensor. Shapes
are concrete, so ``x.shape[1] // p`` is plain Python and never mistaken for an activation. A
parameter-free custom module is a leaf (an activation candidate) only if it acts elementwise on the
input it actually received (same shape, and it commutes with a random permutation of the
entries); otherwise (``Permute``, ``Rearrange`` …) the recorder looks inside it.

The model runs in ``eval()`` with gradients enabled (no BatchNorm statistics update, no dropout
noise, no fused inference fast paths) and every module's mode is restored afterwards.

Input inference (:func:`infer_example_inputs`): the first parameterised leaf in registration
order decides: ``Linear(in)`` → ``randn(2, in)``; ``ConvNd(C)`` → ``randn(2, C, 32, …)`` (64 and
224 are tried next); ``Embedding(V)`` → ``randint(V, (2, 8))``; ``RNN/LSTM/GRU(in)`` and
``MultiheadAttention(E)`` → a ``(2, 5, ·)`` sequence (respecting ``batch_first``). A forward with
several required tensor arguments (``nn.Transformer(src, tgt)``) gets the same tensor for each.
"""
from __future__ import annotations

import inspect
import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from .errors import ModelAnalysisError

__all__ = ["infer_example_inputs", "record_forward"]

T = torch.Tensor
# Tensor dunder methods -> the operator fx records, and whether the operands are swapped.
_DUNDER: dict[Any, tuple[Any, bool]] = {
    T.__add__: (operator.add, False), T.__radd__: (operator.add, True), T.__iadd__: (operator.iadd, False),
    T.__sub__: (operator.sub, False), T.__rsub__: (operator.sub, True), T.__isub__: (operator.isub, False),
    T.__mul__: (operator.mul, False), T.__rmul__: (operator.mul, True), T.__imul__: (operator.imul, False),
    T.__truediv__: (operator.truediv, False), T.__rtruediv__: (operator.truediv, True),
    T.__itruediv__: (operator.itruediv, False), T.__neg__: (operator.neg, False),
    T.__getitem__: (operator.getitem, False), T.__matmul__: (torch.matmul, False),
    T.__rmatmul__: (torch.matmul, True), T.__floordiv__: (operator.floordiv, False),
    T.__pow__: (operator.pow, False),
    T.__eq__: (operator.eq, False), T.__ne__: (operator.ne, False), T.__gt__: (operator.gt, False),
    T.__ge__: (operator.ge, False), T.__lt__: (operator.lt, False), T.__le__: (operator.le, False),
}


def _constant() -> None:
    """Target of nodes standing for tensors made outside the recorded calls (no data flow)."""


class _Recorder(TorchFunctionMode):
    def __init__(self, root: nn.Module, is_leaf: Callable[[nn.Module, str], bool | None]) -> None:
        super().__init__()
        self.root = root
        self.graph = fx.Graph()
        self.env: dict[int, fx.Node] = {}
        self.alive: list[torch.Tensor] = []  # keeps ids unique while recording
        self.depth = 0
        self.disabled = False
        self.is_leaf = is_leaf
        self.attrs: dict[int, str] = {}
        for n, p in root.named_parameters(remove_duplicate=False):
            self.attrs.setdefault(id(p), n)
        for n, b in root.named_buffers(remove_duplicate=False):
            self.attrs.setdefault(id(b), n)
        self.stack: list[bool] = []

    # ---- tensors <-> nodes --------------------------------------------------------------------
    def bind(self, t: torch.Tensor, node: fx.Node) -> None:
        self.env[id(t)] = node
        self.alive.append(t)

    def node_of(self, t: torch.Tensor) -> Any:
        hit = self.env.get(id(t))
        if hit is not None:
            return hit
        name = self.attrs.get(id(t))
        if name is not None:
            node = self.graph.get_attr(name)
        elif t.numel() == 1 and not t.requires_grad:
            return float(t.detach().reshape(()))  # a scalar constant: keep its value (scales)
        else:
            node = self.graph.create_node("call_function", _constant, (), {})
        self.bind(t, node)
        return node

    def to_args(self, obj: Any) -> Any:
        return tree_map(lambda v: self.node_of(v) if isinstance(v, torch.Tensor) else _plain(v), obj)

    def bind_outputs(self, out: Any, node: fx.Node) -> None:
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.bind(t, node)

    # ---- torch calls --------------------------------------------------------------------------
    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.disabled or self.depth > 0:
            return out
        if not any(isinstance(t, torch.Tensor) for t in tree_flatten(out)[0]):
            return out
        op, target, swap = "call_function", func, False
        if func in _DUNDER:
            target, swap = _DUNDER[func]
        elif getattr(func, "__name__", None) == "__get__":  # x.T, x.data, x.mT: a view
            op, target = "call_method", "view_as"
        elif getattr(T, getattr(func, "__name__", ""), None) is func:
            op, target = "call_method", func.__name__
        a = list(self.to_args(tuple(args)))
        if swap and len(a) == 2:
            a = [a[1], a[0]]
        node = self.graph.create_node(op, target, tuple(a), self.to_args(dict(kwargs)))
        self.bind_outputs(out, node)
        return out

    # ---- modules ------------------------------------------------------------------------------
    def pre_hook(self, name: str) -> Callable:
        def hook(m: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.disabled:
                return
            self.disabled = True  # our own bookkeeping below is not part of the model
            try:
                self._enter(m, name, args, kwargs)
            finally:
                self.disabled = False
        return hook

    def _enter(self, m: nn.Module, name: str, args: tuple, kwargs: dict) -> None:
        if self.depth > 0:
            self.stack.append(False)
            return
        leaf = self.is_leaf(m, name)
        if leaf is None:  # parameter-free custom module: a leaf only if elementwise here
            leaf = self._elementwise(m, args, kwargs)
        self.stack.append(bool(leaf))
        if leaf:
            inputs = [self.node_of(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            self.pending = self.graph.create_node("call_module", name, tuple(inputs), {})
            first = next((t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)), None)
            if first is not None and first.is_floating_point() and first.numel() and first.device.type != "meta":
                self.pending.meta["input_ms"] = float(first.detach().double().pow(2).mean())
            self.depth += 1

    def post_hook(self, m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if self.disabled or not self.stack:
            return
        if self.stack.pop():  # the leaf this pass is inside of has returned
            self.disabled = True
            try:
                self.depth = 0
                self.bind_outputs(out, self.pending)
            finally:
                self.disabled = False

    def _elementwise(self, m: nn.Module, args: tuple, kwargs: dict) -> bool:
        xs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if len(xs) != 1 or not xs[0].is_floating_point() or xs[0].numel() < 2:
            return False
        x = xs[0].detach()
        try:
            with torch.no_grad():
                y = m(x.clone())
                if not isinstance(y, torch.Tensor) or y.shape != x.shape or torch.equal(y, x):
                    return False  # reshapes look inside; the identity in eval (StochasticDepth) is transparent
                g = torch.Generator(device="cpu").manual_seed(0)
                perm = torch.randperm(x.numel(), generator=g).to(x.device)
                y2 = m(x.reshape(-1)[perm].reshape(x.shape).clone())
                return bool(torch.allclose(y2.reshape(-1), y.reshape(-1)[perm], rtol=1e-5, atol=1e-6))
        except Exception:  # noqa: BLE001 - not callable on a permuted copy: not elementwise
            return False


def _plain(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, complex, str, slice, torch.dtype, torch.device,
                                   torch.memory_format, torch.layout, type(...))):
        return v
    if isinstance(v, torch.Size):
        return tuple(v)
    return repr(v)


def record_forward(root: nn.Module, example_inputs: tuple, is_leaf: Callable[[nn.Module, str], bool | None]) -> fx.Graph:
    """Run ``root(*example_inputs)`` once and return the recorded graph.

    Args:
        root: the model (not modified: modes are restored, no statistics are updated).
        example_inputs: the positional inputs.
        is_leaf: ``(module, qualified_name) -> True | False | None``; ``None`` = decide by the
            elementwise test on the input the module receives.

    Raises:
        ModelAnalysisError: the forward pass failed on these inputs (the message shows why).
    """
    rec = _Recorder(root, is_leaf)
    handles = []
    modes = {m: m.training for m in root.modules()}
    for name, m in root.named_modules():
        if m is root:
            continue
        handles.append(m.register_forward_pre_hook(rec.pre_hook(name), with_kwargs=True))
        handles.append(m.register_forward_hook(rec.post_hook, with_kwargs=True))
    try:
        root.eval()
        inputs = []
        for i, x in enumerate(example_inputs):
            if isinstance(x, torch.Tensor):
                node = rec.graph.placeholder(f"input_{i}")
                rec.bind(x, node)
            inputs.append(x)
        with torch.enable_grad(), rec:
            out = root(*inputs)
        rec.graph.output(rec.to_args(out))
    except ModelAnalysisError:
        raise
    except Exception as exc:  # noqa: BLE001 - say which inputs failed, and how to fix it
        shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in example_inputs]
        raise ModelAnalysisError(
            f"{type(root).__name__} could not run on example inputs {shapes} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}). Fix: pass "
            "example_inputs=<a small batch the model accepts> (a tensor or a tuple of positional inputs).") from exc
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return rec.graph


_INPUT_LAYERS = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.EmbeddingBag, nn.RNNBase, nn.MultiheadAttention)


def _input_layers(root: nn.Module) -> list[nn.Module]:
    return [m for m in root.modules() if isinstance(m, _INPUT_LAYERS)]


def _required_positional(root: nn.Module) -> int:
    try:
        sig = inspect.signature(root.forward)
    except (TypeError, ValueError):
        return 1
    n = sum(1 for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty)
    return max(1, n)


def infer_example_inputs(root: nn.Module) -> list[tuple] | None:
    """Candidate example inputs for ``root``, tried in order, or ``None`` (see the module docstring).

    Each layer that can read an input (registration order; the first one usually runs first) gives
    candidates; duplicates are dropped. The user's random stream is not touched.
    """
    layers = _input_layers(root)
    if not layers:
        return None
    k = _required_positional(root)
    gen = torch.Generator(device="cpu").manual_seed(0)
    out: list[tuple] = []
    seen: set[tuple] = set()
    for m in layers[:8]:
        p = next(m.parameters(), None)
        dtype = p.dtype if p is not None and p.is_floating_point() else torch.get_default_dtype()
        device = p.device if p is not None else torch.device("cpu")

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen, dtype=dtype).to(device)

        if isinstance(m, nn.Linear):
            xs = [randn(2, m.in_features), randn(2, 5, m.in_features)]
        elif isinstance(m, nn.modules.conv._ConvNd):
            d = len(m.kernel_size)
            xs = [randn(2, m.in_channels, *([s] * d)) for s in (32, 64, 224)]
        elif isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            xs = [torch.randint(0, m.num_embeddings, (2, 8), generator=gen).to(device)]
        elif isinstance(m, nn.RNNBase):
            xs = [randn(*((2, 5, m.input_size) if m.batch_first else (5, 2, m.input_size)))]
        else:  # MultiheadAttention first (nn.Transformer, TransformerEncoder)
            xs = [randn(*((2, 5, m.embed_dim) if m.batch_first else (5, 2, m.embed_dim)))]
        for x in xs:
            key = (tuple(x.shape), x.dtype)
            if key not in seen:
                seen.add(key)
                out.append(tuple([x] * k))
    return out
