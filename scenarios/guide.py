"""``python -m scenarios --print-guide``: run every scenario as a user would and print docs/scenarios.md.

Every report is the real output of ``tracer.bisect`` / ``tracer.check`` on
real runs. Jobs run in one process where that is equivalent (``--subprocess``
runs each as the command shown); jobs that need their own process (op
determinism, environment variables, mpirun) always get one.
"""

from __future__ import annotations

import os
import platform
from typing import Callable, List, Optional

from scenarios.catalog import SCENARIOS, Scenario
from scenarios.jobs import Workspace
from scenarios.lessons import INTRO, LESSONS

COMMAND_LINE_KEYS = ("    run.command_line: ", "    command_line: ")


def _trim(text: str) -> str:
    """The report without the environment diff's command-line entries (long, and the same as the commands shown)."""
    keep = [line for line in text.splitlines() if not line.startswith(COMMAND_LINE_KEYS)]
    return "\n".join(keep)


def render(workspace: Workspace, scenarios=SCENARIOS, log: Optional[Callable[[str], None]] = None) -> str:
    """Runs ``scenarios`` in ``workspace`` and returns the guide as markdown."""
    import tensorflow as tf  # noqa: F401  (only for the version line; the runs are subprocesses)

    out: List[str] = [INTRO.format(tf=tf.__version__, python=platform.python_version(),
                                   machine=f"{platform.machine()}, {os.cpu_count()} CPUs")]
    for s in scenarios:
        if log:
            log(f"scenario {s.id}: {s.title}")
        o = workspace.compare(s.a, s.b, s.options)
        out.append(f"## {s.id}. {s.title}\n")
        out.append(f"*{s.question}*\n")
        runs = [s.a] + ([s.b] if s.b is not None else [])
        commands = [r.command() for r in dict.fromkeys(runs)]
        out.append("```\n" + "\n".join(commands + [o.command]) + "\n```\n")
        out.append(f"Exit status {o.code}. Output (the command-line line of the environment diff is omitted):\n")
        out.append("```\n" + _trim(o.text) + "\n```\n")
        out.append(LESSONS.get(s.id, "") + "\n")
    return "\n".join(out)
