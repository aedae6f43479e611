"""tracer: find where two TensorFlow training runs diverge.

This package is the analysis half and the trace format; it never imports
TensorFlow. The capture half lives in :mod:`strategies`.
"""

from tracer.config import CaptureConfig
from tracer.errors import (CaptureError, TraceFormatError, TraceMismatchError, TracerError,
                           TraceWriteError)
from tracer.reader import TraceReader, find_replica_files
from tracer.schema import KINDS, SCHEMA_VERSION, TensorSpec
from tracer.writer import TraceWriter

__version__ = "0.1.0"

__all__ = [
    "CaptureConfig",
    "CaptureError",
    "KINDS",
    "SCHEMA_VERSION",
    "TensorSpec",
    "TraceFormatError",
    "TraceMismatchError",
    "TraceReader",
    "TraceWriteError",
    "TraceWriter",
    "TracerError",
    "find_replica_files",
    "__version__",
]
