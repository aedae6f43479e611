"""The trace file format: the one contract between the capture and analysis halves.

Every HDF5 path, attribute name and the schema version live here; the writer and
the reader both import them and nothing else spells them out. The layout is
documented for ``h5ls`` users in ``docs/trace-format.md``.

Layout of ``<trace_dir>/replica-<global replica index>.h5`` (and of its segments
``replica-<g>.seg<k>.h5``, written by a job resumed from a checkpoint; see
``tracer/segments.py``)::

    /                       root attributes: the run environment (see ENV_ATTRS)
    /meta/tensors           JSON string: the tensor table, one record per column
    /meta/flushed           int64 (3,)      rows durable at the last flush (see META_FLUSHED)
    /steps                  int64 (S,)      optimizer step of each row
    /fingerprints/<stat>    (S, T)          one column per tensor, see STATS
    /full/steps             int64 (N,)      steps that have full tensors
    /full/stored_in         int32 (N, T)    replica whose file holds row n of /full/<col> (schema 3)
    /full/rows              int64 (N, T)    leading-axis length stored in row n of /full/<col> (schema 4)
    /full/<col>             (N, *shape)     full tensor of column <col>
    /skipped                int64 (K,)      steps whose update was skipped (schema 5, see SKIPPED)
    /initial/...            same layout for the state before the first update

Steps are numbered by the optimizer's iteration counter *before* the update: row
``s`` holds the input, loss and gradients that update ``s`` consumed and the
optimizer slots and weights it produced. ``/initial`` holds the weights and slots
before update ``initial_step`` (0 for a fresh run), so "the weights at step 0,
before any update" has a home.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Dict, List, Sequence, Tuple

from tracer.errors import TraceFormatError

SCHEMA_VERSION = 5
"""Bumped on any incompatible change of the layout below.

Version 2 added segments: a resumed job continues a replica's trace in
``replica-<g>.seg<k>.h5`` (root attribute ``segment`` = k). The files themselves
are laid out as in version 1, but a version-1 reader would silently ignore the
segments, so it must refuse the files instead.

Version 3 added ``/full/stored_in``: a full tensor of a global kind that is
bitwise equal (equal hash) to the same tensor of another local replica of the
worker at the same step is kept once, in that replica's file. An older reader
would read the row it does not hold as zeros, so it must refuse the files.

Version 4 added ``/full/rows``: an input batch smaller than its column's shape
(the last, partial batch of an epoch, or a batch split unevenly across
replicas) fills only the first rows of its full-tensor row. An older reader
would return the unwritten rest as data, so it must refuse the files.

Version 5 allows an input column whose batch size was not known when the step
was traced (``shape[0] == -1``, ``UNKNOWN_DIM``): a dataset batched without
``drop_remainder`` whose iterator is read inside the ``tf.function``. Its
``/full/<col>`` is (N, L, *shape[1:]), L growing with the longest batch written,
and ``/full/rows`` gives each row's length. An older reader would reject the
table, so the version says so first."""
READABLE_VERSIONS = (1, 2, 3, 4, 5)
"""Schema versions this reader accepts (a version-1 file is a run of one segment; versions 1 and 2
hold every full tensor in the file itself)."""

FILE_PATTERN = "replica-{replica}.h5"
FILE_REGEX = re.compile(r"^replica-(\d+)\.h5$")
SEGMENT_PATTERN = "replica-{replica}.seg{segment}.h5"
TRACE_FILE_REGEX = re.compile(r"^replica-(\d+)(?:\.seg(\d+))?\.h5$")
"""Any trace file of a run directory: group 1 the replica, group 2 the segment (None for segment 0)."""

# Root attributes.
ATTR_SCHEMA = "schema_version"
ATTR_PRODUCER = "producer"
ATTR_RUN_ID = "run_id"
ATTR_REPLICA = "replica"
ATTR_LOCAL_REPLICA = "local_replica"
ATTR_WORKER = "worker"
ATTR_NUM_REPLICAS = "num_replicas"
ATTR_NUM_WORKERS = "num_workers"
ATTR_INITIAL_STEP = "initial_step"
ATTR_COMPLETE = "complete"
"""Set to 1 by a clean close; absent or 0 means the run stopped mid-way."""
ATTR_SEGMENT = "segment"
"""Segment index k: 0 for ``replica-<g>.h5``, k for ``replica-<g>.seg<k>.h5`` (schema 2; absent = 0)."""
ATTR_REPLICA_FILES = "replica_files"
"""JSON object: global replica index -> file name, for every local replica of this file's worker
(schema 3). ``/full/stored_in`` names replicas; this names their files, in the same directory."""

# Root attributes that legitimately differ between replicas of one run, or
# between any two runs; the environment diff skips them.
PER_FILE_ATTRS = frozenset({
    ATTR_REPLICA, ATTR_LOCAL_REPLICA, ATTR_WORKER, ATTR_RUN_ID, ATTR_COMPLETE, ATTR_SEGMENT,
    ATTR_REPLICA_FILES, "device", "pid",
})

# Groups and datasets.
META_TENSORS = "meta/tensors"
META_CONFIG = "meta/config"
META_FLUSHED = "meta/flushed"
"""int64 (3,): rows of /steps, /full/steps and /initial/steps on disk at the last completed flush.
A reader of a file that was not closed cleanly trusts no row beyond these (rows after the last
flush may be partly written)."""
STEPS = "steps"
FINGERPRINTS = "fingerprints"
FULL = "full"
FULL_STEPS = "full/steps"
FULL_STORED_IN = "full/stored_in"
"""int32 (N, T), schema 3: the global replica whose file holds row n of ``/full/<col>``. This file's
own replica, except for a tensor of a GLOBAL_KIND found bitwise equal (by hash) to that of the
worker's first local replica at the same step: its bytes are written once, in that replica's file,
and this file's row is left unallocated."""
FULL_ROWS = "full/rows"
"""int64 (N, T), schema 4: the length along the first axis of the tensor stored in row n of
``/full/<col>``. The column's ``shape[0]``, except for an input batch that was smaller at that step
on this replica (an epoch's last, partial batch, or a batch split unevenly across replicas): the
row then holds that many entries and the rest of it is not data. 0 for a scalar column. Files of
schema 1-3 have no such dataset: every row is whole."""
INITIAL = "initial"
SKIPPED = "skipped"
"""int64 (K,), schema 5: the optimizer step of each ``strategy.run`` whose update did not happen
(``LossScaleOptimizer`` skips the update when the gradients are not finite). Such a run has no row: the
next update is the same optimizer step. Absent in older files (no skip was recorded)."""

STATS: Tuple[Tuple[str, str], ...] = (
    ("hash", "uint64"),
    ("l2", "float64"),
    ("max_abs", "float64"),
    ("nan", "int64"),
    ("inf", "int64"),
)
"""Fingerprint statistics: name and on-disk dtype. Order is the order of the
vector the capture side produces per tensor."""
STAT_NAMES = tuple(name for name, _ in STATS)

KINDS = ("input", "loss", "local_grad", "allreduced_grad", "optimizer_slot", "weight")
"""Tensor kinds in dataflow order inside one step."""
KIND_ORDER = {kind: i for i, kind in enumerate(KINDS)}
GLOBAL_KINDS = frozenset({"allreduced_grad", "optimizer_slot", "weight"})
"""Kinds whose values must be bitwise equal on every replica of one run."""

UNKNOWN_DIM = -1
"""``shape[0]`` of an input column whose batch size varies, unknown when the step was traced (schema 5)."""

SUPPORTED_DTYPES = frozenset({
    "float16", "bfloat16", "float32", "float64",
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool",
})


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One captured tensor: one column of every fingerprint dataset.

    Attributes:
        kind: One of ``KINDS``.
        name: The tensor's name: the Keras variable path for gradients and
            weights, ``<path>/<slot>`` for optimizer slots, ``loss``, or
            ``batch[<i>]`` for input components.
        shape: Static shape; an input's first axis may be ``UNKNOWN_DIM``
            (a batch of unknown size, see ``dynamic``).
        dtype: NumPy dtype name.
        variable: Model variable this tensor belongs to ("" if none).
        slot: Optimizer slot name ("" if not a slot).
        micro_step: Micro-step index under gradient accumulation, -1 otherwise.
    """

    kind: str
    name: str
    shape: Tuple[int, ...]
    dtype: str
    variable: str = ""
    slot: str = ""
    micro_step: int = -1

    def __post_init__(self):
        if self.kind not in KIND_ORDER:
            raise TraceFormatError(f"`kind` must be one of {KINDS}. Received: kind={self.kind!r}")
        if not isinstance(self.name, str) or not self.name:
            raise TraceFormatError(f"`name` must be a non-empty string. Received: name={self.name!r}")
        if self.dtype not in SUPPORTED_DTYPES:
            raise TraceFormatError(
                f"`dtype` must be one of {sorted(SUPPORTED_DTYPES)}. Received: dtype={self.dtype!r}")
        if not isinstance(self.micro_step, int) or isinstance(self.micro_step, bool):
            raise TraceFormatError(f"`micro_step` must be an int. Received: micro_step={self.micro_step!r}")
        shape = tuple(self.shape)
        if any(not isinstance(d, int) or isinstance(d, bool) or (d < 0 and (k or d != UNKNOWN_DIM))
               for k, d in enumerate(shape)):
            raise TraceFormatError(f"`shape` must hold non-negative ints (the first may be {UNKNOWN_DIM}). "
                                   f"Received: shape={self.shape!r}")
        if shape and shape[0] == UNKNOWN_DIM and self.kind != "input":
            raise TraceFormatError(f"only an input may have a first axis of unknown length. Received: "
                                   f"kind={self.kind!r}, shape={self.shape!r}")
        object.__setattr__(self, "shape", shape)

    @property
    def key(self) -> Tuple[str, str, int]:
        """Identity of the tensor across runs and replicas."""
        return (self.kind, self.name, self.micro_step)

    @property
    def label(self) -> str:
        """Human-readable name including the micro-step."""
        if self.micro_step >= 0:
            return f"{self.name} (micro-step {self.micro_step})"
        return self.name

    @property
    def dynamic(self) -> bool:
        """Whether the first axis varies from step to step (``shape[0] == UNKNOWN_DIM``)."""
        return bool(self.shape) and self.shape[0] == UNKNOWN_DIM

    @property
    def size(self) -> int:
        """Elements in the tensor; ``UNKNOWN_DIM`` (-1) when the first axis varies (``dynamic``)."""
        if self.dynamic:
            return UNKNOWN_DIM
        n = 1
        for d in self.shape:
            n *= d
        return n

    def fits(self, shape: Sequence[int]) -> bool:
        """Whether a full tensor of ``shape`` fits this column: only the first axis may be shorter (any
        length for a ``dynamic`` column)."""
        shape = tuple(shape)
        if len(shape) != len(self.shape) or shape[1:] != self.shape[1:]:
            return False
        return not shape or self.dynamic or shape[0] <= self.shape[0]

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TensorSpec":
        if not isinstance(d, dict):
            raise TraceFormatError(f"tensor record must be an object. Received: {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise TraceFormatError(f"tensor record has unknown fields {sorted(unknown)}")
        try:
            return cls(**{**d, "shape": tuple(d.get("shape", ()))})
        except TypeError as exc:
            raise TraceFormatError(f"tensor record is malformed: {exc}") from exc


def same_layout(a: TensorSpec, b: TensorSpec) -> bool:
    """Whether two runs' columns hold comparable tensors: same dtype and shape, a first axis of unknown
    length (``dynamic``) matching any length."""
    if a.dtype != b.dtype or len(a.shape) != len(b.shape) or a.shape[1:] != b.shape[1:]:
        return False
    return a.shape[:1] == b.shape[:1] or a.dynamic or b.dynamic


def dataflow_sort_key(spec: TensorSpec, position: int) -> Tuple[int, int, int]:
    """Sort key that puts tensors in dataflow order inside one step.

    ``position`` is the tensor's index inside its kind as the capture side
    produced it (already backprop order for local gradients).
    """
    micro = spec.micro_step if spec.micro_step >= 0 else 1 << 30
    return (KIND_ORDER[spec.kind], micro, position)


def encode_tensors(specs: Sequence[TensorSpec]) -> str:
    return json.dumps([s.to_dict() for s in specs], separators=(",", ":"))


def decode_tensors(text: str) -> List[TensorSpec]:
    try:
        records = json.loads(text)
    except (ValueError, TypeError) as exc:
        raise TraceFormatError(f"tensor table is not valid JSON: {exc}") from exc
    if not isinstance(records, list):
        raise TraceFormatError("tensor table must be a JSON list")
    specs = [TensorSpec.from_dict(r) for r in records]
    keys = [s.key for s in specs]
    if len(set(keys)) != len(keys):
        raise TraceFormatError("tensor table names the same tensor twice")
    return specs


def full_path(col: int, group: str = "") -> str:
    """Dataset path of the full tensor of column ``col``."""
    base = f"{group}/{FULL}" if group else FULL
    return f"{base}/{col:05d}"


def replica_file_name(replica: int, segment: int = 0) -> str:
    """``replica-<g>.h5`` for segment 0, ``replica-<g>.seg<k>.h5`` for segment k >= 1."""
    if segment == 0:
        return FILE_PATTERN.format(replica=replica)
    return SEGMENT_PATTERN.format(replica=replica, segment=segment)
