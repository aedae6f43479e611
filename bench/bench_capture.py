"""Capture overhead: traced vs untraced step time, side by side, plus TF Debugger v2.

    python bench/bench_capture.py                # full comparison (several minutes)
    python bench/bench_capture.py --quick        # fewer steps and rounds

Every configuration runs in its own process (TF Debugger cannot be fully
turned off inside one), configurations are interleaved round by round so that
machine noise hits all of them alike, and each result is the median step time
over the measured steps, then the median over rounds. Ratios are to the
untraced run of the same model in the same invocation.

Setup (from the capture issue): MLP 256->1024->1024->10 (~1.3M parameters),
MirroredStrategy on 2 logical CPU devices, Adam, global batch 128; and a small
CNN where compute dominates.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CONFIGS = {
    # name: (model, tracer mode, tfdbg mode)
    "mlp/untraced": ("mlp", None, None),
    "mlp/tracer-fingerprint": ("mlp", "fingerprint", None),
    "mlp/tracer-full": ("mlp", "full", None),
    "mlp/tracer-full-tmpfs": ("mlp", "full", None),
    "mlp/tracer-full-every-10": ("mlp", "full/10", None),
    "mlp/tfdbg-NO_TENSOR": ("mlp", None, "NO_TENSOR"),
    "mlp/tfdbg-CURT_HEALTH": ("mlp", None, "CURT_HEALTH"),
    "mlp/tfdbg-FULL_TENSOR": ("mlp", None, "FULL_TENSOR"),
    "mlp/tracer-fingerprint-loss-only": ("mlp", "fingerprint:loss", None),
    "mlp/tracer-fingerprint-weight-only": ("mlp", "fingerprint:weight", None),
    "cnn/untraced": ("cnn", None, None),
    "cnn/tracer-fingerprint": ("cnn", "fingerprint", None),
}


def _dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def worker(config: str, steps: int, warmup: int, out_dir: str) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, ROOT)
    import numpy as np
    import tensorflow as tf
    import keras

    model_kind, mode, dbg = CONFIGS[config]
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    global_batch = 128
    rng = np.random.default_rng(0)
    if model_kind == "mlp":
        x = rng.standard_normal((global_batch * 8, 256)).astype(np.float32)
    else:
        x = rng.standard_normal((global_batch * 8, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, len(x))
    if dbg:
        tf.debugging.experimental.enable_dump_debug_info(os.path.join(out_dir, "tfdbg"), tensor_debug_mode=dbg,
                                                        circular_buffer_size=-1)
    if mode:
        from strategies import TracedMirroredStrategy
        from tracer import CaptureConfig

        mode, _, kinds = mode.partition(":")
        mode, _, every = mode.partition("/")
        capture = CaptureConfig(mode=mode, full_every=int(every or 1),
                                **({"kinds": tuple(kinds.split("+"))} if kinds else {}))
        # The -tmpfs variant separates the tracer's own cost from this disk's write speed.
        trace_root = tempfile.mkdtemp(dir="/dev/shm") if config.endswith("-tmpfs") else out_dir
        strategy = TracedMirroredStrategy(devices, trace_dir=os.path.join(trace_root, "trace"), capture=capture)
    else:
        strategy = tf.distribute.MirroredStrategy(devices)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        if model_kind == "mlp":
            model = keras.Sequential([keras.Input((256,)), keras.layers.Dense(1024, activation="relu"),
                                      keras.layers.Dense(1024, activation="relu"), keras.layers.Dense(10)])
        else:
            model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(32, 3, activation="relu"),
                                      keras.layers.Conv2D(64, 3, activation="relu"), keras.layers.MaxPooling2D(),
                                      keras.layers.Conv2D(64, 3, activation="relu"),
                                      keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)])
        opt = keras.optimizers.Adam(1e-3)
        opt.build(model.trainable_variables)
    if mode:
        strategy.watch(model, opt)
    loss_obj = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")

    def train_step(inputs):
        xb, yb = inputs
        with tf.GradientTape() as tape:
            loss = tf.nn.compute_average_loss(loss_obj(yb, model(xb, training=True)), global_batch_size=global_batch)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def step(inputs):
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(train_step, args=(inputs,)), axis=None)

    ds = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(global_batch, drop_remainder=True)
    it = iter(strategy.experimental_distribute_dataset(ds.prefetch(4)))
    times = []
    cpu0 = None
    for i in range(warmup + steps):
        if i == warmup:
            cpu0 = time.process_time()
        batch = next(it)
        t0 = time.perf_counter()
        step(batch).numpy()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    cpu_per_step = (time.process_time() - cpu0) / steps
    t_close = time.perf_counter()
    if mode:
        strategy.close()
    if dbg:
        tf.debugging.experimental.disable_dump_debug_info()
    close_s = time.perf_counter() - t_close
    n_params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    written = _dir_bytes(out_dir)
    if mode and trace_root != out_dir:
        written += _dir_bytes(trace_root)
        shutil.rmtree(trace_root, ignore_errors=True)
    return {"config": config, "median_s": statistics.median(times), "mean_s": statistics.fmean(times),
            "cpu_s": cpu_per_step,
            "close_s": close_s, "bytes": written, "steps": warmup + steps, "params": n_params}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="measured steps per configuration")
    parser.add_argument("--warmup", type=int, default=10, help="steps before measuring (tracing, XLA compile)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every configuration")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    parser.add_argument("--quick", action="store_true", help="30 steps, 1 round")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.warmup, args.out)))
        return 0
    if args.quick:
        args.steps, args.rounds = 30, 1
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}")
    results = {c: [] for c in configs}
    for r in range(args.rounds):
        for config in configs:
            out = tempfile.mkdtemp(prefix="tracer-bench-")
            try:
                # TF Debugger's full mode writes ~240 MB a step here: fewer steps.
                steps = min(args.steps, 20) if config.endswith("FULL_TENSOR") else args.steps
                proc = subprocess.run([sys.executable, __file__, "--worker", config, "--steps", str(steps),
                                       "--warmup", str(args.warmup), "--out", out],
                                      capture_output=True, text=True, timeout=1800)
                if proc.returncode != 0:
                    print(f"{config}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
                    continue
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                results[config].append(res)
                print(f"round {r + 1} {config:26s} {res['median_s'] * 1e3:8.2f} ms/step "
                      f"{res['cpu_s'] * 1e3:8.2f} CPU ms/step", file=sys.stderr)
            finally:
                shutil.rmtree(out, ignore_errors=True)
    summary = []
    for config in configs:
        runs = results[config]
        if not runs:
            continue
        base = config.split("/")[0] + "/untraced"
        med = statistics.median(r["median_s"] for r in runs)
        base_med = statistics.median(r["median_s"] for r in results.get(base, [])) if results.get(base) else None
        cpu = statistics.median(r["cpu_s"] for r in runs)
        base_cpu = statistics.median(r["cpu_s"] for r in results.get(base, [])) if results.get(base) else None
        summary.append({"config": config, "ms_per_step": med * 1e3, "cpu_ms_per_step": cpu * 1e3,
                        "cpu_ratio": (cpu / base_cpu) if base_cpu else None,
                        "ratio": (med / base_med) if base_med else None,
                        "bytes_per_step": runs[0]["bytes"] / runs[0]["steps"], "params": runs[0]["params"],
                        "rounds": len(runs)})
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{'configuration':34s} {'ms/step':>9s} {'ratio':>7s} {'CPU ms/step':>12s} {'CPU ratio':>9s} "
              f"{'disk/step':>12s}")
        for s in summary:
            ratio = f"{s['ratio']:.2f}x" if s["ratio"] else "-"
            cpu_ratio = f"{s['cpu_ratio']:.2f}x" if s["cpu_ratio"] else "-"
            print(f"{s['config']:34s} {s['ms_per_step']:9.2f} {ratio:>7s} {s['cpu_ms_per_step']:12.2f} "
                  f"{cpu_ratio:>9s} {s['bytes_per_step'] / 1e6:9.3f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
