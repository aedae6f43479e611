"""Full tensors reach the file exactly: the writer's copies, its recycled buffers and its raw writes lose nothing."""

import os

import numpy as np
import pytest

from tracer import schema
from tracer.config import CaptureConfig
from tracer.errors import TraceWriteError
from tracer.hashing import fingerprint
from tracer.reader import TraceReader
from tracer.schema import TensorSpec
from tracer.writer import TraceWriter

from tests.unit.tracegen import _stack

# Whole pages (written with direct I/O where offered, through the staging buffer when
# not page-aligned in memory; 5 MiB takes two pieces of it), part of a page, and a scalar.
TENSORS = [TensorSpec("weight", "w", (64, 32), "float32"), TensorSpec("weight", "big", (1280, 1024), "float32"),
           TensorSpec("weight", "b", (10,), "float32"), TensorSpec("loss", "loss", (), "float32")]


def test_full_tensors_survive_the_caller_reusing_its_arrays(tmp_path):
    # Two writers in one process, as with two local replicas; a short queue, so
    # the writers recycle buffers while later steps are still queued.
    config = CaptureConfig(mode="full", queue_size=2, flush_every=3)
    writers = [TraceWriter(str(tmp_path / f"replica-{r}.h5"), TENSORS, config=config, initial_columns=[])
               for r in range(2)]
    arrays = [np.zeros(t.shape, np.float32) for t in TENSORS]  # one set, overwritten for every step
    expected = {}
    for step in range(25):
        for r, writer in enumerate(writers):
            for k, a in enumerate(arrays):
                a[...] = step * 1000 + r * 100 + k + np.arange(a.size, dtype=np.float32).reshape(a.shape) / 7
            expected[step, r] = [a.copy() for a in arrays]
            writer.write_step(step, _stack([fingerprint(a) for a in arrays]), arrays)
    for writer in writers:
        writer.close()
    for r in range(2):
        with TraceReader(str(tmp_path / f"replica-{r}.h5")) as reader:
            assert list(reader.full_steps()) == list(range(25))
            for step in range(25):
                for k in range(len(TENSORS)):
                    np.testing.assert_array_equal(reader.full(k, step), expected[step, r][k],
                                                  err_msg=f"replica {r} step {step} tensor {k}")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_failed_full_tensor_write_stops_cleanly_and_keeps_the_steps_before(tmp_path):
    # The bytes of full tensors bypass HDF5; when the disk refuses them (here the
    # writer's own file descriptors are pointed at /dev/full: ENOSPC on every
    # write), HDF5's state is intact, the step is not recorded and the file closes.
    path = str(tmp_path / "replica-0.h5")
    writer = TraceWriter(path, TENSORS, config=CaptureConfig(mode="full", flush_every=1), initial_columns=[])
    arrays = [np.full(t.shape, 1.5, np.float32) for t in TENSORS]
    for step in range(3):
        writer.write_step(step, _stack([fingerprint(a) for a in arrays]), arrays)
    writer.flush()
    full_device = os.open("/dev/full", os.O_WRONLY)
    try:
        for fd in (writer._fd, writer._direct_fd):
            if fd is not None:
                os.dup2(full_device, fd)
    finally:
        os.close(full_device)
    writer.write_step(3, _stack([fingerprint(a) for a in arrays]), arrays)
    with pytest.raises(TraceWriteError, match="writing a full tensor failed: .*No space left on device"):
        writer.flush()
    writer.close()
    with TraceReader(path) as reader:
        assert reader.complete
        assert list(reader.full_steps()) == [0, 1, 2]
        for step in range(3):
            for k in range(len(TENSORS)):
                np.testing.assert_array_equal(reader.full(k, step), arrays[k])


def test_a_block_of_fingerprint_rows_is_one_hand_over(tmp_path):
    # write_steps queues all its rows as one item: while the writer thread cannot write
    # (it waits for the HDF5 turn held here), two blocks of 10 rows still fit a queue of
    # 2 (one row per item would wait at the third row). No row is lost, and steps must
    # still increase.
    import threading

    from tracer import writer as writer_module

    path = str(tmp_path / "replica-0.h5")
    config = CaptureConfig(mode="fingerprint", queue_size=2, flush_every=10)
    writer = TraceWriter(path, TENSORS, config=config, initial_columns=[])
    arrays = [np.zeros(t.shape, np.float32) for t in TENSORS]
    blocks, expected = [], []
    for block in range(6):
        rows = []
        for step in range(block * 10, block * 10 + 10):
            arrays[3][...] = step
            fps = _stack([fingerprint(a) for a in arrays])
            rows.append((step, fps))
            expected.append(fps)
        blocks.append(rows)
    with writer_module._HDF5_TURN:
        handing = threading.Thread(target=lambda: [writer.write_steps(rows) for rows in blocks[:2]])
        handing.start()
        handing.join(timeout=10)
        waited = handing.is_alive()
    handing.join()
    if waited:
        writer.close()
    assert not waited, "a block of rows waited for the writer thread"
    for rows in blocks[2:]:
        writer.write_steps(rows)
    with pytest.raises(TraceWriteError, match=r"steps must increase. Received: step=59 after step=59"):
        writer.write_steps([(59, expected[-1])])
    writer.write_steps([])
    writer.close()
    with TraceReader(path) as reader:
        assert list(reader.steps()) == list(range(60))
        for k, (stat, _) in enumerate(schema.STATS):
            np.testing.assert_array_equal(reader.fingerprints(stat), np.stack([fps[k] for fps in expected]))
