"""Reference (NumPy) implementation of the tensor fingerprint.

The capture side computes the same fingerprint in the graph, on the device
(``strategies/fingerprint.py``); this module is the specification both follow and
lets the analyzer fingerprint full tensors read back from a trace.

Hash: every element's bit pattern ``b_i`` (zero-extended to 64 bits) is combined
with its flat index, ``v_i = b_i + (i + 1) * C`` with ``C = 2**32`` for dtypes of
32 bits or fewer (so ``v_i`` is injective in ``(i, b_i)``) and an odd constant for
64-bit dtypes, then mixed with the bijective splitmix64 finalizer and summed
modulo 2**64. Integer addition is associative, so the result does not depend on
reduction order; each element's contribution is a bijection of its bits, so any
single changed bit (including -0.0 vs +0.0 and NaN payloads) changes the hash,
and multi-element changes collide with probability about 2**-64.

Statistics: L2 norm and max |x| over finite elements (NaN and Inf would hide
everything else), and the NaN and Inf counts.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

MIX_MUL1 = 0xBF58476D1CE4E5B9
MIX_MUL2 = 0x94D049BB133111EB
INDEX_MUL_64 = 0x9E3779B97F4A7C15
INDEX_MUL_32 = 1 << 32

_UINT_OF_WIDTH = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _bits(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_:
        x = x.view(np.uint8)
    width = x.dtype.itemsize
    if width not in _UINT_OF_WIDTH:
        raise ValueError(f"cannot fingerprint dtype {x.dtype}")
    return x.reshape(-1).view(_UINT_OF_WIDTH[width]).astype(np.uint64)


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
    bits = _bits(x)
    mul = INDEX_MUL_64 if max(x.dtype.itemsize, 1) == 8 else INDEX_MUL_32
    idx = np.arange(1, bits.size + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        v = bits + idx * np.uint64(mul)
        return int(np.sum(mix64(v), dtype=np.uint64))


def tensor_stats(x: np.ndarray) -> Tuple[float, float, int, int]:
    """(l2, max_abs, nan_count, inf_count); l2 and max_abs over finite values."""
    x = np.asarray(x)
    if x.dtype.kind == "f" or x.dtype.name == "bfloat16":
        xf = x.astype(np.float64).reshape(-1)
        nan = int(np.count_nonzero(np.isnan(xf)))
        inf = int(np.count_nonzero(np.isinf(xf)))
        if nan or inf:
            xf = xf[np.isfinite(xf)]
    else:
        xf = x.astype(np.float64).reshape(-1)
        nan = inf = 0
    l2 = float(np.sqrt(np.dot(xf, xf))) if xf.size else 0.0
    max_abs = float(np.max(np.abs(xf))) if xf.size else 0.0
    return l2, max_abs, nan, inf


def fingerprint(x: np.ndarray) -> Tuple[int, float, float, int, int]:
    """(hash, l2, max_abs, nan, inf) in the order of ``tracer.schema.STATS``."""
    return (tensor_hash(x),) + tensor_stats(x)
