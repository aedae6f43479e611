"""Analyzer benchmark: step scan time, full-tensor comparison throughput, peak memory vs steps.

Two runs of 10,000 steps x 100 tensors x 4 replicas, written with the real
TraceWriter (fingerprints only), a difference planted at a random step in one
replica's local gradient that propagates to every later tensor and step.

    python bench/bench_bisect.py [--workdir DIR] [--steps 10000] [--seed 0]

Prints a Markdown table (the one in docs/benchmarks.md, section "Analyzer").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tracer import schema  # noqa: E402
from tracer.config import CaptureConfig  # noqa: E402
from tracer.schema import TensorSpec  # noqa: E402
from tracer.writer import TraceWriter  # noqa: E402

N_TENSORS = 100
N_REPLICAS = 4


def tensor_table():
    """100 tensors: input, loss, 24 local grads, 24 reduced grads, 24 slots + 2, 24 weights."""
    names = [f"layer_{i:02d}/kernel" for i in range(24)]
    t = [TensorSpec("input", "batch[0]", (32, 256), "float32"), TensorSpec("loss", "loss", (), "float32")]
    t += [TensorSpec("local_grad", n, (256, 256), "float32", variable=n) for n in reversed(names)]
    t += [TensorSpec("allreduced_grad", n, (256, 256), "float32", variable=n) for n in reversed(names)]
    t += [TensorSpec("optimizer_slot", f"{n}/momentum", (256, 256), "float32", variable=n, slot="momentum")
          for n in names]
    t += [TensorSpec("optimizer_slot", "iteration", (), "int64"),
          TensorSpec("optimizer_slot", "learning_rate", (), "float32")]
    t += [TensorSpec("weight", n, (256, 256), "float32", variable=n) for n in names]
    assert len(t) == N_TENSORS
    return t


def _write_file(job) -> str:
    """One replica file of run A or B; B differs from ``plant_step`` on."""
    root, run, r, steps, plant_step, seed = job
    specs = tensor_table()
    first_local = 2
    config = CaptureConfig(mode="fingerprint", queue_size=64, flush_every=1000)
    rng = np.random.default_rng(seed * 1000 + r)
    path = os.path.join(root, f"{steps}", run, schema.replica_file_name(r))
    attrs = {"num_replicas": N_REPLICAS, "replica": r, "run_id": run, "initial_step": 0,
             "env": {"TF_ENABLE_ONEDNN_OPTS": "0" if run == "a" else "1"}}
    cols = np.arange(N_TENSORS)
    with TraceWriter(path, specs, attrs=attrs, config=config) as w:
        ncols = len(w.initial_columns)
        w.write_initial(0, [np.arange(ncols, dtype=np.uint64), np.ones(ncols), np.ones(ncols),
                            np.zeros(ncols, np.int64), np.zeros(ncols, np.int64)])
        for s in range(steps):
            h = rng.integers(0, 2**63, size=N_TENSORS, dtype=np.uint64)
            l2 = rng.random(N_TENSORS) + 1.0
            mx = l2 / 2
            if run == "b" and s >= plant_step:
                # At the planted step only replica 2's local gradients differ
                # (then everything global); after it, every tensor.
                touched = cols >= first_local
                if s == plant_step and r != 2:
                    touched &= cols >= first_local + 24
                growth = 1e-7 * 1.002 ** (s - plant_step)
                h = np.where(touched, h ^ np.uint64(1), h)
                l2 = np.where(touched, l2 * (1 + growth), l2)
                mx = np.where(touched, mx * (1 + growth), mx)
            w.write_step(s, [h, l2, mx, np.zeros(N_TENSORS, np.int64), np.zeros(N_TENSORS, np.int64)])
    return path


def write_pair(root: str, steps: int, plant_step: int, seed: int) -> tuple:
    """Runs A and B of ``N_REPLICAS`` files each, written in parallel processes."""
    from multiprocessing import get_context

    jobs = [(root, run, r, steps, plant_step, seed) for run in ("a", "b") for r in range(N_REPLICAS)]
    with get_context("spawn").Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
        pool.map(_write_file, jobs)
    return os.path.join(root, f"{steps}", "a"), os.path.join(root, f"{steps}", "b")


def time_scan(a: str, b: str, repeat: int = 5) -> tuple:
    from tracer.compare import Comparison
    from tracer.reader import Run

    times = []
    result = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        with Run(a) as ra, Run(b) as rb:
            result = Comparison(ra, rb).run()
        times.append(time.perf_counter() - t0)
    return min(times), float(np.median(times)), result


def peak_memory(a: str, b: str) -> tuple:
    """(tracemalloc peak MiB, peak RSS MiB, RSS after imports MiB, first step) of one comparison.

    Runs in a fresh process that resets its RSS high-water mark first
    (/proc/self/clear_refs), so the parent's memory does not leak into it.
    """
    code = (
        "import sys, json, tracemalloc; sys.path.insert(0, %r)\n"
        "def hwm():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmHWM:'): return int(line.split()[1]) / 1024\n"
        "from tracer.compare import Comparison; from tracer.reader import Run\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "base = hwm()\n"
        "tracemalloc.start()\n"
        "with Run(%r) as a, Run(%r) as b: r = Comparison(a, b).run()\n"
        "peak = tracemalloc.get_traced_memory()[1]\n"
        "print(json.dumps([peak / 2**20, hwm(), base, r.first.step]))\n") % (ROOT, a, b)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def full_throughput(root: str, n: int = 4, elements: int = 16 << 20) -> list:
    """GB/s of reading + comparing full float32 tensors (both sides counted), identical and all-different."""
    from tracer.metrics import compare_full
    from tracer.reader import TraceReader

    specs = [TensorSpec("weight", f"big_{i}", (elements,), "float32") for i in range(n)]
    rng = np.random.default_rng(1)
    base = [rng.standard_normal(elements).astype(np.float32) for _ in range(n)]
    cases = {"identical": base,
             "every element 1 ulp apart": [np.nextafter(x, np.float32(np.inf)) for x in base]}
    rows = []
    for label, other in cases.items():
        paths = []
        for name, values in (("x", base), ("y", other)):
            path = os.path.join(root, "full", label.replace(" ", "_"), name, "replica-0.h5")
            config = CaptureConfig(mode="full")
            with TraceWriter(path, specs, config=config, initial_columns=[]) as w:
                fps = [np.zeros(n, np.uint64), np.zeros(n), np.zeros(n), np.zeros(n, np.int64),
                       np.zeros(n, np.int64)]
                w.write_step(0, fps, list(values))
            paths.append(path)
        with TraceReader(paths[0]) as ra, TraceReader(paths[1]) as rb:
            for c in range(n):  # warm the page cache: measure the analyzer, not the disk
                ra.full(c, 0), rb.full(c, 0)
            best_read = best_all = best_cmp = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                diffs = []
                cmp_time = 0.0
                for c in range(n):
                    x, y = ra.full(c, 0), rb.full(c, 0)
                    t1 = time.perf_counter()
                    diffs.append(compare_full(x, y, "float32"))
                    cmp_time += time.perf_counter() - t1
                best_all = min(best_all, time.perf_counter() - t0)
                best_cmp = min(best_cmp, cmp_time)
        nbytes = 2 * n * elements * 4
        rows.append((label, nbytes, nbytes / best_all / 1e9, nbytes / best_cmp / 1e9, diffs[0].n_diff))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=None, help="where to write the traces (default: a temporary directory)")
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    root = args.workdir or tempfile.mkdtemp(prefix="tracer-bench-")
    rng = np.random.default_rng(args.seed)
    print(f"# writing traces under {root}", file=sys.stderr)
    lines = ["| measurement | value | target |", "|---|---|---|"]
    pairs = {}
    for steps in (2_500, args.steps):
        plant = int(rng.integers(steps // 10, steps - 1))
        t0 = time.perf_counter()
        done = os.path.join(root, f"{steps}", "b", schema.replica_file_name(N_REPLICAS - 1))
        if os.path.exists(done):  # same --workdir and --seed: same traces, reuse them
            pairs[steps] = ((os.path.join(root, f"{steps}", "a"), os.path.join(root, f"{steps}", "b")), plant)
            continue
        pairs[steps] = (write_pair(root, steps, plant, args.seed), plant)
        print(f"# wrote 2 x {N_REPLICAS} files of {steps} steps in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
    (a, b), plant = pairs[args.steps]
    best, median, result = time_scan(a, b)
    assert result.first.step == plant and result.first.replica == 2 and result.first.kind == "local_grad", \
        (result.first, plant)
    size = sum(os.path.getsize(os.path.join(d, f)) for d in (a, b) for f in os.listdir(d))
    lines.append(f"| step scan + locate + report data, {args.steps:,} steps x {N_TENSORS} tensors x "
                 f"{N_REPLICAS} replicas, 2 runs ({size / 2**20:.0f} MiB), planted at step {plant} "
                 f"(found: step {result.first.step}, replica {result.first.replica}) | {best:.3f} s best, "
                 f"{median:.3f} s median of 5 | < 1 s |")
    for steps in sorted(pairs):
        (a, b), _ = pairs[steps]
        traced, hwm, base, _ = peak_memory(a, b)
        lines.append(f"| peak memory of one comparison, {steps:,} steps (fresh process) | tracemalloc peak "
                     f"{traced:.1f} MiB; peak RSS {hwm:.0f} MiB ({base:.0f} MiB after imports) "
                     f"| does not grow with steps |")
    for label, nbytes, gbs_all, gbs_cmp, n_diff in full_throughput(root):
        lines.append(f"| full-tensor comparison, 4 x 16 Mi float32 per side ({nbytes / 2**20:.0f} MiB "
                     f"read), {label} | {gbs_all:.2f} GB/s incl. HDF5 read, {gbs_cmp:.2f} GB/s compare only "
                     f"| >= 1 GB/s |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
