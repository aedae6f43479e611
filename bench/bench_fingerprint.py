"""Cost of the in-graph fingerprint alone, per element, on one core.

    python bench/bench_fingerprint.py [--rounds 7]
    python bench/bench_fingerprint.py --against old.py   # e.g. git show REV:strategies/fingerprint.py > old.py

Fingerprints the tensors the capture benchmark's MLP records per replica and
step (5 kinds x its 6 variables, plus the input batch, loss and learning
rate: 6.6 M float32 elements) with ``strategies.fingerprint.fingerprint_all``
inside a ``tf.function``, one intra-op thread, variables as inputs (as in a
training step). Also an image batch of 32x224x224x3, once with its shape known
and once with the batch size unknown when the step is traced (a dataset batched
without ``drop_remainder``). Prints the best of the rounds per tensor group, in
ms and in ns per element: the figure that decides the capture overhead on a CPU.
XLA may still run independent kernels of one call on other cores; for one core,
run it under ``taskset -c 0``.

With ``--against FILE`` it also loads another version of the fingerprint module
and runs both on the same variables, call by call interleaved (this machine's
speed drifts too much for runs minutes apart), checks that they give the same
fingerprints, and prints the best and median of both and their ratio.
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
    "image batch 32x224x224x3": [(32, 224, 224, 3)],
    "same, batch size unknown": [(32, 224, 224, 3)],
}
# Groups traced with the first axis unknown, as a dataset batched without drop_remainder feeds a step.
UNKNOWN_FIRST_AXIS = {"same, batch size unknown"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved repetitions; the best is reported")
    parser.add_argument("--calls", type=int, default=10, help="calls per round")
    parser.add_argument("--against", metavar="FILE",
                        help="another strategies/fingerprint.py to run side by side (e.g. an earlier commit's)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, ROOT)
    import importlib.util
    import statistics

    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from strategies import fingerprint

    versions = {"this tree": fingerprint.fingerprint_all}
    if args.against:
        spec = importlib.util.spec_from_file_location("fingerprint_against", args.against)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        versions[os.path.basename(args.against)] = module.fingerprint_all

    rng = np.random.default_rng(0)
    runs = {}
    for name, shapes in GROUPS.items():
        variables = [tf.Variable(rng.standard_normal(s).astype(np.float32)) for s in shapes]
        outs = []
        for version, fingerprint_all in versions.items():
            if name in UNKNOWN_FIRST_AXIS:
                inner = tf.function(lambda *xs, f=fingerprint_all: f(list(xs)), input_signature=[
                    tf.TensorSpec([None] + list(s[1:]), tf.float32) for s in shapes])
                fn = tf.function(lambda vs=variables, g=inner: g(*[v.read_value() for v in vs]))
            else:
                fn = tf.function(lambda vs=variables, f=fingerprint_all: f([v.read_value() for v in vs]))
            outs.append([o.numpy() for o in fn()])  # trace and compile
            runs[name, version] = (fn, sum(int(np.prod(s)) for s in shapes))
        for other in outs[1:]:
            if not (np.array_equal(outs[0][0], other[0]) and np.array_equal(outs[0][2], other[2])):
                print(f"{name}: the two versions give different hashes or max |x|", file=sys.stderr)
                return 1
    times = {key: [] for key in runs}
    keys = list(runs)
    for r in range(args.rounds):
        for key in keys if r % 2 == 0 else keys[::-1]:
            fn = runs[key][0]
            t0 = time.perf_counter()
            for _ in range(args.calls):
                out = fn()
            out[0].numpy()
            times[key].append((time.perf_counter() - t0) / args.calls)
    print(f"{'tensors':40s} {'version':>12s} {'elements':>10s} {'best ms':>8s} {'ns/el':>6s} {'median ms':>9s}")
    for (name, version), (_, n) in runs.items():
        best = min(times[name, version])
        print(f"{name:40s} {version[:12]:>12s} {n:10d} {best * 1e3:8.2f} {best * 1e9 / n:6.3f} "
              f"{statistics.median(times[name, version]) * 1e3:9.2f}")
    if len(versions) == 2:
        mine, other = versions
        print(f"\nratio {mine!r} / {other!r}, per group: best, median of per-round ratios")
        for name in GROUPS:
            a, b = times[name, mine], times[name, other]
            print(f"{name:40s} {min(a) / min(b):6.3f} {statistics.median(x / y for x, y in zip(a, b)):6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
