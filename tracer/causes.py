"""The cause vocabulary: from where a divergence starts to why, and what to try next.

The rules follow the dataflow of one step. Everything before the first
divergent tensor is bitwise equal (or within tolerance) in both runs, so the
kind of the first divergent tensor says which stage of the step introduced it.
Documented in ``docs/analyzer.md``.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence


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


SINGLE_FAULT_NEXT = ("Rerun with that replica on another device (or swap two replicas' devices) and see whether the "
                     "difference follows the device; check the device's memory (ECC error counters, a memory "
                     "test), and look for code that depends on the replica id or for an injected fault.")
"""What to try next when the difference is confined to one element of one replica."""

LOCAL_KINDS = ("loss", "local_grad")


def single_fault(*, kind: str, n_diff: Optional[int], size: int, replicas: Sequence[int], num_replicas: int,
                 first_index=None) -> Optional[str]:
    """The detail sentence for a difference confined to one element on one replica, else None.

    A kernel, flag or version change moves many elements, on every replica. One
    element on one replica is the signature of a fault on that replica's device
    (a flipped bit, faulty memory) or of code that treats replicas differently,
    whatever stage of the step it shows in, so the cause keeps its name and only
    the detail and the next step change.

    Args:
        kind: Kind of the origin tensor.
        n_diff: Differing elements (None when only fingerprints were compared).
        size: Elements in the tensor.
        replicas: The replicas where it differs.
        num_replicas: Replicas compared.
        first_index: Index of the differing element (full tensors).
    """
    if len(replicas) != 1:
        return None
    replica = replicas[0]
    one_of_several = num_replicas > 1
    suspect = "suspect that replica's device (bit flip, faulty memory) or code that treats replicas differently"
    if n_diff is not None:
        # A scalar differs in "one element" by construction: only on one replica of several does that say something.
        if n_diff != 1 or (size <= 1 and not one_of_several):
            return None
        at = f"index {tuple(first_index)}" if first_index else "its only element"
        if one_of_several:
            return f"one element on one replica ({at} on replica {replica} only): {suspect}"
        return (f"one element of the tensor differs ({at}): suspect the device (bit flip, faulty memory) or an "
                f"injected fault; kernel changes move many elements")
    if kind in LOCAL_KINDS and one_of_several:
        return (f"only replica {replica} of {num_replicas} differs (fingerprints; full tensors at this step would "
                f"give the element count): {suspect}")
    return None
