r"""Learning-rate parameter groups from the learning-rate equivalence principle: :func:`param_groups`.

The book's principle (§9.4): no layer and no parameter group should dominate the neural tangent
kernel :math:`H = \sum_{\ell}\bigl[\lambda_b^{(\ell)} \partial z \partial z/\partial b\,\partial b
+ \frac{\lambda_W^{(\ell)}}{n_{\ell-1}} \partial z\,\partial z/\partial W\,\partial W\bigr]` (8.7).
A diagonal learning-rate tensor :math:`\lambda` (8.6) is exactly one learning rate per parameter
group, so for SGD (THEORY.md §1.3)

.. math::
    \mathrm{lr}(b^{(\ell)}) = \eta\lambda_b^{(\ell)}, \qquad
    \mathrm{lr}(W^{(\ell)}) = \eta\lambda_W^{(\ell)} / n_{\ell-1},

with the class-dependent depth factors of (9.94)–(9.96) (from
:func:`torch_crit.theory.layer_learning_rates`):

* scale-invariant (ReLU, leaky ReLU, linear): :math:`\eta\lambda_b^{(\ell)} = \eta\tilde\lambda_b/L`,
  :math:`\eta\lambda_W^{(\ell)} = \eta\tilde\lambda_W/L` (9.94);
* :math:`K^\star = 0` class with :math:`p_\perp = b_1/a_1`:
  :math:`\eta\lambda_b^{(\ell)} = \eta\tilde\lambda_b\,\ell^{-p_\perp}L^{p_\perp-1}`,
  :math:`\eta\lambda_W^{(\ell)} = \eta\tilde\lambda_W (L/\ell)^{p_\perp-1}` (9.95);
  tanh, sin: :math:`\eta\tilde\lambda_b/\ell` and :math:`\eta\tilde\lambda_W` (9.96).

Here ``lr_b`` :math:`= \eta\tilde\lambda_b` and ``lr_W`` :math:`= \eta\tilde\lambda_W` are the
two O(1) numbers that then transfer across widths *and depths*. The ``"lr"`` of each group is
exactly the per-parameter step size of SGD, so the same groups are the NTK's learning-rate
tensor: ``torch_crit.empirical_ntk(model, x, learning_rates=groups)`` gives the book's
:math:`\lambda`-weighted :math:`\hat H` (8.5).

Adam / AdamW (derived here; the book treats (S)GD only)
--------------------------------------------------------
Adam's update is invariant to the scale of the gradient: its first step is exactly
:math:`\Delta\theta = -\mathrm{lr}\,g/(|g|+\epsilon) \approx -\mathrm{lr}\,\mathrm{sign}(g)`, and
later steps stay of size :math:`\approx\mathrm{lr}` per coordinate. For one input and one
output, the gradient of a hidden weight is :math:`g_{jk} = \epsilon\,\delta_j\,\sigma_k` with
:math:`\delta_j = \partial z^{(L)}/\partial z^{(\ell)}_j` and :math:`\sigma_k = \sigma(z^{(\ell-1)}_k)`,
so the change of the output caused by layer :math:`\ell` is

.. math::
    \Delta z \approx -\mathrm{lr}\,\mathrm{sign}(\epsilon)\Bigl(\sum_j|\delta_j|\Bigr)\Bigl(\sum_k|\sigma_k|\Bigr)
    \approx -\mathrm{lr}\,\sqrt{\tfrac{2}{\pi} n_\ell S_\ell}\; n_{\ell-1}\,\mathbb E|\sigma|,

where :math:`S_\ell = \sum_j\delta_j^2` (the product of :math:`\chi_\perp`'s, O(1) at criticality)
and :math:`\sum_j|\delta_j| \approx \sqrt{2 n_\ell S_\ell/\pi}` for :math:`n_\ell` Gaussian
:math:`\delta_j` of variance :math:`S_\ell/n_\ell`. SGD's contribution is instead
:math:`\eta\lambda_W^{(\ell)} S_\ell\, g(K^{(\ell-1)})`, and the equivalence principle chooses
:math:`\lambda_W^{(\ell)} = \tilde\lambda_W r_\ell` such that :math:`r_\ell S_\ell g_{\ell-1}` is the
same :math:`c/L` for every layer. With :math:`\mathbb E|\sigma| \propto \sqrt{g}`, Adam's
contribution is equal across layers and O(1/L) when

.. math::
    \mathrm{lr}(W^{(\ell)}) = \mathrm{lr}_W\,\frac{\sqrt{r_\ell / L}}{n_{\ell-1}\sqrt{m_\ell}},\qquad
    \mathrm{lr}(b^{(\ell)}) = \mathrm{lr}_b\,\frac{\sqrt{\rho_\ell / L}}{\sqrt{m_\ell}},

with :math:`r_\ell = \lambda_W^{(\ell)}/\tilde\lambda_W` and :math:`\rho_\ell = \lambda_b^{(\ell)}/\tilde\lambda_b`
the SGD depth factors above, :math:`m_\ell = n_\ell` (fan-out) for hidden layers and
:math:`m_\ell = 1` for the readout (there :math:`\delta_j = \delta_{ij}`). So Adam's
:math:`1/n_{\ell-1}` stays, an extra :math:`1/\sqrt{n_\ell}` appears, and the depth factors
become square roots times :math:`L^{-1/2}`: ReLU :math:`1/L` (as SGD), tanh :math:`L^{-1/2}` for
weights and :math:`1/\sqrt{\ell L}` for biases. The claim that is tested: the change of the
output caused by one Adam step of one layer is independent of the width and equal across
layers. For convolutions the same rule is applied with channels and kernel volume (derived for
dense layers only).

Other parameters (documented defaults)
--------------------------------------
* norm weights/biases are vector-like (bias-like NTK contributions): the bias rule at the
  position of the preceding affine layer;
* embedding tables: the weight rule with fan-in 1 (a one-hot input normalised as in
  :func:`torch_crit.init_`: each row's NTK contribution is its learning rate);
* attention projections: weight rule with fan-in ``embed_dim``; attention biases: bias rule;
* parameters the analysis could not place: ``other_lr`` (default ``lr_b / L``, the
  scale-invariant bias rate of (9.94));
* ``requires_grad=False`` parameters are left out of every group;
* tied parameters appear once, in the group of their first user.

Weight decay and other optimizer options go in ``**defaults`` and are copied into every group.
SGD's decay step is ``lr·wd·θ`` and AdamW's decoupled decay is ``lr·wd·θ`` too, so the
per-group learning rate also scales the decay.

Example:
    >>> import torch, torch.nn as nn, torch_crit
    >>> net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 1))
    >>> rep = torch_crit.init_(net)
    >>> groups = torch_crit.param_groups(net, lr_b=0.1, lr_W=0.1, report=rep, momentum=0.9)
    >>> opt = torch.optim.SGD(groups, lr=0.1)
    >>> [(g["name"], round(g["lr"], 6)) for g in groups]
    [('0.weight', 0.0125), ('0.bias', 0.05), ('2.weight', 0.001563), ('2.bias', 0.05)]
"""
from __future__ import annotations

import math
from typing import Any, Literal, Mapping

import torch
import torch.nn as nn

from torch_crit.architecture import (
    ModelPlan,
    analyse,
    criticality_activation,
    unwrap_model,
)

__all__ = ["OptimizerKind", "param_groups"]

OptimizerKind = Literal["sgd", "adam", "adamw"]
_ALIASES = {"sgd": "sgd", "adam": "adam", "adamw": "adamw", "adamax": "adam", "nadam": "adam", "radam": "adam"}


def _optimizer_kind(optimizer: Any) -> str:
    if isinstance(optimizer, type):
        name = optimizer.__name__.lower()
    elif isinstance(optimizer, str):
        name = optimizer.lower()
    else:
        raise TypeError(f"optimizer must be 'sgd', 'adam', 'adamw' or a torch.optim class, got {optimizer!r}")
    if name not in _ALIASES:
        raise ValueError(f"optimizer={optimizer!r} is not supported; accepted: 'sgd' (also momentum/Nesterov), "
                         "'adam', 'adamw' (and the classes torch.optim.SGD/Adam/AdamW). For another adaptive "
                         "optimizer with sign-like steps use 'adam'.")
    return _ALIASES[name]


def _rates(act: Any, layer: int, depth: int, fan_in: int, strict: bool) -> tuple[float, float]:
    """(ρ_ℓ, r_ℓ): the class-dependent depth factors of (9.94)–(9.96) for unit λ̃."""
    from torch_crit.theory import layer_learning_rates

    lr = layer_learning_rates(act, layer, depth, fan_in, lambda_b=1.0, lambda_W=1.0, strict=strict)
    return float(lr.lambda_b), float(lr.lambda_W)


def param_groups(model: nn.Module, lr_b: float, lr_W: float, *, optimizer: OptimizerKind | type = "sgd",
                 report: Any | None = None, activation: Any | None = None, mapping: Mapping[str, Any] | None = None,
                 other_lr: float | None = None, strict: bool = True, **defaults: Any) -> list[dict[str, Any]]:
    r"""Per-layer parameter groups implementing the learning-rate equivalence principle (9.94)–(9.96).

    SGD: ``lr(W^(ℓ)) = lr_W · r_ℓ / n_{ℓ-1}``, ``lr(b^(ℓ)) = lr_b · ρ_ℓ`` with the depth factors
    :math:`r_\ell = \lambda_W^{(\ell)}/\tilde\lambda_W`, :math:`\rho_\ell = \lambda_b^{(\ell)}/\tilde\lambda_b`
    of the activation's universality class (module docstring). Adam/AdamW:
    ``lr(W) = lr_W · sqrt(r_ℓ/L) / (n_{ℓ-1} sqrt(m_ℓ))``, ``lr(b) = lr_b · sqrt(ρ_ℓ/L) / sqrt(m_ℓ)``
    (derived in the module docstring).

    Args:
        model: the model (``torch.compile``'d and (Distributed)DataParallel models are unwrapped).
            Not modified.
        lr_b: :math:`\eta\tilde\lambda_b`, the O(1) bias rate.
        lr_W: :math:`\eta\tilde\lambda_W`, the O(1) weight rate.
        optimizer: ``'sgd'`` (default; momentum and Nesterov are fine), ``'adam'``, ``'adamw'`` or
            the torch.optim class.
        report: an :class:`~torch_crit.init.InitReport` (or a ``ModelPlan``) of this model, to
            reuse its analysis; default: ``analyse(model, activation, mapping=mapping)``.
        activation: passed to ``analyse`` when ``report`` is None.
        mapping: passed to ``analyse`` when ``report`` is None.
        other_lr: learning rate for parameters the analysis could not place (default
            ``lr_b / L``).
        strict: if False, activations without a critical point (sigmoid, softplus) get the
            scale-invariant rule (9.94) with a ``RuntimeWarning`` instead of raising.
        **defaults: copied into every group (``weight_decay``, ``momentum``, ``betas`` …).

    Returns:
        A list of dicts with keys ``params`` (list of tensors), ``lr``, ``name`` (for Lightning's
        ``LearningRateMonitor``), ``depth`` (ℓ or ``None``), ``role`` (``'weight'``, ``'bias'``,
        ``'norm'``, ``'embedding'``, ``'other'``) and the ``defaults``. Every trainable parameter is
        in exactly one group; groups without trainable parameters are dropped.

    Raises:
        ValueError: non-positive/non-finite rates; unknown optimizer; ``report`` from another model;
            no trainable parameter.
        NoCriticalPointError: an activation without a critical point and ``strict=True``.
    """
    for nm, v in (("lr_b", lr_b), ("lr_W", lr_W)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{nm} must be a finite number >= 0, got {v!r}")
    if other_lr is not None and not (math.isfinite(other_lr) and other_lr >= 0):
        raise ValueError(f"other_lr must be a finite number >= 0 or None, got {other_lr!r}")
    kind = _optimizer_kind(optimizer)
    root = unwrap_model(model)
    if report is None:
        plan = analyse(root, activation, mapping=mapping)
    else:
        plan = report if isinstance(report, ModelPlan) else getattr(report, "plan", None)
        if not isinstance(plan, ModelPlan):
            raise TypeError(f"report must be an InitReport or a ModelPlan, got {type(report).__name__}")
    names = dict(root.named_parameters(remove_duplicate=False))
    planned = {n for l in plan.layers for _, n in l.params} | {u.name for u in plan.unplaced}
    missing = sorted(planned - set(names))
    extra = sorted(n for n, _ in root.named_parameters() if n not in planned)
    if missing or extra:
        raise ValueError(
            "report/plan does not describe this model: "
            + (f"parameters {missing[:3]} are not in the model" if missing else f"parameters {extra[:3]} are not in the plan")
            + ". Pass the report returned by init_ on this same model, or report=None.")
    L = max(plan.depth, 1)
    taken: set[int] = set()
    groups: list[dict[str, Any]] = []

    def add(name: str, params: list[torch.Tensor], lr: float, depth: int | None, role: str) -> None:
        ps = []
        for p in params:
            if id(p) in taken:
                continue
            taken.add(id(p))
            if p.requires_grad:
                ps.append(p)
        if ps:
            groups.append({**defaults, "params": ps, "lr": float(lr), "name": name, "depth": depth, "role": role})

    cache: dict[tuple[Any, int], tuple[float, float]] = {}

    def factors(act: Any, ell: int) -> tuple[float, float]:
        key = (act, ell)
        if key not in cache:
            cache[key] = _rates(act, ell, L, 1, strict)
        return cache[key]

    for layer in plan.layers:
        act = criticality_activation(layer, plan)
        ell = layer.depth if layer.depth is not None else max(layer.position, 1)
        rho, r = factors(act, min(max(ell, 1), L))
        m = 1 if layer.is_readout else max(layer.fan_out, 1)
        by_role: dict[str, list[torch.Tensor]] = {"weight": [], "bias": []}
        for role, pname in layer.params:
            if pname in layer.tied:
                continue
            is_w = role.endswith("weight") and layer.kind != "norm"
            by_role["weight" if is_w else "bias"].append(names[pname])
        prefix = layer.name + "." if layer.name else ""
        if layer.kind == "norm":
            lr_norm = lr_b * rho if kind == "sgd" else lr_b * math.sqrt(rho / L) / math.sqrt(max(layer.fan_out, 1))
            add(prefix + "norm", by_role["bias"] + by_role["weight"], lr_norm, layer.depth, "norm")
            continue
        fan_in = layer.fan_in
        if kind == "sgd":
            w_lr = lr_W * r / fan_in
            b_lr = lr_b * rho
        else:
            w_lr = lr_W * math.sqrt(r / L) / (fan_in * math.sqrt(m))
            b_lr = lr_b * math.sqrt(rho / L) / math.sqrt(m)
        add(prefix + "weight", by_role["weight"], w_lr, layer.depth,
            "embedding" if layer.kind == "embedding" else "weight")
        add(prefix + "bias", by_role["bias"], b_lr, layer.depth, "bias")
    rest = [p for p in unwrap_model(model).parameters() if id(p) not in taken]
    add("other", rest, lr_b / L if other_lr is None else other_lr, None, "other")
    if not groups:
        raise ValueError(f"{type(root).__name__} has no trainable parameter (all requires_grad=False); "
                         "there is nothing to optimise.")
    return groups
