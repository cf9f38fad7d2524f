"""The compiled extension must be built and registered; CI never silently falls back."""
import os

import torch

import torch_crit
from torch_crit import _ops


def test_extension_is_built():
    assert _ops.HAS_EXT, f"torch_crit._C failed to import: {_ops.EXT_ERROR}"
    assert hasattr(torch.ops.torch_crit, "gram_hadamard_accumulate_")


def test_suite_requires_extension():
    # scripts/test.sh sets this so that a missing build is an import error, not a warning
    if os.environ.get("CI") == "true":
        assert os.environ.get("TORCH_CRIT_REQUIRE_EXT") == "1"


def test_lazy_public_api_names():
    for name in ["init_", "param_groups", "empirical_ntk", "KernelFlowMonitor", "theory"]:
        assert name in dir(torch_crit)
