"""Build real trace files (real TraceWriter, real HDF5) from numpy arrays, with planted differences.

The truth is known by construction: a :class:`Plant` changes one tensor at one
step on one replica, and (unless ``persist=False``) everything the change flows
into: later tensors of the same step in dataflow order (local kinds on the same
replica only, global kinds on every replica) and every tensor of later steps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from typing import Dict, List, Optional, Sequence

import numpy as np

from tracer import schema
from tracer.config import CaptureConfig
from tracer.hashing import fingerprint
from tracer.schema import TensorSpec
from tracer.writer import TraceWriter

VARIABLES = (("dense/kernel", (4, 3)), ("dense/bias", (3,)), ("out/kernel", (3, 2)))


def model_tensors(variables=VARIABLES, dtype="float32", batch=(8, 4), accumulate=0) -> List[TensorSpec]:
    """The tensor table of a small model, in the capture side's dataflow order."""
    t = [TensorSpec("input", "batch[0]", batch, dtype), TensorSpec("loss", "loss", (), dtype)]
    backprop = list(reversed(variables))
    for k in range(accumulate):
        t += [TensorSpec("local_grad", n, s, dtype, variable=n, micro_step=k) for n, s in backprop]
    t += [TensorSpec("local_grad", n, s, dtype, variable=n) for n, s in backprop]
    t += [TensorSpec("allreduced_grad", n, s, dtype, variable=n) for n, s in backprop]
    t += [TensorSpec("optimizer_slot", f"{n}/momentum", s, dtype, variable=n, slot="momentum") for n, s in variables]
    t += [TensorSpec("optimizer_slot", "iteration", (), "int64"),
          TensorSpec("optimizer_slot", "learning_rate", (), dtype)]
    t += [TensorSpec("weight", n, s, dtype, variable=n) for n, s in variables]
    return t


@dataclasses.dataclass
class Plant:
    """A planted difference: multiply ``(kind, name)`` at ``step`` on ``replica`` by ``1 + rel``.

    ``replica=None`` changes every replica. ``initial=True`` plants in the
    snapshot before the first update. ``value`` replaces one element instead
    (e.g. ``np.nan``). ``persist=False`` changes only that one tensor.
    """

    step: int
    kind: str
    name: str
    replica: Optional[int] = 0
    rel: float = 1e-3
    value: Optional[float] = None
    persist: bool = True
    initial: bool = False
    index: Optional[int] = None
    """Flat index of the one element to change (default: every element, or element 0 for ``value``)."""
    flip_bit: Optional[int] = None
    """Flip this bit of element ``index`` (default 0) instead, as a faulty device would."""
    jitter: float = 0.0
    """Move every element by up to ``jitter * max|x|`` instead (random sign and size, seeded): the
    round-off of a sum computed in another order, which is bounded relative to the scale of the terms."""


def dynamic_rows(step: int, replica: int) -> int:
    """Rows of an input batch of unknown size (``TensorSpec.dynamic``) at ``step``; tests may replace it."""
    return 8


def _base(spec: TensorSpec, step: int, replica: int, seed: int, initial: bool = False) -> np.ndarray:
    per_replica = spec.kind not in schema.GLOBAL_KINDS
    key = f"{seed}|{spec.kind}|{spec.name}|{spec.micro_step}|{step}|{replica if per_replica else -1}|{initial}"
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    if spec.name == "iteration":
        return np.asarray(step + (0 if initial else 1), dtype=np.int64)
    shape = (dynamic_rows(step, replica),) + spec.shape[1:] if spec.dynamic else spec.shape
    x = rng.standard_normal(shape) + 0.5
    return np.asarray(x, dtype=spec.dtype)


def _affected(plant: Plant, specs: Sequence[TensorSpec], j: int, step: int, replica: int, initial: bool) -> int:
    """0: untouched; 1: the planted tensor itself; 2: downstream of it."""
    spec = specs[j]
    target = next(i for i, s in enumerate(specs) if (s.kind, s.name) == (plant.kind, plant.name))
    on_replica = plant.replica is None or plant.replica == replica
    if plant.initial:
        if initial:
            return 1 if j == target and on_replica else 0
        return 2 if plant.persist else 0
    if initial:
        return 0
    if step == plant.step and j == target and on_replica:
        return 1
    if not plant.persist:
        return 0
    if step > plant.step:
        return 2
    if step == plant.step and j > target:
        if spec.kind in schema.GLOBAL_KINDS:
            return 2
        return 2 if on_replica else 0
    return 0


def _value(specs, j, step, replica, seed, plants, initial=False) -> np.ndarray:
    x = _base(specs[j], step, replica, seed, initial)
    for plant in plants:
        hit = _affected(plant, specs, j, step, replica, initial)
        if not hit or specs[j].name == "iteration":
            continue
        if hit == 1 and plant.flip_bit is not None:
            x = x.copy()
            bits = x.reshape(-1).view({2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])
            bits[plant.index or 0] ^= bits.dtype.type(1 << plant.flip_bit)
        elif hit == 1 and plant.jitter:
            # Global kinds move alike on every replica (as an all-reduce result does).
            who = replica if specs[j].kind not in schema.GLOBAL_KINDS else -1
            rng = np.random.default_rng(zlib.crc32(f"jitter|{step}|{who}|{specs[j].name}".encode()))
            scale = float(np.max(np.abs(x)))
            x = (x + plant.jitter * scale * rng.uniform(-1.0, 1.0, x.shape)).astype(x.dtype)
        elif hit == 1 and plant.value is not None:
            x = x.copy()
            x.reshape(-1)[plant.index or 0] = plant.value
        elif hit == 1 and plant.index is not None:
            x = x.copy()
            flat = x.reshape(-1)
            flat[plant.index] = flat[plant.index] * (1 + plant.rel)
        elif hit == 1 or x.dtype.kind == "f":
            x = (x * (1 + plant.rel)).astype(x.dtype) if x.dtype.kind == "f" else x + 1
    return x


def write_run(run_dir, *, steps: int = 12, replicas: int = 2, plants: Sequence[Plant] = (), seed: int = 0,
              tensors: Optional[Sequence[TensorSpec]] = None, first_step: int = 0, full: bool = False,
              full_every: int = 1, attrs: Optional[Dict] = None, run_id: str = "run",
              reverse_columns: bool = False, share_full: bool = True, skipped: Sequence[int] = ()) -> str:
    """Write ``replicas`` trace files into ``run_dir``; returns ``run_dir``.

    ``tensors`` are in dataflow order; ``reverse_columns`` writes the kinds in
    reverse order, and the all-reduce input before the micro-steps, so the
    analyzer cannot rely on the file's column order. (Order *inside* a kind is
    the capture side's backprop order, part of the contract, and is kept.)

    With ``share_full`` the replicas are the local replicas of one worker, as
    the capture side writes them: a full tensor of a global kind whose hash
    equals replica 0's at that step is kept only in ``replica-0.h5``.

    ``skipped`` lists steps whose update was skipped (once per occurrence), as a
    LossScaleOptimizer does: recorded before that step's row.
    """
    specs = list(tensors or model_tensors())
    order = list(range(len(specs)))
    if reverse_columns:
        order.sort(key=lambda i: (-schema.KIND_ORDER[specs[i].kind], specs[i].micro_step >= 0, i))
    config = CaptureConfig(mode="full" if full else "fingerprint", full_every=full_every)
    base_attrs = {"versions": {"tensorflow": "2.16.1", "numpy": np.__version__},
                  "env": {"TF_ENABLE_ONEDNN_OPTS": "0"}, "seeds": {"weights": seed}, "strategy": "MirroredStrategy",
                  "xla": False, "op_determinism": True}
    base_attrs.update(attrs or {})
    if share_full:
        base_attrs[schema.ATTR_REPLICA_FILES] = json.dumps({str(r): schema.replica_file_name(r)
                                                            for r in range(replicas)})
    os.makedirs(run_dir, exist_ok=True)
    first_hashes: Dict[int, np.ndarray] = {}
    for r in range(replicas):
        a = dict(base_attrs, replica=r, num_replicas=replicas, run_id=run_id, initial_step=first_step)
        path = os.path.join(run_dir, schema.replica_file_name(r))
        shared = [c for c, j in enumerate(order) if specs[j].kind in schema.GLOBAL_KINDS] if share_full and r else []
        with TraceWriter(path, [specs[j] for j in order], attrs=a, config=config, shared_columns=shared) as w:
            cols = w.initial_columns
            init = [_value(specs, order[c], first_step, r, seed, plants, initial=True) for c in cols]
            w.write_initial(first_step, _stack([fingerprint(x) for x in init]), init if full else None)
            for s in range(first_step, first_step + steps):
                for _ in range(list(skipped).count(s)):
                    w.write_skipped(s)
                vals = [_value(specs, j, s, r, seed, plants) for j in order]
                fps = _stack([fingerprint(x) for x in vals])
                if r == 0:
                    first_hashes[s] = fps[0]
                stored_in = {c: 0 for c in shared if fps[0][c] == first_hashes[s][c]} if config.wants_full(s) else None
                w.write_step(s, fps, vals if config.wants_full(s) else None, stored_in=stored_in)
    return str(run_dir)


def _stack(fps) -> List[np.ndarray]:
    cols = list(zip(*fps))
    return [np.array([int(h) for h in cols[0]], dtype=np.uint64)] + [
        np.array(c, dtype=d) for c, (_, d) in zip(cols[1:], schema.STATS[1:])]


def assert_full_reads_back(reader, written) -> None:
    """Every full tensor ``written[step][col]`` reads back with its shape and bits, and hashes to its fingerprint."""
    from tracer.hashing import tensor_hash

    hashes = reader.fingerprints("hash")
    for step, arrays in enumerate(written):
        for col, expected in enumerate(arrays):
            got = reader.full(col, step)
            assert got.shape == np.shape(expected), (step, col)
            np.testing.assert_array_equal(got, expected)
            # The bytes read back are the bytes that were fingerprinted.
            assert tensor_hash(got) == int(hashes[step, col])
