"""TracedMirroredStrategy and TracedMultiWorkerMirroredStrategy.

They are the real ``tf.distribute`` strategies: subclasses whose extended
object is a subclass of TensorFlow's own, so every collective, variable and
dataset behaves exactly as without tracing. The subclasses only *observe*:

* the gradient all-reduce Keras 3 performs inside ``apply_gradients``
  (``ReplicaContext.all_reduce`` -> ``extended._batch_reduce_to``, or
  ``_replica_ctx_all_reduce`` when XLA on GPUs skips ``merge_call``): its inputs
  are the replicas' local gradients, its outputs what the optimizer applies;
* every ``extended.update`` of a watched variable (the optimizer's apply step),
  which ties each applied gradient to its variable;
* ``run``: its inputs, its return value (the loss), and, after the update, the
  optimizer slots and weights;
* under ``model.fit``, the loss Keras' ``train_step`` hands to the model's loss
  tracker on each replica: the step's loss, where the step's return value holds
  only the tracker's mean since the epoch began.

No value computed by the training step is changed; the tracer only adds reads.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any, Dict, Optional, Sequence

import tensorflow as tf
from tensorflow.python.distribute import collective_all_reduce_strategy as _cars
from tensorflow.python.distribute import distribute_lib
from tensorflow.python.distribute import mirrored_strategy as _ms
from tensorflow.python.distribute import reduce_util
from tensorflow.python.ops import control_flow_util

from strategies.session import TraceSession
from tracer.config import CaptureConfig
from tracer.errors import CaptureError


_COLLECTIVE_KEY_BASES = itertools.count(start=1_000_000, step=1_000_000)


class _TracingExtendedMixin:
    """Reports all-reduces and variable updates to the strategy's active StepCapture."""

    _tracer_capture = None

    def _batch_reduce_to(self, reduce_op, value_destination_pairs, options):
        result = super()._batch_reduce_to(reduce_op, value_destination_pairs, options)
        capture = self._tracer_capture
        if capture is not None and reduce_op == reduce_util.ReduceOp.SUM:
            capture.note_reduce([v for v, _ in value_destination_pairs], result)
        return result

    def _replica_ctx_all_reduce(self, reduce_op, value, options=None):
        result = super()._replica_ctx_all_reduce(reduce_op, value, options)
        capture = self._tracer_capture
        # With merge_call the reduction already went through _batch_reduce_to.
        if (capture is not None and reduce_op == reduce_util.ReduceOp.SUM and not self._use_merge_call()):
            capture.note_reduce(list(value), list(result), replica=_local_replica_id(self))
        return result

    def _update(self, var, fn, args, kwargs, group):
        capture = self._tracer_capture
        if capture is not None and args:
            capture.note_update(var, args[0])
        return super()._update(var, fn, args, kwargs, group)

    def _replica_ctx_update(self, var, fn, args, kwargs, group):
        capture = self._tracer_capture
        if capture is not None and args and not self._use_merge_call():
            capture.note_update(var, args[0], replica=_local_replica_id(self))
        return super()._replica_ctx_update(var, fn, args, kwargs, group)


def _local_replica_id(extended) -> int:
    ctx = tf.distribute.get_replica_context()
    global_id = tf.get_static_value(ctx.replica_id_in_sync_group)
    if global_id is None:
        raise CaptureError("cannot tell which replica is running; tracer needs a static replica id")
    return int(global_id) % len(extended.worker_devices)


class _TracedMirroredExtended(_TracingExtendedMixin, _ms.MirroredExtended):
    pass


class _TracedCollectiveExtended(_TracingExtendedMixin, _cars.CollectiveAllReduceExtended):
    pass


class _TracedStrategyMixin:
    """The public tracing API shared by both strategies."""

    def _init_tracing(self, trace_dir, capture, seeds, run_info):
        if trace_dir is None:
            raise ValueError("`trace_dir` is required: the directory that receives replica-<N>.h5. "
                             "Received: trace_dir=None")
        if capture is None:
            capture = CaptureConfig()
        elif isinstance(capture, str):
            capture = CaptureConfig(mode=capture)
        elif not isinstance(capture, CaptureConfig):
            raise TypeError(f"`capture` must be a CaptureConfig or a mode string. Received: capture={capture!r}")
        self._trace_session = TraceSession(self, trace_dir, capture, seeds, run_info)

    @property
    def trace_session(self) -> TraceSession:
        return self._trace_session

    @property
    def trace_dir(self) -> str:
        return self._trace_session.trace_dir

    def watch(self, model, optimizer) -> None:
        """Names the Keras model and optimizer whose step is traced.

        Call once, after building both (under ``strategy.scope()``) and before
        the first ``strategy.run``. The optimizer is built here if it is not yet.
        """
        if not getattr(optimizer, "built", True):
            with self.scope():
                optimizer.build(model.trainable_variables)
        self._trace_session.watch(model, optimizer)

    def record_micro_step(self, grads: Sequence[Any]) -> None:
        """Records one micro-batch's local gradients under gradient accumulation.

        Call inside the replica function, after each micro-batch's
        ``tape.gradient``, with gradients aligned with
        ``model.trainable_variables``. Micro-steps are numbered in call order.
        """
        capture = self.extended._tracer_capture
        if capture is None:
            if self._trace_session.enabled and tf.distribute.in_cross_replica_context():
                raise CaptureError("record_micro_step must be called inside the replica function")
            return
        capture.note_micro_step(_local_replica_id(self.extended), grads)

    def run(self, fn, args=(), kwargs=None, options=None):
        session = self._trace_session
        if tf.executing_eagerly() and session.enabled:
            # Steps are captured from the graph of a tf.function; an eager run() would go
            # untraced without a word, and a trace missing steps is worse than a warning.
            if not getattr(self, "_warned_eager", False):
                self._warned_eager = True
                warnings.warn("tracer: strategy.run outside tf.function is not traced; wrap the step in "
                              "@tf.function (as TensorFlow's distributed training tutorial does) to trace it",
                              RuntimeWarning, stacklevel=2)
            return super().run(fn, args=args, kwargs=kwargs, options=options)
        capture = session.begin()
        if capture is None:
            return super().run(fn, args=args, kwargs=kwargs, options=options)
        if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
            # Everything in such a function is compiled, and the host hand-over of the rows cannot be.
            raise CaptureError(
                "strategy.run is inside a function compiled with XLA (tf.function(jit_compile=True), or "
                "model.compile(jit_compile=True) under model.fit), where the tracer cannot hand its rows to the "
                "host; compile the replica function instead (the function passed to strategy.run), or use "
                "jit_compile=False, Keras' default under tf.distribute")
        # Read before the update: automatic control dependencies order these
        # reads ahead of the optimizer's writes.
        step, lr = session.read_step()
        self._observe_keras_loss()
        self.extended._tracer_capture = capture
        try:
            result = super().run(fn, args=args, kwargs=kwargs, options=options)
        finally:
            self.extended._tracer_capture = None
        session.emit(capture, step, lr, args, kwargs, result)
        return result

    def _observe_keras_loss(self) -> None:
        """Under ``model.fit``, report the loss of each replica's batch to the active capture.

        Keras' ``train_step`` returns its metrics' results, whose ``loss`` is the
        mean since the epoch began; the loss of this step exists only as the value
        it adds to the model's loss tracker. The tracker's ``update_state`` is
        observed (the value passes through unchanged), so the trace records the
        step's own loss, as a custom loop's return value gives it.
        """
        tracker = getattr(self._trace_session.model, "_loss_tracker", None)
        if tracker is None or getattr(tracker, "_tracer_observed", False):
            return
        update_state = tracker.update_state
        extended = self.extended

        def observed_update_state(values, *args, **kwargs):
            capture = extended._tracer_capture
            if capture is not None and not tf.distribute.in_cross_replica_context():
                capture.note_loss(_local_replica_id(extended), values)
            return update_state(values, *args, **kwargs)

        tracker.update_state = observed_update_state
        tracker._tracer_observed = True

    def flush(self) -> None:
        """Blocks until every step traced so far is on disk (call before saving a checkpoint)."""
        self._trace_session.flush()

    def close(self) -> None:
        """Writes everything captured and closes the trace files. Idempotent."""
        self._trace_session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class TracedMirroredStrategy(_TracedStrategyMixin, tf.distribute.MirroredStrategy):
    """``tf.distribute.MirroredStrategy`` that writes one trace file per replica.

    Args:
        devices: As for ``MirroredStrategy``.
        cross_device_ops: As for ``MirroredStrategy``.
        trace_dir: Directory for ``replica-<N>.h5`` files.
        capture: A :class:`tracer.CaptureConfig` or a mode string
            (``"fingerprint"``, ``"full"``, ``"off"``).
        seeds: Seeds of the run (weights, shuffle...), recorded in the trace.
        run_info: Other facts worth recording (command line, flags).
    """

    def __init__(self, devices=None, cross_device_ops=None, *, trace_dir: str,
                 capture: Optional[CaptureConfig] = None, seeds: Optional[Dict[str, Any]] = None,
                 run_info: Optional[Dict[str, Any]] = None):
        # MirroredStrategy numbers its collectives from a class-wide base, so two
        # strategies in one process whose models differ would collide on
        # collective instance keys; give each traced strategy its own range.
        self._collective_key_base = next(_COLLECTIVE_KEY_BASES)
        extended = _TracedMirroredExtended(self, devices=devices, cross_device_ops=cross_device_ops)
        distribute_lib.Strategy.__init__(self, extended)
        self._init_tracing(trace_dir, capture, seeds, run_info)

    def __repr__(self) -> str:
        return (f"<TracedMirroredStrategy replicas={self.num_replicas_in_sync} "
                f"trace_dir={self.trace_dir!r} mode={self._trace_session.config.mode}>")


class TracedMultiWorkerMirroredStrategy(_TracedStrategyMixin, tf.distribute.MultiWorkerMirroredStrategy):
    """``tf.distribute.MultiWorkerMirroredStrategy`` that writes one trace file per replica.

    Each worker writes the files of its own replicas; global replica index =
    worker index x replicas per worker + local replica index.

    Args:
        cluster_resolver: As for ``MultiWorkerMirroredStrategy``.
        communication_options: As for ``MultiWorkerMirroredStrategy``.
        trace_dir, capture, seeds, run_info: As for :class:`TracedMirroredStrategy`.
    """

    def __init__(self, cluster_resolver=None, communication_options=None, *, trace_dir: str,
                 capture: Optional[CaptureConfig] = None, seeds: Optional[Dict[str, Any]] = None,
                 run_info: Optional[Dict[str, Any]] = None):
        if communication_options is None:
            communication_options = tf.distribute.experimental.CommunicationOptions()
        extended = _TracedCollectiveExtended(self, cluster_resolver=cluster_resolver,
                                             communication_options=communication_options)
        distribute_lib.Strategy.__init__(self, extended)
        self._init_tracing(trace_dir, capture, seeds, run_info)

    def __repr__(self) -> str:
        return (f"<TracedMultiWorkerMirroredStrategy replicas={self.num_replicas_in_sync} "
                f"trace_dir={self.trace_dir!r} mode={self._trace_session.config.mode}>")
