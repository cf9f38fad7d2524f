r"""The infinite-width theory engine: pure functions of (activation, hyperparameters, inputs).

Modules (book chapters in brackets):

* :mod:`.activations` — :class:`Activation`, :func:`get_activation` (registry, modules, callables).
* :mod:`.gaussian` — :func:`expect1`, :func:`expect2` Gaussian expectations (4.25).
* :mod:`.criticality` — susceptibilities, :func:`critical_point`, universality classes [Ch. 5].
* :mod:`.kernels` — :func:`kernel_recursion` (4.118), :func:`ntk_recursion` (9.5).
* :mod:`.learning_rates` — :func:`layer_learning_rates`, the equivalence principle (9.94)–(9.96).
* :mod:`.residual` — residual MLPs [Appendix B].
* ``finite_width``, ``learning``, ``predict`` — 1/n corrections, training and predictions;
  their names are resolved lazily from this package as well.

Example:
    >>> from torch_crit.theory import critical_point, kernel_recursion
    >>> cp = critical_point("relu")
    >>> (cp.C_b, cp.C_W)
    (0.0, 2.0)
"""
from __future__ import annotations

import importlib
from typing import Any

from .activations import Activation, ActivationFunction, available_activations, get_activation, parse_activation_spec
from .criticality import (
    CriticalPoint,
    NoCriticalPointError,
    UniversalityClass,
    chi_parallel,
    chi_perp,
    critical_point,
    criticality_condition,
    fixed_points,
    g_function,
    h_function,
    susceptibilities,
    taylor_constants,
)
from .gaussian import expect1, expect1_dK, expect2
from .kernels import KernelStacks, input_gram, kernel_and_ntk_recursion, kernel_recursion, ntk_recursion, pair_expectations
from .learning_rates import LayerLearningRates, LearningRateScaling, layer_learning_rates, learning_rate_scaling
from .residual import (
    optimal_aspect_ratio,
    optimal_residual_gamma,
    residual_chi_parallel,
    residual_chi_perp,
    residual_critical_point,
    residual_kernel_and_ntk_recursion,
    residual_kernel_recursion,
    residual_nu,
)

__all__ = [
    "Activation", "ActivationFunction", "available_activations", "get_activation", "parse_activation_spec",
    "CriticalPoint", "NoCriticalPointError", "UniversalityClass", "chi_parallel", "chi_perp",
    "critical_point", "criticality_condition", "fixed_points", "g_function", "h_function", "susceptibilities",
    "taylor_constants",
    "expect1", "expect1_dK", "expect2",
    "KernelStacks", "input_gram", "kernel_and_ntk_recursion", "kernel_recursion", "ntk_recursion",
    "pair_expectations",
    "LayerLearningRates", "LearningRateScaling", "layer_learning_rates", "learning_rate_scaling",
    "optimal_aspect_ratio", "optimal_residual_gamma", "residual_chi_parallel", "residual_chi_perp",
    "residual_critical_point", "residual_kernel_and_ntk_recursion", "residual_kernel_recursion",
    "residual_nu",
]

# Modules written by other parts of the project; their public names resolve lazily.
_LAZY_MODULES = ("finite_width", "learning", "predict")


def __getattr__(name: str) -> Any:
    if name in _LAZY_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    for mod_name in _LAZY_MODULES:
        try:
            mod = importlib.import_module(f"{__name__}.{mod_name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{mod_name}":
                continue
            raise
        if name in getattr(mod, "__all__", ()) or (not name.startswith("_") and hasattr(mod, name)):
            return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(_LAZY_MODULES))
