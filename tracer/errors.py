"""Exception hierarchy shared by the capture and analysis halves.

Every class is also a built-in exception, so callers that do not know tracer can
still catch them (``except ValueError``).
"""


class TracerError(Exception):
    """Base class of every error tracer raises on purpose."""


class TraceFormatError(TracerError, ValueError):
    """A trace file is missing, unreadable, corrupt or of an unknown schema."""


class TraceMismatchError(TracerError, ValueError):
    """Two traces cannot be compared (different models, dtypes, steps...)."""


class CaptureError(TracerError, RuntimeError):
    """Capture could not record what the training step computed."""


class TraceWriteError(TracerError, OSError):
    """Writing a trace failed (disk full, permissions, closed file...)."""
