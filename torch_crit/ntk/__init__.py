"""Empirical neural tangent kernels: NTK (8.5)–(8.7), dNTK (11.8) and NTK velocity.

* :func:`empirical_ntk` — the (λ-weighted) empirical NTK Θ / H of any differentiable model,
  structured per layer (Linear/Conv through the fused C++/CUDA primitive) with an exact
  torch.func path for everything else (``torch_crit.ntk.empirical``).
* :func:`empirical_dntk`, :func:`ntk_velocity` — from ``torch_crit.ntk.dntk`` (imported
  lazily).
* :func:`resolve_learning_rates` — the book's λ (8.6) as per-parameter scales.
* :func:`estimate_ntk_memory` — the memory an NTK call will need, before allocating it.
* :func:`layer_inputs_and_cotangents` — the pure-functional capture behind the structured
  path (``torch_crit.ntk.capture``).
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "empirical_ntk": "torch_crit.ntk.empirical",
    "plan_ntk": "torch_crit.ntk.empirical",
    "NonDifferentiableError": "torch_crit.ntk.empirical",
    "ZeroJacobianWarning": "torch_crit.ntk.empirical",
    "NTKPlan": "torch_crit.ntk.plan",
    "LayerPlan": "torch_crit.ntk.plan",
    "estimate_ntk_memory": "torch_crit.ntk.memory",
    "MemoryEstimate": "torch_crit.ntk.memory",
    "NTKMemoryError": "torch_crit.ntk.memory",
    "resolve_learning_rates": "torch_crit.ntk.learning_rates",
    "layer_inputs_and_cotangents": "torch_crit.ntk.capture",
    "trace_calls": "torch_crit.ntk.capture",
    "CallInfo": "torch_crit.ntk.capture",
    "empirical_dntk": "torch_crit.ntk.dntk",
    "ntk_velocity": "torch_crit.ntk.dntk",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'torch_crit.ntk' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
