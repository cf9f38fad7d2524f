"""Import torchvision's model definitions without its compiled ops.

torchvision is installed with ``--no-deps`` next to whatever torch the environment has, so its
``_C`` library may not load (it is built against one torch release). Its model classes do not need
it; only ``torchvision._meta_registrations`` fails at import, registering fakes for ops that do not
exist. This helper stubs that one module when the compiled ops are missing and returns
``torchvision.models`` (or skips the test when torchvision is not installed at all).
"""
from __future__ import annotations

import importlib.util
import sys
import types

import pytest


def models():
    """``torchvision.models`` for a test, importable whether or not torchvision's compiled ops load."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed (scripts/setup.sh installs it with --no-deps)")
    return import_models()


def import_models():
    """Import ``torchvision.models``, stubbing ``torchvision._meta_registrations`` if ``_C`` cannot load."""
    try:
        import torchvision  # noqa: F401
    except (RuntimeError, OSError):
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision  # noqa: F401
    import torchvision.models as tvm

    return tvm
