"""Mutated trace files for the analyzer's fuzz test and bench (TensorFlow-free).

:func:`make_cases` copies a valid run (written by the real TraceWriter) and
damages one file per case in one of the ways :data:`MUTATIONS` names. Each case
says what the analyzer must do with it:

* ``"error"``: the mutation breaks something the analyzer reads; ``tracer.bisect``
  and ``tracer.check`` must exit 2 with one line naming the file.
* ``"diverged"``: a flipped bit in a fingerprint hash the analyzer compares; a
  legitimate divergence, so bisect must exit 1.
* ``"any"``: the mutation may or may not touch what the analyzer reads (a bit in
  a data value, an unused byte, an environment attribute): exit 0, 1 or 2, but
  never a traceback or a hang, and a 2 must still be one line naming the file.

:func:`run_cases` executes cases in-process (bisect and check ``main``) and
:func:`run_batch` runs them in a subprocess with a time limit, so a hang inside
HDF5 is caught and named rather than blocking the test run. Run as
``python -m tests.unit.tracefuzz CASES.json RESULTS.jsonl`` (the subprocess).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

import h5py
import numpy as np

from tracer import schema
from tracer.writer import fixed_string

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ESC = "\x1b"
CONTROL_NAME = "evil\x1b[31mRED\x1b[0m\x07\r\nname"


# ----------------------------------------------------------------- byte maps
def data_regions(path: str) -> Dict[str, List[tuple]]:
    """``{dataset path: [(file offset, length), ...]}`` of every dataset's raw data."""
    out: Dict[str, List[tuple]] = {}

    def visit(name, obj):
        if not isinstance(obj, h5py.Dataset) or obj.dtype.kind == "O":
            return
        dsid = obj.id
        if obj.chunks is None:
            off = dsid.get_offset()
            if off is not None:
                out[name] = [(off, dsid.get_storage_size())]
            return
        regions = []
        for i in range(dsid.get_num_chunks()):
            info = dsid.get_chunk_info(i)
            regions.append((info.byte_offset, info.size, info.chunk_offset))
        out[name] = regions

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return out


def hash_value_bytes(path: str) -> List[tuple]:
    """(offset, length) of the valid rows of /fingerprints/hash (rows < len(/steps))."""
    with h5py.File(path, "r") as f:
        d = f[f"{schema.FINGERPRINTS}/hash"]
        rows, ncols = f[schema.STEPS].shape[0], d.shape[1]
        chunk_rows = d.chunks[0]
    out = []
    for off, _, chunk_offset in data_regions(path)[f"{schema.FINGERPRINTS}/hash"]:
        valid = max(0, min(chunk_rows, rows - chunk_offset[0]))
        if valid:
            out.append((off, valid * ncols * 8))
    return out


def _flip(path: str, offset: int, rng) -> str:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        bit = int(rng.integers(8))
        f.seek(offset)
        f.write(bytes([b ^ (1 << bit)]))
    return f"bit {bit} of byte {offset}"


def _pick(regions: List[tuple], rng) -> int:
    sizes = np.array([r[1] for r in regions], dtype=np.float64)
    r = regions[int(rng.choice(len(regions), p=sizes / sizes.sum()))]
    return int(r[0] + rng.integers(r[1]))


# ----------------------------------------------------------------- mutations
# Each takes (run_dir, victim file, rng, context) and returns (description, expectation).

REQUIRED = [schema.META_TENSORS, schema.META_CONFIG, schema.STEPS, schema.FULL_STEPS, schema.FULL_STORED_IN,
            f"{schema.INITIAL}/columns", f"{schema.INITIAL}/{schema.STEPS}"] + [
    f"{g}{schema.FINGERPRINTS}/{s}" for g in ("", f"{schema.INITIAL}/") for s in schema.STAT_NAMES]


def m_truncate(run, path, rng, ctx):
    size = os.path.getsize(path)
    keep = int(rng.integers(0, size))
    with open(path, "r+b") as f:
        f.truncate(keep)
    return f"truncated to {keep} of {size} bytes", "error"


def m_empty(run, path, rng, ctx):
    open(path, "wb").close()
    return "empty file", "error"


def m_garbage(run, path, rng, ctx):
    size = os.path.getsize(path)
    head = b"\x89HDF\r\n\x1a\n" if rng.random() < 0.5 else b""
    with open(path, "wb") as f:
        f.write(head + rng.bytes(int(rng.integers(1, size))))
    return f"random bytes{' after the HDF5 signature' if head else ''}", "error"


def m_flip_meta(run, path, rng, ctx):
    """A bit outside every dataset's raw data: superblock, object headers, indexes, heaps, free space."""
    size = os.path.getsize(path)
    data = sorted((r[0], r[1]) for regions in data_regions(path).values() for r in regions)
    while True:
        off = int(rng.integers(size))
        if not any(o <= off < o + n for o, n in data):
            return f"metadata flip: {_flip(path, off, rng)}", "any"


def m_flip_data(run, path, rng, ctx):
    regions = [(r[0], r[1]) for regs in data_regions(path).values() for r in regs if r[1]]
    return f"data flip: {_flip(path, _pick(regions, rng), rng)}", "any"


def m_flip_hash(run, path, rng, ctx):
    return f"hash flip: {_flip(path, _pick(hash_value_bytes(path), rng), rng)}", "diverged"


def _edit(path: str, fn: Callable[[h5py.File], Optional[str]]) -> Optional[str]:
    with h5py.File(path, "r+") as f:
        return fn(f)


def m_delete(run, path, rng, ctx):
    name = str(rng.choice(REQUIRED + ["fingerprints", "meta", "initial", "full"]))
    _edit(path, lambda f: f.__delitem__(name))
    return f"deleted /{name}", "error"


def m_delete_full_column(run, path, rng, ctx):
    with h5py.File(path, "r") as f:
        cols = sorted(k for k in f[schema.FULL] if k not in ("steps", "stored_in", "rows"))
    name = f"{schema.FULL}/{rng.choice(cols)}"
    _edit(path, lambda f: f.__delitem__(name))
    return f"deleted /{name}", "any"


def _poke(path, rng, name, choices):
    """Set one entry of the (N, T) table ``name`` to another of ``choices(old)``."""
    def poke(f):
        d = f[name]
        if not d.shape[0]:
            return "no full steps"
        n, c = int(rng.integers(d.shape[0])), int(rng.integers(d.shape[1]))
        old = int(d[n, c])
        new = int(rng.choice([v for v in choices(old) if v != old]))
        d[n, c] = new
        return f"/{name}[{n}, {c}]: {old} -> {new}"
    return _edit(path, poke)


def m_stored_in(run, path, rng, ctx):
    """Point one full tensor at another replica's file (or at none)."""
    return _poke(path, rng, schema.FULL_STORED_IN, lambda old: (-1, 0, 1, 2, 7)), "any"


def m_rows(run, path, rng, ctx):
    """Give one full tensor another length along its first axis: negative, too long, or shorter."""
    return _poke(path, rng, schema.FULL_ROWS, lambda old: (-1, 0, 1, old - 1, old + 1, 2**40)), "any"


def m_group_for_dataset(run, path, rng, ctx):
    name = str(rng.choice(REQUIRED))

    def fn(f):
        del f[name]
        f.create_group(name)
    _edit(path, fn)
    return f"/{name} replaced by a group", "error"


def m_dataset_for_group(run, path, rng, ctx):
    name = str(rng.choice(["fingerprints", "meta", "initial", "initial/fingerprints"]))

    def fn(f):
        del f[name]
        f[name] = np.arange(3)
    _edit(path, fn)
    return f"group /{name} replaced by a dataset", "error"


SCHEMA_VALUES = [0, schema.SCHEMA_VERSION + 1, 99, -1, 2**62, "1", b"1", 1.0, np.array([1, 1]), np.float32(1), True]


def m_schema(run, path, rng, ctx):
    value = SCHEMA_VALUES[int(rng.integers(len(SCHEMA_VALUES)))]
    _edit(path, lambda f: f.attrs.__setitem__(schema.ATTR_SCHEMA, value))
    return f"schema_version = {value!r}", "error"


def m_schema_missing(run, path, rng, ctx):
    _edit(path, lambda f: f.attrs.__delitem__(schema.ATTR_SCHEMA))
    return "no schema_version", "error"


BAD_ATTR_VALUES = ["x", -1, 1e300, np.array([1, 2]), np.array(["a", "b"], dtype=h5py.string_dtype()), b"\xff"]


def m_index_attr(run, path, rng, ctx):
    """The attributes the reader interprets (replica, num_replicas, initial_step) with nonsense values."""
    name = str(rng.choice([schema.ATTR_REPLICA, schema.ATTR_NUM_REPLICAS, schema.ATTR_INITIAL_STEP,
                           schema.ATTR_COMPLETE]))
    value = BAD_ATTR_VALUES[int(rng.integers(len(BAD_ATTR_VALUES)))]
    _edit(path, lambda f: f.attrs.__setitem__(name, value))
    return f"{name} = {value!r}", "error"


def m_env_attr(run, path, rng, ctx):
    """An environment attribute (shown in the env diff only) with another dtype or an escape sequence."""
    value = [7, 1.5, np.array([1, 2]), fixed_string(CONTROL_NAME), np.arange(10**5),
             CONTROL_NAME][int(rng.integers(6))]
    _edit(path, lambda f: f.attrs.__setitem__("env.TF_ENABLE_ONEDNN_OPTS", value))
    # A Python str is stored as a variable-length string, which the reader refuses.
    return f"env attribute = {value!r:.40}", "error" if isinstance(value, str) else "any"


def m_object_attr(run, path, rng, ctx):
    value = np.array(["a", "b"], dtype=h5py.string_dtype())
    _edit(path, lambda f: f.attrs.__setitem__("strategy", value))
    return "object-dtype (vlen string array) root attribute", "error"


def _set_text(f, name, text):
    del f[name]
    f.create_dataset(name, data=fixed_string(text))


def _tensor_table_variants(records):
    r0 = dict(records[-1])
    yield "not JSON", "{[", "error"
    yield "JSON object", "{}", "error"
    yield "empty list", "[]", "error"
    yield "record missing fields", json.dumps([{"kind": "weight"}] + records[1:]), "error"
    yield "unknown kind", json.dumps(records[:-1] + [dict(r0, kind="gradient")]), "error"
    yield "unsupported dtype", json.dumps(records[:-1] + [dict(r0, dtype="object")]), "error"
    yield "absurd shape", json.dumps(records[:-1] + [dict(r0, shape=[2**40, 2**40])]), "error"
    yield "negative shape", json.dumps(records[:-1] + [dict(r0, shape=[-1])]), "error"
    yield "shape is a string", json.dumps(records[:-1] + [dict(r0, shape="3")]), "error"
    yield "duplicate tensor", json.dumps(records[:-1] + [records[-2]]), "error"
    yield "one column less", json.dumps(records[:-1]), "error"
    yield "name is a number", json.dumps(records[:-1] + [dict(r0, name=5)]), "error"
    yield "micro_step is a float", json.dumps(records[:-1] + [dict(r0, micro_step=0.5)]), "error"
    yield "deeply nested", "[" * 100000 + "]" * 100000, "error"


def m_tensor_table(run, path, rng, ctx):
    with h5py.File(path, "r") as f:
        records = json.loads(f[schema.META_TENSORS][()])
    variants = list(_tensor_table_variants(records))
    what, text, expect = variants[int(rng.integers(len(variants)))]
    _edit(path, lambda f: _set_text(f, schema.META_TENSORS, text))
    return f"tensor table: {what}", expect


def m_tensor_table_dtype(run, path, rng, ctx):
    value = [np.arange(4), np.array([b"[]", b"[]"]), np.float64(1.0)][int(rng.integers(3))]

    def fn(f):
        del f[schema.META_TENSORS]
        f[schema.META_TENSORS] = value
    _edit(path, fn)
    return f"tensor table stored as {np.asarray(value).dtype}{np.asarray(value).shape}", "error"


def m_config(run, path, rng, ctx):
    text = ["", "nope", "[]", json.dumps({"mode": "sideways"}), json.dumps({"flush_every": -3}),
            json.dumps({"unknown": 1}), json.dumps({"full_window": [5]}), json.dumps({"kinds": 3})][
        int(rng.integers(8))]
    _edit(path, lambda f: _set_text(f, schema.META_CONFIG, text))
    return f"capture config {text!r}", "error"


def m_steps_order(run, path, rng, ctx):
    name = str(rng.choice([schema.STEPS, schema.FULL_STEPS]))

    def fn(f):
        d = f[name]
        i = int(rng.integers(1, d.shape[0]))
        d[i] = d[i - 1]
    _edit(path, fn)
    return f"/{name} not strictly increasing", "error" if name == schema.STEPS else "any"


def _replace(f, name, **kwargs):
    del f[name]
    return f.create_dataset(name, **kwargs)


def m_wrong_dtype(run, path, rng, ctx):
    name = str(rng.choice(REQUIRED[2:]))
    kind = int(rng.integers(3))

    def fn(f):
        old = f[name]
        shape = old.shape
        if kind == 0:
            _replace(f, name, data=np.zeros(shape, dtype=np.float32) if name.endswith(("steps", "columns"))
                     else np.zeros(shape, dtype=np.complex64))
        elif kind == 1:
            _replace(f, name, shape=shape, dtype=h5py.string_dtype())
        else:
            _replace(f, name, data=np.zeros(shape, dtype=[("a", "<i8")]))
    _edit(path, fn)
    return f"/{name} with a wrong dtype ({['float/complex', 'object', 'compound'][kind]})", "error"


def m_wrong_shape(run, path, rng, ctx):
    name = str(rng.choice(REQUIRED[2:]))

    def fn(f):
        old = f[name][()]
        new = old[..., :-1] if old.ndim == 2 else old.reshape(old.shape + (1,))
        _replace(f, name, data=new)
    _edit(path, fn)
    return f"/{name} with a wrong shape", "error"


def m_absurd_shape(run, path, rng, ctx):
    """Declared shapes far beyond what the file stores (read naively, they exhaust memory)."""
    which = int(rng.integers(4))

    def fn(f):
        ncols = f[f"{schema.FINGERPRINTS}/hash"].shape[1]
        if which == 0:  # every row-indexed table claims 2**40 rows
            for name in [schema.STEPS] + [f"{schema.FINGERPRINTS}/{s}" for s, _ in schema.STATS]:
                dtype = f[name].dtype
                shape = (2**40,) if name == schema.STEPS else (2**40, ncols)
                _replace(f, name, shape=shape, maxshape=(None,) + shape[1:], dtype=dtype,
                         chunks=(256,) + shape[1:])
            return "steps and fingerprints claim 2**40 rows"
        if which == 1:
            _replace(f, f"{schema.INITIAL}/columns", shape=(2**40,), dtype=np.int64, chunks=(1024,))
            return "/initial/columns claims 2**40 entries"
        if which == 2:
            _replace(f, schema.FULL_STEPS, shape=(2**40,), maxshape=(None,), dtype=np.int64, chunks=(64,))
            return "/full/steps claims 2**40 entries"
        name = schema.full_path(0)
        shape = f[name].shape
        _replace(f, name, shape=(shape[0], 2**20, 2**20), dtype=f[name].dtype, chunks=(1, 64, 64))
        return "/full/00000 claims 2**40 elements per step"
    what = _edit(path, fn)
    return what, "error" if which < 3 else "any"


def m_external_link(run, path, rng, ctx):
    """Links and storage that point outside the file: none may be followed.

    The target is a FIFO: opening it blocks, so following the link would hang.
    """
    fifo = ctx["fifo"]
    which = int(rng.integers(6))

    def fn(f):
        if which == 0:
            del f[schema.STEPS]
            f[schema.STEPS] = h5py.ExternalLink(fifo, "/steps")
            return "/steps is an external link"
        if which == 1:
            del f[schema.FINGERPRINTS]
            f[schema.FINGERPRINTS] = h5py.ExternalLink(fifo, "/fingerprints")
            return "/fingerprints (a group) is an external link"
        if which == 2:
            del f[schema.META_TENSORS]
            f[schema.META_TENSORS] = h5py.SoftLink(f"/{schema.META_CONFIG}")
            return "/meta/tensors is a soft link"
        if which == 3:
            steps = f[schema.STEPS][()]
            layout = h5py.VirtualLayout(shape=steps.shape, dtype=steps.dtype, maxshape=(None,))
            layout[:] = h5py.VirtualSource(fifo, "/steps", shape=steps.shape)
            del f[schema.STEPS]
            f.create_virtual_dataset(schema.STEPS, layout)
            return "/steps is a virtual dataset in another file"
        if which == 4:
            steps = f[schema.STEPS][()]
            del f[schema.STEPS]
            f.create_dataset(schema.STEPS, shape=steps.shape, dtype=steps.dtype,
                             external=[(fifo, 0, h5py.h5f.UNLIMITED)])
            return "/steps stores its data in an external file"
        name = schema.full_path(0)
        del f[name]
        f[name] = h5py.ExternalLink(fifo, "/x")
        return "/full/00000 is an external link"
    what = _edit(path, fn)
    return what, "any" if which == 5 else "error"


def m_directory(run, path, rng, ctx):
    os.remove(path)
    os.mkdir(path)
    return "directory where a trace file was expected", "error"


def m_fifo(run, path, rng, ctx):
    os.remove(path)
    os.mkfifo(path)
    return "FIFO where a trace file was expected", "error"


def m_symlink_dev(run, path, rng, ctx):
    os.remove(path)
    os.symlink("/dev/zero", path)
    return "symlink to /dev/zero", "error"


def m_missing_replica(run, path, rng, ctx):
    os.remove(path)
    return "replica file missing", "any"


def m_initial_columns(run, path, rng, ctx):
    def fn(f):
        cols = f[f"{schema.INITIAL}/columns"][()]
        cols[int(rng.integers(cols.size))] = [-1, 10**9][int(rng.integers(2))]
        _replace(f, f"{schema.INITIAL}/columns", data=cols)
    _edit(path, fn)
    return "/initial/columns out of range", "error"


def m_control_names(run, path, rng, ctx):
    """Every replica's tensor table renames one tensor with ANSI escapes and control characters."""
    for name in os.listdir(run):
        p = os.path.join(run, name)
        with h5py.File(p, "r+") as f:
            records = json.loads(f[schema.META_TENSORS][()])
            records[-1]["name"] = CONTROL_NAME
            records[-1]["variable"] = CONTROL_NAME
            _set_text(f, schema.META_TENSORS, json.dumps(records))
    return "tensor names with escape sequences", "any"


MUTATIONS: Dict[str, Callable] = {
    "truncate": m_truncate, "empty": m_empty, "garbage": m_garbage,
    "flip_meta": m_flip_meta, "flip_data": m_flip_data, "flip_hash": m_flip_hash,
    "delete": m_delete, "delete_full_column": m_delete_full_column,
    "group_for_dataset": m_group_for_dataset, "dataset_for_group": m_dataset_for_group,
    "schema": m_schema, "schema_missing": m_schema_missing, "index_attr": m_index_attr,
    "env_attr": m_env_attr, "object_attr": m_object_attr, "tensor_table": m_tensor_table,
    "tensor_table_dtype": m_tensor_table_dtype, "config": m_config, "steps_order": m_steps_order,
    "wrong_dtype": m_wrong_dtype, "wrong_shape": m_wrong_shape, "absurd_shape": m_absurd_shape,
    "external_link": m_external_link, "directory": m_directory, "fifo": m_fifo,
    "symlink_dev": m_symlink_dev, "missing_replica": m_missing_replica,
    "initial_columns": m_initial_columns, "control_names": m_control_names, "stored_in": m_stored_in,
    "rows": m_rows,
}
# Bit flips are where HDF5 itself is exercised hardest; give them more cases.
WEIGHTS = {name: 1.0 for name in MUTATIONS}
WEIGHTS.update(truncate=3.0, flip_meta=6.0, flip_data=3.0, flip_hash=2.0)


def make_cases(good_run: str, out_dir: str, n: int, seed: int = 0) -> List[dict]:
    """``n`` mutated copies of ``good_run`` under ``out_dir``; every mutation class at least once."""
    rng = np.random.default_rng(seed)
    names = list(MUTATIONS)
    p = np.array([WEIGHTS[k] for k in names])
    order = names + [str(x) for x in rng.choice(names, size=max(0, n - len(names)), p=p / p.sum())]
    files = sorted(os.listdir(good_run))
    fifo = os.path.join(out_dir, "link-target.fifo")
    os.makedirs(out_dir, exist_ok=True)
    if not os.path.exists(fifo):
        os.mkfifo(fifo)
    cases = []
    for i, kind in enumerate(order[:n]):
        run = os.path.join(out_dir, f"case{i:05d}")
        shutil.copytree(good_run, run)
        victim = os.path.join(run, files[int(rng.integers(len(files)))])
        what, expect = MUTATIONS[kind](run, victim, rng, {"fifo": fifo})
        cases.append({"id": i, "kind": kind, "what": what, "expect": expect, "run": run, "file": victim,
                      "good": good_run})
    return cases


# ------------------------------------------------------------------ running
def _call(main, argv):
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        exc = None
    except SystemExit as e:  # argparse; must not happen here
        code, exc = e.code, f"SystemExit({e.code})"
    except BaseException:  # noqa: BLE001 - reported as a failure of the case
        code, exc = None, traceback.format_exc()
    return {"code": code, "out": out.getvalue(), "err": err.getvalue(), "exc": exc}


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM).

    Not ru_maxrss: Linux carries that across fork and exec, so a process started
    from a test run that had loaded TensorFlow would report TensorFlow's memory.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_cases(cases: List[dict], results_path: str) -> None:
    """Run bisect (good vs. case) and check (case) on each case; append one JSON line per case."""
    from tracer.bisect import main as bisect
    from tracer.check import main as check

    with open(results_path, "a") as out:
        for case in cases:
            out.write(json.dumps({"start": case["id"]}) + "\n")
            out.flush()
            t0 = time.monotonic()
            res = {"id": case["id"],
                   "bisect": _call(bisect, [case["good"], case["run"]]),
                   "check": _call(check, [case["run"]])}
            res["seconds"] = time.monotonic() - t0
            res["maxrss_mb"] = _peak_rss_mb()
            out.write(json.dumps(res) + "\n")
            out.flush()


def run_batch(cases: List[dict], work_dir: str, timeout: float, memory_limit_mb: int = 3072) -> Dict[int, dict]:
    """Run ``cases`` in one subprocess; a case that hangs is reported as ``{"hang": True}``.

    After a hang the remaining cases run in a fresh subprocess. The subprocess
    runs under an address-space limit, so an unbounded allocation fails fast
    (and shows as a traceback) instead of swapping the machine.
    """
    results: Dict[int, dict] = {}
    todo = list(cases)
    n = 0
    while todo:
        n += 1
        cases_path = os.path.join(work_dir, f"cases{n}.json")
        results_path = os.path.join(work_dir, f"results{n}.jsonl")
        with open(cases_path, "w") as f:
            json.dump(todo, f)
        code = (f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({memory_limit_mb << 20}, "
                f"{memory_limit_mb << 20}))\n"
                "import sys; from tests.unit.tracefuzz import _main; _main(sys.argv[1:])\n")
        hung = False
        try:
            subprocess.run([sys.executable, "-c", code, cases_path, results_path], cwd=ROOT, timeout=timeout,
                           env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True)
        except subprocess.TimeoutExpired:
            hung = True
        started = None
        if os.path.exists(results_path):
            for line in open(results_path):
                rec = json.loads(line)
                if "start" in rec:
                    started = rec["start"]
                else:
                    results[rec["id"]] = rec
                    started = None
        done = {c["id"] for c in todo if c["id"] in results}
        if started is not None:
            results[started] = {"id": started, "hang": hung, "crash": not hung}
            done.add(started)
        elif not hung and len(done) < len(todo):
            # The process died before it started the next case (or at import).
            nxt = next(c["id"] for c in todo if c["id"] not in done)
            results[nxt] = {"id": nxt, "hang": False, "crash": True}
            done.add(nxt)
        todo = [c for c in todo if c["id"] not in done]
    return results


def judge(case: dict, res: dict) -> List[str]:
    """What is wrong with the analyzer's handling of ``case`` (empty list: nothing)."""
    problems = []
    if res.get("hang"):
        return ["hang (no result within the time limit)"]
    if res.get("crash"):
        return ["the analyzer process died (crash or memory limit)"]
    for tool in ("bisect", "check"):
        r = res[tool]
        if r["exc"]:
            problems.append(f"{tool}: exception\n{r['exc']}")
            continue
        if r["code"] not in (0, 1, 2):
            problems.append(f"{tool}: exit {r['code']}")
        if ESC in r["out"] or ESC in r["err"]:
            problems.append(f"{tool}: raw escape character in the output")
        if r["code"] == 2:
            lines = r["err"].splitlines()
            if len(lines) != 1 or "Traceback" in r["err"]:
                problems.append(f"{tool}: error output is not one line: {r['err'][-2000:]!r}")
            elif case["file"] not in lines[0] and case["run"] not in lines[0]:
                problems.append(f"{tool}: error does not name the file: {lines[0]!r}")
    expect = case["expect"]
    if expect == "error":
        for tool in ("bisect", "check"):
            if res[tool]["code"] != 2 and not res[tool]["exc"]:
                problems.append(f"{tool}: expected exit 2, got {res[tool]['code']}: {res[tool]['out'][:300]!r}")
    elif expect == "diverged" and res["bisect"]["code"] != 1:
        problems.append(f"bisect: expected exit 1 (divergence), got {res['bisect']['code']}: "
                        f"{(res['bisect']['out'] + res['bisect']['err'])[:300]!r}")
    return problems


def _main(argv: List[str]) -> None:
    cases_path, results_path = argv
    with open(cases_path) as f:
        run_cases(json.load(f), results_path)


if __name__ == "__main__":
    _main(sys.argv[1:])
