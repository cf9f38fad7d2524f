"""`torch-crit critical`: table and JSON output."""
from __future__ import annotations

import json

import pytest

from torch_crit.cli import main


def test_table(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["critical", "relu", "tanh", "leaky_relu:0.1", "sigmoid"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["activation", "class", "C_b", "C_W"]
    relu = next(l for l in lines if l.startswith("relu"))
    assert "scale_invariant" in relu and " 2 " in relu and "L^-1" in relu
    assert any(l.startswith("leaky_relu(a=0.1)") and "1.980198" in l for l in lines)
    assert any(l.startswith("sigmoid") and "none (nearest)" in l for l in lines)
    assert "Suggestion: use tanh" in out


def test_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["critical", "tanh", "monomial:3", "swish", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and [d["spec"] for d in data] == ["tanh", "monomial:3", "swish"]
    assert data[0]["C_W"] == 1.0 and data[0]["learning_rates"]["bias"]["layer_exp"] == -1.0
    assert data[1]["universality_class"] == "none" and "5.78" in data[1]["reason"]
    assert data[2]["K_star"] == pytest.approx(14.32017362, abs=1e-8)


def test_residual_gamma_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["critical", "relu", "--gamma", "0.5", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data[0]["C_W"] == pytest.approx(1.5) and data[0]["nu"] == pytest.approx(3.5625)
    rc = main(["critical", "nosuch", "relu"])
    out = capsys.readouterr().out
    assert rc == 1 and "unknown activation" in out and "relu" in out


def test_default_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["critical"]) == 0
    out = capsys.readouterr().out
    for name in ("relu", "tanh", "gelu", "swish", "softplus", "monomial(p=3)"):
        assert name in out
