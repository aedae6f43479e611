"""In-graph, on-device tensor fingerprints (the TensorFlow twin of ``tracer.hashing``).

Per step and replica, every captured tensor gets a 64-bit bitwise hash and the
statistics l2, max |x|, NaN and Inf counts, computed where the tensor lives
(CPU or GPU); only five short vectors leave the device.

Cost matters: this runs every step. The hash and max |x| of all tensors are one
XLA cluster (the hash reads the tensor as 64-bit words, half as many items as
float32 elements); the sum of squares uses TensorFlow's fused ``l2_loss``
kernel; NaN and Inf are counted only when l2 or max |x| is not finite, inside
the XLA cluster, so no value ever travels to the host to decide it.

The arithmetic follows ``tracer.hashing`` exactly; tests check that they agree
bit for bit. TensorFlow has no logical right shift on int64 and no uint64
multiply on every device, so the mixer works on int64 with wrap-around
multiplication (same bits as uint64) and masks after arithmetic shifts.
"""

from __future__ import annotations

from typing import List, Sequence

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


_SAME_WIDTH_INT = {1: tf.uint8, 2: tf.int16, 4: tf.int32, 8: tf.int64}


def _words(x: tf.Tensor) -> List[tf.Tensor]:
    """The tensor's bytes as int64 words (as ``tracer.hashing._words``): [full words, padded tail]."""
    x = tf.reshape(x, [-1])
    if x.dtype == tf.bool:
        x = tf.cast(x, tf.uint8)
    width = x.dtype.size
    as_int = _SAME_WIDTH_INT[width]
    if x.dtype != as_int:
        x = tf.bitcast(x, as_int)
    if width == 8:
        return [x]
    per_word = 8 // width
    n = int(x.shape[0])
    full = (n // per_word) * per_word
    parts = []
    if full:
        parts.append(tf.bitcast(tf.reshape(x[:full], [-1, per_word]), tf.int64))
    if n > full:
        tail = tf.pad(x[full:], [[0, per_word - (n - full)]])
        parts.append(tf.bitcast(tf.reshape(tail, [1, per_word]), tf.int64))
    return parts


def _hash(x: tf.Tensor) -> tf.Tensor:
    total = _i64(0)
    first = 1
    for words in _words(x):
        count = int(words.shape[0])
        idx = tf.range(first, first + count, dtype=tf.int64)
        total += tf.reduce_sum(_mix64(words + idx * _i64(hashing.INDEX_MUL_64)))
        first += count
    nbytes = int(np.prod(x.shape, dtype=np.int64)) * x.dtype.size
    return total + _mix64(_i64(nbytes))


def _as_float(x: tf.Tensor) -> tf.Tensor:
    if x.dtype in (tf.float32, tf.float64):
        return x
    return tf.cast(x, tf.float64 if x.dtype.size == 8 else tf.float32)


def _max_abs_and_counts(x: tf.Tensor, l2: tf.Tensor):
    xf = tf.reshape(_as_float(x), [-1])
    if int(xf.shape[0]) == 0:
        zero = tf.zeros([], tf.int64)
        return tf.zeros([], tf.float64), zero, zero
    max_abs = tf.cast(tf.reduce_max(tf.abs(xf)), tf.float64)
    if not x.dtype.is_floating:
        zero = tf.zeros([], tf.int64)
        return max_abs, zero, zero

    def count():
        nan = tf.reduce_sum(tf.cast(tf.math.is_nan(xf), tf.int64))
        inf = tf.reduce_sum(tf.cast(tf.math.is_inf(xf), tf.int64))
        # NaN wins over inf over finite values, whatever max does with NaN here.
        fixed = tf.where(nan > 0, tf.constant(np.nan, tf.float64), max_abs)
        return fixed, nan, inf

    def no_count():
        zero = tf.zeros([], tf.int64)
        return max_abs, zero, zero

    finite = tf.logical_and(tf.math.is_finite(l2), tf.math.is_finite(max_abs))
    return tf.cond(finite, no_count, count)


def _xla_part(tensors: Sequence[tf.Tensor], l2s: Sequence[tf.Tensor]) -> List[tf.Tensor]:
    hashes, maxes, nans, infs = [], [], [], []
    for x, l2 in zip(tensors, l2s):
        hashes.append(_hash(x))
        max_abs, nan, inf = _max_abs_and_counts(x, l2)
        maxes.append(max_abs)
        nans.append(nan)
        infs.append(inf)
    return [tf.stack(hashes), tf.stack(maxes), tf.stack(nans), tf.stack(infs)]


_xla_part_compiled = tf.function(_xla_part, jit_compile=True, autograph=False)


def _l2(x: tf.Tensor) -> tf.Tensor:
    if x.shape.num_elements() == 0:
        return tf.zeros([], tf.float64)
    xf = x if x.dtype in (tf.float32, tf.float64) else tf.cast(x, tf.float64 if x.dtype.size == 8 else tf.float32)
    return tf.sqrt(2.0 * tf.cast(tf.nn.l2_loss(xf), tf.float64))


def fingerprint_all(tensors: Sequence[tf.Tensor], use_xla: bool = True) -> List[tf.Tensor]:
    """Fingerprints of ``tensors`` on the current device: [hash, l2, max_abs, nan, inf] vectors.

    Args:
        tensors: Tensors with static shapes.
        use_xla: Compile the hash and max |x| with XLA (default); without it
            the same ops run as ordinary TensorFlow kernels.
    """
    if not tensors:
        return [tf.zeros([0], tf.int64), tf.zeros([0], tf.float64), tf.zeros([0], tf.float64),
                tf.zeros([0], tf.int64), tf.zeros([0], tf.int64)]
    tensors = [tf.convert_to_tensor(t) for t in tensors]
    l2s = [_l2(x) for x in tensors]
    part = _xla_part_compiled if use_xla else _xla_part
    hashes, maxes, nans, infs = part(tensors, l2s)
    return [hashes, tf.stack(l2s), maxes, nans, infs]
