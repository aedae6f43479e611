"""The trace writer alone: full tensors of the MLP benchmark, against plain file writes of the same bytes.

    python bench/bench_writer.py [--steps 40] [--rounds 3] [--writers 2] [--dir DIR]

Each round writes ``--steps`` steps of one replica's full tensors of the
capture benchmark's MLP (30 tensors, 26.5 MB per step) to ``--writers`` trace
files at once, as the local replicas of one process do, then the same bytes
with plain ``os.write`` to as many files, one after the other. No TensorFlow:
this isolates the writer's cost (copy into its buffers, HDF5 bookkeeping,
``pwrite``) from training. The ratio of the two is taken per round, side by
side; the median is reported.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [(256, 1024), (1024,), (1024, 1024), (1024,), (1024, 10), (10,)]
KINDS = ["local_grad", "allreduced_grad", "optimizer_slot", "optimizer_slot", "weight"]


def _tracer_round(directory: str, arrays, tensors, steps: int, writers: int) -> float:
    from tracer.config import CaptureConfig
    from tracer.writer import TraceWriter

    config = CaptureConfig(mode="full")
    ws = [TraceWriter(os.path.join(directory, f"replica-{r}.h5"), tensors, config=config, initial_columns=[])
          for r in range(writers)]
    n = len(tensors)
    fps = [np.zeros(n, np.int64), np.zeros(n), np.zeros(n), np.zeros(n, np.int64), np.zeros(n, np.int64)]
    t0 = time.perf_counter()
    for step in range(steps):
        for w in ws:
            w.write_step(step, fps, arrays)
    for w in ws:
        w.close()
    return time.perf_counter() - t0


def _plain_round(directory: str, arrays, steps: int, writers: int) -> float:
    fds = [os.open(os.path.join(directory, f"plain-{r}.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
           for r in range(writers)]
    t0 = time.perf_counter()
    for _ in range(steps):
        for fd in fds:
            for a in arrays:
                os.write(fd, a)
    for fd in fds:
        os.close(fd)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="side-by-side rounds")
    parser.add_argument("--writers", type=int, default=2, help="trace files written at once (local replicas)")
    parser.add_argument("--dir", help="where to write (default: a temporary directory on the local disk)")
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    from tracer.schema import TensorSpec

    rng = np.random.default_rng(0)
    tensors = [TensorSpec(kind=kind, name=f"{kind}/{i}", shape=shape, dtype="float32")
               for kind in KINDS for i, shape in enumerate(SHAPES)]
    arrays = [rng.standard_normal(t.shape).astype(np.float32) for t in tensors]
    per_step = sum(a.nbytes for a in arrays) * args.writers
    ratios, tracer_s, plain_s = [], [], []
    for r in range(args.rounds):
        directory = tempfile.mkdtemp(prefix="tracer-bench-writer-", dir=args.dir)
        try:
            order = ("tracer", "plain") if r % 2 == 0 else ("plain", "tracer")
            got = {}
            for what in order:
                got[what] = (_tracer_round(directory, arrays, tensors, args.steps, args.writers) if what == "tracer"
                             else _plain_round(directory, arrays, args.steps, args.writers))
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        tracer_s.append(got["tracer"] / args.steps)
        plain_s.append(got["plain"] / args.steps)
        ratios.append(got["tracer"] / got["plain"])
        print(f"round {r + 1}: tracer writer {tracer_s[-1] * 1e3:7.2f} ms/step ({per_step / tracer_s[-1] / 1e9:.2f} GB/s)"
              f"   plain os.write {plain_s[-1] * 1e3:7.2f} ms/step ({per_step / plain_s[-1] / 1e9:.2f} GB/s)"
              f"   ratio {ratios[-1]:.2f}x", file=sys.stderr)
    print(f"{args.writers} files x {per_step / args.writers / 1e6:.1f} MB per step: tracer writer "
          f"{statistics.median(tracer_s) * 1e3:.2f} ms/step, plain os.write {statistics.median(plain_s) * 1e3:.2f} "
          f"ms/step, ratio {statistics.median(ratios):.2f}x (median of {args.rounds} side-by-side rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
