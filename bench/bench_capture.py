"""Capture overhead: traced vs untraced step time, side by side, plus TF Debugger v2.

    python bench/bench_capture.py                # full comparison (several minutes)
    python bench/bench_capture.py --quick        # fewer steps and rounds

Each tracer configuration runs side by side with an untraced twin (same model,
same data, same initial weights) in one process, alternating blocks of 10
steps, and its ratio is taken against that twin: on a shared machine whose
speed drifts by 20% from minute to minute, only a side-by-side ratio means
anything. A block's time runs until the writer has flushed its steps, so a
writer that falls behind is charged to the traced steps; a pair's step time is
the median over its blocks. TF Debugger cannot be turned off inside a process, so its
configurations (and ``--separate`` runs) use their own process and are compared
with the untraced runs of the same invocation. Configurations are interleaved
round by round; each result is the median step time over the measured steps,
then the median over rounds.

Setup (from the capture issue): MLP 256->1024->1024->10 (~1.3M parameters),
MirroredStrategy on 2 logical CPU devices, Adam, global batch 128; and a small
CNN where compute dominates.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
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
    # Batches passed in from a dataset batched without drop_remainder: the step is traced with an
    # unknown batch size, so the inputs take the run-time shape fingerprint path (the untraced twin
    # reads the same pipeline).
    "mlp-unknown-batch/tracer-fingerprint": ("mlp-unknown-batch", "fingerprint", None),
    # Mixed precision (mixed_float16, LossScaleOptimizer): the update is conditional, so the gradients reach
    # the trace through stash variables (one more copy of them per replica and step).
    "mlp-mixed/tracer-fingerprint": ("mlp-mixed", "fingerprint", None),
    "cnn/untraced": ("cnn", None, None),
    "cnn/tracer-fingerprint": ("cnn", "fingerprint", None),
}


def _dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def _build(model_kind: str, mode, devices, trace_root: str, x, y, global_batch: int):
    """One training setup: (step function, iterator, strategy or None if untraced, model)."""
    import tensorflow as tf
    import keras

    strategy = None
    if mode:
        from strategies import TracedMirroredStrategy
        from tracer import CaptureConfig

        mode, _, kinds = mode.partition(":")
        mode, _, every = mode.partition("/")
        capture = CaptureConfig(mode=mode, full_every=int(every or 1),
                                **({"kinds": tuple(kinds.split("+"))} if kinds else {}))
        strategy = TracedMirroredStrategy(devices, trace_dir=os.path.join(trace_root, "trace"), capture=capture)
        dist = strategy
    else:
        dist = tf.distribute.MirroredStrategy(devices)
    with dist.scope():
        keras.utils.set_random_seed(0)
        if model_kind.startswith("mlp"):
            policy = "mixed_float16" if model_kind == "mlp-mixed" else None
            model = keras.Sequential([keras.Input((256,)), keras.layers.Dense(1024, activation="relu", dtype=policy),
                                      keras.layers.Dense(1024, activation="relu", dtype=policy),
                                      keras.layers.Dense(10, dtype="float32" if policy else None)])
        else:
            model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(32, 3, activation="relu"),
                                      keras.layers.Conv2D(64, 3, activation="relu"), keras.layers.MaxPooling2D(),
                                      keras.layers.Conv2D(64, 3, activation="relu"),
                                      keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)])
        opt = keras.optimizers.Adam(1e-3)
        if model_kind == "mlp-mixed":
            opt = keras.optimizers.LossScaleOptimizer(opt)
        opt.build(model.trainable_variables)
    if strategy is not None:
        strategy.watch(model, opt)
    loss_obj = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")

    def train_step(inputs):
        xb, yb = inputs
        with tf.GradientTape() as tape:
            loss = tf.nn.compute_average_loss(loss_obj(yb, model(xb, training=True)), global_batch_size=global_batch)
            scaled = opt.scale_loss(loss) if model_kind == "mlp-mixed" else loss
        grads = tape.gradient(scaled, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def step(inputs):
        return dist.reduce(tf.distribute.ReduceOp.SUM, dist.run(train_step, args=(inputs,)), axis=None)

    ds = tf.data.Dataset.from_tensor_slices((x, y)).repeat()
    ds = ds.batch(global_batch) if model_kind.endswith("unknown-batch") else ds.batch(global_batch, drop_remainder=True)
    it = iter(dist.experimental_distribute_dataset(ds.prefetch(4)))
    return step, it, strategy, model


def _setup(model_kind: str):
    import numpy as np
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    rng = np.random.default_rng(0)
    if model_kind.startswith("mlp"):
        x = rng.standard_normal((GLOBAL_BATCH * 8, 256)).astype(np.float32)
    else:
        x = rng.standard_normal((GLOBAL_BATCH * 8, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, len(x))
    return devices, x, y


GLOBAL_BATCH = 128


def worker(config: str, steps: int, warmup: int, out_dir: str) -> dict:
    """Run one configuration alone in this process."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, ROOT)
    import numpy as np
    import tensorflow as tf

    model_kind, mode, dbg = CONFIGS[config]
    devices, x, y = _setup(model_kind)
    if dbg:
        tf.debugging.experimental.enable_dump_debug_info(os.path.join(out_dir, "tfdbg"), tensor_debug_mode=dbg,
                                                        circular_buffer_size=-1)
    # The -tmpfs variant separates the tracer's own cost from this disk's write speed.
    trace_root = tempfile.mkdtemp(dir="/dev/shm") if config.endswith("-tmpfs") else out_dir
    step, it, strategy, model = _build(model_kind, mode, devices, trace_root, x, y, GLOBAL_BATCH)
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
    if strategy is not None:
        strategy.flush()  # the writer's work belongs to these steps
    cpu_per_step = (time.process_time() - cpu0) / steps
    t_close = time.perf_counter()
    if strategy is not None:
        strategy.close()
    if dbg:
        tf.debugging.experimental.disable_dump_debug_info()
    close_s = time.perf_counter() - t_close
    n_params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    written = _dir_bytes(out_dir)
    if trace_root != out_dir:
        written += _dir_bytes(trace_root)
        shutil.rmtree(trace_root, ignore_errors=True)
    return {"config": config, "median_s": statistics.median(times), "mean_s": statistics.fmean(times),
            "cpu_s": cpu_per_step,
            "close_s": close_s, "bytes": written, "steps": warmup + steps, "params": n_params}


def worker_side_by_side(config: str, steps: int, warmup: int, out_dir: str, block: int = 10) -> dict:
    """Run ``config`` and its untraced twin in one process, alternating blocks of steps.

    Both see the same machine at the same moments, so the ratio survives the
    noise of a shared machine far better than two runs minutes apart. The
    traced block ends with a writer flush, so the writer's work is charged to
    the traced steps, never to the untraced ones.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, ROOT)
    import numpy as np

    model_kind, mode, dbg = CONFIGS[config]
    assert mode and not dbg, config
    devices, x, y = _setup(model_kind)
    trace_root = tempfile.mkdtemp(dir="/dev/shm") if config.endswith("-tmpfs") else out_dir
    runs = {"untraced": _build(model_kind, None, devices, trace_root, x, y, GLOBAL_BATCH),
            "traced": _build(model_kind, mode, devices, trace_root, x, y, GLOBAL_BATCH)}
    for step, it, _, _ in runs.values():
        for _ in range(warmup):
            step(next(it)).numpy()
    runs["traced"][2].flush()
    times = {k: [] for k in runs}
    cpu = {k: 0.0 for k in runs}
    blocks = max(1, steps // block)
    for b in range(blocks):
        # Alternate which one goes first, so neither always follows the other.
        for name in (("untraced", "traced") if b % 2 == 0 else ("traced", "untraced")):
            step, it, strategy, _ = runs[name]
            c0 = time.process_time()
            t0 = time.perf_counter()
            for _ in range(block):
                step(next(it)).numpy()
            if strategy is not None:
                strategy.flush()
            # Per step, the block's wall time: the writer's lag (waited for by the
            # flush) counts, where the median single step would hide it.
            times[name].append((time.perf_counter() - t0) / block)
            cpu[name] += time.process_time() - c0
    strategy = runs["traced"][2]
    strategy.close()
    n_params = sum(int(np.prod(v.shape)) for v in runs["traced"][3].trainable_variables)
    written = _dir_bytes(os.path.join(trace_root, "trace"))
    if trace_root != out_dir:
        shutil.rmtree(trace_root, ignore_errors=True)
    n = blocks * block
    med = {k: statistics.median(v) for k, v in times.items()}
    # Each traced block against the untraced block run next to it: slow drift of the machine cancels.
    pair_ratios = [t / u for t, u in zip(times["traced"], times["untraced"])]
    return {"config": config, "median_s": med["traced"], "base_median_s": med["untraced"],
            "pair_ratios": pair_ratios,
            "mean_s": statistics.fmean(times["traced"]),
            "cpu_s": cpu["traced"] / n, "base_cpu_s": cpu["untraced"] / n,
            "bytes": written, "steps": warmup + n, "params": n_params}


def _paired(config: str, separate: bool) -> bool:
    """Whether ``config`` runs side by side with its untraced twin in one process."""
    _, mode, dbg = CONFIGS[config]
    return bool(mode) and not dbg and not separate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="measured steps per configuration")
    parser.add_argument("--warmup", type=int, default=10, help="steps before measuring (tracing, XLA compile)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every configuration")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    parser.add_argument("--separate", action="store_true",
                        help="run tracer configurations in their own process too, and compare them with the "
                             "separate untraced runs (the default pairs each with an untraced twin in one process)")
    parser.add_argument("--quick", action="store_true", help="30 steps, 1 round")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--pair", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run = worker_side_by_side if args.pair else worker
        print(json.dumps(run(args.worker, args.steps, args.warmup, args.out)))
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
            paired = _paired(config, args.separate)
            try:
                # TF Debugger's full mode writes ~240 MB a step here: fewer steps.
                steps = min(args.steps, 20) if config.endswith("FULL_TENSOR") else args.steps
                proc = subprocess.run([sys.executable, __file__, "--worker", config, "--steps", str(steps),
                                       "--warmup", str(args.warmup), "--out", out] + (["--pair"] if paired else []),
                                      capture_output=True, text=True, timeout=1800)
                if proc.returncode != 0:
                    how = (f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
                           else f"exit status {proc.returncode}")
                    print(f"{config}: failed ({how})\n{proc.stderr[-3000:]}", file=sys.stderr)
                    continue
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                results[config].append(res)
                line = (f"round {r + 1} {config:34s} {res['median_s'] * 1e3:8.2f} ms/step "
                        f"{res['cpu_s'] * 1e3:8.2f} CPU ms/step")
                if paired:
                    line += (f"   untraced twin {res['base_median_s'] * 1e3:7.2f} ms/step"
                             f" -> {res['median_s'] / res['base_median_s']:.2f}x")
                print(line, file=sys.stderr)
            finally:
                # Write this configuration's pages out now: left to the kernel's background writeback,
                # full capture's gigabytes would take CPU from the configurations measured after it.
                os.sync()
                shutil.rmtree(out, ignore_errors=True)
    summary = []
    for config in configs:
        runs = results[config]
        if not runs:
            continue
        med = statistics.median(r["median_s"] for r in runs)
        cpu = statistics.median(r["cpu_s"] for r in runs)
        if "base_median_s" in runs[0]:
            # Side by side: the ratio of each process, then the median over rounds.
            round_ratios = [r["median_s"] / r["base_median_s"] for r in runs]
            ratio = statistics.median(round_ratios)
            cpu_ratio = statistics.median(r["cpu_s"] / r["base_cpu_s"] for r in runs)
            basis = "twin"
            pairs = [p for r in runs for p in r["pair_ratios"]]
            q1, _, q3 = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else (pairs[0],) * 3
            extra = {"round_ratios": round_ratios, "pair_ratio_median": statistics.median(pairs),
                     "pair_ratio_q1": q1, "pair_ratio_q3": q3, "pairs": len(pairs)}
        else:
            extra = {}
            base = results.get(config.split("/")[0] + "/untraced")
            base_med = statistics.median(r["median_s"] for r in base) if base else None
            base_cpu = statistics.median(r["cpu_s"] for r in base) if base else None
            ratio = med / base_med if base_med else None
            cpu_ratio = cpu / base_cpu if base_cpu else None
            basis = "separate" if base_med and not config.endswith("/untraced") else ""
        summary.append({"config": config, "ms_per_step": med * 1e3, "cpu_ms_per_step": cpu * 1e3,
                        "ratio": ratio, "cpu_ratio": cpu_ratio, "ratio_basis": basis,
                        "bytes_per_step": runs[0]["bytes"] / runs[0]["steps"], "params": runs[0]["params"],
                        "rounds": len(runs), **extra})
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{'configuration':38s} {'ms/step':>9s} {'ratio':>7s} {'CPU ms/step':>12s} {'CPU ratio':>9s} "
              f"{'disk/step':>12s}  ratio to")
        for s in summary:
            ratio = f"{s['ratio']:.2f}x" if s["ratio"] else "-"
            cpu_ratio = f"{s['cpu_ratio']:.2f}x" if s["cpu_ratio"] else "-"
            basis = {"twin": "untraced twin, same process", "separate": "untraced runs, own process"}.get(
                s["ratio_basis"], "")
            print(f"{s['config']:38s} {s['ms_per_step']:9.2f} {ratio:>7s} {s['cpu_ms_per_step']:12.2f} "
                  f"{cpu_ratio:>9s} {s['bytes_per_step'] / 1e6:9.3f} MB  {basis}")
        paired = [s for s in summary if s["ratio_basis"] == "twin"]
        if paired:
            print("\nside by side, per configuration: the ratio of each round (traced median block over untraced "
                  "median block),\nand every traced block over the untraced block run next to it (median, quartiles)")
            for s in paired:
                rounds = ", ".join(f"{r:.2f}x" for r in s["round_ratios"])
                print(f"{s['config']:38s} rounds {rounds}; {s['pairs']} block pairs {s['pair_ratio_median']:.3f}x "
                      f"({s['pair_ratio_q1']:.3f}-{s['pair_ratio_q3']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
