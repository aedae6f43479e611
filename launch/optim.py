"""Optimizers and learning-rate schedules of the reference job.

Divergence scenarios often come down to one optimizer detail (epsilon, a
momentum term, a learning-rate change at step k), so each is a flag.
"""

from __future__ import annotations

import re
from typing import Optional

import keras

OPTIMIZERS = ("adam", "adamw", "sgd", "momentum", "nesterov", "rmsprop", "adagrad")


class StepChange(keras.optimizers.schedules.LearningRateSchedule):
    """``lr`` before optimizer step ``at_step``, ``new_lr`` from it on.

    Steps are the optimizer's iteration counter before the update, the
    numbering the trace uses: ``StepChange(1e-3, 10, 1e-4)`` applies 1e-4 in
    the update the trace records as step 10.
    """

    def __init__(self, lr: float, at_step: int, new_lr: float):
        self.lr = float(lr)
        self.at_step = int(at_step)
        self.new_lr = float(new_lr)

    def __call__(self, step):
        step = keras.ops.convert_to_tensor(step)
        return keras.ops.where(step >= self.at_step, self.new_lr, self.lr)

    def get_config(self):
        return {"lr": self.lr, "at_step": self.at_step, "new_lr": self.new_lr}


def parse_schedule(text: str, lr: float):
    """``"constant"`` gives ``lr``; ``"step:K:LR2"`` gives :class:`StepChange` ``(lr, K, LR2)``."""
    if text == "constant":
        return lr
    m = re.fullmatch(r"step:(\d+):([0-9.eE+-]+)", text)
    if not m:
        raise ValueError("--lr-schedule must be 'constant' or 'step:K:LR' (use learning rate LR from "
                         f"optimizer step K on, e.g. step:10:1e-4). Received: {text!r}")
    try:
        new_lr = float(m.group(2))
    except ValueError:
        raise ValueError(f"--lr-schedule: {m.group(2)!r} is not a number. Received: {text!r}") from None
    if new_lr < 0:
        raise ValueError(f"--lr-schedule: the new learning rate must be >= 0. Received: {text!r}")
    return StepChange(lr, int(m.group(1)), new_lr)


def build_optimizer(name: str, *, lr: float, schedule: str = "constant",
                    epsilon: Optional[float] = None) -> keras.optimizers.Optimizer:
    """A Keras 3 optimizer by name.

    Args:
        name: One of ``OPTIMIZERS``; ``momentum`` is SGD with momentum 0.9,
            ``nesterov`` the same with Nesterov momentum.
        lr: Learning rate (before any schedule change).
        schedule: See :func:`parse_schedule`.
        epsilon: Epsilon of adam, adamw, rmsprop and adagrad (``None`` keeps
            Keras' default).

    Raises:
        ValueError: On an unknown name, a bad schedule, or an epsilon given to
            an optimizer that has none.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {OPTIMIZERS}. Received: {name!r}")
    if not lr > 0:
        raise ValueError(f"--lr must be > 0. Received: {lr}")
    learning_rate = parse_schedule(schedule, lr)
    eps = {} if epsilon is None else {"epsilon": float(epsilon)}
    if epsilon is not None and name in ("sgd", "momentum", "nesterov"):
        raise ValueError(f"--adam-epsilon does not apply to --optimizer {name}. Received: {epsilon}")
    if name == "adam":
        return keras.optimizers.Adam(learning_rate, **eps)
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate, **eps)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate, **eps)
    if name == "adagrad":
        return keras.optimizers.Adagrad(learning_rate, **eps)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate)
    return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=(name == "nesterov"))
