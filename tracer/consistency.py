"""Within one run: do all replicas hold bitwise-identical global values at every step?

All-reduced gradients, optimizer slots and weights (``schema.GLOBAL_KINDS``)
must be bitwise equal on every replica. The scan streams each replica's hash
matrix in blocks, like :mod:`tracer.compare`; the first disagreement is named
by step, tensor (dataflow order) and the replica that is the odd one out
(the minority against the majority of replicas; against replica 0 on a tie).
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any, Dict, List, Optional

import numpy as np

from tracer import schema
from tracer.causes import CAUSES, SINGLE_FAULT_NEXT, single_fault
from tracer.compare import CHUNK_ROWS, order_keys
from tracer.envdiff import env_diff
from tracer.metrics import compare_full, compare_stats
from tracer.reader import Run, TraceReader
from tracer.tolerance import Tolerance

STATS4 = ("l2", "max_abs", "nan", "inf")


def _odd_replicas(hashes: Dict[int, int]) -> List[int]:
    counts = Counter(hashes.values())
    top = max(counts.values())
    winners = [h for h, c in counts.items() if c == top]
    first = next(iter(hashes.values()))
    majority = first if first in winners else winners[0]
    return [r for r, h in hashes.items() if h != majority], majority


def check_run(run: Run, *, chunk_rows: int = CHUNK_ROWS, progress: bool = False) -> Dict[str, Any]:
    """Check run ``run``; returns a dict shaped like ``Result.to_dict()`` of :mod:`tracer.compare`."""
    keys = order_keys(run.tensors, [t.key for t in run.tensors if t.kind in schema.GLOBAL_KINDS])
    specs = {t.key: t for t in run.tensors}
    cols = np.array([run.readers[0].column(k) for k in keys], dtype=np.int64)
    notes = list(run.notes)
    if len(run.readers) < 2:
        notes.append("only one replica file: nothing to check across replicas")
    first = _check_initial(run, keys, specs)
    steps = run.steps
    n_bad, last_bad = 0, None
    bar = None
    if progress:
        from tqdm import tqdm  # local: only for interactive scans
        bar = tqdm(total=steps.size, unit="step", desc="tracer: checking", file=sys.stderr, leave=False)
    try:
        for k0 in range(0, steps.size, chunk_rows):
            k1 = min(k0 + chunk_rows, steps.size)
            ref = run.readers[0].fingerprints("hash", k0, k1)[:, cols]
            bad = np.zeros_like(ref, dtype=bool)
            for r in run.readers[1:]:
                bad |= r.fingerprints("hash", k0, k1)[:, cols] != ref
            if bar is not None:
                bar.update(k1 - k0)
            rows = np.flatnonzero(bad.any(axis=1))
            if rows.size == 0:
                continue
            n_bad += int(rows.size)
            last_bad = int(steps[k0 + rows[-1]])
            if first is None:
                row = k0 + int(rows[0])
                j = int(np.flatnonzero(bad[rows[0]])[0])
                first = _finding(run, keys[j], specs[keys[j]], row, int(steps[row]))
    finally:
        if bar is not None:
            bar.close()
    envs = [env_diff(run.readers[0].attrs, r.attrs) for r in run.readers[1:]]
    diff_env = []
    for r, env in zip(run.readers[1:], envs):
        diff_env += [dict(e, replica=r.replica) for e in env]
    cause = first["cause"] if first else None
    return {
        "diverged": first is not None,
        "first_step": first["step"] if first else None,
        "first": first,
        "first_bitwise": first,
        "cause": cause,
        "explanation": CAUSES[cause].explanation if cause else None,
        "next_step": first["next_step"] if cause else None,
        "tolerance": Tolerance().to_dict(),
        "env_diff": diff_env,
        "steps_compared": {"count": int(steps.size), "first": int(steps[0]) if steps.size else None,
                           "last": int(steps[-1]) if steps.size else None, "overlap_only": False},
        "divergent_steps": {"count": n_bad, "first": first["step"] if first and first["snapshot"] == "step"
                            else None, "last": last_bad, "reconverged": bool(n_bad) and last_bad != (
                                int(steps[-1]) if steps.size else None)},
        "growth": None,
        "tensors": {"compared": len(keys), "only_in_a": [], "only_in_b": [],
                    "replica_pairs": [[run.readers[0].replica, r.replica] for r in run.readers[1:]]},
        "runs": {"a": {"path": run.path, "replicas": run.replicas, "num_replicas": run.num_replicas,
                       "steps": int(run.n_rows), "run_id": run.readers[0].run_id}},
        "notes": notes + [n for n in run.notes_now() if n not in notes],
    }


def _check_initial(run: Run, keys, specs) -> Optional[Dict[str, Any]]:
    step = run.readers[0].initial_step
    if step is None:
        return None
    for key in keys:
        hashes = {}
        for r in run.readers:
            cols = {r.tensors[c].key: j for j, c in enumerate(r.initial_columns)}
            h = r.initial_fingerprints("hash")
            if key in cols and h.shape[0]:
                hashes[r.replica] = int(h[0, cols[key]])
        if len(set(hashes.values())) > 1:
            return _describe(run, key, specs[key], step, hashes, initial=True)
    return None


def _finding(run: Run, key, spec, row: int, step: int) -> Dict[str, Any]:
    col = run.readers[0].column(key)
    hashes = {r.replica: int(r.fingerprints("hash", row, row + 1)[0, col]) for r in run.readers}
    return _describe(run, key, spec, step, hashes, row=row)


def _describe(run: Run, key, spec, step, hashes, *, row: Optional[int] = None, initial: bool = False):
    odd, majority = _odd_replicas(hashes)
    by_replica = {r.replica: r for r in run.readers}
    ref = next(r for r in run.readers if hashes[r.replica] == majority)
    other = by_replica[odd[0]]
    diff = _diff(ref, other, key, spec, step, row, initial)
    d = {"step": step, "kind": spec.kind, "tensor": spec.name, "micro_step": spec.micro_step,
         "replica": other.replica, "replica_b": ref.replica, "replicas": odd,
         "snapshot": "initial" if initial else "step", "origin": True}
    d.update(diff.to_dict())
    verdict = Tolerance().judge(diff, spec.dtype)
    d["verdict"] = {"beyond": True, "metric": verdict.metric, "value": verdict.value,
                    "threshold": verdict.threshold, "text": verdict.text()}
    detail = (f"replicas {odd} disagree with replica {ref.replica} (and the majority of {len(hashes)} "
              f"replicas) on {spec.kind} {spec.label}")
    hint = single_fault(kind=spec.kind, n_diff=diff.n_diff, size=spec.size, replicas=odd,
                        num_replicas=len(hashes), first_index=diff.first_index)
    d.update(cause="replica_desync", inherited=[], n_inherited=0, nonfinite_origin=None,
             detail=f"{detail}; {hint}" if hint else detail,
             next_step=SINGLE_FAULT_NEXT if hint else CAUSES["replica_desync"].next_step)
    return d


def _diff(ref: TraceReader, other: TraceReader, key, spec, step, row, initial):
    group = schema.INITIAL if initial else ""
    ca, cb = ref.column(key), other.column(key)
    fa, fb = ref.full(ca, step, group), other.full(cb, step, group)
    if fa is not None and fb is not None:
        return compare_full(fa, fb, spec.dtype)
    if initial:
        ja = ref.initial_columns.index(ca)
        jb = other.initial_columns.index(cb)
        sa = {s: ref.initial_fingerprints(s)[0, ja] for s in STATS4}
        sb = {s: other.initial_fingerprints(s)[0, jb] for s in STATS4}
    else:
        sa = {s: ref.fingerprints(s, row, row + 1)[0, ca] for s in STATS4}
        sb = {s: other.fingerprints(s, row, row + 1)[0, cb] for s in STATS4}
    return compare_stats(sa, sb, spec.size, spec.dtype)

