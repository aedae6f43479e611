"""Full disk: the traced reference job stops with a clear error naming the file, or goes on untraced when asked.

The trace directory is a 6 MB tmpfs mounted inside tmp_path when this process
may mount (root in a container); otherwise the job runs under a 4 MB
RLIMIT_FSIZE, which the writer respects the same way. Either way the steps
written before the limit stay readable.
"""

import os
import re
import resource
import signal
import subprocess
import sys

import pytest

from tracer.reader import Run, TraceReader

pytestmark = pytest.mark.tf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "launch", "train.py")
LIMIT = 6 << 20


@pytest.fixture
def small_dir(tmp_path):
    """(directory, preexec_fn): a small file system, or a file-size limit for the job."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={LIMIT}", "tmpfs", str(mnt)], capture_output=True).returncode == 0
    if mounted:
        yield str(mnt), None, "tmpfs"
        subprocess.run(["umount", str(mnt)], check=True)
        return

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death, as a real limit behaves
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT * 2 // 3, LIMIT * 2 // 3))
    yield str(mnt), limit, "RLIMIT_FSIZE"


def train(trace, preexec, *extra):
    cmd = [sys.executable, TRAIN, "--replicas", "2", "--steps", "30", "--batch-size", "16", "--capture", "full",
           "--trace-dir", trace, "--no-progress", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=preexec,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


@pytest.mark.parametrize("mode", ["stop", "continue"])
def test_full_trace_directory(small_dir, mode):
    directory, preexec, how = small_dir
    trace = os.path.join(directory, "t")
    proc = train(trace, preexec, "--on-trace-error", mode)
    print(f"{how}, --on-trace-error {mode}: exit {proc.returncode}")
    if mode == "stop":
        assert proc.returncode == 1, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
        assert len(errors) == 1, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        assert "replica-" in errors[0] and "writing the trace failed" in errors[0]
        assert ("file system full" in errors[0]) if how == "tmpfs" else ("file size limit" in errors[0])
        assert "--on-trace-error continue" in errors[0]
        assert "train.py: done" not in proc.stdout
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "train.py: done, 30 steps" in proc.stdout
        assert "RuntimeWarning: tracer: writing" in proc.stderr and "tracing is disabled" in proc.stderr
    # Each file holds the steps its writer said stay readable: the rows written before the refusal were
    # flushed while the space for it was still there, before the other replica's writer used it up.
    said = re.findall(r"(/\S+?\.h5)\b.*? (\d+) steps written before the error stay readable", proc.stderr)
    assert said, proc.stderr[-3000:]
    for path, count in said:
        with TraceReader(path) as r:
            assert len(r.steps()) == int(count), (path, count)
    with Run(trace) as run:
        assert 0 < run.n_rows < 30
        assert list(run.steps) == list(range(run.n_rows))
        written = run.n_rows
    from tracer.check import main as check

    assert check([trace]) == 0
    print(f"{written} steps readable after the limit")
