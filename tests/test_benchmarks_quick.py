"""Smoke tests of the --quick modes of benchmarks/kernel_vs_trained.py and benchmarks/lr_transfer.py.

They check that each script runs end to end, writes its JSON (and plots when matplotlib is
present) and that the reported numbers are finite — never speed. The scripts run in-process
(importing torch/sklearn again in a subprocess costs more than the runs) with a few extra
flags that shrink the quick grids further to fit the test budget.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setitem(sys.modules, spec.name, mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
    threads = torch.get_num_threads()
    try:
        return mod.main()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_kernel_vs_trained_quick(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    rc = run_script("kernel_vs_trained", ["--quick", "--out", str(tmp_path), "--widths", "32", "64", "--ensemble", "3",
                                          "--steps", "5", "--n-train", "8", "--n-test", "4", "--n-nodes", "16"], monkeypatch)
    assert rc == 0
    res = json.loads((tmp_path / "kernel_vs_trained_quick.json").read_text())
    assert res["sgd_step_check_max_rel_diff"] < 1e-10  # the benchmark's GD step is exactly SGD(param_groups)
    assert [r["width"] for r in res["rows"]] == [32, 64]
    for r in res["rows"]:
        for key in ("net_rms", "lin_rms", "var_ratio", "raw_gap", "mean_gap_sq"):
            assert math.isfinite(r[key]), (key, r[key])
    assert math.isfinite(res["exponents"]["net_rms"]) and math.isfinite(res["theory"]["lambda_max"])
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "kernel_vs_trained_quick.png").stat().st_size > 0


def _unit_scaling_importable() -> bool:
    try:
        import unit_scaling  # noqa: F401
    except Exception:
        return False
    return True


QUICK_SWEEPS = {"width": [[16, 3], [64, 3]], "depth": [[32, 3], [32, 8]]}


@pytest.mark.slow
def test_lr_transfer_quick(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    has_uu = _unit_scaling_importable()
    params = ["tc-sgd", "tc-adam", "uu-adam"] + (["mup-adam"] if importlib.util.find_spec("mup") else [])
    rc = run_script("lr_transfer", ["--quick", "--out", str(tmp_path), "--acts", "tanh", "--steps", "3",
                                    "--params", *params], monkeypatch)
    assert rc == 0
    res = json.loads((tmp_path / "lr_transfer_quick.json").read_text())
    ran = [p for p in params if has_uu or not p.startswith("uu")]
    assert res["config"]["sweeps"] == QUICK_SWEEPS and res["config"]["params"] == ran
    assert set(res["step_check"]) == {f"{p}/tanh" for p in ran}
    assert all(v < 1e-10 for v in res["step_check"].values()), res["step_check"]  # float64: batched = real optimizer
    assert len(res["rows"]) == len(ran) * 4  # 4 distinct architectures in the quick sweeps
    assert set(res["summary"]) == {f"{p}/tanh" for p in ran}
    for key, entry in res["summary"].items():
        assert set(entry) == {"width", "depth"}, key
        for axis, e in entry.items():
            assert set(e["optimal_lr"]) == {f"{w}x{d}" for w, d in QUICK_SWEEPS[axis]}
            assert math.isfinite(e["lr_spread"]) and e["lr_spread"] >= 1.0, (key, axis)
            assert math.isfinite(e["transfer_gap"]) and e["transfer_gap"] >= 0.0, (key, axis)
            assert all(math.isfinite(v) for v in e["optimal_loss"].values())
    cal = res["calibration"]
    assert set(cal["cells"]) == {"16x3", "32x3", "32x8", "64x3"} and cal["estimated_total_s"] > 0
    if has_uu:  # u-μP ran with its own modules and optimizer; the note says how
        assert any(n.startswith("u-μP:") for n in res["notes"]), res["notes"]
    else:
        assert any(n.startswith("unit-scaling (u-μP) not importable") for n in res["notes"]), res["notes"]
    if importlib.util.find_spec("matplotlib"):
        for p in ran:
            assert (tmp_path / f"lr_transfer_quick_{p}.png").stat().st_size > 0


@pytest.mark.slow
def test_lr_transfer_skips_uu_without_unit_scaling(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    monkeypatch.setitem(sys.modules, "unit_scaling", None)  # `import unit_scaling` now raises ImportError
    rc = run_script("lr_transfer", ["--quick", "--out", str(tmp_path), "--acts", "relu", "--steps", "2", "--n-lr", "3",
                                    "--params", "uu-sgd", "tc-sgd"], monkeypatch)
    assert rc == 0
    res = json.loads((tmp_path / "lr_transfer_quick.json").read_text())
    assert res["config"]["params"] == ["tc-sgd"] and set(res["summary"]) == {"tc-sgd/relu"}
    assert any(n.startswith("unit-scaling (u-μP) not importable") for n in res["notes"]), res["notes"]
