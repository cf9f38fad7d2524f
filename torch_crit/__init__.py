"""torch_crit: the effective theory of deep networks (Roberts & Yaida), as PyTorch tools.

Public surface (imported lazily so that ``import torch_crit`` stays cheap):

* :func:`init_` — critical initialization in place (``torch_crit.init``).
* :func:`param_groups` — learning-rate equivalence principle groups (``torch_crit.optim``).
* :func:`empirical_ntk`, :func:`empirical_dntk`, :func:`ntk_velocity` — NTK probes
  (``torch_crit.ntk``).
* :class:`KernelFlowMonitor` — kernel-flow monitoring hooks (``torch_crit.monitor``).
* :mod:`torch_crit.theory` — the pure theory engine.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "init_": "torch_crit.init",
    "InitReport": "torch_crit.init",
    "param_groups": "torch_crit.optim",
    "analyse": "torch_crit.architecture",
    "ModelPlan": "torch_crit.architecture",
    "empirical_ntk": "torch_crit.ntk",
    "empirical_dntk": "torch_crit.ntk",
    "ntk_velocity": "torch_crit.ntk",
    "estimate_ntk_memory": "torch_crit.ntk",
    "resolve_learning_rates": "torch_crit.ntk",
    "KernelFlowMonitor": "torch_crit.monitor",
}
_SUBMODULES = {"theory", "ntk", "monitor", "validate", "architecture", "init", "optim", "cli", "distributed", "errors"}

__all__ = sorted(_LAZY) + sorted(_SUBMODULES)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"torch_crit.{name}")
    raise AttributeError(f"module 'torch_crit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
