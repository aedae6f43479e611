"""SIGKILL a process while it writes a trace, then check what survived (shared by the test and the bench).

The victim is ``tests/integration/crash_writer.py`` (TF-free, real TraceWriter, full
tensors every step, values known by construction) or any command that writes a
trace directory (``launch/train.py``); :func:`verify_file` checks one file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

import numpy as np

from tests.integration import crash_writer
from tests.unit.tracegen import _stack
from tracer import schema
from tracer.hashing import fingerprint
from tracer.reader import TraceReader

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def verify_file(path: str, expected=None) -> Dict:
    """Open ``path`` with tracer.reader and check every readable step.

    Checks: steps are 0, 1, 2, ... (strictly increasing, none missing); every
    row's fingerprints match its full tensor where one is stored; with
    ``expected(step) -> [arrays]``, every row equals the values written.
    Returns ``{"rows": n, "problems": [...]}``.
    """
    problems: List[str] = []
    with TraceReader(path) as r:
        rows = r.n_steps
        steps = r.steps()
        if not np.array_equal(steps, np.arange(rows)):
            problems.append(f"steps are not 0..{rows - 1}: {steps[:20]}")
        hashes = r.fingerprints("hash")
        full_steps = set(int(s) for s in r.full_steps())
        for k, step in enumerate(steps):
            step = int(step)
            want = expected(step) if expected is not None else None
            if want is not None:
                fp = _stack([fingerprint(x) for x in want])[0]
                if not np.array_equal(hashes[k], fp):
                    problems.append(f"row {k} (step {step}): fingerprints differ from what was written")
            if step in full_steps:
                for col, spec in enumerate(r.tensors):
                    value = r.full(col, step)
                    if value is None and not _held_by_a_file_that_stopped_earlier(r, col, step):
                        problems.append(f"step {step}: full tensor {spec.name} missing")
                    if value is None:
                        continue
                    if spec.dtype == "bfloat16":
                        continue
                    if int(fingerprint(np.asarray(value, dtype=spec.dtype))[0]) != int(hashes[k, col]):
                        problems.append(f"step {step}: full tensor {spec.name} does not match its fingerprint")
        complete = r.complete
    return {"rows": rows, "problems": problems, "complete": complete}


def _held_by_a_file_that_stopped_earlier(r: TraceReader, col: int, step: int) -> bool:
    """Whether the tensor is kept in another local replica's file, whose last flush came before ``step``.

    Each file is flushed on its own: after a kill, a replica's file may point to
    a row of the first replica's file that never reached the disk.
    """
    holder = r.holder(col, step)
    if holder is None or holder == r.replica:
        return False
    path = os.path.join(os.path.dirname(r.path), schema.replica_file_name(holder))
    with TraceReader(path) as other:
        return step not in set(int(s) for s in other.full_steps())


def kill_writer_once(work_dir: str, rng, *, flush_every: int = 10, max_delay: float = 1.5,
                     timeout: float = 60) -> Dict:
    """Start the crash_writer victim, SIGKILL it at a random moment after its first step, verify the file."""
    path = os.path.join(work_dir, "replica-0.h5")
    proc = subprocess.Popen([sys.executable, "-m", "tests.integration.crash_writer", path, str(flush_every)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    handed = [-1]
    first = threading.Event()

    def pump():
        for line in proc.stdout:
            if line.startswith("handed "):
                handed[0] = int(line.split()[1])
                first.set()
        first.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        if not first.wait(timeout):
            raise RuntimeError(f"victim wrote no step within {timeout} s")
        delay = float(rng.uniform(0, max_delay))
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout)
        reader.join(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != -signal.SIGKILL:
        raise RuntimeError(f"victim ended by itself (status {proc.returncode}): {proc.stderr.read()[-2000:]}")
    specs = crash_writer.tensors()
    out = {"delay": delay, "handed": handed[0] + 1, "size": os.path.getsize(path)}
    try:
        out.update(verify_file(path, lambda s: crash_writer.expected(s, specs)))
        out["readable"] = True
    except Exception as exc:  # noqa: BLE001 - an unreadable trace is the failure being counted
        out.update(readable=False, rows=0, problems=[f"{type(exc).__name__}: {exc}"])
    out["lost"] = out["handed"] - out["rows"]
    return out


def kill_command_once(cmd: List[str], trace_dir: str, rng, *, max_delay: float, cwd: str,
                      timeout: float = 300, env: Optional[dict] = None) -> Dict:
    """Run ``cmd``; once a trace file holds a step, SIGKILL it after a random delay; verify every file."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    start = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"victim ended by itself (status {proc.returncode})")
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"victim wrote no step within {timeout} s")
            if _has_a_step(trace_dir):
                break
            time.sleep(0.2)
        delay = float(rng.uniform(0, max_delay))
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    files = sorted(f for f in os.listdir(trace_dir) if f.endswith(".h5"))
    out = {"delay": delay, "files": {}}
    for f in files:
        try:
            out["files"][f] = dict(verify_file(os.path.join(trace_dir, f)), readable=True)
        except Exception as exc:  # noqa: BLE001
            out["files"][f] = {"readable": False, "rows": 0, "problems": [f"{type(exc).__name__}: {exc}"]}
    return out


def _has_a_step(trace_dir: str) -> bool:
    path = os.path.join(trace_dir, "replica-0.h5")
    if not os.path.exists(path):
        return False
    try:
        with TraceReader(path) as r:
            return r.n_steps > 0
    except Exception:  # noqa: BLE001 - still being created
        return False
