"""A batch shorter than its column (an epoch's last batch, an uneven split) is stored and read back exactly."""

import h5py
import numpy as np
import pytest

from tracer import schema
from tracer.config import CaptureConfig
from tracer.errors import TraceFormatError, TraceWriteError
from tracer.hashing import fingerprint
from tracer.metrics import compare_full
from tracer.reader import TraceReader
from tracer.report import magnitude
from tracer.schema import TensorSpec
from tracer.writer import TraceWriter

from tests.unit.tracegen import _stack, assert_full_reads_back

TENSORS = [TensorSpec("input", "batch[0]", (16, 8), "float32"), TensorSpec("input", "batch[1]", (16,), "int64"),
           TensorSpec("loss", "loss", (), "float32"), TensorSpec("weight", "w", (4, 4), "float32")]
LENGTHS = [16, 7, 16, 0, 1, 16]  # rows of the batch at each step


def _step_arrays(step: int, rows: int):
    rng = np.random.default_rng(step)
    return [rng.standard_normal((rows, 8)).astype(np.float32), rng.integers(0, 10, rows).astype(np.int64),
            np.float32(step), rng.standard_normal((4, 4)).astype(np.float32)]


def _write(path, copy=True):
    writer = TraceWriter(str(path), TENSORS, config=CaptureConfig(mode="full", flush_every=2), initial_columns=[])
    written = []
    for step, rows in enumerate(LENGTHS):
        arrays = _step_arrays(step, rows)
        written.append([np.array(a) for a in arrays])
        writer.write_step(step, _stack([fingerprint(a) for a in arrays]), arrays, copy=copy)
    writer.close()
    return written


@pytest.mark.parametrize("copy", [True, False])
def test_short_batches_read_back_exactly(tmp_path, copy):
    path = tmp_path / "replica-0.h5"
    written = _write(path, copy=copy)
    with h5py.File(path, "r") as f:
        assert f.attrs[schema.ATTR_SCHEMA] == schema.SCHEMA_VERSION
        np.testing.assert_array_equal(f[schema.FULL_ROWS][:, 0], LENGTHS)
        np.testing.assert_array_equal(f[schema.FULL_ROWS][:, 2:], [[0, 4]] * len(LENGTHS))
    with TraceReader(str(path)) as r:
        assert_full_reads_back(r, written)


def test_a_tensor_that_does_not_fit_its_column_is_refused(tmp_path):
    writer = TraceWriter(str(tmp_path / "replica-0.h5"), TENSORS, config=CaptureConfig(mode="full", flush_every=1),
                         initial_columns=[])
    arrays = _step_arrays(0, 16)
    writer.write_step(0, _stack([fingerprint(a) for a in arrays]), arrays)
    arrays = _step_arrays(1, 17)
    writer.write_step(1, _stack([fingerprint(a) for a in arrays]), arrays)
    with pytest.raises(TraceWriteError, match=r"full tensor batch\[0\] has shape \(17, 8\), which does not fit its "
                                              r"column's \(16, 8\)"):
        writer.close()
    with TraceReader(str(tmp_path / "replica-0.h5")) as r:
        assert list(r.full_steps()) == [0]  # the step before the refused one stays readable


def test_files_of_earlier_schemas_hold_whole_rows(tmp_path):
    path = tmp_path / "replica-0.h5"
    written = _write(path)
    with h5py.File(path, "r+") as f:
        del f[schema.FULL_ROWS]
    with pytest.raises(TraceFormatError, match=r"missing dataset /full/rows"):
        TraceReader(str(path))
    with h5py.File(path, "r+") as f:
        f.attrs[schema.ATTR_SCHEMA] = 3
    with TraceReader(str(path)) as r:
        assert r.full(0, 0).shape == (16, 8)
        np.testing.assert_array_equal(r.full(0, 0), written[0][0])
        assert r.full(0, 1).shape == (16, 8)  # no lengths recorded: the whole row, as schema 3 stored it
        np.testing.assert_array_equal(r.full(0, 1)[:7], written[1][0])


def test_rows_beyond_the_column_are_a_format_error(tmp_path):
    path = tmp_path / "replica-0.h5"
    _write(path)
    with h5py.File(path, "r+") as f:
        f[schema.FULL_ROWS][1, 0] = 17
    with pytest.raises(TraceFormatError, match=r"/full/rows gives length 17 for column 0 \(shape \(16, 8\)\)"):
        TraceReader(str(path))


def test_batches_of_different_sizes_differ_by_the_rows_one_side_lacks():
    x = np.arange(56, dtype=np.float32).reshape(7, 8)
    d = compare_full(x[:5], x, "float32")
    assert d.shapes == ((5, 8), (7, 8))
    assert d.n_diff == 16 and d.size == 56 and d.first_index == (5, 0)
    assert d.max_abs == d.max_rel == d.excess == float("inf")
    y = x.copy()
    y[2, 3] += 1
    d = compare_full(x[:5], y, "float32")
    assert d.n_diff == 17 and d.first_index == (2, 3)
    assert "shapes differ (run A (5, 8), run B (7, 8))" in magnitude(dict(d.to_dict(), source="full"))
    d = compare_full(x, x.reshape(8, 7), "float32")
    assert d.n_diff == 56 and d.first_index is None and d.shapes == ((7, 8), (8, 7))
    assert compare_full(x, x.copy(), "float32").shapes is None
