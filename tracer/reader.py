"""Read and validate trace files written by :mod:`tracer.writer`.

The reader never trusts a file: it checks the schema version, the tensor table
and every dataset's shape and dtype before handing out data, refuses external
links, external storage, virtual datasets and object dtypes, and reads data in
bounded chunks. Every problem becomes a :class:`TraceFormatError` whose message
starts with the file name.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import h5py
import numpy as np

from tracer import schema, segments
from tracer.config import CaptureConfig
from tracer.errors import TraceFormatError

MAX_TEXT_BYTES = 64 << 20
"""Largest metadata string the reader accepts (bounds memory on hostile files)."""


def _stored_eof(path: str) -> Optional[int]:
    """End-of-file address recorded in the HDF5 superblock, or None if it cannot be read."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        offset = 0
        while offset + 64 <= size:
            f.seek(offset)
            head = f.read(64)
            if head[:8] == b"\x89HDF\r\n\x1a\n":
                break
            offset = 512 if offset == 0 else offset * 2
        else:
            return None
    version = head[8]
    if version >= 2:
        width, start = head[9], 12
    else:
        width, start = head[13], 24 if version == 0 else 28
    if width not in (2, 4, 8):
        return None
    at = start + 2 * width
    return offset + int.from_bytes(head[at:at + width], "little")


def _open_h5(path: str) -> h5py.File:
    if not os.path.exists(path):
        raise TraceFormatError(f"{path}: no such file. Pass a trace file (replica-<N>.h5) or a run directory")
    if os.path.isdir(path):
        raise TraceFormatError(f"{path}: is a directory, expected a trace file (replica-<N>.h5)")
    if not stat.S_ISREG(os.stat(path).st_mode):
        # A FIFO or device would block or never end; HDF5 would wait on it.
        raise TraceFormatError(f"{path}: not a regular file, expected a trace file (replica-<N>.h5)")
    if not h5py.is_hdf5(path):
        raise TraceFormatError(f"{path}: not an HDF5 file (empty, truncated or another format). "
                               f"Pass a trace written by tracer")
    try:
        # A plain open lets HDF5 check the file against its recorded size.
        return h5py.File(path, "r")
    except (OSError, ValueError) as first:
        # A writer killed mid-run leaves its SWMR "open for write" flag set;
        # only an SWMR read opens such a file, and it skips HDF5's size check
        # (reading a truncated file that way can hang), so check it here.
        eof = _stored_eof(path)
        if eof is None or eof > os.path.getsize(path):
            raise TraceFormatError(f"{path}: HDF5 file cannot be opened ({first}); it is truncated or corrupt. "
                                   f"Capture the run again") from first
        try:
            return h5py.File(path, "r", swmr=True)
        except (OSError, ValueError):
            raise TraceFormatError(f"{path}: HDF5 file cannot be opened ({first}); it may be truncated or "
                                   f"corrupt. Capture the run again") from first


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "O":
            raise ValueError("object-dtype attribute")
        return value.tolist()
    return value


class TraceReader:
    """One replica's trace file.

    Args:
        path: A ``replica-<N>.h5`` file.

    Raises:
        TraceFormatError: If the file is missing, not a trace, of an unknown
            schema version, or inconsistent.
    """

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self._file: Optional[h5py.File] = _open_h5(self.path)
        try:
            self._load()
        except TraceFormatError:
            self.close()
            raise
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            self.close()
            raise TraceFormatError(f"{self.path}: corrupt trace ({type(exc).__name__}: {exc}). "
                                   f"Capture the run again") from exc

    # ------------------------------------------------------------- validation
    def _fail(self, message: str) -> TraceFormatError:
        return TraceFormatError(f"{self.path}: {message}")

    def _has(self, name: str) -> bool:
        """Whether ``name`` exists, following no link (every path component must be a hard link)."""
        parts = name.split("/")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            # get(getlink=True) resolves the parents of `prefix`, which are
            # hard links by the previous iteration, and never the link itself.
            link = self._file.get(prefix, getlink=True)
            if link is None:
                return False
            if not isinstance(link, h5py.HardLink):
                kind = "an external" if isinstance(link, h5py.ExternalLink) else "a soft"
                raise self._fail(f"/{prefix} is {kind} link; links are not followed in traces")
        return True

    def _dataset(self, name: str, *, ndim: Optional[int] = None, kinds: str = "iuf") -> h5py.Dataset:
        if not self._has(name):
            raise self._fail(f"missing dataset /{name}")
        obj = self._file[name]
        if not isinstance(obj, h5py.Dataset):
            raise self._fail(f"/{name} is not a dataset")
        if obj.is_virtual or obj.external:
            raise self._fail(f"/{name} stores its data outside the file; refused")
        if obj.dtype.kind not in kinds:
            raise self._fail(f"/{name} has dtype {obj.dtype}, expected a numeric dtype")
        if ndim is not None and obj.ndim != ndim:
            raise self._fail(f"/{name} has {obj.ndim} dimensions, expected {ndim}")
        return obj

    def _check_stored(self, name: str, obj: h5py.Dataset, rows: Optional[int] = None) -> None:
        """Refuse to read ``rows`` rows (default: all) of a dataset the file does not store (bounds every read).

        A hostile or corrupt file can declare any shape; a read of unallocated
        chunks returns the fill value and allocates it all.
        """
        rows = obj.shape[0] if rows is None and obj.ndim else (1 if rows is None else rows)
        wanted = obj.dtype.itemsize * rows
        for d in obj.shape[1:]:
            wanted *= d
        stored = obj.id.get_storage_size()
        # The writer never compresses, so its datasets store at least what they
        # hold; a filtered copy (h5repack -f GZIP) is allowed a generous ratio.
        ratio = 1000 if obj.compression or obj.shuffle or obj.scaleoffset else 1
        if wanted > 0 and wanted > stored * ratio:
            raise self._fail(f"/{name} declares shape {obj.shape} but the file stores only {stored} bytes "
                             f"of it; the file is truncated or corrupt")

    def _text(self, name: str) -> str:
        d = self._dataset(name, kinds="SO")
        if d.shape != () or d.dtype.kind != "S":
            # Variable-length strings (kind O) are refused: see _load.
            raise self._fail(f"/{name} must be a scalar fixed-length string, found {d.dtype} {d.shape}")
        if d.dtype.itemsize > MAX_TEXT_BYTES:
            raise self._fail(f"/{name} is larger than {MAX_TEXT_BYTES} bytes")
        self._check_stored(name, d)
        try:
            return d[()].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self._fail(f"/{name} is not UTF-8 ({exc})") from exc

    def _load(self) -> None:
        f = self._file
        attrs: Dict[str, Any] = {}
        for key in f.attrs:
            try:
                if f.attrs.get_id(key).dtype.kind == "O":
                    # Variable-length data lives in the global heap, which has no
                    # checksum; a corrupt one can hang HDF5. The writer never uses it.
                    raise ValueError("variable-length or object type; refused")
                attrs[key] = _plain(f.attrs[key])
            except (OSError, ValueError, TypeError) as exc:
                raise self._fail(f"root attribute {key!r} is unreadable ({exc})") from exc
        version = attrs.get(schema.ATTR_SCHEMA)
        if version is None:
            raise self._fail("not a tracer trace (no schema_version attribute). Pass a trace written by tracer")
        if not isinstance(version, int) or isinstance(version, bool):
            raise self._fail(f"schema_version must be an integer, found {version!r}")
        if version not in schema.READABLE_VERSIONS:
            readable = " and ".join(str(v) for v in schema.READABLE_VERSIONS)
            raise self._fail(f"schema version {version} is not supported (this tracer reads versions "
                             f"{readable}); use the tracer release that wrote it")
        for name in (schema.ATTR_REPLICA, schema.ATTR_NUM_REPLICAS, schema.ATTR_INITIAL_STEP, schema.ATTR_WORKER,
                     schema.ATTR_NUM_WORKERS, schema.ATTR_COMPLETE, schema.ATTR_LOCAL_REPLICA, schema.ATTR_SEGMENT):
            value = attrs.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise self._fail(f"root attribute {name} must be an integer >= 0, found {value!r}")
        if attrs.get(schema.ATTR_REPLICA, 0) >= attrs.get(schema.ATTR_NUM_REPLICAS, 1):
            raise self._fail(f"replica {attrs.get(schema.ATTR_REPLICA)} is not below num_replicas "
                             f"{attrs.get(schema.ATTR_NUM_REPLICAS)}")
        self.attrs = attrs
        try:
            self.tensors: List[schema.TensorSpec] = schema.decode_tensors(self._text(schema.META_TENSORS))
        except TraceFormatError as exc:
            raise self._fail(str(exc)) from exc
        try:
            config = json.loads(self._text(schema.META_CONFIG))
            if not isinstance(config, dict):
                raise ValueError(f"expected a JSON object, found {type(config).__name__}")
            self.config = CaptureConfig.from_dict(config)
        except (ValueError, TypeError) as exc:
            raise self._fail(f"capture config is malformed ({exc})") from exc
        self._flushed = self._flushed_rows()
        self._n_rows = self._check_table("", len(self.tensors), self._flushed[0])
        cols_d = self._dataset(f"{schema.INITIAL}/columns", ndim=1, kinds="iu")
        self._check_stored(f"{schema.INITIAL}/columns", cols_d)
        cols = cols_d[()]
        if cols.size and (cols.min() < 0 or cols.max() >= len(self.tensors)):
            raise self._fail("/initial/columns names a column outside the tensor table")
        self.initial_columns = [int(c) for c in cols]
        self._n_initial = self._check_table(schema.INITIAL, len(self.initial_columns), self._flushed[2])
        self._full_rows = {"": self._check_full("", self._flushed[1]), schema.INITIAL: self._check_full(schema.INITIAL)}
        self._column = {t.key: i for i, t in enumerate(self.tensors)}
        self._full_steps_cache: Dict[str, np.ndarray] = {}
        self._siblings: Dict[int, Optional["TraceReader"]] = {}
        self._all_steps: Optional[np.ndarray] = None
        self._mismatch_noted: set = set()
        self.notes: List[str] = []
        self._holders = self._check_stored_in()
        self._lengths = self._check_lengths()

    def _check_stored_in(self) -> Dict[int, str]:
        """Replicas whose files hold some of this file's full tensors (schema 3), by replica: their paths."""
        stored_in = self._full_index(schema.FULL_STORED_IN, 3)
        if stored_in is None:
            return {}
        holders = {int(r) for r in np.unique(stored_in)} - {self.replica}
        if not holders:
            return {}
        if any(r < 0 or r >= self.num_replicas for r in holders):
            raise self._fail(f"/{schema.FULL_STORED_IN} names replicas {sorted(holders)}, outside 0.."
                             f"{self.num_replicas - 1}")
        try:
            files = json.loads(self.attrs.get(schema.ATTR_REPLICA_FILES, "{}"))
            files = {int(k): str(v) for k, v in files.items()}
        except (ValueError, TypeError, AttributeError) as exc:
            raise self._fail(f"root attribute {schema.ATTR_REPLICA_FILES} is malformed ({exc})") from exc
        paths = {}
        directory = os.path.dirname(os.path.abspath(self.path))
        for r in sorted(holders):
            name = files.get(r)
            if name is None or os.path.basename(name) != name:
                raise self._fail(f"/{schema.FULL_STORED_IN} names replica {r}, whose file is not in root "
                                 f"attribute {schema.ATTR_REPLICA_FILES}")
            paths[r] = os.path.join(directory, name)
            if not os.path.exists(paths[r]):
                self._note(f"its full tensors of the global kinds that were bit for bit equal to replica {r}'s "
                           f"are kept once, in {name}, which is missing; they are compared by fingerprint only. "
                           f"Keep a worker's replica files together")
        return paths

    def _full_index(self, name: str, since: int) -> Optional[np.ndarray]:
        """The (N, T) table ``name`` of the trusted full-tensor rows; None in files older than schema ``since``."""
        if not self._has(name):
            if self.attrs.get(schema.ATTR_SCHEMA, 0) >= since:
                raise self._fail(f"missing dataset /{name}")
            return None
        rows = self._full_rows[""]
        d = self._dataset(name, ndim=2, kinds="iu")
        if d.shape[1] != len(self.tensors) or d.shape[0] < rows:
            raise self._fail(f"/{name} has shape {d.shape}, expected ({rows} or more, {len(self.tensors)})")
        self._check_stored(name, d, rows)
        return np.asarray(self._read(name, slice(0, rows))).reshape(rows, len(self.tensors))

    def _check_lengths(self) -> Optional[np.ndarray]:
        """``/full/rows`` (schema 4): each full row's length along the first axis, or None if all are whole."""
        lengths = self._full_index(schema.FULL_ROWS, 4)
        if lengths is None:
            return None
        lengths = lengths.astype(np.int64)
        # A column of unknown batch size (schema 5) has no whole length: any length is checked against
        # its dataset when read.
        whole = np.array([np.iinfo(np.int64).max if t.dynamic else t.shape[0] if t.shape else 0
                          for t in self.tensors], dtype=np.int64)
        bad = np.argwhere((lengths < 0) | (lengths > whole[None, :]) | ((whole == 0)[None, :] & (lengths != 0)))
        if bad.size:
            row, col = (int(v) for v in bad[0])
            raise self._fail(f"/{schema.FULL_ROWS} gives length {int(lengths[row, col])} for column {col} "
                             f"(shape {self.tensors[col].shape}) in row {row}")
        return None if np.array_equal(lengths, np.broadcast_to(whole, lengths.shape)) else lengths

    def _flushed_rows(self) -> Tuple[Optional[int], Optional[int], Optional[int]]:
        """Row limits of a file whose writer did not close it: what its last flush made durable."""
        if self.attrs.get(schema.ATTR_COMPLETE, 0) == 1 or not self._has(schema.META_FLUSHED):
            return (None, None, None)
        d = self._dataset(schema.META_FLUSHED, ndim=1, kinds="iu")
        if d.shape != (3,):
            raise self._fail(f"/{schema.META_FLUSHED} has shape {d.shape}, expected (3,)")
        self._check_stored(schema.META_FLUSHED, d)
        return tuple(int(v) for v in d[()])

    def _check_table(self, group: str, ncols: int, limit: Optional[int] = None) -> int:
        prefix = f"{group}/" if group else ""
        steps = self._dataset(f"{prefix}{schema.STEPS}", ndim=1, kinds="iu")
        rows = steps.shape[0] if limit is None else min(steps.shape[0], limit)
        tables = []
        for stat, dtype in schema.STATS:
            d = self._dataset(f"{prefix}{schema.FINGERPRINTS}/{stat}", ndim=2)
            if d.shape[1] != ncols:
                raise self._fail(f"/{prefix}{schema.FINGERPRINTS}/{stat} has {d.shape[1]} columns, "
                                 f"the tensor table has {ncols}")
            if d.dtype != np.dtype(dtype):
                raise self._fail(f"/{prefix}{schema.FINGERPRINTS}/{stat} has dtype {d.dtype}, expected {dtype}")
            # Rows beyond /steps were being written when the run stopped.
            rows = min(rows, d.shape[0])
            tables.append((f"{prefix}{schema.FINGERPRINTS}/{stat}", d))
        for name, d in [(f"{prefix}{schema.STEPS}", steps)] + tables:
            self._check_stored(name, d, rows)
        if rows:
            s = steps[:rows]
            if np.any(np.diff(s) <= 0):
                raise self._fail(f"/{prefix}{schema.STEPS} is not strictly increasing")
        return rows

    def _check_full(self, group: str, limit: Optional[int] = None) -> int:
        base = f"{group}/{schema.FULL}" if group else schema.FULL
        # The writer always creates /full/steps (empty without full tensors).
        steps = self._dataset(f"{base}/steps", ndim=1, kinds="iu")
        rows = steps.shape[0] if limit is None else min(steps.shape[0], limit)
        self._check_stored(f"{base}/steps", steps, rows)
        return rows

    # ------------------------------------------------------------ properties
    @property
    def replica(self) -> int:
        return int(self.attrs.get(schema.ATTR_REPLICA, 0))

    @property
    def num_replicas(self) -> int:
        return int(self.attrs.get(schema.ATTR_NUM_REPLICAS, 1))

    @property
    def run_id(self) -> str:
        return str(self.attrs.get(schema.ATTR_RUN_ID, ""))

    @property
    def complete(self) -> bool:
        """False when the run stopped before the writer closed the file."""
        return bool(self.attrs.get(schema.ATTR_COMPLETE, 0))

    @property
    def n_steps(self) -> int:
        return self._n_rows

    def column(self, key: Tuple[str, str, int]) -> Optional[int]:
        """Column of the tensor with ``key == (kind, name, micro_step)``, or None."""
        return self._column.get(key)

    def steps(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        """Step numbers of rows ``[start, stop)``."""
        stop = self._n_rows if stop is None else min(stop, self._n_rows)
        return self._read(schema.STEPS, slice(start, stop)).astype(np.int64)

    def _read(self, name: str, selection) -> np.ndarray:
        # A truncated or corrupt chunk only shows when it is read; name the file.
        try:
            return self._file[name][selection]
        except (OSError, ValueError, KeyError) as exc:
            raise self._fail(f"reading /{name} failed ({exc}); the file may be truncated or corrupt. "
                             f"Capture the run again") from exc

    def fingerprints(self, stat: str, start: int = 0, stop: Optional[int] = None,
                     columns: Optional[Sequence[int]] = None) -> np.ndarray:
        """Fingerprint statistic ``stat`` for rows ``[start, stop)`` (all or given columns)."""
        if stat not in schema.STAT_NAMES:
            raise ValueError(f"`stat` must be one of {schema.STAT_NAMES}. Received: stat={stat!r}")
        stop = self._n_rows if stop is None else min(stop, self._n_rows)
        data = self._read(f"{schema.FINGERPRINTS}/{stat}", slice(start, stop))
        return data if columns is None else data[:, list(columns)]

    def fingerprint_rows(self, stat: str, rows: np.ndarray, columns: Optional[np.ndarray] = None) -> np.ndarray:
        """Fingerprint ``stat`` at the given sorted row indices, for all or the given columns.

        Reads one contiguous box (rows ``rows[0]..rows[-1]``, columns
        ``min..max`` of ``columns``) and selects in memory: h5py's point
        selections are far slower than a slice.
        """
        if stat not in schema.STAT_NAMES:
            raise ValueError(f"`stat` must be one of {schema.STAT_NAMES}. Received: stat={stat!r}")
        rows = np.asarray(rows, dtype=np.int64)
        ncols = len(self.tensors)
        if columns is not None:
            columns = np.asarray(columns, dtype=np.int64)
        if rows.size == 0:
            width = ncols if columns is None else columns.size
            return np.zeros((0, width), dtype=dict(schema.STATS)[stat])
        c0, c1 = (0, ncols) if columns is None or columns.size == 0 else (int(columns.min()), int(columns.max()) + 1)
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        name = f"{schema.FINGERPRINTS}/{stat}"
        if hi - lo <= 4 * rows.size:
            box = self._read(name, (slice(lo, hi), slice(c0, c1)))
            if hi - lo != rows.size:
                box = box[rows - lo]
        else:
            box = self._read(name, (rows, slice(c0, c1)))
        if columns is None:
            return box
        if c0 == 0 and c1 == box.shape[1] and columns.size == c1 and np.array_equal(columns, np.arange(c1)):
            return box
        return np.take(box, columns - c0, axis=1)

    def iter_fingerprint_chunks(self, stat: str = "hash", chunk_rows: int = 4096
                                ) -> Iterator[Tuple[int, np.ndarray, np.ndarray]]:
        """Yield ``(first_row, steps, values)`` blocks of at most ``chunk_rows`` rows."""
        for start in range(0, self._n_rows, chunk_rows):
            stop = min(start + chunk_rows, self._n_rows)
            yield start, self.steps(start, stop), self.fingerprints(stat, start, stop)

    def skipped_steps(self) -> np.ndarray:
        """Optimizer steps of the ``strategy.run`` calls whose update was skipped (``/skipped``; empty if none)."""
        if not self._has(schema.SKIPPED):
            return np.zeros((0,), dtype=np.int64)
        d = self._dataset(schema.SKIPPED, ndim=1, kinds="iu")
        return np.asarray(self._read(schema.SKIPPED, slice(0, d.shape[0])), dtype=np.int64)

    def full_steps(self, group: str = "") -> np.ndarray:
        """Steps that have full tensors (``group=schema.INITIAL`` for the initial snapshot)."""
        base = f"{group}/{schema.FULL}" if group else schema.FULL
        cached = self._full_steps_cache.get(group)
        if cached is not None:
            return cached
        rows = self._full_rows[group]
        steps = (np.zeros((0,), dtype=np.int64) if not rows
                 else self._read(f"{base}/steps", slice(0, rows)).astype(np.int64))
        self._full_steps_cache[group] = steps
        return steps

    def full(self, col: int, step: int, group: str = "") -> Optional[np.ndarray]:
        """Full tensor of column ``col`` at ``step``, or None if not recorded.

        A tensor this file's writer found bitwise equal in another local
        replica's file (``/full/stored_in``) is read from that file, after
        checking that both files hold the same hash for it at ``step``.
        """
        steps = self.full_steps(group)
        hits = np.nonzero(steps == step)[0]
        if hits.size == 0:
            return None
        row = int(hits[0])
        if not group:
            holder = self._stored_in(row, col)
            if holder != self.replica:
                return self._full_elsewhere(holder, col, step)
        name = schema.full_path(col, group)
        if not self._has(name):
            return None
        d = self._dataset(name)
        spec = self.tensors[col]
        if not spec.fits(d.shape[1:]) or (not spec.dynamic and d.shape[1:] != spec.shape):
            raise self._fail(f"/{name} has shape {d.shape[1:]}, the tensor table says {spec.shape}")
        if row >= d.shape[0]:
            return None
        length = int(self._lengths[row, col]) if not group and self._lengths is not None else None
        if spec.dynamic and length is None:
            raise self._fail(f"/{name} is a batch of unknown size, but /{schema.FULL_ROWS} gives no length for row "
                             f"{row}")
        if spec.dynamic and length > d.shape[1]:
            raise self._fail(f"/{schema.FULL_ROWS} gives length {length} for row {row} of /{name}, which holds "
                             f"{d.shape[1]}")
        self._check_stored(name, d, 1)
        if length != 0 and d.chunks is not None and d.chunks[0] == 1 and d.id.get_chunk_info_by_coord(
                (row,) + (0,) * (d.ndim - 1)).byte_offset is None:
            # The writer allocates every row it writes; an unallocated one would read as zeros.
            raise self._fail(f"/{name} holds no data for step {step} (row {row}), which the file says it stores; "
                             f"the file is corrupt. Capture the run again")
        if length is not None and (spec.dynamic or length < (spec.shape or (0,))[0]):
            # A batch shorter than its column (an epoch's last batch): only its first rows are data.
            return self._read(name, (row, slice(0, length)))
        # bfloat16 comes back as raw bit patterns (uint16).
        return self._read(name, row)

    def holder(self, col: int, step: int) -> Optional[int]:
        """The replica whose file holds the full tensor of column ``col`` at ``step`` (None if not recorded)."""
        hits = np.nonzero(self.full_steps() == step)[0]
        return self._stored_in(int(hits[0]), col) if hits.size else None

    def _stored_in(self, row: int, col: int) -> int:
        """The replica whose file holds row ``row`` of ``/full/<col>``."""
        if not self._holders:
            return self.replica
        return int(self._read(schema.FULL_STORED_IN, (row, col)))

    def _full_elsewhere(self, holder: int, col: int, step: int) -> Optional[np.ndarray]:
        """Full tensor ``col`` at ``step`` from replica ``holder``'s file.

        None, with a note, where that file cannot vouch for it: missing,
        another run's, or holding another hash. The tensor's fingerprints
        still count, so no difference is hidden.
        """
        if holder not in self._siblings:
            path = self._holders.get(holder)
            other = None
            if path is None:
                self._note(f"/{schema.FULL_STORED_IN} names replica {holder} at step {step}, which its first "
                           f"rows do not name; that full tensor is not used")
            elif os.path.exists(path):  # a missing one is told in notes already
                other = TraceReader(path)
                if other.run_id != self.run_id or other.replica != holder:
                    self._note(f"{os.path.basename(path)} should hold replica {holder} of run {self.run_id!r} "
                               f"but holds replica {other.replica} of run {other.run_id!r}; the full tensors "
                               f"kept there are not used. Keep the replica files of one run together")
                    other.close()
                    other = None
            self._siblings[holder] = other
        other = self._siblings[holder]
        if other is None:
            return None
        hits = np.nonzero(other.full_steps() == step)[0]
        theirs = other._hash_at(step, col)
        if hits.size == 0 or theirs is None:
            return None  # that file's writer stopped before the step was on disk
        mine = self._hash_at(step, col)
        if mine != theirs or other._stored_in(int(hits[0]), col) != holder:
            if holder in self._mismatch_noted:
                return None
            self._mismatch_noted.add(holder)
            self._note(f"its full tensor {self.tensors[col].label} at step {step} is kept in "
                       f"{os.path.basename(other.path)}, which does not hold it with the same hash ({mine} here, "
                       f"{theirs} there); full tensors kept there that disagree so are not used (this is the "
                       f"first), their fingerprints are")
            return None
        return other.full(col, step)

    def _note(self, message: str) -> None:
        message = f"{self.path}: {message}"
        if message not in self.notes:
            self.notes.append(message)

    def _hash_at(self, step: int, col: int) -> Optional[int]:
        """The hash of column ``col`` at ``step`` (None if no row holds it)."""
        if self._all_steps is None:
            self._all_steps = self.steps()
        steps = self._all_steps
        row = int(np.searchsorted(steps, step))
        if row >= steps.size or steps[row] != step:
            return None
        return int(self.fingerprints("hash", row, row + 1, [col])[0, 0])

    def initial_fingerprints(self, stat: str) -> np.ndarray:
        """Fingerprint ``stat`` of the initial snapshot, over ``initial_columns`` (empty if none)."""
        if self._n_initial == 0:
            return np.zeros((0, len(self.initial_columns)))
        return self._read(f"{schema.INITIAL}/{schema.FINGERPRINTS}/{stat}", slice(0, 1))

    @property
    def initial_step(self) -> Optional[int]:
        if self._n_initial == 0:
            return None
        return int(self._file[f"{schema.INITIAL}/{schema.STEPS}"][0])

    # ------------------------------------------------------------- lifecycle
    def close(self) -> None:
        for other in getattr(self, "_siblings", {}).values():
            if other is not None:
                other.close()
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None

    def __enter__(self) -> "TraceReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._file is None else f"steps={self._n_rows}"
        return f'<TraceReader "{os.path.basename(self.path)}" replica={self.attrs.get("replica")} {state}>'


def find_replica_files(run_dir: str) -> List[str]:
    """Trace files of a run directory, sorted by replica index."""
    if not os.path.isdir(run_dir):
        raise TraceFormatError(f"{run_dir}: not a directory")
    found = []
    for name in os.listdir(run_dir):
        m = schema.FILE_REGEX.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(run_dir, name)))
    if not found:
        raise TraceFormatError(f"{run_dir}: no replica-<N>.h5 trace files in this directory. Pass the --trace-dir "
                               f"of a traced run")
    return [p for _, p in sorted(found)]


def _open_replica(files: List[Tuple[int, str]]):
    """A TraceReader for a replica of one file, a :class:`tracer.segments.JoinedReader` for several segments."""
    if len(files) == 1 and files[0][0] == 0:
        return TraceReader(files[0][1])
    readers: List[Tuple[int, TraceReader]] = []
    try:
        for k, path in files:
            readers.append((k, TraceReader(path)))
    except BaseException:
        for _, r in readers:
            r.close()
        raise
    return segments.JoinedReader(readers)


class Run:
    """All replica files of one run, checked to belong together.

    A replica whose job was resumed from a checkpoint has several segments
    (``replica-<N>.h5``, ``replica-<N>.seg<k>.h5``); they are joined in step
    order by :class:`tracer.segments.JoinedReader`, later segments replacing
    the steps they redid, and what the join did is told in ``notes``.

    Args:
        path: A run directory (every ``replica-<N>.h5`` and its segments in it)
            or one trace file (read alone, without its segments).

    Raises:
        TraceFormatError: If a file is unreadable, or the files disagree on
            run id, replica count, tensor table or steps.

    Attributes:
        readers: One :class:`TraceReader` per replica file, by replica index.
        notes: Things the user should know (missing replica files...).
    """

    def __init__(self, path: str):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise TraceFormatError(f"{self.path}: no such file or directory. Pass a trace file (replica-<N>.h5) or "
                                   f"a run directory")
        if os.path.isdir(self.path):
            by_replica = segments.find_segments(self.path)
            if not by_replica:
                find_replica_files(self.path)  # raises the "no replica files" error
        else:
            by_replica = {0: [(0, self.path)]}
        self.readers: List[TraceReader] = []
        self.notes: List[str] = []
        try:
            for files in by_replica.values():
                self.readers.append(_open_replica(files))
            self._validate()
            self.notes.extend(n for r in self.readers for n in r.notes)
            events = {r.replica: r.events for r in self.readers if isinstance(r, segments.JoinedReader)}
            self.notes[:0] = segments.describe(self.path, events)
        except BaseException:
            self.close()
            raise

    def _validate(self) -> None:
        first = self.readers[0]
        seen = {}
        for r in self.readers[1:]:
            for what, mine, theirs in (("run_id", r.run_id, first.run_id),
                                       ("num_replicas", r.num_replicas, first.num_replicas)):
                if mine != theirs:
                    raise TraceFormatError(
                        f"{r.path}: {what} is {mine!r} but {first.path} has {theirs!r}; a run directory must "
                        f"hold the replica files of one run only")
            if r.tensors != first.tensors:
                raise TraceFormatError(f"{r.path}: tensor table differs from {first.path}; a run directory must "
                                       f"hold the replica files of one run only")
        for r in self.readers:
            if r.replica in seen:
                raise TraceFormatError(f"{r.path}: replica {r.replica} also in {seen[r.replica]}")
            seen[r.replica] = r.path
        self.readers.sort(key=lambda r: r.replica)
        self.n_rows = min(r.n_steps for r in self.readers)
        self.steps = first.steps(0, self.n_rows)
        for r in self.readers[1:]:
            if not np.array_equal(r.steps(0, self.n_rows), self.steps):
                raise TraceFormatError(f"{r.path}: step numbers differ from {first.path} within one run")
        if os.path.isdir(self.path) and len(self.readers) < self.num_replicas:
            missing = sorted(set(range(self.num_replicas)) - set(seen))
            self.notes.append(f"{self.path}: {len(self.readers)} of {self.num_replicas} replica files present "
                              f"(missing replicas {missing}); only those present are compared")
        short = [r for r in self.readers if r.n_steps > self.n_rows]
        if short:
            self.notes.append(f"{self.path}: replica files hold different numbers of steps; "
                              f"only the first {self.n_rows} rows, present in all, are used")
        incomplete = [os.path.basename(r.path) for r in self.readers if not r.complete]
        if incomplete:
            self.notes.append(f"{self.path}: {', '.join(incomplete)} not closed cleanly (run stopped early?); "
                              f"the steps written before are used")

    def notes_now(self) -> List[str]:
        """``notes`` and what the readers noted since (a full tensor they could not use)."""
        return self.notes + [n for r in self.readers for n in r.notes if n not in self.notes]

    @property
    def tensors(self) -> List[schema.TensorSpec]:
        return self.readers[0].tensors

    @property
    def attrs(self) -> Dict[str, Any]:
        return self.readers[0].attrs

    @property
    def num_replicas(self) -> int:
        return self.readers[0].num_replicas

    @property
    def replicas(self) -> List[int]:
        return [r.replica for r in self.readers]

    def close(self) -> None:
        for r in self.readers:
            r.close()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f'<Run "{self.path}" replicas={self.replicas} steps={getattr(self, "n_rows", "?")}>'
