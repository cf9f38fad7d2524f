r"""The book's learning-rate tensor λ (8.6) as per-parameter scales, shared by the NTK probes.

The NTK of the book is :math:`H_{ij;ab} = \sum_{\mu\nu} \lambda_{\mu\nu}
\frac{\partial z_{i;a}}{\partial\theta_\mu}\frac{\partial z_{j;b}}{\partial\theta_\nu}` (8.5),
with the diagonal learning-rate tensor (8.6) that gives each parameter tensor its own scale
(:math:`\lambda_b^{(\ell)}` for biases, :math:`\lambda_W^{(\ell)}/n_{\ell-1}` for weights).
Per parameter tensor ``p`` with scale :math:`\lambda_p` this is

.. math::
    H = \sum_p \lambda_p\, J_p J_p^\top,\qquad J_p = \partial f/\partial p .

:func:`resolve_learning_rates` turns every accepted way of stating λ into one dict
``{parameter name: λ_p}``; with the param groups of an optimizer (``lr`` per group) the result
is the kernel that governs gradient descent with that optimizer at η = 1.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["LearningRates", "resolve_learning_rates"]

LearningRates = Union[None, float, int, Mapping[str, float], Sequence[Mapping[str, Any]]]


def _check_scale(value: Any, where: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"learning rate for {where} must be a real number, got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(
            f"learning rate for {where} must be finite and >= 0 (λ is a positive scale in "
            f"(8.6)), got {v}."
        )
    return v


def resolve_learning_rates(model: nn.Module, learning_rates: LearningRates = None) -> Dict[str, float]:
    r"""Per-parameter scales :math:`\lambda_p` (8.6) for every trainable parameter of ``model``.

    Only parameters with ``requires_grad=True`` appear: frozen parameters never contribute to
    the NTK. Tied (shared) parameters appear once, under their first name in
    ``model.named_parameters()``; an alias name is accepted wherever a name is.

    Args:
        model: the network.
        learning_rates: one of

            * ``None`` — λ = 1 for every parameter (the plain Jacobian Gram
              :math:`\Theta = J J^\top` that ``torch.func`` recipes compute);
            * a number — the same λ for every parameter;
            * a dict ``{parameter name: λ}`` — listed parameters get their λ, the others 1;
            * a list of param-group dicts with ``"params"`` (parameters or names) and ``"lr"``,
              exactly what :func:`torch_crit.param_groups` returns and ``torch.optim`` takes.
              Trainable parameters in no group are not trained by such an optimizer and get
              λ = 0 (they are left out of the kernel).

    Returns:
        ``{name: λ}`` in ``named_parameters()`` order, for the trainable parameters.

    Raises:
        TypeError: an unsupported type, or a group without ``"params"``.
        ValueError: an unknown parameter name, a parameter in two groups, a group without
            ``"lr"``, a negative or non-finite λ.
    """
    canonical: Dict[int, str] = {}
    alias: Dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        canonical.setdefault(id(p), name)
        alias[name] = canonical[id(p)]
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}

    if learning_rates is None:
        return {n: 1.0 for n in trainable}
    if isinstance(learning_rates, (int, float)) and not isinstance(learning_rates, bool):
        v = _check_scale(learning_rates, "all parameters")
        return {n: v for n in trainable}
    if isinstance(learning_rates, Mapping):
        out = {n: 1.0 for n in trainable}
        for key, value in learning_rates.items():
            if key not in alias:
                raise ValueError(
                    f"learning_rates names {key!r}, which is not a parameter of the model; "
                    f"valid names: {list(alias)[:12]}{' …' if len(alias) > 12 else ''}."
                )
            name = alias[key]
            if name in out:
                out[name] = _check_scale(value, repr(key))
        return out
    if isinstance(learning_rates, Sequence) and not isinstance(learning_rates, (str, bytes)):
        out: Dict[str, float] = {}
        by_id = {id(p): n for n, p in model.named_parameters()}
        for g, group in enumerate(learning_rates):
            if not isinstance(group, Mapping) or "params" not in group:
                raise TypeError(
                    f"learning_rates[{g}] must be a param-group dict with 'params' and 'lr' "
                    f"(as torch_crit.param_groups returns), got {type(group).__name__}."
                )
            if "lr" not in group:
                raise ValueError(
                    f"param group {g} ({group.get('name', 'unnamed')!r}) has no 'lr'; give every "
                    f"group an explicit 'lr' (the optimizer's default is not known here)."
                )
            lr = _check_scale(group["lr"], f"param group {g} ({group.get('name', 'unnamed')!r})")
            params = group["params"]
            if isinstance(params, (torch.Tensor, str)):
                params = [params]
            for p in params:
                if isinstance(p, str):
                    if p not in alias:
                        raise ValueError(f"param group {g} names {p!r}, which is not a parameter of the model.")
                    name: Optional[str] = alias[p]
                elif isinstance(p, torch.Tensor):
                    name = by_id.get(id(p))
                    if name is None:
                        raise ValueError(
                            f"param group {g} holds a tensor of shape {tuple(p.shape)} that is not a "
                            f"parameter of this model; build the groups from this model."
                        )
                else:
                    raise TypeError(f"param group {g}: 'params' entries must be tensors or names, got {type(p).__name__}.")
                if name in out:
                    raise ValueError(
                        f"parameter {name!r} appears in more than one param group (torch.optim "
                        f"rejects this too); put each parameter in exactly one group."
                    )
                out[name] = lr
        return {n: out.get(n, 0.0) for n in trainable}
    raise TypeError(
        f"learning_rates must be None, a number, a dict {{name: λ}} or a list of param groups; "
        f"got {type(learning_rates).__name__}."
    )
