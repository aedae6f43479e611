"""Scenarios whose truth is known by construction: seeds, optimizer changes, injected faults, NaN (1, 2, 4, 7, 9)."""

import pytest

from scenarios import catalog
from tests.scenarios import truth

pytestmark = pytest.mark.tf


def test_1_unseeded_init_is_init_before_the_first_update(outcome, workspace):
    o = outcome("1")
    f = o.report["first"]
    assert o.code == 1 and o.report["cause"] == "init"
    assert (f["snapshot"], f["step"], f["kind"]) == ("initial", 0, "weight")
    # Every initialized kernel differs (biases start at zero in both runs), on every replica.
    assert f["tensor"] == "mlp/dense_0/kernel" and f["replicas"] == [0, 1]
    assert {"key": "seeds.weights", "a": 1, "b": "none"} in o.report["env_diff"]


@pytest.mark.parametrize("scenario_id, cause, step, kind", [
    ("2", "data", 0, "input"),  # an unseeded shuffle: the very first batch
    ("2b", "data", catalog.EPOCH_END_STEP, "input"),  # an epoch's partial batch: where the epoch ends
    ("3b", "numerics", 0, "loss"),  # mixed precision: the first forward pass, in float16
])
def test_data_and_forward_pass_changes_start_where_the_traces_first_differ(outcome, workspace, scenario_id, cause,
                                                                           step, kind):
    o = outcome(scenario_id)
    f = o.report["first"]
    assert o.code == 1 and o.report["cause"] == cause
    assert (f["snapshot"], f["step"], f["kind"]) == ("step", step, kind)
    assert kind != "input" or f["tensor"] == "batch[0/0]"
    s = catalog.by_id(scenario_id)
    diff = truth.first_difference(workspace.run(s.a), workspace.run(s.b))
    assert diff["snapshot"] == "step" and diff["step"] == step and truth.kinds_at(diff)[0] == kind


def test_2b_the_partial_batch_is_shorter_on_every_replica(outcome):
    # 496 examples over 2 replicas against 600: the shapes differ, and the report says so.
    assert outcome("2b").report["first"]["shapes"] == [[catalog.EPOCH_BATCH // 2, 64], [496 // 2, 64]]


def test_3c_an_overflowing_loss_scale_is_init_and_the_skips_are_noted(outcome, workspace):
    from tracer.compare import INIT_SLOT_NEXT

    o = outcome("3c")
    f = o.report["first"]
    assert o.code == 1 and o.report["cause"] == "init" and o.report["next_step"] == INIT_SLOT_NEXT
    assert (f["snapshot"], f["kind"], f["tensor"]) == ("initial", "optimizer_slot", "loss_scale/dynamic_scale")
    s = catalog.by_id("3c")
    skipped_a, skipped_b = (truth.skipped(workspace.run(job)) for job in (s.a, s.b))
    assert skipped_b.size and not skipped_a.size
    note = next(n for n in o.report["notes"] if "skipped different updates" in n)
    assert "A at no step, B at step" in note and f" 0 ({int((skipped_b == 0).sum())}x)" in note, note
    diff = truth.first_difference(workspace.run(s.a), workspace.run(s.b))
    assert diff["snapshot"] == "initial" and truth.kinds_at(diff) == ["optimizer_slot"]


@pytest.mark.parametrize("scenario_id, step, tensor", [
    ("4a", 0, "mlp/dense_0/kernel"),  # epsilon: Adam's moments are equal, the update is not
    ("4b", 0, "learning_rate"),
    ("4c", catalog.LR_CHANGE_STEP, "learning_rate"),
])
def test_4_optimizer_changes_are_optimizer_where_the_update_first_differs(outcome, workspace, scenario_id, step,
                                                                          tensor):
    o = outcome(scenario_id)
    f = o.report["first"]
    assert o.code == 1 and o.report["cause"] == "optimizer"
    assert (f["step"], f["tensor"]) == (step, tensor)
    # Independently: everything up to the all-reduced gradients of that step is bitwise equal.
    s = catalog.by_id(scenario_id)
    diff = truth.first_difference(workspace.run(s.a), workspace.run(s.b))
    assert diff["step"] == step
    assert set(truth.kinds_at(diff)) <= {"optimizer_slot", "weight"}
    assert truth.earliest(diff["diffs"])[:2] == (f["kind"], tensor)


def test_7a_one_flipped_bit_is_that_replicas_local_grad_at_that_step(outcome):
    from scenarios.inject import FAULT_VARIABLE

    o = outcome("7a")
    f = o.report["first"]
    assert o.code == 1
    assert (f["step"], f["kind"], f["tensor"], f["replica"], f["replicas"]) == (
        catalog.FAULT_STEP, "local_grad", FAULT_VARIABLE, catalog.FAULT_REPLICA, [catalog.FAULT_REPLICA])
    assert f["n_diff"] == 1 and f["first_index"] == [0, 0] and f["max_ulp"] == 1 << 16
    assert o.report["cause"] == "numerics"


def test_7b_a_corrupted_weight_copy_is_replica_desync(outcome):
    from scenarios.inject import FAULT_VARIABLE

    o = outcome("7b")
    f = o.report["first"]
    assert o.code == 1 and o.report["cause"] == "replica_desync"
    # Corrupted after step K's update, so the first recorded state that shows it is step K+1's weights.
    assert (f["step"], f["kind"], f["tensor"], f["replica"]) == (
        catalog.FAULT_STEP + 1, "weight", FAULT_VARIABLE, catalog.FAULT_REPLICA)
    assert f["n_diff"] == 1


def test_7_clean_injection_run_is_consistent(workspace):
    code = workspace.compare(catalog.CLEAN).code
    assert code == 0


def test_9a_infinite_learning_rate_is_nonfinite_at_that_step(outcome, workspace):
    o = outcome("9a")
    f = o.report["first"]
    assert o.code == 1 and o.report["cause"] == "nonfinite"
    assert (f["step"], f["kind"], f["tensor"]) == (catalog.LR_CHANGE_STEP, "optimizer_slot", "learning_rate")
    origin = f["nonfinite_origin"]
    assert (origin["run"], origin["tensor"], origin["inf"]) == ("B", "learning_rate", 1)
    seen = truth.nonfinite_first(workspace.run(catalog.by_id("9a").b))
    assert seen["step"] == catalog.LR_CHANGE_STEP and ("optimizer_slot", "learning_rate") in seen["tensors"]


def test_9b_a_finite_spike_is_the_origin_and_the_nan_follows(outcome, workspace):
    o = outcome("9b")
    f = o.report["first"]
    assert o.code == 1 and o.report["cause"] == "optimizer"
    assert (f["step"], f["tensor"]) == (catalog.LR_CHANGE_STEP, "learning_rate")
    seen = truth.nonfinite_first(workspace.run(catalog.by_id("9b").b))
    assert seen is not None and seen["step"] > catalog.LR_CHANGE_STEP
    reported = o.report["first_nonfinite"]
    assert reported["a"] is None
    assert reported["b"]["step"] == seen["step"]
    assert (reported["b"]["kind"], reported["b"]["tensor"]) in seen["tensors"]
