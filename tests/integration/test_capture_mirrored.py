"""Capture under a real MirroredStrategy on logical CPU devices."""

import os

import numpy as np
import pytest

from tests.integration import training
from tracer import CaptureConfig, TraceReader
from tracer.schema import GLOBAL_KINDS, KIND_ORDER

pytestmark = pytest.mark.tf


def _traced(tf_cpus, trace_dir, n=2, **capture):
    from strategies import TracedMirroredStrategy

    return TracedMirroredStrategy(tf_cpus[:n], trace_dir=str(trace_dir), capture=CaptureConfig(**capture),
                                  seeds={"weights": 1})


def _hashes(path):
    with TraceReader(path) as r:
        return r.tensors, r.steps(), r.fingerprints("hash")


def test_one_file_per_replica_with_every_kind_in_dataflow_order(tf_cpus, tmp_path):
    training.train(_traced(tf_cpus, tmp_path), steps=3)
    paths = training.files(tmp_path)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["replica-0.h5", "replica-1.h5"]
    with TraceReader(paths[1]) as r:
        assert r.replica == 1 and r.num_replicas == 2 and r.complete
        assert list(r.steps()) == [0, 1, 2]
        assert r.initial_step == 0
        kinds = [t.kind for t in r.tensors]
        assert set(kinds) == set(KIND_ORDER)
        assert kinds == sorted(kinds, key=KIND_ORDER.get)
        names = {t.name for t in r.tensors if t.kind == "optimizer_slot"}
        assert {"iteration", "learning_rate", "mlp/hidden/kernel/momentum",
                "mlp/hidden/kernel/velocity"} <= names
        # The iteration counter after update s is s + 1.
        col = r.column(("optimizer_slot", "iteration", -1))
        assert r.attrs["strategy"] == "TracedMirroredStrategy"
        assert "versions.tensorflow" in r.attrs and "env.TF_CPP_MIN_LOG_LEVEL" in r.attrs
        assert r.fingerprints("l2", columns=[col])[:, 0].tolist() == [1.0, 2.0, 3.0]


def test_replicas_agree_on_global_kinds_and_differ_on_local_ones(tf_cpus, tmp_path):
    training.train(_traced(tf_cpus, tmp_path), steps=3)
    (tensors, _, h0), (_, _, h1) = (_hashes(p) for p in training.files(tmp_path))
    equal = (h0 == h1).all(axis=0)
    for t, eq in zip(tensors, equal):
        if t.kind in GLOBAL_KINDS:
            assert eq, f"{t.kind} {t.name} differs between replicas"
        elif t.kind in ("input", "local_grad"):
            assert not eq, f"{t.kind} {t.name} is identical on both replicas: shards not captured per replica"


def test_two_runs_with_the_same_seeds_are_bitwise_identical(tf_cpus, tmp_path):
    training.train(_traced(tf_cpus, tmp_path / "a"), steps=4)
    training.train(_traced(tf_cpus, tmp_path / "b"), steps=4)
    for pa, pb in zip(training.files(tmp_path / "a"), training.files(tmp_path / "b")):
        ta, sa, ha = _hashes(pa)
        tb, sb, hb = _hashes(pb)
        assert ta == tb and list(sa) == list(sb)
        np.testing.assert_array_equal(ha, hb)


@pytest.mark.parametrize("mode", ["fingerprint", "full"])
def test_tracing_does_not_change_training(tf_cpus, tmp_path, mode):
    import tensorflow as tf

    untraced = training.train(tf.distribute.MirroredStrategy(tf_cpus[:2]), steps=5)
    traced = training.train(_traced(tf_cpus, tmp_path, mode=mode), steps=5)
    assert untraced.keys() == traced.keys()
    for path in untraced:
        assert untraced[path].tobytes() == traced[path].tobytes(), f"{path} changed under tracing ({mode})"


def test_full_tensors_follow_the_schedule_and_match_fingerprints(tf_cpus, tmp_path):
    from tracer.hashing import tensor_hash

    training.train(_traced(tf_cpus, tmp_path, mode="full", full_every=2, full_window=(1, 5)), steps=6)
    with TraceReader(training.files(tmp_path)[0]) as r:
        assert list(r.full_steps()) == [1, 3, 5]
        hashes = r.fingerprints("hash")
        for col, spec in enumerate(r.tensors):
            value = r.full(col, 3)
            assert value is not None and value.shape == spec.shape
            assert tensor_hash(value) == int(hashes[3, col]), f"{spec.kind} {spec.name}"
        assert r.full(0, 2) is None


def test_global_kinds_are_written_once_per_worker_and_read_back_for_every_replica(tf_cpus, tmp_path):
    import h5py

    from tracer.hashing import tensor_hash

    training.train(_traced(tf_cpus, tmp_path, n=4, mode="full"), steps=3)
    paths = training.files(tmp_path)
    assert len(paths) == 4
    for path in paths:
        with TraceReader(path) as r:
            assert r.notes == []
            hashes = r.fingerprints("hash")
            for step in range(3):
                for col, spec in enumerate(r.tensors):
                    value = r.full(col, step)
                    assert value is not None and value.shape == spec.shape
                    assert tensor_hash(value) == int(hashes[step, col]), f"{path} {step} {spec.kind} {spec.name}"
        with h5py.File(path, "r") as f:
            replica = int(f.attrs["replica"])
            stored_in = f["full/stored_in"][()]
            for col, spec in enumerate(r.tensors):
                stored = f[f"full/{col:05d}"].id.get_storage_size()
                if replica and spec.kind in GLOBAL_KINDS:
                    # Equal on every replica, so only replica 0's file holds the bytes.
                    assert (stored_in[:, col] == 0).all() and stored == 0, spec.name
                else:
                    assert (stored_in[:, col] == replica).all() and stored >= 3 * spec.size, spec.name


@pytest.mark.parametrize("inside", [False, True], ids=["batches-passed-in", "iterator-inside"])
def test_full_capture_keeps_partial_and_uneven_batches(tf_cpus, tmp_path, inside):
    """The tutorial's batching (no drop_remainder) over 39 examples: batches of 16, 16 and 7 per epoch,
    each split across 3 replicas, unevenly. Every shard is kept in full: its bytes hash to its
    fingerprint, and the shards of a step, in replica order, are the examples that step consumed.

    Read inside the tf.function (TensorFlow's multi-worker tutorial), the iterator gives batches whose
    size is unknown when the step is traced: the input columns say so, and training is unchanged."""
    from tracer.hashing import tensor_hash

    x, y = training.dataset(n=39)
    traced = training.train(_traced(tf_cpus, tmp_path, n=3, mode="full"), data=(x, y), global_batch=16, epochs=2,
                            inside=inside)
    readers = [TraceReader(p) for p in training.files(tmp_path)]
    try:
        first = readers[0]
        assert list(first.steps()) == list(range(6))
        cols = {t.name: c for c, t in enumerate(first.tensors) if t.kind == "input"}
        assert all(first.tensors[c].dynamic == inside for c in cols.values())
        starts, sizes = [0, 16, 32] * 2, [16, 16, 7] * 2
        lengths = set()
        for step in range(6):
            for name, data in (("batch[0]", x), ("batch[1]", y)):
                shards = [r.full(cols[name], step) for r in readers]
                lengths.update(len(a) for a in shards)
                np.testing.assert_array_equal(np.concatenate(shards), data[starts[step]:starts[step] + sizes[step]])
        assert len(lengths) >= 3  # 6 shards of 16, and uneven ones of 7, 16 or 7

        for r in readers:
            hashes = r.fingerprints("hash")
            for step in r.full_steps():
                for col, spec in enumerate(r.tensors):
                    assert tensor_hash(r.full(col, int(step))) == int(hashes[step, col]), f"{step} {spec.label}"
    finally:
        for r in readers:
            r.close()
    if inside:
        import tensorflow as tf

        untraced = training.train(tf.distribute.MirroredStrategy(tf_cpus[:3]), data=(x, y), global_batch=16,
                                  epochs=2, inside=True)
        for path, value in untraced.items():
            np.testing.assert_array_equal(traced[path], value, err_msg=path)


def test_full_capture_refuses_a_batch_larger_than_its_column():
    """Only the first axis may be shorter than the column; anything else is a clear error."""
    import tensorflow as tf

    from strategies.session import check_input_shapes
    from tracer.errors import CaptureError
    from tracer.schema import TensorSpec

    column = TensorSpec("input", "batch[0]", (6, 8), "float32")
    check_input_shapes([[tf.zeros([6, 8])], [tf.zeros([1, 8])], [tf.zeros([0, 8])]], [column])
    for shape in ([7, 8], [6, 9], [6], [6, 8, 1]):
        with pytest.raises(CaptureError, match=r"input 'batch\[0\]' has shape .* on local replica 1, which does "
                                               r"not fit its column's \(6, 8\).*Keep later batches no larger"):
            check_input_shapes([[tf.zeros([6, 8])], [tf.zeros(shape)]], [column])


def test_only_the_first_axis_of_an_input_may_be_unknown():
    """A batch of unknown size is traced (its column's first axis is UNKNOWN_DIM); other unknown axes are a
    clear error that names the tensor."""
    import tensorflow as tf

    from strategies.session import _spec
    from tracer.errors import CaptureError
    from tracer.schema import UNKNOWN_DIM

    assert _spec("input", "batch[0]", tf.TensorSpec([None, 8], tf.float32)).shape == (UNKNOWN_DIM, 8)
    with pytest.raises(CaptureError, match=r"input 'batch\[0\]' has axes other than the first not known when the "
                                           r"step is traced \(\(None, None\)\)"):
        _spec("input", "batch[0]", tf.TensorSpec([None, None], tf.float32))
    with pytest.raises(CaptureError, match=r"loss 'loss' has a shape not known"):
        _spec("loss", "loss", tf.TensorSpec(None, tf.float32))


def test_rows_handed_over_in_blocks_are_the_rows_of_every_step(tf_cpus, tmp_path):
    """Fingerprints wait on the device and reach the host every flush_every steps, or with a
    full-tensor step: the trace is the one a hand-over per step writes, step for step."""
    from tracer.hashing import tensor_hash

    for name, every in (("per-step", 1), ("blocks", 3)):
        training.train(_traced(tf_cpus, tmp_path / name, mode="full", full_every=5, flush_every=every), steps=11)
    for a, b in zip(training.files(tmp_path / "per-step"), training.files(tmp_path / "blocks")):
        _, steps_a, hashes_a = _hashes(a)
        _, steps_b, hashes_b = _hashes(b)
        assert list(steps_a) == list(steps_b) == list(range(11))
        np.testing.assert_array_equal(hashes_a, hashes_b)
        with TraceReader(b) as r:
            # Steps 5 and 10 are full-tensor steps with a buffered step before them (4 and 9).
            assert list(r.full_steps()) == [0, 5, 10]
            for step in (5, 10):
                for col, spec in enumerate(r.tensors):
                    assert tensor_hash(r.full(col, step)) == int(hashes_b[step, col]), f"{step} {spec.kind} {spec.name}"


def test_adam_step_recomputed_in_numpy_matches_the_traced_weights(tf_cpus, tmp_path):
    """The traced all-reduced gradient, slots and weights are the values Adam applied."""
    training.train(_traced(tf_cpus, tmp_path, mode="full"), steps=3, optimizer="adam", lr=1e-2)
    with TraceReader(training.files(tmp_path)[0]) as r:
        lr = np.float32(r.full(r.column(("optimizer_slot", "learning_rate", -1)), 2))
        b1, b2, eps = np.float32(0.9), np.float32(0.999), np.float32(1e-7)
        path = "mlp/hidden/kernel"
        get = lambda kind, name, step: r.full(r.column((kind, name, -1)), step)  # noqa: E731
        for step in (1, 2):
            g = get("allreduced_grad", path, step)
            m0, v0 = get("optimizer_slot", f"{path}/momentum", step - 1), get("optimizer_slot", f"{path}/velocity",
                                                                             step - 1)
            w0 = get("weight", path, step - 1)
            t = np.float32(step + 1)
            alpha = lr * np.sqrt(np.float32(1) - b2 ** t) / (np.float32(1) - b1 ** t)
            # Keras computes 1 - beta in Python (float64), then casts to float32.
            m = m0 + (g - m0) * np.float32(1 - 0.9)
            v = v0 + (np.square(g) - v0) * np.float32(1 - 0.999)
            w = w0 - (m * alpha) / (np.sqrt(v) + eps)
            np.testing.assert_array_equal(m, get("optimizer_slot", f"{path}/momentum", step))
            np.testing.assert_array_equal(v, get("optimizer_slot", f"{path}/velocity", step))
            np.testing.assert_array_max_ulp(w, get("weight", path, step), maxulp=1)
            # And the applied gradient is the sum of the replicas' local gradients.
            with TraceReader(training.files(tmp_path)[1]) as r1:
                local = get("local_grad", path, step) + r1.full(r1.column(("local_grad", path, -1)), step)
            np.testing.assert_allclose(g, local, rtol=1e-6, atol=1e-7)


def test_gradient_accumulation_records_micro_steps(tf_cpus, tmp_path):
    training.train(_traced(tf_cpus, tmp_path, mode="full"), steps=2, accumulate=2)
    with TraceReader(training.files(tmp_path)[0]) as r:
        micro = sorted({t.micro_step for t in r.tensors if t.kind == "local_grad"})
        assert micro == [-1, 0, 1]
        path = "mlp/hidden/kernel"
        total = r.full(r.column(("local_grad", path, 0)), 1) + r.full(r.column(("local_grad", path, 1)), 1)
        np.testing.assert_array_equal(total, r.full(r.column(("local_grad", path, -1)), 1))


def test_xla_compiled_replica_computation_is_traced_without_changing_it(tf_cpus, tmp_path):
    import tensorflow as tf

    untraced = training.train(tf.distribute.MirroredStrategy(tf_cpus[:2]), steps=3, xla=True)
    traced = training.train(_traced(tf_cpus, tmp_path), steps=3, xla=True)
    for path in untraced:
        assert untraced[path].tobytes() == traced[path].tobytes()
    with TraceReader(training.files(tmp_path)[0]) as r:
        assert any(t.kind == "local_grad" for t in r.tensors) and r.n_steps == 3


def test_momentum_slots_map_to_their_variables(tf_cpus, tmp_path):
    training.train(_traced(tf_cpus, tmp_path), steps=2, optimizer="momentum")
    with TraceReader(training.files(tmp_path)[0]) as r:
        slots = {t.name: (t.variable, t.slot) for t in r.tensors if t.kind == "optimizer_slot"}
    assert slots["mlp/hidden/bias/momentum"] == ("mlp/hidden/bias", "momentum")


def test_run_without_watch_is_a_clear_error(tf_cpus, tmp_path):
    from tracer.errors import CaptureError

    with pytest.raises(CaptureError, match="strategy.watch"):
        training.train(_traced(tf_cpus, tmp_path), steps=1, watch=False)


def test_eager_run_warns_that_it_is_not_traced(tf_cpus, tmp_path):
    import keras
    import tensorflow as tf

    strategy = _traced(tf_cpus, tmp_path)
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        opt = keras.optimizers.SGD(0.1)
        opt.build(model.trainable_variables)
    strategy.watch(model, opt)

    def step(xb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(model(xb) ** 2)
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    with pytest.warns(RuntimeWarning, match="outside tf.function is not traced"):
        strategy.run(step, args=(tf.ones((2, 4)),))
    strategy.close()


def test_capture_off_writes_nothing(tf_cpus, tmp_path):
    training.train(_traced(tf_cpus, tmp_path / "t", mode="off"), steps=2)
    assert not (tmp_path / "t").exists()


def test_optimizer_inside_a_nested_jit_compiled_function_is_traced(tf_cpus, tmp_path):
    """The whole replica step, apply_gradients included, compiled with jit_compile=True: the update happens in
    a nested function whose tensors the step cannot read, so they reach the trace through stash variables.
    The trace holds the gradient applied (on one replica, the local one), and training is unchanged."""
    import keras
    import tensorflow as tf

    from strategies import TracedMirroredStrategy

    def train(strategy):
        with strategy.scope():
            keras.utils.set_random_seed(3)
            model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="d")], name="m")
            opt = keras.optimizers.SGD(0.1)
            opt.build(model.trainable_variables)
        if hasattr(strategy, "watch"):
            strategy.watch(model, opt)

        @tf.function(jit_compile=True)
        def replica_step(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(model(x) ** 2)
            opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
            return loss

        @tf.function
        def step(x):
            return strategy.run(replica_step, args=(x,))

        for k in range(3):
            step(tf.fill((2, 4), 0.5 + k))
        if hasattr(strategy, "close"):
            strategy.close()
        return [v.numpy() for v in model.weights]

    traced = train(TracedMirroredStrategy(tf_cpus[:1], trace_dir=str(tmp_path), capture=CaptureConfig(mode="full")))
    untraced = train(tf.distribute.MirroredStrategy(tf_cpus[:1]))
    for a, b in zip(traced, untraced):
        np.testing.assert_array_equal(a, b)
    with TraceReader(training.files(tmp_path)[0]) as r:
        assert r.steps().tolist() == [0, 1, 2] and r.skipped_steps().tolist() == []
        for step in range(3):
            applied = r.full(r.column(("allreduced_grad", "m/d/kernel", -1)), step)
            np.testing.assert_array_equal(applied, r.full(r.column(("local_grad", "m/d/kernel", -1)), step))
            assert np.abs(applied).max() > 0
        # Each update moved the weights by -lr times the gradient it applied.
        w = [r.full(r.column(("weight", "m/d/kernel", -1)), s) for s in range(3)]
        g = r.full(r.column(("allreduced_grad", "m/d/kernel", -1)), 2)
        np.testing.assert_allclose(w[2], w[1] - np.float32(0.1) * g, rtol=1e-6)


def test_micro_steps_recorded_inside_a_nested_function_are_a_clear_error(tf_cpus, tmp_path):
    import keras
    import tensorflow as tf

    from strategies import TracedMirroredStrategy
    from tracer.errors import CaptureError

    strategy = TracedMirroredStrategy(tf_cpus[:1], trace_dir=str(tmp_path))
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="d")], name="m")
        opt = keras.optimizers.SGD(0.1)
        opt.build(model.trainable_variables)
    strategy.watch(model, opt)

    @tf.function
    def grads_of(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x))
        grads = tape.gradient(loss, model.trainable_variables)
        strategy.record_micro_step(grads)
        return grads

    def replica_step(x):
        opt.apply_gradients(zip(grads_of(x), model.trainable_variables))
        return tf.constant(0.0)

    @tf.function
    def step(x):
        return strategy.run(replica_step, args=(x,))

    with pytest.raises(CaptureError, match=r"record_micro_step was called inside a nested tf.function.*call it in "
                                           r"the replica function itself"):
        step(tf.ones((2, 4)))
    strategy.close()


def test_loss_scaling_mixed_precision_traces_the_updates_it_applies(tf_cpus, tmp_path):
    """mixed_float16 with a LossScaleOptimizer, which applies the update inside a conditional (only when the
    gradients are finite). The trace holds what was applied: the all-reduced gradient is the sum of the two
    replicas' local ones, bit for bit. A skipped update has no row (the next update is the same optimizer
    step) and is listed in /skipped; training is unchanged either way."""
    import tensorflow as tf

    calls, scale = 6, 2.0 ** 22  # the first updates overflow float16
    traced = training.train(_traced(tf_cpus, tmp_path, mode="full"), steps=calls, loss_scale=scale)
    untraced = training.train(tf.distribute.MirroredStrategy(tf_cpus[:2]), steps=calls, loss_scale=scale)
    for path, value in untraced.items():
        # Bits, not values: a skipped-update run may hold NaN.
        np.testing.assert_array_equal(traced[path].view(np.uint8), value.view(np.uint8), err_msg=path)
    r0, r1 = (TraceReader(p) for p in training.files(tmp_path))
    try:
        steps, skipped = r0.steps(), r0.skipped_steps()
        assert len(steps) + len(skipped) == calls
        assert len(skipped) and len(steps), (steps, skipped)
        assert list(steps) == list(range(len(steps)))  # one row per applied update, numbered by it
        assert np.array_equal(r1.skipped_steps(), skipped)
        names = {t.name for t in r0.tensors if t.kind == "optimizer_slot"}
        # The loss scale is a slot; the inner optimizer's learning rate is the one `learning_rate` records.
        assert "loss_scale/dynamic_scale" in names and not any(n.endswith("/learning_rate") for n in names), names
        for col, spec in enumerate(r0.tensors):
            if spec.kind != "allreduced_grad":
                continue
            local = r0.column(("local_grad", spec.name, -1))
            for step in steps:
                total = r0.full(local, int(step)) + r1.full(local, int(step))
                np.testing.assert_array_equal(r0.full(col, int(step)), total, err_msg=f"{spec.name} {step}")
    finally:
        r0.close()
        r1.close()
