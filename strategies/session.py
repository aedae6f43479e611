"""TraceSession: the per-strategy state that turns graph-time captures into trace files.

A traced strategy owns one session. The session knows the watched model and
optimizer, builds the tensor table the first time a step is traced, creates one
:class:`tracer.TraceWriter` per local replica, and emits each step's
fingerprints into a buffer on each replica's device, which one host callback
empties every ``flush_every`` steps (and at each full-tensor step, which brings
its full tensors along).
"""

from __future__ import annotations

import atexit
import collections.abc
import dataclasses
import hashlib
import json
import os
import threading
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from tensorflow.python.distribute import device_util, distribute_utils
from tensorflow.python.ops import resource_variable_ops
from tensorflow.python.util import nest as tf_nest

from strategies import environment
from strategies.capture import StepCapture, components
from strategies.fingerprint import fingerprint_all
from tracer import schema
from tracer.config import CaptureConfig
from tracer.errors import CaptureError
from tracer.segments import segment_path
from tracer.writer import TraceWriter

_N_STATS = len(schema.STATS)


@dataclasses.dataclass
class _DeviceBuffer:
    """Fingerprint rows waiting on the devices (see ``TraceSession._add_callbacks``)."""

    size: int  # K rows
    devices: List[str]  # one per local replica
    host: str  # where the row counter lives
    ints: List[Any]  # per replica: int64 [K, 3, n] (hash bits, nan, inf)
    floats: List[Any]  # per replica: float64 [K, 2, n] (l2, max_abs)
    steps: Any  # int64 [K]: the step of each row
    fill: Any  # int64 scalar on the host: rows in use

# Capture code is called from the user's (autograph-converted) step; converting
# it would only slow tracing down and can turn our Python checks into graph ops.
_no_autograph = tf.autograph.experimental.do_not_convert


def _dtype_name(dtype: tf.DType) -> str:
    return tf.as_dtype(dtype).name


def _spec(kind: str, name: str, tensor: Any, **extra) -> schema.TensorSpec:
    """The column of ``tensor``; an input batch of unknown size gets ``schema.UNKNOWN_DIM`` as its first axis."""
    shape = tensor.shape
    batch = kind == "input" and shape.rank and shape[1:].is_fully_defined()
    if not shape.is_fully_defined() and not batch:
        what = "axes other than the first" if kind == "input" and shape.rank else "a shape"
        raise CaptureError(f"{kind} {name!r} has {what} not known when the step is traced ({shape}); tracer "
                           f"needs them static{': give the input pipeline fixed shapes' if kind == 'input' else ''}")
    dims = [schema.UNKNOWN_DIM if d is None else int(d) for d in shape]
    return schema.TensorSpec(kind=kind, name=name, shape=tuple(dims), dtype=_dtype_name(tensor.dtype), **extra)


def _input_structure(args, kwargs):
    """What one replica consumed, without the (args, kwargs) packaging of ``run``."""
    if kwargs:
        return (tuple(args), dict(kwargs))
    if isinstance(args, (tuple, list)) and len(args) == 1:
        return args[0]
    return tuple(args)


def _input_names(structure: Any) -> List[str]:
    paths = tf_nest.flatten_with_joined_string_paths(structure)
    return [f"batch[{p}]" if p else "batch" for p, _ in paths]


def check_input_shapes(per_replica_inputs: Sequence[Sequence[Any]], columns: Sequence[schema.TensorSpec]) -> None:
    """Full tensors of the inputs must fit their columns: only the first (batch) axis may be shorter.

    A column's shape is the widest local replica's at the first step. A later,
    smaller batch (an epoch's last, partial batch, or a batch split unevenly
    across replicas) fills the first rows of its full-tensor row
    (``/full/rows``); a larger one or another shape cannot be stored. A column
    whose batch size was unknown at the first step (``dynamic``) takes batches
    of any size. A batch whose size is unknown here, for a column of fixed
    size, is checked by the writer when it arrives.
    """
    for k, spec in enumerate(columns):
        for i, inputs in enumerate(per_replica_inputs):
            shape = inputs[k].shape
            if not shape.rank:  # a scalar, or a rank unknown here
                fits = shape.rank == len(spec.shape)
            else:
                length = spec.shape[0] if shape[0] is None else shape[0]
                fits = (shape.rank == len(spec.shape) and shape[1:].is_fully_defined()
                        and spec.fits((length,) + tuple(shape[1:])))
            if not fits:
                raise CaptureError(
                    f"input {spec.name!r} has shape {tuple(shape)} on local replica {i}, which does not fit its "
                    f"column's {spec.shape} (the widest replica's at the first traced step): full tensors may only "
                    f"be shorter along the first axis, as an epoch's last batch is. Keep later batches no larger "
                    f"than the first, or leave 'input' out of CaptureConfig(kinds=...) for full capture")


def _widest(per_replica_inputs: Sequence[Sequence[Any]]) -> List[Any]:
    """Per input component, the local replicas' tensor with the longest first axis (uneven splits)."""
    def length(t):
        shape = getattr(t, "shape", None)
        return shape[0] if shape is not None and shape.rank and shape[0] is not None else -1

    return [max((inputs[k] for inputs in per_replica_inputs), key=length)
            for k in range(len(per_replica_inputs[0]))]


class TraceSession:
    """Capture state of one traced strategy.

    Args:
        strategy: The traced strategy.
        trace_dir: Directory receiving ``replica-<N>.h5`` (or, when the optimizer
            was restored from a checkpoint, the next segment ``replica-<N>.seg<k>.h5``).
        config: What to capture.
        seeds: Seeds the run used, recorded in the trace.
        run_info: Free-form facts to record (command line, XLA flag...).
    """

    def __init__(self, strategy, trace_dir: str, config: CaptureConfig, seeds: Optional[Dict[str, Any]],
                 run_info: Optional[Dict[str, Any]]):
        self._strategy = weakref.proxy(strategy)  # the strategy owns the session, not the reverse
        self._strategy_name = type(strategy).__name__
        self.trace_dir = os.path.abspath(os.fspath(trace_dir))
        self.config = config
        self.seeds = dict(seeds or {})
        self.run_info = dict(run_info or {})
        self.model = None
        self.optimizer = None
        self.writers: List[TraceWriter] = []
        self.tensors: Optional[List[schema.TensorSpec]] = None
        self._var_paths: Dict[int, str] = {}
        self._stash: Dict[Tuple[int, str, str], Any] = {}  # see StepCapture
        self._closed = False
        self._lock = threading.Lock()
        atexit.register(self.close)

    # -------------------------------------------------------------- identity
    @property
    def enabled(self) -> bool:
        return self.config.mode != "off" and not self._closed

    def _topology(self) -> Tuple[int, int, int, int]:
        """(worker index, number of workers, local replicas, replicas in sync)."""
        ext = self._strategy.extended
        n_local = len(ext.worker_devices)
        worker = 0
        n_workers = 1
        resolver = getattr(self._strategy, "cluster_resolver", None)
        if resolver is not None and resolver.task_type not in (None, ""):
            spec = resolver.cluster_spec().as_dict()
            n_workers = sum(len(v) for v in spec.values()) or 1
            worker = int(resolver.task_id or 0)
            if resolver.task_type != "worker" and "chief" in spec:
                worker = 0
            elif "chief" in spec:
                worker += len(spec["chief"])
        return worker, n_workers, n_local, self._strategy.num_replicas_in_sync

    # ----------------------------------------------------------------- watch
    def watch(self, model, optimizer) -> None:
        if self.model is not None and (self.model is not model or self.optimizer is not optimizer):
            raise CaptureError("this strategy already traces another model/optimizer; one pair per strategy")
        self.model, self.optimizer = model, optimizer
        self._var_paths = {id(v.value if hasattr(v, "value") else v): v.path for v in model.trainable_variables}

    # ------------------------------------------------------------ the table
    def _slot_owner(self, opt_var) -> Tuple[str, str]:
        """(model variable path, slot name) of an optimizer variable, by Keras' naming rule."""
        name = opt_var.name
        best = ""
        for path in self._var_paths.values():
            prefix = path.replace("/", "_") + "_"
            if name.startswith(prefix) and len(prefix) > len(best):
                best = prefix
        if not best:
            return "", name
        owner = next(p for p in self._var_paths.values() if p.replace("/", "_") + "_" == best)
        return owner, name[len(best):]

    def _optimizer_vars(self) -> List[Tuple[str, str, Any]]:
        """(tensor name, owning variable, slot, variable) for every optimizer variable but the LR."""
        out = []
        opt = self.optimizer
        # A wrapper (LossScaleOptimizer) has its inner optimizer's learning rate.
        lr_vars = [getattr(o, "_learning_rate", None) for o in (opt, getattr(opt, "inner_optimizer", None)) if o]
        for v in opt.variables:
            if any(v is lr for lr in lr_vars if lr is not None):
                continue  # recorded as the learning rate in effect, see _learning_rate
            if v is opt.iterations:
                out.append(("iteration", "", "iteration", v))
                continue
            owner, slot = self._slot_owner(v)
            out.append((f"{owner}/{slot}" if owner else v.path, owner, slot, v))
        return out

    def _learning_rate(self) -> tf.Tensor:
        return tf.cast(tf.convert_to_tensor(self.optimizer.learning_rate), tf.float32)

    def _build_table(self, inputs0: Sequence[Any], input_names: Sequence[str], loss0: Any,
                     capture: StepCapture) -> List[schema.TensorSpec]:
        kinds = set(self.config.kinds)
        trainable = [v.path for v in self.model.trainable_variables]
        applied = [p for p in trainable if p in capture.applied_grads[0]]
        by_path = {v.path: v for v in self.model.trainable_variables}
        specs: List[schema.TensorSpec] = []
        if "input" in kinds:
            specs += [_spec("input", n, t) for n, t in zip(input_names, inputs0)]
        if "loss" in kinds and loss0 is not None:
            specs.append(_spec("loss", "loss", loss0))
        if "local_grad" in kinds:
            # Backprop order: the last layer's gradient is computed first.
            for k, _ in enumerate(capture.micro_steps[0]):
                specs += [_spec("local_grad", p, by_path[p], variable=p, micro_step=k) for p in reversed(trainable)]
            specs += [_spec("local_grad", p, capture.local_grads[0][p], variable=p) for p in reversed(applied)]
        if "allreduced_grad" in kinds:
            specs += [_spec("allreduced_grad", p, capture.applied_grads[0][p], variable=p) for p in applied]
        if "optimizer_slot" in kinds:
            specs.append(schema.TensorSpec("optimizer_slot", "learning_rate", (), "float32", slot="learning_rate"))
            for name, owner, slot, v in self._optimizer_vars():
                specs.append(_spec("optimizer_slot", name, v, variable=owner, slot=slot))
        if "weight" in kinds:
            specs += [_spec("weight", v.path, v, variable=v.path) for v in self.model.variables]
        return specs

    def _tensors_for_replica(self, i: int, inputs: Sequence[Any], loss: Any, lr: tf.Tensor,
                             capture: StepCapture) -> List[Any]:
        """Tensors of local replica ``i`` in table order (reads variables after the update)."""
        return [self._tensor_of(spec, i, inputs, loss, lr, capture) for spec in self.tensors]

    def _tensor_of(self, spec, i, inputs, loss, lr, capture):
        """The tensor of local replica ``i`` that column ``spec`` records."""
        kind = spec.kind
        if kind == "input":
            return inputs[self._input_index[spec.name]]
        if kind == "loss":
            return loss
        if kind == "local_grad":
            if spec.micro_step >= 0:
                return capture.micro_steps[i][spec.micro_step][self._trainable_index[spec.name]]
            return capture.local_grads[i][spec.name]
        if kind == "allreduced_grad":
            return capture.applied_grads[i][spec.name]
        if kind == "optimizer_slot" and spec.name == "learning_rate":
            return lr
        return self._read_component(self._variables[spec.key], i)

    @staticmethod
    def _read_component(var, i: int) -> tf.Tensor:
        v = var.value if hasattr(var, "value") and not isinstance(var, tf.Variable) else var
        comps = components(v)
        comp = comps[i] if len(comps) > 1 else comps[0]
        with tf.device(comp.device):
            # One ReadVariableOp, without read_value's name scope and identity: a replica reads every
            # weight and slot each time the step is traced.
            return resource_variable_ops.read_variable_op(comp.handle, comp.dtype)

    # ------------------------------------------------------------- emission
    @_no_autograph
    def begin(self) -> Optional[StepCapture]:
        """Called by ``run`` before the user's step; None when nothing is traced."""
        if not self.enabled:
            return None
        if self.model is None:
            raise CaptureError("call strategy.watch(model, optimizer) once after building them, "
                               "before the first strategy.run")
        _, _, n_local, _ = self._topology()
        return StepCapture(n_local, self._var_paths, devices=list(self._strategy.extended.worker_devices)[:n_local],
                           stash=self._stash)

    @_no_autograph
    def read_step(self) -> Tuple[tf.Tensor, tf.Tensor]:
        """Optimizer step and learning rate in effect, read before the update."""
        return tf.cast(self.optimizer.iterations, tf.int64), self._learning_rate()

    @_no_autograph
    def emit(self, capture: StepCapture, step: tf.Tensor, lr: tf.Tensor, args, kwargs, result) -> None:
        """Add the ops that fingerprint this step and hand it to the writers."""
        if not capture.applied:
            return  # this run() did not step the optimizer (e.g. an evaluation step)
        trainable = [v.path for v in self.model.trainable_variables]
        capture.check_complete(trainable)
        capture.read_stash()
        graph = tf.compat.v1.get_default_graph()
        if any(getattr(g, "graph", graph) is not graph for steps in capture.micro_steps for grads in steps
               for g in grads):
            # Gradients handed to record_micro_step inside a nested tf.function cannot leave it.
            raise CaptureError(
                "record_micro_step was called inside a nested tf.function, whose tensors the tracer cannot read; "
                "call it in the replica function itself, with the gradients the nested function returns")
        _, _, n_local, _ = self._topology()
        per_replica_inputs = []
        per_replica_loss = []
        for i in range(n_local):
            structure = distribute_utils.select_replica(i, _input_structure(args, kwargs))
            per_replica_inputs.append(tf.nest.flatten(structure))
            loss = capture.losses[i]
            if loss is None and result is not None:
                loss = self._pick_loss(distribute_utils.select_replica(i, result))
            per_replica_loss.append(loss)
        if self.tensors is None:
            names = _input_names(_input_structure(args, kwargs))
            with tf.init_scope():
                self._start(_widest(per_replica_inputs), names, per_replica_loss[0], capture)
        elif len(per_replica_inputs[0]) != len(self._input_index) and "input" in self.config.kinds:
            raise CaptureError("the step was traced again with a different input structure; "
                               "the trace's tensor table is fixed by the first step")
        if self.config.mode == "full" and "input" in self.config.kinds:
            columns = [t for t in self.tensors if t.kind == "input"]
            check_input_shapes([[inputs[self._input_index[t.name]] for t in columns]
                                for inputs in per_replica_inputs], columns)
        flat_fps, flat_full = [], []
        for i in range(n_local):
            tensors = self._tensors_for_replica(i, per_replica_inputs[i], per_replica_loss[i], lr, capture)
            device = self._strategy.extended.worker_devices[i]
            with tf.device(device):
                flat_fps += fingerprint_all(tensors)
            flat_full += tensors
        if not capture.stashed:
            self._add_callbacks(step, flat_fps, flat_full)
            return
        # The update was made in a nested graph, maybe conditionally (LossScaleOptimizer skips it when
        # the gradients are not finite): a step whose update did not happen has no row (rows are
        # numbered by optimizer step, and the next update is this step again); the trace records the skip.
        updated = tf.not_equal(tf.cast(self.optimizer.iterations, tf.int64), step)

        def write():
            self._add_callbacks(step, flat_fps, flat_full)
            return tf.zeros([], tf.int64)

        def skipped():
            return tf.numpy_function(self._on_skipped, [step], tf.int64, stateful=True, name="tracer_skipped")

        tf.cond(updated, write, skipped)

    def _on_skipped(self, step) -> np.int64:
        for writer in self.writers:
            writer.write_skipped(int(step))
        return np.int64(0)

    @staticmethod
    def _pick_loss(value):
        """The replica function's loss: its return value, its entry ``loss``, or the first float scalar in it."""
        if isinstance(value, collections.abc.Mapping) and "loss" in value:
            value = value["loss"]  # nest.flatten sorts a dict's keys: "accuracy" would come first
        for t in tf.nest.flatten(value):
            if isinstance(t, (tf.Tensor, tf.Variable)) and t.dtype.is_floating and t.shape.rank == 0:
                return t
        return None

    def _add_callbacks(self, step, flat_fps, flat_full) -> None:
        """Keep this step's fingerprints on the device; hand them to the host every K steps.

        Each replica's five vectors go into row ``fill`` of its device buffer;
        the host-side counter ``fill`` decides, without waiting for the device,
        when K = ``flush_every`` rows are ready: then one host callback takes
        them all. A step selected for full tensors takes the buffered rows with
        it. So the device meets the host once per K steps (or per full step),
        not once per step.
        """
        buf = self._buffer
        n_local = len(buf.ints)
        with tf.device(buf.host):
            pos = buf.fill.read_value()
        writes = []
        for i in range(n_local):
            h, l2, max_abs, nan, inf = flat_fps[i * _N_STATS:(i + 1) * _N_STATS]
            with tf.device(buf.devices[i]):
                writes.append(buf.ints[i][pos].assign(tf.stack([h, nan, inf])))
                writes.append(buf.floats[i][pos].assign(tf.stack([l2, max_abs])))
        with tf.device(buf.devices[0]):
            writes.append(buf.steps[pos].assign(step))
        with tf.control_dependencies(writes), tf.device(buf.host):
            filled = buf.fill.assign_add(1)

        def hand_over(full=None):
            args = [filled, buf.steps.read_value()]
            for i in range(n_local):
                args += [buf.ints[i].read_value(), buf.floats[i].read_value()]
            if full is None:
                done = tf.numpy_function(self._on_rows, args, tf.int64, stateful=True, name="tracer_write_steps")
            else:
                done = tf.numpy_function(self._on_rows_full, args + list(full), tf.int64, stateful=True,
                                         name="tracer_write_full")
            with tf.control_dependencies([done]), tf.device(buf.host):
                return buf.fill.assign(tf.zeros([], tf.int64))

        def keep():
            return filled

        def rows_due():
            return tf.cond(filled >= buf.size, hand_over, keep)

        if self.config.mode != "full":
            rows_due()
            return
        cfg = self.config
        wanted = tf.equal(tf.math.floormod(step - (cfg.full_window[0] if cfg.full_window else 0),
                                           cfg.full_every), 0)
        if cfg.full_window is not None:
            wanted = tf.logical_and(wanted, tf.logical_and(step >= cfg.full_window[0], step <= cfg.full_window[1]))
        tf.cond(wanted, lambda: hand_over(self._shared_out(flat_fps, flat_full)), rows_due)

    def _shared_out(self, flat_fps, flat_full) -> List[tf.Tensor]:
        """``flat_full`` with an empty tensor for each full tensor the host need not receive.

        A tensor of a global kind on local replica i > 0 whose hash equals the
        first replica's is written once, in the first replica's file (see
        ``_write_rows``). Deciding that on the device keeps its bytes there:
        on a GPU, they never cross to the host. (Both branches give a vector;
        ``_write_rows`` restores the shape.)
        """
        n = len(self.tensors)
        n_local = len(flat_full) // n if n else 0
        out = list(flat_full)
        shared = [c for c, t in enumerate(self.tensors) if t.kind in schema.GLOBAL_KINDS]
        if n_local < 2 or not shared:
            return out
        first = tf.gather(flat_fps[0], shared)
        for i in range(1, n_local):
            with tf.device(self._buffer.devices[i]):
                same = tf.unstack(tf.equal(tf.gather(flat_fps[i * _N_STATS], shared), first))
                for k, c in enumerate(shared):
                    t = out[i * n + c]
                    out[i * n + c] = tf.cond(same[k], lambda t=t: tf.zeros([0], t.dtype),
                                             lambda t=t: tf.reshape(t, [-1]))
        return out

    def _on_rows(self, filled, steps, *buffers) -> np.int64:
        self._write_rows(int(filled), steps, buffers, None)
        return np.int64(0)

    def _on_rows_full(self, filled, steps, *rest) -> np.int64:
        n_buf = 2 * len(self.writers)
        self._write_rows(int(filled), steps, rest[:n_buf], rest[n_buf:])
        return np.int64(0)

    def _write_rows(self, filled: int, steps, buffers, full) -> None:
        """Hand rows 0..filled-1 of the buffers to the writers; ``full`` goes with the last row.

        A full tensor of a shared column (a global kind) whose hash equals the
        first local replica's at that step is written only to the first
        replica's file; the others record where it is (``stored_in``).
        """
        n = len(self.tensors)
        first_hashes = None
        for i, writer in enumerate(self.writers):
            # Copies: the fingerprint buffers are variables that later steps overwrite, and
            # the writer keeps the rows until its next flush.
            ints, floats = np.array(buffers[2 * i][:filled]), np.array(buffers[2 * i + 1][:filled])
            if full is not None and filled:
                hashes = ints[filled - 1, 0]
                if i == 0:
                    first_hashes = hashes
                arrays = list(full[i * n:(i + 1) * n])
                for c in writer.shared_columns:
                    if arrays[c].size or not self.tensors[c].size:
                        arrays[c] = arrays[c].reshape(self.tensors[c].shape)
            block = []  # fingerprint-only rows: one hand-over for all of them
            for r in range(filled):
                if writer.last_step is not None and int(steps[r]) <= writer.last_step:
                    continue  # handed over already, before a failed hand-over stopped halfway
                vecs = [ints[r, 0], floats[r, 0], floats[r, 1], ints[r, 1], ints[r, 2]]  # schema.STATS order
                if full is None or r < filled - 1:
                    block.append((int(steps[r]), vecs))
                    continue
                writer.write_steps(block)
                block = []
                # An empty array in place of a tensor: its hash equals the first replica's
                # (_shared_out), so equal bits (collisions about 2**-64), in that file already.
                holder = self.writers[0].replica
                stored_in = {c: holder for c in writer.shared_columns if arrays[c].size != self.tensors[c].size}
                if any(hashes[c] != first_hashes[c] for c in stored_in):
                    raise CaptureError(f"replica {writer.replica}: a full tensor was held back as equal to "
                                       f"replica {holder}'s, but the hashes differ")
                # TensorFlow's buffers, lent to the writer: a variable updated while
                # the writer still holds its value is copied first by TensorFlow.
                writer.write_step(int(steps[r]), vecs, arrays, copy=False, stored_in=stored_in)
            writer.write_steps(block)

    def _drain(self) -> None:
        """Outside any step: hand the rows still on the device to the writers."""
        buf = getattr(self, "_buffer", None)
        if buf is None:
            return
        filled = int(buf.fill.numpy())
        if filled:
            buffers = []
            for i in range(len(buf.ints)):
                buffers += [buf.ints[i].numpy(), buf.floats[i].numpy()]
            buf.fill.assign(0)
            self._write_rows(filled, buf.steps.numpy(), buffers, None)

    def _make_buffer(self, n_local: int) -> "_DeviceBuffer":
        """Per local replica, K rows of fingerprints on its device (variables outside the strategy)."""
        size = self.config.flush_every
        n = len(self.tensors)
        devices = list(self._strategy.extended.worker_devices)[:n_local]

        def variable(value, name):
            # ResourceVariable directly: not a distributed variable of the strategy in scope.
            return resource_variable_ops.ResourceVariable(value, trainable=False, name=name)

        ints, floats = [], []
        for i, device in enumerate(devices):
            with tf.device(device):
                ints.append(variable(tf.zeros([size, 3, n], tf.int64), f"tracer_fingerprints_int_{i}"))
                floats.append(variable(tf.zeros([size, 2, n], tf.float64), f"tracer_fingerprints_float_{i}"))
        with tf.device(devices[0]):
            steps = variable(tf.zeros([size], tf.int64), "tracer_fingerprint_steps")
        host = device_util.get_host_for_device(devices[0])
        with tf.device(host):
            fill = variable(tf.zeros([], tf.int64), "tracer_fingerprint_fill")
        return _DeviceBuffer(size=size, devices=devices, host=host, ints=ints, floats=floats, steps=steps,
                             fill=fill)

    # ------------------------------------------------------------- lifecycle
    def _start(self, inputs0, input_names, loss0, capture: StepCapture) -> None:
        """Build the table, open one writer per local replica, write the initial snapshot."""
        self._input_index = {n: k for k, n in enumerate(input_names)}
        self._trainable_index = {v.path: k for k, v in enumerate(self.model.trainable_variables)}
        self.tensors = self._build_table(inputs0, input_names, loss0, capture)
        self._variables: Dict[Tuple[str, str, int], Any] = {}
        for name, _, _, v in self._optimizer_vars():
            self._variables[("optimizer_slot", name, -1)] = v
        for v in self.model.variables:
            self._variables[("weight", v.path, -1)] = v
        worker, n_workers, n_local, n_sync = self._topology()
        attrs = self._attrs(worker, n_workers, n_local, n_sync)
        initial_cols = [c for c, t in enumerate(self.tensors) if t.key in self._variables]
        step0 = int(self.optimizer.iterations.numpy())
        os.makedirs(self.trace_dir, exist_ok=True)
        # A job restored from a checkpoint (step0 > 0) continues the trace in a new segment file.
        files = [segment_path(self.trace_dir, worker * n_local + i, step0, tensors=self.tensors, num_replicas=n_sync)
                 for i in range(n_local)]
        attrs[schema.ATTR_REPLICA_FILES] = json.dumps({str(worker * n_local + i): os.path.basename(path)
                                                       for i, (path, _, _) in enumerate(files)})
        if files[0][2] is not None:  # a resumed job continues its run (see segment_path)
            attrs[schema.ATTR_RUN_ID] = files[0][2]
        # Full tensors of the global kinds are written once per worker when its local replicas
        # agree bit for bit (see _write_rows): the other replicas' files point to the first one's.
        shared = [c for c, t in enumerate(self.tensors) if t.kind in schema.GLOBAL_KINDS]
        for i, (path, segment, _) in enumerate(files):
            replica = worker * n_local + i
            writer = TraceWriter(path, self.tensors, config=self.config, initial_columns=initial_cols,
                                 shared_columns=shared if i else (),
                                 attrs={**attrs, schema.ATTR_REPLICA: replica, schema.ATTR_LOCAL_REPLICA: i,
                                        schema.ATTR_SEGMENT: segment,
                                        "device": self._strategy.extended.worker_devices[i]})
            self.writers.append(writer)
            initial = [self._read_component(self._variables[self.tensors[c].key], i) for c in initial_cols]
            with tf.device(self._strategy.extended.worker_devices[i]):
                # Once per run: plain kernels, not an XLA compilation (seconds per device) for one call.
                fps = [t.numpy() for t in fingerprint_all(initial, use_xla=False)]
            full = [t.numpy() for t in initial]
            writer.write_initial(step0, fps, full)
        self._buffer = self._make_buffer(n_local)

    def _attrs(self, worker: int, n_workers: int, n_local: int, n_sync: int) -> Dict[str, Any]:
        strategy = self._strategy
        ext = strategy.extended
        comm = getattr(getattr(ext, "_communication_options", None), "implementation", None)
        cross = getattr(ext, "_cross_device_ops", None)
        opt_config = {}
        try:
            opt_config = json.loads(json.dumps(self.optimizer.get_config(), default=str))
        except (TypeError, ValueError, NotImplementedError):
            pass
        # Same on every worker of one job: the cluster, not this worker's task.
        try:
            cluster = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster", {})
        except ValueError:
            cluster = {}
        run_key = json.dumps([self.trace_dir, n_sync, cluster], sort_keys=True)
        attrs = {
            **environment.collect(),
            schema.ATTR_RUN_ID: hashlib.sha256(run_key.encode()).hexdigest()[:16],
            schema.ATTR_WORKER: worker,
            schema.ATTR_NUM_WORKERS: n_workers,
            schema.ATTR_NUM_REPLICAS: n_sync,
            "replicas_per_worker": n_local,
            "strategy": self._strategy_name,
            "communication": str(comm.name if hasattr(comm, "name") else comm or ""),
            "cross_device_ops": type(cross).__name__ if cross is not None else "",
            "optimizer": opt_config,
            "optimizer_class": type(self.optimizer).__name__,
            "seeds": {k: ("none" if v is None else v) for k, v in self.seeds.items()},
            "capture": self.config.to_dict(),
            "run": self.run_info,
            "pid": os.getpid(),
        }
        return attrs

    def flush(self) -> None:
        """Block until every traced step is on disk; raises a pending write error."""
        self._drain()
        for writer in self.writers:
            writer.flush()

    def close(self) -> None:
        """Flush and close every writer; idempotent. Raises the first write error."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        first_error = None
        try:
            self._drain()
        except Exception as exc:  # noqa: BLE001 - still close the files
            first_error = exc
        for writer in self.writers:
            try:
                writer.close()
            except Exception as exc:  # noqa: BLE001 - close the others, then raise
                first_error = first_error or exc
        try:
            atexit.unregister(self.close)
        except Exception:  # noqa: BLE001
            pass
        if first_error is not None:
            raise first_error
