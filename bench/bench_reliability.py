"""Reliability bench: SIGKILL many trace-writing processes, fuzz the analyzer with thousands of damaged files.

    python bench/bench_reliability.py --kills 200 --fuzz 2000

Kills use the TF-free victim ``tests/integration/crash_writer.py`` (real
TraceWriter, full tensors every step); ``--train-kills N`` adds N kills of the
traced reference job (``launch/train.py --replicas 2 --capture full``, ~30 s
each here). Prints the numbers docs/reliability.md quotes.
"""

import argparse
import collections
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from tests.integration import crashkill  # noqa: E402
from tests.unit import tracefuzz  # noqa: E402
from tests.unit.tracegen import write_run  # noqa: E402


def bench_kills(n, flush_every, seed):
    rng = np.random.default_rng(seed)
    results = []
    t0 = time.monotonic()
    for i in range(n):
        work = tempfile.mkdtemp(prefix="tracer-kill-")
        try:
            results.append(crashkill.kill_writer_once(work, rng, flush_every=flush_every, max_delay=1.5))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    ok = [r for r in results if r["readable"] and not r["problems"]]
    lost = [r["lost"] for r in results]
    print(f"kills: {len(ok)}/{n} traces readable with every step intact (flush_every={flush_every}); "
          f"steps lost: max {max(lost)}, mean {np.mean(lost):.1f}; steps written per run: "
          f"{min(r['handed'] for r in results)}..{max(r['handed'] for r in results)}; "
          f"{time.monotonic() - t0:.0f} s")
    for r in results:
        if r not in ok:
            print("  FAILED:", r["problems"][:3])


def bench_train_kills(n, seed):
    rng = np.random.default_rng(seed)
    good = files = 0
    for i in range(n):
        work = tempfile.mkdtemp(prefix="tracer-trainkill-")
        trace = os.path.join(work, "t")
        cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--replicas", "2", "--steps", "100000",
               "--batch-size", "16", "--capture", "full", "--trace-dir", trace, "--no-progress"]
        try:
            out = crashkill.kill_command_once(cmd, trace, rng, max_delay=5.0, cwd=work,
                                              env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
            for r in out["files"].values():
                files += 1
                good += bool(r["readable"] and not r["problems"])
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"train.py kills: {n} jobs, {good}/{files} replica traces readable with every step intact")


def bench_fuzz(n, seed):
    work = tempfile.mkdtemp(prefix="tracer-fuzz-")
    try:
        good = write_run(os.path.join(work, "good"), steps=12, replicas=2, full=True)
        t0 = time.monotonic()
        cases = tracefuzz.make_cases(good, os.path.join(work, "cases"), n, seed=seed)
        results = {}
        for k in range(0, n, 500):  # bounded disk use: 500 copies at a time
            batch = cases[k:k + 500]
            results.update(tracefuzz.run_batch(batch, work, timeout=600))
            for c in batch:
                shutil.rmtree(c["run"], ignore_errors=True)
        failed = collections.Counter()
        outcome = collections.Counter()
        for c in cases:
            problems = tracefuzz.judge(c, results[c["id"]])
            if problems:
                failed[c["kind"]] += 1
                print(f"  FAILED case {c['id']} {c['kind']} ({c['what']}): {problems[0][:300]}")
            else:
                outcome[(c["expect"], results[c["id"]]["bisect"]["code"])] += 1
        errors = sum(v for (e, code), v in outcome.items() if code == 2)
        peak = max(r.get("maxrss_mb", 0) for r in results.values())
        print(f"fuzz: {n} mutated runs, {n - sum(failed.values())} handled correctly "
              f"({errors} clean one-line errors, exit 2; the rest exit 0/1 where the mutation touched no "
              f"metadata the analyzer relies on); by (expectation, bisect exit): {dict(outcome)}; "
              f"peak RSS {peak:.0f} MB; {time.monotonic() - t0:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=200)
    p.add_argument("--train-kills", type=int, default=0)
    p.add_argument("--fuzz", type=int, default=2000)
    p.add_argument("--flush-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if args.fuzz:
        bench_fuzz(args.fuzz, args.seed)
    if args.kills:
        bench_kills(args.kills, args.flush_every, args.seed)
    if args.train_kills:
        bench_train_kills(args.train_kills, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
