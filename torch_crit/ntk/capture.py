r"""Pure-functional capture of layer inputs and back-propagated output derivatives.

The structured NTK (and dNTK) of a layer needs, for every call of the layer, its input
:math:`X` and the derivatives of every network output with respect to the layer's output
(the *cotangents* :math:`G`). For a Linear layer :math:`z = W x + b` the per-example Jacobian
of output :math:`a` is :math:`\partial f_a/\partial W = G_a x^\top`, so the layer's NTK block is
(the layer sum of (8.7), cf. the decomposition of :math:`H` in (8.5)–(8.6))

.. math::
    \Theta^{(W,b)}_{ij;ab} = (G_{i a} \cdot G_{j b})\,(\lambda_W\, x_i \cdot x_j + \lambda_b).

This module computes :math:`X` and :math:`G` without hooks on autograd and without
per-example gradients:

* the model is run with :func:`torch.func.functional_call`, with a forward hook on each
  captured module that adds a zero *probe* tensor to the module's output and records the
  module's input;
* the cotangents are the vector–Jacobian products of the outputs with respect to the probes
  (:func:`torch.func.vjp`), vmapped over the ``k`` output basis vectors. Since the examples
  of a batch are independent (the model runs in eval mode, see below), one basis vector
  :math:`e_a` replicated over the batch gives every example's cotangent for output ``a`` at
  once.

Everything is a composition of ``torch.func`` transforms, so the capture itself can be
differentiated: ``torch.func.jvp`` over :func:`layer_inputs_and_cotangents` gives the
directional derivatives :math:`\dot X, \dot G` that the dNTK (11.8) needs — along parameter
tangents, or along tangents of the optional ``probes`` (values added to the layer outputs) and
``seeds`` (extra cotangents on the layer inputs), which is how the structured dNTK injects the
rank-one weight tangents of Linear layers without forming them
(:mod:`torch_crit.ntk.dntk_structured`).

Assumptions (documented, checked where cheap): examples are independent (no batch
statistics: call the model in eval mode — :func:`torch_crit.empirical_ntk` does); every
captured module returns a single tensor whose dimension 0 is the batch dimension; the
module input recorded is its first positional argument (or the first tensor keyword
argument).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torch_crit.ntk.capture import layer_inputs_and_cotangents
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> params = dict(net.named_parameters())
    >>> out, xs, gs = layer_inputs_and_cotangents(net, params, torch.randn(5, 3), ["0", "2"])
    >>> out.shape, xs[0].shape, gs[0].shape, gs[1].shape
    (torch.Size([5, 2]), torch.Size([5, 3]), torch.Size([5, 2, 4]), torch.Size([5, 2, 2]))
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from torch_crit.ntk.inputs import ModelInput, batch_size, call_model, flatten_output

__all__ = ["CallInfo", "trace_calls", "layer_inputs_and_cotangents", "module_input"]


@dataclass(frozen=True)
class CallInfo:
    """One call of a captured module during the forward pass.

    Attributes:
        module: the module's path in ``model.named_modules()``.
        index: position of this call among all captured calls, in forward order.
        occurrence: how many earlier calls the same module had (0 for the first call).
        input_shape: the recorded input's shape, batch dimension included.
        output_shape: the module output's shape, batch dimension included.
        batch_first: whether input and output have the batch size ``N`` as dimension 0.
    """

    module: str
    index: int
    occurrence: int
    input_shape: Tuple[int, ...]
    output_shape: Tuple[int, ...]
    batch_first: bool


def module_input(args: Tuple[Any, ...], kwargs: Mapping[str, Any]) -> Optional[torch.Tensor]:
    """The tensor a module was called on: first positional argument, else first tensor kwarg."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            return v
    return None


def _resolve_modules(model: nn.Module, modules: Sequence[str]) -> Dict[str, nn.Module]:
    named = dict(model.named_modules())
    out: Dict[str, nn.Module] = {}
    for name in modules:
        if name not in named:
            raise KeyError(
                f"module {name!r} is not a submodule of the model; known paths include "
                f"{sorted(named)[:10]} (see model.named_modules())."
            )
        out[name] = named[name]
    return out


class _Recorder:
    """Forward hooks on the captured modules (shape tracing or probe injection)."""

    def __init__(self, modules: Dict[str, nn.Module], probes: Optional[Sequence[torch.Tensor]] = None):
        self.modules = modules
        self.probes = probes
        self.inputs: List[torch.Tensor] = []
        self.outputs_shapes: List[Tuple[int, ...]] = []
        self.names: List[str] = []

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> Any:
            if not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"captured module {name!r} ({type(module).__name__}) returned "
                    f"{type(output).__name__}, not a tensor; only single-tensor modules can be captured."
                )
            inp = module_input(args, kwargs)
            if inp is None:
                raise TypeError(f"captured module {name!r} was called without a tensor input.")
            i = len(self.names)
            self.names.append(name)
            self.inputs.append(inp)
            self.outputs_shapes.append(tuple(output.shape))
            if self.probes is None:
                return None
            if i >= len(self.probes):
                raise RuntimeError(
                    f"the forward pass made more captured calls ({i + 1}) than traced "
                    f"({len(self.probes)}); the model's call pattern depends on the input "
                    f"values or changed between calls — recompute `calls` with trace_calls."
                )
            probe = self.probes[i]
            if tuple(probe.shape) != tuple(output.shape):
                raise RuntimeError(
                    f"call {i} of captured module {name!r} returned shape {tuple(output.shape)} "
                    f"but {tuple(probe.shape)} was traced; recompute `calls` with trace_calls on "
                    f"the same inputs."
                )
            return output + probe

        return hook

    @contextlib.contextmanager
    def attached(self) -> Iterator["_Recorder"]:
        handles = []
        try:
            for name, m in self.modules.items():
                handles.append(m.register_forward_hook(self._hook(name), with_kwargs=True))
            yield self
        finally:
            for h in handles:
                h.remove()


def _tensors(model: nn.Module, params: Mapping[str, torch.Tensor], buffers: Optional[Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    d: Dict[str, torch.Tensor] = {}
    if buffers is None:
        d.update(dict(model.named_buffers()))
    else:
        d.update(buffers)
    d.update(params)
    return d


def trace_calls(
    model: nn.Module,
    x: ModelInput,
    modules: Sequence[str],
    *,
    params: Optional[Mapping[str, torch.Tensor]] = None,
    buffers: Optional[Mapping[str, torch.Tensor]] = None,
) -> List[CallInfo]:
    """Run the model once (no gradients) and list the calls of ``modules`` in forward order.

    Args:
        model: the network (its own parameters are used where ``params`` omits them).
        x: model inputs (tensor ``[N, ...]``, tuple or dict; see :mod:`torch_crit.ntk.inputs`).
        modules: paths (``model.named_modules()`` names) of the modules to capture.
        params: parameter tensors by name for :func:`torch.func.functional_call`.
        buffers: buffer tensors by name (default: the model's own).

    Returns:
        One :class:`CallInfo` per call; a module called several times (shared weights)
        appears once per call.
    """
    mods = _resolve_modules(model, modules)
    n = batch_size(x)
    rec = _Recorder(mods)
    with torch.no_grad(), rec.attached():
        call_model(model, _tensors(model, params or {}, buffers), x)
    seen: Dict[str, int] = {}
    calls = []
    for i, (name, inp, oshape) in enumerate(zip(rec.names, rec.inputs, rec.outputs_shapes)):
        occ = seen.get(name, 0)
        seen[name] = occ + 1
        bf = inp.dim() >= 1 and inp.shape[0] == n and len(oshape) >= 1 and oshape[0] == n
        calls.append(CallInfo(name, i, occ, tuple(inp.shape), oshape, bf))
    return calls


def layer_inputs_and_cotangents(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    x: ModelInput,
    modules: Sequence[str],
    *,
    buffers: Optional[Mapping[str, torch.Tensor]] = None,
    calls: Optional[Sequence[CallInfo]] = None,
    chunk_size: Optional[int] = None,
    probes: Optional[Mapping[int, torch.Tensor]] = None,
    seeds: Optional[Mapping[int, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    r"""Network outputs, and per captured call the module's input and output cotangents.

    For call :math:`c` of a captured module with output :math:`z^{(c)}` (shape ``[N, *S]``)
    the cotangent is

    .. math::
        G^{(c)}_{i;a} = \frac{\partial f_{i;a}}{\partial z^{(c)}_i} \in \mathbb{R}^{S},
        \qquad i = 1..N,\ a = 1..k,

    the derivative of network output ``a`` of example ``i`` with respect to that example's
    pre-activation at this call — the back-propagated error of the book's (7.x)/(8.x)
    backward equations before multiplying by any weight. It is computed as the VJP of the
    outputs with respect to a zero probe added to :math:`z^{(c)}`, vmapped over the ``k``
    basis vectors of the output space (one backward pass per output for the whole batch).

    A pure function of ``params`` and ``x``: it composes with ``torch.func`` transforms
    (``jvp`` over it gives :math:`\dot X, \dot G` for the dNTK).

    Two optional inputs generalise the capture so that directional derivatives can be injected
    without perturbing any weight (the structured dNTK, :mod:`torch_crit.ntk.dntk_structured`):

    * ``probes[c]`` (shape ``[N, *S]`` of call ``c``'s output) is added to :math:`z^{(c)}`
      (default zero); ``jvp`` with respect to it propagates a tangent :math:`\epsilon^{(c)}`
      injected at that layer's output through the rest of the forward *and* backward pass;
    * ``seeds[c]`` (``[k, N, *S_in]``, the shape of call ``c``'s input with the ``k`` outputs
      first) adds a cotangent on the recorded input :math:`X^{(c)}`: the cotangents become

      .. math::
          G^{(c')}_{i;a} = \frac{\partial}{\partial z^{(c')}_i}\Big[f_{i;a}
            + \sum_{c} \big\langle \mathrm{seed}^{(c)}_{a},\, X^{(c)}\big\rangle\Big]

      (the examples are independent, so the sum over the batch in the inner product only pairs
      example ``i`` with itself). Zero seeds change nothing; ``jvp`` along a seed tangent
      :math:`s` adds the back-propagation of :math:`s` from :math:`X^{(c)}` to every earlier
      call's cotangent — the :math:`\dot W^\top g` term of a weight perturbation.

    Args:
        model: the network; run with ``functional_call`` (its own tensors are untouched).
            Put it in eval mode first if it has dropout/batch statistics.
        params: parameters by name (all the model's parameters, or a subset; missing ones are
            taken from the model).
        x: inputs, tensor ``[N, ...]`` or tuple/dict of batched tensors.
        modules: paths of the modules to capture. Each must return one tensor ``[N, *S]``.
        buffers: buffers by name (default: the model's own).
        calls: the result of :func:`trace_calls` on the same ``x`` (recomputed when ``None``;
            pass it to skip one no-grad forward pass).
        chunk_size: forwarded to :func:`torch.func.vmap` over the ``k`` outputs to bound memory
            (``None``: all outputs at once).
        probes: values added to the outputs of the calls (by call index; missing calls: zero).
        seeds: extra cotangents ``[k, N, *S_in]`` on the inputs of the calls (by call index;
            missing calls: none). Both are differentiable inputs (``jvp`` through them).

    Returns:
        ``(outputs, inputs, cotangents)``: ``outputs`` ``[N, k]`` (model output flattened);
        ``inputs[c]`` ``[N, *S_in]``, the input of call ``c``; ``cotangents[c]``
        ``[N, k, *S]``. Calls are in forward order (``calls[c]`` describes call ``c``).

    Raises:
        RuntimeError: the forward pass made different calls than ``calls`` describes.
        ValueError: a probe or seed has the wrong call index or shape.
    """
    mods = _resolve_modules(model, modules)
    tensors = _tensors(model, params, buffers)
    if calls is None:
        calls = trace_calls(model, x, modules, params=params, buffers=buffers)
    n = batch_size(x)
    ref = next(iter(params.values())) if params else next(model.parameters())
    probes = dict(probes or {})
    seeds = dict(seeds or {})
    for c, t in probes.items():
        if not 0 <= c < len(calls) or tuple(t.shape) != tuple(calls[c].output_shape):
            raise ValueError(
                f"probe for call {c}: expected a call index in [0, {len(calls)}) and the call's output "
                f"shape, got shape {tuple(t.shape)}."
            )
    for c, t in seeds.items():
        if not 0 <= c < len(calls) or tuple(t.shape[1:]) != tuple(calls[c].input_shape):
            raise ValueError(
                f"seed for call {c}: expected a call index in [0, {len(calls)}) and shape [k, *input shape], "
                f"got shape {tuple(t.shape)}."
            )
    probes0 = [
        probes[i] if i in probes else torch.zeros(c.output_shape, dtype=ref.dtype, device=ref.device)
        for i, c in enumerate(calls)
    ]
    seeded = sorted(seeds)

    def forward(probe_values: List[torch.Tensor]):
        rec = _Recorder(mods, probe_values)
        with rec.attached():
            out = call_model(model, tensors, x)
        if len(rec.names) != len(probe_values):
            raise RuntimeError(
                f"the forward pass made {len(rec.names)} captured calls but {len(probe_values)} were "
                f"traced; recompute `calls` with trace_calls on the same inputs."
            )
        out = flatten_output(out, n)
        return (out, [rec.inputs[c] for c in seeded]), (out, rec.inputs)

    if not calls:
        out = flatten_output(call_model(model, tensors, x), n)
        return out, [], []
    _, vjp_fn, (out, inputs) = torch.func.vjp(forward, probes0, has_aux=True)
    k = out.shape[1]
    basis = torch.eye(k, dtype=out.dtype, device=out.device).unsqueeze(1).expand(k, n, k)
    seed_list = [seeds[c] for c in seeded]
    for c, t in zip(seeded, seed_list):
        if t.shape[0] != k:
            raise ValueError(f"seed for call {c}: dimension 0 must be the k = {k} outputs, got {t.shape[0]}.")
    if k == 1:  # one backward pass: no vmap level (cheaper under outer transforms)
        (cots,) = vjp_fn((basis[0], [t[0] for t in seed_list]))
        cotangents = [g.unsqueeze(1) for g in cots]
    else:
        (cots,) = torch.func.vmap(lambda b, s: vjp_fn((b, s)), chunk_size=chunk_size)(basis, seed_list)
        cotangents = [g.movedim(0, 1) for g in cots]
    return out, list(inputs), cotangents
