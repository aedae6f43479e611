"""The reference job's default model: a small Keras 3 MLP with seeded initializers.

Only :mod:`launch.train` imports this module, after it has configured the
devices, because importing Keras initializes TensorFlow.
"""

from __future__ import annotations

from typing import Optional, Sequence

import keras

DEFAULT_HIDDEN = (128, 128)


def build_model(num_features: int, num_classes: int, *, seed: Optional[int],
                hidden: Sequence[int] = DEFAULT_HIDDEN, mixed_precision: bool = False) -> keras.Model:
    """An MLP ``num_features -> hidden... -> num_classes`` returning logits.

    Every initializer gets its own integer seed derived from ``seed``, so the
    initial weights depend on ``seed`` alone: not on the global random state,
    on how many models were built before, or on the strategy. With
    ``seed=None`` the initializers are unseeded and every model starts from
    fresh random weights, like a script that never seeds. Build it inside
    ``strategy.scope()`` (which gives every replica the same initial value).

    Args:
        num_features: Input width.
        num_classes: Number of output logits.
        seed: Weight-initialization seed, or ``None`` for unseeded.
        hidden: Widths of the hidden ReLU layers.
        mixed_precision: Compute the hidden layers in float16 (Keras'
            ``mixed_float16`` policy: float32 variables, float16 math); the
            logits stay float32, as Keras' mixed-precision guide advises.

    Returns:
        A built ``keras.Sequential`` named ``"mlp"``.
    """
    if num_features < 1 or num_classes < 2:
        raise ValueError(f"`num_features` must be >= 1 and `num_classes` >= 2. "
                         f"Received: num_features={num_features}, num_classes={num_classes}")

    def init_seed(i: int) -> Optional[int]:
        return None if seed is None else seed * 1000 + 2 * i

    policy = "mixed_float16" if mixed_precision else None  # None: the global policy (float32 by default)
    layers = [keras.Input(shape=(num_features,), name="features")]
    for i, width in enumerate(hidden):
        layers.append(keras.layers.Dense(
            width, activation="relu", name=f"dense_{i}", dtype=policy,
            kernel_initializer=keras.initializers.GlorotUniform(seed=init_seed(i)),
            bias_initializer="zeros"))
    layers.append(keras.layers.Dense(
        num_classes, name="logits", dtype="float32" if mixed_precision else None,
        kernel_initializer=keras.initializers.GlorotUniform(seed=init_seed(len(hidden)))))
    return keras.Sequential(layers, name="mlp")
