"""Capture half of tracer: traced tf.distribute strategies (imports TensorFlow).

Importing this package imports nothing heavy; the strategies load TensorFlow
when first accessed.
"""

__all__ = ["TracedMirroredStrategy", "TracedMultiWorkerMirroredStrategy"]


def __getattr__(name):
    if name in __all__:
        from strategies import traced  # noqa: PLC0415 - TensorFlow loads on first use only

        return getattr(traced, name)
    raise AttributeError(f"module 'strategies' has no attribute {name!r}")
