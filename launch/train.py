"""The reference job: train the embedded MLP under tf.distribute and leave a trace.

One process, N replicas (MirroredStrategy on N GPUs, else N logical CPUs)::

    python launch/train.py --replicas 2

One worker per MPI rank (MultiWorkerMirroredStrategy, TF_CONFIG built from the
communicator)::

    mpirun -n 4 python launch/train.py

Under ``srun`` (SLURM) each task is a worker too; see ``launch/slurm_example.sbatch``.
The training loop has the shape of TensorFlow's "Custom training with
tf.distribute.Strategy" tutorial; the only tracer-specific lines are the
strategy's class, ``strategy.watch(model, optimizer)``, ``record_micro_step``
(gradient accumulation only) and ``strategy.close()``.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # `python launch/train.py` puts launch/ itself on sys.path; the imports below
    # need the repository root instead. Only done when run as a script.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import glob
import re
import secrets
import shlex
import time
from typing import List, Optional, Sequence

from launch import data as data_lib
from launch import tf_config
from launch import optim

CAPTURE_MODES = ("off", "fingerprint", "full")

# Test hook: the rank named here raises at step TRACER_TEST_FAIL_STEP (default
# 1), while the others are inside a collective, to prove the job ends instead
# of hanging. Not a user feature, hence an environment variable and no flag.
FAIL_RANK_ENV = "TRACER_TEST_FAIL_RANK"
FAIL_STEP_ENV = "TRACER_TEST_FAIL_STEP"


class UsageError(ValueError):
    """A flag, file or environment the job cannot run with; printed as one line."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1. Received: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1. Received: {text!r}")
    return value


def _loss_scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, such as 32768. Received: {text!r}")
    return value


def _seed_or_none(text: str) -> Optional[int]:
    """``--seed`` and ``--shuffle-seed``: an integer, or ``none`` for unseeded."""
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be an integer or 'none' (unseeded). Received: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The job's command line."""
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train the reference MLP under tf.distribute and write a tracer trace.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("trace")
    g.add_argument("--trace-dir", help="where replica-<i>.h5 go (default: traces/run-<date>-<time>)")
    g.add_argument("--capture", choices=CAPTURE_MODES, default="fingerprint",
                   help="fingerprints every step; 'full' adds full tensors every --full-every steps")
    g.add_argument("--full-every", type=_positive_int, default=1, help="period of full-tensor snapshots")
    g.add_argument("--on-trace-error", choices=("stop", "continue"), default="stop",
                   help="when writing the trace fails (disk full...): stop the run with the error, or warn "
                        "and continue untraced (the steps written so far stay readable)")
    g.add_argument("--no-trace", action="store_true",
                   help="use the plain tf.distribute strategies and write no trace (for comparison)")
    g.add_argument("--save-weights", metavar="PATH.npz",
                   help="rank 0 saves the final weights, keyed by variable path")
    g = p.add_argument_group("checkpoints (resume)")
    g.add_argument("--checkpoint-dir", metavar="DIR",
                   help="save model and optimizer with tf.train.Checkpoint into DIR; on start, restore the latest "
                        "checkpoint in DIR and train on to --steps optimizer steps, continuing the trace in new "
                        "segment files (default --trace-dir: DIR/trace, so the same command resumes)")
    g.add_argument("--checkpoint-every", type=_positive_int, default=None, metavar="N",
                   help="save a checkpoint every N optimizer steps (always at the end); needs --checkpoint-dir")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=_positive_int, default=100, help="optimizer steps")
    g.add_argument("--batch-size", type=_positive_int, default=64,
                   help="global batch of one micro-step, over all replicas")
    g.add_argument("--partial-batches", action="store_true",
                   help="batch each epoch without drop_remainder, as TensorFlow's multi-worker tutorial does: an "
                        "epoch whose size --batch-size does not divide ends with a smaller batch, split unevenly "
                        "across replicas, and the step is traced with batches of unknown size")
    g.add_argument("--accumulate", type=_positive_int, default=1, metavar="K",
                   help="micro-batches per optimizer step; gradients are summed, then applied once")
    g.add_argument("--seed", type=_seed_or_none, default=1, metavar="INT|none",
                   help="weight-initialization seed; 'none' leaves the initializers unseeded (random "
                        "initial weights in every run, as in a script that never seeds)")
    g.add_argument("--shuffle-seed", type=_seed_or_none, default=2, metavar="INT|none",
                   help="data-order seed; 'none' draws a fresh one (shared by all workers)")
    g.add_argument("--optimizer", choices=optim.OPTIMIZERS, default="adam")
    g.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    g.add_argument("--lr-schedule", default="constant", metavar="constant|step:K:LR",
                   help="step:K:LR switches to learning rate LR from optimizer step K on")
    g.add_argument("--adam-epsilon", type=float, default=None,
                   help="epsilon of adam/adamw/rmsprop/adagrad (default: Keras')")
    g.add_argument("--data", metavar="PATH.npz", help="arrays x (N x F) and y (N,); default: embedded")
    g = p.add_argument_group("numerics and distribution")
    g.add_argument("--mixed-precision", action="store_true",
                   help="float16 math in the hidden layers (Keras' mixed_float16 policy) with a LossScaleOptimizer, "
                        "which skips the updates whose gradients overflow and adjusts its loss scale. Under mpirun "
                        "Keras decides that per worker, from local gradients: workers that disagree wait on each "
                        "other for good, traced or not, so keep the loss scale low enough not to overflow there")
    g.add_argument("--loss-scale", type=_loss_scale, default=None, metavar="S",
                   help="initial loss scale of --mixed-precision (default: Keras' 32768); a large one makes the "
                        "first updates overflow and be skipped")
    g.add_argument("--xla", action=argparse.BooleanOptionalAction, default=False,
                   help="jit-compile each replica's forward and backward pass")
    g.add_argument("--deterministic", action="store_true", help="tf.config.experimental.enable_op_determinism()")
    g.add_argument("--replicas", type=_positive_int, default=None,
                   help="single process: MirroredStrategy on N GPUs, else N logical CPUs "
                        "(default: all GPUs, or 1 CPU)")
    g.add_argument("--multi-worker", action="store_true",
                   help="use MultiWorkerMirroredStrategy even with one worker (implied under "
                        "mpirun/srun with more than one rank)")
    g.add_argument("--port-base", type=int, default=23456,
                   help="SLURM without MPI: worker with local id i listens on port-base + i")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the reference job; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.checkpoint_every is not None and args.checkpoint_dir is None:
        parser.error(f"--checkpoint-every needs --checkpoint-dir. Received: --checkpoint-every "
                     f"{args.checkpoint_every} without --checkpoint-dir")
    try:
        launcher = tf_config.detect_launcher()
    except ValueError as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    if not launcher.is_mpi:
        return _main_guarded(args, argv, launcher, world=None)

    from launch import mpi  # only MPI-launched jobs initialize MPI

    world = mpi.init()
    with mpi.abort_on_error(world):
        code = _main_guarded(args, argv, launcher, world)
        if code != 0 and world.size > 1:
            world.abort(code, "stopped with a usage error (see the message above)")
    return code


def _main_guarded(args, argv: List[str], launcher, world) -> int:
    """Turns :class:`UsageError` and trace write errors into a one-line message; everything else propagates."""
    who = f"[rank {world.rank}] " if world is not None and world.size > 1 else ""
    try:
        return run(args, argv, launcher, world)
    except UsageError as exc:
        print(f"train.py: error: {who}{exc}", file=sys.stderr, flush=True)
        return 2
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is the trace's write error
        message = _trace_write_failure(exc)
        if message is None:
            raise
        print(f"train.py: error: {who}{' '.join(message.split())} Rerun with --on-trace-error continue to train "
              f"on without a trace.", file=sys.stderr, flush=True)
        return 1


def _trace_write_failure(exc: BaseException) -> Optional[str]:
    """The message of the trace write error behind ``exc``, or None.

    It arrives either as itself (raised by ``strategy.close()``) or inside the
    TensorFlow error of the step whose host callback hit it.
    """
    from tracer.errors import TraceWriteError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, TraceWriteError):
            return str(exc)
        found = re.search(r"TraceWriteError: (.*?stay readable\.)", str(exc), re.S)
        if found:
            return found.group(1)
        exc = exc.__cause__ or exc.__context__
    return None


def _configure_devices(tf, args, multi_worker: bool, local_rank: int) -> List[str]:
    """Picks this process's devices before TensorFlow initializes its runtime.

    Returns the device names of a single-process MirroredStrategy, or ``[]``
    under MultiWorkerMirroredStrategy (which takes every visible device, so
    each worker is left with exactly one GPU: the one of its local rank).
    """
    gpus = tf.config.list_physical_devices("GPU")
    if multi_worker:
        if args.replicas not in (None, 1):
            raise UsageError(f"--replicas applies to single-process runs; a multi-worker job has one replica "
                             f"per worker (start one rank per GPU). Received: --replicas {args.replicas}")
        try:
            index = tf_config.choose_gpu(local_rank, len(gpus))
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        if index is not None:
            tf.config.set_visible_devices([gpus[index]], "GPU")
            tf.config.experimental.set_memory_growth(gpus[index], True)
        return []
    if gpus:
        n = args.replicas or len(gpus)
        if n > len(gpus):
            raise UsageError(f"--replicas {n} needs {n} GPUs but {len(gpus)} are visible. "
                             f"Use --replicas {len(gpus)} or fewer.")
        for gpu in gpus[:n]:
            tf.config.experimental.set_memory_growth(gpu, True)
        return [f"/gpu:{i}" for i in range(n)]
    n = args.replicas or 1
    if n > 1:
        # N logical devices on the one physical CPU: the way to run a real
        # MirroredStrategy with N replicas on a machine without GPUs.
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
        except RuntimeError:
            # The runtime is already up (main() called twice in one process,
            # e.g. by tests); its devices are fixed, so use them if enough.
            have = len(tf.config.list_logical_devices("CPU"))
            if have < n:
                raise UsageError(f"--replicas {n} needs {n} logical CPUs, but TensorFlow was already "
                                 f"initialized in this process with {have}. Run the job in a fresh "
                                 "process.") from None
    return [f"/cpu:{i}" for i in range(n)]


def _setup_multi_worker(args, launcher, world) -> None:
    """Sets ``TF_CONFIG`` from the launcher; must run before the strategy is created."""
    if world is not None:
        # Hold the port until every rank has published its own, so two ranks
        # on one host cannot be handed the same one.
        sock = tf_config.reserve_port()
        try:
            endpoints = world.allgather((world.hostname, sock.getsockname()[1]))
        finally:
            sock.close()
        addresses = tf_config.worker_addresses(endpoints)
        rank = world.rank
    elif launcher.kind == "slurm":
        try:
            addresses = tf_config.slurm_worker_addresses(launcher, args.port_base)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        rank = launcher.rank
    else:
        return  # --multi-worker in a plain process: the user's TF_CONFIG, or a one-worker job
    os.environ["TF_CONFIG"] = tf_config.tf_config_json(rank, addresses)


def _shared_choices(args, launcher, world):
    """The trace directory and shuffle seed, identical on every worker.

    An unseeded shuffle still needs one order for all workers, or the data
    shards would overlap; so 'none' means a fresh seed per run, drawn by rank 0.
    """
    job = launcher.job_id
    trace_dir = args.trace_dir
    slurm_only = launcher.kind == "slurm" and world is None
    step_id = os.environ.get("SLURM_STEP_ID", "0")
    if trace_dir is None:
        if args.checkpoint_dir is not None:
            # A resumed job must find its trace again: tie it to the checkpoints.
            trace_dir = os.path.join(args.checkpoint_dir, "trace")
        elif slurm_only:
            trace_dir = os.path.join("traces", f"slurm-{job}.{step_id}")
        else:
            trace_dir = os.path.join("traces", f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    shuffle_seed = args.shuffle_seed
    if shuffle_seed is None:
        if slurm_only:
            shuffle_seed = int.from_bytes(f"{job}.{step_id}".encode(), "little") % (2 ** 31)
        else:
            shuffle_seed = secrets.randbits(31)
    choices = (os.path.abspath(trace_dir), shuffle_seed)
    # Under MPI rank 0's choices win (a collective: every rank gets here).
    # SLURM tasks without MPI cannot talk before TensorFlow starts, so they
    # derive both from the job and step ids instead.
    return world.bcast(choices) if world is not None else choices


def _check_batch(batch_size: int, num_replicas: int) -> None:
    if batch_size % num_replicas:
        raise UsageError(f"--batch-size must be divisible by the {num_replicas} replicas, so that each replica "
                         f"gets an equal slice. Received: --batch-size {batch_size}")


def _load_data(path: Optional[str]):
    try:
        return data_lib.load(path)
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from exc


def _make_dataset(tf, dataset, global_batch: int, shuffle_seed: int, partial: bool = False):
    """The global-batch input pipeline, sharded per replica by DATA.

    Every worker builds the same pipeline (same seed, same order);
    ``experimental_distribute_dataset`` splits each global batch so that each
    replica consumes a different slice of it. With ``partial``, each epoch is
    batched on its own without ``drop_remainder``: its last batch may be
    smaller, and no batch has a static size.
    """
    ds = tf.data.Dataset.from_tensor_slices((dataset.x, dataset.y))
    # tf.data combines the op seed with TensorFlow's global seed: clear it, so the
    # order depends on --shuffle-seed alone, also when main() runs in a process
    # that seeded TensorFlow before (tests, notebooks).
    tf.random.set_seed(None)
    ds = ds.shuffle(dataset.num_examples, seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(global_batch).repeat() if partial else ds.repeat().batch(global_batch, drop_remainder=True)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    options.deterministic = True
    return ds.with_options(options)


def _fail_hook(rank: int):
    """The step at which this rank must fail (test hook), or ``None``."""
    if os.environ.get(FAIL_RANK_ENV, "") != str(rank):
        return None
    return int(os.environ.get(FAIL_STEP_ENV, "1"))


def _program() -> str:
    """How this job was started, for the command lines printed at the end."""
    if os.path.basename(sys.argv[0]) == "train.py":
        path = os.path.abspath(sys.argv[0])
        rel = os.path.relpath(path)
        return "python " + shlex.quote(path if rel.startswith("..") else rel)
    return "python -m launch.train"


def _rerun_command(argv: List[str], launcher, world, other_dir: str) -> str:
    """The command line of a second run into ``other_dir``, same flags otherwise."""
    # The second run gets its own trace and no checkpoints: with the same
    # --checkpoint-dir it would resume this run instead of repeating it.
    dropped = ("--trace-dir", "--checkpoint-dir", "--checkpoint-every")
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in dropped:
            skip = True
        elif not a.startswith(tuple(d + "=" for d in dropped)):
            rest.append(a)
    prefix = ""
    if world is not None and world.size > 1:
        prefix = f"mpirun -n {world.size} "
    elif launcher.kind == "slurm":
        prefix = "srun "
    return prefix + _program() + " " + shlex.join(rest + ["--trace-dir", other_dir])


def run(args, argv: List[str], launcher, world) -> int:
    """The job proper, on every worker. See the module docstring."""
    rank = world.rank if world is not None else launcher.rank
    num_workers = world.size if world is not None else launcher.size
    local_rank = world.local_rank if world is not None else launcher.local_rank
    multi_worker = num_workers > 1 or args.multi_worker
    is_chief = rank == 0

    try:
        optim.check_optimizer_flags(args.optimizer, lr=args.lr, schedule=args.lr_schedule,
                                    epsilon=args.adam_epsilon)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if args.loss_scale is not None and not args.mixed_precision:
        raise UsageError(f"--loss-scale applies to --mixed-precision runs; add --mixed-precision or drop "
                         f"--loss-scale. Received: --loss-scale {args.loss_scale:g}")
    dataset = _load_data(args.data)
    trace_dir, shuffle_seed = _shared_choices(args, launcher, world)

    # TensorFlow's INFO lines would bury the progress bar and the verdict hint;
    # warnings and errors still show. An explicit setting wins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    import tensorflow as tf  # deferred: parsing flags and usage errors stay fast
    import keras

    from launch.model import build_model

    devices = _configure_devices(tf, args, multi_worker, local_rank)
    # Checked before the strategy exists, so that a bad flag leaves no trace
    # files behind; a multi-worker job has one replica per worker.
    _check_batch(args.batch_size, len(devices) if not multi_worker else num_workers)
    if args.deterministic:
        tf.config.experimental.enable_op_determinism()
    if multi_worker:
        _setup_multi_worker(args, launcher, world)

    seeds = {"weights": args.seed, "shuffle": shuffle_seed}
    run_info = {
        "command_line": [sys.executable] + sys.argv[:1] + argv,
        "launcher": launcher.kind,
        "data": dataset.source,
        "data_sha256": dataset.sha256,
        "batch_size": args.batch_size,
        "accumulate": args.accumulate,
        "partial_batches": bool(args.partial_batches),
        "mixed_precision": bool(args.mixed_precision),
        "loss_scale": "none" if not args.mixed_precision else args.loss_scale or "default",
        "steps": args.steps,
        "xla": bool(args.xla),
        "deterministic": bool(args.deterministic),
        "optimizer": args.optimizer,
        "lr_schedule": args.lr_schedule,
        "shuffle_seed_requested": "none" if args.shuffle_seed is None else args.shuffle_seed,
        "seed_requested": "none" if args.seed is None else args.seed,
    }
    strategy = _make_strategy(tf, args, multi_worker, devices, trace_dir, seeds, run_info)
    try:
        num_replicas = strategy.num_replicas_in_sync
        _check_batch(args.batch_size, num_replicas)
        with strategy.scope():
            model = build_model(dataset.num_features, dataset.num_classes, seed=args.seed,
                                mixed_precision=args.mixed_precision)
            optimizer = optim.build_optimizer(args.optimizer, lr=args.lr, schedule=args.lr_schedule,
                                              epsilon=args.adam_epsilon)
            if args.mixed_precision:
                scale = {} if args.loss_scale is None else {"initial_scale": args.loss_scale}
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer, name="loss_scale", **scale)
            optimizer.build(model.trainable_variables)
        traced = not args.no_trace
        if traced:
            strategy.watch(model, optimizer)

        train_step = _make_train_step(tf, keras, strategy, model, optimizer, args, traced)
        checkpoints = _Checkpoints(tf, args, model, optimizer, strategy if traced else None, rank)
        start = checkpoints.restore()
        # Batches are a pure function of the shuffle seed and their index, so a
        # resumed job skips the ones the steps before `start` consumed.
        iterator = iter(strategy.experimental_distribute_dataset(
            _make_dataset(tf, dataset, args.batch_size, shuffle_seed, args.partial_batches)
            .skip(start * args.accumulate)))
        fail_at = _fail_hook(rank)
        if is_chief:
            kind = "MultiWorkerMirroredStrategy" if multi_worker else "MirroredStrategy"
            print(f"train.py: {kind}, {num_workers} worker(s), {num_replicas} replica(s), "
                  f"{dataset!r}, global batch {args.batch_size} x {args.accumulate} micro-step(s), "
                  f"{args.optimizer} lr={args.lr}, xla={'on' if args.xla else 'off'}, "
                  f"trace: {'off' if not traced else args.capture}", flush=True)

        from tqdm import tqdm

        bar = tqdm(total=args.steps, initial=min(start, args.steps), unit="step", desc="train",
                   disable=not is_chief or args.no_progress, file=sys.stderr)
        loss = float("nan")
        with bar:
            # `step` is the optimizer's iteration counter, restored with the checkpoint.
            for step in range(start, args.steps):
                if fail_at == step:
                    raise RuntimeError(f"{FAIL_RANK_ENV}={rank}: deliberate failure on rank {rank} "
                                       f"at step {step} (test hook)")
                loss = float(train_step(iterator))
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
                    checkpoints.save(step + 1)
            checkpoints.save(max(start, args.steps))
        # A LossScaleOptimizer skips the updates whose gradients overflow: the step ran, the optimizer did not.
        skipped = max(0, args.steps - int(optimizer.iterations.numpy()))
        if args.save_weights and is_chief:
            import numpy as np

            np.savez(args.save_weights, **{v.path: v.numpy() for v in model.weights})
    finally:
        if not args.no_trace:
            strategy.close()
    if world is not None:
        world.barrier()  # every rank has closed its file before rank 0 reports
    if is_chief:
        _report(args, argv, launcher, world, trace_dir, loss, skipped)
    return 0


class _Checkpoints:
    """``--checkpoint-dir``: model and optimizer in a tf.train.Checkpoint, restored on start."""

    def __init__(self, tf, args, model, optimizer, traced_strategy, rank: int):
        self._optimizer = optimizer
        self._strategy = traced_strategy
        self._saved = None
        self._manager = None
        if args.checkpoint_dir is not None:
            ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer)
            # Under MultiWorkerMirroredStrategy every worker saves (the save is a
            # collective); only the chief's copy is the checkpoint, the others write beside it.
            directory = args.checkpoint_dir if rank == 0 else os.path.join(args.checkpoint_dir, "workers", str(rank))
            self._manager = tf.train.CheckpointManager(ckpt, directory, max_to_keep=2)
            self._restore_path = tf.train.latest_checkpoint(args.checkpoint_dir)
            self._ckpt = ckpt
        self._is_chief = rank == 0

    def restore(self) -> int:
        """Restores the latest checkpoint, if any; returns the optimizer step to start from."""
        if self._manager is None or self._restore_path is None:
            return 0
        self._ckpt.restore(self._restore_path).assert_existing_objects_matched()
        start = int(self._optimizer.iterations.numpy())
        self._saved = start
        if self._is_chief:
            print(f"train.py: restored {self._restore_path} at optimizer step {start}", flush=True)
        return start

    def save(self, step: int) -> None:
        """Saves at optimizer step ``step`` (once per step).

        The trace is flushed first: every traced step before the checkpoint is
        on disk before the checkpoint exists, so a job killed later and resumed
        from it loses no traced step (at worst it redoes some, which the
        resumed trace segment replaces).
        """
        if self._manager is None or self._saved == step:
            return
        if self._strategy is not None:
            self._strategy.flush()
        self._manager.save(checkpoint_number=step)
        self._saved = step


def _make_strategy(tf, args, multi_worker: bool, devices, trace_dir, seeds, run_info):
    """The plain tf.distribute strategy with --no-trace, else its traced counterpart."""
    if args.no_trace:
        if multi_worker:
            return tf.distribute.MultiWorkerMirroredStrategy()
        return tf.distribute.MirroredStrategy(devices)
    from strategies import TracedMirroredStrategy, TracedMultiWorkerMirroredStrategy
    from tracer import CaptureConfig

    capture = CaptureConfig(mode=args.capture, full_every=args.full_every,
                            on_write_error="raise" if args.on_trace_error == "stop" else "disable")
    if multi_worker:
        return TracedMultiWorkerMirroredStrategy(trace_dir=trace_dir, capture=capture, seeds=seeds,
                                                 run_info=run_info)
    return TracedMirroredStrategy(devices, trace_dir=trace_dir, capture=capture, seeds=seeds,
                                  run_info=run_info)


def _make_train_step(tf, keras, strategy, model, optimizer, args, traced: bool):
    """The distributed training step of TF's custom-training tutorial, with accumulation."""
    loss_object = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    # The loss of one micro-batch is averaged over every example of the
    # optimizer step (all replicas, all micro-batches), so that summing the
    # K micro-batch gradients gives the gradient of the mean loss.
    examples_per_step = args.batch_size * args.accumulate

    def forward_backward(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            per_example_loss = loss_object(y, logits)
            loss = tf.nn.compute_average_loss(per_example_loss, global_batch_size=examples_per_step)
            # Under --mixed-precision the gradients are of the scaled loss; the LossScaleOptimizer
            # unscales them, and skips the update if any overflowed.
            scaled = optimizer.scale_loss(loss) if args.mixed_precision else loss
        return loss, tape.gradient(scaled, model.trainable_variables)

    if args.xla:
        # Only the replica's own computation is compiled: apply_gradients
        # all-reduces across replicas, which MirroredStrategy on CPU cannot
        # jit-compile.
        forward_backward = tf.function(forward_backward, jit_compile=True)

    def replica_step(micro_batches):
        total_loss, summed = 0.0, None
        for x, y in micro_batches:
            loss, grads = forward_backward(x, y)
            if traced and args.accumulate > 1:
                strategy.record_micro_step(grads)
            summed = grads if summed is None else [s + g for s, g in zip(summed, grads)]
            total_loss += loss
        optimizer.apply_gradients(zip(summed, model.trainable_variables))
        return total_loss

    @tf.function
    def train_step(iterator):
        micro_batches = tuple(next(iterator) for _ in range(args.accumulate))
        per_replica_losses = strategy.run(replica_step, args=(micro_batches,))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica_losses, axis=None)

    return train_step


def _report(args, argv: List[str], launcher, world, trace_dir: str, loss: float, skipped: int = 0) -> None:
    """Rank 0's closing lines: where the trace is and what to run next."""
    print(f"train.py: done, {args.steps} steps, final loss {loss:.6f}")
    if skipped:
        print(f"loss scale: {skipped} of {args.steps} updates skipped (gradients not finite); the optimizer "
              f"is at step {args.steps - skipped}")
    if args.save_weights:
        print(f"final weights: {os.path.abspath(args.save_weights)}")
    if args.no_trace or args.capture == "off":
        why = "--no-trace" if args.no_trace else "--capture off"
        print(f"untraced run ({why}): no trace written")
        return
    from tracer import schema

    found = [(m, p) for p in glob.glob(os.path.join(trace_dir, "replica-*.h5"))
             for m in [schema.TRACE_FILE_REGEX.match(os.path.basename(p))] if m]
    files = [p for _, p in sorted(found, key=lambda mp: (int(mp[0].group(1)), int(mp[0].group(2) or 0)))]
    names = ", ".join(os.path.basename(p) for p in files) or "no replica files found"
    print(f"trace: {trace_dir} ({len(files)} file{'' if len(files) == 1 else 's'}: {names})")
    other = trace_dir.rstrip(os.sep) + "-b"
    print("next: run again into a second directory, changing what you suspect (e.g. --shuffle-seed none), "
          "then bisect the two traces:")
    print(f"  {_rerun_command(argv, launcher, world, other)}")
    print(f"  python -m tracer.bisect {shlex.quote(trace_dir)} {shlex.quote(other)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
