"""Ground truth read straight from the traces' tensors, independent of tracer.bisect's logic.

It pairs replica files by index (``i mod n`` across replica counts) and reports
the first snapshot (initial, then steps) where any fingerprint hash of a
common tensor differs, with every differing (kind, tensor, replica) there.
"""

from __future__ import annotations

import glob
import os
from typing import Dict, List, Optional

import numpy as np

from tracer import TraceReader
from tracer.schema import GLOBAL_KINDS, KIND_ORDER


def readers(run_dir) -> List[TraceReader]:
    paths = sorted(glob.glob(os.path.join(str(run_dir), "replica-*.h5")),
                   key=lambda p: int(os.path.basename(p)[8:-3]))
    return [TraceReader(p) for p in paths]


def skipped(run_dir) -> np.ndarray:
    """Steps of the updates replica 0 of a run skipped."""
    rs = readers(run_dir)
    try:
        return rs[0].skipped_steps()
    finally:
        for r in rs:
            r.close()


def _comparable(a, b) -> bool:
    """Same dtype and shape; a first axis of -1 (a batch of unknown size) matches any."""
    if a.dtype != b.dtype or len(a.shape) != len(b.shape) or a.shape[1:] != b.shape[1:]:
        return False
    return a.shape[:1] == b.shape[:1] or -1 in a.shape[:1] + b.shape[:1]


def first_difference(a_dir, b_dir) -> Optional[Dict]:
    """``{"snapshot", "step", "diffs": [(kind, tensor, micro_step, replica, column)]}`` of the first difference.

    ``column`` is the tensor's position in run A's file; None when the runs are bitwise equal.
    """
    ra, rb = readers(a_dir), readers(b_dir)
    try:
        n = max(len(ra), len(rb))
        pairs = [(ra[i % len(ra)], rb[i % len(rb)]) for i in range(n)]
        kinds = set(KIND_ORDER) if len(ra) == len(rb) else set(GLOBAL_KINDS)
        spec_b = {t.key: t for t in rb[0].tensors}
        keys = [t.key for t in ra[0].tensors if t.kind in kinds and t.key in spec_b
                and _comparable(t, spec_b[t.key])]
        diffs = []
        for pa, pb in pairs:
            ia = {pa.tensors[c].key: j for j, c in enumerate(pa.initial_columns)}
            ib = {pb.tensors[c].key: j for j, c in enumerate(pb.initial_columns)}
            ha, hb = pa.initial_fingerprints("hash"), pb.initial_fingerprints("hash")
            diffs += [k + (pb.replica, p) for p, k in enumerate(keys)
                      if k in ia and k in ib and ha[0, ia[k]] != hb[0, ib[k]]]
        if diffs:
            return {"snapshot": "initial", "step": ra[0].initial_step, "diffs": diffs}
        steps = np.intersect1d(ra[0].steps(), rb[0].steps())
        for step in steps:
            for pa, pb in pairs:
                row_a = int(np.flatnonzero(pa.steps() == step)[0])
                row_b = int(np.flatnonzero(pb.steps() == step)[0])
                ha, hb = pa.fingerprints("hash", row_a, row_a + 1)[0], pb.fingerprints("hash", row_b, row_b + 1)[0]
                diffs += [k + (pb.replica, p) for p, k in enumerate(keys) if ha[pa.column(k)] != hb[pb.column(k)]]
            if diffs:
                return {"snapshot": "step", "step": int(step), "diffs": diffs}
        return None
    finally:
        for r in ra + rb:
            r.close()


def earliest(diffs):
    """``(kind, tensor, micro_step)`` of the differing tensor earliest in a step's dataflow.

    Kind order first, then the capture side's column order inside the kind
    (backprop order for gradients).
    """
    d = min(diffs, key=lambda d: (KIND_ORDER[d[0]], d[4]))
    return d[:3]


def kinds_at(diff) -> List[str]:
    return sorted({d[0] for d in diff["diffs"]}, key=KIND_ORDER.get)


def nonfinite_first(run_dir) -> Optional[Dict]:
    """First step with a NaN/Inf in any tensor of any replica: ``{"step", "kinds": {kind: [tensor]}}``."""
    rs = readers(run_dir)
    try:
        best = None
        for r in rs:
            bad = (r.fingerprints("nan") > 0) | (r.fingerprints("inf") > 0)
            rows = np.flatnonzero(bad.any(axis=1))
            if rows.size:
                step = int(r.steps()[rows[0]])
                cols = np.flatnonzero(bad[rows[0]])
                hit = {(r.tensors[c].kind, r.tensors[c].name) for c in cols}
                if best is None or step < best["step"]:
                    best = {"step": step, "tensors": hit}
                elif step == best["step"]:
                    best["tensors"] |= hit
        return best
    finally:
        for r in rs:
            r.close()


def scaled_difference(a_dir, b_dir, step: int, kind: str, tensor: str) -> float:
    """``max|a-b| / max|x|`` of a global tensor at ``step`` between replica 0 of both runs, from full tensors."""
    ra, rb = readers(a_dir)[:1], readers(b_dir)[:1]
    try:
        key = next(t.key for t in ra[0].tensors if (t.kind, t.name, t.micro_step) == (kind, tensor, -1))
        x = ra[0].full(ra[0].column(key), step).astype(np.float64)
        y = rb[0].full(rb[0].column(key), step).astype(np.float64)
        return float(np.abs(x - y).max() / max(np.abs(x).max(), np.abs(y).max()))
    finally:
        for r in ra + rb:
            r.close()
