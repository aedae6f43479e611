"""Keras' own training loop, ``model.fit``, under a traced MirroredStrategy on logical CPU devices."""

import numpy as np
import pytest

from tests.integration import training
from tracer import CaptureConfig, TraceReader
from tracer.schema import INITIAL

pytestmark = pytest.mark.tf

STEPS_PER_EPOCH = 4
GLOBAL_BATCH = 32


def _fit(strategy, epochs=2, watch=True, metrics=("accuracy",), jit_compile="auto"):
    """A softmax regression fitted with Keras' defaults; returns its weights after training."""
    import keras

    x, y = training.dataset(n=STEPS_PER_EPOCH * GLOBAL_BATCH, features=8, classes=3)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3, name="logits")], name="softmax")
        model.compile(optimizer=keras.optimizers.Adam(1e-2), metrics=list(metrics), jit_compile=jit_compile,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    if watch:
        strategy.watch(model, model.optimizer)
    # With a validation pass after each epoch: its steps run the strategy too, but update nothing.
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=epochs, shuffle=False, verbose=0,
              validation_data=(x[:GLOBAL_BATCH], y[:GLOBAL_BATCH]))
    if watch:
        strategy.close()
    return [v.numpy() for v in model.variables]


def _cross_entropy(x, y, kernel, bias):
    logits = x.astype(np.float64) @ kernel.astype(np.float64) + bias.astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -log_p[np.arange(len(y)), y].mean()


def test_fit_is_traced_without_changing_it_and_records_each_steps_loss(tf_cpus, tmp_path):
    """Every optimizer step of ``fit`` gets a row; the loss is the step's own, not Keras' running mean."""
    import tensorflow as tf

    from strategies import TracedMirroredStrategy

    untraced = _fit(tf.distribute.MirroredStrategy(tf_cpus[:2]), watch=False)
    traced = _fit(TracedMirroredStrategy(tf_cpus[:2], trace_dir=str(tmp_path), capture=CaptureConfig(mode="full")))
    for a, b in zip(untraced, traced):
        np.testing.assert_array_equal(a, b)

    steps = 2 * STEPS_PER_EPOCH
    for path in training.files(tmp_path):
        with TraceReader(path) as r:
            assert list(r.steps()) == list(range(steps)), path
            kinds = {t.kind for t in r.tensors}
            assert {"input", "loss", "local_grad", "allreduced_grad", "optimizer_slot", "weight"} <= kinds
            full = lambda kind, name, step: r.full(r.column((kind, name, -1)), step)  # noqa: E731
            losses = []
            for step in range(steps):
                w = {n: (full("weight", f"softmax/logits/{n}", step - 1) if step else
                         r.full(r.column(("weight", f"softmax/logits/{n}", -1)), r.initial_step, INITIAL))
                     for n in ("kernel", "bias")}
                x, y = full("input", "batch[0]", step), full("input", "batch[1]", step)
                loss = float(full("loss", "loss", step))
                losses.append(loss)
                # The cross-entropy of this replica's batch under the weights the step started from.
                assert loss == pytest.approx(_cross_entropy(x, y, w["kernel"], w["bias"]), rel=1e-5), (path, step)
            # Keras' logged loss is the mean since the epoch began; that is not what was recorded.
            running = np.cumsum(losses[:STEPS_PER_EPOCH]) / np.arange(1, STEPS_PER_EPOCH + 1)
            assert not np.allclose(losses[:STEPS_PER_EPOCH], running, rtol=1e-5)


def test_a_step_returning_a_dict_records_its_loss_entry(tf_cpus):
    import tensorflow as tf

    from strategies.session import TraceSession

    # tf.nest.flatten orders a dict by key: "accuracy" would come first.
    picked = TraceSession._pick_loss({"accuracy": tf.constant(0.5), "loss": tf.constant(2.0)})
    assert float(picked) == 2.0


def test_fit_compiled_with_xla_is_a_clear_error(tf_cpus, tmp_path):
    """``compile(jit_compile=True)`` compiles ``strategy.run`` itself, host hand-over included."""
    from strategies import TracedMirroredStrategy
    from tracer.errors import CaptureError

    with pytest.raises(CaptureError, match="compiled with XLA.*jit_compile=False"):
        _fit(TracedMirroredStrategy(tf_cpus[:1], trace_dir=str(tmp_path)), jit_compile=True)
