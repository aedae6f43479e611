"""Training runs of the scenarios and the tracer commands that compare them.

A :class:`Job` is one run: a script (``launch/train.py`` or the user-side
``scenarios/inject.py``), its flags, and what it needs from its process
(environment variables, a fresh interpreter, ``mpirun``). A :class:`Workspace`
runs each job once into ``<root>/traces/<job name>`` and runs ``tracer.bisect``
or ``tracer.check`` on the results. Jobs run in this process when nothing
forbids it (fast: TensorFlow starts once), else as a subprocess.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from launch import mpi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = "launch/train.py"
INJECT = "scenarios/inject.py"
TIMEOUT = 600


class ScenarioError(RuntimeError):
    """A scenario's training run or tracer command failed; the message holds its output."""


@dataclasses.dataclass(frozen=True)
class Job:
    """One training run.

    Attributes:
        name: Directory name of its trace, ``traces/<name>``.
        flags: The script's flags, without ``--trace-dir``.
        script: ``launch/train.py`` or ``scenarios/inject.py``, relative to the repository.
        env: Environment variables of the run, as ``(name, value)`` pairs. TensorFlow
            reads them when it starts, so such a job runs in its own process.
        isolated: Run in its own process even without ``env``: for settings that stay on
            for the rest of a process once set (``enable_op_determinism``).
        mpi: Number of ``mpirun`` ranks, 0 for none.
        python: Another interpreter to run it with (another TensorFlow); "" for this one.
    """

    name: str
    flags: Tuple[str, ...]
    script: str = TRAIN
    env: Tuple[Tuple[str, str], ...] = ()
    isolated: bool = False
    mpi: int = 0
    python: str = ""

    def __post_init__(self):
        if not self.name or os.sep in self.name:
            raise ValueError(f"`name` must be a plain directory name. Received: name={self.name!r}")
        if self.script not in (TRAIN, INJECT):
            raise ValueError(f"`script` must be {TRAIN!r} or {INJECT!r}. Received: script={self.script!r}")
        if self.mpi < 0:
            raise ValueError(f"`mpi` must be >= 0. Received: mpi={self.mpi}")

    @property
    def in_process(self) -> bool:
        """Whether the run may share this process (and its TensorFlow) with others."""
        return not (self.env or self.isolated or self.mpi or self.python)

    def argv(self, trace_dir: str) -> List[str]:
        return [*self.flags, "--trace-dir", trace_dir]

    def command(self, trace_dir: Optional[str] = None) -> str:
        """The shell command a user types for this run (from the repository root)."""
        trace_dir = trace_dir or os.path.join("traces", self.name)
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env)
        python = self.python or "python"
        mpi = f"mpirun -n {self.mpi} " if self.mpi else ""
        return " ".join(x for x in (env, f"{mpi}{python} {self.script}", shlex.join(self.argv(trace_dir))) if x)


@dataclasses.dataclass
class Outcome:
    """What a tracer command said: exit status, its ``--json`` object and its text report."""

    command: str
    code: int
    report: Dict[str, Any]
    text: str


class Workspace:
    """Runs jobs into ``<root>/traces`` (each once) and compares their traces.

    Args:
        root: Working directory; traces go to ``<root>/traces/<job name>``.
        in_process: Run eligible jobs in this process (``False``: every job is a
            subprocess, as a user would run it; slower).
        timeout: Seconds a subprocess may take.
    """

    def __init__(self, root: str, *, in_process: bool = True, timeout: float = TIMEOUT):
        self.root = os.path.abspath(root)
        self.in_process = in_process
        self.timeout = timeout
        self.seconds: Dict[str, float] = {}
        self._jobs: Dict[str, Job] = {}

    def __repr__(self) -> str:
        return f"<Workspace {self.root!r} runs={len(self._jobs)}>"

    def trace_dir(self, job: Job) -> str:
        return os.path.join(self.root, "traces", job.name)

    def run(self, job: Job) -> str:
        """Runs ``job`` unless it already ran here; returns its trace directory."""
        known = self._jobs.get(job.name)
        if known is not None:
            if known != job:
                raise ValueError(f"two different jobs are named {job.name!r}: {known} and {job}")
            return self.trace_dir(job)
        trace_dir = self.trace_dir(job)
        os.makedirs(self.root, exist_ok=True)  # the working directory of subprocess jobs
        if os.path.exists(trace_dir):
            shutil.rmtree(trace_dir)
        start = time.monotonic()
        if self.in_process and job.in_process:
            self._run_here(job, trace_dir)
        else:
            self._run_subprocess(job, trace_dir)
        self.seconds[job.name] = time.monotonic() - start
        self._jobs[job.name] = job
        return trace_dir

    def _run_here(self, job: Job, trace_dir: str) -> None:
        if job.script == TRAIN:
            from launch import train as program
        else:
            from scenarios import inject as program
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = program.main(job.argv(trace_dir) + ["--no-progress"])
        if code != 0:
            raise ScenarioError(f"{job.command(trace_dir)} exited with {code}:\n{out.getvalue()[-4000:]}")

    def _run_subprocess(self, job: Job, trace_dir: str) -> None:
        python = job.python or sys.executable
        cmd = [python, os.path.join(ROOT, job.script), *job.argv(trace_dir), "--no-progress"]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
        env.update(dict(job.env))
        if job.mpi:
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
            forwarded = [x for k, _ in job.env for x in ("-x", k)]
            try:
                mpirun = mpi.mpirun_path()
            except FileNotFoundError as exc:
                raise ScenarioError(str(exc)) from exc
            cmd = [mpirun, "--oversubscribe", "-n", str(job.mpi), *forwarded, *cmd]
        proc = subprocess.run(cmd, cwd=self.root, env=env, capture_output=True, text=True, timeout=self.timeout)
        if proc.returncode != 0:
            raise ScenarioError(f"{shlex.join(cmd)} exited with {proc.returncode}:\n"
                                f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")

    def compare(self, a: Job, b: Optional[Job] = None, options: Sequence[str] = ()) -> Outcome:
        """``tracer.bisect A B`` (or ``tracer.check A`` when ``b`` is None) on the jobs' traces."""
        dirs = [self.run(a)] + ([self.run(b)] if b is not None else [])
        tool = "bisect" if b is not None else "check"
        rel = [os.path.relpath(d, self.root) for d in dirs]
        command = shlex.join(["python", "-m", f"tracer.{tool}", *rel, *options])
        code_j, report = _tracer(tool, dirs + list(options) + ["--json"])
        code_t, text = _tracer(tool, dirs + list(options))
        if code_j == 2 or code_j != code_t:
            raise ScenarioError(f"{command} failed (exit {code_j}, text mode {code_t}):\n{report}{text}")
        text = text.replace(self.root + os.sep, "")
        return Outcome(command=command, code=code_j, report=json.loads(report), text=text)


def _tracer(tool: str, argv: List[str]) -> Tuple[int, str]:
    """Runs ``tracer.<tool>.main(argv)`` here; returns (exit status, stdout + stderr)."""
    if tool == "bisect":
        from tracer.bisect import main
    else:
        from tracer.check import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(argv)
    return code, out.getvalue()
