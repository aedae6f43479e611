"""Cost of the in-graph fingerprint alone, per element, on one core.

    python bench/bench_fingerprint.py [--rounds 7]

Fingerprints the tensors the capture benchmark's MLP records per replica and
step (5 kinds x its 6 variables, plus the input batch, loss and learning
rate: 6.6 M float32 elements) with ``strategies.fingerprint.fingerprint_all``
inside a ``tf.function``, one intra-op thread, variables as inputs (as in a
training step). Prints the best of the rounds per tensor group, in ms and in
ns per element: the figure that decides the capture overhead on a CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GROUPS = {
    "1024x1024 (5 tensors)": [(1024, 1024)] * 5,
    "256x1024 (5 tensors)": [(256, 1024)] * 5,
    "small (23 tensors)": [(1024,), (1024,), (1024, 10), (10,)] * 5 + [(64, 256), (), ()],
    "all of one replica's step (33 tensors)": [(256, 1024), (1024,), (1024, 1024), (1024,), (1024, 10), (10,)] * 5
    + [(64, 256), (), ()],
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved repetitions; the best is reported")
    parser.add_argument("--calls", type=int, default=10, help="calls per round")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, ROOT)
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from strategies.fingerprint import fingerprint_all

    rng = np.random.default_rng(0)
    runs = {}
    for name, shapes in GROUPS.items():
        variables = [tf.Variable(rng.standard_normal(s).astype(np.float32)) for s in shapes]
        fn = tf.function(lambda vs=variables: fingerprint_all([v.read_value() for v in vs]))
        fn()  # trace and compile
        runs[name] = (fn, sum(int(np.prod(s)) for s in shapes))
    best = {name: float("inf") for name in runs}
    for _ in range(args.rounds):
        for name, (fn, _) in runs.items():
            t0 = time.perf_counter()
            for _ in range(args.calls):
                out = fn()
            out[0].numpy()
            best[name] = min(best[name], (time.perf_counter() - t0) / args.calls)
    print(f"{'tensors':40s} {'elements':>10s} {'ms':>7s} {'ns/element':>11s}")
    for name, (_, n) in runs.items():
        print(f"{name:40s} {n:10d} {best[name] * 1e3:7.2f} {best[name] * 1e9 / n:11.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
