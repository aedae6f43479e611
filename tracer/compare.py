"""Find where two runs diverge: the step, then the tensor and replica, then how far.

The step scan streams the uint64 hash matrices of both runs in blocks of
``chunk_rows`` steps and compares them with one vectorized ``!=`` per replica
pair, so its memory does not depend on the number of steps. It never assumes
that a divergence persists: every compared step is classified, and the result
says whether the runs agree again at the end.

Inside the first divergent step the matched tensors are ordered by dataflow
(``schema.dataflow_sort_key``); the first differing one is the *origin*, the
rest are *inherited*. Magnitude comes from full tensors when both runs stored
them at that step, else from fingerprint statistics (lower bounds).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from tracer import schema
from tracer.causes import CAUSES, SINGLE_FAULT_NEXT, cause_for_kind, single_fault
from tracer.envdiff import env_diff
from tracer.errors import TraceMismatchError
from tracer.metrics import Diff, compare_full, compare_stats, stats_bounds, ulp_distance_scalar
from tracer.reader import Run, TraceReader
from tracer.tolerance import Tolerance, Verdict

CHUNK_ROWS = 2048
GROWTH_POINTS = 512
"""Growth values kept: consecutive steps are folded (max) into at most this many buckets."""
FULL_GROWTH_MAX_STEPS = 1000
"""Growth is computed from full tensors only when at most this many steps need it."""


@dataclasses.dataclass
class Finding:
    """Where and how far two tensors diverge (one origin, with its context)."""

    step: int
    kind: str
    tensor: str
    micro_step: int
    replica: int
    diff: Diff
    verdict: Verdict
    cause: str
    snapshot: str = "step"
    replicas: List[int] = dataclasses.field(default_factory=list)
    replica_b: Optional[int] = None
    inherited: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    n_inherited: int = 0
    detail: str = ""
    nonfinite_origin: Optional[Dict[str, Any]] = None
    next_step: Optional[str] = None
    """What to try next when the pattern says more than the cause (None: the cause's own advice)."""

    def to_dict(self) -> Dict[str, Any]:
        d = {"step": self.step, "kind": self.kind, "tensor": self.tensor, "micro_step": self.micro_step,
             "replica": self.replica, "replica_b": self.replica_b, "replicas": self.replicas,
             "snapshot": self.snapshot, "origin": True}
        d.update({k: v for k, v in self.diff.to_dict().items()})
        d["verdict"] = {"beyond": self.verdict.beyond, "metric": self.verdict.metric,
                        "value": _plain_num(self.verdict.value), "threshold": _plain_num(self.verdict.threshold),
                        "text": self.verdict.text()}
        d["cause"] = self.cause
        d["detail"] = self.detail
        d["inherited"] = self.inherited
        d["n_inherited"] = self.n_inherited
        d["nonfinite_origin"] = self.nonfinite_origin
        d["next_step"] = self.next_step or CAUSES[self.cause].next_step
        return d


def _plain_num(x):
    if isinstance(x, (int, str)) or x is None:
        return x
    x = float(x)
    if math.isinf(x) or math.isnan(x):
        return str(x)
    return x


@dataclasses.dataclass
class Result:
    """Everything one comparison found; :mod:`tracer.report` renders it."""

    first: Optional[Finding]
    first_bitwise: Optional[Finding]
    tolerance: Tolerance
    steps: Dict[str, Any]
    divergent_steps: Dict[str, Any]
    growth: Optional[Dict[str, Any]]
    env_diff: List[Dict[str, Any]]
    notes: List[str]
    tensors: Dict[str, Any]
    runs: Dict[str, Any]
    first_nonfinite: Optional[Dict[str, Any]] = None

    @property
    def diverged(self) -> bool:
        return self.first is not None

    def to_dict(self) -> Dict[str, Any]:
        cause = self.first.cause if self.first else None
        return {
            "diverged": self.diverged,
            "search": "fingerprints",
            "first_step": self.first.step if self.first else None,
            "first": self.first.to_dict() if self.first else None,
            "first_bitwise": self.first_bitwise.to_dict() if self.first_bitwise else None,
            "cause": cause,
            "explanation": CAUSES[cause].explanation if cause else None,
            "next_step": (self.first.next_step or CAUSES[cause].next_step) if cause else None,
            "tolerance": self.tolerance.to_dict(),
            "env_diff": self.env_diff,
            "steps_compared": self.steps,
            "divergent_steps": self.divergent_steps,
            "growth": self.growth,
            "first_nonfinite": self.first_nonfinite,
            "tensors": self.tensors,
            "runs": self.runs,
            "notes": self.notes,
        }


def _label(spec: schema.TensorSpec) -> str:
    return f"{spec.kind} {spec.label}"


def order_keys(specs: Sequence[schema.TensorSpec], keys) -> List[Tuple[str, str, int]]:
    """``keys`` sorted in dataflow order (position = index inside its kind in ``specs``)."""
    position, counts = {}, {}
    for s in specs:
        position[s.key] = counts.get(s.kind, 0)
        counts[s.kind] = position[s.key] + 1
    by_key = {s.key: s for s in specs}
    return sorted(keys, key=lambda k: schema.dataflow_sort_key(by_key[k], position[k]))


def estimate_reduction_length(specs: Sequence[schema.TensorSpec], num_replicas: int) -> int:
    """K of the auto tolerance: the longest dimension of any tensor times the replica count.

    A proxy for the longest dot product or batch sum behind one value; pass
    ``--reduction-length`` when the real one is known.
    """
    longest = max([max(s.shape) for s in specs if s.shape] or [1])  # a batch of unknown size counts as -1
    return max(1, longest * max(1, num_replicas))


class Comparison:
    """Compare run ``a`` with run ``b`` under ``tolerance``.

    Args:
        a: Reference run.
        b: Run compared with it.
        tolerance: When a difference counts.
        noise: A repeat of run ``a`` (mode ``noise``): its difference from ``a``
            is the noise floor.
        chunk_rows: Steps per block of the scan.
        progress: Show a tqdm bar on stderr.

    Raises:
        TraceMismatchError: If the runs share no tensor or no step, or a
            shared tensor has another shape or dtype.
    """

    def __init__(self, a: Run, b: Run, tolerance: Tolerance = Tolerance(), *, noise: Optional[Run] = None,
                 chunk_rows: int = CHUNK_ROWS, progress: bool = False, strict: bool = False):
        self.a, self.b, self.noise = a, b, noise
        self.tol = tolerance
        self.chunk_rows = chunk_rows
        self.progress = progress
        self.strict = strict
        self.notes: List[str] = list(a.notes) + list(b.notes)
        self._match_tensors()
        self._match_steps()
        self.pairs: List[Tuple[TraceReader, TraceReader]] = [
            (a.readers[i % len(a.readers)], b.readers[i % len(b.readers)])
            for i in range(max(len(a.readers), len(b.readers)))]
        if noise is not None:
            self.noise_pairs = [(a.readers[i % len(a.readers)], noise.readers[i % len(noise.readers)])
                                for i in range(len(self.pairs))]

    def _notes_now(self) -> List[str]:
        """The notes, with what the readers noted while comparing (full tensors they could not use)."""
        late = [n for run in (self.a, self.b) for n in run.notes_now()]
        return self.notes + [n for n in dict.fromkeys(late) if n not in self.notes]

    # ----------------------------------------------------------------- setup
    def _match_tensors(self) -> None:
        a, b = self.a, self.b
        spec_a = {s.key: s for s in a.tensors}
        spec_b = {s.key: s for s in b.tensors}
        allowed = set(schema.KINDS)
        if a.num_replicas != b.num_replicas:
            allowed = set(schema.GLOBAL_KINDS)
            self.notes.append(
                f"runs have different replica counts ({a.num_replicas} vs {b.num_replicas}): only the global "
                f"kinds (allreduced_grad, optimizer_slot, weight) are compared; input, loss and local_grad are "
                f"per-replica and skipped")
        keys_a = {k for k in spec_a if k[0] in allowed}
        keys_b = {k for k in spec_b if k[0] in allowed}
        only_a, only_b = sorted(keys_a - keys_b), sorted(keys_b - keys_a)
        common = keys_a & keys_b
        if not common:
            raise TraceMismatchError(
                f"{b.readers[0].path}: no tensor in common with {a.readers[0].path} (different models?). "
                f"Compare traces of the same model")
        # Per-replica tensors may legitimately change shape between two runs of
        # one model: under gradient accumulation the input is a micro-batch.
        # They are left out with a note; a global tensor of another shape means
        # another model, which stays an error.
        reshaped = sorted(k for k in common if k[0] not in schema.GLOBAL_KINDS
                          and not schema.same_layout(spec_a[k], spec_b[k]))
        compared = common - set(reshaped)
        if only_a or only_b:
            def names(keys):
                shown = ", ".join(_label(spec_a.get(k) or spec_b[k]) for k in keys[:5])
                return shown + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            message = (f"the runs trace different tensors (different models?): only in A: {len(only_a)}"
                       f"{' (' + names(only_a) + ')' if only_a else ''}; only in B: {len(only_b)}"
                       f"{' (' + names(only_b) + ')' if only_b else ''}")
            # The count is of the tensors actually compared: common ones of
            # another shape are not (their own note follows).
            what = (f"the {len(compared)} common tensors" if not reshaped else
                    f"{len(compared)} of the {len(common)} common tensors ({len(reshaped)} of another shape "
                    f"{'is' if len(reshaped) == 1 else 'are'} not)")
            if self.strict:
                raise TraceMismatchError(f"{b.readers[0].path}: {message}. Drop --strict to compare {what}")
            self.notes.append(f"{message}; compared {what}")
        if reshaped:
            common = compared
            shown = "; ".join(f"{_label(spec_a[k])} {list(spec_a[k].shape)} {spec_a[k].dtype} vs "
                              f"{list(spec_b[k].shape)} {spec_b[k].dtype}" for k in reshaped[:3])
            more = f" and {len(reshaped) - 3} more" if len(reshaped) > 3 else ""
            self.notes.append(f"{len(reshaped)} per-replica tensor(s) have another shape or dtype in B (another "
                              f"batch or micro-batch size?) and are not compared: {shown}{more}")
            if not common:
                raise TraceMismatchError(f"{b.readers[0].path}: no tensor of the same shape and dtype in common "
                                         f"with {a.readers[0].path}. Compare traces of the same model")
        for k in order_keys(a.tensors, common):
            sa, sb = spec_a[k], spec_b[k]
            if not schema.same_layout(sa, sb):
                raise TraceMismatchError(
                    f"{b.readers[0].path}: {_label(sb)} has shape {list(sb.shape)} {sb.dtype}, expected "
                    f"{list(sa.shape)} {sa.dtype} as in {a.readers[0].path}. Compare traces of the same model")
        self.keys = order_keys(a.tensors, common)
        # A batch of unknown size in either run: its size is unknown (-1) when the l2 bound is taken.
        self.specs = [spec_b[k] if spec_b[k].dynamic else spec_a[k] for k in self.keys]
        self.cols_a = np.array([a.readers[0].column(k) for k in self.keys], dtype=np.int64)
        self.cols_b = np.array([b.readers[0].column(k) for k in self.keys], dtype=np.int64)
        self.sizes = np.array([s.size for s in self.specs], dtype=np.float64)  # stats_bounds reads -1 as unknown
        self.dtypes = [s.dtype for s in self.specs]
        self.weight_cols = np.array([i for i, s in enumerate(self.specs) if s.kind == "weight"], dtype=np.int64)
        self.only = {"only_in_a": [_key_dict(k) for k in only_a], "only_in_b": [_key_dict(k) for k in only_b]}
        if self.noise is not None:
            self.cols_n = np.array([self.noise.readers[0].column(k) if self.noise.readers[0].column(k) is not None
                                    else -1 for k in self.keys], dtype=np.int64)

    def _match_steps(self) -> None:
        sa, sb = self.a.steps, self.b.steps
        steps, ia, ib = np.intersect1d(sa, sb, assume_unique=True, return_indices=True)
        if self.noise is not None:
            steps, i_common, i_n = np.intersect1d(steps, self.noise.steps, assume_unique=True, return_indices=True)
            ia, ib, self.idx_n = ia[i_common], ib[i_common], i_n
        if steps.size == 0:
            skips = [f"; {name} skipped every update it tried ({_skips(k)})" for name, run, have in
                     (("A", self.a, sa), ("B", self.b, sb)) if not have.size
                     for k in [run.readers[0].skipped_steps()] if k.size]
            raise TraceMismatchError(
                f"{self.b.readers[0].path}: no step in common with {self.a.readers[0].path} "
                f"(A has {_range(sa)}, B has {_range(sb)}{''.join(skips)}). Compare runs that overlap in steps")
        self.idx_a, self.idx_b, self.common_steps = ia, ib, steps
        partial = steps.size != sa.size or steps.size != sb.size
        if partial:
            message = (f"the runs cover different steps (A: {_range(sa)}, B: {_range(sb)}); compared the "
                       f"{steps.size} steps both have ({_range(steps)})")
            if self.strict:
                raise TraceMismatchError(f"{self.b.readers[0].path}: {message}. Drop --strict to compare them")
            self.notes.append(message)
        self.steps_info = {"count": int(steps.size), "first": int(steps[0]), "last": int(steps[-1]),
                           "a": _range_list(sa), "b": _range_list(sb), "overlap_only": bool(partial)}
        skipped_a, skipped_b = self.a.readers[0].skipped_steps(), self.b.readers[0].skipped_steps()
        if not np.array_equal(skipped_a, skipped_b):
            # A skipped update consumed a batch without a row: from there on, the same optimizer step
            # of the two runs saw different batches (the first difference is then `data`).
            self.notes.append(
                f"the runs skipped different updates (the optimizer did not step, as LossScaleOptimizer does "
                f"when the gradients are not finite): A at {_skips(skipped_a)}, B at {_skips(skipped_b)}. Rows "
                f"are numbered by optimizer step, so after the first skip only one run made, the runs' "
                f"steps of the same number consumed different batches")

    # ------------------------------------------------------------------ reads
    def _block(self, reader: TraceReader, stat: str, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return reader.fingerprint_rows(stat, rows, cols)

    def _stats(self, reader: TraceReader, rows, cols) -> Dict[str, np.ndarray]:
        return {s: self._block(reader, s, rows, cols) for s in ("l2", "max_abs", "nan", "inf")}

    # ------------------------------------------------------------------- scan
    def run(self) -> Result:
        """Scan, locate and measure. Returns the :class:`Result`."""
        first_bitwise = first_beyond = None
        initial = self._compare_initial()
        if initial is not None:
            first_bitwise = initial
            if initial.verdict.beyond:
                first_beyond = initial
        m = self.common_steps.size
        n_div = 0
        first_div_step = last_div_step = None
        last_equal = True
        growth_acc = _Growth(self.common_steps, GROWTH_POINTS)
        starts = range(0, m, self.chunk_rows)
        bar = None
        if self.progress:
            from tqdm import tqdm  # local: only for interactive scans
            bar = tqdm(total=m, unit="step", desc="tracer: scanning", file=sys.stderr, leave=False)
        try:
            for k0 in starts:
                k1 = min(k0 + self.chunk_rows, m)
                ra, rb = self.idx_a[k0:k1], self.idx_b[k0:k1]
                ne_pairs = [self._block(pa, "hash", ra, self.cols_a) != self._block(pb, "hash", rb, self.cols_b)
                            for pa, pb in self.pairs]
                row_ne = np.zeros(k1 - k0, dtype=bool)
                for ne in ne_pairs:
                    row_ne |= ne.any(axis=1)
                if bar is not None:
                    bar.update(k1 - k0)
                if not row_ne.any():
                    last_equal = True
                    continue
                hits = np.flatnonzero(row_ne)
                n_div += int(hits.size)
                if first_div_step is None:
                    first_div_step = int(self.common_steps[k0 + hits[0]])
                last_div_step = int(self.common_steps[k0 + hits[-1]])
                last_equal = not row_ne[-1]
                if first_bitwise is None:
                    first_bitwise = self._locate(k0 + int(hits[0]), bitwise=True)
                if first_beyond is None and self.tol.bitwise:
                    first_beyond = first_bitwise
                pa, pb = self.pairs[0]
                if self.weight_cols.size:
                    # Weights are global: replica pair 0 speaks for all; read their columns only.
                    wa, wb = self.cols_a[self.weight_cols], self.cols_b[self.weight_cols]
                    _, rel = stats_bounds(self._block(pa, "l2", ra, wa), self._block(pb, "l2", rb, wb),
                                          self._block(pa, "max_abs", ra, wa), self._block(pb, "max_abs", rb, wb),
                                          self.sizes[self.weight_cols])
                    growth_acc.add(k0, rel.max(axis=1), row_ne)
                if first_beyond is None:
                    stats_a, stats_b = self._stats(pa, ra, self.cols_a), self._stats(pb, rb, self.cols_b)
                    first_beyond = self._first_beyond_in_chunk(k0, k1, ra, rb, ne_pairs, stats_a, stats_b)
                del ne_pairs
        finally:
            if bar is not None:
                bar.close()
        growth = growth_acc.result(first_div_step) if self.weight_cols.size and first_div_step is not None else None
        if growth is not None:
            growth = self._full_growth(first_div_step) or growth
        elif first_div_step is not None and not self.weight_cols.size:
            self.notes.append("no weights compared, so no growth curve")
        divergent = {"count": n_div, "first": first_div_step, "last": last_div_step,
                     "reconverged": bool(n_div and last_equal)}
        if n_div and last_equal:
            self.notes.append(f"the runs differ at {n_div} of {m} steps but agree again from after step "
                              f"{last_div_step} to the end")
        # Where the first NaN/Inf appeared is worth saying even when the divergence
        # started earlier with a finite change (a learning-rate spike).
        nonfinite = self._first_nonfinite() if first_bitwise is not None else None
        return Result(first=first_beyond, first_bitwise=first_bitwise, tolerance=self.tol, steps=self.steps_info,
                      divergent_steps=divergent, growth=growth, first_nonfinite=nonfinite,
                      env_diff=env_diff(self.a.attrs, self.b.attrs), notes=self._notes_now(),
                      tensors={"compared": len(self.keys), **self.only,
                               "replica_pairs": [[pa.replica, pb.replica] for pa, pb in self.pairs]},
                      runs={"a": _run_dict(self.a), "b": _run_dict(self.b),
                            "noise": _run_dict(self.noise) if self.noise is not None else None})

    def _first_beyond_in_chunk(self, k0, k1, ra, rb, ne_pairs, stats_a, stats_b) -> Optional[Finding]:
        """First step of this block with a difference beyond tolerance (fingerprints, then full tensors)."""
        beyond_rows = np.zeros(k1 - k0, dtype=bool)
        for p, (pa, pb) in enumerate(self.pairs):
            if p:
                stats_a, stats_b = self._stats(pa, ra, self.cols_a), self._stats(pb, rb, self.cols_b)
            noise = self._noise_block(p, k0, k1, stats_a) if self.noise is not None else None
            beyond = self._beyond_stats(ne_pairs[p], stats_a, stats_b, noise)
            beyond_rows |= beyond.any(axis=1)
        any_ne = np.zeros(k1 - k0, dtype=bool)
        for ne in ne_pairs:
            any_ne |= ne.any(axis=1)
        # Rows the statistics cannot condemn may still exceed the tolerance
        # element-wise: check them against full tensors where both runs have them.
        steps = self.common_steps[k0:k1]
        full_ok = np.ones(k1 - k0, dtype=bool)
        for pa, pb in self.pairs:
            full_ok &= np.isin(steps, pa.full_steps()) & np.isin(steps, pb.full_steps())
        candidates = np.flatnonzero(beyond_rows | (any_ne & full_ok))
        for r in candidates:
            found = self._locate(k0 + int(r), bitwise=False)
            if found is not None:
                return found
        return None

    def _beyond_stats(self, ne, sa, sb, noise) -> np.ndarray:
        lb_abs, lb_rel = stats_bounds(sa["l2"], sb["l2"], sa["max_abs"], sb["max_abs"], self.sizes[None, :])
        lb_ulp = np.zeros_like(lb_abs)
        if self.tol.mode == "ulp":
            for dtype in set(self.dtypes):
                cols = np.array([i for i, d in enumerate(self.dtypes) if d == dtype])
                lb_ulp[:, cols] = ulp_distance_scalar(sa["max_abs"][:, cols], sb["max_abs"][:, cols], dtype)
        nonfinite = (sa["nan"] != sb["nan"]) | (sa["inf"] != sb["inf"])
        scale = np.maximum(sa["max_abs"], sb["max_abs"])
        return self.tol.beyond_matrix(ne, lb_abs, lb_rel, lb_ulp, scale, nonfinite, self.dtypes, noise)

    def _noise_block(self, p: int, k0: int, k1: int, stats_a) -> np.ndarray:
        """Per cell max_rel (lower bound) between run A and its repeat; -1 where bitwise equal."""
        pa, pn = self.noise_pairs[p]
        ra, rn = self.idx_a[k0:k1], self.idx_n[k0:k1]
        present = self.cols_n >= 0
        cols_n = np.where(present, self.cols_n, 0)
        hn = self._block(pn, "hash", rn, cols_n)
        ha = self._block(pa, "hash", ra, self.cols_a)
        sn = self._stats(pn, rn, cols_n)
        _, rel = stats_bounds(stats_a["l2"], sn["l2"], stats_a["max_abs"], sn["max_abs"], self.sizes[None, :])
        out = np.where(ha == hn, -1.0, rel)
        out[:, ~present] = -1.0
        return out

    def _first_nonfinite(self) -> Dict[str, Optional[Dict[str, Any]]]:
        """Per run, the first step holding a NaN/Inf in a compared tensor, and the first such tensor in dataflow order."""
        out: Dict[str, Optional[Dict[str, Any]]] = {}
        m = self.common_steps.size
        for name, run, idx, cols in (("a", self.a, self.idx_a, self.cols_a), ("b", self.b, self.idx_b, self.cols_b)):
            found = None
            for k0 in range(0, m, self.chunk_rows):
                rows = idx[k0:min(k0 + self.chunk_rows, m)]
                best = None
                for reader in run.readers:
                    nan, inf = self._block(reader, "nan", rows, cols), self._block(reader, "inf", rows, cols)
                    hits = np.argwhere((nan > 0) | (inf > 0))  # row-major: earliest step, then dataflow order
                    if hits.size and (best is None or tuple(hits[0]) < best[:2]):
                        r, c = (int(x) for x in hits[0])
                        best = (r, c, reader.replica, int(nan[r, c]), int(inf[r, c]))
                if best is not None:
                    r, c, replica, n_nan, n_inf = best
                    spec = self.specs[c]
                    found = {"step": int(self.common_steps[k0 + r]), "kind": spec.kind, "tensor": spec.name,
                             "micro_step": spec.micro_step, "replica": replica, "nan": n_nan, "inf": n_inf}
                    break
            out[name] = found
        return out if any(out.values()) else None

    # ----------------------------------------------------------------- locate
    def _compare_initial(self) -> Optional[Finding]:
        """Finding for the state before the first update, or None if equal or not recorded."""
        ra0, rb0 = self.a.readers[0], self.b.readers[0]
        if ra0.initial_step is None or rb0.initial_step is None:
            self.notes.append("a run has no /initial snapshot: weights before the first update not compared")
            return None
        if ra0.initial_step != rb0.initial_step:
            self.notes.append(f"the runs start at different steps ({ra0.initial_step} vs {rb0.initial_step}); "
                              f"initial snapshots not compared")
            return None
        best = None
        for pa, pb in self.pairs:
            ia = {pa.tensors[c].key: j for j, c in enumerate(pa.initial_columns)}
            ib = {pb.tensors[c].key: j for j, c in enumerate(pb.initial_columns)}
            ha, hb = pa.initial_fingerprints("hash"), pb.initial_fingerprints("hash")
            if ha.shape[0] == 0 or hb.shape[0] == 0:
                continue
            for pos, k in enumerate(self.keys):
                if k in ia and k in ib and ha[0, ia[k]] != hb[0, ib[k]]:
                    if best is None or pos < best[0]:
                        best = (pos, pa, pb, ia[k], ib[k])
                    break
        if best is None:
            return None
        pos, pa, pb, ja, jb = best
        spec = self.specs[pos]
        step = ra0.initial_step
        diff = None
        fa = pa.full(pa.initial_columns[ja], step, schema.INITIAL)
        fb = pb.full(pb.initial_columns[jb], step, schema.INITIAL)
        if fa is not None and fb is not None:
            diff = compare_full(fa, fb, spec.dtype, rtol=self.tol.rtol)
        else:
            sa = {s: pa.initial_fingerprints(s)[0, ja] for s in ("l2", "max_abs", "nan", "inf")}
            sb = {s: pb.initial_fingerprints(s)[0, jb] for s in ("l2", "max_abs", "nan", "inf")}
            diff = compare_stats(sa, sb, spec.size, spec.dtype, rtol=self.tol.rtol)
        verdict = self.tol.judge(diff, spec.dtype)
        replicas = [qa.replica for qa, qb in self.pairs
                    if self._initial_hash(qa, spec.key) != self._initial_hash(qb, spec.key)]
        return Finding(step=step, kind=spec.kind, tensor=spec.name, micro_step=spec.micro_step,
                       replica=pa.replica, replica_b=pb.replica, replicas=replicas, diff=diff, verdict=verdict,
                       cause="init", snapshot="initial",
                       detail=f"{_label(spec)} differs before the first update (initial snapshot of step {step})",
                       next_step=INIT_SLOT_NEXT if spec.kind == "optimizer_slot" else None)

    @staticmethod
    def _initial_hash(reader: TraceReader, key):
        cols = {reader.tensors[c].key: j for j, c in enumerate(reader.initial_columns)}
        if key not in cols:
            return None
        h = reader.initial_fingerprints("hash")
        return int(h[0, cols[key]]) if h.shape[0] else None

    def _locate(self, k: int, *, bitwise: bool) -> Optional[Finding]:
        """The origin at matched step index ``k``: first differing (or beyond-tolerance) tensor in dataflow order."""
        step = int(self.common_steps[k])
        row_a, row_b = self.idx_a[k:k + 1], self.idx_b[k:k + 1]
        per_pair = []
        for p, (pa, pb) in enumerate(self.pairs):
            ha = self._block(pa, "hash", row_a, self.cols_a)[0]
            hb = self._block(pb, "hash", row_b, self.cols_b)[0]
            sa = {s: v[0] for s, v in self._stats(pa, row_a, self.cols_a).items()}
            sb = {s: v[0] for s, v in self._stats(pb, row_b, self.cols_b).items()}
            noise = None
            if self.noise is not None:
                noise = self._noise_block(p, k, k + 1, {s: v[None, :] for s, v in sa.items()})[0]
            per_pair.append((pa, pb, ha != hb, sa, sb, noise))
        diff_cols = sorted({int(j) for _, _, ne, *_ in per_pair for j in np.flatnonzero(ne)})
        origin = None
        for j in diff_cols:
            spec = self.specs[j]
            for pa, pb, ne, sa, sb, noise in per_pair:
                if not ne[j]:
                    continue
                diff = self._diff(pa, pb, j, step, sa, sb)
                # For the first bitwise difference the verdict still says how it
                # fares against the active tolerance.
                verdict = self.tol.judge(diff, spec.dtype, None if noise is None else float(noise[j]))
                if bitwise or verdict.beyond:
                    origin = (j, pa, pb, diff, verdict)
                    break
            if origin is not None:
                break
        if origin is None:
            return None
        j, pa, pb, diff, verdict = origin
        spec = self.specs[j]
        # Deduplicated: with different replica counts one replica of A is in several pairs.
        replicas = sorted({x[0].replica if len(self.a.readers) >= len(self.b.readers) else x[1].replica
                           for x in per_pair if x[2][j]})
        inherited_cols = [c for c in diff_cols if c > j]
        inherited = [{"kind": self.specs[c].kind, "tensor": self.specs[c].name,
                      "micro_step": self.specs[c].micro_step} for c in inherited_cols[:20]]
        cause, detail, nonfinite_origin = self._cause(spec, j, k, per_pair, diff)
        next_step = None
        hint = single_fault(kind=spec.kind, n_diff=diff.n_diff, size=diff.size, replicas=replicas,
                            num_replicas=len(self.pairs), first_index=diff.first_index)
        if hint:
            detail, next_step = f"{detail}; {hint}", SINGLE_FAULT_NEXT
        if not bitwise and not self.tol.bitwise:
            earlier = [c for c in diff_cols if c < j]
            if earlier:
                detail += (f"; {len(earlier)} earlier tensor(s) differ within tolerance, first "
                           f"{_label(self.specs[earlier[0]])}")
        return Finding(step=step, kind=spec.kind, tensor=spec.name, micro_step=spec.micro_step,
                       replica=pa.replica, replica_b=pb.replica, replicas=replicas, diff=diff, verdict=verdict,
                       cause=cause, inherited=inherited, n_inherited=len(inherited_cols), detail=detail,
                       nonfinite_origin=nonfinite_origin, next_step=next_step)

    def _diff(self, pa: TraceReader, pb: TraceReader, j: int, step: int, sa, sb) -> Diff:
        spec = self.specs[j]
        fa = pa.full(int(self.cols_a[j]), step)
        fb = pb.full(int(self.cols_b[j]), step) if fa is not None else None
        if fa is not None and fb is not None:
            return compare_full(fa, fb, spec.dtype, rtol=self.tol.rtol)
        return compare_stats({s: sa[s][j] for s in sa}, {s: sb[s][j] for s in sb}, spec.size, spec.dtype,
                             rtol=self.tol.rtol)

    def _cause(self, spec, j, k, per_pair, diff) -> Tuple[str, str, Optional[Dict[str, Any]]]:
        step = int(self.common_steps[k])
        # Non-finite values: the first tensor, in dataflow order, holding a NaN or Inf in either run.
        nonfinite_origin = None
        for run_name, side in (("A", 3), ("B", 4)):
            for x in per_pair:
                counts = x[side]["nan"] + x[side]["inf"]
                hit = np.flatnonzero(counts > 0)
                if hit.size and (nonfinite_origin is None or hit[0] < nonfinite_origin["_pos"]):
                    c = int(hit[0])
                    nonfinite_origin = {"_pos": c, "run": run_name, "kind": self.specs[c].kind,
                                        "tensor": self.specs[c].name, "replica": x[0 if side == 3 else 1].replica,
                                        "nan": int(x[side]["nan"][c]), "inf": int(x[side]["inf"][c])}
        if nonfinite_origin is not None:
            nonfinite_origin.pop("_pos")
        if diff.nonfinite or (nonfinite_origin is not None and
                              (nonfinite_origin["kind"], nonfinite_origin["tensor"]) == (spec.kind, spec.name)):
            where = nonfinite_origin or {}
            return "nonfinite", (f"first NaN/Inf at step {step} in run {where.get('run', '?')}: "
                                 f"{where.get('kind', spec.kind)} {where.get('tensor', spec.name)} on replica "
                                 f"{where.get('replica', '?')} (nan={where.get('nan', '?')}, "
                                 f"inf={where.get('inf', '?')})"), nonfinite_origin
        if spec.kind in schema.GLOBAL_KINDS:
            for name, run, idx in (("A", self.a, self.idx_a), ("B", self.b, self.idx_b)):
                col = run.readers[0].column(spec.key)
                hashes = {r.replica: int(r.fingerprint_rows("hash", idx[k:k + 1])[0, col]) for r in run.readers}
                if len(set(hashes.values())) > 1:
                    ref = hashes[run.readers[0].replica]
                    odd = [r for r, h in hashes.items() if h != ref]
                    return "replica_desync", (f"inside run {name}, replicas {odd} hold a different {spec.kind} "
                                              f"{spec.label} than replica {run.readers[0].replica} at step "
                                              f"{step}"), nonfinite_origin
        cause = cause_for_kind(spec.kind)
        detail = {"data": "input fingerprints differ",
                  "numerics": "inputs and weights are equal, the forward/backward pass differs",
                  "allreduce": "local gradients are equal, the reduced gradients differ",
                  "optimizer": "reduced gradients and weights are equal, the update differs"}[cause]
        if cause == "allreduce" and self.a.num_replicas != self.b.num_replicas:
            detail = (f"reduced gradients differ between {self.a.num_replicas} and {self.b.num_replicas} "
                      f"replicas (local gradients not comparable)")
        return cause, detail, nonfinite_origin

    # ----------------------------------------------------------------- growth
    def _full_growth(self, first_step: int) -> Optional[Dict[str, Any]]:
        """Exact growth from full weights, when both runs stored them at every step from ``first_step`` on."""
        pa, pb = self.pairs[0]
        window = self.common_steps[self.common_steps >= first_step]
        if window.size == 0 or window.size > FULL_GROWTH_MAX_STEPS:
            return None
        if not (np.isin(window, pa.full_steps()).all() and np.isin(window, pb.full_steps()).all()):
            return None
        values = []
        for step in window:
            worst = 0.0
            for j in self.weight_cols:
                fa, fb = pa.full(int(self.cols_a[j]), int(step)), pb.full(int(self.cols_b[j]), int(step))
                if fa is None or fb is None:
                    return None
                d = compare_full(fa, fb, self.specs[j].dtype)
                if d.n_diff:
                    scale = max(float(np.max(np.abs(fa.astype(np.float64)))) if fa.size else 0.0,
                                float(np.max(np.abs(fb.astype(np.float64)))) if fb.size else 0.0)
                    worst = max(worst, d.max_abs / scale if scale > 0 else math.inf)
            values.append(worst)
        return {"source": "full", "metric": "max over weights of max|a-b| / max|w|",
                "steps": [int(s) for s in window], "values": [_plain_num(v) for v in values], "bucket": 1}


class _Growth:
    """Per-step growth values folded (max) into a fixed number of buckets: memory independent of steps."""

    def __init__(self, steps: np.ndarray, points: int):
        self.steps = steps
        self.bucket = max(1, -(-steps.size // points))
        n = -(-steps.size // self.bucket)
        self.values = np.full(n, -1.0)

    def add(self, k0: int, rel: np.ndarray, row_ne: np.ndarray) -> None:
        rel = np.where(row_ne, rel, 0.0)
        idx = (k0 + np.arange(rel.size)) // self.bucket
        np.maximum.at(self.values, idx, rel)

    def result(self, first_step: int) -> Dict[str, Any]:
        first_k = int(np.searchsorted(self.steps, first_step))
        b0 = first_k // self.bucket
        starts = self.steps[np.arange(b0, self.values.size) * self.bucket]
        vals = np.maximum(self.values[b0:], 0.0)
        return {"source": "stats",
                "metric": "max over weights of max|a-b| / max|w|, lower bound from fingerprint statistics "
                          "(full tensors would give exact values)",
                "steps": [int(s) for s in starts], "values": [_plain_num(v) for v in vals],
                "bucket": self.bucket}


def _key_dict(k) -> Dict[str, Any]:
    return {"kind": k[0], "tensor": k[1], "micro_step": k[2]}


INIT_SLOT_NEXT = ("An optimizer variable, not a weight, differs before the first update (a loss scale, a slot "
                  "restored from a checkpoint): compare the optimizer's configuration in the environment diff and "
                  "where its state came from.")


def _skips(steps: np.ndarray) -> str:
    """``[0, 0, 3]`` as "steps 0 (2x), 3"; "no step" when empty."""
    if not steps.size:
        return "no step"
    values, counts = np.unique(steps, return_counts=True)
    shown = [f"{v} ({c}x)" if c > 1 else f"{v}" for v, c in zip(values[:8].tolist(), counts[:8].tolist())]
    more = f" and {values.size - 8} more" if values.size > 8 else ""
    return ("step " if values.size == 1 else "steps ") + ", ".join(shown) + more


def _range(steps: np.ndarray) -> str:
    return f"steps {int(steps[0])}..{int(steps[-1])}" if steps.size else "no steps"


def _range_list(steps: np.ndarray):
    return [int(steps[0]), int(steps[-1])] if steps.size else None


def _run_dict(run: Run) -> Dict[str, Any]:
    return {"path": run.path, "replicas": run.replicas, "num_replicas": run.num_replicas,
            "steps": int(run.n_rows), "run_id": run.readers[0].run_id}
