"""Every classic reason two TensorFlow runs differ, as reproducible pairs of traced runs.

Each scenario is a pair of training runs (``launch/train.py`` with different
flags, or the user-side script :mod:`scenarios.inject`) and the tracer command
that diagnoses them. ``python -m scenarios --print-guide`` runs them all and
prints ``docs/scenarios.md``; ``tests/scenarios`` asserts each verdict.
"""

from scenarios.catalog import SCENARIOS, Scenario, by_id
from scenarios.jobs import Job, Workspace

__all__ = ["Job", "SCENARIOS", "Scenario", "Workspace", "by_id"]
