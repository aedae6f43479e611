"""In-graph, on-device tensor fingerprints (the TensorFlow twin of tracer.hashing).

All tensors of one replica and one step are fingerprinted by a single
XLA-compiled function, so the hash and the statistics of each tensor fuse into
one pass over its memory on whatever device holds it (CPU or GPU) and nothing
leaves the device but five short vectors.

The arithmetic follows ``tracer.hashing`` exactly; ``tests/`` check they agree
bit for bit. TensorFlow has no logical right shift on int64, and uint64
multiplication is not available on every device, so the mixer works on int64
with wrap-around multiplication (two's complement gives the same bits as uint64)
and masks after arithmetic shifts.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import tensorflow as tf

from tracer import hashing


def _i64(value: int) -> tf.Tensor:
    return tf.constant(np.uint64(value).view(np.int64), dtype=tf.int64)


def _shr(z: tf.Tensor, k: int) -> tf.Tensor:
    # Logical shift right: arithmetic shift, then clear the sign-extended bits.
    return tf.bitwise.bitwise_and(tf.bitwise.right_shift(z, k), _i64((1 << (64 - k)) - 1))


def _mix64(z: tf.Tensor) -> tf.Tensor:
    z = tf.bitwise.bitwise_xor(z, _shr(z, 30))
    z = z * _i64(hashing.MIX_MUL1)
    z = tf.bitwise.bitwise_xor(z, _shr(z, 27))
    z = z * _i64(hashing.MIX_MUL2)
    return tf.bitwise.bitwise_xor(z, _shr(z, 31))


_BITCAST = {
    1: (tf.uint8, 0xFF),
    2: (tf.uint16, 0xFFFF),
    4: (tf.int32, 0xFFFFFFFF),
}


def _bits64(x: tf.Tensor) -> tf.Tensor:
    """Bit pattern of every element, zero-extended to int64, flattened."""
    x = tf.reshape(x, [-1])
    if x.dtype == tf.bool:
        return tf.cast(x, tf.int64)
    width = x.dtype.size
    if width == 8:
        return x if x.dtype == tf.int64 else tf.bitcast(x, tf.int64)
    as_int, mask = _BITCAST[width]
    if x.dtype != as_int:
        x = tf.bitcast(x, as_int)
    return tf.bitwise.bitwise_and(tf.cast(x, tf.int64), _i64(mask))


def _hash(x: tf.Tensor) -> tf.Tensor:
    bits = _bits64(x)
    mul = hashing.INDEX_MUL_64 if x.dtype.size == 8 else hashing.INDEX_MUL_32
    idx = tf.range(1, tf.size(bits, out_type=tf.int64) + 1, dtype=tf.int64)
    return tf.reduce_sum(_mix64(bits + idx * _i64(mul)))


def _stats(x: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    x = tf.reshape(x, [-1])
    if x.dtype.is_floating:
        finite = tf.math.is_finite(x)
        xf = tf.where(finite, tf.cast(x, tf.float64), tf.zeros([], tf.float64))
        nan = tf.reduce_sum(tf.cast(tf.math.is_nan(x), tf.int64))
        inf = tf.reduce_sum(tf.cast(tf.math.is_inf(x), tf.int64))
    else:
        xf = tf.cast(x, tf.float64)
        nan = inf = tf.zeros([], tf.int64)
    l2 = tf.sqrt(tf.reduce_sum(xf * xf))
    # max over an empty tensor is -inf in TF; the reference says 0.
    max_abs = tf.maximum(tf.reduce_max(tf.abs(xf)), tf.zeros([], tf.float64))
    return l2, max_abs, nan, inf


def _fingerprint_all(tensors: Sequence[tf.Tensor]) -> List[tf.Tensor]:
    hashes, l2s, maxes, nans, infs = [], [], [], [], []
    for x in tensors:
        hashes.append(_hash(x))
        l2, max_abs, nan, inf = _stats(x)
        l2s.append(l2)
        maxes.append(max_abs)
        nans.append(nan)
        infs.append(inf)
    return [tf.stack(hashes), tf.stack(l2s), tf.stack(maxes), tf.stack(nans), tf.stack(infs)]


fingerprint_all_xla = tf.function(_fingerprint_all, jit_compile=True, autograph=False)
"""Fingerprint many tensors in one XLA cluster: [hash, l2, max_abs, nan, inf] vectors."""

fingerprint_all_graph = tf.function(_fingerprint_all, autograph=False)
"""The same without XLA, for devices where XLA is unavailable."""


def fingerprint_all(tensors: Sequence[tf.Tensor], use_xla: bool = True) -> List[tf.Tensor]:
    """Fingerprints of ``tensors`` on the current device, in ``tracer.schema.STATS`` order."""
    if not tensors:
        return [tf.zeros([0], tf.int64), tf.zeros([0], tf.float64), tf.zeros([0], tf.float64),
                tf.zeros([0], tf.int64), tf.zeros([0], tf.int64)]
    fn = fingerprint_all_xla if use_xla else fingerprint_all_graph
    return fn(list(tensors))
