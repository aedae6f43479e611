"""``python -m tracer.bisect A B``: the first step, tensor and replica where two runs diverge, and why.

A and B are trace files (``replica-<N>.h5``) or run directories. Exit status
as cmp(1): 0 no divergence beyond tolerance, 1 divergence, 2 bad input.
``--search full`` (opt-in) binary-searches the common full-tensor snapshots
instead of scanning fingerprints (:mod:`tracer.snapshots`).
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from tracer.cli import EXIT_DIFFERENT, EXIT_SAME, run_guarded, want_progress

PROG = "tracer.bisect"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Find the first step, tensor and replica where two traced training runs diverge, how far "
                    "apart they are and why. Exit status: 0 no divergence, 1 divergence, 2 error.")
    p.add_argument("a", metavar="A", help="reference run: a run directory or one replica-<N>.h5 file")
    p.add_argument("b", metavar="B", help="run to compare with A (directory or file)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    tol = p.add_argument_group("tolerance (default: bitwise)")
    tol.add_argument("--ulp", type=int, metavar="N", help="a difference counts when max_ulp > N")
    tol.add_argument("--rtol", type=float, help="relative tolerance (as numpy.allclose, symmetric)")
    tol.add_argument("--atol", type=float, help="absolute tolerance (as numpy.allclose)")
    tol.add_argument("--auto", action="store_true",
                     help="round-off bound: max|a-b|/max|x| > FACTOR * eps(dtype) * K, with max|x| the tensor's "
                          "largest magnitude (K: --reduction-length)")
    tol.add_argument("--noise", metavar="C",
                     help="a repeat of run A: a difference counts when max_rel > FACTOR * max_rel(A, C)")
    tol.add_argument("--factor", type=float, default=None,
                     help="multiplier of the --auto bound (default 1) or of the --noise floor (default 2)")
    tol.add_argument("--reduction-length", type=int, metavar="K",
                     help="K of --auto (default: longest tensor dimension x replicas)")
    p.add_argument("--search", choices=("fingerprints", "full"), default="fingerprints",
                   help="fingerprints (default): scan every step's fingerprints, no assumption. full (opt-in): "
                        "binary-search the full-tensor snapshots both runs stored, reading about log2(n) of them; "
                        "ASSUMES that once the runs differ they stay different, and reports the last equal and "
                        "first different snapshot")
    p.add_argument("--strict", action="store_true",
                   help="treat different models or step ranges as errors instead of comparing what is common")
    p.add_argument("--chunk-rows", type=int, default=2048, help=argparse.SUPPRESS)
    return p


def _tolerance(args, parser, run_a):
    from tracer.compare import estimate_reduction_length
    from tracer.tolerance import Tolerance

    modes = [m for m, on in (("ulp", args.ulp is not None), ("allclose", args.rtol is not None or
                                                            args.atol is not None),
                             ("auto", args.auto), ("noise", args.noise is not None)) if on]
    if len(modes) > 1:
        parser.error(f"choose one tolerance. Received: {', '.join(modes)}")
    mode = modes[0] if modes else "bitwise"
    if args.factor is not None and mode not in ("auto", "noise"):
        parser.error("--factor applies to --auto and --noise only")
    if args.reduction_length is not None and mode != "auto":
        parser.error("--reduction-length applies to --auto only")
    if args.search == "full" and mode == "noise":
        parser.error("--noise applies to the fingerprint scan only, not to --search full; use --auto, --ulp or "
                     "--rtol/--atol")
    try:
        if mode == "ulp":
            return Tolerance("ulp", ulp=args.ulp)
        if mode == "allclose":
            return Tolerance("allclose", rtol=args.rtol or 0.0, atol=args.atol or 0.0)
        if mode == "auto":
            k = args.reduction_length or estimate_reduction_length(run_a.tensors, run_a.num_replicas)
            return Tolerance("auto", factor=1.0 if args.factor is None else args.factor, reduction_length=k)
        if mode == "noise":
            return Tolerance("noise", factor=2.0 if args.factor is None else args.factor)
    except ValueError as exc:
        parser.error(str(exc))
    return Tolerance()


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m tracer.bisect`` and ``tracer-bisect``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.chunk_rows < 1:
        parser.error(f"--chunk-rows must be >= 1. Received: {args.chunk_rows}")

    def body() -> int:
        from contextlib import ExitStack

        from tracer.compare import Comparison
        from tracer.reader import Run
        from tracer.report import render_json, render_text

        with ExitStack() as stack:
            run_a = stack.enter_context(Run(args.a))
            run_b = stack.enter_context(Run(args.b))
            tol = _tolerance(args, parser, run_a)
            if args.search == "full":
                from tracer.snapshots import SnapshotSearch

                result = SnapshotSearch(run_a, run_b, tol, strict=args.strict).run()
            else:
                noise = stack.enter_context(Run(args.noise)) if args.noise is not None else None
                comparison = Comparison(run_a, run_b, tol, noise=noise, chunk_rows=args.chunk_rows,
                                        strict=args.strict)
                comparison.progress = want_progress(int(comparison.common_steps.size))
                result = comparison.run()
            d = result.to_dict()
        sys.stdout.write(render_json(d) + "\n" if args.json else render_text(d, PROG))
        return EXIT_DIFFERENT if result.diverged else EXIT_SAME

    return run_guarded(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
