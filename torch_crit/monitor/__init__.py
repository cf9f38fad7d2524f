"""Kernel-flow monitoring hooks: watch the preactivation kernels and the NTK move in training.

* :class:`KernelFlowMonitor` — attaches to an optimizer (a step post-hook), probes a fixed
  batch every ``every`` steps, computes the chosen metrics and hands flat records to writers.
* :mod:`~torch_crit.monitor.metrics` — the metric registry (:data:`METRICS`,
  :func:`register_metric`) and the pure functions behind it.
* :mod:`~torch_crit.monitor.writers` — :class:`JSONLWriter`, :class:`CSVWriter`,
  :class:`TensorBoardWriter`, :class:`CallbackWriter`.
* :func:`plot` — figures from a written log (matplotlib, optional extra).
* :class:`KernelFlowCallback` — a PyTorch Lightning callback (optional extra).
"""
from __future__ import annotations

from typing import Any

from torch_crit.monitor.metrics import (
    METRICS,
    LayerInfo,
    Metric,
    ProbeState,
    effective_rank,
    kernel_summary,
    kernel_target_alignment,
    participation_ratio,
    preactivation_kernel,
    register_metric,
    relative_change,
    top_eigenvalues,
)
from torch_crit.monitor.monitor import DEFAULT_METRICS, KernelFlowMonitor, find_layers
from torch_crit.monitor.plots import plot
from torch_crit.monitor.writers import (
    CallbackWriter,
    CSVWriter,
    JSONLWriter,
    TensorBoardWriter,
    Writer,
    read_csv,
    read_jsonl,
    read_log,
)

__all__ = [
    "KernelFlowMonitor",
    "DEFAULT_METRICS",
    "find_layers",
    "METRICS",
    "Metric",
    "ProbeState",
    "LayerInfo",
    "register_metric",
    "preactivation_kernel",
    "kernel_summary",
    "relative_change",
    "top_eigenvalues",
    "effective_rank",
    "participation_ratio",
    "kernel_target_alignment",
    "Writer",
    "JSONLWriter",
    "CSVWriter",
    "TensorBoardWriter",
    "CallbackWriter",
    "read_jsonl",
    "read_csv",
    "read_log",
    "plot",
    "KernelFlowCallback",
]


def __getattr__(name: str) -> Any:
    if name == "KernelFlowCallback":  # lazy: importing it needs Lightning
        from torch_crit.monitor.lightning import KernelFlowCallback

        return KernelFlowCallback
    raise AttributeError(f"module 'torch_crit.monitor' has no attribute {name!r}")
