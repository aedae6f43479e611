"""Scenarios whose truth is read from the traces: XLA, accumulation, op determinism, oneDNN (3, 5, 8)."""

import pytest

from scenarios import catalog
from tests.scenarios import truth

pytestmark = pytest.mark.tf


def _check_against_truth(workspace, scenario_id, o):
    """The verdict names the first difference the traces hold, or none if they are bitwise equal."""
    s = catalog.by_id(scenario_id)
    diff = truth.first_difference(workspace.run(s.a), workspace.run(s.b))
    if diff is None:
        assert o.code == 0 and not o.report["diverged"] and o.report["first_bitwise"] is None
        return None
    f = o.report["first_bitwise"]
    assert (f["snapshot"], f["step"]) == (diff["snapshot"], diff["step"])
    assert (f["kind"], f["tensor"], f["micro_step"]) == truth.earliest(diff["diffs"])
    return diff


def test_3_xla_verdict_matches_the_traces(outcome, workspace):
    o = outcome("3")
    diff = _check_against_truth(workspace, "3", o)
    if diff is not None:
        # Same inputs, same weights; XLA changes the replica's own computation.
        assert truth.kinds_at(diff)[0] in ("loss", "local_grad")
        assert o.report["cause"] == "numerics"
        assert {"key": "run.xla", "a": 0, "b": 1} in o.report["env_diff"]


def test_5_accumulation_starts_where_the_traces_differ_and_its_growth_is_reported(outcome, workspace):
    o = outcome("5")
    diff = _check_against_truth(workspace, "5", o)
    assert any("per-replica tensor(s) have another shape" in n for n in o.report["notes"])
    if diff is not None:
        assert o.report["cause"] in ("numerics", "allreduce", "optimizer")
        g = o.report["growth"]
        assert g["source"] == "full" and g["steps"][0] == diff["step"]
        assert len(g["values"]) == catalog.STEPS - diff["step"]


def test_8a_op_determinism_runs_are_bitwise_identical(outcome):
    o = outcome("8a")
    assert o.code == 0 and o.report["first_bitwise"] is None
    assert o.report["steps_compared"]["count"] == catalog.STEPS


def test_8b_onednn_verdict_matches_the_traces(outcome, workspace):
    o = outcome("8b")
    _check_against_truth(workspace, "8b", o)
    assert any(e["key"] == "env.TF_ENABLE_ONEDNN_OPTS" and e["b"] == "0" for e in o.report["env_diff"])
