"""Shared helpers of the benchmark scripts: result files and machine facts."""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from torch_crit._io import atomic_write_json  # noqa: E402

RESULTS = HERE / "results"


def machine() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` atomically, with the machine's facts."""
    path = RESULTS / f"{name}.json"
    atomic_write_json(path, {"benchmark": name, "machine": machine(), **payload})
    print(f"wrote {path}")
    return path
