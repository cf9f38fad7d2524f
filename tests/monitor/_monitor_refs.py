"""Re-export of the shared references for ``tests/monitor/test_lightning.py`` (see ``tests/_references.py``)."""
from _references import jacobian_per_param, lambda_of_groups, mlp, reference_ntk  # noqa: F401
