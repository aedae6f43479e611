"""The cause vocabulary: from where a divergence starts to why, and what to try next.

The rules follow the dataflow of one step. Everything before the first
divergent tensor is bitwise equal (or within tolerance) in both runs, so the
kind of the first divergent tensor says which stage of the step introduced it.
Documented in ``docs/analyzer.md``.
"""

from __future__ import annotations

import dataclasses
from typing import Dict


@dataclasses.dataclass(frozen=True)
class Cause:
    name: str
    explanation: str
    next_step: str


CAUSES: Dict[str, Cause] = {c.name: c for c in (
    Cause("init",
          "The weights or optimizer slots differ before the first update, so the runs started from different states.",
          "Seed weight initialization identically (the model's seed / tf.keras.utils.set_random_seed) and build "
          "the model the same way in both runs."),
    Cause("data",
          "The replicas consumed different input batches, so everything downstream differs too.",
          "Check the shuffle seed, dataset sharding (auto_shard_policy) and the input pipeline order; "
          "compare the batch at this step."),
    Cause("numerics",
          "Same inputs and weights went in, different values came out of the forward or backward pass.",
          "Compare kernels and flags: XLA on/off, op determinism, oneDNN (TF_ENABLE_ONEDNN_OPTS), TF/CUDA/cuDNN "
          "versions and the hardware; see the environment diff."),
    Cause("allreduce",
          "Same local gradients, different all-reduced gradients: the reduction itself differs.",
          "Check the replica count, reduction order and the collective implementation (NCCL/RING/AUTO, "
          "cross_device_ops); float sums depend on their order."),
    Cause("optimizer",
          "Same all-reduced gradients and weights, different optimizer slots or updated weights.",
          "Compare the optimizer class, its hyperparameters and learning-rate schedule (the `learning_rate` and "
          "`iteration` slots show both)."),
    Cause("replica_desync",
          "Inside one run, replicas disagree on values that every replica must hold identically.",
          "Look for per-replica randomness (unseeded dropout or RNG), variables created outside the strategy "
          "scope or a replica that skipped a step; `python -m tracer.check RUN_DIR` checks one run."),
    Cause("nonfinite",
          "A NaN or Inf appears, and the divergence starts with it.",
          "Look at the tensor named here in the run that has the NaN/Inf: lower the learning rate, check the "
          "loss for log(0) or division by zero, or enable tf.debugging.enable_check_numerics."),
)}


def cause_for_kind(kind: str, *, initial: bool = False) -> str:
    """Cause of a divergence whose first differing tensor has ``kind``.

    Replica desync and non-finite values are decided by the caller, which has
    the data to see them.
    """
    if initial:
        return "init"
    return {"input": "data", "loss": "numerics", "local_grad": "numerics", "allreduced_grad": "allreduce",
            "optimizer_slot": "optimizer", "weight": "optimizer"}[kind]
