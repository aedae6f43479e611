"""``python -m scenarios``: run the scenario suite; ``--print-guide`` prints docs/scenarios.md."""

from __future__ import annotations

import argparse
import sys
import tempfile
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scenarios", description=__doc__)
    p.add_argument("--print-guide", action="store_true", help="print the user guide (markdown) to stdout")
    p.add_argument("--only", nargs="*", metavar="ID", help="scenario ids (default: all)")
    p.add_argument("--workdir", help="where traces go (default: a temporary directory)")
    p.add_argument("--subprocess", action="store_true", help="run every job as its own process (slower)")
    args = p.parse_args(argv)

    from scenarios.catalog import SCENARIOS
    from scenarios.guide import render
    from scenarios.jobs import Workspace

    chosen = [s for s in SCENARIOS if not args.only or s.id in args.only]
    workdir = args.workdir or tempfile.mkdtemp(prefix="tracer-scenarios-")
    if not args.subprocess:
        # In-process jobs share one TensorFlow: give it the 4 logical CPUs the
        # largest scenario needs before anything starts it.
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 4)
        # Start the runtime now: until then a job's own (smaller) configuration would replace this one.
        tf.config.list_logical_devices("CPU")
    ws = Workspace(workdir, in_process=not args.subprocess)
    text = render(ws, chosen, log=lambda m: print(m, file=sys.stderr, flush=True))
    if args.print_guide:
        sys.stdout.write(text)
    else:
        print(f"{len(chosen)} scenarios run in {workdir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
