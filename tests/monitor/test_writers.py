"""Writers: JSONL, CSV (header widening), TensorBoard (read back), callback, resume."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from _references import mlp, reference_ntk
from torch_crit.monitor import (
    CallbackWriter,
    CSVWriter,
    JSONLWriter,
    KernelFlowMonitor,
    TensorBoardWriter,
    read_csv,
    read_jsonl,
)
from torch_crit.monitor.writers import as_writers


def _strict(text):
    def bad(c):
        raise ValueError(f"non-standard JSON constant {c}")

    return [json.loads(line, parse_constant=bad) for line in text.splitlines()]


def test_jsonl_strict_json_and_nonfinite_round_trip(tmp_path):
    path = tmp_path / "a.jsonl"
    w = JSONLWriter(path)
    w.write(0, {"x": 1.5, "n": float("nan"), "i": float("-inf"), "s": "tanh"})
    w.write(1, {"x": 2.0})
    w.write(1, {"x": 3.0})  # a step already written is skipped
    w.close()
    rows = _strict(path.read_text())
    assert rows[0] == {"step": 0, "x": 1.5, "n": None, "i": None, "s": "tanh", "nonfinite": ["n", "i"]}
    back = read_jsonl(path)
    assert math.isnan(back[0]["n"]) and math.isnan(back[0]["i"]) and back[1] == {"step": 1, "x": 2.0}


def test_csv_header_widens_when_new_keys_appear(tmp_path):
    path = tmp_path / "a.csv"
    w = CSVWriter(path)
    w.write(0, {"a": 1.0})
    w.write(1, {"a": 2.0, "b": float("nan")})
    w.write(2, {"b": float("inf"), "c": "x"})
    w.close()
    lines = path.read_text().splitlines()
    assert lines[0] == "step,a,b,c"
    assert lines[1] == "0,1.0,,"
    assert lines[2] == "1,2.0,nan,"
    assert lines[3] == "2,,inf,x"
    rows = read_csv(path)
    assert rows[0] == {"step": 0, "a": 1.0}
    assert math.isnan(rows[1]["b"]) and rows[2]["b"] == math.inf and rows[2]["c"] == "x"
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic rewrite left no temporaries


@pytest.mark.parametrize("cls,suffix", [(JSONLWriter, "jsonl"), (CSVWriter, "csv")])
def test_resume_drops_a_torn_tail_and_skips_logged_steps(tmp_path, cls, suffix):
    path = tmp_path / f"r.{suffix}"
    w = cls(path)
    for s in (0, 2, 4):
        w.write(s, {"v": float(s)})
    w.close()
    with open(path, "a") as fh:  # a crash in the middle of a record
        fh.write('{"step": 6, "v' if suffix == "jsonl" else "6,6.")
    w = cls(path, resume=True)
    assert w.steps == {0, 2, 4} and w.has_step(2) and not w.has_step(6)
    w.write(4, {"v": -1.0})
    w.write(6, {"v": 6.0})
    w.close()
    reader = read_jsonl if suffix == "jsonl" else read_csv
    assert [(r["step"], r["v"]) for r in reader(path)] == [(0, 0.0), (2, 2.0), (4, 4.0), (6, 6.0)]
    w = cls(path)  # without resume the file starts over
    w.close()
    assert reader(path) == []


def test_monitor_rerun_with_resume_skips_logged_steps(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randn(16, 2, generator=g, dtype=torch.float64)
    path = tmp_path / "m.jsonl"
    calls = []

    def counting_ntk(model, xx, **kw):
        calls.append(1)
        return reference_ntk(model, xx, **kw)

    def run(steps, resume):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with KernelFlowMonitor(model, x[:4], every=2, metrics=("ntk",), ntk_fn=counting_ntk,
                               writers=[JSONLWriter(path, resume=resume)]).attach(opt):
            for _ in range(steps):
                loss = ((model(x) - y) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()

    run(4, False)  # logs 0, 2, 4; then "crashes"
    assert len(calls) == 3
    first = read_jsonl(path)
    run(8, True)  # rerun from scratch: 0, 2, 4 are skipped without probing
    assert len(calls) == 5
    rows = read_jsonl(path)
    assert [r["step"] for r in rows] == [0, 2, 4, 6, 8]
    assert rows[:3] == first


def test_tensorboard_event_file_reads_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    w = TensorBoardWriter(tmp_path / "tb")
    w.write(0, {"time": 1.7e9, "ntk/rel_change": 0.0, "preact/l01.0/K_diag": 1.25, "theory/activation": "tanh",
                "flag": True})
    w.write(10, {"ntk/rel_change": 0.5, "preact/l01.0/K_diag": 1.5})
    w.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == {"ntk/rel_change", "preact/l01.0/K_diag"}
    ev = acc.Scalars("ntk/rel_change")
    assert [(e.step, e.value) for e in ev] == [(0, 0.0), (10, 0.5)]
    assert ev[0].wall_time == 1.7e9
    assert [e.value for e in acc.Scalars("preact/l01.0/K_diag")] == [1.25, 1.5]


def test_tensorboard_missing_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install torch-crit\[tensorboard\]"):
        TensorBoardWriter(tmp_path / "tb")


def test_callback_writer_and_writer_inference(tmp_path):
    got = []
    closed = []
    w = CallbackWriter(lambda s, r: got.append((s, r)), on_close=lambda: closed.append(1))
    rec = {"a": 1.0}
    w.write(3, rec)
    got[0][1]["a"] = 2.0  # the callback gets a copy
    assert rec == {"a": 1.0} and got[0][0] == 3
    w.close()
    assert closed == [1]
    ws = as_writers([tmp_path / "x.jsonl", str(tmp_path / "x.csv"), lambda s, r: None])
    assert [type(v).__name__ for v in ws] == ["JSONLWriter", "CSVWriter", "CallbackWriter"]
    for v in ws:
        v.close()
    with pytest.raises(ValueError, match="jsonl or .csv"):
        as_writers(tmp_path / "x.txt")
    with pytest.raises(TypeError, match="callable"):
        CallbackWriter(3)
