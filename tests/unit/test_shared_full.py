"""Full tensors kept once per worker: replicas whose global kinds agree bit for bit point to the first one's file."""

import json
import shutil

import h5py
import numpy as np
import pytest

from tracer import bisect, check, schema
from tracer.config import CaptureConfig
from tracer.errors import TraceWriteError
from tracer.reader import Run, TraceReader
from tracer.writer import TraceWriter
from tests.unit.tracegen import Plant, _value, model_tensors, write_run

STEPS = 8
DESYNC = Plant(5, "weight", "out/kernel", replica=1, flip_bit=3, index=2, persist=False)


def _expected(specs, col, step, replica, plants=(DESYNC,)):
    return _value(specs, col, step, replica, 0, list(plants))


@pytest.fixture
def run_dir(tmp_path):
    return write_run(tmp_path / "run", steps=STEPS, replicas=3, plants=[DESYNC], full=True)


def test_every_full_tensor_reads_back_exactly_through_the_replica_that_keeps_it(run_dir):
    with Run(run_dir) as run:
        specs = run.tensors
        assert run.notes == []
        for reader in run.readers:
            for step in range(STEPS):
                for col, spec in enumerate(specs):
                    got = reader.full(col, step)
                    want = _expected(specs, col, step, reader.replica)
                    assert got is not None and got.dtype == want.dtype and got.tobytes() == want.tobytes(), (
                        reader.replica, step, spec.kind, spec.name)


def test_only_bytes_that_differ_from_the_first_replica_are_written_again(run_dir):
    specs = model_tensors()
    desync_col = next(c for c, s in enumerate(specs) if (s.kind, s.name) == (DESYNC.kind, DESYNC.name))
    with h5py.File(f"{run_dir}/replica-0.h5", "r") as f0, h5py.File(f"{run_dir}/replica-1.h5", "r") as f1:
        stored_in = f1[schema.FULL_STORED_IN][()]
        assert f0[schema.FULL_STORED_IN][()].tolist() == [[0] * len(specs)] * STEPS
        assert json.loads(f1.attrs[schema.ATTR_REPLICA_FILES])["0"] == "replica-0.h5"
        for col, spec in enumerate(specs):
            d = f1[schema.full_path(col)]
            row_bytes = d.dtype.itemsize * int(np.prod(spec.shape, dtype=np.int64))
            if spec.kind not in schema.GLOBAL_KINDS:
                assert (stored_in[:, col] == 1).all()
                assert d.id.get_storage_size() == STEPS * row_bytes
            elif col == desync_col:
                # The one step where replica 1's copy differs is its own; the others are replica 0's.
                assert stored_in[:, col].tolist() == [1 if s == DESYNC.step else 0 for s in range(STEPS)]
                assert d.id.get_storage_size() == row_bytes
            else:
                assert (stored_in[:, col] == 0).all()
                assert d.id.get_storage_size() == 0
            assert f0[schema.full_path(col)].id.get_storage_size() == STEPS * row_bytes


def test_a_desync_is_found_with_the_full_tensors_of_the_replica_that_differs(run_dir, tmp_path, capsys):
    clean = write_run(tmp_path / "clean", steps=STEPS, replicas=3, full=True)
    assert bisect.main([clean, run_dir, "--json"]) == 1
    d = json.loads(capsys.readouterr().out)
    f = d["first"]
    assert (f["step"], f["kind"], f["tensor"], f["replica"], f["n_diff"]) == (5, "weight", "out/kernel", 1, 1)
    assert not [n for n in d["notes"] if "replica-" in n]


def test_a_replica_file_without_the_file_that_keeps_its_tensors_says_so(run_dir, tmp_path):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(f"{run_dir}/replica-1.h5", alone / "replica-1.h5")
    with TraceReader(str(alone / "replica-1.h5")) as r:
        assert len(r.notes) == 1 and "replica-0.h5, which is missing" in r.notes[0]
        kinds = {s.kind: c for c, s in enumerate(r.tensors)}
        assert r.full(kinds["weight"], 2) is None
        want = _expected(r.tensors, kinds["local_grad"], 2, 1)
        assert r.full(kinds["local_grad"], 2).tobytes() == want.tobytes()


def test_a_kept_tensor_whose_hash_disagrees_is_not_used_and_the_note_says_why(run_dir, capsys):
    specs = model_tensors()
    col = next(c for c, s in enumerate(specs) if s.kind == "optimizer_slot" and s.slot)
    with h5py.File(f"{run_dir}/replica-0.h5", "r+") as f:
        f["fingerprints/hash"][3, col] ^= np.uint64(1)
    with Run(run_dir) as run:
        assert run.readers[1].full(col, 3) is None
        assert run.readers[1].full(col, 4) is not None
        (note,) = run.notes_now()
        assert "replica-1.h5" in note and "does not hold it with the same hash" in note
    # The hash difference itself is still reported: replica 0 against the two others.
    assert check.main([run_dir, "--json"]) == 1
    d = json.loads(capsys.readouterr().out)
    assert (d["first"]["step"], d["first"]["tensor"], d["cause"]) == (3, specs[col].name, "replica_desync")
    assert any("does not hold it with the same hash" in n for n in d["notes"])


def test_the_writer_refuses_to_point_away_columns_it_does_not_share(tmp_path):
    specs = model_tensors()
    attrs = {"replica": 1, "num_replicas": 2}
    with TraceWriter(str(tmp_path / "replica-1.h5"), specs, attrs=attrs, config=CaptureConfig(mode="full"),
                     shared_columns=[len(specs) - 1]) as w:
        fps = [np.zeros(len(specs), d) for _, d in schema.STATS]
        full = [np.zeros(s.shape, s.dtype) for s in specs]
        with pytest.raises(TraceWriteError, match=r"stored_in names columns \[0\], which are not shared"):
            w.write_step(0, fps, full, stored_in={0: 0})
        with pytest.raises(TraceWriteError, match="no full tensors"):
            w.write_step(1, fps, None, stored_in={len(specs) - 1: 0})
