"""Background HDF5 writer: one file per replica, appended step by step.

The training step hands numpy arrays to :meth:`TraceWriter.write_step`; a
background thread does the HDF5 work, so a step never waits on the disk. The
queue between them is bounded: when it is full the step waits, so memory stays
bounded. Any write error is re-raised on the next call from the training side
(or, with ``on_write_error="disable"``, stops tracing and is reported once).

Crash safety: the file is written in SWMR mode (every object is created up
front, then only datasets grow) and flushed every ``flush_every`` steps, so a
process killed at any moment leaves a file whose steps up to the last flush are
intact and readable (``h5py.File(path, "r", swmr=True)``, which
``tracer.reader`` does for you). Since only flushed steps count, the fingerprint
rows of the steps in between wait in memory and go to the file as one block at
the flush; full tensors are written as they arrive.

Full tensors: ``write_step`` copies them into buffers the writer recycles, or,
with ``copy=False``, borrows the caller's arrays until they are written. The
thread extends each full-tensor dataset by one row, which allocates that row's
chunk (early allocation, no fill), and writes the bytes into it itself, outside
h5py (direct I/O where offered, else ``pwrite``), so the writers of several
local replicas write at the same time (h5py runs one HDF5 call at a time per
process). The step enters ``/full/steps`` only once all its tensors are written.

Shared full tensors: the weights, slots and applied gradients of a worker's
local replicas are normally bitwise equal. ``write_step(..., stored_in=...)``
names the columns whose bytes another local replica's file holds for this step
(the caller decides it from equal hashes); this file records that replica in
``/full/stored_in`` and leaves its own row unallocated. A replica whose values
differ (a desync) still gets every byte of its own.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import threading
import time
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import h5py
import numpy as np

try:
    import resource
except ImportError:  # not on Windows: no RLIMIT_FSIZE there
    resource = None

from tracer import schema
from tracer.config import CaptureConfig
from tracer.errors import TraceWriteError

_STOP = object()
# h5py runs one HDF5 call at a time per process anyway. The writer threads of
# one process (one per local replica) take turns per queued item instead of
# per call: interleaved call by call, two writers used twice the CPU per byte.
_HDF5_TURN = threading.Lock()
# Bytes of full-tensor chunks allocated by this process's writers and still being
# written outside HDF5 (guarded by _HDF5_TURN): every space check counts them.
_raw_in_flight = [0]
_FP_CHUNK_ROWS = 256
_PAGE = 4096
"""Alignment of full-tensor chunks in the file, and of direct-I/O writes."""
_STAGING = 4 << 20
"""Bytes of the page-aligned buffer a direct write goes through when a tensor is not page-aligned in memory."""
SPACE_RESERVE = 1 << 20
"""Bytes kept free on the trace's file system (and under RLIMIT_FSIZE) for the final flush and close."""


class _OutOfSpace(TraceWriteError):
    """Raised before a write that would not fit; the file itself is still intact."""


class _RawWriteError(TraceWriteError):
    """Writing a full tensor's bytes failed; HDF5's state is intact and the step is not recorded."""


def fixed_string(text: str) -> np.ndarray:
    """``text`` as a fixed-length UTF-8 HDF5 string.

    Variable-length strings live in HDF5's global heap, which has no checksum:
    a corrupt one can send the library into an endless loop, so the reader
    refuses them and the writer never writes them.
    """
    data = text.encode("utf-8")
    return np.array(data, dtype=f"S{max(len(data), 1)}")


def _attr_value(value: Any) -> Any:
    """Coerce an environment value to something HDF5 stores as a plain attribute."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return value
    if isinstance(value, str):
        return fixed_string(value)
    if value is None:
        return fixed_string("")
    return fixed_string(json.dumps(value, sort_keys=True, default=str))


def flatten_attrs(attrs: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Flatten nested dicts into dotted attribute names (``env.TF_CPP_...``)."""
    out: Dict[str, Any] = {}
    for key, value in attrs.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_attrs(value, prefix=f"{name}."))
        else:
            out[name] = _attr_value(value)
    return out


# Chunk of a batch of unknown size (schema.UNKNOWN_DIM): this many bytes along its first axis,
# so a short batch leaves little of its last chunk unused.
_DYNAMIC_CHUNK_BYTES = 1 << 16


def _full_chunks(shape: Sequence[int], itemsize: int):
    # One step per chunk keeps appends cheap; h5py's guess takes over for
    # tensors beyond HDF5's 4 GiB chunk limit.
    if shape and shape[0] == schema.UNKNOWN_DIM:
        entry = itemsize
        for d in shape[1:]:
            entry *= max(int(d), 1)
        return (1, max(1, _DYNAMIC_CHUNK_BYTES // entry)) + tuple(max(int(d), 1) for d in shape[1:])
    nbytes = itemsize
    for d in shape:
        nbytes *= max(int(d), 1)
    if nbytes >= 2**31 or 0 in shape:
        return True
    return (1,) + tuple(int(d) for d in shape)


class TraceWriter:
    """Appends fingerprints and full tensors of one replica to one HDF5 file.

    Args:
        path: File to create (overwritten if it exists).
        tensors: The tensor table, in dataflow order; column ``i`` of every
            fingerprint dataset is ``tensors[i]``.
        attrs: Run environment, stored as root attributes (nested dicts are
            flattened to dotted names).
        config: The capture configuration, stored in the file.
        initial_columns: Columns recorded in the ``/initial`` snapshot
            (weights and optimizer slots before the first update).
        shared_columns: Columns whose full tensors another local replica's
            file may hold for some steps (see ``write_step``). Their datasets
            allocate a row only when it is written here.

    Use as a context manager, or call :meth:`close` (idempotent).
    """

    def __init__(self, path: str, tensors: Sequence[schema.TensorSpec], *,
                 attrs: Optional[Mapping[str, Any]] = None,
                 config: Optional[CaptureConfig] = None,
                 initial_columns: Optional[Sequence[int]] = None,
                 shared_columns: Sequence[int] = ()):
        self.path = os.fspath(path)
        self.tensors = list(tensors)
        self.config = config or CaptureConfig()
        self.initial_columns = list(initial_columns if initial_columns is not None else [
            i for i, t in enumerate(self.tensors) if t.kind in ("optimizer_slot", "weight")])
        self.replica = int((attrs or {}).get(schema.ATTR_REPLICA, 0))
        self.shared_columns = frozenset(int(c) for c in shared_columns)
        if any(not 0 <= c < len(self.tensors) for c in self.shared_columns):
            raise TraceWriteError(f"{self.path}: shared_columns must be columns of the tensor table (0.."
                                  f"{len(self.tensors) - 1}). Received: {sorted(self.shared_columns)}")
        self._steps_written = 0
        self._last_step: Optional[int] = None
        # Fingerprint rows received since the last flush, written as one block by
        # the flush: only flushed rows count for a reader anyway, and one block
        # costs the training process far less than a dozen HDF5 calls per step.
        self._pending: List[Tuple[int, List[np.ndarray]]] = []
        self._datasets: Dict[str, h5py.Dataset] = {}
        self._raw_paths: set = set()  # full-tensor datasets whose rows the writer writes itself
        self._fd: Optional[int] = None
        self._direct_fd: Optional[int] = None  # the same file with O_DIRECT, where the system offers it
        self._staging: Optional[np.ndarray] = None
        self._error: Optional[BaseException] = None
        self._hdf5_failed = False
        self._failed = False  # sticky: after the first error the thread writes nothing more
        self._disabled = False
        self._closed = False
        self._queue: "queue.Queue[Any]" = queue.Queue(maxsize=self.config.queue_size)
        # Full-tensor buffers the thread has written, for the next step's copy. Fresh
        # arrays cost the training side a page fault per 4 KiB (over twice the cost
        # of the copy itself); at most queue_size + 2 sets are ever in use.
        self._free: "queue.SimpleQueue[List[np.ndarray]]" = queue.SimpleQueue()
        try:
            self._file = self._create(attrs or {})
            self._fd = os.open(self.path, os.O_WRONLY | getattr(os, "O_BINARY", 0))
            self._direct_fd = _open_direct(self.path)
        except (OSError, ValueError) as exc:
            raise TraceWriteError(f"{self.path}: cannot create trace file: {exc}") from exc
        self._thread = threading.Thread(target=self._run, name=f"TraceWriter-{os.path.basename(self.path)}",
                                         daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ setup
    def _create(self, attrs: Mapping[str, Any]) -> h5py.File:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        # Allocations of a page or more start on a page boundary, so a full tensor's
        # chunk can be written with direct I/O (see _write_raw).
        f = h5py.File(self.path, "w", libver="latest", alignment_threshold=_PAGE, alignment_interval=_PAGE)
        try:
            for name, value in flatten_attrs(attrs).items():
                f.attrs[name] = value
            f.attrs[schema.ATTR_SCHEMA] = schema.SCHEMA_VERSION
            f.attrs[schema.ATTR_COMPLETE] = 0
            f.create_dataset(schema.META_TENSORS, data=fixed_string(schema.encode_tensors(self.tensors)))
            f.create_dataset(schema.META_CONFIG, data=fixed_string(json.dumps(self.config.to_dict())))
            f.create_dataset(schema.META_FLUSHED, data=np.zeros(3, dtype=np.int64))
            self._create_table(f, "", len(self.tensors), None)
            self._create_table(f, schema.INITIAL, len(self.initial_columns), 1)
            f.create_dataset(f"{schema.INITIAL}/columns", data=np.asarray(self.initial_columns, dtype=np.int64))
            # SWMR forbids creating objects later, so every full-tensor dataset
            # exists from the start (empty until the schedule fills it).
            full_cols = range(len(self.tensors)) if self.config.mode == "full" else []
            self._create_full(f, "", full_cols, None)
            self._create_full(f, schema.INITIAL, self.initial_columns, 1)
            ncols = len(self.tensors)
            f.create_dataset(schema.FULL_STORED_IN, shape=(0, ncols), maxshape=(None, ncols if ncols else None),
                             dtype=np.int32, chunks=(64, max(ncols, 1)))
            f.create_dataset(schema.FULL_ROWS, shape=(0, ncols), maxshape=(None, ncols if ncols else None),
                             dtype=np.int64, chunks=(64, max(ncols, 1)))
            f.create_dataset(schema.SKIPPED, shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(64,))
            f.swmr_mode = True
        except BaseException:
            f.close()
            raise
        return f

    @staticmethod
    def _create_table(f: h5py.File, group: str, ncols: int, maxrows: Optional[int]) -> None:
        prefix = f"{group}/" if group else ""
        chunk_rows = 1 if maxrows == 1 else _FP_CHUNK_ROWS
        f.create_dataset(f"{prefix}{schema.STEPS}", shape=(0,), maxshape=(maxrows,), dtype=np.int64,
                         chunks=(chunk_rows,))
        for stat, dtype in schema.STATS:
            # HDF5 chunks may not exceed the maximum shape: an empty table gets an unlimited column axis.
            f.create_dataset(f"{prefix}{schema.FINGERPRINTS}/{stat}", shape=(0, ncols),
                             maxshape=(maxrows, ncols if ncols else None),
                             dtype=dtype, chunks=(chunk_rows, max(ncols, 1)))

    def _create_full(self, f: h5py.File, group: str, cols: Sequence[int], maxrows: Optional[int]) -> None:
        f.create_dataset(schema.full_path(0, group).rsplit("/", 1)[0] + "/steps", shape=(0,), maxshape=(maxrows,),
                         dtype=np.int64, chunks=(1 if maxrows == 1 else 64,))
        for col in cols:
            spec = self.tensors[col]
            dtype = np.dtype(_np_dtype_name(spec.dtype))
            chunks = _full_chunks(spec.shape, dtype.itemsize)
            extra = {}
            shared = maxrows is None and col in self.shared_columns
            if maxrows is None and chunks == (1,) + spec.shape and hasattr(os, "pwrite") and not shared:
                # Raw rows (see _append): each extension allocates its chunk at once,
                # and HDF5 never writes fill values into it.
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                extra = {"dcpl": dcpl, "fill_time": "never"}
                self._raw_paths.add(schema.full_path(col, group))
            # A batch of unknown size: the first axis grows with the longest batch written.
            shape = (0,) + spec.shape[1:] if spec.dynamic else spec.shape
            d = f.create_dataset(schema.full_path(col, group), shape=(0,) + shape,
                                 maxshape=(maxrows,) + (None,) * spec.dynamic + shape[spec.dynamic:],
                                 dtype=dtype, chunks=chunks, **extra)
            d.attrs["kind"] = fixed_string(spec.kind)
            d.attrs["name"] = fixed_string(spec.name)
            d.attrs["micro_step"] = spec.micro_step

    # ------------------------------------------------------------- public API
    @property
    def steps_written(self) -> int:
        return self._steps_written

    @property
    def last_step(self) -> Optional[int]:
        """The last step handed to :meth:`write_step` (None before the first)."""
        return self._last_step

    @property
    def enabled(self) -> bool:
        return not (self._closed or self._disabled)

    def write_initial(self, step: int, fingerprints: Sequence[np.ndarray],
                      full: Optional[Sequence[np.ndarray]] = None) -> None:
        """Record the state before update ``step`` (weights and slots).

        ``fingerprints`` are the STATS vectors over ``initial_columns``;
        ``full`` the matching full tensors.
        """
        self._put(("initial", int(step), fingerprints, (full, {}) if full is not None else None, False))

    def write_step(self, step: int, fingerprints: Sequence[np.ndarray],
                   full: Optional[Sequence[np.ndarray]] = None, *, copy: bool = True,
                   stored_in: Optional[Mapping[int, int]] = None) -> None:
        """Append one step: STATS vectors over all columns, and full tensors (or None).

        ``stored_in`` maps shared columns (see ``shared_columns``) to the
        replica whose file holds their bytes at this step: the caller found
        them bitwise equal there. Their entries of ``full`` are not written
        (they may be None).

        With ``copy`` (the default) the full tensors are copied before this
        returns (into buffers the writer recycles), so the caller may reuse its
        arrays. ``copy=False`` lends them to the writer until they are written:
        for arrays nobody changes, such as TensorFlow's tensors handed to a
        host callback (a variable updated while its value is held is copied
        first by TensorFlow itself), it saves the copy on the training side.
        """
        step = self._next_step(int(step), self._last_step)
        elsewhere: Dict[int, int] = {}
        if stored_in:
            if full is None:
                raise TraceWriteError(f"{self.path}: stored_in is given for step {step} but no full tensors")
            elsewhere = {int(c): int(r) for c, r in stored_in.items() if int(r) != self.replica}
            wrong = sorted(set(elsewhere) - self.shared_columns)
            if wrong:
                raise TraceWriteError(f"{self.path}: stored_in names columns {wrong}, which are not shared "
                                      f"columns of this writer. Received: stored_in={dict(stored_in)}")
        self._last_step = step
        if full is not None and self.enabled:
            full = [None if c in elsewhere else a for c, a in enumerate(full)]
            full = self._copy_full(full) if copy else [None if a is None else np.asarray(a) for a in full]
        self._put(("step", step, fingerprints, (full, elsewhere) if full is not None else None, copy))

    def write_steps(self, rows: Sequence[Tuple[int, Sequence[np.ndarray]]]) -> None:
        """Append several steps of fingerprints only: ``[(step, STATS vectors), ...]`` in step order.

        One hand-over to the writer thread for all of them, so a block of rows
        costs the caller one queue slot, not one per step (a full queue would
        make it wait for the disk).
        """
        rows = [(int(step), fps) for step, fps in rows]
        last = self._last_step
        for step, _ in rows:
            last = self._next_step(step, last)
        if not rows:
            return
        self._last_step = last
        self._put(("steps", None, rows, None, False))

    def write_skipped(self, step: int) -> None:
        """Record that a ``strategy.run`` at optimizer step ``step`` made no update (``/skipped``).

        Its step gets no row: the next update is this step again.
        """
        step = self._next_step(int(step), self._last_step, what="an update skipped at step")
        self._put(("skipped", step, None, None, False))

    def _next_step(self, step: int, last: Optional[int], what: str = "step") -> int:
        """``step``, if it may follow ``last``: steps strictly increase."""
        if last is not None and step <= last:
            raise TraceWriteError(f"{self.path}: steps must increase. Received: {what}={step} after step={last}")
        return step

    def _copy_full(self, full: Sequence[np.ndarray]) -> List[np.ndarray]:
        """``full`` copied into a recycled set of buffers (new ones if none fits); None entries stay None."""
        full = [None if a is None else np.asarray(a) for a in full]
        try:
            bufs = self._free.get_nowait()
        except queue.Empty:
            bufs = None
        if bufs is None or len(bufs) != len(full) or any(
                (b is None) != (a is None) or (a is not None and (b.shape != a.shape or b.dtype != a.dtype))
                for b, a in zip(bufs, full)):
            bufs = [None if a is None else np.empty(a.shape, a.dtype) for a in full]
        for b, a in zip(bufs, full):
            if a is not None:
                np.copyto(b, a)
        return bufs

    def flush(self) -> None:
        """Block until everything queued so far is on disk."""
        if not self.enabled:
            self._raise_pending()
            return
        self._put(("flush", None, None, None, False))
        self._queue.join()
        self._raise_pending()

    def close(self) -> None:
        """Write everything queued, mark the file complete and close it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        try:
            # In turn with the other writers of this process, whose space checks
            # must not interleave with these last writes.
            with _HDF5_TURN:
                if self._file.id.valid:
                    if not self._hdf5_failed:
                        self._flush()
                    self._datasets.clear()
                    self._file.close()
                for fd in (self._fd, self._direct_fd):
                    if fd is not None:
                        os.close(fd)
                self._fd = self._direct_fd = None
                if not self._hdf5_failed:
                    # The file is consistent (also after a refused write: nothing of it reached
                    # the file). SWMR writers may not add or change attributes; reopen to mark completion.
                    with h5py.File(self.path, "r+", libver="latest") as f:
                        f.attrs[schema.ATTR_COMPLETE] = 1
        except (OSError, ValueError) as exc:
            if self._error is None:
                self._error = exc
        self._raise_pending()

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("disabled" if self._disabled else "open")
        return (f'<TraceWriter "{os.path.basename(self.path)}" step={self._last_step} '
                f'written={self._steps_written} {state}>')

    # --------------------------------------------------------------- internals
    def _put(self, item) -> None:
        if self._closed:
            raise TraceWriteError(f"{self.path}: writer is closed")
        self._raise_pending()
        if self._disabled:
            return
        self._queue.put(item)

    def _raise_pending(self) -> None:
        if self._error is None:
            return
        if self.config.on_write_error == "disable":
            if not self._disabled:
                self._disabled = True
                warnings.warn(f"tracer: writing {self.path} failed ({self._error}); tracing is disabled, "
                              f"{self._steps_written} steps written before the error stay readable.",
                              RuntimeWarning, stacklevel=3)
            return
        error, self._error = self._error, None
        self._disabled = True
        raise TraceWriteError(f"{self.path}: writing the trace failed: {error}. "
                              f"{self._steps_written} steps written before the error stay readable.") from error

    def _run(self) -> None:
        since_flush = 0
        last_flush = time.monotonic()
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if self._failed:
                    continue  # drain: the training side raises (once) on its next call
                op, step, fps, full, owned = item
                with _HDF5_TURN:
                    if op == "flush":
                        self._flush()
                        since_flush = 0
                        continue
                    if op == "skipped":
                        d = self._dataset(schema.SKIPPED)
                        _append_block(d, d.shape[0], np.array([step], dtype=np.int64))
                        continue
                    if op == "steps":  # fingerprint rows only (write_steps): nothing raw to write
                        raw = []
                        for row_step, row_fps in fps:
                            self._append("", row_step, row_fps, None, range(len(self.tensors)))
                            self._steps_written += 1
                            since_flush += 1
                    else:
                        group = schema.INITIAL if op == "initial" else ""
                        cols = self.initial_columns if op == "initial" else range(len(self.tensors))
                        raw = self._append(group, step, fps, full, cols)
                if raw:
                    # Outside the turn: the writers of all local replicas copy their
                    # bytes to the file system at the same time.
                    try:
                        self._write_raw(raw)
                    finally:
                        with _HDF5_TURN:
                            _raw_in_flight[0] -= sum(data.nbytes for _, data in raw)
                    with _HDF5_TURN:
                        self._record_full_step(group, step)
                if op == "step":
                    self._steps_written += 1
                    if full is not None and owned:
                        self._free.put(full[0])
                    since_flush += 1
                if since_flush >= self.config.flush_every or op == "initial" or time.monotonic() - last_flush > 5:
                    with _HDF5_TURN:
                        self._flush()
                    since_flush = 0
                    last_flush = time.monotonic()
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread
                # After a failed HDF5 write the file is not touched again (a
                # flush would retry the failed write; see close). A refused or
                # failed raw write left HDF5's state intact.
                self._hdf5_failed = not isinstance(exc, (_OutOfSpace, _RawWriteError))
                self._failed = True
                self._error = _without_frames(exc)
            finally:
                self._queue.task_done()

    def _write_raw(self, raw: List[Tuple[int, np.ndarray]]) -> None:
        """Write each (file offset, bytes) of a step's full tensors.

        Page-aligned rows of whole pages go through the file opened with
        O_DIRECT: straight to the device, without the page cache, whose copy
        costs the CPU about 1 ns per byte on a busy machine (15 times the CPU
        of a direct write, measured with dd). A row that is not page-aligned in
        memory is staged through an aligned buffer. The rest, and every row on
        a file system without direct I/O, use ordinary pwrite.
        """
        for offset, data in raw:
            if self._direct_fd is not None and offset % _PAGE == 0 and data.nbytes % _PAGE == 0:
                try:
                    self._write_direct(offset, data)
                    continue
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise _RawWriteError(f"writing a full tensor failed: {exc}") from exc
                    os.close(self._direct_fd)  # refused after all: ordinary writes from now on
                    self._direct_fd = None
            try:
                _pwrite_all(self._fd, memoryview(data), offset)
            except OSError as exc:
                raise _RawWriteError(f"writing a full tensor failed: {exc}") from exc

    def _write_direct(self, offset: int, data: np.ndarray) -> None:
        if data.ctypes.data % _PAGE == 0:
            _pwrite_all(self._direct_fd, memoryview(data), offset)
            return
        if self._staging is None:
            space = np.empty(_STAGING + _PAGE, np.uint8)
            start = (-space.ctypes.data) % _PAGE
            self._staging = space[start:start + _STAGING]
        for begin in range(0, data.nbytes, _STAGING):
            piece = data[begin:begin + _STAGING]
            staged = self._staging[:piece.nbytes]
            np.copyto(staged, piece)
            _pwrite_all(self._direct_fd, memoryview(staged), offset + begin)

    def _flush(self) -> None:
        """Make every row written so far durable, then record how many rows that is.

        Two flushes: HDF5 may write a dataset's new extent before its data, so
        the row counts in /meta/flushed are written only once the rows they
        count are on disk. A reader of a killed run trusts no row beyond them.
        """
        f = self._file
        self._write_pending()
        f.flush()
        counts = np.array([self._dataset(schema.STEPS).shape[0], self._dataset(schema.FULL_STEPS).shape[0],
                           self._dataset(f"{schema.INITIAL}/{schema.STEPS}").shape[0]], dtype=np.int64)
        self._dataset(schema.META_FLUSHED).id.write(h5py.h5s.ALL, h5py.h5s.ALL, counts)  # [:] = counts, directly
        f.flush()

    def _check_space(self, nbytes: int, reserve: int = SPACE_RESERVE) -> None:
        """Refuse a write that would fill the file system or pass RLIMIT_FSIZE.

        HDF5 does not recover from ENOSPC/EFBIG in the middle of a write: its
        metadata cache keeps retrying the failed write, and h5py has been seen
        to crash the process on the way out. Stopping before the limit keeps
        the file consistent, with ``reserve`` (SPACE_RESERVE) left to flush
        and close it; fingerprint rows, that flush, may use it (``reserve=0``).
        Close to the limit, the rows waiting for the next flush are flushed
        first, while there is room for them: after a refusal, the other writers
        on this file system may leave none for the flush at close.
        """
        need = 2 * nbytes + reserve + _raw_in_flight[0]
        free, size, limit = self._room()
        if reserve and self._pending and (free < 2 * need or (limit is not None and size + 2 * need > limit)):
            self._flush()
            free, size, limit = self._room()
        if free < need:
            raise _OutOfSpace(f"file system full ({free} bytes free, this step needs about "
                              f"{need} including a {reserve}-byte reserve to close the file)")
        if limit is not None and size + need > limit:
            raise _OutOfSpace(f"file size limit reached (RLIMIT_FSIZE {limit} bytes, file "
                              f"{size} bytes, this step needs about {need})")

    def _room(self) -> Tuple[int, int, Optional[int]]:
        """(free bytes on the file system, file size, RLIMIT_FSIZE or None); the size only under a limit."""
        st = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0] if resource is not None else None
        if limit is None or limit == resource.RLIM_INFINITY:
            return st.f_bavail * st.f_frsize, 0, None
        return st.f_bavail * st.f_frsize, os.path.getsize(self.path), limit

    def _append(self, group: str, step: int, fps, full, cols) -> List[Tuple[int, np.ndarray]]:
        """Write the full tensors of one step now; queue its fingerprint row for the next flush.

        ``full`` is None or (arrays, {column: replica holding it elsewhere}).
        The ``/initial`` snapshot is written at once, row included. Returns the
        raw writes (file offset, bytes) still to do; the caller does them, then
        records the step in the full-tensor index with ``_record_full_step``.
        """
        ncols = len(cols)
        row = []
        for (stat, dtype), values in zip(schema.STATS, fps):
            values = np.asarray(values)
            if values.shape != (ncols,):
                raise TraceWriteError(f"{stat} vector has shape {values.shape}, expected ({ncols},)")
            if dtype == "uint64" and values.dtype == np.int64:
                values = values.view(np.uint64)
            row.append(values)
        raw: List[Tuple[int, np.ndarray]] = []
        if full is not None:
            full, elsewhere = full
            self._check_space(sum(np.asarray(v).nbytes for v in full if v is not None) + 8 + 4 * ncols)
            frow = self._full_steps(group).shape[0]
            lengths = [self._rows_of(col, value) for col, value in zip(cols, full)]
            if not group:
                # Before the step enters /full/steps: a reader trusts these rows from then on.
                where = np.full(ncols, self.replica, dtype=np.int32)
                for col, holder in elsewhere.items():
                    where[col] = holder
                _append_block(self._dataset(schema.FULL_STORED_IN), frow, where[None])
                _append_block(self._dataset(schema.FULL_ROWS), frow, np.asarray([lengths], dtype=np.int64))
            elif any(n != (self.tensors[col].shape or (0,))[0] for col, n in zip(cols, lengths)):
                raise TraceWriteError("the initial snapshot's tensors must have their columns' shapes")
            for col, value, length in zip(cols, full, lengths):
                path = schema.full_path(col, group)
                d = self._dataset(path, chunk_cache=False)
                if self.tensors[col].dynamic and length > d.shape[1]:
                    d.resize((frow + 1, length) + d.shape[2:])  # the longest batch so far
                else:
                    d.resize((frow + 1,) + d.shape[1:])
                if col in elsewhere:
                    continue  # unallocated here: another replica's file holds these bytes
                data = _raw_bytes(d, value) if path in self._raw_paths else None
                if data is None and np.ndim(value) and np.shape(value)[0] < d.shape[1]:
                    d[frow, :np.shape(value)[0]] = value  # a short batch: the first rows (see FULL_ROWS)
                elif data is None:
                    d[frow] = value
                else:
                    # The extension allocated the row's chunk: _write_raw puts its bytes
                    # there, outside h5py (which takes one HDF5 call at a time per process).
                    raw.append((d.id.get_chunk_info_by_coord((frow,) + (0,) * (d.ndim - 1)).byte_offset, data))
            if raw:
                _raw_in_flight[0] += sum(data.nbytes for _, data in raw)
            else:
                self._record_full_step(group, step)
        if group:
            self._write_rows(group, [(step, row)])
        else:
            self._pending.append((step, row))
        return raw

    def _rows_of(self, col: int, value) -> int:
        """Length along the first axis of ``value`` for column ``col`` (``/full/rows``).

        A tensor may be shorter than its column along the first axis only (an
        input batch smaller than the first step's); anything else is refused.
        """
        spec = self.tensors[col]
        if not spec.shape:
            return 0
        if value is None:
            return 0 if spec.dynamic else spec.shape[0]
        shape = np.shape(value)
        if not spec.fits(shape):
            raise TraceWriteError(
                f"full tensor {spec.label} has shape {shape}, which does not fit its column's {spec.shape} "
                f"(only the first axis may be shorter, as in a final partial batch)")
        return int(shape[0])

    def _full_steps(self, group: str) -> h5py.Dataset:
        return self._dataset(schema.full_path(0, group).rsplit("/", 1)[0] + "/steps")

    def _record_full_step(self, group: str, step: int) -> None:
        """Append ``step`` to the full-tensor step index, once the step's tensors are written."""
        fsteps = self._full_steps(group)
        _append_block(fsteps, fsteps.shape[0], np.array([step], dtype=np.int64))

    def _dataset(self, path: str, chunk_cache: bool = True) -> h5py.Dataset:
        """The open dataset at ``path``, looked up once (a lookup costs as much as a small write).

        Full-tensor datasets are opened without a chunk cache (``chunk_cache=False``):
        each of their chunks is written once, so a cache would only copy it and
        hold it back until the next flush, unaccounted for by the space check.
        """
        d = self._datasets.get(path)
        if d is None:
            if chunk_cache:
                d = self._file[path]
            else:
                dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
                dapl.set_chunk_cache(0, 0, 1.0)
                d = h5py.Dataset(h5py.h5d.open(self._file.id, path.encode(), dapl=dapl))
            self._datasets[path] = d
        return d

    def _write_pending(self) -> None:
        if self._pending:
            self._write_rows("", self._pending)  # kept if refused: the flush at close tries again
            self._pending = []

    def _write_rows(self, group: str, rows: List[Tuple[int, List[np.ndarray]]]) -> None:
        """Append fingerprint rows as one block per dataset, the step index last."""
        self._check_space(sum(v.nbytes for _, row in rows for v in row) + 8 * len(rows), reserve=0)
        prefix = f"{group}/" if group else ""
        steps = self._dataset(f"{prefix}{schema.STEPS}")
        start = steps.shape[0]
        for k, (stat, _) in enumerate(schema.STATS):
            d = self._dataset(f"{prefix}{schema.FINGERPRINTS}/{stat}")
            _append_block(d, start, np.stack([row[k] for _, row in rows]))
        # The step index is written last: a reader trusts rows up to len(/steps).
        _append_block(steps, start, np.array([step for step, _ in rows], dtype=np.int64))


def _append_block(d: h5py.Dataset, start: int, block: np.ndarray) -> None:
    """Grow ``d`` along its first axis to ``start + len(block)`` and write ``block`` at ``start``.

    Every table the writer grows by rows goes through here. The same HDF5
    calls as ``d.resize(...)`` then ``d[start:] = block``, made directly:
    h5py's selection machinery costs about 100 µs per assignment, several
    times the write of a block of fingerprint rows, and the writer thread
    holds the GIL meanwhile.
    """
    block = np.ascontiguousarray(block, dtype=d.dtype)
    d.id.set_extent((start + block.shape[0],) + d.shape[1:])
    file_space = d.id.get_space()
    file_space.select_hyperslab((start,) + (0,) * (block.ndim - 1), block.shape)
    d.id.write(h5py.h5s.create_simple(block.shape), file_space, block)


def _open_direct(path: str) -> Optional[int]:
    """``path`` opened for direct I/O (O_DIRECT), or None where the system or file system has none."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError:
        return None


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    """pwrite all of ``view`` at ``offset``; OSError for any failure."""
    while view.nbytes:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _without_frames(exc: BaseException) -> BaseException:
    """``exc`` (and the exceptions it chains) without tracebacks.

    Their frames would keep the step's arrays alive, possibly lent TensorFlow
    buffers, for as long as the error is kept: up to interpreter shutdown,
    after TensorFlow's own teardown.
    """
    seen = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        e.__traceback__ = None
        e = e.__cause__ or e.__context__
    return exc


def _raw_bytes(d: h5py.Dataset, value) -> Optional[np.ndarray]:
    """``value``'s bytes as one row of ``d`` (uint8, C order), or None if they are not that row's layout."""
    value = np.asarray(value)
    if value.dtype.name == "bfloat16":
        value = value.view(np.uint16)  # stored as its bit pattern
    # A batch shorter along the first axis fills the first rows of the chunk (C order).
    if value.dtype != d.dtype or value.ndim != d.ndim - 1 or value.shape[1:] != d.shape[2:] or (
            value.ndim and value.shape[0] > d.shape[1]):
        return None
    return np.ascontiguousarray(value).reshape(-1).view(np.uint8)


def _np_dtype_name(dtype: str) -> str:
    if dtype == "bfloat16":
        # Stored as its raw 16-bit pattern: HDF5 has no bfloat16.
        return "uint16"
    return dtype
