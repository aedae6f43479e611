"""tracer.bisect on real trace files with planted differences: the truth is known by construction."""

import json
import os

import h5py
import numpy as np
import pytest

from tests.unit.tracegen import Plant, model_tensors, write_run
from tracer.bisect import main


def run_json(capsys, *argv):
    rc = main([*map(str, argv), "--json"])
    out = capsys.readouterr().out
    return rc, json.loads(out)


def pair(tmp_path, plants_b=(), **kw):
    a = write_run(tmp_path / "a", **kw)
    b = write_run(tmp_path / "b", plants=plants_b, **kw)
    return a, b


def test_identical_runs_do_not_diverge(tmp_path, capsys):
    a, b = pair(tmp_path)
    rc, d = run_json(capsys, a, b)
    assert rc == 0
    assert d["diverged"] is False and d["first"] is None and d["first_bitwise"] is None
    assert d["steps_compared"]["count"] == 12
    assert d["divergent_steps"]["count"] == 0


@pytest.mark.parametrize("plant, cause", [
    (Plant(0, "weight", "dense/kernel", replica=None, initial=True), "init"),
    (Plant(4, "input", "batch[0]", replica=1), "data"),
    (Plant(6, "loss", "loss", replica=0), "numerics"),
    (Plant(5, "local_grad", "dense/bias", replica=1), "numerics"),
    (Plant(7, "allreduced_grad", "out/kernel", replica=None), "allreduce"),
    (Plant(3, "optimizer_slot", "dense/bias/momentum", replica=None), "optimizer"),
    (Plant(9, "weight", "out/kernel", replica=None), "optimizer"),
    (Plant(8, "allreduced_grad", "dense/kernel", replica=1), "replica_desync"),
    (Plant(2, "local_grad", "out/kernel", replica=1, value=np.nan), "nonfinite"),
])
def test_each_cause_is_found_where_planted(tmp_path, capsys, plant, cause):
    a, b = pair(tmp_path, [plant], replicas=3)
    rc, d = run_json(capsys, a, b)
    assert rc == 1
    first = d["first"]
    expected_replica = 0 if plant.replica is None else plant.replica
    assert (d["first_step"], first["kind"], first["tensor"], first["replica"], d["cause"]) == (
        plant.step, plant.kind, plant.name, expected_replica, cause)
    assert first["snapshot"] == ("initial" if plant.initial else "step")
    assert first["origin"] is True
    assert d["explanation"] and d["next_step"]
    if cause == "nonfinite":
        assert first["nonfinite_origin"]["run"] == "B"
        assert first["nonfinite_origin"]["tensor"] == "out/kernel"
    if cause == "replica_desync":
        assert first["replicas"] == [1]
    if plant.kind == "local_grad" and cause == "numerics":
        # Everything downstream at that step is inherited, in dataflow order.
        kinds = [x["kind"] for x in first["inherited"]]
        assert kinds[0] == "local_grad" and "allreduced_grad" in kinds and kinds[-1] == "weight"
        assert kinds == sorted(kinds, key=["local_grad", "allreduced_grad", "optimizer_slot", "weight"].index)


def test_text_report_names_step_tensor_replica_and_cause_first(tmp_path, capsys):
    a, b = pair(tmp_path, [Plant(5, "local_grad", "dense/bias", replica=1)])
    assert main([a, b]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "tracer.bisect: DIVERGED: local_grad 'dense/bias' on replica 1 at step 5 (origin)"
    assert out[1].startswith("  verdict: fingerprint hash differs (threshold: identical bits)")
    assert out[2].startswith("  cause: numerics:")
    assert any("lower bounds from fingerprint statistics; full tensors at this step would give" in x for x in out)
    assert any(line.startswith("  growth of max|dw|/max|w| from step 5 (fingerprint statistics") for line in out)


def test_column_order_in_file_is_not_trusted(tmp_path, capsys):
    kw = dict(reverse_columns=True)
    a, b = pair(tmp_path, [Plant(5, "local_grad", "out/kernel", replica=0)], **kw)
    rc, d = run_json(capsys, a, b)
    assert (d["first_step"], d["first"]["kind"], d["first"]["tensor"]) == (5, "local_grad", "out/kernel")
    assert d["first"]["n_inherited"] > 0


def test_micro_steps_come_before_the_all_reduce_input(tmp_path, capsys):
    tensors = model_tensors(accumulate=2)
    a, b = pair(tmp_path, [Plant(4, "local_grad", "dense/kernel", replica=0)], tensors=tensors,
                reverse_columns=True)
    rc, d = run_json(capsys, a, b)
    assert (d["first_step"], d["first"]["tensor"], d["first"]["micro_step"]) == (4, "dense/kernel", 0)


def test_divergence_that_disappears_is_still_reported(tmp_path, capsys):
    a, b = pair(tmp_path, [Plant(6, "loss", "loss", replica=1, persist=False)])
    rc, d = run_json(capsys, a, b)
    assert rc == 1 and d["first_step"] == 6
    assert d["divergent_steps"] == {"count": 1, "first": 6, "last": 6, "reconverged": True}
    assert any("agree again" in n for n in d["notes"])


def test_scan_crosses_chunk_boundaries(tmp_path, capsys):
    a, b = pair(tmp_path, [Plant(10, "weight", "dense/bias", replica=None, persist=False),
                           Plant(17, "input", "batch[0]", replica=0, persist=False)], steps=20)
    rc = main([a, b, "--json", "--chunk-rows", "3"])
    d = json.loads(capsys.readouterr().out)
    assert rc == 1 and d["first_step"] == 10 and d["cause"] == "optimizer"
    assert d["divergent_steps"]["count"] == 2 and d["divergent_steps"]["last"] == 17


def test_full_tensors_give_exact_magnitude_and_first_index(tmp_path, capsys):
    plant = Plant(5, "local_grad", "dense/kernel", replica=1, rel=0.5, index=7)
    a, b = pair(tmp_path, [plant], full=True)
    rc, d = run_json(capsys, a, b)
    f = d["first"]
    assert (f["step"], f["tensor"], f["replica"], f["source"]) == (5, "dense/kernel", 1, "full")
    assert f["n_diff"] == 1 and f["size"] == 12
    assert f["first_index"] == list(np.unravel_index(7, (4, 3)))
    assert f["max_rel"] == pytest.approx(0.5 / 1.5, rel=1e-6)
    assert f["verdict"]["text"] == "n_diff (differing elements) = 1 > 0"
    assert d["growth"]["source"] == "full"


def test_environment_diff_lists_every_differing_run_attribute(tmp_path, capsys):
    a = write_run(tmp_path / "a", attrs={"env": {"TF_ENABLE_ONEDNN_OPTS": "0"}, "xla": False})
    b = write_run(tmp_path / "b", attrs={"env": {"TF_ENABLE_ONEDNN_OPTS": "1"}, "xla": True, "extra.flag": "x"},
                  run_id="other", plants=[Plant(1, "local_grad", "dense/bias")])
    rc, d = run_json(capsys, a, b)
    diff = {e["key"]: (e["a"], e["b"]) for e in d["env_diff"]}
    assert diff == {"env.TF_ENABLE_ONEDNN_OPTS": ("0", "1"), "xla": (0, 1), "extra.flag": (None, "x")}
    assert main([a, b]) == 1
    assert "    env.TF_ENABLE_ONEDNN_OPTS: '0' -> '1'" in capsys.readouterr().out


def test_different_replica_counts_compare_global_kinds_only(tmp_path, capsys):
    a = write_run(tmp_path / "a", replicas=4)
    b = write_run(tmp_path / "b", replicas=1)
    rc, d = run_json(capsys, a, b)
    assert rc == 0, d
    assert any("different replica counts (4 vs 1)" in n for n in d["notes"])
    assert d["tensors"]["compared"] == 11
    c = write_run(tmp_path / "c", replicas=1, plants=[Plant(6, "allreduced_grad", "dense/bias", replica=None)])
    rc, d = run_json(capsys, a, c)
    assert rc == 1 and (d["first_step"], d["first"]["kind"], d["cause"]) == (6, "allreduced_grad", "allreduce")


def test_single_files_can_be_compared(tmp_path, capsys):
    a, b = pair(tmp_path, [Plant(3, "input", "batch[0]", replica=1)])
    rc, d = run_json(capsys, os.path.join(a, "replica-1.h5"), os.path.join(b, "replica-1.h5"))
    assert rc == 1 and d["first_step"] == 3 and d["first"]["replica"] == 1 and d["cause"] == "data"


def test_partial_step_overlap_is_compared_and_said(tmp_path, capsys):
    a = write_run(tmp_path / "a", steps=10)
    b = write_run(tmp_path / "b", steps=10, first_step=4, plants=[Plant(8, "local_grad", "dense/bias")])
    rc, d = run_json(capsys, a, b)
    assert rc == 1 and d["first_step"] == 8
    assert d["steps_compared"]["overlap_only"] is True
    assert (d["steps_compared"]["first"], d["steps_compared"]["last"], d["steps_compared"]["count"]) == (4, 9, 6)
    assert any("cover different steps" in n for n in d["notes"])


def test_partly_different_models_compare_common_tensors(tmp_path, capsys):
    a = write_run(tmp_path / "a")
    other = model_tensors(variables=(("dense/kernel", (4, 3)), ("dense/bias", (3,)), ("head/kernel", (3, 2))))
    b = write_run(tmp_path / "b", tensors=other, plants=[Plant(5, "weight", "dense/bias", replica=None)])
    rc, d = run_json(capsys, a, b)
    assert rc == 1 and d["first_step"] == 5 and d["first"]["tensor"] == "dense/bias"
    assert {"kind": "weight", "tensor": "out/kernel", "micro_step": -1} in d["tensors"]["only_in_a"]
    assert {"kind": "weight", "tensor": "head/kernel", "micro_step": -1} in d["tensors"]["only_in_b"]
    assert any("different tensors" in n for n in d["notes"])


def test_tensor_names_are_escaped_in_text(tmp_path, capsys):
    evil = model_tensors(variables=(("dense/kernel\x1b[31m\n", (4, 3)),))
    a, b = pair(tmp_path, [Plant(2, "weight", "dense/kernel\x1b[31m\n", replica=None)], tensors=evil)
    assert main([a, b]) == 1
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert "weight 'dense/kernel\\x1b[31m\\x0a' on replica 0 at step 2" in out.splitlines()[0]


def test_json_schema(tmp_path, capsys):
    a, b = pair(tmp_path, [Plant(5, "local_grad", "dense/bias", replica=1)])
    rc, d = run_json(capsys, a, b)
    for key in ("diverged", "first_step", "first", "cause", "explanation", "tolerance", "env_diff",
                "steps_compared", "growth", "first_bitwise", "divergent_steps", "notes", "next_step"):
        assert key in d
    for key in ("step", "kind", "tensor", "replica", "n_diff", "max_abs", "max_rel", "max_ulp", "origin",
                "first_index", "source", "verdict", "inherited", "micro_step", "snapshot"):
        assert key in d["first"]
    assert d["first"]["kind"] in ("input", "loss", "local_grad", "allreduced_grad", "optimizer_slot", "weight")
    assert d["tolerance"]["mode"] == "bitwise"
    assert set(d["growth"]) >= {"source", "metric", "steps", "values"}
    assert len(d["growth"]["steps"]) == len(d["growth"]["values"]) == 7
    assert d["growth"]["steps"][0] == 5
    assert all(isinstance(v, float) and v > 0 for v in d["growth"]["values"])
