"""Optimizers and learning-rate schedules of the reference job, chosen by flag.

Divergence scenarios often come down to one optimizer detail (epsilon, a
momentum term, a learning-rate change at step k), so each is a flag. The
validation here is pure Python, so that ``train.py`` rejects a bad flag before
it starts TensorFlow; only :func:`build_optimizer` imports Keras.
"""

from __future__ import annotations

import re
from typing import Optional, Tuple

OPTIMIZERS = ("adam", "adamw", "sgd", "momentum", "nesterov", "rmsprop", "adagrad")
_NO_EPSILON = ("sgd", "momentum", "nesterov")


def parse_schedule_spec(text: str) -> Optional[Tuple[int, float]]:
    """Parses ``--lr-schedule``: ``"constant"`` gives ``None``, ``"step:K:LR"`` gives ``(K, LR)``.

    Raises:
        ValueError: If ``text`` is neither form.
    """
    if text == "constant":
        return None
    m = re.fullmatch(r"step:(\d+):(.+)", text)
    try:
        new_lr = float(m.group(2)) if m else None
    except ValueError:
        new_lr = None
    if new_lr is None or not new_lr >= 0:
        raise ValueError("--lr-schedule must be 'constant' or 'step:K:LR' (learning rate LR >= 0 from "
                         f"optimizer step K on, e.g. step:10:1e-4). Received: {text!r}")
    return int(m.group(1)), new_lr


def check_optimizer_flags(name: str, *, lr: float, schedule: str = "constant",
                          epsilon: Optional[float] = None) -> None:
    """Raises ``ValueError`` naming the flag if the combination cannot be built."""
    if name not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {OPTIMIZERS}. Received: {name!r}")
    if not lr > 0:
        raise ValueError(f"--lr must be > 0. Received: {lr}")
    parse_schedule_spec(schedule)
    if epsilon is not None and name in _NO_EPSILON:
        raise ValueError(f"--adam-epsilon does not apply to --optimizer {name}; use adam, adamw, rmsprop or "
                         f"adagrad. Received: --adam-epsilon {epsilon}")
    if epsilon is not None and not epsilon > 0:
        raise ValueError(f"--adam-epsilon must be > 0. Received: {epsilon}")


def build_optimizer(name: str, *, lr: float, schedule: str = "constant", epsilon: Optional[float] = None):
    """A Keras 3 optimizer by name; create it inside ``strategy.scope()``.

    Args:
        name: One of ``OPTIMIZERS``; ``momentum`` is SGD with momentum 0.9,
            ``nesterov`` the same with Nesterov momentum.
        lr: Learning rate (before any schedule change).
        schedule: ``"constant"`` or ``"step:K:LR"`` (see
            :class:`launch.schedules.StepChange`).
        epsilon: Epsilon of adam, adamw, rmsprop and adagrad (``None`` keeps
            Keras' default).

    Raises:
        ValueError: See :func:`check_optimizer_flags`.
    """
    check_optimizer_flags(name, lr=lr, schedule=schedule, epsilon=epsilon)
    import keras  # deferred: importing Keras starts TensorFlow

    from launch.schedules import StepChange

    spec = parse_schedule_spec(schedule)
    learning_rate = lr if spec is None else StepChange(lr, *spec)
    # An explicit name: Keras numbers unnamed optimizers per process (adam,
    # adam_1, ...), which would show up as a spurious environment difference
    # between two runs made in one process.
    kw = {"name": name} if epsilon is None else {"name": name, "epsilon": float(epsilon)}
    if name == "adam":
        return keras.optimizers.Adam(learning_rate, **kw)
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate, **kw)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate, **kw)
    if name == "adagrad":
        return keras.optimizers.Adagrad(learning_rate, **kw)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, name=name)
    return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=(name == "nesterov"), name=name)
