"""Capture configuration: what is recorded, when, and what happens on errors."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

CAPTURE_MODES = ("off", "fingerprint", "full")
ON_WRITE_ERROR = ("raise", "disable")


@dataclasses.dataclass(frozen=True)
class CaptureConfig:
    """What the traced strategy records.

    Fingerprints of every captured tensor are written every step unless
    ``mode == "off"``. Full tensors are written at the steps the schedule
    selects: with ``mode == "full"``, every ``full_every`` steps, restricted to
    ``full_window = (first, last)`` (inclusive) when given.

    Attributes:
        mode: ``"off"``, ``"fingerprint"`` or ``"full"``.
        full_every: Period, in steps, of full-tensor snapshots.
        full_window: Optional inclusive step window for full snapshots.
        kinds: Kinds to capture (default: all).
        queue_size: Steps buffered between the training step and the writer
            thread; when full, the training step waits.
        flush_every: Fingerprints wait on the device for this many steps,
            then reach the host together, and the writer flushes the file
            every this many steps. A killed process loses the steps since the
            last flush (see docs/reliability.md); a normal exit loses none.
        on_write_error: ``"raise"`` stops training with the error;
            ``"disable"`` stops tracing, keeps what was written and lets
            training go on.
    """

    mode: str = "fingerprint"
    full_every: int = 1
    full_window: Optional[Tuple[int, int]] = None
    kinds: Tuple[str, ...] = ("input", "loss", "local_grad", "allreduced_grad", "optimizer_slot", "weight")
    queue_size: int = 8
    flush_every: int = 10
    on_write_error: str = "raise"

    def __post_init__(self):
        from tracer.schema import KINDS  # local: keeps this module dependency-free

        if self.mode not in CAPTURE_MODES:
            raise ValueError(f"`mode` must be one of {CAPTURE_MODES}. Received: mode={self.mode!r}")
        for name in ("full_every", "queue_size", "flush_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1. Received: {name}={value!r}")
        if self.full_window is not None:
            window = tuple(self.full_window)
            if (len(window) != 2 or not all(isinstance(v, int) for v in window)
                    or window[0] < 0 or window[1] < window[0]):
                raise ValueError(
                    "`full_window` must be (first, last) with 0 <= first <= last. "
                    f"Received: full_window={self.full_window!r}")
            object.__setattr__(self, "full_window", window)
        kinds = tuple(self.kinds)
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise ValueError(f"`kinds` must be a non-empty subset of {KINDS}. Received: kinds={self.kinds!r}")
        object.__setattr__(self, "kinds", kinds)
        if self.on_write_error not in ON_WRITE_ERROR:
            raise ValueError(
                f"`on_write_error` must be one of {ON_WRITE_ERROR}. Received: on_write_error={self.on_write_error!r}")

    def wants_full(self, step: int) -> bool:
        """Whether the schedule writes full tensors at ``step``."""
        if self.mode != "full":
            return False
        if self.full_window is not None:
            first, last = self.full_window
            if not first <= step <= last:
                return False
            return (step - first) % self.full_every == 0
        return step % self.full_every == 0

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["kinds"] = list(self.kinds)
        if self.full_window is not None:
            d["full_window"] = list(self.full_window)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "CaptureConfig":
        d = dict(d)
        if d.get("full_window") is not None:
            d["full_window"] = tuple(d["full_window"])
        if "kinds" in d:
            d["kinds"] = tuple(d["kinds"])
        return cls(**d)
