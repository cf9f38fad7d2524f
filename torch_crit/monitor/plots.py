"""Figures from a kernel-flow log (reads the written file, never live state).

``plot(log_path, out_dir=None) -> list[Path]`` writes, next to the log by default:

* ``<stem>_ntk_change.png`` — :math:`\\lVert\\Theta_t-\\Theta_0\\rVert_F/\\lVert\\Theta_0\\rVert_F` over
  steps, total and per layer, with the kernel–target alignment when logged;
* ``<stem>_kernel_flow.png`` — per-layer preactivation kernel (mean diagonal and mean
  off-diagonal correlation) against depth ℓ, one curve per logged step (colour = time), the
  step-0 theory (4.118) dashed;
* ``<stem>_eigenvalues.png`` — the top NTK eigenvalues over steps (log scale) and the
  effective rank;
* ``<stem>_dntk.png`` — dNTK-predicted against measured one-step NTK change, when logged.

matplotlib is an optional extra (``pip install torch-crit[plot]``), imported lazily; figures
are drawn on the Agg canvas without touching pyplot's global backend, and written atomically.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional, Union

from torch_crit._io import atomic_savefig
from torch_crit.monitor.writers import read_log

__all__ = ["plot"]

_LAYER = re.compile(r"^(?P<group>preact|ntk_layer|theory/preact)/l(?P<depth>\d+)\.(?P<name>.*)/(?P<q>[A-Za-z_]+)$")


def _figure(ncols: int = 1) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "torch_crit.monitor.plot needs matplotlib, which is not installed: "
            f"pip install torch-crit[plot]  (or: pip install matplotlib). Import error: {exc}"
        ) from exc
    fig = Figure(figsize=(5.2 * ncols, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _plot_keys(ax: Any, records: list[dict[str, Any]], keys: tuple[tuple[str, str], ...]) -> None:
    """One marked line per logged scalar ``key`` (labelled ``label``) against the step."""
    for key, label in keys:
        xs, ys = _series(records, key)
        if xs:
            ax.plot(xs, ys, "-o", ms=3, label=label)
    ax.set_xlabel("step")
    ax.legend(fontsize=7)


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(int(r["step"]))
            ys.append(float(v))
    return xs, ys


def _layers(records: list[dict[str, Any]], group: str, q: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for r in records:
        for k in r:
            m = _LAYER.match(k)
            if m and m["group"] == group and m["q"] == q:
                out[int(m["depth"])] = m["name"]
    return dict(sorted(out.items()))


def plot(log_path: Union[str, "os.PathLike[str]"], out_dir: Optional[Union[str, "os.PathLike[str]"]] = None) -> list[Path]:
    """Render the figure set of a monitor log (``.jsonl`` or ``.csv``).

    Args:
        log_path: a log written by :class:`~torch_crit.monitor.JSONLWriter` or
            :class:`~torch_crit.monitor.CSVWriter`.
        out_dir: folder for the PNGs (created); default the log's folder.

    Returns:
        The paths of the PNGs written (figures whose keys are absent from the log are skipped).
    """
    log_path = Path(log_path)
    if not log_path.exists():
        raise FileNotFoundError(f"plot: no log at {str(log_path)!r}; pass the path a JSONLWriter/CSVWriter wrote.")
    records = [r for r in read_log(log_path) if "step" in r]
    if not records:
        raise ValueError(f"plot: the log {str(log_path)!r} holds no records.")
    out = Path(out_dir) if out_dir is not None else log_path.parent
    out.mkdir(parents=True, exist_ok=True)
    stem = log_path.stem
    written: list[Path] = []

    # 1. NTK change over steps
    xs, ys = _series(records, "ntk/rel_change")
    if xs:
        has_align = bool(_series(records, "ntk/alignment")[0])
        fig, axes = _figure(2 if has_align else 1)
        ax = axes[0]
        ax.plot(xs, ys, "k-o", ms=3, label="total")
        for d, name in _layers(records, "ntk_layer", "rel_change").items():
            lx, ly = _series(records, f"ntk_layer/l{d:02d}.{name}/rel_change")
            ax.plot(lx, ly, lw=1, label=f"ℓ={d} ({name})")
        ax.set_xlabel("step")
        ax.set_ylabel(r"$\|\Theta_t-\Theta_0\|_F/\|\Theta_0\|_F$")
        ax.set_title("NTK change from initialisation")
        ax.legend(fontsize=7)
        if has_align:
            _plot_keys(axes[1], records, (("ntk/alignment", "alignment"), ("ntk/alignment_centered", "centred alignment")))
            axes[1].set_ylabel("kernel–target alignment")
        written.append(atomic_savefig(fig, out / f"{stem}_ntk_change.png", dpi=110))

    # 2. per-layer kernel flow over depth and time
    layers = _layers(records, "preact", "K_diag")
    if layers:
        import matplotlib as mpl

        fig, axes = _figure(2)
        steps = [r for r in records if any(f"preact/l{d:02d}.{n}/K_diag" in r for d, n in layers.items())]
        cmap = mpl.colormaps["viridis"]
        smax = max(int(r["step"]) for r in steps) or 1
        for r in steps:
            col = cmap(int(r["step"]) / smax)
            for ax, q in zip(axes, ("K_diag", "corr_offdiag")):
                ds = [d for d, n in layers.items() if isinstance(r.get(f"preact/l{d:02d}.{n}/{q}"), (int, float))]
                ax.plot(ds, [r[f"preact/l{d:02d}.{layers[d]}/{q}"] for d in ds], "-o", ms=3, color=col, lw=1)
        th = next((r for r in records if any(k.startswith("theory/preact/") for k in r)), None)
        if th is not None:
            for ax, q in zip(axes, ("K_diag", "corr_offdiag")):
                ds = [d for d, n in layers.items() if isinstance(th.get(f"theory/preact/l{d:02d}.{n}/{q}"), (int, float))]
                ax.plot(ds, [th[f"theory/preact/l{d:02d}.{layers[d]}/{q}"] for d in ds], "r--", lw=1.5,
                        label="theory (4.118), step 0")
            axes[0].legend(fontsize=7)
        axes[0].set_ylabel(r"mean $\hat K^{(\ell)}_{\alpha\alpha}$")
        axes[1].set_ylabel(r"mean off-diagonal correlation $\hat\rho^{(\ell)}$")
        from matplotlib.ticker import MaxNLocator

        for ax in axes:
            ax.set_xlabel(r"layer $\ell$")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        sm = mpl.cm.ScalarMappable(cmap=cmap, norm=mpl.colors.Normalize(0, smax))
        fig.colorbar(sm, ax=axes[1], label="step")
        fig.suptitle("preactivation kernel flow")
        written.append(atomic_savefig(fig, out / f"{stem}_kernel_flow.png", dpi=110))

    # 3. eigenvalues
    eig_keys = sorted({k for r in records for k in r if re.fullmatch(r"ntk/eig/\d+", k)}, key=lambda k: int(k.split("/")[-1]))
    if eig_keys:
        has_rank = bool(_series(records, "ntk/effective_rank")[0])
        fig, axes = _figure(2 if has_rank else 1)
        for k in eig_keys:
            ex, ey = _series(records, k)
            axes[0].plot(ex, ey, lw=1, label=f"λ{int(k.split('/')[-1]) + 1}")
        if all(v > 0 for k in eig_keys for v in _series(records, k)[1]):
            axes[0].set_yscale("log")
        axes[0].set_xlabel("step")
        axes[0].set_ylabel("NTK eigenvalue")
        axes[0].legend(fontsize=6, ncol=2)
        if has_rank:
            _plot_keys(axes[1], records, (("ntk/effective_rank", "effective rank"), ("ntk/participation_ratio", "participation ratio")))
        fig.suptitle("NTK spectrum on the probe batch")
        written.append(atomic_savefig(fig, out / f"{stem}_eigenvalues.png", dpi=110))

    # 4. dNTK prediction
    px, py = _series(records, "dntk/predicted_norm")
    if px:
        fig, axes = _figure(2)
        mx, my = _series(records, "dntk/measured_norm")
        axes[0].plot(px, py, "-o", ms=3, label="dNTK prediction (11.10)")
        axes[0].plot(mx, my, "-s", ms=3, label="measured")
        axes[0].set_ylabel(r"$\|\Delta\Theta\|_F$ per step")
        axes[0].legend(fontsize=7)
        cx, cy = _series(records, "dntk/cosine")
        axes[1].plot(cx, cy, "-o", ms=3, label="cosine")
        rx, ry = _series(records, "dntk/rel_error")
        axes[1].plot(rx, ry, "-s", ms=3, label="relative error")
        axes[1].legend(fontsize=7)
        for ax in axes:
            ax.set_xlabel("step")
        written.append(atomic_savefig(fig, out / f"{stem}_dntk.png", dpi=110))
    return written
