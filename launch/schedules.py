"""Keras learning-rate schedules of the reference job (imports Keras)."""

from __future__ import annotations

import keras


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

    def __repr__(self) -> str:
        return f"StepChange(lr={self.lr}, at_step={self.at_step}, new_lr={self.new_lr})"
