"""Model inputs for the NTK probes: one tensor, a tuple of tensors, or a dict of tensors.

Every probe in :mod:`torch_crit.ntk` calls the model as a pure function of its parameters,
``functional_call(model, (params, buffers), x)``, where ``x`` is

* a tensor ``[N, ...]`` (called as ``model(x)``),
* a tuple/list of positional arguments (``model(*x)``), or
* a dict of keyword arguments (``model(**x)``).

Tensors with at least one dimension are *batched*: their dimension 0 indexes the ``N``
examples and must have the same size in every batched entry. Anything else (Python scalars,
flags, 0-d tensors) is passed through unchanged to every call. The model output may be a
tensor ``[N, ...]`` or a tuple/list of them; it is flattened to ``[N, k]`` (tuples are
concatenated along the flattened feature axis).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from torch_crit.errors import InvalidArgumentError

__all__ = [
    "ModelInput",
    "batch_size",
    "slice_batch",
    "batched_tensors",
    "cast_inputs",
    "call_model",
    "flatten_output",
    "validate_inputs",
    "unwrap_model",
    "check_probe",
]

ModelInput = Union[torch.Tensor, Sequence[Any], Mapping[str, Any]]


def _entries(x: ModelInput) -> list[Any]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, Mapping):
        return list(x.values())
    if isinstance(x, (tuple, list)):
        return list(x)
    raise TypeError(
        f"model inputs must be a tensor, a tuple/list of positional arguments or a dict of "
        f"keyword arguments; got {type(x).__name__}. Wrap other containers in a tuple."
    )


def batched_tensors(x: ModelInput) -> list[torch.Tensor]:
    """The batched tensors (dimension ≥ 1) of ``x``, in order."""
    return [e for e in _entries(x) if isinstance(e, torch.Tensor) and e.dim() >= 1]


def batch_size(x: ModelInput) -> int:
    """Number of examples ``N`` (size of dimension 0 shared by every batched tensor).

    Raises:
        ValueError: no batched tensor, or batched tensors disagree on ``N``.
    """
    ts = batched_tensors(x)
    if not ts:
        raise ValueError(
            "the model inputs hold no tensor with a batch dimension; pass x as a tensor "
            "[N, ...] (or a tuple/dict of such tensors), batch dimension 0."
        )
    sizes = {int(t.shape[0]) for t in ts}
    if len(sizes) != 1:
        raise ValueError(
            f"the batched input tensors disagree on the batch size (dimension 0): "
            f"{[tuple(t.shape) for t in ts]}; every batched input must have the same N."
        )
    return sizes.pop()


def _map(x: ModelInput, fn) -> ModelInput:
    def f(e: Any) -> Any:
        return fn(e) if isinstance(e, torch.Tensor) and e.dim() >= 1 else e

    if isinstance(x, torch.Tensor):
        return f(x)
    if isinstance(x, Mapping):
        return {k: f(v) for k, v in x.items()}
    return type(x)(f(e) for e in x) if isinstance(x, tuple) else [f(e) for e in x]


def slice_batch(x: ModelInput, start: int, stop: int) -> ModelInput:
    """Examples ``start:stop`` of every batched tensor (views, no copy)."""
    return _map(x, lambda t: t[start:stop])


def cast_inputs(x: ModelInput, dtype: Optional[torch.dtype]) -> ModelInput:
    """Floating batched tensors cast to ``dtype`` (integer tensors, e.g. token ids, kept)."""
    if dtype is None:
        return x
    return _map(x, lambda t: t.to(dtype) if t.is_floating_point() else t)


def call_model(model: nn.Module, tensors: Dict[str, torch.Tensor], x: ModelInput) -> Any:
    """``model(x)`` with parameters and buffers replaced by ``tensors`` (``functional_call``)."""
    if isinstance(x, torch.Tensor):
        return torch.func.functional_call(model, tensors, (x,))
    if isinstance(x, Mapping):
        return torch.func.functional_call(model, tensors, (), dict(x))
    return torch.func.functional_call(model, tensors, tuple(x))


def flatten_output(out: Any, n: Optional[int] = None) -> torch.Tensor:
    """Model output as ``[N, k]``: a tensor ``[N, ...]`` flattened, tuples concatenated.

    A dict of tensors is flattened like a tuple of its values in the dict's own key order
    (insertion order), so output index ``i`` of the NTK runs over the first value's entries first.

    Args:
        out: the model output (tensor, tuple/list of tensors, or dict of tensors, each with batch
            dimension 0).
        n: the expected batch size, checked when given.

    Raises:
        TypeError: the output is not a tensor or a tuple/list of tensors.
        ValueError: the output has no batch dimension of size ``n``.
    """
    if isinstance(out, torch.Tensor):
        parts = [out]
    elif isinstance(out, (tuple, list)) and out and all(isinstance(o, torch.Tensor) for o in out):
        parts = list(out)
    elif isinstance(out, dict) and out and all(isinstance(o, torch.Tensor) for o in out.values()):
        parts = list(out.values())
    else:
        raise TypeError(
            f"the model must return a tensor [N, ...], or a tuple/list/dict of such tensors; got "
            f"{type(out).__name__}. Wrap the model so that it returns the outputs to differentiate."
        )
    flat = []
    for o in parts:
        if o.dim() == 0 or (n is not None and o.shape[0] != n):
            raise ValueError(
                f"model output of shape {tuple(o.shape)} has no batch dimension 0 of size "
                f"N={n}; the NTK probes need outputs [N, ...] (one row per input example)."
            )
        flat.append(o.reshape(o.shape[0], -1))
    return flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def validate_inputs(
    x1: ModelInput,
    x2: Optional[ModelInput],
    *,
    device: torch.device,
    dtype: Optional[torch.dtype],
) -> Tuple[int, Optional[int]]:
    """Check that ``x1`` (and ``x2``) can be fed to a model on ``device`` of float ``dtype``.

    Checks: same container structure, same per-example shapes (all but dimension 0), same
    dtypes and devices for ``x1`` and ``x2``; floating inputs of the model's dtype; tensors on
    the parameters' device.

    Returns:
        ``(N1, N2)`` (``N2`` is ``None`` when ``x2`` is ``None``).

    Raises:
        ValueError: a mismatch, with both sides described and the fix.
    """
    n1 = batch_size(x1)
    t1 = batched_tensors(x1)
    for t in t1:
        if t.device != device:
            raise ValueError(
                f"input tensor ({_describe(t)}) is not on the model's device {device}; move the "
                f"inputs with .to({str(device)!r}) (or the model to the inputs' device)."
            )
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            raise ValueError(
                f"floating input tensor ({_describe(t)}) does not match the model's dtype "
                f"{dtype}; cast the inputs, or pass dtype={t.dtype} to compute in that dtype "
                f"(the model is then evaluated on a cast copy of its parameters)."
            )
    if x2 is None:
        return n1, None
    if type(x1) is not type(x2) and not (isinstance(x1, (tuple, list)) and isinstance(x2, (tuple, list))):
        raise ValueError(
            f"x1 and x2 must have the same structure; got {type(x1).__name__} and "
            f"{type(x2).__name__}."
        )
    if isinstance(x1, Mapping) and set(x1) != set(x2):  # type: ignore[arg-type]
        raise ValueError(f"x1 and x2 have different keys: {sorted(x1)} vs {sorted(x2)}.")  # type: ignore[arg-type]
    n2 = batch_size(x2)
    t2 = batched_tensors(x2)
    if len(t1) != len(t2):
        raise ValueError(f"x1 has {len(t1)} batched tensors but x2 has {len(t2)}.")
    for a, b in zip(t1, t2):
        if a.shape[1:] != b.shape[1:]:
            raise ValueError(
                f"x1 and x2 have different per-example shapes: x1 {tuple(a.shape)} vs x2 "
                f"{tuple(b.shape)} (all dimensions but the batch dimension 0 must agree)."
            )
        if a.dtype != b.dtype:
            raise ValueError(
                f"x1 and x2 have different dtypes: {a.dtype} vs {b.dtype}; cast both to the "
                f"model's dtype."
            )
        if a.device != b.device:
            raise ValueError(
                f"x1 and x2 are on different devices: {a.device} vs {b.device}; move both to "
                f"the model's device {device}."
            )
    return n1, n2


def unwrap_model(model: Any, what: str) -> nn.Module:
    """The module to probe: ``model`` itself, or the original of a ``torch.compile``d one.

    A compiled model (``OptimizedModule``) keeps its parameters in ``model._orig_mod``; the probes
    differentiate that module (same parameters, same function) in eager mode.

    Raises:
        InvalidArgumentError: ``model`` is not an ``nn.Module`` (e.g. a plain function).
    """
    inner = getattr(model, "_orig_mod", None)
    if isinstance(model, nn.Module) and isinstance(inner, nn.Module):
        return inner
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(
            f"{what}: model must be a torch.nn.Module, got {type(model).__name__}; wrap a plain "
            f"function in an nn.Module that holds its parameters as nn.Parameter attributes."
        )
    return model


def check_probe(x: ModelInput, what: str, arg: str = "x", block_size: Any = None) -> int:
    """Checks shared by every probe: ``N ≥ 1``, finite floating inputs, a positive int ``block_size``.

    Returns:
        ``N``, the number of examples.

    Raises:
        InvalidArgumentError: naming ``arg`` (empty batch, NaN/Inf entries) or ``block_size``.
    """
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise InvalidArgumentError(
            f"{what}: block_size must be a positive integer or None (to choose from memory), got {block_size!r}."
        )
    n = batch_size(x)
    if n == 0:
        raise InvalidArgumentError(f"{what}: {arg} holds no examples (batch dimension 0 has size 0); pass N >= 1 examples.")
    for t in batched_tensors(x):
        if t.is_floating_point() or t.is_complex():
            if not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise InvalidArgumentError(
                    f"{what}: {arg} has {bad} NaN/Inf entries ({_describe(t)}); the kernel would be "
                    f"non-finite. Clean or mask the inputs first."
                )
    return n
