"""Reference (NumPy) implementation of the tensor fingerprint.

The capture side computes the same fingerprint in the graph, on the device
(``strategies/fingerprint.py``); this module is the specification both follow and
lets the analyzer fingerprint full tensors read back from a trace.

Hash: the tensor's bytes (C order) are read as little-endian 64-bit words
``w_j``, the last one zero-padded. Each word is combined with its index,
``v_j = w_j + (j + 1) * GOLDEN`` (a bijection of ``w_j`` for a fixed ``j``), mixed
with the bijective splitmix64 finalizer, and the results are summed modulo
2**64 together with ``mix(nbytes)``. Integer addition is associative, so the
result does not depend on reduction order (threads, devices, XLA); each word's
contribution is a bijection of its bits, so any single changed bit (including
-0.0 vs +0.0 and NaN payloads) changes the hash, and multi-word changes collide
with probability about 2**-64. Working on 64-bit words rather than elements
halves the work for float32 and keeps every dtype on one code path.

Statistics, chosen so that the device computes them in one cheap pass each:

* ``l2``: sqrt(sum x**2) over all elements (NaN if any element is NaN, inf if
  any is infinite). The device sums float32 squares in float32 over groups of
  16 elements, then in float64, and other dtypes in float64, all in another
  order than NumPy's: it matches this reference within a relative
  ``L2_RTOL``, a magnitude, not an identity. Only the hash decides equality.
* ``max_abs``: max |x| over all elements, with NaN winning over inf over
  finite values.
* ``nan``, ``inf``: exact counts.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

MIX_MUL1 = 0xBF58476D1CE4E5B9
MIX_MUL2 = 0x94D049BB133111EB
INDEX_MUL_64 = 0x9E3779B97F4A7C15

# Bound on the relative error of a recorded l2 (float32 sums of 16 squares: 16 roundings of 2**-24 on the
# sum of squares, halved by the square root; the device falls back to float64 where float32 would overflow or
# underflow). The analyzer allows for it in the lower bounds it takes from two l2 values.
L2_RTOL = 2.0 ** -20


def _words(x: np.ndarray) -> np.ndarray:
    """The tensor's bytes as little-endian uint64 words, zero-padded."""
    raw = np.ascontiguousarray(x).reshape(-1).view(np.uint8)
    pad = (-raw.size) % 8
    if pad:
        raw = np.concatenate([raw, np.zeros(pad, np.uint8)])
    return raw.view("<u8")


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a bijection of uint64."""
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(MIX_MUL1)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(MIX_MUL2)
    return z ^ (z >> np.uint64(31))


def tensor_hash(x: np.ndarray) -> int:
    """Order-independent 64-bit hash of the bits of ``x`` (see module doc)."""
    x = np.asarray(x)
    if x.dtype.kind == "O":
        raise ValueError("cannot fingerprint object arrays")
    words = _words(x)
    idx = np.arange(1, words.size + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        total = np.sum(mix64(words + idx * np.uint64(INDEX_MUL_64)), dtype=np.uint64)
        total = total + mix64(np.array([x.nbytes], dtype=np.uint64))[0]
    return int(total)


def tensor_stats(x: np.ndarray) -> Tuple[float, float, int, int]:
    """(l2, max_abs, nan_count, inf_count) as defined in the module doc."""
    x = np.asarray(x)
    xf = x.astype(np.float64).reshape(-1)
    if x.dtype.kind == "f" or x.dtype.name == "bfloat16":
        nan = int(np.count_nonzero(np.isnan(xf)))
        inf = int(np.count_nonzero(np.isinf(xf)))
    else:
        nan = inf = 0
    if not xf.size:
        return 0.0, 0.0, 0, 0
    with np.errstate(over="ignore", invalid="ignore"):
        l2 = float(np.sqrt(np.dot(xf, xf)))
    if nan:
        return l2, float("nan"), nan, inf
    return l2, float(np.max(np.abs(xf))), nan, inf


def fingerprint(x: np.ndarray) -> Tuple[int, float, float, int, int]:
    """(hash, l2, max_abs, nan, inf) in the order of ``tracer.schema.STATS``."""
    return (tensor_hash(x),) + tensor_stats(x)
