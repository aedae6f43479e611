"""A job restored from a checkpoint extends its trace: one continuous run, bitwise equal to an uninterrupted one.

Real TensorFlow (launch/train.py, MirroredStrategy on 2 logical CPUs), real
tf.train.Checkpoint, real HDF5. The interrupted runs resume in-process; the
killed one is a subprocess SIGKILLed right after it saved a checkpoint.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from launch import train
from tracer.bisect import main as bisect_main
from tracer.reader import Run

pytestmark = pytest.mark.tf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REF_STEPS = 24
COMMON = ["--replicas", "2", "--batch-size", "16", "--no-progress"]


@pytest.fixture(scope="module")
def reference(tf_cpus, tmp_path_factory):
    """An uninterrupted run of REF_STEPS steps, same seeds."""
    trace = str(tmp_path_factory.mktemp("ref") / "trace")
    assert train.main(COMMON + ["--steps", str(REF_STEPS), "--trace-dir", trace, "--capture", "full",
                                "--full-every", "5"]) == 0
    return trace


def joined_steps(trace):
    with Run(trace) as run:
        return run.steps.tolist(), list(run.notes), sorted(os.listdir(trace))


def test_resumed_job_traces_one_continuous_run(reference, tmp_path, capsys):
    ckpt = str(tmp_path / "ckpt")
    first = COMMON + ["--checkpoint-dir", ckpt, "--checkpoint-every", "4", "--capture", "full", "--full-every", "5"]
    assert train.main(first + ["--steps", "6"]) == 0  # checkpoints at 4 and 6 (the end)
    # Restore the older checkpoint, as after a crash that lost ckpt-6: steps 4 and 5 are redone.
    with open(os.path.join(ckpt, "checkpoint"), "w") as f:
        f.write('model_checkpoint_path: "ckpt-4"\nall_model_checkpoint_paths: "ckpt-4"\n')
    assert train.main(first + ["--steps", "12"]) == 0  # the same command, more steps
    out = capsys.readouterr().out
    assert "restored" in out and "at optimizer step 4" in out
    trace = os.path.join(ckpt, "trace")  # --trace-dir defaults under --checkpoint-dir
    steps, notes, files = joined_steps(trace)
    assert files == ["replica-0.h5", "replica-0.seg1.h5", "replica-1.h5", "replica-1.seg1.h5"]
    assert steps == list(range(12))
    assert any("segment 0 from step 0, segment 1 from step 4" in n for n in notes), notes
    assert any("restarts at step 4, so its rows replace steps 4..5 (2 rows)" in n for n in notes), notes
    # The restored state equals the weights and slots the trace recorded after step 3.
    assert not any("in no segment" in n or "did not restore" in n for n in notes), notes
    capsys.readouterr()
    assert bisect_main([reference, trace]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "no divergence beyond tolerance in 12 steps (0..11)" in out, out


def _latest_checkpoint_step(ckpt_dir):
    try:
        with open(os.path.join(ckpt_dir, "checkpoint")) as f:
            first = f.readline()  # model_checkpoint_path: "ckpt-<n>"
    except OSError:
        return None
    digits = first.rsplit("-", 1)[-1].strip().strip('"')
    return int(digits) if digits.isdigit() else None


def test_killed_job_resumes_without_duplicates_or_hidden_gaps(reference, tmp_path, capsys):
    ckpt, trace = str(tmp_path / "ckpt"), str(tmp_path / "trace")
    args = COMMON + ["--checkpoint-dir", ckpt, "--checkpoint-every", "3", "--trace-dir", trace]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--steps", "100000"] + args,
                            cwd=str(tmp_path), env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while _latest_checkpoint_step(ckpt) is None:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    restored = _latest_checkpoint_step(ckpt)
    with Run(trace) as killed:
        traced_before = killed.steps.tolist()
    assert traced_before[:restored] == list(range(restored)), "the trace was flushed before the checkpoint"
    assert restored + 6 <= REF_STEPS, f"killed late (checkpoint at step {restored}); the reference is too short"
    total = restored + 6
    assert train.main(args + ["--steps", str(total)]) == 0
    steps, notes, files = joined_steps(trace)
    print(f"killed after checkpoint {restored} with {len(traced_before)} steps traced; resumed to {total}; "
          f"notes: {notes}")
    assert "replica-0.seg1.h5" in files
    assert len(steps) == len(set(steps)), "no step twice"
    gaps = [n for n in notes if "in no segment" in n]
    assert steps == list(range(total)) and not gaps, (steps, notes)
    if len(traced_before) > restored:  # the killed process went past its checkpoint: those rows are redone
        assert any(f"restarts at step {restored}, so its rows replace steps {restored}.." in n for n in notes), notes
    capsys.readouterr()
    assert bisect_main([reference, trace]) == 0, capsys.readouterr().out
    with Run(trace) as run:
        r = run.readers[0]
        assert np.array_equal(r.steps(), np.arange(total))
