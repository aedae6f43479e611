"""The README's traced training loop runs as printed and leaves a trace bisect accepts."""

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.tf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _readme_loop() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    loops = [b for b in blocks if "TracedMirroredStrategy(trace_dir=" in b and "strategy.run" in b]
    assert len(loops) == 1, "the README shows one traced training loop"
    return loops[0]


def test_readme_loop_runs_and_traces(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(_readme_loop())
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    trace = tmp_path / "traces" / "run-a"
    assert (trace / "replica-0.h5").exists()
    check = subprocess.run([sys.executable, "-m", "tracer.check", str(trace)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
