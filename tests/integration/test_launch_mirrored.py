"""launch/train.py under MirroredStrategy on logical CPUs: one subprocess smoke test, the rest in-process."""

import glob
import os
import subprocess
import sys

import numpy as np
import pytest

from launch import train

pytestmark = pytest.mark.tf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "launch", "train.py")


def replica_files(trace_dir):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(str(trace_dir), "replica-*.h5")))


def test_script_runs_and_prints_the_bisect_command(tmp_path):
    trace = tmp_path / "trace"
    proc = subprocess.run(
        [sys.executable, TRAIN, "--replicas", "2", "--steps", "5", "--batch-size", "16", "--trace-dir", str(trace)],
        cwd=tmp_path, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert replica_files(trace) == ["replica-0.h5", "replica-1.h5"]
    assert "MirroredStrategy, 1 worker(s), 2 replica(s)" in proc.stdout
    assert f"trace: {trace} (2 files" in proc.stdout
    assert f"python -m tracer.bisect {trace} {trace}-b" in proc.stdout
    assert f"--replicas 2 --steps 5 --batch-size 16 --trace-dir {trace}-b" in proc.stdout
    assert "5/5" in proc.stderr, "tqdm progress is shown"


def test_xla_and_accumulation_trace_micro_steps(tf_cpus, tmp_path, capsys):
    from tracer.reader import TraceReader

    trace = tmp_path / "t"
    code = train.main(["--replicas", "2", "--steps", "3", "--batch-size", "16", "--accumulate", "2", "--xla",
                       "--optimizer", "momentum", "--lr-schedule", "step:1:0.01", "--trace-dir", str(trace),
                       "--no-progress"])
    assert code == 0, capsys.readouterr().err[-4000:]
    files = replica_files(trace)
    assert files == ["replica-0.h5", "replica-1.h5"]
    readers = [TraceReader(os.path.join(trace, f)) for f in files]
    try:
        r0 = readers[0]
        assert r0.n_steps == 3 and r0.attrs["run.xla"] and r0.attrs["run.accumulate"] == 2
        # Each variable's gradient of micro-steps 0 and 1, plus their sum as
        # applied (micro_step -1).
        micro = sorted(t.micro_step for t in r0.tensors if t.kind == "local_grad")
        assert micro == [-1] * 6 + [0] * 6 + [1] * 6, micro
        hashes = [r.fingerprints("hash") for r in readers]
        for kind, equal in (("allreduced_grad", True), ("weight", True), ("local_grad", False)):
            cols = [i for i, t in enumerate(r0.tensors) if t.kind == kind]
            assert np.array_equal(hashes[0][:, cols], hashes[1][:, cols]) == equal, kind
    finally:
        for r in readers:
            r.close()


def test_tracing_does_not_change_the_final_weights(tf_cpus, tmp_path):
    common = ["--replicas", "2", "--steps", "4", "--batch-size", "16", "--no-progress"]
    assert train.main(common + ["--no-trace", "--save-weights", str(tmp_path / "plain.npz")]) == 0
    assert train.main(common + ["--capture", "full", "--trace-dir", str(tmp_path / "t"),
                                "--save-weights", str(tmp_path / "traced.npz")]) == 0
    with np.load(tmp_path / "plain.npz") as plain, np.load(tmp_path / "traced.npz") as traced:
        assert sorted(plain.files) == sorted(traced.files) and len(plain.files) == 6
        for name in plain.files:
            assert plain[name].tobytes() == traced[name].tobytes(), name


def test_mixed_precision_skips_overflowing_updates_and_tracing_changes_nothing(tf_cpus, tmp_path, capsys):
    """--mixed-precision with a loss scale so large that the first updates overflow: the LossScaleOptimizer
    skips them, the job says how many, the trace lists them, and the traced job's weights are the untraced
    one's, bit for bit."""
    from tracer.reader import TraceReader

    common = ["--replicas", "2", "--steps", "6", "--batch-size", "16", "--mixed-precision", "--loss-scale",
              "4194304", "--no-progress"]
    assert train.main(common + ["--no-trace", "--save-weights", str(tmp_path / "plain.npz")]) == 0
    assert train.main(common + ["--capture", "full", "--trace-dir", str(tmp_path / "t"),
                                "--save-weights", str(tmp_path / "traced.npz")]) == 0
    out = capsys.readouterr().out
    with np.load(tmp_path / "plain.npz") as plain, np.load(tmp_path / "traced.npz") as traced:
        for name in plain.files:
            assert plain[name].tobytes() == traced[name].tobytes(), name
    with TraceReader(str(tmp_path / "t" / "replica-0.h5")) as r:
        steps, skipped = r.steps(), r.skipped_steps()
        assert skipped.size and steps.size + skipped.size == 6 and list(steps) == list(range(steps.size))
        assert r.attrs["run.mixed_precision"] and r.attrs["optimizer_class"] == "LossScaleOptimizer"
        assert r.tensors[r.column(("local_grad", "mlp/dense_0/kernel", -1))].dtype == "float32"
    assert f"loss scale: {skipped.size} of 6 updates skipped (gradients not finite)" in out, out


def test_user_dataset(tmp_path):
    # A subprocess: every MirroredStrategy in one process starts its collective
    # keys at the same value (TF's MirroredStrategy._collective_key_base is a
    # class constant), so a second model of another size in the same process
    # fails with "Shape mismatch in the collective instance 100".
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "mine.npz", x=rng.normal(size=(64, 5)), y=rng.integers(0, 3, size=64))
    proc = subprocess.run(
        [sys.executable, TRAIN, "--data", str(tmp_path / "mine.npz"), "--replicas", "2", "--steps", "2",
         "--batch-size", "8", "--no-trace", "--no-progress"],
        cwd=tmp_path, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "<Dataset 'mine.npz' examples=64 features=5 classes=3>" in proc.stdout
    assert "untraced run (--no-trace): no trace written" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["--data", "missing.npz"], r"--data file not found. Received: 'missing.npz'"),
    (["--optimizer", "sgd", "--adam-epsilon", "1e-3"], "--adam-epsilon does not apply to --optimizer sgd"),
    (["--lr-schedule", "cosine"], r"--lr-schedule must be 'constant' or 'step:K:LR'"),
    (["--replicas", "2", "--batch-size", "15"], "--batch-size must be divisible by the 2 replicas"),
    (["--loss-scale", "5"], "--loss-scale applies to --mixed-precision runs"),
])
def test_usage_errors_are_one_line(tf_cpus, tmp_path, capsys, args, message):
    code = train.main(args + ["--trace-dir", str(tmp_path / "t"), "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("train.py: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "t").exists(), "a rejected run leaves no trace directory"


def test_bad_npz_contents(tmp_path, capsys):
    np.savez(tmp_path / "bad.npz", features=np.zeros((4, 2)), labels=np.zeros(4))
    assert train.main(["--data", str(tmp_path / "bad.npz")]) == 2
    assert "must contain arrays 'x' (features) and 'y' (labels)" in capsys.readouterr().err
