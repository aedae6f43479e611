"""An input batch of unknown size (first axis UNKNOWN_DIM): stored, read back and compared exactly."""

import json

import h5py
import numpy as np
import pytest

from tests.unit import tracegen
from tests.unit.tracegen import Plant, _stack, assert_full_reads_back, model_tensors, write_run
from tracer import bisect, schema
from tracer.config import CaptureConfig
from tracer.errors import TraceFormatError
from tracer.hashing import fingerprint, tensor_hash
from tracer.reader import TraceReader
from tracer.schema import TensorSpec
from tracer.writer import TraceWriter

TENSORS = [TensorSpec("input", "batch[0]", (schema.UNKNOWN_DIM, 8), "float32"),
           TensorSpec("input", "batch[1]", (schema.UNKNOWN_DIM,), "int64"), TensorSpec("loss", "loss", (), "float32")]
LENGTHS = [16, 7, 40, 0, 1, 16]  # the third batch is longer than any before it


def _write(path, lengths=LENGTHS, mode="full"):
    writer = TraceWriter(str(path), TENSORS, config=CaptureConfig(mode=mode, flush_every=2), initial_columns=[])
    written = []
    for step, rows in enumerate(lengths):
        rng = np.random.default_rng(step)
        arrays = [rng.standard_normal((rows, 8)).astype(np.float32), rng.integers(0, 10, rows).astype(np.int64),
                  np.float32(step)]
        written.append(arrays)
        writer.write_step(step, _stack([fingerprint(a) for a in arrays]), arrays if mode == "full" else None)
    writer.close()
    return written


def test_batches_of_any_size_read_back_exactly(tmp_path):
    path = tmp_path / "replica-0.h5"
    written = _write(path)
    with h5py.File(path, "r") as f:
        assert f.attrs[schema.ATTR_SCHEMA] == schema.SCHEMA_VERSION == 5
        np.testing.assert_array_equal(f[schema.FULL_ROWS][:, :2], np.stack([LENGTHS, LENGTHS], 1))
        assert f[schema.full_path(0)].shape == (len(LENGTHS), max(LENGTHS), 8)  # grown to the longest batch
        assert f[schema.full_path(1)].shape == (len(LENGTHS), max(LENGTHS))
    with TraceReader(str(path)) as r:
        assert [t.shape for t in r.tensors] == [(-1, 8), (-1,), ()]
        assert r.tensors[0].dynamic and r.tensors[0].size == schema.UNKNOWN_DIM
        assert_full_reads_back(r, written)


def test_fingerprint_only_traces_keep_the_unknown_axis_in_their_table(tmp_path):
    path = tmp_path / "replica-0.h5"
    written = _write(path, mode="fingerprint")
    with TraceReader(str(path)) as r:
        assert r.tensors == TENSORS
        np.testing.assert_array_equal(r.fingerprints("hash")[:, 0].astype(np.uint64),
                                      [tensor_hash(a[0]) for a in written])


def test_only_an_inputs_first_axis_may_be_unknown():
    TensorSpec("input", "batch[0]", (-1,), "float32")
    for kind, shape in (("input", (8, -1)), ("weight", (-1, 4)), ("input", (-2, 4)), ("loss", (-1,))):
        with pytest.raises(TraceFormatError, match=r"shape"):
            TensorSpec(kind, "x", shape, "float32")
    static, dynamic = TensorSpec("input", "b", (8, 4), "float32"), TensorSpec("input", "b", (-1, 4), "float32")
    assert schema.same_layout(static, dynamic) and schema.same_layout(dynamic, static)
    assert not schema.same_layout(dynamic, TensorSpec("input", "b", (-1, 5), "float32"))
    assert not schema.same_layout(static, TensorSpec("input", "b", (7, 4), "float32"))
    assert dynamic.fits((0, 4)) and dynamic.fits((1000, 4)) and not dynamic.fits((3, 5))


def test_a_length_beyond_the_stored_rows_is_a_format_error(tmp_path):
    path = tmp_path / "replica-0.h5"
    _write(path)
    with h5py.File(path, "r+") as f:
        f[schema.FULL_ROWS][1, 0] = 41
    with TraceReader(str(path)) as r:
        with pytest.raises(TraceFormatError, match=r"/full/rows gives length 41 for row 1 of /full/00000, which "
                                                   r"holds 40"):
            r.full(0, 1)


def _run_json(capsys, a, b, *extra):
    rc = bisect.main([str(a), str(b), "--json", *extra])
    return rc, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("full", [False, True], ids=["fingerprints", "full"])
def test_a_run_with_batches_of_unknown_size_compares_with_one_of_fixed_size(tmp_path, capsys, full):
    """Same batches, one run traced them with a static batch size and the other without: no difference,
    and the inputs are compared (not left out as another shape)."""
    static = write_run(tmp_path / "a", steps=8, full=full)
    dynamic = model_tensors(batch=(schema.UNKNOWN_DIM, 4))
    b = write_run(tmp_path / "b", steps=8, full=full, tensors=dynamic)
    rc, d = _run_json(capsys, static, b)
    assert rc == 0, d
    assert not any("another shape" in n for n in d["notes"]), d["notes"]
    c = write_run(tmp_path / "c", steps=8, full=full, tensors=dynamic, plants=[Plant(5, "input", "batch[0]")])
    rc, d = _run_json(capsys, static, c)
    assert rc == 1 and (d["first"]["step"], d["first"]["kind"], d["first"]["tensor"]) == (5, "input", "batch[0]")
    assert d["cause"] == "data"


def test_a_shorter_batch_is_a_difference_at_its_step(tmp_path, capsys, monkeypatch):
    a = write_run(tmp_path / "a", steps=8, full=True, tensors=model_tensors(batch=(schema.UNKNOWN_DIM, 4)))
    monkeypatch.setattr(tracegen, "dynamic_rows", lambda step, replica: 5 if (step, replica) == (3, 1) else 8)
    b = write_run(tmp_path / "b", steps=8, full=True, tensors=model_tensors(batch=(schema.UNKNOWN_DIM, 4)))
    rc, d = _run_json(capsys, a, b)
    f = d["first"]
    assert rc == 1 and (f["step"], f["kind"], f["tensor"], f["replicas"]) == (3, "input", "batch[0]", [1])
    assert f["shapes"] == [[8, 4], [5, 4]] and f["n_diff"] == 12  # the 3 rows B lacks


def test_an_unknown_element_count_gives_no_bound_from_l2():
    """Two batches whose norms differ by 5 but whose max |x| agree: with a known size n the l2 gap bounds
    max|a-b| from below by 5/sqrt(n); with the size unknown (a batch of unknown size) it bounds nothing."""
    from tracer.metrics import stats_bounds

    known, _ = stats_bounds(10.0, 5.0, 3.0, 3.0, 4)
    unknown, rel = stats_bounds(10.0, 5.0, 3.0, 3.0, schema.UNKNOWN_DIM)
    assert known == pytest.approx(2.5, rel=1e-4)  # less the rounding allowed to each l2
    assert unknown == 0.0 and rel == 0.0
    assert stats_bounds(10.0, 5.0, 3.0, 1.0, schema.UNKNOWN_DIM)[0] == 2.0  # max |x| still bounds it
