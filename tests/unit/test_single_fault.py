"""One element on one replica: the cause keeps its name, the detail and the next step point at that replica's device."""

import json

import pytest

from tests.unit.tracegen import Plant, write_run
from tracer import bisect, check
from tracer.causes import CAUSES, SINGLE_FAULT_NEXT

SUSPECT = "suspect that replica's device (bit flip, faulty memory) or code that treats replicas differently"


def run_json(main, capsys, *argv):
    rc = main([*map(str, argv), "--json"])
    return rc, json.loads(capsys.readouterr().out)


def test_a_flipped_bit_in_one_replicas_gradient_is_named_as_such(tmp_path, capsys):
    flip = Plant(4, "local_grad", "dense/kernel", replica=1, flip_bit=16, index=5)
    a = write_run(tmp_path / "a", full=True)
    b = write_run(tmp_path / "b", plants=[flip], full=True)
    rc, d = run_json(bisect.main, capsys, a, b)
    f = d["first"]
    assert rc == 1 and (f["step"], f["kind"], f["tensor"], f["replicas"]) == (4, "local_grad", "dense/kernel", [1])
    assert f["n_diff"] == 1 and f["first_index"] == [1, 2] and f["max_ulp"] == 1 << 16
    assert d["cause"] == "numerics"  # the vocabulary does not change
    assert f["detail"].endswith(f"; one element on one replica (index (1, 2) on replica 1 only): {SUSPECT}")
    assert d["next_step"] == f["next_step"] == SINGLE_FAULT_NEXT
    assert main_text(tmp_path, capsys, a, b)[4] == f"  next: {SINGLE_FAULT_NEXT}"


def main_text(tmp_path, capsys, *argv):
    bisect.main([*map(str, argv)])
    return capsys.readouterr().out.splitlines()


def test_from_fingerprints_only_one_replica_differing_in_a_local_kind_is_enough(tmp_path, capsys):
    flip = Plant(4, "local_grad", "dense/kernel", replica=1, flip_bit=16, index=5)
    a = write_run(tmp_path / "a")
    b = write_run(tmp_path / "b", plants=[flip])
    rc, d = run_json(bisect.main, capsys, a, b)
    f = d["first"]
    assert rc == 1 and f["source"] == "stats" and f["n_diff"] is None and d["cause"] == "numerics"
    assert f"only replica 1 of 2 differs (fingerprints; full tensors at this step would give the element count): " \
           f"{SUSPECT}" in f["detail"]
    assert d["next_step"] == SINGLE_FAULT_NEXT


@pytest.mark.parametrize("plant", [
    Plant(4, "local_grad", "dense/kernel", replica=None, flip_bit=16, index=5),  # one element, every replica
    Plant(4, "local_grad", "dense/kernel", replica=1, rel=1e-6),  # every element of one replica
    Plant(4, "allreduced_grad", "dense/kernel", replica=None, rel=1e-6),  # a reduction change
])
def test_other_patterns_keep_the_causes_own_advice(tmp_path, capsys, plant):
    a = write_run(tmp_path / "a", full=True)
    b = write_run(tmp_path / "b", plants=[plant], full=True)
    rc, d = run_json(bisect.main, capsys, a, b)
    assert rc == 1 and d["first_step"] == 4
    assert "suspect" not in d["first"]["detail"]
    assert d["next_step"] == CAUSES[d["cause"]].next_step


def test_one_corrupted_element_of_one_replicas_weight_is_desync_with_the_device_hint(tmp_path, capsys):
    run = write_run(tmp_path / "run", replicas=4, plants=[Plant(6, "weight", "out/kernel", replica=2, flip_bit=30,
                                                                index=1)], full=True)
    rc, d = run_json(check.main, capsys, run)
    f = d["first"]
    assert rc == 1 and d["cause"] == "replica_desync" and (f["step"], f["replica"], f["n_diff"]) == (6, 2, 1)
    assert f["detail"].endswith(f"one element on one replica (index (0, 1) on replica 2 only): {SUSPECT}")
    assert d["next_step"] == SINGLE_FAULT_NEXT
