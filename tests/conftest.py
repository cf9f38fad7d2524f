"""Shared test configuration."""
from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config):
    # The statistical tests and benchmarks-as-tests assume the two-core CI machine.
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    # torchvision is installed --no-deps (model definitions only); where its compiled ops do not load
    # against this torch, importing it would fail, and so would lightning, which imports it when present.
    _torchvision_import_fix()


def _torchvision_import_fix() -> None:
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    import _torchvision

    _torchvision.import_models()


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from a fixed global seed (tests that need more use generators)."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Run a test single-threaded and restore the thread count afterwards.

    Tests bound by many small ops are faster with one intra-op thread and immune to
    oversubscription when the machine is busy. Modules use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")`` or per test.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cuda_available() -> bool:
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
