"""Real ``mpirun`` runs of launch/train.py: MultiWorkerMirroredStrategy, one worker per rank.

Each job starts TensorFlow in every rank (10-20 s here), so steps and batches
are tiny. These tests work for any ``-n``; ``N`` is 2 to fit a 2-core machine.
"""

import glob
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from launch.mpi import mpirun_path

pytestmark = [pytest.mark.mpi, pytest.mark.tf]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "launch", "train.py")
N = 2
TIMEOUT = 300


def mpi_env(**extra) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **extra)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def mpirun(n, args, cwd, timeout=TIMEOUT, **env):
    """Runs `mpirun -n n python launch/train.py args`; returns (CompletedProcess, seconds)."""
    forwarded = [x for k in env for x in ("-x", k)]
    cmd = [mpirun_path(), "--oversubscribe", "-n", str(n), *forwarded, sys.executable, TRAIN, *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=mpi_env(**env), capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


def hashes_by_kind(reader):
    """{kind: (steps x columns) uint64 hash matrix} of one replica file."""
    table = reader.fingerprints("hash")
    out = {}
    for kind in {t.kind for t in reader.tensors}:
        cols = [i for i, t in enumerate(reader.tensors) if t.kind == kind]
        out[kind] = table[:, cols]
    return out


def test_two_workers_write_one_consistent_trace_per_replica(tmp_path):
    from tracer.reader import Run, TraceReader

    trace = tmp_path / "trace"
    proc, seconds = mpirun(N, ["--steps", "3", "--batch-size", "16", "--trace-dir", str(trace), "--no-progress"],
                           cwd=tmp_path)
    print(f"mpirun -n {N} traced job: {seconds:.1f} s")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    files = sorted(os.path.basename(p) for p in glob.glob(str(trace / "replica-*.h5")))
    assert files == [f"replica-{i}.h5" for i in range(N)]
    assert f"python -m tracer.bisect {trace} {trace}-b" in proc.stdout
    assert f"mpirun -n {N} " in proc.stdout
    assert "MultiWorkerMirroredStrategy" in proc.stdout
    assert proc.stdout.count("train.py: done") == 1, "only rank 0 reports"

    # The analyzer must accept the directory as one run: every worker's files
    # carry the same run id, replica count and tensor table.
    with Run(str(trace)) as run:
        assert run.num_replicas == N and len(run.readers) == N

    readers = [TraceReader(str(trace / f)) for f in files]
    try:
        for i, r in enumerate(readers):
            assert r.complete and r.n_steps == 3
            assert (r.attrs["replica"], r.attrs["worker"]) == (i, i)
            assert (r.attrs["num_replicas"], r.attrs["num_workers"]) == (N, N)
        kinds = [hashes_by_kind(r) for r in readers]
        for kind in ("allreduced_grad", "optimizer_slot", "weight"):
            for other in kinds[1:]:
                np.testing.assert_array_equal(kinds[0][kind], other[kind], err_msg=kind)
        for kind in ("input", "local_grad"):
            for other in kinds[1:]:
                # Each replica consumed its own shard, at every step.
                assert np.all(np.any(kinds[0][kind] != other[kind], axis=1)), kind
    finally:
        for r in readers:
            r.close()


def test_failing_rank_ends_the_whole_job(tmp_path):
    # Rank 1 raises at step 1, while rank 0 is inside that step's all-reduce.
    proc, seconds = mpirun(N, ["--steps", "50", "--batch-size", "16", "--trace-dir", str(tmp_path / "t"),
                               "--no-progress"], cwd=tmp_path, timeout=120,
                           TRACER_TEST_FAIL_RANK="1", TRACER_TEST_FAIL_STEP="1")
    print(f"failing rank ended the job in {seconds:.1f} s")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-4000:]
    assert seconds < 60, f"the job took {seconds:.0f} s to end after rank 1 failed"
    assert "[rank 1/2" in output and "deliberate failure on rank 1 at step 1" in output, output[-4000:]
    assert "aborting the whole MPI job" in output
    assert "train.py: done" not in output


def test_usage_error_on_every_rank_ends_the_job(tmp_path):
    # 15 examples cannot be split over 2 replicas; the check runs before any
    # trace file is created, on every rank.
    proc, seconds = mpirun(N, ["--steps", "2", "--batch-size", "15", "--trace-dir", str(tmp_path / "t")],
                           cwd=tmp_path, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert seconds < 60
    assert "--batch-size must be divisible by the 2 replicas" in output and "Received: --batch-size 15" in output
    assert not (tmp_path / "t").exists() or not os.listdir(tmp_path / "t")


def test_two_workers_resumed_from_a_checkpoint_trace_one_run(tmp_path):
    """Restarted with mpirun from its checkpoint, the job continues its trace in segment files under the
    same run id (its new ports make a new cluster), and the joined trace equals an uninterrupted job's."""
    from tracer.bisect import main as bisect_main
    from tracer.reader import Run

    common = ["--batch-size", "16", "--no-progress"]
    proc, _ = mpirun(N, common + ["--steps", "4", "--trace-dir", str(tmp_path / "ref")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    resumable = common + ["--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "2"]
    proc, _ = mpirun(N, resumable + ["--steps", "2"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    proc, _ = mpirun(N, resumable + ["--steps", "4"], cwd=tmp_path)  # the same command, more steps
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "restored" in proc.stdout and "at optimizer step 2" in proc.stdout, proc.stdout
    trace = tmp_path / "ckpt" / "trace"
    assert sorted(os.listdir(trace)) == [f"replica-{i}{seg}.h5" for i in range(N) for seg in ("", ".seg1")]
    with Run(str(trace)) as run:
        assert run.steps.tolist() == [0, 1, 2, 3]
        assert any("segment 1 from step 2" in n for n in run.notes), run.notes
    assert bisect_main([str(tmp_path / "ref"), str(trace)]) == 0


def test_two_workers_with_partial_batches_read_inside_the_step(tmp_path):
    """--partial-batches: the iterator, read inside the tf.function as in TensorFlow's multi-worker tutorial,
    gives batches of unknown size, and each epoch of 38 examples ends with a batch of 6. Every step's shards,
    joined over the workers, are that step's batch; an epoch's batches hold every example once; and tracing
    changes nothing: the traced job's final weights equal an untraced one's, bit for bit."""
    from tracer.hashing import tensor_hash
    from tracer.reader import TraceReader

    rng = np.random.default_rng(0)
    x = rng.standard_normal((38, 8)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x, y=rng.integers(0, 3, 38).astype(np.int32))
    common = ["--data", str(tmp_path / "data.npz"), "--batch-size", "16", "--steps", "6", "--partial-batches",
              "--no-progress"]
    trace = tmp_path / "trace"
    proc, _ = mpirun(N, common + ["--capture", "full", "--trace-dir", str(trace),
                                  "--save-weights", str(tmp_path / "traced.npz")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    proc, _ = mpirun(N, common + ["--no-trace", "--save-weights", str(tmp_path / "untraced.npz")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    with np.load(tmp_path / "traced.npz") as traced, np.load(tmp_path / "untraced.npz") as untraced:
        assert sorted(traced.files) == sorted(untraced.files)
        for name in traced.files:
            np.testing.assert_array_equal(traced[name], untraced[name], err_msg=name)

    readers = [TraceReader(str(trace / f"replica-{i}.h5")) for i in range(N)]
    try:
        col = next(c for c, t in enumerate(readers[0].tensors) if t.kind == "input" and len(t.shape) == 2)
        assert readers[0].tensors[col].shape == (-1, 8)  # features of a batch whose size varies
        batches = []
        for step in range(6):
            shards = [r.full(col, step) for r in readers]
            for r, shard in zip(readers, shards):
                assert tensor_hash(shard) == int(r.fingerprints("hash")[step, col])
            batches.append(np.concatenate(shards))
        assert [len(b) for b in batches] == [16, 16, 6] * 2
        for epoch in (batches[:3], batches[3:]):
            rows = np.concatenate(epoch)
            np.testing.assert_array_equal(rows[np.lexsort(rows.T[::-1])], x[np.lexsort(x.T[::-1])])
        kinds = [hashes_by_kind(r) for r in readers]
        for kind in ("allreduced_grad", "optimizer_slot", "weight"):
            np.testing.assert_array_equal(kinds[0][kind], kinds[1][kind], err_msg=kind)
    finally:
        for r in readers:
            r.close()


def test_two_workers_with_mixed_precision_trace_the_updates_applied(tmp_path):
    """--mixed-precision under MultiWorkerMirroredStrategy: Keras' LossScaleOptimizer applies the update in a
    conditional in the replica context, and all-reduces there. The trace holds what it applied: each worker's
    all-reduced gradient is the sum of the two workers' local ones, bit for bit, and the workers agree."""
    from tracer.check import main as check_main
    from tracer.reader import TraceReader

    trace = tmp_path / "trace"
    proc, _ = mpirun(N, ["--steps", "3", "--batch-size", "16", "--mixed-precision", "--capture", "full",
                         "--trace-dir", str(trace), "--no-progress"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert check_main([str(trace)]) == 0
    readers = [TraceReader(str(trace / f"replica-{i}.h5")) for i in range(N)]
    try:
        r0 = readers[0]
        assert r0.steps().tolist() == [0, 1, 2] and not r0.skipped_steps().size
        for col, spec in enumerate(r0.tensors):
            if spec.kind != "allreduced_grad":
                continue
            local = r0.column(("local_grad", spec.name, -1))
            for step in range(3):
                total = sum(r.full(local, step) for r in readers)
                for r in readers:
                    np.testing.assert_array_equal(r.full(col, step), total, err_msg=f"{spec.name} {step}")
    finally:
        for r in readers:
            r.close()
