"""Graph-time bookkeeping of one traced ``strategy.run``: what each replica reduced and applied.

The traced strategies' extended objects report every gradient all-reduce and
every variable update to the active :class:`StepCapture`. A gradient the
optimizer applied is recognised by following its identity chain (Keras wraps the
all-reduce in ``custom_gradient``, which adds ``Identity``/``IdentityN``) back to
an all-reduce output, whose input is the replica's local gradient. Nothing here
guesses by position: an update we cannot trace back to an all-reduce is not
labelled a gradient.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

import tensorflow as tf
from tensorflow.python.distribute import values as tf_values
from tensorflow.python.ops import resource_variable_ops

from tracer.errors import CaptureError

_IDENTITY_OPS = frozenset({"Identity", "IdentityN"})


def components(value: Any) -> Tuple[Any, ...]:
    """Per-local-replica components of a distributed value (a plain value is one component)."""
    if isinstance(value, tf_values.DistributedValues):
        return tuple(value.values)
    return (value,)


def _source(tensor: Any) -> Any:
    """Follow Identity/IdentityN producers back to the first other tensor."""
    seen = 0
    while isinstance(tensor, tf.Tensor) and not tf.executing_eagerly() and hasattr(tensor, "op") \
            and tensor.op.type in _IDENTITY_OPS and seen < 64:
        tensor = tensor.op.inputs[tensor.value_index]
        seen += 1
    return tensor


def _ref(tensor: Any):
    try:
        return tensor.ref()
    except (AttributeError, TypeError):
        return ("id", id(tensor))


class StepCapture:
    """Tensors recorded while one ``strategy.run`` call was traced, per local replica.

    An update made in a graph nested in the step's (a conditional update, as
    ``LossScaleOptimizer`` makes: it applies only when the gradients are
    finite; or ``apply_gradients`` inside a nested ``tf.function``) produces
    tensors the step cannot read. There, the gradient is also assigned to a
    stash variable on the replica's device, and the step reads the stash after
    ``run`` (automatic control dependencies order the read after the update).

    Args:
        num_local: Replicas in this process.
        var_paths: ``id(tf variable) -> Keras variable path`` of the watched
            trainable variables.
        devices: The local replicas' devices (for the stash variables).
        stash: ``(replica, kind, path) -> variable``, kept by the session
            across traces, so that retracing the step reuses its stash.
    """

    def __init__(self, num_local: int, var_paths: Dict[int, str], devices: Sequence[str] = (),
                 stash: Optional[Dict[Tuple[int, str, str], Any]] = None):
        self.num_local = num_local
        self._var_paths = var_paths
        self._devices = list(devices)
        self._stash = stash if stash is not None else {}
        self._graph = tf.compat.v1.get_default_graph()
        self.stashed = False
        """Whether some update was made in a nested graph (it may not have run: see ``TraceSession.emit``)."""
        self._lock = threading.Lock()
        # ref(all-reduce output component) -> (local replica, all-reduce input component)
        self._reduced: Dict[Any, Tuple[int, Any]] = {}
        self.local_grads: List[Dict[str, Any]] = [{} for _ in range(num_local)]
        self.applied_grads: List[Dict[str, Any]] = [{} for _ in range(num_local)]
        self.micro_steps: List[List[Sequence[Any]]] = [[] for _ in range(num_local)]
        self.losses: List[Any] = [None] * num_local
        """Per replica, the loss Keras' ``train_step`` computed (``model.fit``), else None."""

    # Called from the traced extended objects -------------------------------
    def note_reduce(self, inputs: Sequence[Any], outputs: Sequence[Any], replica: Optional[int] = None) -> None:
        """Record a SUM all-reduce: cross-replica (all replicas) or in one replica's context."""
        with self._lock:
            for value_in, value_out in zip(inputs, outputs):
                ins, outs = components(value_in), components(value_out)
                if replica is not None:
                    self._reduced[_ref(outs[0])] = (replica, ins[0])
                    continue
                if len(ins) != len(outs):
                    continue
                for i, (t_in, t_out) in enumerate(zip(ins, outs)):
                    self._reduced[_ref(t_out)] = (i, t_in)

    def note_update(self, var: Any, grad: Any, replica: Optional[int] = None) -> None:
        """Record an update of ``var`` with ``grad`` if ``grad`` is an all-reduced gradient."""
        path = self._var_paths.get(id(var))
        if path is None:
            return
        grads = components(grad)
        with self._lock:
            for i, g in enumerate(grads):
                local = replica if replica is not None else i
                hit = self._reduced.get(_ref(_source(g)))
                if hit is None or hit[0] != local:
                    continue
                self.local_grads[local][path] = self._reachable(local, "local_grad", path, hit[1])
                self.applied_grads[local][path] = self._reachable(local, "allreduced_grad", path, g)

    def _reachable(self, replica: int, kind: str, path: str, tensor: Any) -> Any:
        """``tensor`` if the step's graph can read it, else its stash variable (see the class doc)."""
        if getattr(tensor, "graph", self._graph) is self._graph or not self._devices:
            return tensor
        key = (replica, kind, path)
        var = self._stash.get(key)
        if var is None:
            with tf.init_scope(), tf.device(self._devices[replica]):
                # A plain resource variable: not a distributed variable of the strategy in scope.
                var = resource_variable_ops.ResourceVariable(
                    tf.zeros(tensor.shape, tensor.dtype), trainable=False,
                    name=f"tracer_stash_{kind}_{replica}_{len(self._stash)}")
            self._stash[key] = var
        with tf.device(self._devices[replica]):
            var.assign(tensor)
        self.stashed = True
        return var

    def read_stash(self) -> None:
        """In the step's graph, after ``run``: replace each stash variable by a read of it."""
        for per_replica in (self.local_grads, self.applied_grads):
            for i, grads in enumerate(per_replica):
                for path, value in grads.items():
                    if isinstance(value, resource_variable_ops.BaseResourceVariable):
                        with tf.device(self._devices[i]):
                            grads[path] = value.read_value()
        for i, value in enumerate(self.losses):
            if isinstance(value, resource_variable_ops.BaseResourceVariable):
                with tf.device(self._devices[i]):
                    self.losses[i] = value.read_value()

    def note_loss(self, replica: int, loss: Any) -> None:
        """Record the loss computed on ``replica``'s batch in this step."""
        with self._lock:
            self.losses[replica] = self._reachable(replica, "loss", "", loss)

    def note_micro_step(self, replica: int, grads: Sequence[Any]) -> None:
        with self._lock:
            self.micro_steps[replica].append(list(grads))

    # Used by the strategy after run() -------------------------------------
    @property
    def applied(self) -> bool:
        return any(self.applied_grads)

    def check_complete(self, trainable_paths: Sequence[str]) -> None:
        """Every replica must have applied a gradient to the same variables."""
        first = set(self.applied_grads[0])
        for i, applied in enumerate(self.applied_grads):
            if set(applied) != first:
                raise CaptureError(
                    f"replica {i} applied gradients to {sorted(applied)}, replica 0 to {sorted(first)}; "
                    "every replica must run the same optimizer step")
        counts = {len(m) for m in self.micro_steps}
        if len(counts) > 1:
            raise CaptureError(f"replicas recorded different numbers of micro-steps: {sorted(counts)}")
        unknown = first - set(trainable_paths)
        if unknown:
            raise CaptureError(f"gradients were applied to unwatched variables {sorted(unknown)}")
