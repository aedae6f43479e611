"""What every tracer command-line tool shares: bad input becomes one line on stderr and exit status 2.

Only :class:`TracerError` (our diagnosis of a bad input) and :class:`OSError`
(the file system's) are turned into a message; anything else is a bug in
tracer and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable

from tracer.errors import TracerError
from tracer.report import escape

EXIT_SAME, EXIT_DIFFERENT, EXIT_ERROR = 0, 1, 2
"""Exit statuses, as cmp(1) and diff(1)."""

LONG_SCAN_STEPS = 20_000
"""A scan of at least this many steps shows a progress bar (on a terminal only)."""


def run_guarded(prog: str, body: Callable[[], int]) -> int:
    """Run ``body``; report a bad input as ``<prog>: error: <file>: <problem>`` and return 2."""
    try:
        return body()
    except (TracerError, OSError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in message:
            message = f"{exc.filename}: {message}"
        print(f"{prog}: error: {escape(message)}", file=sys.stderr)
        return EXIT_ERROR


def want_progress(n_steps: int) -> bool:
    """tqdm only for long scans, and only when stderr is a terminal."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty()) and n_steps >= LONG_SCAN_STEPS
