"""How much of the fingerprint overhead any pass over the captured bytes costs, and what costs the rest.

    python bench/bench_capture_floor.py [--blocks 40] [--model cnn] [--setups "fingerprints,no pass"]

Runs MLP (or CNN) setups of the capture benchmark side by side in one process,
alternating blocks of 10 steps:

* untraced;
* traced with fingerprints of every kind;
* "read-only pass": the fingerprint pass replaced by the cheapest pass that
  reads every captured byte once (float32 sums over the same tensors, no hash,
  no statistics);
* "hash only": the fingerprint's hash, as the pass computes it (the same
  slices, the same reductions, but each tensor finished on its own), without
  max |x|, the sum of squares or the rare branch: what the statistics cost on
  top of the hash;
* "first element": a pass that reads one element of each tensor. It makes the
  same XLA call at the same point of the step, on the same tensors (variables
  read after the update, gradients held until then), so it measures everything
  but the reading;
* "plain first element": the same reads as plain TensorFlow ops, without the
  XLA call: what the call itself costs;
* "no pass": rows of zeros, no call and no reads; only the rest of the tracer's
  machinery (device buffers, the host counter, the writer).

The stand-ins' "fingerprints" are meaningless and their traces are thrown away.
The read-only ratio is the floor a fingerprint on this machine cannot go under;
the gap between the fingerprints and the read-only pass is what the hash and the
statistics cost on top of reading the bytes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def _stand_in(one, xla=True):
    """A stand-in for ``fingerprint_all``: one XLA call (or plain ops), ``one(flat tensor)`` per tensor, as every
    statistic."""
    import tensorflow as tf

    def part(tensors):
        v = tf.stack([one(x) for x in tensors])
        i = tf.cast(v, tf.int64)
        return [i, v, v, i, i]

    compiled = tf.function(part, jit_compile=True, autograph=False) if xla else part

    def fingerprint_all(tensors, use_xla=True):
        return compiled([tf.reshape(tf.convert_to_tensor(t), [-1]) for t in tensors])

    return fingerprint_all


def _read_only_pass():
    """A stand-in that only reads each tensor once (float32 column sums)."""
    import tensorflow as tf

    def one(x):
        n = int(x.shape[0])
        if n >= 4096 and n % 8 == 0:
            s = tf.reduce_sum(tf.reshape(tf.cast(x, tf.float32), [8, -1]), 0)
            while int(s.shape[0]) >= 2048 and int(s.shape[0]) % 8 == 0:
                s = tf.reduce_sum(tf.reshape(s, [8, -1]), 0)
            s = tf.reduce_sum(s)
        else:
            s = tf.reduce_sum(tf.cast(x, tf.float32))
        return tf.cast(s, tf.float64)

    return _stand_in(one)


def _hash_only_pass():
    """A stand-in that computes each tensor's hash as the pass does, and no statistics."""
    import tensorflow as tf

    from strategies import fingerprint as fp

    spec = [tf.TensorSpec([], tf.uint64), tf.TensorSpec([], tf.uint8)]
    reducer = tf.function(lambda h0, z0, h1, z1: (h0 + h1, tf.maximum(z0, z1)),
                          autograph=False).get_concrete_function(*(spec + spec))

    def column_sums(t):
        # A second, constant operand keeps XLA from rewriting a lone sum into a reduce-window that
        # materializes the mixed words first: the pass's own reductions are variadic too.
        return fp._VARIADIC_REDUCE([t, tf.zeros(t.shape, tf.uint8)], [fp._u64(0), tf.zeros([], tf.uint8)],
                                   dimensions_to_reduce=[0], reducer=reducer)[0]

    def one(x):
        total = fp._u64(0)
        for pieces, first in fp._pieces(x):
            slices, m = int(pieces.shape[0]), int(pieces.shape[1])
            mixed = fp._mix64(fp._words(pieces) + fp._index_terms(slices, m, first, True))
            col = column_sums(mixed) if slices > 1 else mixed[0]
            while m > fp.MAX_PARTIALS and m % fp.SLICES == 0:
                m //= fp.SLICES
                col = column_sums(tf.reshape(col, [fp.SLICES, m]))
            total += column_sums(col)
        total += fp._mix64(fp._u64(x.shape.num_elements() * x.dtype.size))
        return tf.cast(tf.bitcast(total, tf.int64), tf.float64)

    return _stand_in(one)


def _first_element_pass(xla=True):
    """A stand-in that makes the same call on the same tensors but reads one element of each."""
    import tensorflow as tf

    return _stand_in(lambda x: tf.cast(x[0], tf.float64) if x.shape.num_elements() else tf.zeros([], tf.float64),
                     xla)


def _no_pass():
    """A stand-in with no call at all: fingerprint rows of zeros."""
    import tensorflow as tf

    def fingerprint_all(tensors, use_xla=True):
        n = len(tensors)
        return [tf.zeros([n], tf.int64), tf.zeros([n], tf.float64), tf.zeros([n], tf.float64),
                tf.zeros([n], tf.int64), tf.zeros([n], tf.int64)]

    return fingerprint_all


SETUPS = {"fingerprints": None, "hash only": _hash_only_pass, "read-only pass": _read_only_pass,
          "first element": _first_element_pass, "plain first element": lambda: _first_element_pass(xla=False),
          "no pass": _no_pass}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=40, help="blocks of 10 steps per setup")
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp", help="the capture benchmark's model")
    parser.add_argument("--setups", default=",".join(SETUPS),
                        help="comma-separated subset of: " + ", ".join(SETUPS) + " (the untraced twin always runs)")
    args = parser.parse_args(argv)
    chosen = [k for k in args.setups.split(",") if k]
    unknown = [k for k in chosen if k not in SETUPS]
    if unknown:
        parser.error(f"unknown setups {unknown}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import bench_capture as bc
    import strategies.session as session

    devices, x, y = bc._setup(args.model)
    root = tempfile.mkdtemp(prefix="tracer-floor-")
    runs = {"untraced": bc._build(args.model, None, devices, os.path.join(root, "u"), x, y, bc.GLOBAL_BATCH)}
    real = session.fingerprint_all
    for name in chosen:
        # looked up when the step is traced, on its first call below
        session.fingerprint_all = real if name == "fingerprints" else SETUPS[name]()
        runs[name] = bc._build(args.model, "fingerprint", devices,
                               os.path.join(root, name.replace(" ", "-")), x, y, bc.GLOBAL_BATCH)
        step, it, strategy, _ = runs[name]
        for _ in range(10):
            step(next(it)).numpy()
        strategy.flush()
    session.fingerprint_all = real
    step, it, _, _ = runs["untraced"]
    for _ in range(10):
        step(next(it)).numpy()
    names = list(runs)
    times = {k: [] for k in names}
    for b in range(args.blocks):
        for k in names[b % len(names):] + names[:b % len(names)]:
            step, it, strategy, _ = runs[k]
            t0 = time.perf_counter()
            for _ in range(10):
                step(next(it)).numpy()
            if strategy is not None:
                strategy.flush()
            times[k].append((time.perf_counter() - t0) / 10)
    base = times["untraced"]
    print(f"{'setup':22s} {'ms/step':>8s} {'ratio':>7s}   (median over {args.blocks} blocks of 10 steps; ratio is "
          f"the median of per-block ratios to the untraced block beside it)")
    for k in names:
        ratio = statistics.median(a / b for a, b in zip(times[k], base))
        print(f"{k:22s} {statistics.median(times[k]) * 1e3:8.2f} {ratio:6.3f}x")
    for k in names[1:]:
        runs[k][2].close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
