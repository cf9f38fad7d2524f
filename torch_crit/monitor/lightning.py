"""PyTorch Lightning adapter: :class:`KernelFlowCallback` runs a :class:`KernelFlowMonitor`.

Example::

    import lightning as L
    from torch_crit.monitor import KernelFlowCallback, JSONLWriter

    cb = KernelFlowCallback(probe_x, probe_y, every=100, writers=[JSONLWriter("flow.jsonl")])
    L.Trainer(callbacks=[cb], max_steps=2000).fit(module, loader)

At ``on_train_start`` the callback moves the probe batch to the module's device, builds the
monitor on the ``LightningModule`` and attaches it to the trainer's first optimizer (its step
post-hook fires inside Lightning's ``optimizer.step``, so automatic and manual optimisation both
work). Records also go to every logger in ``trainer.loggers`` (``log_metrics(record, step)``)
unless ``log_to_trainer=False``. The monitor is detached at ``on_train_end``, on exceptions and
at teardown. ``state_dict``/``load_state_dict`` carry the step count and the reference kernels,
so a resumed fit continues ``rel_change`` from the original initialisation.

Lightning is an optional extra: importing this module without it works, constructing the
callback raises :class:`ImportError` naming ``pip install lightning``.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from torch_crit.monitor.monitor import KernelFlowMonitor
from torch_crit.monitor.writers import CallbackWriter, as_writers

__all__ = ["KernelFlowCallback", "HAS_LIGHTNING"]

try:  # Lightning 2.x ships as `lightning`; older installs as `pytorch_lightning`
    from lightning.pytorch.callbacks import Callback as _Callback

    HAS_LIGHTNING = True
except ImportError:  # pragma: no cover - depends on the environment
    try:
        from pytorch_lightning.callbacks import Callback as _Callback

        HAS_LIGHTNING = True
    except ImportError:
        _Callback = object  # type: ignore[assignment,misc]
        HAS_LIGHTNING = False


class KernelFlowCallback(_Callback):  # type: ignore[misc,valid-type]
    """A Lightning callback that runs a :class:`KernelFlowMonitor` on the trained module.

    Args:
        probe_inputs: probe batch ``[N, ...]`` (moved to the module's device and dtype at
            train start).
        probe_targets: optional targets ``[N]``/``[N, k]``.
        log_to_trainer: also send every record to ``trainer.loggers``.
        optimizer_index: which of ``trainer.optimizers`` to attach to.
        **monitor_kwargs: everything else :class:`KernelFlowMonitor` takes (``every``,
            ``metrics``, ``writers``, ``ntk_output``, ``learning_rates``, ``theory`` …).

    Raises:
        ImportError: Lightning is not installed (``pip install lightning``).
    """

    def __init__(
        self,
        probe_inputs: torch.Tensor,
        probe_targets: Optional[torch.Tensor] = None,
        *,
        log_to_trainer: bool = True,
        optimizer_index: int = 0,
        **monitor_kwargs: Any,
    ) -> None:
        if not HAS_LIGHTNING:
            raise ImportError(
                "KernelFlowCallback needs PyTorch Lightning, which is not installed: pip install lightning  "
                "(or use KernelFlowMonitor(model, probe).attach(optimizer) in a plain training loop)."
            )
        super().__init__()
        if not isinstance(probe_inputs, torch.Tensor):
            raise TypeError(f"probe_inputs must be a tensor [N, ...], got {type(probe_inputs).__name__}.")
        self.probe_inputs = probe_inputs.detach().clone()
        self.probe_targets = None if probe_targets is None else probe_targets.detach().clone()
        self.log_to_trainer = bool(log_to_trainer)
        self.optimizer_index = int(optimizer_index)
        self.monitor_kwargs = dict(monitor_kwargs)
        self.monitor: Optional[KernelFlowMonitor] = None
        self._pending_state: Optional[Mapping[str, Any]] = None

    # Lightning hooks ------------------------------------------------------------------

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Build the monitor on ``pl_module`` and attach it to the trainer's optimizer."""
        if not trainer.optimizers:
            raise RuntimeError("KernelFlowCallback: the Trainer has no optimizer to attach to; "
                               "return one from configure_optimizers().")
        p = next(iter(pl_module.parameters()))
        x = self.probe_inputs.to(device=p.device, dtype=p.dtype if self.probe_inputs.is_floating_point() else None)
        y = None if self.probe_targets is None else self.probe_targets.to(p.device)
        kwargs = dict(self.monitor_kwargs)
        writers = as_writers(kwargs.pop("writers", None))
        if self.log_to_trainer and getattr(trainer, "loggers", None):
            loggers = list(trainer.loggers)

            def to_loggers(step: int, record: dict) -> None:
                numeric = {k: float(v) for k, v in record.items()
                           if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
                for lg in loggers:
                    lg.log_metrics(numeric, step=step)

            writers.append(CallbackWriter(to_loggers))
        self.monitor = KernelFlowMonitor(pl_module, x, y, writers=writers, **kwargs)
        start = int(getattr(trainer, "global_step", 0) or 0)
        if self._pending_state is not None:
            self.monitor.load_state_dict(self._pending_state)
            start = int(self._pending_state.get("step", start))
            self._pending_state = None
        opt = trainer.optimizers[self.optimizer_index]
        opt = getattr(opt, "optimizer", opt)  # LightningOptimizer wraps the torch optimizer
        self.monitor.attach(opt, start_step=start)

    def _stop(self) -> None:
        if self.monitor is not None:
            self.monitor.close()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Detach the monitor and close its writers."""
        self._stop()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Detach on a training error (the error propagates)."""
        self._stop()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Detach at teardown (idempotent)."""
        if self.monitor is not None:
            self.monitor.detach()

    def state_dict(self) -> dict[str, Any]:
        """The monitor's step count and reference kernels (checkpointed by Lightning)."""
        return self.monitor.state_dict() if self.monitor is not None else dict(self._pending_state or {})

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; applied when training starts."""
        self._pending_state = dict(state_dict)
