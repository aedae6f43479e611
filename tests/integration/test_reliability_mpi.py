"""Dead rank: under real mpirun, a rank SIGKILLed mid-training ends the whole job, and traces stay readable.

The rank is killed from outside (found by its ``OMPI_COMM_WORLD_RANK``), as the
OOM killer or a node failure would; no Python code of the victim runs. The
exception case (a rank raises) is in test_launch_mpi.py.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from launch.mpi import mpirun_path
from tests.integration.test_launch_mpi import N, TRAIN, mpi_env

pytestmark = [pytest.mark.mpi, pytest.mark.tf]

END_BOUND = 60.0
"""Seconds from the kill to the end of the job (documented in docs/reliability.md)."""


def descendants(pid):
    """PIDs of every process below ``pid``."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def rank_pid(root_pid, rank):
    for pid in descendants(root_pid):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if f"OMPI_COMM_WORLD_RANK={rank}".encode() in env and b"python" in open(f"/proc/{pid}/cmdline", "rb").read():
            return pid
    return None


def has_steps(path):
    from tracer.reader import TraceReader

    try:
        with TraceReader(path) as r:
            return r.n_steps > 0
    except Exception:  # noqa: BLE001 - not created yet
        return False


def test_sigkilled_rank_ends_the_job_and_traces_stay_readable(tmp_path):
    from tracer.reader import TraceReader

    trace = tmp_path / "t"
    cmd = [mpirun_path(), "--oversubscribe", "-n", str(N), sys.executable, TRAIN, "--steps", "100000",
           "--batch-size", "16", "--trace-dir", str(trace), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=mpi_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        victim = None
        while time.monotonic() < deadline and proc.poll() is None:
            if has_steps(str(trace / "replica-1.h5")):
                victim = rank_pid(proc.pid, 1)
                if victim:
                    break
            time.sleep(0.5)
        assert victim, "rank 1 never wrote a step"
        time.sleep(1.0)  # well inside training: both ranks are stepping
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        try:
            output, _ = proc.communicate(timeout=END_BOUND + 60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job did not end within {END_BOUND + 60:.0f} s of rank 1's death")
        seconds = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    print(f"rank 1 SIGKILLed: the job ended {seconds:.1f} s later, status {proc.returncode}")
    print(output[-1500:])
    assert proc.returncode != 0
    assert seconds < END_BOUND, f"the job took {seconds:.0f} s to end after rank 1 died"
    assert "rank 1" in output and "signal 9" in output, output[-3000:]
    assert not [p for p in descendants(proc.pid)]
    for i in range(N):
        with TraceReader(str(trace / f"replica-{i}.h5")) as r:
            assert r.n_steps > 0
            # Rank 1 could not close its file; rank 0 may have (its collective failed
            # first) or may have been ended by mpirun before it could.
            assert not r.complete or i != 1
            assert all(int(a) < int(b) for a, b in zip(r.steps()[:-1], r.steps()[1:]))
