"""The scenarios: one pair of runs per classic source of divergence, and the tracer command for it.

Runs are small (8 steps, global batch 32, 2 replicas unless the scenario is
about replicas) so that the whole suite fits in CI; ``--capture full`` stores
every tensor, so verdicts carry exact magnitudes and first differing indices.
Jobs with the same name are the same run and run once (the reference ``ref``
serves most scenarios).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from scenarios.jobs import INJECT, Job

STEPS = 8
LR_CHANGE_STEP = 4
FAULT_STEP = 3
FAULT_REPLICA = 1

_BASE = ("--steps", str(STEPS), "--batch-size", "32", "--capture", "full")
BASE = ("--replicas", "2") + _BASE
"""Flags of the reference run: 2 replicas, 8 steps, global batch 32, Adam 1e-3, seeds 1 and 2."""

REF = Job("ref", BASE)
ONE = Job("one-replica", ("--replicas", "1") + _BASE)
ACC4 = Job("one-replica-accumulate-4",
           ("--replicas", "1", "--steps", str(STEPS), "--batch-size", "8", "--accumulate", "4", "--capture", "full"))
FOUR = Job("four-replicas", ("--replicas", "4") + _BASE)
MPI2 = Job("mpirun-2-workers", _BASE, mpi=2)
DET_A = Job("deterministic-a", BASE + ("--deterministic",), isolated=True)
DET_B = Job("deterministic-b", BASE + ("--deterministic",), isolated=True)
DET_NO_ONEDNN = Job("deterministic-onednn-off", BASE + ("--deterministic",), env=(("TF_ENABLE_ONEDNN_OPTS", "0"),))
EPOCH_BATCH = 600
"""Global batch of scenario 2b: the embedded 4,096 examples make 6 whole batches and one of 496."""
EPOCH_END_STEP = 6
WHOLE = Job(f"batch-{EPOCH_BATCH}", ("--replicas", "2", "--steps", str(STEPS), "--batch-size", str(EPOCH_BATCH),
                                     "--capture", "full"))
MIXED = Job("mixed-precision", BASE + ("--mixed-precision",))
OVERFLOW_SCALE = "4194304"
"""Initial loss scale of scenario 3c: 2**22, large enough that the first updates overflow float16."""
INJECT_FLAGS = ("--replicas", "2", "--steps", "6")
CLEAN = Job("inject-clean", INJECT_FLAGS, script=INJECT)
FLIP = Job("inject-bitflip", INJECT_FLAGS + ("--flip-step", str(FAULT_STEP), "--flip-replica", str(FAULT_REPLICA)),
           script=INJECT)
CORRUPT = Job("inject-corrupt-weight",
              INJECT_FLAGS + ("--corrupt-step", str(FAULT_STEP), "--corrupt-replica", str(FAULT_REPLICA)),
              script=INJECT)


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One question a user asks, the two runs that reproduce it and the tracer command that answers it.

    Attributes:
        id: ``"1"``, ``"4b"``...; the number is the issue's scenario number.
        title: Short name.
        question: What the user asks, in their words.
        a: The reference run.
        b: The run compared with it; ``None`` means ``tracer.check a``.
        options: Extra options of the tracer command (``--auto``...).
        lesson: What the verdict teaches (rendered in the guide).
    """

    id: str
    title: str
    question: str
    a: Job
    b: Optional[Job]
    options: Tuple[str, ...] = ()
    lesson: str = ""

    @property
    def tool(self) -> str:
        return "bisect" if self.b is not None else "check"


SCENARIOS: Tuple[Scenario, ...] = (
    Scenario("1", "Seeded vs unseeded weight initialization",
             "I set the seed everywhere, yet two runs of my script are different from the first loss on. Why?",
             REF, Job("seed-none", BASE + ("--seed", "none"))),
    Scenario("2", "Seeded vs unseeded shuffling",
             "My weights are seeded and identical, but the runs still drift apart. What else is random?",
             REF, Job("shuffle-none", BASE + ("--shuffle-seed", "none"))),
    Scenario("2b", "Whole batches vs an epoch's last, partial batch",
             "I moved to the multi-worker tutorial's input pipeline (batch without drop_remainder, iterator read "
             "in the step). Same data, same seeds: why do the runs part a few steps in?",
             WHOLE, Job(f"batch-{EPOCH_BATCH}-partial", WHOLE.flags + ("--partial-batches",))),
    Scenario("3", "XLA on vs off",
             "Does turning on XLA (jit_compile) change my training?",
             REF, Job("xla", BASE + ("--xla",))),
    Scenario("3b", "Mixed precision on vs off",
             "Does mixed_float16 (with its LossScaleOptimizer) change my training, and where first?",
             REF, MIXED),
    Scenario("3c", "A loss scale that overflows",
             "My mixed-precision run lags behind an identical one with another initial loss scale. Is it "
             "skipping updates?",
             MIXED, Job("mixed-precision-overflow", MIXED.flags + ("--loss-scale", OVERFLOW_SCALE))),
    Scenario("4a", "Adam epsilon",
             "I only changed Adam's epsilon. Where does that show?",
             REF, Job("adam-epsilon-1e-4", BASE + ("--adam-epsilon", "1e-4"))),
    Scenario("4b", "Learning rate",
             "Same model, same data, another learning rate: what exactly differs first?",
             REF, Job("lr-2e-3", BASE + ("--lr", "2e-3"))),
    Scenario("4c", "A learning-rate schedule that changes at step k",
             f"My schedule should only kick in at step {LR_CHANGE_STEP}. Are the runs identical before that?",
             REF, Job(f"lr-step-{LR_CHANGE_STEP}", BASE + ("--lr-schedule", f"step:{LR_CHANGE_STEP}:1e-4"))),
    Scenario("5", "Gradient accumulation",
             "Accumulating 4 micro-batches of 8 is the same math as one batch of 32. Is it the same result?",
             ONE, ACC4),
    Scenario("5b", "Gradient accumulation, automatic tolerance",
             "Is the accumulation difference just round-off?",
             ONE, ACC4, options=("--auto",)),
    Scenario("6a", "1 vs 2 replicas (same global batch)",
             "My 2-GPU run does not reproduce my 1-GPU run. Is something broken?",
             ONE, REF),
    Scenario("6b", "1 vs 2 replicas, automatic tolerance",
             "Is the replica-count difference only round-off?",
             ONE, REF, options=("--auto",)),
    Scenario("6c", "1 vs 4 replicas",
             "And with 4 replicas?",
             ONE, FOUR),
    Scenario("6d", "1 replica vs 2 MPI workers (MultiWorkerMirroredStrategy under mpirun)",
             "My multi-worker job does not match my single-process reference.",
             ONE, MPI2),
    Scenario("7a", "One bit flipped in one replica's local gradient",
             f"Could a faulty device have corrupted one gradient? (A bit is flipped on replica {FAULT_REPLICA} "
             f"at step {FAULT_STEP}.)",
             CLEAN, FLIP),
    Scenario("7b", "One replica's weight corrupted",
             f"Do all replicas still hold the same model? (Replica {FAULT_REPLICA}'s copy of a weight gets a "
             f"flipped bit after step {FAULT_STEP}.)",
             CORRUPT, None),
    Scenario("8a", "Op determinism: the same run twice",
             "With enable_op_determinism, are two runs really bitwise identical?",
             DET_A, DET_B),
    Scenario("8b", "oneDNN on vs off",
             "TensorFlow says oneDNN may change results slightly. Does it, here?",
             DET_A, DET_NO_ONEDNN),
    Scenario("9a", "A learning rate of infinity at step k",
             f"My loss turned into NaN. Where did the first NaN come from? (The learning rate becomes inf at "
             f"step {LR_CHANGE_STEP}.)",
             REF, Job(f"lr-inf-at-{LR_CHANGE_STEP}", BASE + ("--lr-schedule", f"step:{LR_CHANGE_STEP}:inf"))),
    Scenario("9b", "A learning-rate spike at step k",
             f"My loss became NaN a step after a learning-rate spike (1e30 at step {LR_CHANGE_STEP}). Which "
             f"came first?",
             REF, Job(f"lr-spike-at-{LR_CHANGE_STEP}", BASE + ("--lr-schedule", f"step:{LR_CHANGE_STEP}:1e30"))),
)


def by_id(scenario_id: str) -> Scenario:
    """The scenario with ``id`` ``scenario_id``."""
    for s in SCENARIOS:
        if s.id == scenario_id:
            return s
    raise KeyError(f"no scenario {scenario_id!r}; known: {', '.join(s.id for s in SCENARIOS)}")
