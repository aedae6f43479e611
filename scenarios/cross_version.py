"""Scenario 10: the same job under this TensorFlow and under another released TF 2.x, compared.

Not part of CI (it needs a second virtual environment with another TensorFlow,
a large download). Set one up once and run::

    python3 -m venv /work/tf-other && /work/tf-other/bin/pip install "tensorflow==2.20.*" h5py tqdm mpi4py
    python -m scenarios.cross_version --other-python /work/tf-other/bin/python --workdir /tmp/cross

It prints the two commands, the other interpreter's TensorFlow version and the
real output of ``tracer.bisect``, as markdown for docs/scenarios.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from typing import List, Optional

from scenarios.catalog import BASE
from scenarios.jobs import Job, Workspace


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scenarios.cross_version", description=__doc__.split("\n\n")[0])
    p.add_argument("--other-python", required=True, help="interpreter of a venv with another TensorFlow")
    p.add_argument("--workdir", required=True, help="where the two traces go")
    args = p.parse_args(argv)
    other_version = subprocess.run([args.other_python, "-c", "import tensorflow as tf; print(tf.__version__)"],
                                   capture_output=True, text=True, timeout=300).stdout.strip()
    if not other_version:
        print(f"cross_version: error: {args.other_python} cannot import tensorflow", file=sys.stderr)
        return 2
    here = Job("tf-here", BASE, isolated=True)
    other = Job(f"tf-{other_version}", BASE, python=args.other_python)
    ws = Workspace(args.workdir, in_process=False)
    o = ws.compare(other, here)
    text = "\n".join(line for line in o.text.splitlines() if "run.command_line" not in line)
    print("```\n" + "\n".join([other.command(), here.command(), o.command]) + "\n```\n")
    print(f"Exit status {o.code}. Output (the command-line line of the environment diff is omitted):\n")
    print("```\n" + text + "\n```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
