"""``python -m tracer.check RUN_DIR``: do all replicas of one run agree on their global values?

Verifies that every replica holds bitwise-identical all-reduced gradients,
optimizer slots and weights at every step (and before the first update), and
names the first step, tensor and replica that disagree (``replica_desync``).
Exit status as cmp(1): 0 consistent, 1 replicas disagree, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from tracer.cli import EXIT_DIFFERENT, EXIT_SAME, run_guarded, want_progress

PROG = "tracer.check"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Check that all replicas of one traced run hold bitwise-identical all-reduced gradients, "
                    "optimizer slots and weights at every step. Exit status: 0 consistent, 1 replicas "
                    "disagree, 2 error.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory holding replica-<N>.h5 files")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--chunk-rows", type=int, default=2048, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m tracer.check`` and ``tracer-check``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.chunk_rows < 1:
        parser.error(f"--chunk-rows must be >= 1. Received: {args.chunk_rows}")

    def body() -> int:
        from tracer.consistency import check_run
        from tracer.reader import Run
        from tracer.report import render_json, render_text

        with Run(args.run_dir) as run:
            d = check_run(run, chunk_rows=args.chunk_rows, progress=want_progress(int(run.n_rows)))
        sys.stdout.write(render_json(d) + "\n" if args.json else render_text(d, PROG))
        return EXIT_DIFFERENT if d["diverged"] else EXIT_SAME

    return run_guarded(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
