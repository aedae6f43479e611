"""Segments of a resumed job, built with the real TraceWriter: joined in step order, overlaps replaced, gaps noted."""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.unit.tracegen import Plant, model_tensors, write_run
from tracer import schema
from tracer.bisect import main as bisect_main
from tracer.check import main as check_main
from tracer.errors import CaptureError, TraceFormatError
from tracer.reader import Run, TraceReader
from tracer.segments import JoinedReader, segment_path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def add_segment(run_dir, k, *, first_step, steps, seed=0, replicas=2, **kw):
    """Write a run starting at ``first_step`` and move its files in as segment ``k``."""
    tmp = os.path.join(str(run_dir) + f".part{k}")
    write_run(tmp, steps=steps, replicas=replicas, first_step=first_step, seed=seed, **kw)
    for r in range(replicas):
        os.replace(os.path.join(tmp, schema.replica_file_name(r)),
                   os.path.join(run_dir, schema.replica_file_name(r, k)))
    os.rmdir(tmp)


def hashes(run, replica=0):
    return run.readers[replica].fingerprints("hash")


def test_single_segment_run_reads_as_before(tmp_path):
    run_dir = write_run(tmp_path / "a", steps=5)
    with Run(run_dir) as run:
        assert all(type(r) is TraceReader for r in run.readers)
        assert run.notes == []


def test_overlap_is_replaced_by_the_later_segment(tmp_path):
    run_dir = write_run(tmp_path / "a", steps=12, seed=0)  # steps 0..11
    add_segment(run_dir, 1, first_step=8, steps=12, seed=1)  # restored at 8: redoes 8..11, then 12..19
    with Run(run_dir) as run:
        assert isinstance(run.readers[0], JoinedReader)
        assert run.steps.tolist() == list(range(20))
        with Run(os.path.join(run_dir, "replica-0.h5")) as seg0, \
                Run(os.path.join(run_dir, "replica-0.seg1.h5")) as seg1:
            joined = hashes(run)
            assert np.array_equal(joined[:8], hashes(seg0)[:8])
            assert np.array_equal(joined[8:], hashes(seg1))  # the redone steps come from segment 1
            assert run.readers[0].initial_step == 0
            assert np.array_equal(run.readers[0].initial_fingerprints("hash"), seg0.readers[0].initial_fingerprints("hash"))
        notes = " | ".join(run.notes)
        assert "joined from 2 segment file(s): segment 0 from step 0, segment 1 from step 8" in notes
        assert "replicas [0, 1]: segment 1 (replica-<g>.seg1.h5) restarts at step 8, so its rows replace steps " \
               "8..11 (4 rows)" in notes
        assert "in no segment" not in notes


def test_gap_between_segments_is_noted_not_hidden(tmp_path):
    run_dir = write_run(tmp_path / "a", steps=10)  # 0..9
    add_segment(run_dir, 1, first_step=14, steps=6)  # 14..19: 10..13 were never written
    with Run(run_dir) as run:
        assert run.steps.tolist() == list(range(10)) + list(range(14, 20))
        assert any("steps 10..13 (4 steps) are in no segment" in n for n in run.notes), run.notes


def test_segment_restored_from_an_older_checkpoint_replaces_a_whole_segment(tmp_path):
    run_dir = write_run(tmp_path / "a", steps=10)  # 0..9
    add_segment(run_dir, 1, first_step=10, steps=10, seed=1)  # 10..19
    add_segment(run_dir, 2, first_step=5, steps=20, seed=2)  # restored at 5 again: 5..24
    with Run(run_dir) as run:
        assert run.steps.tolist() == list(range(25))
        with Run(os.path.join(run_dir, "replica-1.seg2.h5")) as seg2:
            assert np.array_equal(hashes(run, 1)[5:], hashes(seg2))
        assert any("restarts at step 5, so its rows replace steps 5..19 (15 rows)" in n for n in run.notes), run.notes


def test_restored_state_that_differs_from_the_trace_is_noted(tmp_path):
    # tracegen's /initial values are independent of the previous step's weights,
    # i.e. a checkpoint that did not restore what the trace recorded.
    run_dir = write_run(tmp_path / "a", steps=6)
    add_segment(run_dir, 1, first_step=6, steps=4)
    with Run(run_dir) as run:
        assert any("the state segment 1 restored at step 6 differs from what the earlier segment recorded after "
                   "step 5" in n for n in run.notes), run.notes


def test_full_tensors_come_from_the_segment_that_holds_the_step(tmp_path):
    run_dir = write_run(tmp_path / "a", steps=6, full=True, seed=0)  # 0..5
    add_segment(run_dir, 1, first_step=4, steps=4, full=True, full_every=2, seed=1)  # 4..7, full at 4, 6
    with Run(run_dir) as run:
        r = run.readers[0]
        assert r.full_steps().tolist() == [0, 1, 2, 3, 4, 6]
        col = r.column(("weight", "dense/kernel", -1))
        with TraceReader(os.path.join(run_dir, "replica-0.seg1.h5")) as seg1, \
                TraceReader(os.path.join(run_dir, "replica-0.h5")) as seg0:
            assert np.array_equal(r.full(col, 4), seg1.full(col, 4))
            assert not np.array_equal(r.full(col, 4), seg0.full(col, 4))
            assert np.array_equal(r.full(col, 3), seg0.full(col, 3))
            assert r.full(col, 5) is None
            assert r.initial_step == 0 and np.array_equal(r.full(col, 0, schema.INITIAL),
                                                          seg0.full(col, 0, schema.INITIAL))


def test_bisect_and_check_see_one_continuous_run(tmp_path, capsys):
    ref = write_run(tmp_path / "ref", steps=20, plants=[Plant(step=15, kind="weight", name="out/kernel", replica=None)])
    resumed = write_run(tmp_path / "resumed", steps=13)  # 0..12, killed
    add_segment(resumed, 1, first_step=10, steps=10, plants=[Plant(step=15, kind="weight", name="out/kernel", replica=None)])
    assert bisect_main([ref, resumed]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "20 steps (0..19)" in out and "rows replace steps 10..12" in out
    assert check_main([resumed]) == 0
    other = write_run(tmp_path / "other", steps=20)
    assert bisect_main([other, resumed, "--json"]) == 1
    assert '"step": 15' in capsys.readouterr().out


def test_segments_of_another_run_are_refused(tmp_path):
    run_dir = write_run(tmp_path / "a", steps=4)
    add_segment(run_dir, 1, first_step=4, steps=4, tensors=model_tensors(batch=(8, 5)))
    with pytest.raises(TraceFormatError, match=r"replica-0\.seg1\.h5: tensor table differs from .*replica-0\.h5"):
        Run(run_dir)


def test_segment_path_chooses_the_file_at_writer_creation(tmp_path):
    specs = model_tensors()
    d = str(tmp_path / "t")
    assert segment_path(d, 0, 7, tensors=specs, num_replicas=2) == (os.path.join(d, "replica-0.h5"), 0, None)
    write_run(d, steps=4)
    add_segment(d, 1, first_step=4, steps=2)
    # Resumed (step > 0): the next free segment, under the run id of the one before it.
    with TraceReader(os.path.join(d, "replica-1.seg1.h5")) as r:
        run_id = r.run_id
    assert segment_path(d, 1, 6, tensors=specs, num_replicas=2) == (os.path.join(d, "replica-1.seg2.h5"), 2, run_id)
    with pytest.raises(CaptureError, match=r"replica-1\.seg1\.h5 is the trace of another run"):
        segment_path(d, 1, 6, tensors=specs[1:], num_replicas=2)
    # A fresh run (step 0) starts over: the old segments go, replica-<g>.h5 is rewritten.
    assert segment_path(d, 1, 0, tensors=specs, num_replicas=2) == (os.path.join(d, "replica-1.h5"), 0, None)
    assert sorted(os.listdir(d)) == ["replica-0.h5", "replica-0.seg1.h5", "replica-1.h5"]


def test_bisect_stays_tensorflow_free_with_segments(tmp_path):
    run_dir = write_run(tmp_path / "a", steps=3)
    add_segment(run_dir, 1, first_step=3, steps=2)
    # A fresh interpreter: other tests in this process may have imported TensorFlow.
    code = ("import sys; from tracer.bisect import main; code = main([sys.argv[1], sys.argv[1]]); "
            "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'; sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", code, str(run_dir)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stdout + proc.stderr
