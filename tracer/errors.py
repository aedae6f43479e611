"""Exception hierarchy shared by the capture and analysis halves.

Every class is also a built-in exception, so callers that do not know tracer can
still catch them (``except ValueError``).
"""


class TracerError(Exception):
    """Base class of every error tracer raises on purpose."""

    # TensorFlow's autograph re-raises an error from a traced function as its
    # own type only when that type's __init__ is Exception.__init__; otherwise
    # the user gets a StagingError and `except CaptureError` stops working.
    __init__ = Exception.__init__


class TraceFormatError(TracerError, ValueError):
    """A trace file is missing, unreadable, corrupt or of an unknown schema."""


class TraceMismatchError(TracerError, ValueError):
    """Two traces cannot be compared (different models, dtypes, steps...)."""


class CaptureError(TracerError, RuntimeError):
    """Capture could not record what the training step computed."""


class TraceWriteError(TracerError, OSError):
    """Writing a trace failed (disk full, permissions, closed file...)."""
