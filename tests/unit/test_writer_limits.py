"""The writer stops before a file-size limit (RLIMIT_FSIZE) and leaves a consistent, readable file."""

import os
import subprocess
import sys

import pytest

from tracer.reader import TraceReader

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VICTIM = """
import resource, signal, sys, warnings
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (3 << 20, 3 << 20))
from tests.integration import crash_writer
from tracer.errors import TraceWriteError
try:
    crash_writer.main([sys.argv[1], "10", "1000"])
except TraceWriteError as exc:
    print("stopped:", exc)
    sys.exit(3)
"""


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX resource limits")
def test_file_size_limit_stops_the_writer_cleanly(tmp_path):
    path = tmp_path / "replica-0.h5"
    proc = subprocess.run([sys.executable, "-c", VICTIM, str(path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert f"stopped: {path}: writing the trace failed: file size limit reached (RLIMIT_FSIZE 3145728" in proc.stdout
    assert os.path.getsize(path) <= 3 << 20
    with TraceReader(str(path)) as r:
        assert r.n_steps > 0 and list(r.steps()) == list(range(r.n_steps))
        assert r.complete  # closed cleanly inside the reserve kept for it
