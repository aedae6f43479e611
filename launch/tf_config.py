"""Launcher detection and ``TF_CONFIG`` construction, as pure functions.

This module imports neither TensorFlow nor mpi4py, so it is cheap to test with
simulated environments. :mod:`launch.train` combines it with :mod:`launch.mpi`
(which does the host:port exchange under MPI) and then sets ``TF_CONFIG``
before it creates ``MultiWorkerMirroredStrategy``.

Vocabulary: a *worker* is one process (an MPI rank or a SLURM task); its
*local rank* is its index among the workers on the same host, which picks the
GPU it uses.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

LAUNCHERS = ("openmpi", "mpich", "slurm", "none")

# Environment variables each launcher sets in every process it starts.
_OMPI = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
         "OMPI_COMM_WORLD_LOCAL_SIZE")
_PMI = ("PMI_RANK", "PMI_SIZE")


@dataclasses.dataclass(frozen=True)
class Launcher:
    """How this process was started.

    Attributes:
        kind: One of ``LAUNCHERS``. ``"none"`` is a plain ``python`` run.
        rank: This worker's index in the job.
        size: Number of workers in the job.
        local_rank: Index of this worker among the workers on its host.
        local_size: Number of workers on this host (``None`` when unknown).
        job_id: The scheduler's job id, when there is one (SLURM).
        nodes: SLURM only: the step's hosts, in node order.
        tasks_per_node: SLURM only: number of tasks on each of ``nodes``.
        node_name: SLURM only: the host this task runs on.
    """

    kind: str = "none"
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: Optional[int] = 1
    job_id: Optional[str] = None
    nodes: Tuple[str, ...] = ()
    tasks_per_node: Tuple[int, ...] = ()
    node_name: Optional[str] = None

    def __post_init__(self):
        if self.kind not in LAUNCHERS:
            raise ValueError(f"`kind` must be one of {LAUNCHERS}. Received: kind={self.kind!r}")
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(
                f"`rank` must be in [0, size) and `size` >= 1. Received: rank={self.rank}, size={self.size}")
        if self.local_rank < 0:
            raise ValueError(f"`local_rank` must be >= 0. Received: local_rank={self.local_rank}")

    @property
    def is_mpi(self) -> bool:
        """Whether the process was started by an MPI launcher (mpirun/mpiexec)."""
        return self.kind in ("openmpi", "mpich")

    @property
    def multi_worker(self) -> bool:
        """Whether the job has more than one worker."""
        return self.size > 1


def _int_env(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"Environment variable {name} must be an integer. Received: {name}={value!r}") from None


def detect_launcher(environ: Optional[Mapping[str, str]] = None) -> Launcher:
    """Tells which launcher started this process, from its environment.

    Open MPI is checked first because ``mpirun`` inside a SLURM allocation
    inherits the batch step's ``SLURM_*`` variables (with ``SLURM_PROCID=0`` in
    every rank), which would otherwise be mistaken for an ``srun`` step.
    SLURM is only recognized inside an ``srun`` step (``SLURM_STEP_ID`` set):
    the batch script itself also has ``SLURM_PROCID`` but is a single process.

    Args:
        environ: The environment to inspect (default: ``os.environ``).

    Returns:
        A :class:`Launcher`.

    Raises:
        ValueError: If a launcher's variables are present but malformed.
    """
    env = os.environ if environ is None else environ
    if "OMPI_COMM_WORLD_RANK" in env:
        missing = [k for k in _OMPI[:2] if k not in env]
        if missing:
            raise ValueError(f"Open MPI environment is incomplete: {missing} missing while "
                             f"OMPI_COMM_WORLD_RANK={env['OMPI_COMM_WORLD_RANK']!r} is set.")
        return Launcher(
            kind="openmpi",
            rank=_int_env(env, "OMPI_COMM_WORLD_RANK"),
            size=_int_env(env, "OMPI_COMM_WORLD_SIZE"),
            local_rank=_int_env(env, "OMPI_COMM_WORLD_LOCAL_RANK") if "OMPI_COMM_WORLD_LOCAL_RANK" in env else 0,
            local_size=(_int_env(env, "OMPI_COMM_WORLD_LOCAL_SIZE")
                        if "OMPI_COMM_WORLD_LOCAL_SIZE" in env else None),
            job_id=env.get("SLURM_JOB_ID"),
        )
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        return Launcher(
            kind="mpich",
            rank=_int_env(env, "PMI_RANK"),
            size=_int_env(env, "PMI_SIZE"),
            local_rank=_int_env(env, "MPI_LOCALRANKID") if "MPI_LOCALRANKID" in env else 0,
            local_size=_int_env(env, "MPI_LOCALNRANKS") if "MPI_LOCALNRANKS" in env else None,
            job_id=env.get("SLURM_JOB_ID"),
        )
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        return _slurm_launcher(env)
    return Launcher(kind="none")


def _slurm_launcher(env: Mapping[str, str]) -> Launcher:
    """Reads an ``srun`` step's environment; the ``SLURM_STEP_*`` variables win over the job's."""
    size_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    nodelist_var = "SLURM_STEP_NODELIST" if "SLURM_STEP_NODELIST" in env else "SLURM_JOB_NODELIST"
    tpn_var = "SLURM_STEP_TASKS_PER_NODE" if "SLURM_STEP_TASKS_PER_NODE" in env else "SLURM_TASKS_PER_NODE"
    missing = [k for k in (size_var, "SLURM_LOCALID", nodelist_var, tpn_var) if k not in env]
    if missing:
        raise ValueError(f"SLURM step environment is incomplete: {missing} missing "
                         f"(SLURM_PROCID={env['SLURM_PROCID']!r}). Launch the job with srun.")
    nodes = tuple(expand_nodelist(env[nodelist_var]))
    tasks = tuple(expand_tasks_per_node(env[tpn_var]))
    if len(tasks) != len(nodes):
        raise ValueError(f"{tpn_var}={env[tpn_var]!r} describes {len(tasks)} nodes but "
                         f"{nodelist_var}={env[nodelist_var]!r} lists {len(nodes)}.")
    size = _int_env(env, size_var)
    if sum(tasks) != size:
        raise ValueError(f"{tpn_var}={env[tpn_var]!r} adds up to {sum(tasks)} tasks but "
                         f"{size_var}={size}.")
    node_name = env.get("SLURMD_NODENAME")
    local_size = tasks[nodes.index(node_name)] if node_name in nodes else None
    return Launcher(
        kind="slurm",
        rank=_int_env(env, "SLURM_PROCID"),
        size=size,
        local_rank=_int_env(env, "SLURM_LOCALID"),
        local_size=local_size,
        job_id=env.get("SLURM_JOB_ID"),
        nodes=nodes,
        tasks_per_node=tasks,
        node_name=node_name,
    )


def _split_top_level(text: str) -> List[str]:
    """Splits on commas that are not inside brackets."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"Unbalanced ']' in SLURM node list. Received: {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise ValueError(f"Unbalanced '[' in SLURM node list. Received: {text!r}")
    parts.append("".join(current))
    return [p for p in parts if p]


def _expand_range_set(body: str, whole: str) -> List[str]:
    """Expands ``01-03,07`` into ``["01", "02", "03", "07"]``, keeping zero padding."""
    out = []
    for item in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise ValueError(f"Bad range {item!r} in SLURM node list. Received: {whole!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"Descending range {item!r} in SLURM node list. Received: {whole!r}")
        width = len(lo)
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def expand_nodelist(nodelist: str) -> List[str]:
    """Expands a SLURM host list such as ``gpu[01-03,07],login1``.

    Several bracket groups in one name (``r[1-2]n[1-2]``) expand to their
    product, in the order SLURM lists them.

    Args:
        nodelist: A compressed SLURM host list (``SLURM_JOB_NODELIST``).

    Returns:
        The host names, in order.

    Raises:
        ValueError: If the list is empty or malformed.
    """
    names: List[str] = []
    for part in _split_top_level(nodelist.strip()):
        expanded = [""]
        for m in re.finditer(r"([^\[]+)|\[([^\]]*)\]", part):
            if m.group(1) is not None:
                choices = [m.group(1)]
            else:
                choices = _expand_range_set(m.group(2), nodelist)
            expanded = [prefix + c for prefix in expanded for c in choices]
        names.extend(expanded)
    if not names:
        raise ValueError(f"SLURM node list is empty. Received: {nodelist!r}")
    return names


def expand_tasks_per_node(spec: str) -> List[int]:
    """Expands ``SLURM_TASKS_PER_NODE`` such as ``2(x3),1`` into ``[2, 2, 2, 1]``."""
    out: List[int] = []
    for item in spec.strip().split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not m:
            raise ValueError(
                f"Bad item {item!r} in SLURM tasks-per-node. Expected e.g. '2(x3),1'. Received: {spec!r}")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def slurm_worker_addresses(launcher: Launcher, port_base: int) -> List[str]:
    """The ``host:port`` of every task of an ``srun`` step, in rank order.

    Without MPI there is no way to exchange ports, so each task listens on
    ``port_base + local_rank`` on its node. This assumes SLURM's default block
    distribution (consecutive ranks fill a node before the next one), and checks
    that this task's own node agrees.

    Args:
        launcher: A ``kind == "slurm"`` launcher.
        port_base: Port of local rank 0 on every node.

    Returns:
        ``launcher.size`` addresses.

    Raises:
        ValueError: If the launcher is not SLURM, the port range is invalid, or
            the task layout is not block-distributed.
    """
    if launcher.kind != "slurm":
        raise ValueError(f"slurm_worker_addresses needs a SLURM launcher. Received: kind={launcher.kind!r}")
    most = max(launcher.tasks_per_node)
    if not (1024 <= port_base and port_base + most - 1 <= 65535):
        raise ValueError(f"`port_base` must be in [1024, {65536 - most}] for {most} tasks per node. "
                         f"Received: port_base={port_base}")
    addresses = [f"{node}:{port_base + local}"
                 for node, count in zip(launcher.nodes, launcher.tasks_per_node)
                 for local in range(count)]
    mine = addresses[launcher.rank]
    if launcher.node_name is not None and mine != f"{launcher.node_name}:{port_base + launcher.local_rank}":
        raise ValueError(
            f"SLURM task {launcher.rank} runs on {launcher.node_name} with local id {launcher.local_rank}, "
            f"but block distribution over {list(launcher.nodes)} puts it at {mine}. "
            "Launch with `srun --distribution=block` or use mpirun.")
    return addresses


def worker_addresses(endpoints: Sequence[Tuple[str, int]]) -> List[str]:
    """Turns every worker's ``(hostname, port)`` into ``host:port`` strings.

    When all workers run on one host, ``localhost`` is used: the host name of a
    laptop or container does not always resolve, the loopback always does.

    Raises:
        ValueError: If the list is empty or two workers claim the same address.
    """
    if not endpoints:
        raise ValueError("`endpoints` must list at least one (host, port). Received: []")
    hosts = {host for host, _ in endpoints}
    single_host = len(hosts) == 1
    addresses = [f"{'localhost' if single_host else host}:{int(port)}" for host, port in endpoints]
    dupes = sorted({a for a in addresses if addresses.count(a) > 1})
    if dupes:
        raise ValueError(f"Two workers would listen on the same address: {dupes}. Received: {list(endpoints)}")
    return addresses


_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")


def build_tf_config(rank: int, addresses: Sequence[str], *, task_type: str = "worker") -> Dict:
    """Builds the ``TF_CONFIG`` of one worker of a MultiWorkerMirroredStrategy job.

    Every worker must receive the same ``addresses`` in the same order; worker
    0 is the chief (it is the one TensorFlow calls ``worker`` index 0).

    Args:
        rank: This worker's index in ``addresses``.
        addresses: ``host:port`` of every worker, in rank order.
        task_type: The cluster job name (``"worker"`` for MWMS).

    Returns:
        A dict; ``json.dumps`` it into ``os.environ["TF_CONFIG"]``.

    Raises:
        ValueError: If an address is malformed or duplicated, or ``rank`` is
            out of range.
    """
    addresses = list(addresses)
    if not addresses:
        raise ValueError("`addresses` must list at least one host:port. Received: []")
    for a in addresses:
        m = _ADDRESS.match(a) if isinstance(a, str) else None
        if not m or not 1 <= int(m.group(2)) <= 65535:
            raise ValueError(f"Each address must be 'host:port' with port in [1, 65535]. Received: {a!r}")
    if len(set(addresses)) != len(addresses):
        raise ValueError(f"Addresses must be unique. Received: {addresses}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < len(addresses):
        raise ValueError(f"`rank` must be an int in [0, {len(addresses)}). Received: rank={rank!r}")
    return {"cluster": {task_type: addresses}, "task": {"type": task_type, "index": rank}}


def tf_config_json(rank: int, addresses: Sequence[str]) -> str:
    """``build_tf_config`` serialized the way TensorFlow reads it from the environment."""
    return json.dumps(build_tf_config(rank, addresses), sort_keys=True)


def reserve_port(host: str = "") -> socket.socket:
    """Binds a TCP socket to a free port chosen by the kernel.

    Keep the socket open until every worker has published its port, so that two
    workers on one host cannot be handed the same port, then close it right
    before TensorFlow binds. The socket never listens or connects, so closing
    it frees the port at once (no TIME_WAIT).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    return sock


def pick_free_port(host: str = "") -> int:
    """A TCP port that was free on this host a moment ago."""
    with reserve_port(host) as sock:
        return sock.getsockname()[1]


def choose_gpu(local_rank: int, num_gpus: int) -> Optional[int]:
    """Index of the visible GPU this worker should use: one GPU per local rank.

    Args:
        local_rank: This worker's index among the workers on its host.
        num_gpus: GPUs visible to this process.

    Returns:
        ``None`` without GPUs (run on CPU); ``0`` when exactly one GPU is
        visible (the scheduler already isolated one GPU per task, e.g.
        ``srun --gpus-per-task=1``); else ``local_rank``.

    Raises:
        ValueError: If more workers run on the host than there are GPUs.
    """
    if num_gpus < 0 or local_rank < 0:
        raise ValueError(f"`num_gpus` and `local_rank` must be >= 0. Received: num_gpus={num_gpus}, "
                         f"local_rank={local_rank}")
    if num_gpus == 0:
        return None
    if num_gpus == 1:
        return 0
    if local_rank >= num_gpus:
        raise ValueError(
            f"Local rank {local_rank} has no GPU of its own: only {num_gpus} GPUs are visible on this host. "
            f"Start at most {num_gpus} workers per host (e.g. `mpirun --map-by ppr:{num_gpus}:node`).")
    return local_rank
