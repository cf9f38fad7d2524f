r"""Kernel-flow monitoring during training: :class:`KernelFlowMonitor`.

Example::

    import torch, torch_crit
    from torch_crit.monitor import KernelFlowMonitor, JSONLWriter

    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(128, 8), torch.randn(128, 1)
    with KernelFlowMonitor(model, x[:16], y[:16], every=10,
                           writers=[JSONLWriter("runs/flow.jsonl")]).attach(opt) as mon:
        for _ in range(100):                          # the training loop is unchanged
            loss = ((model(x) - y) ** 2).mean()
            opt.zero_grad(); loss.backward(); opt.step()
    torch_crit.monitor.plot("runs/flow.jsonl")

What it does. ``attach(optimizer)`` registers one optimizer *step post-hook*
(:meth:`torch.optim.Optimizer.register_step_post_hook`). After every ``every``-th step (and
once at attach time, step 0) it runs a *probe*: the model in eval mode on the fixed probe
batch, with forward hooks on every Linear/Conv layer installed for that one pass only, then
the empirical NTK on the probe batch (:func:`torch_crit.empirical_ntk`). Every chosen metric
(:mod:`torch_crit.monitor.metrics`) turns the captured tensors into a flat record that goes to
every writer (:mod:`torch_crit.monitor.writers`).

Guarantees (tested bit for bit against a run without the monitor):

* parameters, their ``.grad`` (the grad objects are set aside during the probe and put back),
  buffers (eval mode: BatchNorm statistics are not updated), every module's ``training`` flag,
  and the CPU and CUDA RNG states (:func:`torch.random.fork_rng`) are as they were;
* between logging steps nothing is installed but the one optimizer post-hook (a step counter);
* ``detach()`` removes every hook, also when training raised (context manager ``finally``).

Theory at step 0. When the monitored layers form an MLP (Linear layers only, one hidden
activation), the step-0 record also holds the infinite-width kernels :math:`K^{(\ell)}` of the
recursion (4.118) (:func:`torch_crit.theory.kernel_recursion`) next to the measured ones.
:math:`C_b, C_W` and the activation come from ``theory=dict(activation=..., C_b=..., C_W=...)``
or, by default, from the model: the activation from :func:`torch_crit.architecture.analyse`
(falling back to the module registered right after each layer), and
:math:`C_W^{(\ell)} = n_{\ell-1}\,\overline{W^2}`, :math:`C_b^{(\ell)} = \overline{b^2}` read
off the initial weights (the realised variances, (2.19)–(2.22)).
"""
from __future__ import annotations

import contextlib
import time
import warnings
from typing import Any, Callable, Iterable, Literal, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from torch_crit.monitor.metrics import (
    LayerInfo,
    Metric,
    ProbeState,
    is_finite,
    preactivation_kernel,
    resolve_metrics,
)
from torch_crit.monitor.writers import as_writers
from torch_crit.errors import InvalidArgumentError
from torch_crit.ntk.inputs import check_probe, unwrap_model

__all__ = ["KernelFlowMonitor", "DEFAULT_METRICS", "find_layers"]

#: metrics used when ``metrics=None`` (``ntk_alignment`` is added when targets are given).
DEFAULT_METRICS: tuple[str, ...] = ("preact_kernel", "ntk", "ntk_per_layer", "ntk_spectrum", "theory")

_LAYER_TYPES = (nn.Linear, nn.modules.conv._ConvNd)

NtkFn = Callable[..., Any]


def find_layers(model: nn.Module, names: Optional[Sequence[str]] = None) -> dict[str, nn.Module]:
    """The modules whose outputs are monitored, by qualified name (registration order).

    Args:
        model: the network.
        names: explicit module names; default every ``nn.Linear`` and ``nn.Conv*`` module.

    Returns:
        ``{name: module}``.
    """
    modules = dict(model.named_modules())
    if names is None:
        return {n: m for n, m in modules.items() if isinstance(m, _LAYER_TYPES)}
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"layers={list(names)!r}: no module named {missing} in the model; "
                         f"available: {[n for n in modules if n][:20]}...")
    return {n: modules[n] for n in names}


def _fan_in_width(m: nn.Module) -> tuple[int, int]:
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if isinstance(m, nn.modules.conv._ConvNd):
        ks = 1
        for s in m.kernel_size:
            ks *= int(s)
        return m.in_channels // m.groups * ks, m.out_channels
    w = getattr(m, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() >= 2:
        return int(w[0].numel()), int(w.shape[0])
    return 0, 0


def _activations(model: nn.Module, layer_names: Sequence[str], example_inputs: Any = None) -> dict[str, Any]:
    """Activation after each layer (an ``nn.Module`` or a name), ``None`` where there is none.

    From the :class:`~torch_crit.architecture.ModelPlan` when :func:`torch_crit.architecture.analyse`
    is available and names one; otherwise the documented module walk: for every monitored
    layer, the first module registered after it (``named_modules`` order) that is defined in
    ``torch.nn.modules.activation``, stopping at the next monitored layer.
    """
    out: dict[str, Any] = {n: None for n in layer_names}
    try:
        from torch_crit.architecture import analyse

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            plan = analyse(model, example_inputs=example_inputs)
        for lay in getattr(plan, "layers", ()):
            name = getattr(lay, "name", None)
            act = getattr(lay, "activation", None)
            if name in out and act is not None:
                out[name] = act
        if any(v is not None for v in out.values()):
            return out
    except Exception:  # the plan is optional: fall back to the module walk
        pass
    current: Optional[str] = None
    wanted = set(layer_names)
    for name, m in model.named_modules():
        if name in wanted:
            current = name
        elif current is not None and type(m).__module__ == "torch.nn.modules.activation":
            out[current] = m
            current = None
    return out


def _act_name(act: Any) -> Optional[str]:
    if act is None:
        return None
    if isinstance(act, str):
        return act
    if isinstance(act, nn.Module):
        return type(act).__name__.lower()
    return str(getattr(act, "key", None) or getattr(act, "name", None) or act)



def _check_probe_runs(model: nn.Module, probe_inputs: torch.Tensor) -> None:
    """Run the model on one probe input (eval mode, each module's flag restored) so that a wrong
    probe shape fails here, naming ``probe_inputs``, and not later inside a training step."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(probe_inputs[:1])
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        raise InvalidArgumentError(
            f"KernelFlowMonitor: the model cannot be applied to probe_inputs of shape "
            f"{tuple(probe_inputs.shape)} ({type(exc).__name__}: {str(exc).splitlines()[0]}); pass "
            f"probe_inputs shaped like a training batch [N, ...]."
        ) from exc
    finally:
        for m, flag in modes:
            m.training = flag

class KernelFlowMonitor:
    r"""Log the flow of the preactivation kernels and of the NTK during training.

    Args:
        model: the network being trained.
        probe_inputs: the fixed probe batch ``[N, ...]`` (``N >= 2``), on the model's device,
            with the model's floating dtype. Copied; the caller's tensor is never modified.
        probe_targets: optional ``[N]`` or ``[N, k]`` targets (integer class labels are
            one-hot encoded over the ``k`` outputs); enables the ``ntk_alignment`` metric.
        every: log after every ``every``-th optimizer step (and at step 0, on attach).
        metrics: names in :data:`~torch_crit.monitor.metrics.METRICS`, :class:`Metric`
            objects or callables ``fn(state) -> dict``; default :data:`DEFAULT_METRICS`
            (+ ``"ntk_alignment"`` with targets). ``"ntk_velocity"`` adds the dNTK-predicted
            one-step NTK change (11.10) against the measured one (plain SGD only).
        writers: writers (``write(step, record)``/``close()``), ``.jsonl``/``.csv`` paths or
            callables ``fn(step, record)``.
        ntk_output: ``"trace"`` (:math:`\sum_a\Theta_{\alpha\beta;aa}`, ``[N, N]``) or
            ``"full"`` (``[N, N, k, k]``).
        learning_rates: the learning-rate tensor λ of the NTK (8.5): ``None`` (λ = 1, the
            plain :math:`JJ^\top`), ``"optimizer"`` (the attached optimizer's param groups:
            the NTK that drives its SGD steps, (7.17)), or anything
            :func:`torch_crit.empirical_ntk` accepts.
        layers: module names to monitor; default every Linear/Conv module.
        theory: ``"auto"`` (read activation/C_b/C_W from the model, see the module doc),
            a ``dict(activation=..., C_b=..., C_W=...)``, or ``None`` to skip the step-0 theory.
        ntk_fn: NTK function with :func:`torch_crit.empirical_ntk`'s signature
            ``fn(model, x, *, output=..., per_layer=..., learning_rates=...)``; default
            :func:`torch_crit.empirical_ntk`.
        ntk_kwargs: extra keyword arguments for ``ntk_fn`` (e.g. ``dtype=torch.float64``).
        keep_records: keep every record in :attr:`records` (default ``True``).

    Note:
        ``"ntk_velocity"`` (11.10): after a logging step *t* the monitor keeps, for one step
        only, a forward hook on the model (it records the next differentiable forward pass's
        inputs and, through a tensor hook on its output, the error factors
        :math:`\epsilon = \partial\mathcal L/\partial z`) and an optimizer step pre-hook that
        evaluates :func:`torch_crit.ntk_velocity` at :math:`\theta_t`, before the update. After
        the step it measures :math:`\Theta_{t+1}-\Theta_t` and writes the comparison as a record
        at step *t+1*. The prediction is exact to first order for plain SGD (no momentum or
        weight decay) on a loss that depends on the parameters only through that output, with
        the forward/backward pass run before ``optimizer.step()`` (not inside a closure). It
        costs one dNTK-velocity evaluation and one extra NTK per logging step.

    Attributes:
        step: optimizer steps counted since attach (plus ``start_step``).
        records: the records logged so far (flat dicts).
        last_state: the :class:`ProbeState` of the latest probe (its tensors).
    """

    def __init__(
        self,
        model: nn.Module,
        probe_inputs: torch.Tensor,
        probe_targets: Optional[torch.Tensor] = None,
        *,
        every: int = 100,
        metrics: Optional[Iterable[Union[str, Metric, Callable[[ProbeState], Mapping[str, Any]]]]] = None,
        writers: Any = None,
        ntk_output: Literal["trace", "full"] = "trace",
        learning_rates: Any = None,
        layers: Optional[Sequence[str]] = None,
        theory: Union[Literal["auto"], Mapping[str, Any], None] = "auto",
        ntk_fn: Optional[NtkFn] = None,
        ntk_kwargs: Optional[Mapping[str, Any]] = None,
        keep_records: bool = True,
    ) -> None:
        model = unwrap_model(model, "KernelFlowMonitor")  # a torch.compile'd model: its _orig_mod
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive int (log after every `every`-th step), got {every!r}.")
        if ntk_output not in ("trace", "full"):
            raise ValueError(f"ntk_output must be 'trace' or 'full', got {ntk_output!r}.")
        if not isinstance(probe_inputs, torch.Tensor):
            raise TypeError(f"probe_inputs must be a tensor [N, ...], got {type(probe_inputs).__name__}.")
        if probe_inputs.dim() < 1 or probe_inputs.shape[0] < 2:
            raise ValueError(f"probe_inputs must be a batch of at least 2 inputs [N, ...] (kernels need pairs); "
                             f"got shape {tuple(probe_inputs.shape)}.")
        self._check_device_dtype(model, probe_inputs)
        check_probe(probe_inputs, "KernelFlowMonitor", "probe_inputs")
        _check_probe_runs(model, probe_inputs)
        self.model = model
        self.probe_inputs = probe_inputs.detach().clone()
        self.probe_targets: Optional[torch.Tensor] = None
        if probe_targets is not None:
            if not isinstance(probe_targets, torch.Tensor):
                raise TypeError(f"probe_targets must be a tensor [N] or [N, k], got {type(probe_targets).__name__}.")
            if probe_targets.shape[0] != probe_inputs.shape[0]:
                raise ValueError(f"probe_targets has {probe_targets.shape[0]} rows but probe_inputs has "
                                 f"{probe_inputs.shape[0]}; pass one target per probe input.")
            self.probe_targets = probe_targets.detach().clone()
        self.every = every
        self.ntk_output = ntk_output
        self.learning_rates = learning_rates
        if isinstance(theory, Mapping):
            unknown = set(theory) - {"activation", "C_b", "C_W"}
            if unknown:
                raise ValueError(f"theory= accepts the keys activation, C_b, C_W; got unknown {sorted(unknown)}. "
                                 "Example: theory=dict(activation='tanh', C_b=0.0, C_W=1.0).")
        elif theory is not None and theory != "auto":
            raise ValueError(f"theory must be 'auto', a dict(activation=..., C_b=..., C_W=...) or None; got {theory!r}.")
        self.theory = theory
        self.ntk_kwargs = dict(ntk_kwargs or {})
        self.keep_records = keep_records
        if metrics is None:
            metrics = DEFAULT_METRICS + (("ntk_alignment",) if probe_targets is not None else ())
        self.metrics = resolve_metrics(metrics)
        self._needs = frozenset().union(*(m.needs for m in self.metrics)) if self.metrics else frozenset()
        if "targets" in self._needs and self.probe_targets is None:
            names = [m.name for m in self.metrics if "targets" in m.needs]
            raise ValueError(f"metrics {names} need probe_targets; pass probe_targets or drop those metrics.")
        self._layers = find_layers(model, layers)
        self.ntk_fn = ntk_fn
        if self._needs & {"ntk", "ntk_per_layer", "velocity"} and ntk_fn is None:
            self.ntk_fn = _default_ntk_fn()
        self._velocity_fn: Optional[NtkFn] = None
        if "velocity" in self._needs:
            self._velocity_fn = _default_velocity_fn()
        self.writers = as_writers(writers)
        self.step = 0
        self.records: list[dict[str, Any]] = []
        self.last_state: Optional[ProbeState] = None
        self._optimizer: Optional[torch.optim.Optimizer] = None
        self._handles: list[RemovableHandle] = []
        self._velocity_handles: list[RemovableHandle] = []
        self._velocity_pending: dict[str, Any] = {}
        self._ref: dict[str, Any] = {}
        self._layer_infos: Optional[tuple[LayerInfo, ...]] = None
        self._warned: set[tuple[type, str]] = set()
        self._acts: dict[str, Any] = {}

    # ------------------------------------------------------------------ validation

    @staticmethod
    def _check_device_dtype(model: nn.Module, x: torch.Tensor) -> None:
        p = next((p for p in model.parameters()), None)
        if p is None:
            raise ValueError("KernelFlowMonitor: the model has no parameters, so it has no NTK to monitor.")
        if x.device != p.device:
            raise ValueError(
                f"probe_inputs are on {x.device} but the model's parameters are on {p.device}; "
                f"move the probe batch first: probe_inputs.to({str(p.device)!r})."
            )
        if x.is_floating_point() and x.dtype != p.dtype:
            raise TypeError(
                f"probe_inputs have dtype {x.dtype} but the model's parameters are {p.dtype}; "
                f"convert the probe batch first: probe_inputs.to({p.dtype})."
            )

    # ------------------------------------------------------------------ attach / detach

    def attach(self, optimizer: torch.optim.Optimizer, *, start_step: Optional[int] = None,
               log_initial: bool = True) -> "KernelFlowMonitor":
        """Start monitoring the steps of ``optimizer``; returns ``self`` (a context manager).

        Args:
            optimizer: the optimizer whose ``step()`` drives training.
            start_step: the step count to start from (resume: the number of steps already
                taken; writers opened with ``resume=True`` skip steps they already hold);
                default :attr:`step` (0, or the value restored by :meth:`load_state_dict`).
            log_initial: probe at attach time when ``start_step`` is a logging step.

        Returns:
            ``self``; ``with monitor.attach(opt): ...`` detaches and closes the writers on exit.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"attach() needs a torch.optim.Optimizer, got {type(optimizer).__name__}.")
        if self._handles:
            raise RuntimeError("this KernelFlowMonitor is already attached; call detach() first.")
        if start_step is None:
            start_step = self.step
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an int >= 0, got {start_step!r}.")
        self._optimizer = optimizer
        self.step = int(start_step)
        self._handles.append(optimizer.register_step_post_hook(self._on_step))
        if log_initial and self.step % self.every == 0:
            self.log_now()
        return self

    def detach(self) -> None:
        """Remove every hook this monitor installed (idempotent). Writers stay open."""
        for h in self._handles + self._velocity_handles:
            h.remove()
        self._handles.clear()
        self._velocity_handles.clear()
        self._velocity_pending.clear()
        self._optimizer = None

    def close(self) -> None:
        """Detach and close every writer."""
        self.detach()
        errors = []
        for w in self.writers:
            try:
                w.close()
            except Exception as exc:  # close every writer even if one fails
                errors.append(exc)
        if errors:
            raise errors[0]

    def __repr__(self) -> str:
        return (f"KernelFlowMonitor(every={self.every}, probe={tuple(self.probe_inputs.shape)}, "
                f"ntk_output={self.ntk_output!r}, metrics={[m.name for m in self.metrics]}, "
                f"writers={[type(w).__name__ for w in self.writers]}, step={self.step}, attached={self.attached})")

    @property
    def attached(self) -> bool:
        """Whether the optimizer hook is installed."""
        return bool(self._handles)

    def __enter__(self) -> "KernelFlowMonitor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Step counter and the reference kernels (for ``rel_change`` after a resume)."""
        return {"step": self.step, **{k: v for k, v in self._ref.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (before :meth:`attach`, which then continues from its step)."""
        self.step = int(state.get("step", 0))
        self._ref = {k: v for k, v in state.items() if k != "step"}

    # ------------------------------------------------------------------ hooks

    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.step += 1
        if self._velocity_pending.get("armed") and self._velocity_pending.get("step") == self.step:
            self._finish_velocity()
        if self.step % self.every == 0:
            self.log_now()

    def log_now(self) -> Optional[dict[str, Any]]:
        """Probe and write a record for the current step now; returns it (``None`` if skipped).

        A step every writer already holds (``resume=True``) is skipped without probing.
        """
        if self.writers and all(getattr(w, "has_step", lambda s: False)(self.step) for w in self.writers):
            return None
        t0 = time.perf_counter()
        state = self._probe(self.step)
        record = self._evaluate(state)
        record["monitor/probe_s"] = time.perf_counter() - t0
        self._emit(self.step, record)
        if "velocity" in self._needs and self._optimizer is not None:
            self._arm_velocity()
        return record

    def _emit(self, step: int, record: dict[str, Any]) -> None:
        record = {"step": step, "time": time.time(), **record}
        if self.keep_records:
            self.records.append(record)
        for w in self.writers:
            w.write(step, record)

    def _warn_once(self, message: str, category: type[Warning]) -> None:
        key = (category, message)
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, category, stacklevel=2)

    # ------------------------------------------------------------------ probing

    @contextlib.contextmanager
    def _isolated(self) -> Any:
        """Eval mode, saved RNG state, grads set aside; everything restored on exit."""
        model = self.model
        modes = [(m, m.training) for m in model.modules()]
        params = list(model.parameters())
        grads = [p.grad for p in params]
        devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices, enabled=True):
            try:
                for p in params:
                    p.grad = None
                model.eval()
                yield
            finally:
                for m, mode in modes:
                    m.training = mode
                for p, g in zip(params, grads):
                    p.grad = g

    def _capture_preacts(self) -> tuple[Optional[torch.Tensor], dict[str, torch.Tensor], Optional[torch.Tensor]]:
        """One forward pass with temporary forward hooks.

        Returns:
            outputs ``[N, ...]``, per-layer preactivation kernels ``{label: [N, N]}`` (float64;
            empty unless a metric needs them) and the first monitored layer's input.
        """
        want_kernels = "preacts" in self._needs
        captured: dict[str, torch.Tensor] = {}
        order: list[str] = []
        first_input: list[torch.Tensor] = []
        handles: list[RemovableHandle] = []

        def make_hook(name: str) -> Callable[..., None]:
            def hook(mod: nn.Module, inp: Any, out: Any) -> None:
                if name in captured:
                    self._warn_once(f"KernelFlowMonitor: module {name!r} ran more than once in the probe forward "
                                    "pass; its first call is monitored.", RuntimeWarning)
                    return
                if isinstance(out, torch.Tensor):
                    # the kernel is taken at once: a later in-place activation (ReLU(inplace=True))
                    # would otherwise overwrite the captured preactivations
                    captured[name] = preactivation_kernel(out) if want_kernels else out.new_empty(0)
                    order.append(name)
                    if not first_input and isinstance(inp, tuple) and inp and isinstance(inp[0], torch.Tensor):
                        first_input.append(inp[0].detach().clone())

            return hook

        try:
            for name, mod in self._layers.items():
                handles.append(mod.register_forward_hook(make_hook(name)))
            with torch.no_grad():
                out = self.model(self.probe_inputs)
        finally:
            for h in handles:
                h.remove()
        if self._layer_infos is None:
            acts = _activations(self.model, order, self.probe_inputs)
            self._acts = acts
            infos = []
            for d, name in enumerate(order, start=1):
                mod = self._layers[name]
                fan_in, width = _fan_in_width(mod)
                infos.append(LayerInfo(name, f"l{d:02d}.{name}" if name else f"l{d:02d}.model", d,
                                       type(mod).__name__, fan_in, width, _act_name(acts.get(name))))
            self._layer_infos = tuple(infos)
        labels = {li.name: li.label for li in self._layer_infos}
        kernels = {labels[n]: t for n, t in captured.items() if n in labels} if want_kernels else {}
        outputs = out.detach() if isinstance(out, torch.Tensor) else None
        return outputs, kernels, (first_input[0] if first_input else None)

    def _resolve_lr(self) -> Any:
        if isinstance(self.learning_rates, str) and self.learning_rates == "optimizer":
            if self._optimizer is None:
                raise RuntimeError("learning_rates='optimizer' needs an attached optimizer; call attach(opt) first.")
            return self._optimizer.param_groups
        return self.learning_rates

    def _ntk_label(self, key: Any) -> str:
        infos = {li.name: li.label for li in (self._layer_infos or ())}
        return infos.get(str(key), str(key))

    def _call_ntk(self, per_layer: bool) -> Any:
        """``ntk_fn`` on the probe batch; its warnings (fallback notices) re-emitted once per monitor."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.enable_grad():
                res = self.ntk_fn(self.model, self.probe_inputs, output=self.ntk_output, per_layer=per_layer,
                                  learning_rates=self._resolve_lr(), **self.ntk_kwargs)
        for w in caught:
            self._warn_once(str(w.message), w.category)
        return res

    def _compute_ntk(self) -> tuple[Optional[torch.Tensor], dict[str, torch.Tensor]]:
        per_layer = "ntk_per_layer" in self._needs
        res = self._call_ntk(per_layer)
        if per_layer:
            if not isinstance(res, Mapping):
                raise TypeError(f"ntk_fn(per_layer=True) must return a dict of per-layer kernels, got {type(res).__name__}.")
            layers = {self._ntk_label(k): v.detach() for k, v in res.items()}
            total = None
            for v in layers.values():
                total = v.clone() if total is None else total + v
            return total, layers
        return res.detach(), {}

    def _theory_kernels(
        self, first_input: Optional[torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], Optional[torch.Tensor]]:
        """Step-0 theory for an MLP: K^(ℓ) (4.118) per monitored layer ``[N, N]``, info, Θ^(L) ``[N, N]``."""
        infos = self._layer_infos or ()
        if self.theory is None or first_input is None or not infos:
            return {}, {}, None
        if any(li.kind != "Linear" for li in infos):
            return {}, {}, None
        mods = [self._layers[li.name] for li in infos]
        hidden = [self._acts.get(li.name) for li in infos[:-1]]
        if isinstance(self.theory, Mapping):
            activation = self.theory.get("activation", hidden[0] if hidden else None)
            C_b = [float(self.theory["C_b"])] * len(infos) if "C_b" in self.theory else None
            C_W = [float(self.theory["C_W"])] * len(infos) if "C_W" in self.theory else None
            source = "user"
        else:
            names = {_act_name(a) for a in hidden}
            if len(names) > 1 or None in names:
                if len(names) > 1:
                    self._warn_once(f"KernelFlowMonitor: the hidden layers use different activations {sorted(map(str, names))}; "
                                    "no step-0 theory comparison (pass theory=dict(...) to force one).", UserWarning)
                return {}, {}, None
            activation, C_b, C_W, source = (hidden[0] if hidden else None), None, None, "weights"
        with torch.no_grad():
            if C_W is None:
                C_W = [float(m.weight.detach().double().pow(2).mean() * m.in_features) for m in mods]
            if C_b is None:
                C_b = [float(m.bias.detach().double().pow(2).mean()) if m.bias is not None else 0.0 for m in mods]
        lam_b, lam_W = self._theory_lambdas(mods)
        x = first_input.reshape(first_input.shape[0], -1).to(torch.float64)
        try:
            kernels, thetas = _kernel_recursion(activation, C_b, C_W, x, len(infos), lam_b, lam_W)
        except ImportError as exc:
            self._warn_once(f"KernelFlowMonitor: the theory engine is not available ({exc}); the step-0 theory "
                            "comparison is skipped.", UserWarning)
            return {}, {}, None
        out = {li.label: kernels[i] for i, li in enumerate(infos)}
        info = {"activation": _act_name(activation) if activation is not None else "none", "source": source,
                "C_b": float(sum(C_b) / len(C_b)), "C_W": float(sum(C_W) / len(C_W))}
        return out, info, (None if thetas is None else thetas[-1])

    def _theory_lambdas(self, mods: Sequence[nn.Module]) -> tuple[Optional[list[float]], Optional[list[float]]]:
        """Per-layer (λ_b, λ_W) of (8.6) from the monitored NTK's learning rates: λ_W = n_{ℓ-1} λ_weight."""
        if "ntk" not in self._needs:
            return None, None
        try:
            from torch_crit.ntk.learning_rates import resolve_learning_rates

            lam = resolve_learning_rates(self.model, self._resolve_lr())
        except (ImportError, RuntimeError, TypeError, ValueError):
            return None, None
        names = {id(p): n for n, p in self.model.named_parameters()}
        lb, lw = [], []
        for m in mods:
            lw.append(lam.get(names.get(id(m.weight), ""), 0.0) * m.in_features)
            lb.append(lam.get(names.get(id(m.bias), ""), 0.0) if m.bias is not None else 0.0)
        return lb, lw

    def _probe(self, step: int) -> ProbeState:
        needs = self._needs
        with self._isolated():
            outputs, kernels, first_input = self._capture_preacts()
            ntk, ntk_layers = (None, {})
            if needs & {"ntk", "ntk_per_layer", "velocity"}:
                ntk, ntk_layers = self._compute_ntk()
        nonfinite = [lab for lab, K in kernels.items() if not is_finite(K)]
        if ntk is not None and not is_finite(ntk):
            nonfinite.append("ntk")
        if nonfinite:
            warnings.warn(f"KernelFlowMonitor: non-finite probe kernels at step {step}: {nonfinite}; logged as "
                          "nan, training continues.", RuntimeWarning, stacklevel=2)
        if "ntk" not in self._ref and ntk is not None:
            self._ref.update(ref_step=step, ntk=ntk, ntk_layers=dict(ntk_layers), preact=dict(kernels))
        elif "preact" not in self._ref and kernels:
            self._ref.update(ref_step=step, preact=dict(kernels))
        theory_kernels, theory_info, theory_ntk = ({}, {}, None)
        if "theory" in needs and step == 0:
            theory_kernels, theory_info, theory_ntk = self._theory_kernels(first_input)
        if theory_ntk is not None and outputs is not None and ntk is not None:
            k = outputs.reshape(outputs.shape[0], -1).shape[1]
            eye = torch.eye(k, dtype=torch.float64, device=theory_ntk.device)
            theory_ntk = k * theory_ntk if self.ntk_output == "trace" else theory_ntk[:, :, None, None] * eye
        targets = self._targets(outputs)
        state = ProbeState(
            step=step,
            layers=self._layer_infos or (),
            outputs=outputs,
            targets=targets,
            preact_kernels=kernels,
            preact_kernels0=self._ref.get("preact", {}),
            ntk=ntk,
            ntk0=self._ref.get("ntk"),
            ntk_layers=ntk_layers,
            ntk_layers0=self._ref.get("ntk_layers", {}),
            ntk_output=self.ntk_output,
            ref_step=self._ref.get("ref_step"),
            theory_kernels=theory_kernels,
            theory_info=theory_info,
            theory_ntk=theory_ntk,
        )
        state = _with_nonfinite(state, nonfinite)
        self.last_state = state
        return state

    def _targets(self, outputs: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        y = self.probe_targets
        if y is None:
            return None
        if not y.is_floating_point():
            if y.dim() == 1 and outputs is not None and outputs.dim() == 2 and outputs.shape[1] > 1:
                return torch.nn.functional.one_hot(y.long(), outputs.shape[1]).to(torch.float64)
            return y.to(torch.float64)
        return y.to(torch.float64)

    def _evaluate(self, state: ProbeState) -> dict[str, Any]:
        record: dict[str, Any] = {}
        if state.extras.get("nonfinite"):
            record["monitor/nonfinite"] = ",".join(state.extras["nonfinite"])
        for m in self.metrics:
            out = m.fn(state)
            for k, v in out.items():
                # tensors and numpy scalars become Python numbers (the writers' record contract)
                if not isinstance(v, (bool, int, float, str, type(None))) and hasattr(v, "item"):
                    v = v.item()
                record[str(k)] = v
        return record

    # ------------------------------------------------------------------ dNTK velocity

    def _arm_velocity(self) -> None:
        """After a logging step t: capture the next training batch and its error factor."""
        for h in self._velocity_handles:
            h.remove()
        self._velocity_handles.clear()
        pend: dict[str, Any] = {"armed": True, "step": self.step + 1, "ntk": self.last_state.ntk if self.last_state else None}
        self._velocity_pending = pend

        def fwd_hook(mod: nn.Module, inp: Any, out: Any) -> None:
            if not (isinstance(out, torch.Tensor) and out.requires_grad and inp and isinstance(inp[0], torch.Tensor)):
                return
            pend["x"] = inp[0].detach()

            def grad_hook(g: torch.Tensor) -> None:
                pend["error"] = g.detach().clone()

            out.register_hook(grad_hook)

        def pre_hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            # parameters are still θ_t here: the prediction is taken at the point of the step
            for h in self._velocity_handles:
                h.remove()
            self._velocity_handles.clear()
            if "x" not in pend or "error" not in pend:
                return
            rates = self._velocity_rates(opt)
            if rates is None:
                return
            lam, eta = rates
            with self._isolated(), torch.enable_grad():
                pred = self._velocity_fn(self.model, self.probe_inputs, pend["x"], pend["error"],
                                         learning_rates=lam, eta=eta, dtype=self.ntk_kwargs.get("dtype"))
            pred = pred.detach()
            pend["pred"] = torch.einsum("ijaa->ij", pred) if self.ntk_output == "trace" else pred

        self._velocity_handles.append(self.model.register_forward_hook(fwd_hook))
        if self._optimizer is not None:
            self._velocity_handles.append(self._optimizer.register_step_pre_hook(pre_hook))

    def _velocity_rates(self, opt: torch.optim.Optimizer) -> Optional[tuple[Any, float]]:
        """(λ, η) such that the optimizer's next step is Δθ = −η Λ ∇L and the monitored NTK is J Λ Jᵀ."""
        plain = all(g.get("momentum", 0) == 0 and g.get("weight_decay", 0) == 0 for g in opt.param_groups)
        if not isinstance(opt, torch.optim.SGD) or not plain:
            self._warn_once("KernelFlowMonitor: the ntk_velocity metric compares against the first-order SGD step "
                            "Δθ = −lr·∇L; the attached optimizer is not plain SGD (momentum=0, weight_decay=0), "
                            "so the prediction is for the SGD step with the same learning rates.", UserWarning)
        if isinstance(self.learning_rates, str) and self.learning_rates == "optimizer":
            return opt.param_groups, 1.0
        lrs = {float(g["lr"]) for g in opt.param_groups}
        if self.learning_rates is None and len(lrs) == 1:
            return None, lrs.pop()
        self._warn_once("KernelFlowMonitor: the ntk_velocity metric needs the monitored NTK's λ to match the "
                        "optimizer's learning rates: use learning_rates='optimizer' (or learning_rates=None with "
                        "one lr for all groups). No dNTK records are written.", UserWarning)
        return None

    def _finish_velocity(self) -> None:
        pend = self._velocity_pending
        self._velocity_pending = {}
        if "pred" not in pend or pend.get("ntk") is None:
            if "x" not in pend or "error" not in pend:
                self._warn_once("KernelFlowMonitor: ntk_velocity saw no differentiable forward pass of the model "
                                "before optimizer.step() after a logging step; no dNTK record.", RuntimeWarning)
            return
        with self._isolated():
            ntk_now = self._compute_ntk_total()
        measured = ntk_now - pend["ntk"]
        state = ProbeState(step=self.step, layers=self._layer_infos or (), ntk=ntk_now,
                           ntk_output=self.ntk_output, velocity=(pend["pred"], measured))
        record: dict[str, Any] = {}
        for m in self.metrics:
            if "velocity" in m.needs:
                record.update(m.fn(state))
        if record:
            self._emit(self.step, record)

    def _compute_ntk_total(self) -> torch.Tensor:
        return self._call_ntk(False).detach()


def _kernel_recursion(activation: Any, C_b: Sequence[float], C_W: Sequence[float], x: torch.Tensor, depth: int,
                      lambda_b: Optional[Sequence[float]] = None, lambda_W: Optional[Sequence[float]] = None,
                      ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """K^(1..L) ``[L, N, N]`` (4.118), (4.8) and, with λ's, the frozen NTK Θ^(1..L) (9.5), (8.23)."""
    from torch_crit.theory.activations import get_activation
    from torch_crit.theory.kernels import kernel_and_ntk_recursion, kernel_recursion

    act = get_activation(activation if activation is not None else "linear")
    if lambda_b is None or lambda_W is None:
        return kernel_recursion(act, list(C_b), list(C_W), x, depth), None
    st = kernel_and_ntk_recursion(act, list(C_b), list(C_W), list(lambda_b), list(lambda_W), x, depth)
    return st.K, st.Theta


def _with_nonfinite(state: ProbeState, nonfinite: list[str]) -> ProbeState:
    if not nonfinite:
        return state
    import dataclasses

    return dataclasses.replace(state, extras={**state.extras, "nonfinite": tuple(nonfinite)})


def _default_ntk_fn() -> NtkFn:
    try:
        from torch_crit.ntk import empirical_ntk
    except ImportError as exc:
        raise ImportError(
            "KernelFlowMonitor's NTK metrics need torch_crit.empirical_ntk, which failed to import "
            f"({exc}); pass ntk_fn=... (same signature) or choose metrics without the NTK "
            "(e.g. metrics=('preact_kernel',))."
        ) from exc
    return empirical_ntk


def _default_velocity_fn() -> NtkFn:
    try:
        from torch_crit.ntk import ntk_velocity
    except ImportError as exc:
        raise ImportError(
            "the 'ntk_velocity' metric needs torch_crit.ntk_velocity (the dNTK engine), which failed to "
            f"import ({exc}); drop 'ntk_velocity' from metrics."
        ) from exc
    return ntk_velocity
