"""Datasets of the reference job: the embedded default and a user's ``.npz``.

Pure numpy, no TensorFlow: :mod:`launch.train` turns the arrays into a
``tf.data`` pipeline. A dataset is a feature matrix ``x`` (float32, N x F) and
integer labels ``y`` (N,) in ``[0, num_classes)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Optional

import numpy as np

DEFAULT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "default.npz")
"""The dataset that ships with the project, written by ``launch/make_default_data.py``."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Features, labels and where they came from.

    Attributes:
        x: float32 features, shape (N, F).
        y: int32 labels, shape (N,).
        num_classes: Number of classes (``max(y) + 1`` unless the file says).
        source: Path of the ``.npz`` file.
        sha256: Digest of ``x`` and ``y`` bytes: two runs that read different
            data show it in their traces' run info.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    source: str
    sha256: str

    @property
    def num_examples(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_features(self) -> int:
        return int(self.x.shape[1])

    def __repr__(self) -> str:
        return (f"<Dataset {os.path.basename(self.source)!r} examples={self.num_examples} "
                f"features={self.num_features} classes={self.num_classes}>")


def load(path: Optional[str] = None) -> Dataset:
    """Loads a classification dataset from an ``.npz`` file.

    Args:
        path: A ``.npz`` with arrays ``x`` (N x F, floating point) and ``y``
            (N integer labels >= 0); optionally a scalar ``num_classes``.
            ``None`` loads the embedded default dataset.

    Returns:
        A :class:`Dataset` with ``x`` as float32 and ``y`` as int32.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not an ``.npz`` or its arrays are unusable.
    """
    path = DEFAULT_PATH if path is None else os.fspath(path)
    if not os.path.isfile(path):
        if path == DEFAULT_PATH:
            raise FileNotFoundError(
                f"The embedded dataset is missing: {path}. Regenerate it with "
                "`python launch/make_default_data.py`.")
        raise FileNotFoundError(f"--data file not found. Received: {path!r}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"--data must be an .npz file written by numpy.savez with arrays x and y. "
                         f"Could not read {path!r}: {exc}") from exc
    return from_arrays(arrays, source=path)


def from_arrays(arrays, *, source: str) -> Dataset:
    """Validates ``{"x": ..., "y": ...[, "num_classes": ...]}`` into a :class:`Dataset`."""
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise ValueError(f"{source}: the .npz must contain arrays 'x' (features) and 'y' (labels); "
                         f"{missing} missing. Received keys: {sorted(arrays)}")
    x, y = np.asarray(arrays["x"]), np.asarray(arrays["y"])
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{source}: 'x' must be a 2-D numeric array (examples x features). "
                         f"Received: shape={x.shape}, dtype={x.dtype}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{source}: 'y' must be a 1-D integer array of class labels. "
                         f"Received: shape={y.shape}, dtype={y.dtype}")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"{source}: 'x' and 'y' must have the same, non-zero number of examples. "
                         f"Received: x has {x.shape[0]}, y has {y.shape[0]}")
    if y.min() < 0:
        raise ValueError(f"{source}: labels in 'y' must be >= 0. Received: min(y)={int(y.min())}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{source}: 'x' contains {int(np.sum(~np.isfinite(x)))} NaN/Inf values.")
    y = np.ascontiguousarray(y, dtype=np.int32)
    num_classes = int(y.max()) + 1
    if "num_classes" in arrays:
        declared = int(np.asarray(arrays["num_classes"]))
        if declared < num_classes:
            raise ValueError(f"{source}: 'num_classes' must be > max(y)={num_classes - 1}. "
                             f"Received: num_classes={declared}")
        num_classes = declared
    if num_classes < 2:
        raise ValueError(f"{source}: a classification dataset needs at least 2 classes. "
                         f"Received: num_classes={num_classes}")
    digest = hashlib.sha256(x.tobytes())
    digest.update(y.tobytes())
    return Dataset(x=x, y=y, num_classes=num_classes, source=os.path.abspath(source),
                   sha256=digest.hexdigest())
