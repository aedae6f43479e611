"""When a difference counts: the tolerance a verdict is judged against.

Modes:

- ``bitwise`` (default): any differing bit counts (the fingerprint hash decides).
- ``ulp``: ``max_ulp > N`` counts.
- ``allclose``: an element with ``|a - b| > atol + rtol * max(|a|, |b|)`` counts
  (the metric is ``max(|a - b| - rtol * max(|a|, |b|))`` against ``atol``).
- ``auto``: round-off bound ``max|a-b|/max|x| > factor * eps(dtype) * K``, with
  ``K`` the reduction length (the longest sum behind a value) and ``max|x|`` the
  tensor's largest magnitude in either run; integer tensors stay bitwise. The
  bound is scale-relative, as in the error analysis of a sum: reordering a sum
  of ``K`` terms moves it by up to about ``eps * K * sum|terms|``, whatever the
  value of the sum. An element-wise relative error would call any reordered sum
  that cancels to nearly zero (a gradient element) a divergence.
- ``noise``: ``max_rel > factor * noise`` where ``noise`` is the same tensor's
  max_rel, at the same step, between run A and a repeat of it; where the repeat
  is bitwise identical to A the threshold is bitwise.

``ulp`` and ``allclose`` stay element-wise: they are explicit user choices.
A difference in NaN/Inf counts always counts. From fingerprints alone the
metrics are lower bounds (see :mod:`tracer.metrics`), so "beyond tolerance" is
then certain and "within tolerance" means "not shown to exceed it".
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from tracer.metrics import Diff

MODES = ("bitwise", "ulp", "allclose", "auto", "noise")

EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}
"""Machine epsilon (spacing of 1.0) per dtype."""

AUTO_METRIC = "max|a-b|/max|x|"
"""The metric of mode ``auto``: ``Diff.scaled_abs``."""


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One judged difference: the metric, its value and the threshold it was held to."""

    beyond: bool
    metric: str
    value: float
    threshold: float

    def text(self) -> str:
        if isinstance(self.value, str):
            return f"{self.metric} {self.value} (threshold: {_fmt(self.threshold)})"
        op = ">" if self.beyond else "<="
        return f"{self.metric} = {_fmt(self.value)} {op} {_fmt(self.threshold)}"


def _fmt(x) -> str:
    if isinstance(x, str):
        return x
    x = float(x)
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.3g}"


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """The active tolerance.

    Attributes:
        mode: One of ``MODES``.
        ulp: ULP threshold (mode ``ulp``).
        rtol: Relative tolerance (mode ``allclose``).
        atol: Absolute tolerance (mode ``allclose``).
        factor: Multiplier of the bound (modes ``auto`` and ``noise``).
        reduction_length: ``K`` of mode ``auto``.
    """

    mode: str = "bitwise"
    ulp: int = 0
    rtol: float = 0.0
    atol: float = 0.0
    factor: float = 1.0
    reduction_length: int = 1

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}. Received: mode={self.mode!r}")
        for name in ("ulp", "rtol", "atol", "factor"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"`{name}` must be a finite number >= 0. Received: {name}={value!r}")
        if self.reduction_length < 1:
            raise ValueError(f"`reduction_length` must be >= 1. Received: reduction_length={self.reduction_length!r}")

    @property
    def bitwise(self) -> bool:
        return self.mode == "bitwise"

    def metric_name(self) -> str:
        return {"bitwise": "differing bits", "ulp": "max_ulp", "allclose": "max(|a-b| - rtol*|x|)",
                "auto": AUTO_METRIC, "noise": "max_rel"}[self.mode]

    def threshold(self, dtype: str, noise: Optional[float] = None) -> float:
        """Threshold of the metric for a tensor of ``dtype`` (``noise``: its noise max_rel, -1 if bitwise equal)."""
        if self.mode == "bitwise":
            return 0.0
        if self.mode == "ulp":
            return float(self.ulp)
        if self.mode == "allclose":
            return float(self.atol)
        if self.mode == "auto":
            return self.factor * EPS[dtype] * self.reduction_length if dtype in EPS else 0.0
        if noise is None or noise < 0:
            return 0.0
        return self.factor * noise

    def judge(self, diff: Diff, dtype: str, noise: Optional[float] = None) -> Verdict:
        """Judge one tensor's difference (``diff`` of a tensor whose bits differ)."""
        threshold = self.threshold(dtype, noise)
        if self.mode == "bitwise":
            if diff.n_diff is None:
                return Verdict(True, "fingerprint hash", "differs", "identical bits")
            return Verdict(True, "n_diff (differing elements)", diff.n_diff, 0)
        value = {"ulp": diff.max_ulp, "allclose": diff.excess, "auto": diff.scaled_abs,
                 "noise": diff.max_rel}[self.mode]
        strict_bits = self.mode == "noise" and (noise is None or noise < 0) or (
            self.mode == "auto" and dtype not in EPS)
        beyond = bool(diff.nonfinite) or value > threshold or strict_bits
        return Verdict(beyond, self.metric_name(), value, threshold)

    def beyond_matrix(self, ne, lb_abs, lb_rel, lb_ulp, scale, nonfinite, dtypes, noise=None) -> np.ndarray:
        """Vectorized :meth:`judge` over a (rows, columns) block of fingerprint lower bounds.

        ``ne``: hashes differ; ``lb_rel``: the ``max_abs`` bound over the scale
        ``max(max|a|, max|b|)`` (so also the ``scaled_abs`` bound of mode ``auto``);
        ``dtypes``: per column; ``noise``: per cell max_rel of the repeat (-1
        where bitwise equal) or None.
        """
        if self.mode == "bitwise":
            return ne
        if self.mode == "ulp":
            over = lb_ulp > self.ulp
        elif self.mode == "allclose":
            over = (lb_abs - self.rtol * scale) > self.atol
        elif self.mode == "auto":
            th = np.array([self.threshold(d) for d in dtypes])
            strict = np.array([d not in EPS for d in dtypes])
            over = (lb_rel > th[None, :]) | strict[None, :]
        else:
            over = (noise < 0) | (lb_rel > self.factor * noise)
        return ne & (over | nonfinite)

    def to_dict(self) -> dict:
        d = {"mode": self.mode, "metric": self.metric_name()}
        if self.mode == "ulp":
            d["threshold"] = self.ulp
        elif self.mode == "allclose":
            d.update(rtol=self.rtol, atol=self.atol, threshold=self.atol)
        elif self.mode == "auto":
            d.update(factor=self.factor, reduction_length=self.reduction_length,
                     threshold="factor * eps(dtype) * reduction_length",
                     thresholds={k: self.threshold(k) for k in EPS})
        elif self.mode == "noise":
            d.update(factor=self.factor, threshold="factor * max_rel(A, noise run) per tensor and step")
        else:
            d["threshold"] = 0
        return d

    def describe(self) -> str:
        if self.mode == "bitwise":
            return "bitwise (any differing bit)"
        if self.mode == "ulp":
            return f"max_ulp > {self.ulp}"
        if self.mode == "allclose":
            return f"|a-b| > atol + rtol*|x| with rtol={self.rtol:g}, atol={self.atol:g}"
        if self.mode == "auto":
            return (f"auto: {AUTO_METRIC} > {self.factor:g} * eps(dtype) * K, K={self.reduction_length} "
                    f"(float32: {self.threshold('float32'):.3g})")
        return f"noise: max_rel > {self.factor:g} * max_rel(A, repeat of A)"
