"""tracer.check: replicas of one run must agree bitwise on all-reduced gradients, slots and weights."""

import json

import pytest

from tests.unit.tracegen import Plant, write_run
from tracer.check import main


def check_json(capsys, *argv):
    rc = main([*map(str, argv), "--json"])
    return rc, json.loads(capsys.readouterr().out)


def test_consistent_run(tmp_path, capsys):
    run = write_run(tmp_path / "run", replicas=4)
    rc, d = check_json(capsys, run)
    assert rc == 0 and d["diverged"] is False and d["first"] is None
    assert d["tensors"]["compared"] == 11  # global kinds only: local ones differ by design
    assert main([run]) == 0
    assert capsys.readouterr().out.startswith("tracer.check: all replicas agree bitwise")


@pytest.mark.parametrize("plant", [
    Plant(6, "allreduced_grad", "dense/kernel", replica=2, persist=False),
    Plant(4, "optimizer_slot", "out/kernel/momentum", replica=0),
    Plant(9, "weight", "dense/bias", replica=3),
    Plant(0, "weight", "out/kernel", replica=1, initial=True),
])
def test_desync_is_named(tmp_path, capsys, plant):
    run = write_run(tmp_path / "run", replicas=4, plants=[plant], full=True)
    rc, d = check_json(capsys, run)
    assert rc == 1
    f = d["first"]
    assert (d["first_step"], f["kind"], f["tensor"], f["replica"], d["cause"]) == (
        plant.step, plant.kind, plant.name, plant.replica, "replica_desync")
    assert f["replicas"] == [plant.replica]  # the odd one out, even when it is replica 0
    assert f["snapshot"] == ("initial" if plant.initial else "step")
    assert f["source"] == "full" and f["n_diff"] == f["size"]


def test_local_differences_are_not_desync(tmp_path, capsys):
    run = write_run(tmp_path / "run", replicas=2, plants=[Plant(3, "local_grad", "dense/bias", replica=1,
                                                                 persist=False)])
    assert main([run]) == 0


def test_text_output_and_bad_input(tmp_path, capsys):
    run = write_run(tmp_path / "run", replicas=2, plants=[Plant(5, "weight", "dense/bias", replica=1)])
    assert main([run]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "tracer.check: REPLICAS DISAGREE: weight 'dense/bias' on replica 1 at step 5 (origin)"
    assert out[2].startswith("  cause: replica_desync:")
    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tracer.check: error: {tmp_path / 'missing'}: no such file or directory")
    assert err.count("\n") == 1


def test_a_run_without_steps_says_so(tmp_path, capsys):
    """A job that died before its first update: its initial weights are checked, and no step range is made up."""
    run = write_run(tmp_path / "run", steps=0, replicas=2)
    assert main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "in no step (none recorded)" in out and "steps compared: 0 (no step recorded)" in out
    assert "None" not in out
