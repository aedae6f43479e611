"""Segments: one replica's trace continued over several files by a job resumed from a checkpoint.

A job that restarts from a checkpoint never writes into the file an earlier
process left behind (a killed SWMR writer leaves its "open for write" flag set,
and HDF5 will not open such a file for writing again). It writes a new segment
instead, ``replica-<g>.seg<k>.h5`` with k = 1, 2, ..., whose ``/initial`` is the
restored state at the restored optimizer step.

The capture side picks the file with :func:`segment_path`; the analyzer joins
a replica's segments with :class:`JoinedReader`:

* segments are taken in k order; segment k replaces every row of the earlier
  segments from its start step (its ``/initial`` step) on, because a job
  restored from an older checkpoint redid those steps: rows from the abandoned
  history are dropped, so no step appears twice;
* steps that no segment holds (written after the last flush of a killed
  process but before the checkpoint the job was restored from, which
  ``launch/train.py`` prevents by flushing first) are a gap, reported in a note
  and never filled in.

Imports no TensorFlow: the capture side calls :func:`segment_path`, the reader
uses the rest.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from tracer import schema
from tracer.errors import CaptureError, TraceFormatError

# Differ between the processes of one resumed job by design; the environment
# note about segments skips them.
_RESTART_ATTRS = frozenset({schema.ATTR_INITIAL_STEP, "command_line", "run.command_line", "run.steps"})


def find_segments(run_dir: str) -> Dict[int, List[Tuple[int, str]]]:
    """Trace files of a run directory: ``{replica: [(segment, path), ...]}``, segments sorted."""
    found: Dict[int, List[Tuple[int, str]]] = {}
    for name in os.listdir(run_dir):
        m = schema.TRACE_FILE_REGEX.match(name)
        if m:
            k = int(m.group(2)) if m.group(2) is not None else 0
            found.setdefault(int(m.group(1)), []).append((k, os.path.join(run_dir, name)))
    return {g: sorted(files) for g, files in sorted(found.items())}


def segment_path(trace_dir: str, replica: int, step: int, *, tensors: Sequence[schema.TensorSpec],
                 num_replicas: int) -> Tuple[str, int, Optional[str]]:
    """The file a writer whose first update is ``step`` must create, its segment index, and its run id.

    * ``step == 0`` (a fresh run): ``replica-<g>.h5``, replacing what the
      directory held for this replica (its old segments are removed);
    * ``step > 0`` (restored from a checkpoint) and the directory already has
      this replica's trace: the next segment ``replica-<g>.seg<k>.h5``;
    * ``step > 0`` into an empty directory: ``replica-<g>.h5`` starting at ``step``.

    The run id is the earlier segment's for a continued trace (None otherwise):
    a job's run id is derived from its cluster, whose ports change when a
    multi-worker job is started again, so the segments of one run keep the
    first one's.

    Raises:
        CaptureError: If the earlier segment is not a trace of this job (another
            tensor table or replica count) or cannot be read.
    """
    existing = find_segments(trace_dir).get(replica, []) if os.path.isdir(trace_dir) else []
    base = os.path.join(trace_dir, schema.replica_file_name(replica))
    if step == 0:
        for k, path in existing:
            if k > 0:
                os.remove(path)
        return base, 0, None
    if not existing:
        return base, 0, None
    k_last, last = existing[-1]
    from tracer.reader import TraceReader  # deferred: tracer.reader imports this module

    try:
        with TraceReader(last) as r:
            same = r.tensors == list(tensors) and r.num_replicas == num_replicas
            run_id = r.run_id or None
    except TraceFormatError as exc:
        raise CaptureError(f"resuming at step {step}: the earlier trace segment cannot be read ({exc}); "
                           f"pass a new trace directory") from exc
    if not same:
        raise CaptureError(f"resuming at step {step}: {last} is the trace of another run (other tensor table or "
                           f"replica count), so this job cannot continue it. Pass a new trace directory, or "
                           f"remove the old files")
    return os.path.join(trace_dir, schema.replica_file_name(replica, k_last + 1)), k_last + 1, run_id


class _Piece:
    """The rows one segment contributes to the joined trace."""

    def __init__(self, k: int, reader, start: int):
        self.k, self.reader, self.start = k, reader, start
        self.n = reader.n_steps  # rows kept; cut when a later segment restarts earlier


class JoinedReader:
    """One replica's segments, read as one trace (the interface of :class:`tracer.reader.TraceReader`).

    Args:
        segments: ``[(k, TraceReader), ...]`` of one replica, sorted by k. The
            readers are owned (closed) by this object.

    Attributes:
        events: What the join did, as tuples for :class:`tracer.reader.Run` to
            word once for all replicas: ``("joined", ks, starts)``, ``("replaced", k, first, last, rows)``,
            ``("gap", k, first, last)``, ``("empty", k, start)``,
            ``("missing", ks)``, ``("restore", k, step, names)``, ``("env", k, keys)``.
    """

    def __init__(self, segments: Sequence[Tuple[int, Any]]):
        self.segments = list(segments)
        self.events: List[tuple] = []
        try:
            self._join()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ join
    def _join(self) -> None:
        first = self.segments[0][1]
        for _, r in self.segments[1:]:
            for what, mine, theirs in (("replica", r.replica, first.replica),
                                       ("num_replicas", r.num_replicas, first.num_replicas),
                                       ("run_id", r.run_id, first.run_id)):
                if mine != theirs:
                    raise TraceFormatError(f"{r.path}: {what} is {mine!r} but {first.path} has {theirs!r}; the "
                                           f"segments of one replica must come from one job")
            if r.tensors != first.tensors or r.initial_columns != first.initial_columns:
                raise TraceFormatError(f"{r.path}: tensor table differs from {first.path}; the segments of one "
                                       f"replica must come from one job")
        ks = [k for k, _ in self.segments]
        missing = sorted(set(range(max(ks) + 1)) - set(ks))
        if missing:
            self.events.append(("missing", tuple(missing)))
        pieces: List[_Piece] = []
        for k, r in self.segments:
            start = r.initial_step
            if start is None:
                start = int(r.steps(0, 1)[0]) if r.n_steps else None
            if start is None:
                self.events.append(("empty", k, None))
                continue
            replaced = 0
            lo = hi = None
            while pieces and pieces[-1].start >= start:
                p = pieces.pop()
                if p.n:
                    s = p.reader.steps(0, p.n)
                    lo, hi = int(s[0]), max(hi if hi is not None else -1, int(s[-1]))
                    replaced += p.n
            if pieces and pieces[-1].n:
                p = pieces[-1]
                s = p.reader.steps(0, p.n)
                cut = int(np.searchsorted(s, start, side="left"))
                if cut < p.n:
                    lo, hi = int(s[cut]), max(hi if hi is not None else -1, int(s[-1]))
                    replaced += p.n - cut
                    p.n = cut
            if replaced:
                self.events.append(("replaced", k, lo, hi, replaced))
            if not r.n_steps:
                self.events.append(("empty", k, start))
            if pieces:
                self._check_restore(pieces[-1], k, r, start)
            pieces.append(_Piece(k, r, start))
        if not pieces:
            pieces = [_Piece(self.segments[0][0], first, 0)]
        self.events.insert(0, ("joined", tuple(p.k for p in pieces), tuple(p.start for p in pieces)))
        self._pieces = pieces
        parts = [p.reader.steps(0, p.n) for p in pieces]
        self._steps = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        self._piece_of_row = np.concatenate([np.full(p.n, i, dtype=np.int64) for i, p in enumerate(pieces)])
        self._local_row = np.concatenate([np.arange(p.n, dtype=np.int64) for p in pieces])
        if np.any(np.diff(self._steps) <= 0):
            raise TraceFormatError(f"{pieces[-1].reader.path}: joined steps of replica {first.replica} are not "
                                   f"strictly increasing")
        for i in np.nonzero(np.diff(self._steps) > 1)[0]:
            a, b = pieces[self._piece_of_row[i]], pieces[self._piece_of_row[i + 1]]
            if a is not b:
                self.events.append(("gap", b.k, int(self._steps[i]) + 1, int(self._steps[i + 1]) - 1))
        from tracer.envdiff import env_diff

        for p in pieces[1:]:
            keys = [d["key"] for d in env_diff(pieces[0].reader.attrs, p.reader.attrs)
                    if d["key"] not in _RESTART_ATTRS]
            if keys:
                self.events.append(("env", p.k, tuple(keys)))

    def _check_restore(self, prev: _Piece, k: int, r, start: int) -> None:
        """Note when the restored state differs from what the earlier segment recorded after step ``start - 1``."""
        if not prev.n or r.initial_step is None or not r.initial_columns:
            return
        last = prev.reader.steps(prev.n - 1, prev.n)
        if int(last[0]) != start - 1:
            return
        cols = np.asarray(r.initial_columns, dtype=np.int64)
        recorded = prev.reader.fingerprint_rows("hash", np.array([prev.n - 1]), cols)[0]
        restored = r.initial_fingerprints("hash")[0]
        differ = np.nonzero(recorded != restored)[0]
        if differ.size:
            names = tuple(r.tensors[int(cols[j])].name for j in differ)
            self.events.append(("restore", k, start, names))

    # ------------------------------------------------------------ properties
    @property
    def _head(self):
        return self._pieces[0].reader

    @property
    def path(self) -> str:
        """The latest segment's file (the one whose state ``complete`` describes)."""
        return self.segments[-1][1].path

    @property
    def paths(self) -> List[str]:
        return [r.path for _, r in self.segments]

    @property
    def attrs(self) -> Dict[str, Any]:
        """Root attributes of the first segment (the run's start); ``complete`` of the latest."""
        return {**self._head.attrs, schema.ATTR_COMPLETE: self.segments[-1][1].attrs.get(schema.ATTR_COMPLETE, 0)}

    @property
    def tensors(self) -> List[schema.TensorSpec]:
        return self._head.tensors

    @property
    def config(self):
        return self._head.config

    @property
    def initial_columns(self) -> List[int]:
        return self._head.initial_columns

    @property
    def replica(self) -> int:
        return self._head.replica

    @property
    def num_replicas(self) -> int:
        return self._head.num_replicas

    @property
    def run_id(self) -> str:
        return self._head.run_id

    @property
    def complete(self) -> bool:
        return self.segments[-1][1].complete

    @property
    def n_steps(self) -> int:
        return int(self._steps.size)

    def column(self, key):
        return self._head.column(key)

    # ------------------------------------------------------------------ data
    def steps(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        return self._steps[start:stop].copy()

    def fingerprint_rows(self, stat: str, rows: np.ndarray, columns: Optional[np.ndarray] = None) -> np.ndarray:
        """Fingerprint ``stat`` at the given sorted joined rows, read from the segment that holds each."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return self._head.fingerprint_rows(stat, rows, columns)
        width = len(self.tensors) if columns is None else len(columns)
        out = np.zeros((rows.size, width), dtype=dict(schema.STATS)[stat])
        which = self._piece_of_row[rows]
        for i in np.unique(which):
            mask = which == i
            out[mask] = self._pieces[int(i)].reader.fingerprint_rows(stat, self._local_row[rows[mask]], columns)
        return out

    def fingerprints(self, stat: str, start: int = 0, stop: Optional[int] = None,
                     columns: Optional[Sequence[int]] = None) -> np.ndarray:
        stop = self.n_steps if stop is None else min(stop, self.n_steps)
        return self.fingerprint_rows(stat, np.arange(start, max(stop, start)),
                                     None if columns is None else np.asarray(list(columns), dtype=np.int64))

    def iter_fingerprint_chunks(self, stat: str = "hash", chunk_rows: int = 4096
                                ) -> Iterator[Tuple[int, np.ndarray, np.ndarray]]:
        for start in range(0, self.n_steps, chunk_rows):
            stop = min(start + chunk_rows, self.n_steps)
            yield start, self.steps(start, stop), self.fingerprints(stat, start, stop)

    def _piece_holding(self, step: int) -> Optional[_Piece]:
        row = int(np.searchsorted(self._steps, step))
        if row < self._steps.size and self._steps[row] == step:
            return self._pieces[int(self._piece_of_row[row])]
        return None

    def skipped_steps(self) -> np.ndarray:
        """Steps of the updates each segment skipped (``/skipped``), in segment order."""
        parts = [p.reader.skipped_steps() for p in self._pieces]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def full_steps(self, group: str = "") -> np.ndarray:
        """Steps with full tensors: the first segment's ``/initial``, or each kept row's own segment."""
        if group == schema.INITIAL:
            return self._head.full_steps(group)
        parts = []
        for p in self._pieces:
            have = p.reader.full_steps()
            parts.append(have[np.isin(have, p.reader.steps(0, p.n))])
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def full(self, col: int, step: int, group: str = "") -> Optional[np.ndarray]:
        if group == schema.INITIAL:
            return self._head.full(col, step, group)
        piece = self._piece_holding(step)
        return None if piece is None else piece.reader.full(col, step)

    @property
    def notes(self) -> List[str]:
        return [n for _, r in self.segments for n in r.notes]

    def initial_fingerprints(self, stat: str) -> np.ndarray:
        return self._head.initial_fingerprints(stat)

    @property
    def initial_step(self) -> Optional[int]:
        return self._head.initial_step

    # ------------------------------------------------------------- lifecycle
    def close(self) -> None:
        for _, r in self.segments:
            r.close()

    def __enter__(self) -> "JoinedReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        ks = ",".join(str(k) for k, _ in self.segments)
        return f'<JoinedReader replica={self.replica} segments=[{ks}] steps={self.n_steps}>'


def describe(run_path: str, events_by_replica: Dict[int, List[tuple]]) -> List[str]:
    """One note per distinct join event, naming the replicas it happened on."""
    seen: Dict[tuple, List[int]] = {}
    for g, events in sorted(events_by_replica.items()):
        for e in events:
            seen.setdefault(e, []).append(g)
    notes = []
    for e, replicas in seen.items():
        who = f"replica {replicas[0]}" if len(replicas) == 1 else f"replicas {replicas}"
        kind = e[0]
        if kind == "joined":
            _, ks, starts = e
            parts = ", ".join(f"segment {k} from step {s}" for k, s in zip(ks, starts))
            notes.append(f"{run_path}: {who}: the trace of a job resumed from checkpoints, joined from "
                         f"{len(ks)} segment file(s): {parts}")
        elif kind == "replaced":
            _, k, lo, hi, n = e
            notes.append(f"{run_path}: {who}: segment {k} (replica-<g>.seg{k}.h5) restarts at step {lo}, so its "
                         f"rows replace steps {lo}..{hi} ({n} rows) of the earlier segment(s) (the job was "
                         f"restored from a checkpoint older than the last step traced)")
        elif kind == "gap":
            _, k, lo, hi = e
            notes.append(f"{run_path}: {who}: steps {lo}..{hi} ({hi - lo + 1} steps) are in no segment: the "
                         f"process before segment {k} stopped before flushing them and the job resumed after "
                         f"them; they are not compared")
        elif kind == "empty":
            _, k, start = e
            at = f" restarts at step {start} but" if start is not None else ""
            notes.append(f"{run_path}: {who}: segment {k}{at} holds no step (stopped before its first flush)")
        elif kind == "missing":
            notes.append(f"{run_path}: {who}: segment file(s) {list(e[1])} are missing; steps they held are "
                         f"not compared")
        elif kind == "restore":
            _, k, step, names = e
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            notes.append(f"{run_path}: {who}: the state segment {k} restored at step {step} differs from what the "
                         f"earlier segment recorded after step {step - 1} in {len(names)} tensor(s) ({shown}): "
                         f"the checkpoint did not restore the traced state")
        elif kind == "env":
            _, k, keys = e
            shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
            notes.append(f"{run_path}: {who}: segment {k} ran in another environment than segment 0 "
                         f"({len(keys)} attribute(s) differ: {shown})")
    return notes
