"""tracer.bisect --search full: binary search over full snapshots, with planted differences at known steps."""

import json
import math

import pytest

from tests.unit.tracegen import Plant, write_run
from tracer.bisect import main
from tracer.reader import Run, TraceReader
from tracer.snapshots import SnapshotSearch


def run_json(capsys, *argv):
    rc = main([*map(str, argv), "--search", "full", "--json"])
    return rc, json.loads(capsys.readouterr().out)


def pair(tmp_path, plants_b=(), **kw):
    kw.setdefault("full", True)
    return write_run(tmp_path / "a", **kw), write_run(tmp_path / "b", plants=plants_b, **kw)


def test_identical_runs_read_one_snapshot(tmp_path, capsys):
    a, b = pair(tmp_path, steps=16)
    rc, d = run_json(capsys, a, b)
    assert rc == 0 and d["diverged"] is False and d["bracket"] is None
    assert d["search"] == "full-snapshots" and "stay different" in d["assumption"]
    assert d["snapshots"]["common"] == 16 and d["snapshots"]["read"] == 1


@pytest.mark.parametrize("plant, cause", [
    (Plant(11, "local_grad", "dense/bias", replica=1), "numerics"),
    (Plant(23, "input", "batch[0]", replica=0), "data"),
    (Plant(5, "allreduced_grad", "out/kernel", replica=None), "allreduce"),
    (Plant(30, "optimizer_slot", "dense/kernel/momentum", replica=None), "optimizer"),
    (Plant(0, "weight", "dense/bias", replica=None), "optimizer"),
    (Plant(17, "allreduced_grad", "dense/kernel", replica=1), "replica_desync"),
])
def test_bracket_and_origin_at_every_step_snapshots(tmp_path, capsys, plant, cause):
    a, b = pair(tmp_path, [plant], steps=40)
    rc, d = run_json(capsys, a, b)
    assert rc == 1
    f = d["first"]
    expected_replica = 0 if plant.replica is None else plant.replica
    assert (d["first_step"], f["kind"], f["tensor"], f["replica"], d["cause"]) == (
        plant.step, plant.kind, plant.name, expected_replica, cause)
    assert d["bracket"] == [plant.step - 1 if plant.step else None, plant.step]
    assert d["exact"] is True and f["source"] == "full" and f["n_diff"] > 0
    assert d["first_bitwise"]["step"] == plant.step
    # The last snapshot, then a binary search: O(log n) snapshots, never a scan.
    assert d["snapshots"]["read"] <= math.ceil(math.log2(40)) + 1
    assert d["divergent_steps"] is None and d["growth"] is None


def test_sparse_snapshots_bracket_the_divergence(tmp_path, capsys):
    a, b = pair(tmp_path, [Plant(17, "local_grad", "dense/bias", replica=1)], steps=40, full_every=5)
    rc, d = run_json(capsys, a, b)
    assert rc == 1 and d["bracket"] == [15, 20] and d["first_step"] == 20
    assert d["exact"] is False
    assert "may have diverged at any step after step 15 up to step 20" in d["first"]["detail"]
    assert main([a, b, "--search", "full"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("tracer.bisect: DIVERGED between step 15 and step 20: ")
    assert out[0].endswith("at step 20 (origin in that snapshot)")
    assert any("diverged between step 15 and step 20" in x and "read" in x for x in out)
    assert any(x.startswith("  assumption: ") and "stay different" in x for x in out)


def test_reads_logarithmically_many_snapshots(tmp_path, monkeypatch):
    n = 200
    a, b = pair(tmp_path, [Plant(137, "weight", "out/kernel", replica=None)], steps=n, replicas=1)
    calls = []
    original = TraceReader.full

    def counting(self, col, step, group=""):
        calls.append((group, step))
        return original(self, col, step, group)

    monkeypatch.setattr(TraceReader, "full", counting)
    with Run(a) as ra, Run(b) as rb:
        d = SnapshotSearch(ra, rb).run().to_dict()
    assert d["bracket"] == [136, 137] and d["exact"] is True
    bound = math.ceil(math.log2(n)) + 1
    assert d["snapshots"]["read"] <= bound
    assert len({step for group, step in calls if not group}) <= bound  # full tensors actually opened


def test_tolerance_separates_first_bitwise_and_first_beyond(tmp_path, capsys):
    plants = [Plant(6, "weight", "dense/bias", replica=None, rel=1e-7, persist=False),
              Plant(12, "weight", "dense/bias", replica=None, rel=1e-2)]
    a, b = pair(tmp_path, plants, steps=24)
    rc, d = run_json(capsys, a, b, "--ulp", "16")
    assert rc == 1
    assert d["first_step"] == 12 and d["bracket"] == [11, 12]
    # Persistence is assumed: the bitwise search brackets within [0, 12].
    assert d["first_bitwise"]["step"] <= 12


def test_initial_snapshot_difference_is_init(tmp_path, capsys):
    a, b = pair(tmp_path, [Plant(0, "weight", "dense/kernel", replica=None, initial=True)])
    rc, d = run_json(capsys, a, b)
    assert rc == 1 and d["cause"] == "init" and d["first"]["snapshot"] == "initial"
    assert d["bracket"] == [None, 0]


def test_no_common_full_snapshots_is_an_error(tmp_path, capsys):
    a, b = pair(tmp_path, full=False)
    assert main([a, b, "--search", "full"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and captured.out == ""
    assert "no full-tensor snapshot in common" in lines[0]
    assert "--capture full --full-every N" in lines[0]


def test_noise_is_refused(tmp_path, capsys):
    a, b = pair(tmp_path, steps=4)
    with pytest.raises(SystemExit) as exc:
        main([a, b, "--search", "full", "--noise", a])
    assert exc.value.code == 2
    assert "--noise applies to the fingerprint scan only" in capsys.readouterr().err


def test_default_search_is_named(tmp_path, capsys):
    a, b = pair(tmp_path, steps=4, full=False)
    assert main([a, b, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["search"] == "fingerprints"
