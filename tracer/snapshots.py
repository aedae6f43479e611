"""Opt-in search for the first divergent full-tensor snapshot (``tracer.bisect --search full``).

The default step scan reads the fingerprints of every step and assumes nothing
about how a divergence evolves. This search reads only full tensors, at the
steps both runs stored them (``/full/steps``), and binary-searches those
snapshots for the first one that differs. That is correct only if **once the
runs differ, they stay different** (a divergence that disappears again can be
missed entirely), which is why it is opt-in and why every report says so. In
exchange it reads about log2(n) of the n common snapshots, and it needs no
fingerprints of the kinds it compares: traces captured with few fingerprint
kinds, or long runs where a bracket is wanted quickly.

The result is a :class:`tracer.compare.Result` with extra keys (``search``,
``bracket``, ``snapshots``, ``assumption``), rendered by the same report code.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from tracer import schema
from tracer.causes import SINGLE_FAULT_NEXT, cause_for_kind, single_fault
from tracer.compare import Comparison, Finding, Result, _label, _range_list, _run_dict
from tracer.envdiff import env_diff
from tracer.errors import TraceMismatchError
from tracer.metrics import Diff, compare_full
from tracer.reader import Run
from tracer.tolerance import Tolerance

SEARCH_NAME = "full-snapshots"
ASSUMPTION = ("binary search over full snapshots assumes that once the runs differ they stay different; a "
              "divergence that disappears between two snapshots read can be missed (the default fingerprint "
              "scan makes no such assumption)")


class SnapshotSearch:
    """Binary search over the full-tensor snapshots both runs stored.

    Args:
        a: Reference run.
        b: Run compared with it.
        tolerance: When a difference counts (any mode but ``noise``).
        strict: Treat different models or step ranges as errors.

    Raises:
        TraceMismatchError: If the runs cannot be compared, or share no
            full-tensor snapshot.
    """

    def __init__(self, a: Run, b: Run, tolerance: Tolerance = Tolerance(), *, strict: bool = False):
        if tolerance.mode == "noise":
            raise ValueError("the full-snapshot search does not take a noise run (--noise); use --auto, --ulp or "
                             "--rtol/--atol")
        # Comparison matches tensors, steps and replica pairs, with the same notes and errors.
        self.cmp = Comparison(a, b, tolerance, strict=strict)
        self.a, self.b, self.tol = a, b, tolerance
        self.pairs = self.cmp.pairs
        self.snapshots_read: List[int] = []
        self._cache: Dict[Tuple[int, bool], Optional[Tuple[int, int, Diff, Any]]] = {}
        common = self.cmp.common_steps
        for pa, pb in self.pairs:
            common = np.intersect1d(common, pa.full_steps())
            common = np.intersect1d(common, pb.full_steps())
        if common.size == 0:
            na, nb = self.a.readers[0].full_steps().size, self.b.readers[0].full_steps().size
            raise TraceMismatchError(
                f"{b.readers[0].path}: no full-tensor snapshot in common with {a.readers[0].path} (A has full "
                f"tensors at {na} steps, B at {nb}). --search full needs full tensors in both runs: capture with "
                f"--capture full --full-every N, or drop --search full to scan the fingerprints")
        self.steps = common.astype(np.int64)

    # ------------------------------------------------------------ compare
    def _tensor_diff(self, pa, pb, j: int, step: int) -> Optional[Diff]:
        """Exact difference of tensor ``j`` at ``step`` for one replica pair; None when not stored in both."""
        fa = pa.full(int(self.cmp.cols_a[j]), step)
        fb = pb.full(int(self.cmp.cols_b[j]), step) if fa is not None else None
        if fa is None or fb is None:
            return None
        return compare_full(fa, fb, self.cmp.specs[j].dtype, rtol=self.tol.rtol)

    def _differs(self, diff: Optional[Diff], j: int, bitwise: bool) -> bool:
        if diff is None or not diff.n_diff:
            return False
        return bitwise or self.tol.judge(diff, self.cmp.specs[j].dtype).beyond

    def _probe(self, i: int, bitwise: bool) -> bool:
        """Whether snapshot ``i`` differs; stops at the first differing tensor (dataflow order)."""
        key = (i, bitwise)
        if key not in self._cache:
            step = int(self.steps[i])
            if step not in self.snapshots_read:
                self.snapshots_read.append(step)
            hit = None
            for j in range(len(self.cmp.specs)):
                for p, (pa, pb) in enumerate(self.pairs):
                    diff = self._tensor_diff(pa, pb, j, step)
                    if self._differs(diff, j, bitwise):
                        hit = (j, p, diff)
                        break
                if hit is not None:
                    break
            self._cache[key] = hit
        return self._cache[key] is not None

    def _search(self, bitwise: bool, hi: Optional[int] = None) -> Optional[int]:
        """Index of the first differing snapshot, assuming differences persist; None if the last is equal.

        ``hi``: a snapshot already known to differ (the search stays at or before it).
        """
        if hi is None:
            hi = self.steps.size - 1
            if not self._probe(hi, bitwise):
                return None
        lo = -1  # invariant: snapshot lo is equal (or lo == -1), snapshot hi differs
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._probe(mid, bitwise):
                hi = mid
            else:
                lo = mid
        return hi

    # ------------------------------------------------------------- locate
    def _finding(self, i: int, bitwise: bool) -> Finding:
        """The origin at snapshot ``i``: every tensor and replica pair, judged from full tensors."""
        step = int(self.steps[i])
        specs = self.cmp.specs
        origin = None
        differing: List[int] = []
        replicas: List[int] = []
        for j, spec in enumerate(specs):
            hit_pairs = []
            for pa, pb in self.pairs:
                diff = self._tensor_diff(pa, pb, j, step)
                if self._differs(diff, j, bitwise):
                    hit_pairs.append((pa, pb, diff))
            if not hit_pairs:
                continue
            differing.append(j)
            if origin is None:
                origin = (j, hit_pairs[0])
                a_side = len(self.a.readers) >= len(self.b.readers)
                replicas = sorted({(pa if a_side else pb).replica for pa, pb, _ in hit_pairs})
        if origin is None:  # cannot happen: _search found this snapshot differing
            raise RuntimeError(f"snapshot at step {step} was found differing but no tensor differs")
        j, (pa, pb, diff) = origin
        spec = specs[j]
        verdict = self.tol.judge(diff, spec.dtype)
        cause, detail = self._cause(j, step, diff)
        next_step = None
        hint = single_fault(kind=spec.kind, n_diff=diff.n_diff, size=diff.size, replicas=replicas,
                            num_replicas=len(self.pairs), first_index=diff.first_index)
        if hint:
            detail, next_step = f"{detail}; {hint}", SINGLE_FAULT_NEXT
        inherited_cols = [c for c in differing if c > j]
        inherited = [{"kind": specs[c].kind, "tensor": specs[c].name, "micro_step": specs[c].micro_step}
                     for c in inherited_cols[:20]]
        return Finding(step=step, kind=spec.kind, tensor=spec.name, micro_step=spec.micro_step,
                       replica=pa.replica, replica_b=pb.replica, replicas=replicas, diff=diff, verdict=verdict,
                       cause=cause, inherited=inherited, n_inherited=len(inherited_cols), detail=detail,
                       next_step=next_step)

    def _cause(self, j: int, step: int, diff: Diff) -> Tuple[str, str]:
        """Cause of the origin tensor ``j``, from full tensors only."""
        spec = self.cmp.specs[j]
        if diff.nonfinite:
            return "nonfinite", f"{_label(spec)} holds a NaN/Inf in one run only at step {step}"
        if spec.kind in schema.GLOBAL_KINDS:
            for name, run, cols in (("A", self.a, self.cmp.cols_a), ("B", self.b, self.cmp.cols_b)):
                odd = self._odd_replicas(run, int(cols[j]), step, spec.dtype)
                if odd:
                    return "replica_desync", (f"inside run {name}, replicas {odd} hold a different {_label(spec)} "
                                              f"than replica {run.readers[0].replica} at step {step}")
        cause = cause_for_kind(spec.kind)
        detail = {"data": "input tensors differ",
                  "numerics": "inputs and weights are equal, the forward/backward pass differs",
                  "allreduce": "local gradients are equal, the reduced gradients differ",
                  "optimizer": "reduced gradients and weights are equal, the update differs"}[cause]
        return cause, f"{detail} (full tensors at the first differing snapshot)"

    def _exact(self, first: Finding, last_equal: Optional[int]) -> bool:
        """Whether the state before ``first.step`` is known equal, so its origin is the true one.

        True for the initial snapshot, and when no traced step lies between the
        last equal snapshot (or the equal initial snapshot) and the first different one.
        """
        if first.snapshot == "initial":
            return True
        steps = self.cmp.common_steps
        if last_equal is not None:
            between = steps[(steps > last_equal) & (steps < first.step)]
        else:
            s0 = self.a.readers[0].initial_step
            if s0 is None or s0 != self.b.readers[0].initial_step:
                return False
            between = steps[(steps >= s0) & (steps < first.step)]
        return between.size == 0

    @staticmethod
    def _odd_replicas(run: Run, col: int, step: int, dtype: str) -> List[int]:
        """Replicas of ``run`` whose full tensor ``col`` at ``step`` differs from the first replica's."""
        ref = run.readers[0].full(col, step)
        if ref is None:
            return []
        odd = []
        for r in run.readers[1:]:
            x = r.full(col, step)
            if x is not None and compare_full(ref, x, dtype).n_diff:
                odd.append(r.replica)
        return odd

    # ---------------------------------------------------------------- run
    def run(self) -> Result:
        """Compare the initial snapshot, then binary-search the common full snapshots."""
        notes = self.cmp.notes
        first_bitwise = first = None
        bracket: List[Optional[int]] = [None, None]
        initial = self.cmp._compare_initial()  # /initial always holds full weights and slots
        if initial is not None:
            first_bitwise = initial
            if initial.verdict.beyond:
                first = initial
                bracket = [None, initial.step]
        idx_beyond = idx_bitwise = None
        if first is None:
            idx_beyond = self._search(bitwise=self.tol.bitwise)
            if idx_beyond is not None:
                first = self._finding(idx_beyond, bitwise=self.tol.bitwise)
                bracket = [int(self.steps[idx_beyond - 1]) if idx_beyond > 0 else None, first.step]
        if first_bitwise is None:
            if self.tol.bitwise:
                first_bitwise, idx_bitwise = first, idx_beyond
            else:
                # A difference beyond tolerance is also a bitwise one: search no further than it.
                idx_bitwise = self._search(bitwise=True, hi=idx_beyond)
                if idx_bitwise is not None:
                    first_bitwise = self._finding(idx_bitwise, bitwise=True)
        exact = first is not None and self._exact(first, bracket[0])
        if first is not None and not exact:
            lo = "the start" if bracket[0] is None else f"step {bracket[0]}"
            first.detail = (f"{first.detail}; the runs may have diverged at any step after {lo} up to step "
                            f"{first.step}, so at this snapshot the difference may be inherited and the cause is "
                            f"that of its first differing tensor; for the exact step, scan the fingerprints "
                            f"(drop --search full) or capture full tensors at every step there")
        n = int(self.steps.size)
        if first is not None and bracket[0] is None and first.snapshot != "initial":
            notes.append(f"the first common full snapshot (step {first.step}) already differs: the divergence "
                         f"is at or before it")
        notes.append("no growth curve with --search full: it reads only log2(n) snapshots")
        steps = dict(self.cmp.steps_info)
        steps.update({"count": n, "first": int(self.steps[0]), "last": int(self.steps[-1])})
        snapshots = {"common": n, "read": len(self.snapshots_read),
                     "log2_common": math.ceil(math.log2(n)) if n > 1 else 0,
                     "steps_read": [int(s) for s in self.snapshots_read]}
        result = _SnapshotResult(
            first=first, first_bitwise=first_bitwise, tolerance=self.tol, steps=steps, divergent_steps=None,
            growth=None, env_diff=env_diff(self.a.attrs, self.b.attrs), notes=self.cmp._notes_now(),
            tensors={"compared": len(self.cmp.keys), **self.cmp.only,
                     "replica_pairs": [[pa.replica, pb.replica] for pa, pb in self.pairs]},
            runs={"a": _run_dict(self.a), "b": _run_dict(self.b), "noise": None})
        result.extra = {"search": SEARCH_NAME, "bracket": bracket if first is not None else None, "exact": exact,
                        "snapshots": snapshots, "assumption": ASSUMPTION,
                        "full_steps": {"a": _range_list(self.a.readers[0].full_steps()),
                                       "b": _range_list(self.b.readers[0].full_steps())}}
        return result


class _SnapshotResult(Result):
    """A :class:`Result` whose dict carries the search's extra keys."""

    extra: Dict[str, Any]

    def to_dict(self) -> Dict[str, Any]:
        d = super().to_dict()
        d.update(self.extra)
        return d
