"""A tutorial-shaped custom training loop used by the capture tests."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import numpy as np


def dataset(n: int = 64, features: int = 8, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features)).astype(np.float32)
    y = rng.integers(0, classes, n).astype(np.int64)
    return x, y


def train(strategy, *, steps: int = 4, global_batch: int = 16, optimizer: str = "adam", lr=1e-2,
          seed: int = 1, accumulate: int = 1, xla: bool = False, watch: bool = True,
          on_replica_grads: Optional[Callable] = None, data=None, epochs: int = 0,
          inside: bool = False, loss_scale: Optional[float] = None) -> Dict[str, np.ndarray]:
    """Runs `steps` optimizer steps under `strategy`; returns the final weights by path.

    With `epochs`, runs that many passes over the data instead, batched as
    TensorFlow's tutorial does (no drop_remainder): a last, partial batch ends
    each epoch unless `global_batch` divides the data. With `inside` too, the
    step reads the iterator inside its tf.function, as TensorFlow's multi-worker
    tutorial does: the batch size is then unknown when the step is traced.
    With `loss_scale`, the model computes in float16 (Keras' mixed_float16
    policy) and the optimizer is wrapped in a LossScaleOptimizer starting at
    that scale, which skips the updates whose gradients are not finite.
    """
    import keras
    import tensorflow as tf

    x, y = data if data is not None else dataset()
    policy = keras.mixed_precision.global_policy()
    with strategy.scope():
        keras.utils.set_random_seed(seed)
        if loss_scale:
            keras.mixed_precision.set_global_policy("mixed_float16")
        try:
            # Explicit names: Keras numbers auto-named layers per process, and these
            # tests build several models in one process.
            model = keras.Sequential([keras.Input((x.shape[1],)),
                                      keras.layers.Dense(16, activation="relu", name="hidden"),
                                      keras.layers.Dense(3, name="logits", dtype="float32")], name="mlp")
        finally:
            keras.mixed_precision.set_global_policy(policy)  # the layers keep theirs
        opt = {"adam": lambda: keras.optimizers.Adam(lr),
               "sgd": lambda: keras.optimizers.SGD(lr),
               "momentum": lambda: keras.optimizers.SGD(lr, momentum=0.9)}[optimizer]()
        if loss_scale:
            opt = keras.optimizers.LossScaleOptimizer(opt, initial_scale=loss_scale, name="loss_scale")
        opt.build(model.trainable_variables)
    if watch and hasattr(strategy, "watch"):
        strategy.watch(model, opt)
    loss_obj = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")

    def grads_of(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.nn.compute_average_loss(loss_obj(yb, model(xb, training=True)), global_batch_size=global_batch)
            scaled = opt.scale_loss(loss) if loss_scale else loss
        return loss, tape.gradient(scaled, model.trainable_variables)

    if xla:
        grads_of = tf.function(grads_of, jit_compile=True)

    def train_step(inputs):
        xb, yb = inputs
        if accumulate == 1:
            loss, grads = grads_of(xb, yb)
        else:
            xs, ys = tf.split(xb, accumulate), tf.split(yb, accumulate)
            loss, grads = 0.0, [tf.zeros_like(v) for v in model.trainable_variables]
            for k in range(accumulate):
                l_k, g_k = grads_of(xs[k], ys[k])
                if hasattr(strategy, "record_micro_step"):
                    strategy.record_micro_step(g_k)
                loss = loss + l_k
                grads = [a + b for a, b in zip(grads, g_k)]
        if on_replica_grads is not None:
            grads = on_replica_grads(grads)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def distributed_step(inputs):
        per_replica = strategy.run(train_step, args=(inputs,))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    @tf.function
    def step_from(iterator):
        per_replica = strategy.run(train_step, args=(next(iterator),))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    if epochs and inside:
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch).repeat(epochs)
        it = iter(strategy.experimental_distribute_dataset(ds))
        for _ in range(epochs * -(-len(x) // global_batch)):
            step_from(it)
    elif epochs:
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch)
        for _ in range(epochs):
            for batch in strategy.experimental_distribute_dataset(ds):
                distributed_step(batch)
    else:
        ds = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(global_batch, drop_remainder=True)
        it = iter(strategy.experimental_distribute_dataset(ds))
        for _ in range(steps):
            distributed_step(next(it))
    if hasattr(strategy, "close"):
        strategy.close()
    return {v.path: v.numpy() for v in model.variables}


def files(trace_dir) -> List[str]:
    import os

    return sorted(os.path.join(trace_dir, f) for f in os.listdir(trace_dir) if f.endswith(".h5"))
