"""plot(): the figure set from a written log; optional extras."""
from __future__ import annotations

import sys

import pytest
import torch

from _references import mlp, reference_ntk
from torch_crit.monitor import CSVWriter, JSONLWriter, KernelFlowCallback, KernelFlowMonitor, plot

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    pytest.importorskip("matplotlib")
    d = tmp_path_factory.mktemp("logs")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randn(16, 2, generator=g, dtype=torch.float64)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = KernelFlowMonitor(model, x[:5], y[:5], every=2, ntk_fn=reference_ntk, theory=None,
                            writers=[JSONLWriter(d / "run.jsonl"), CSVWriter(d / "run.csv")])
    with mon.attach(opt):
        for _ in range(6):
            loss = ((model(x) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return d


@pytest.mark.parametrize("name", ["run.jsonl", "run.csv"])
def test_plot_writes_the_figure_set(logs, tmp_path, name):
    paths = plot(logs / name, tmp_path / "figs")
    assert sorted(p.name for p in paths) == ["run_eigenvalues.png", "run_kernel_flow.png", "run_ntk_change.png"]
    for p in paths:
        assert p.parent == tmp_path / "figs" and p.read_bytes()[:8] == PNG and p.stat().st_size > 5000
    assert not list((tmp_path / "figs").glob(".*.tmp"))


def test_plot_defaults_next_to_the_log_and_errors(logs, tmp_path):
    paths = plot(logs / "run.jsonl")
    assert all(p.parent == logs for p in paths)
    with pytest.raises(FileNotFoundError, match="no log"):
        plot(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no records"):
        plot(tmp_path / "empty.jsonl")


def test_plot_without_matplotlib_names_the_extra(logs, monkeypatch):
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install torch-crit\[plot\]"):
        plot(logs / "run.jsonl")


def test_lightning_callback_without_lightning_names_the_install():
    from torch_crit.monitor import lightning as lt

    if lt.HAS_LIGHTNING:
        pytest.skip("Lightning is installed here; the adapter is tested in test_lightning.py")
    with pytest.raises(ImportError, match="pip install lightning"):
        KernelFlowCallback(torch.randn(4, 3))
