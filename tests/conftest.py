"""Shared fixtures. Unit tests stay free of TensorFlow; integration tests opt in with `tf_cpus`."""

import gc
import itertools
import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

N_LOGICAL_CPUS = 4


@pytest.fixture(scope="session")
def tf_cpus():
    """TensorFlow with the host CPU split into 4 logical devices; returns their names."""
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * N_LOGICAL_CPUS)
    except RuntimeError:
        pass  # already initialised by an earlier test in this process
    return [d.name for d in tf.config.list_logical_devices("CPU")]


_KEY_BASE = itertools.count(start=100_000, step=100_000)


def _next_collective_key_base():
    import sys

    if "tensorflow" in sys.modules:
        import tensorflow as tf

        tf.distribute.MirroredStrategy._collective_key_base = next(_KEY_BASE)


@pytest.fixture(autouse=True)
def fresh_collective_keys():
    """Each test's plain MirroredStrategy gets its own collective key range.

    TensorFlow numbers collectives from a class-wide base (its own tests bump
    it, see strategy_combinations._mirrored_strategy_with_collective_key_base);
    two strategies in one process whose models differ otherwise collide with
    "Shape mismatch in the collective instance".
    """
    _next_collective_key_base()
    yield


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """A range for the module and session fixtures set up for this test, too.

    They are set up before any function fixture: without this, one that trains
    (test_resume's reference job) reused the previous test's range. Once in CI,
    in a worker process that had just run test_keras_fit.py, its collectives
    collided with that test's ("expected shape [27] but another member in the
    group expected shape [26122]").
    """
    _next_collective_key_base()


@pytest.fixture(autouse=True)
def no_leaked_writers():
    """Every TraceWriter a test opens must be closed by the end of the test."""
    yield
    import sys

    if "tracer.writer" not in sys.modules:
        return
    from tracer.writer import TraceWriter

    gc.collect()
    leaked = [o for o in gc.get_objects() if type(o) is TraceWriter and not o._closed]
    for writer in leaked:
        writer.close()
    assert not leaked, f"test left trace writers open: {leaked}"
