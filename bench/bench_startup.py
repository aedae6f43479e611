"""What tracing adds to a job's start: the first step's time (tracing and XLA compilation), traced vs untraced.

    python bench/bench_startup.py [--rounds 3] [--models mlp,deep]
    python bench/bench_startup.py --against /path/to/other/checkout   # the same, with another tree's tracer

The first step of a ``tf.function`` traces the step and compiles what it runs
with XLA; the tracer's fingerprint pass is compiled then too, on every device.
Each measurement runs in a fresh process (compilation caches live in the
process), untraced and traced runs alternating round by round, on
MirroredStrategy with 2 logical CPU devices and Adam:

* ``mlp``: the capture benchmark's MLP, 256->1024->1024->10 (6 variables, 33
  fingerprinted tensors per replica);
* ``deep``: 48 Dense(64) layers (98 variables: 493 tensors per replica), the
  shape of a model with many small variables (biases, norms), where the
  number of tensors, not their size, decides the compile time.

Prints, per model and tree, the median first-step time untraced and traced,
and what tracing adds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(model_kind: str, traced: bool, root: str) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, root)
    import keras
    import numpy as np
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    trace_dir = tempfile.mkdtemp(prefix="tracer-startup-")
    if traced:
        from strategies import TracedMirroredStrategy

        strategy = TracedMirroredStrategy(devices, trace_dir=trace_dir)
    else:
        strategy = tf.distribute.MirroredStrategy(devices)
    features = 256 if model_kind == "mlp" else 64
    with strategy.scope():
        keras.utils.set_random_seed(0)
        if model_kind == "mlp":
            layers = [keras.layers.Dense(1024, activation="relu"), keras.layers.Dense(1024, activation="relu")]
        else:
            layers = [keras.layers.Dense(64, activation="relu") for _ in range(48)]
        model = keras.Sequential([keras.Input((features,))] + layers + [keras.layers.Dense(10)])
        opt = keras.optimizers.Adam(1e-3)
        opt.build(model.trainable_variables)
    if traced:
        strategy.watch(model, opt)
    loss_obj = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")

    def train_step(inputs):
        xb, yb = inputs
        with tf.GradientTape() as tape:
            loss = tf.nn.compute_average_loss(loss_obj(yb, model(xb, training=True)), global_batch_size=128)
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    @tf.function
    def step(inputs):
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(train_step, args=(inputs,)), axis=None)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1024, features)).astype(np.float32)
    y = rng.integers(0, 10, len(x))
    ds = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(128, drop_remainder=True)
    it = iter(strategy.experimental_distribute_dataset(ds))
    batch = next(it)
    t0 = time.perf_counter()
    step(batch).numpy()
    first = time.perf_counter() - t0
    batch = next(it)
    t0 = time.perf_counter()
    step(batch).numpy()
    second = time.perf_counter() - t0
    if traced:
        strategy.close()
    return {"first_s": first, "second_s": second, "variables": len(model.trainable_variables)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per model, tree and mode")
    parser.add_argument("--models", default="mlp,deep", help="comma-separated subset of: mlp, deep")
    parser.add_argument("--against", metavar="DIR", help="another checkout whose tracer is measured the same way")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "TRACED", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        model_kind, traced, root = args.worker
        print(json.dumps(worker(model_kind, traced == "1", root)))
        return 0
    trees = {"this tree": ROOT}
    if args.against:
        trees[os.path.basename(os.path.abspath(args.against))] = os.path.abspath(args.against)
    models = [m for m in args.models.split(",") if m]
    runs = {}
    for r in range(args.rounds):
        for model_kind in models:
            for tree, root in trees.items():
                for traced in (False, True):
                    if not traced and tree != "this tree":
                        continue  # untraced runs do not depend on the tree
                    proc = subprocess.run([sys.executable, __file__, "--worker", model_kind, str(int(traced)), root],
                                          capture_output=True, text=True, timeout=3600)
                    if proc.returncode != 0:
                        print(f"{model_kind} {tree} traced={traced}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
                        return 1
                    res = json.loads(proc.stdout.strip().splitlines()[-1])
                    key = (model_kind, tree if traced else "untraced")
                    runs.setdefault(key, []).append(res)
                    print(f"round {r + 1} {model_kind:5s} {key[1]:12s} first step {res['first_s']:7.2f} s, "
                          f"second {res['second_s'] * 1e3:7.1f} ms", file=sys.stderr)
    summary = []
    for model_kind in models:
        base = statistics.median(x["first_s"] for x in runs[model_kind, "untraced"])
        for tree in trees:
            first = statistics.median(x["first_s"] for x in runs[model_kind, tree])
            summary.append({"model": model_kind, "tree": tree, "variables": runs[model_kind, tree][0]["variables"],
                            "untraced_first_s": base, "traced_first_s": first, "added_s": first - base,
                            "rounds": len(runs[model_kind, tree])})
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{'model':6s} {'tree':14s} {'variables':>9s} {'untraced':>9s} {'traced':>9s} {'added':>9s}")
        for s in summary:
            print(f"{s['model']:6s} {s['tree']:14s} {s['variables']:9d} {s['untraced_first_s']:8.2f}s "
                  f"{s['traced_first_s']:8.2f}s {s['added_s']:8.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
