"""Updates a LossScaleOptimizer skipped (non-finite gradients): recorded in /skipped and named by the analyzer."""

import json

import h5py
import numpy as np
import pytest

from tests.unit.tracegen import Plant, write_run
from tracer import bisect, schema
from tracer.errors import TraceWriteError
from tracer.reader import TraceReader


def test_skipped_updates_read_back_and_older_files_have_none(tmp_path):
    run = write_run(tmp_path / "run", steps=6, skipped=[0, 0, 4])
    with TraceReader(f"{run}/replica-1.h5") as r:
        assert r.skipped_steps().tolist() == [0, 0, 4]
        assert r.steps().tolist() == list(range(6))
    with h5py.File(f"{run}/replica-1.h5", "r+") as f:
        del f[schema.SKIPPED]
    with TraceReader(f"{run}/replica-1.h5") as r:
        assert r.skipped_steps().tolist() == []


def test_a_skip_must_come_before_its_steps_row(tmp_path):
    from tracer.config import CaptureConfig
    from tracer.hashing import fingerprint
    from tracer.schema import TensorSpec
    from tracer.writer import TraceWriter
    from tests.unit.tracegen import _stack

    w = TraceWriter(str(tmp_path / "replica-0.h5"), [TensorSpec("loss", "loss", (), "float32")],
                    config=CaptureConfig(), initial_columns=[])
    w.write_step(2, _stack([fingerprint(np.float32(1))]))
    with pytest.raises(TraceWriteError, match=r"steps must increase. Received: an update skipped at step=2 after "
                                              r"step=2"):
        w.write_skipped(2)
    w.close()


def test_the_analyzer_says_when_the_runs_skipped_different_updates(tmp_path, capsys):
    """Run B skipped step 3's update twice: its step 3 consumed a later batch. The first difference is that
    input (data), and a note names the skips of each run."""
    a = write_run(tmp_path / "a", steps=8)
    b = write_run(tmp_path / "b", steps=8, skipped=[3, 3], plants=[Plant(3, "input", "batch[0]")])
    rc = bisect.main([a, b, "--json"])
    d = json.loads(capsys.readouterr().out)
    assert rc == 1 and (d["first"]["step"], d["first"]["kind"], d["cause"]) == (3, "input", "data")
    note = next(n for n in d["notes"] if "skipped different updates" in n)
    assert "A at no step, B at step 3 (2x)" in note
    assert bisect.main([a, b]) == 1
    assert "B at step 3 (2x)" in capsys.readouterr().out
    # The same skips in both runs: nothing to say.
    c = write_run(tmp_path / "c", steps=8, skipped=[3, 3], plants=[Plant(3, "input", "batch[0]")])
    assert bisect.main([b, c, "--json"]) == 0
    assert not any("skipped" in n for n in json.loads(capsys.readouterr().out)["notes"])


def test_an_optimizer_state_that_differs_before_the_first_update_gets_its_own_advice(tmp_path, capsys):
    from tracer.compare import INIT_SLOT_NEXT

    a = write_run(tmp_path / "a", steps=4)
    b = write_run(tmp_path / "b", steps=4, plants=[Plant(0, "optimizer_slot", "dense/kernel/momentum",
                                                         initial=True)])
    assert bisect.main([a, b, "--json"]) == 1
    d = json.loads(capsys.readouterr().out)
    assert (d["cause"], d["first"]["kind"], d["next_step"]) == ("init", "optimizer_slot", INIT_SLOT_NEXT)
    c = write_run(tmp_path / "c", steps=4, plants=[Plant(0, "weight", "dense/kernel", initial=True)])
    assert bisect.main([a, c, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["next_step"] != INIT_SLOT_NEXT
