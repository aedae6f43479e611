"""Scenario 6: the same global batch on 1, 2 and 4 replicas, and on 2 MPI workers, compared on global quantities."""

import pytest

from scenarios import catalog
from tests.scenarios import truth

pytestmark = pytest.mark.tf


def _global_verdict(workspace, outcome, scenario_id):
    o = outcome(scenario_id)
    s = catalog.by_id(scenario_id)
    diff = truth.first_difference(workspace.run(s.a), workspace.run(s.b))
    assert any("different replica counts" in n for n in o.report["notes"])
    if diff is None:
        assert o.code == 0
        return o
    f = o.report["first_bitwise"]
    assert (f["step"], f["kind"], f["tensor"]) == (diff["step"],) + truth.earliest(diff["diffs"])[:2]
    assert f["kind"] in ("allreduced_grad", "optimizer_slot", "weight")
    if f["kind"] == "allreduced_grad":
        assert f["cause"] == "allreduce"
    return o


@pytest.mark.parametrize("scenario_id", ["6a", "6c"])
def test_6_replica_count_in_one_process(workspace, outcome, scenario_id):
    _global_verdict(workspace, outcome, scenario_id)


def test_6b_auto_tolerance_states_its_threshold(workspace, outcome):
    o = _global_verdict(workspace, outcome, "6b")
    tol = o.report["tolerance"]
    assert tol["mode"] == "auto"
    # Independently: the scale-relative difference of the first differing tensor, read from the traces,
    # decides the verdict.
    f = o.report["first_bitwise"]
    s = catalog.by_id("6b")
    value = truth.scaled_difference(workspace.run(s.a), workspace.run(s.b), f["step"], f["kind"], f["tensor"])
    v = f["verdict"]
    assert v["metric"] == "max|a-b|/max|x|" and v["value"] == pytest.approx(value, rel=1e-6)
    assert v["beyond"] == (value > v["threshold"])
    if o.report["diverged"]:
        v = o.report["first"]["verdict"]
        assert v["beyond"] and v["value"] > v["threshold"]


@pytest.mark.mpi
def test_6d_mpirun_workers_against_one_replica(workspace, outcome):
    o = _global_verdict(workspace, outcome, "6d")
    keys = {e["key"]: e for e in o.report["env_diff"]}
    assert keys["strategy"]["b"] == "TracedMultiWorkerMirroredStrategy"
    assert keys["num_workers"]["b"] == 2
