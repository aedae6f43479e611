"""In-graph, on-device tensor fingerprints (the TensorFlow twin of ``tracer.hashing``).

Per step and replica, every captured tensor gets a 64-bit bitwise hash and the
statistics l2, max |x|, NaN and Inf counts, computed where the tensor lives
(CPU or GPU); only five short vectors leave the device.

Cost matters: this runs every step over every captured byte. The hash reads the
tensor as 64-bit words (half as many items as float32 elements) and, under
XLA, one variadic reduction produces the hash sum and max |x| together in a
single pass, together with the sum of squares (accumulated in float64);
NaN and Inf are counted only when l2 or max |x| is not finite, inside the XLA
cluster, so no value travels to the host to decide it.

The arithmetic follows ``tracer.hashing`` exactly; tests check that they agree
bit for bit, with and without XLA.
"""

from __future__ import annotations

import functools
from typing import List, Sequence, Tuple

import numpy as np
import tensorflow as tf

from tracer import hashing

try:  # XLA's variadic reduce: one loop for several reductions. Private, hence optional.
    from tensorflow.compiler.tf2xla.ops import gen_xla_ops as _xla_ops

    _VARIADIC_REDUCE = getattr(_xla_ops, "xla_variadic_reduce_v2", None)
except ImportError:  # pragma: no cover - TensorFlow builds without XLA
    _VARIADIC_REDUCE = None


def _u64(value: int) -> tf.Tensor:
    return tf.constant(np.uint64(value), dtype=tf.uint64)


def _shr(z: tf.Tensor, k: int) -> tf.Tensor:
    return tf.bitwise.right_shift(z, _u64(k))  # logical: z is unsigned


def _mix64(z: tf.Tensor) -> tf.Tensor:
    z = tf.bitwise.bitwise_xor(z, _shr(z, 30))
    z = z * _u64(hashing.MIX_MUL1)
    z = tf.bitwise.bitwise_xor(z, _shr(z, 27))
    z = z * _u64(hashing.MIX_MUL2)
    return tf.bitwise.bitwise_xor(z, _shr(z, 31))


_SAME_WIDTH_UINT = {1: tf.uint8, 2: tf.uint16, 4: tf.uint32, 8: tf.uint64}


def _float_view(x: tf.Tensor) -> tf.Tensor:
    """``x`` as a float tensor for max |x| (exact for every float dtype; ints as float)."""
    if x.dtype in (tf.float32, tf.float64):
        return x
    return tf.cast(x, tf.float64 if x.dtype.size == 8 else tf.float32)


def _word_parts(x: tf.Tensor) -> List[Tuple[tf.Tensor, tf.Tensor]]:
    """[(words, values)]: the bytes as uint64 words (as ``tracer.hashing._words``) and, row by
    row, the elements each word holds as floats ([words, elements per word])."""
    x = tf.reshape(x, [-1])
    if x.dtype == tf.bool:
        x = tf.cast(x, tf.uint8)
    width = x.dtype.size
    per_word = 8 // width
    n = int(x.shape[0])
    full = (n // per_word) * per_word
    as_uint = _SAME_WIDTH_UINT[width]
    parts = []
    if full:
        main = x[:full] if full < n else x
        bits = main if main.dtype == as_uint else tf.bitcast(main, as_uint)
        words = bits if width == 8 else tf.bitcast(tf.reshape(bits, [-1, per_word]), tf.uint64)
        parts.append((words, tf.reshape(_float_view(main), [-1, per_word])))
    if n > full:
        tail = x[full:]
        bits = tf.bitcast(tail, as_uint) if tail.dtype != as_uint else tail
        bits = tf.pad(bits, [[0, per_word - (n - full)]])
        values = tf.pad(_float_view(tail), [[0, per_word - (n - full)]])
        parts.append((tf.bitcast(tf.reshape(bits, [1, per_word]), tf.uint64), tf.reshape(values, [1, per_word])))
    return parts


@functools.lru_cache(maxsize=None)
def _sum_max_sumsq_reducer():
    @tf.function(autograph=False)
    def reducer(h0, m0, q0, h1, m1, q1):
        return h0 + h1, tf.maximum(m0, m1), q0 + q1

    spec = [tf.TensorSpec([], tf.uint64), tf.TensorSpec([], tf.float64), tf.TensorSpec([], tf.float64)]
    return reducer.get_concrete_function(*(spec + spec))


def _hash_max_sumsq(x: tf.Tensor, fused: bool) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(hash as int64 bits, max |x|, sum of squares) of one tensor; the last two as float64."""
    total = _u64(0)
    max_abs = tf.zeros([], tf.float64)
    sumsq = tf.zeros([], tf.float64)
    first = 1
    for words, values in _word_parts(x):
        count = int(words.shape[0])
        idx = tf.cast(tf.range(first, first + count, dtype=tf.int64), tf.uint64)
        mixed = _mix64(words + idx * _u64(hashing.INDEX_MUL_64))
        # XLA's variadic reduce wants one float precision: float64 for both (exact for max).
        wide = tf.cast(values, tf.float64)
        row_max = tf.reduce_max(tf.abs(wide), axis=1)
        row_sumsq = tf.reduce_sum(wide * wide, axis=1)
        if fused:
            # One loop over the words yields all three: XLA's CPU backend does not
            # fuse sibling reductions, and each extra pass costs as much as the hash.
            part_hash, part_max, part_sumsq = _VARIADIC_REDUCE(
                [mixed, row_max, row_sumsq], [_u64(0), tf.zeros([], tf.float64), tf.zeros([], tf.float64)],
                dimensions_to_reduce=[0], reducer=_sum_max_sumsq_reducer())
        else:
            part_hash, part_max, part_sumsq = tf.reduce_sum(mixed), tf.reduce_max(row_max), tf.reduce_sum(row_sumsq)
        total += part_hash
        max_abs = tf.maximum(max_abs, part_max)
        sumsq += part_sumsq
        first += count
    nbytes = int(np.prod(x.shape, dtype=np.int64)) * x.dtype.size
    total += _mix64(_u64(nbytes))
    return tf.bitcast(total, tf.int64), max_abs, sumsq


def _counts(x: tf.Tensor, l2: tf.Tensor, max_abs: tf.Tensor):
    """(max_abs, nan, inf), counting only when something is not finite."""
    zero = tf.zeros([], tf.int64)
    if not x.dtype.is_floating or x.shape.num_elements() == 0:
        return max_abs, zero, zero
    xf = tf.reshape(x, [-1])

    def count():
        nan = tf.reduce_sum(tf.cast(tf.math.is_nan(xf), tf.int64))
        inf = tf.reduce_sum(tf.cast(tf.math.is_inf(xf), tf.int64))
        # NaN wins over inf over finite values, whatever max did with NaN.
        return tf.where(nan > 0, tf.constant(np.nan, tf.float64), max_abs), nan, inf

    finite = tf.logical_and(tf.math.is_finite(l2), tf.math.is_finite(max_abs))
    return tf.cond(finite, lambda: (max_abs, zero, zero), count)


def _device_part(tensors: Sequence[tf.Tensor], fused: bool) -> List[tf.Tensor]:
    hashes, l2s, maxes, nans, infs = [], [], [], [], []
    for x in tensors:
        h, max_abs, sumsq = _hash_max_sumsq(x, fused)
        l2 = tf.sqrt(sumsq)
        max_abs, nan, inf = _counts(x, l2, max_abs)
        hashes.append(h)
        l2s.append(l2)
        maxes.append(max_abs)
        nans.append(nan)
        infs.append(inf)
    return [tf.stack(hashes), tf.stack(l2s), tf.stack(maxes), tf.stack(nans), tf.stack(infs)]


_device_part_xla = tf.function(functools.partial(_device_part, fused=_VARIADIC_REDUCE is not None),
                               jit_compile=True, autograph=False)


def fingerprint_all(tensors: Sequence[tf.Tensor], use_xla: bool = True) -> List[tf.Tensor]:
    """Fingerprints of ``tensors`` on the current device: [hash, l2, max_abs, nan, inf] vectors.

    Args:
        tensors: Tensors with static shapes.
        use_xla: Compile the hash, max |x| and counts with XLA (default);
            without it the same ops run as ordinary TensorFlow kernels.

    Returns:
        Five vectors, one entry per tensor: the hash (int64 holding the uint64
        bits), l2 and max |x| (float64), NaN and Inf counts (int64).
    """
    if not tensors:
        return [tf.zeros([0], tf.int64), tf.zeros([0], tf.float64), tf.zeros([0], tf.float64),
                tf.zeros([0], tf.int64), tf.zeros([0], tf.int64)]
    tensors = [tf.convert_to_tensor(t) for t in tensors]
    if use_xla:
        return _device_part_xla(tensors)
    return _device_part(tensors, fused=False)
