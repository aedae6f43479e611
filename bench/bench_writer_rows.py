"""The writer's cost per hand-over of fingerprint rows, the capture's every-step traffic.

    python bench/bench_writer_rows.py [--rounds 15] [--hand-overs 50]
    python bench/bench_writer_rows.py --against old.py   # e.g. git show REV:tracer/writer.py > old.py

In fingerprint mode the rows wait on the devices and reach the writers every
``flush_every`` steps (10 by default): one hand-over gives each local replica's
writer that many rows, and each writer then appends them and flushes its file.
This times that, for the capture benchmark's MLP (33 columns, 2 local replicas
by default), from the hand-over to the end of both flushes. No TensorFlow.

With ``--against FILE`` another version of ``tracer/writer.py`` runs the same
hand-overs, round by round interleaved with this tree's (this machine's speed
drifts too much for runs minutes apart); the ratio of the two medians is
printed, with the median of per-round ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
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


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _round(module, directory: str, tensors, rows: int, writers: int, hand_overs: int) -> float:
    """Median seconds per hand-over of ``rows`` rows to ``writers`` files, each followed by a flush."""
    from tracer.config import CaptureConfig

    config = CaptureConfig(flush_every=rows)
    ws = [module.TraceWriter(os.path.join(directory, f"replica-{r}.h5"), tensors, config=config, initial_columns=[])
          for r in range(writers)]
    n = len(tensors)
    rng = np.random.default_rng(0)
    fps = [rng.integers(-2**63, 2**63 - 1, n, dtype=np.int64), rng.random(n), rng.random(n),
           np.zeros(n, np.int64), np.zeros(n, np.int64)]
    times = []
    step = 0
    try:
        for h in range(hand_overs + 3):  # the first three open the datasets and warm the caches
            t0 = time.perf_counter()
            for w in ws:
                w.write_steps([(step + k, fps) for k in range(rows)])
            for w in ws:
                w.flush()
            if h >= 3:
                times.append(time.perf_counter() - t0)
            step += rows
    finally:
        for w in ws:
            w.close()
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds; medians are reported")
    parser.add_argument("--hand-overs", type=int, default=50, help="hand-overs per round")
    parser.add_argument("--rows", type=int, default=10, help="rows per hand-over (the capture's flush_every)")
    parser.add_argument("--writers", type=int, default=2, help="trace files (local replicas)")
    parser.add_argument("--dir", help="where to write (default: a temporary directory on the local disk)")
    parser.add_argument("--against", metavar="FILE", help="another tracer/writer.py to run side by side")
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    from tracer import writer
    from tracer.schema import TensorSpec

    tensors = [TensorSpec(kind=kind, name=f"{kind}/{i}", shape=shape, dtype="float32")
               for kind in KINDS for i, shape in enumerate(SHAPES)]
    tensors += [TensorSpec(kind="input", name="x", shape=(64, 256), dtype="float32"),
                TensorSpec(kind="input", name="y", shape=(64,), dtype="int64"),
                TensorSpec(kind="loss", name="loss", shape=(), dtype="float32")]
    versions = {"this tree": writer}
    if args.against:
        versions[os.path.basename(args.against)] = _load(args.against, "writer_against")
    times = {name: [] for name in versions}
    names = list(versions)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            directory = tempfile.mkdtemp(prefix="tracer-bench-rows-", dir=args.dir)
            try:
                times[name].append(_round(versions[name], directory, tensors, args.rows, args.writers,
                                          args.hand_overs))
            finally:
                shutil.rmtree(directory, ignore_errors=True)
    print(f"one hand-over of {args.rows} rows x {len(tensors)} columns to {args.writers} files, then their flushes "
          f"(median over {args.hand_overs} hand-overs per round, {args.rounds} rounds):")
    for name in names:
        t = times[name]
        print(f"  {name[:24]:24s} median {statistics.median(t) * 1e3:6.2f} ms   best round {min(t) * 1e3:6.2f} ms")
    if len(names) == 2:
        a, b = times[names[0]], times[names[1]]
        print(f"  ratio {names[0]!r} / {names[1]!r}: {statistics.median(a) / statistics.median(b):.2f} "
              f"(median of per-round ratios {statistics.median(x / y for x, y in zip(a, b)):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
