"""A user's own traced training script that injects a fault (scenario 7).

Two faults a flag of ``launch/train.py`` cannot express, injected only through
public APIs, as a user could in their own loop:

* ``--flip-step K --flip-replica R``: inside the replica function, after
  ``tape.gradient`` and before ``apply_gradients``, one bit of one element of
  one local gradient is flipped, with TensorFlow ops keyed on the replica id
  and ``optimizer.iterations`` (a silent hardware fault on one device);
* ``--corrupt-step K --corrupt-replica R``: after optimizer step K, one bit of
  replica R's copy of a weight is flipped (``MirroredVariable.values[R]``), so
  that the replicas no longer hold the same model.

Run from the repository root::

    python scenarios/inject.py --trace-dir traces/clean
    python scenarios/inject.py --flip-step 3 --flip-replica 1 --trace-dir traces/flip
    python -m tracer.bisect traces/clean traces/flip
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # `python scenarios/inject.py` puts scenarios/ itself on sys.path; the
    # imports below need the repository root instead.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
from typing import Optional, Sequence

FAULT_VARIABLE = "mlp/dense_1/kernel"
"""The variable whose gradient (``--flip-*``) or weight (``--corrupt-*``) gets the flipped bit."""
FAULT_INDEX = 0
"""Flat index of the flipped element."""
FAULT_BIT = 16
"""The flipped bit of the float32 pattern: a mantissa bit, a relative change near 2**-7."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inject.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--trace-dir", required=True, help="where replica-<i>.h5 go")
    p.add_argument("--replicas", type=int, default=2, help="MirroredStrategy on this many logical CPUs")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=32, help="global batch")
    p.add_argument("--flip-step", type=int, help="optimizer step whose local gradient gets a flipped bit")
    p.add_argument("--flip-replica", type=int, default=0, help="the replica whose gradient is hit")
    p.add_argument("--corrupt-step", type=int, help="after this optimizer step, one replica's weight is hit")
    p.add_argument("--corrupt-replica", type=int, default=0, help="the replica whose weight copy is hit")
    p.add_argument("--no-progress", action="store_true", help="accepted for symmetry with launch/train.py")
    return p


def flip_bit(tf, tensor, when, *, index: int = FAULT_INDEX, bit: int = FAULT_BIT):
    """``tensor`` (float32) with bit ``bit`` of element ``index`` flipped where the bool tensor ``when`` holds."""
    flat = tf.reshape(tensor, [-1])
    mask = tf.one_hot(index, tf.size(flat), on_value=1 << bit, off_value=0, dtype=tf.int32)
    mask = mask * tf.cast(when, tf.int32)
    flipped = tf.bitcast(tf.bitwise.bitwise_xor(tf.bitcast(flat, tf.int32), mask), tf.float32)
    return tf.reshape(flipped, tf.shape(tensor))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Trains with the requested faults; returns the exit status."""
    args = build_parser().parse_args(argv)
    for name in ("flip_replica", "corrupt_replica"):
        if not 0 <= getattr(args, name) < args.replicas:
            print(f"inject.py: error: --{name.replace('_', '-')} must be below --replicas {args.replicas}. "
                  f"Received: {getattr(args, name)}", file=sys.stderr)
            return 2

    import keras
    import tensorflow as tf

    from launch import data as data_lib
    from launch.model import build_model
    from strategies import TracedMirroredStrategy

    cpu = tf.config.list_physical_devices("CPU")[0]
    # In a process that already configured enough logical CPUs (tests), keep them:
    # shrinking the configuration would starve a later job that needs more.
    if len(tf.config.get_logical_device_configuration(cpu) or []) < args.replicas:
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.replicas)
        except RuntimeError:
            pass  # the runtime is up already; the strategy below fails if it lacks devices
    devices = [f"/cpu:{i}" for i in range(args.replicas)]
    faults = {"flip_step": args.flip_step, "flip_replica": args.flip_replica, "corrupt_step": args.corrupt_step,
              "corrupt_replica": args.corrupt_replica, "variable": FAULT_VARIABLE, "bit": FAULT_BIT}
    strategy = TracedMirroredStrategy(devices, trace_dir=args.trace_dir, capture="full",
                                      seeds={"weights": 1, "shuffle": 2},
                                      run_info={"script": "scenarios/inject.py", "faults": repr(faults)})
    dataset = data_lib.load()
    with strategy.scope():
        model = build_model(dataset.num_features, dataset.num_classes, seed=1)
        optimizer = keras.optimizers.Adam(1e-3, name="adam")
        optimizer.build(model.trainable_variables)
    strategy.watch(model, optimizer)
    loss_object = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    target = [v.path for v in model.trainable_variables].index(FAULT_VARIABLE)

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.nn.compute_average_loss(loss_object(y, model(x, training=True)),
                                              global_batch_size=args.batch_size)
        grads = tape.gradient(loss, model.trainable_variables)
        if args.flip_step is not None:
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            when = tf.logical_and(tf.equal(replica, args.flip_replica),
                                  tf.equal(optimizer.iterations, args.flip_step))
            grads[target] = flip_bit(tf, grads[target], when)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def train_step(batch):
        losses = strategy.run(replica_step, args=batch)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

    ds = tf.data.Dataset.from_tensor_slices((dataset.x, dataset.y))
    ds = ds.shuffle(dataset.num_examples, seed=2).repeat().batch(args.batch_size, drop_remainder=True)
    iterator = iter(strategy.experimental_distribute_dataset(ds))
    try:
        for step in range(args.steps):
            train_step(next(iterator))
            if step == args.corrupt_step:
                # One device's copy of the MirroredVariable; the others keep theirs.
                copy = model.trainable_variables[target].value.values[args.corrupt_replica]
                copy.assign(flip_bit(tf, copy, True))
    finally:
        strategy.close()
    print(f"inject.py: {args.steps} steps, faults {faults}, trace: {os.path.abspath(args.trace_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
