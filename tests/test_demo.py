"""The main job, exactly as the README runs it: `bash scripts/demo.sh --quick`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_quick_writes_a_complete_report(tmp_path):
    out = tmp_path / "report"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo.sh"), "--quick", "--no-progress", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    for fig in res["figures"]:
        data = (out / fig).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, fig
        assert f"({fig})" in report, f"{fig} not referenced in report.md"
    for name in ("loss_curves.png", "kernel_at_init.png", "ntk_change_vs_width.png"):
        assert name in res["figures"]
    for run in res["training"].values():
        assert (out / run["monitor_log"]).stat().st_size > 0
    # criticality trains the deep net where PyTorch's default init does not
    deep = max(r["depth"] for r in res["training"].values())
    by_setup = {r["setup"]: r for r in res["training"].values() if r["depth"] == deep}
    assert by_setup["critical+groups"]["final_train_loss"] < 0.5 * by_setup["default"]["final_train_loss"]
    assert by_setup["critical+groups"]["test_accuracy"] > by_setup["default"]["test_accuracy"] + 0.3
    # the measured kernel at init follows the recursion at criticality (within 20% + 3 standard
    # errors over networks), while PyTorch's default init collapses every input onto one direction
    # (correlation -> 1: the ordered phase, chi_perp < 1), which the critical network avoids
    k = res["kernel_at_init"]
    for meas, se, th in zip(k["critical"], k["critical_stderr"], k["theory"]):
        assert abs(meas - th) < 0.2 * th + 3 * se
    assert k["default_correlation"][-1] > 0.99
    assert abs(k["critical_correlation"][-1] - k["theory_correlation"][-1]) < 0.25
