"""In-graph, on-device tensor fingerprints (the TensorFlow twin of ``tracer.hashing``).

Per step and replica, every captured tensor gets a 64-bit bitwise hash and the
statistics l2, max |x|, NaN and Inf counts, computed where the tensor lives
(CPU or GPU); only five short vectors leave the device.

Cost matters: this runs every step over every captured byte. The hash reads the
tensor as 64-bit words (half as many items as float32 elements). Under XLA one
vectorized pass over the tensor, cut into slices read side by side, yields the
hash sum, max |x| (as an integer maximum over the bit patterns) and the sum of
squares. For float32 the squares are summed in float32 over each column of
the slices (16 elements), then in float64: float64 arithmetic on every element
runs at half the vector width and cost more than the hash. That keeps l2
within a relative 2**-20 of the exact value (``L2_RTOL``) unless squares
overflow or underflow float32, which the pass detects from its own result and
then sums again in float64. NaN and Inf are counted only when l2 or max |x| is
not finite, inside the XLA cluster, so no value travels to the host to decide
it. One condition for all the tensors of a call decides whether any of them
needs either: two conditions per tensor cost XLA's CPU runtime about a sixth of
the pass. An optimization barrier keeps that condition a conditional: XLA makes
a select of a condition whose branches hold only element-wise ops and
reductions, and would compute the rare branch, a second full pass, every call.

Tensors under ``MAX_BLOCK_WORDS`` words (biases, norms, the loss, small and
middle-sized kernels) are read together, as the zero-padded rows of one block
per dtype and row length, with the padding left out of the hash. XLA compiles
every kernel on its own, on every device: read one by one, the hundreds of
small tensors of a real model cost seconds of compilation each time the step
is traced.

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
    _BARRIER = getattr(_xla_ops, "xla_optimization_barrier", None)
except ImportError:  # pragma: no cover - TensorFlow builds without XLA
    _VARIADIC_REDUCE = _BARRIER = None


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


_UINT = {1: tf.uint8, 2: tf.uint16, 4: tf.uint32, 8: tf.uint64}

# A tensor of at least SLICES * MIN_SLICE words is cut into SLICES equal slices that one loop
# walks side by side (see ``_column_partials``).
SLICES = 8
MIN_SLICE = 256
# The pass over a tensor read alone leaves at most MAX_PARTIALS partial results per statistic (and the
# words left over), which ``_finish_alone`` reduces.
MAX_PARTIALS = 1 << 16


def _abs_key_dtype(dtype: tf.DType) -> tf.DType:
    if dtype.is_floating:
        return tf.uint64 if dtype.size == 8 else tf.uint32
    return tf.float64


def _abs_key(pieces: tf.Tensor) -> tf.Tensor:
    """Per element, a key whose maximum gives max |x| (``_abs_value`` turns it back).

    For floats it is the bit pattern without the sign bit: for IEEE floats that
    orders like |x|, and every NaN pattern lies above inf, so NaN wins over inf
    over finite values by itself, in integer arithmetic that vectorizes.
    """
    dtype = pieces.dtype
    if not dtype.is_floating:
        return tf.abs(tf.cast(pieces, tf.float64))
    width = dtype.size
    bits = tf.bitcast(pieces, _UINT[width])
    if width == 8:
        return tf.bitwise.bitwise_and(bits, _u64((1 << 63) - 1))
    return tf.bitwise.bitwise_and(tf.cast(bits, tf.uint32), tf.constant(np.uint32((1 << (8 * width - 1)) - 1)))


def _abs_value(key: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    if not dtype.is_floating:
        return key
    if dtype.size == 8:
        return tf.bitcast(key, tf.float64)
    return tf.cast(tf.bitcast(tf.cast(key, _UINT[dtype.size]), dtype), tf.float64)


def _words(pieces: tf.Tensor) -> tf.Tensor:
    """[..., per_word] elements as little-endian uint64 words [...], like ``tracer.hashing._words``.

    Built from shifted pieces rather than with one bitcast to uint64, which XLA
    lowers to a separate, materialized reduction.
    """
    width = pieces.dtype.size
    bits = pieces if pieces.dtype == _UINT[width] else tf.bitcast(pieces, _UINT[width])
    if width == 8:
        return bits[..., 0]
    word = None
    for k in range(8 // width):
        part = tf.cast(bits[..., k], tf.uint64)
        if k:
            part = tf.bitwise.left_shift(part, _u64(8 * width * k))
        word = part if word is None else tf.bitwise.bitwise_or(word, part)
    return word


def _key_and_square(pieces: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
    """Per word of ``pieces`` [..., elements per word]: the largest ``_abs_key`` and the sum of squares.

    float32 squares are summed in float32 (see the module doc), others in float64.
    """
    keys = _abs_key(pieces)
    values = pieces if pieces.dtype == tf.float32 else tf.cast(pieces, tf.float64)
    key, square = keys[..., 0], values[..., 0] * values[..., 0]
    for k in range(1, int(pieces.shape[-1])):
        key = tf.maximum(key, keys[..., k])
        square = square + values[..., k] * values[..., k]
    return key, square


def _pieces(x: tf.Tensor) -> List[Tuple[tf.Tensor, int]]:
    """[(pieces [slices, words per slice, elements per word], index of the first word)].

    The bulk is cut into ``SLICES`` slices; the words left over (and the last,
    zero-padded partial word) form a second, one-slice part.
    """
    x = tf.reshape(x, [-1])
    if x.dtype == tf.bool:
        x = tf.cast(x, tf.uint8)
    per_word = 8 // x.dtype.size
    n = int(x.shape[0])
    whole_words = n // per_word
    slices = SLICES if whole_words >= SLICES * MIN_SLICE else 1
    bulk = (whole_words // slices) * slices
    parts = []
    if bulk:
        main = x[:bulk * per_word] if bulk * per_word < n else x
        parts.append((tf.reshape(main, [slices, bulk // slices, per_word]), 1))
    if n > bulk * per_word:
        rest = x[bulk * per_word:]
        pad = (-int(rest.shape[0])) % per_word
        if pad:
            rest = tf.concat([rest, tf.zeros([pad], x.dtype)], 0)
        parts.append((tf.reshape(rest, [1, -1, per_word]), bulk + 1))
    return parts


def _with_barrier(results: Sequence[tf.Tensor], fused: bool) -> Tuple[tf.Tensor, ...]:
    """``results`` behind an optimization barrier under XLA, which keeps its simplifier's hands off them.

    Two uses: a rare branch's results, because XLA turns a condition whose
    branches hold only element-wise ops and reductions into a select that
    computes both branches, every call; and the column of index terms (see
    ``_index_terms``), which XLA would otherwise fold into a constant as large
    as the tensor.
    """
    if fused and _BARRIER is not None:
        return tuple(_BARRIER(list(results)))
    return tuple(results)


def _index_terms(slices: int, m: int, first: int, fused: bool) -> tf.Tensor:
    """``(j + 1) * GOLDEN`` for the words of a [slices, m] part whose first word has ``j + 1 == first``.

    Written as ``c * GOLDEN + (s * m + first) * GOLDEN`` (mod 2**64), a [1, m] row
    plus a [slices, 1] column that an optimization barrier keeps from being folded
    into the row: folded, it is a [slices, m] constant that the loop reads beside
    the tensor, 8 more bytes per word; unfolded, XLA computes the row in the loop,
    once per column for all slices.
    """
    gold = np.uint64(hashing.INDEX_MUL_64)
    with np.errstate(over="ignore"):
        row = np.arange(m, dtype=np.uint64) * gold
        col = (np.arange(slices, dtype=np.uint64) * np.uint64(m) + np.uint64(first)) * gold
    return tf.constant(row[None, :]) + _with_barrier([tf.constant(col[:, None])], fused)[0]


@functools.lru_cache(maxsize=None)
def _sum_max_sumsq_reducer(key_dtype: tf.DType, square_dtype: tf.DType):
    @tf.function(autograph=False)
    def reducer(h0, m0, q0, h1, m1, q1):
        return h0 + h1, tf.maximum(m0, m1), q0 + q1

    spec = [tf.TensorSpec([], tf.uint64), tf.TensorSpec([], key_dtype), tf.TensorSpec([], square_dtype)]
    return reducer.get_concrete_function(*(spec + spec))


def _reduce_slices(hashes: tf.Tensor, keys: tf.Tensor, squares: tf.Tensor, fused: bool, axis: int = 0):
    """Sum, max and sum over ``axis`` of [slices, m] (or [m]) operands, in one pass when ``fused``."""
    if not fused:
        return tf.reduce_sum(hashes, axis), tf.reduce_max(keys, axis), tf.reduce_sum(squares, axis)
    return _VARIADIC_REDUCE([hashes, keys, squares],
                            [_u64(0), tf.zeros([], keys.dtype), tf.zeros([], squares.dtype)],
                            dimensions_to_reduce=[axis], reducer=_sum_max_sumsq_reducer(keys.dtype, squares.dtype))


# Bounds within which those float32 sums lose nothing to overflow or underflow (see ``_narrow_ok``).
_NARROW_MAX_ABS = 2.0 ** 62
_NARROW_MIN_SUMSQ_PER_ELEMENT = 2.0 ** -100


def _narrow_ok(sumsq: tf.Tensor, max_abs: tf.Tensor, n: int) -> tf.Tensor:
    """Whether a sum of squares taken in float32 columns is within ``L2_RTOL`` of the exact one.

    No float32 square or column sum overflows while max |x| <= 2**62 (16 squares
    of 2**62 are 2**128 / 2**4 < float32 max). Squares and sums below 2**-126
    are flushed or denormal: at most n * 2**-125 is lost in all, below 2**-25 of
    the sum once the sum is at least n * 2**-100. With the 16 roundings of
    2**-24 that keeps l2 within 2**-20. All zeros is exact. Non-finite values
    make l2 non-finite either way and are counted separately.
    """
    finite = tf.math.is_finite(max_abs)
    fits = tf.logical_or(tf.equal(max_abs, 0.0), tf.logical_and(
        max_abs <= _NARROW_MAX_ABS, sumsq >= n * _NARROW_MIN_SUMSQ_PER_ELEMENT))
    return tf.logical_or(tf.logical_not(finite), fits)


def _column_partials(x: tf.Tensor, fused: bool) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Partial hash sums, max keys and sums of squares (float64) of one tensor, as three [p] vectors.

    The words are viewed as [slices, m]: one loop over the m columns reads the
    slices side by side and reduces across them, which XLA's CPU backend
    vectorizes (a plain reduction over one long axis it does not). Hash, max |x|
    and sum of squares come out of that one pass (a variadic reduction), as m
    partial results; above ``MAX_PARTIALS`` they shrink ``SLICES``-fold per
    further pass. ``_finish_alone`` reduces them, with those of other tensors
    of the same length.
    """
    cols = []
    for pieces, first in _pieces(x):
        slices, m = int(pieces.shape[0]), int(pieces.shape[1])
        mixed = _mix64(_words(pieces) + _index_terms(slices, m, first, fused))
        # float32: the 2 * SLICES squares of a column are summed in float32 (see the module doc).
        part_key, part_sq = _key_and_square(pieces)
        if slices == 1:  # nothing to reduce across: one kernel less per small tensor
            col_hash, col_key, col_sq = mixed[0], part_key[0], part_sq[0]
        else:
            col_hash, col_key, col_sq = _reduce_slices(mixed, part_key, part_sq, fused)
        col_sq = tf.cast(col_sq, tf.float64)
        while fused and m > MAX_PARTIALS and m % SLICES == 0:
            m //= SLICES
            col_hash, col_key, col_sq = _reduce_slices(
                *(tf.reshape(t, [SLICES, m]) for t in (col_hash, col_key, col_sq)), fused)
        cols.append((col_hash, col_key, col_sq))
    if len(cols) == 1:
        return cols[0]
    return tuple(tf.concat([c[k] for c in cols], 0) for k in range(3))


def _finish_alone(tensors: Sequence[tf.Tensor], partials, fused: bool):
    """(order, hashes, max |x|, sums of squares) of tensors read alone, from their ``_column_partials``.

    One kernel per group of tensors instead of a chain per tensor: XLA's CPU
    runtime pays for every kernel, and over a replica's tensors that came to
    several percent of the pass. Under XLA, the partials of tensors of one
    dtype and count (the same variable's weights, gradients and slots) are
    reduced together, as the rows of one [tensors, count] matrix. Stacking
    them is a copy, so plain kernels' partials (never shrunk) and counts above
    twice ``MAX_PARTIALS`` (not a multiple of ``SLICES``) are reduced tensor by
    tensor. ``order`` lists the indices into ``tensors`` in the order of the
    results, a vector per group.
    """
    groups = {}
    for i, (x, cols) in enumerate(zip(tensors, partials)):
        count = int(cols[0].shape[0])
        groups.setdefault((x.dtype, count) if fused and count <= 2 * MAX_PARTIALS else i, []).append(i)
    order, hashes, maxes, sums = [], [], [], []
    for members in groups.values():
        dtype = tensors[members[0]].dtype
        if len(members) == 1:
            rows = [tf.expand_dims(t, 0) for t in partials[members[0]]]
        else:
            rows = [tf.stack([partials[i][k] for i in members]) for k in range(3)]
        total, key, sumsq = _reduce_slices(*rows, fused, axis=1)
        order += members
        total += _length_terms([tensors[i].shape.num_elements() for i in members], dtype)
        hashes.append(tf.bitcast(total, tf.int64))
        maxes.append(_abs_value(key, dtype))
        sums.append(sumsq)
    return order, hashes, maxes, sums


def _length_terms(elements, dtype: tf.DType) -> tf.Tensor:
    """``mix64(nbytes)``, the term a tensor's length adds to its hash, for tensors of ``elements`` elements."""
    with np.errstate(over="ignore"):
        return tf.constant(hashing.mix64(np.asarray(elements, np.uint64) * np.uint64(dtype.size)))


@functools.lru_cache(maxsize=None)
def _three_sums_reducer():
    @tf.function(autograph=False)
    def reducer(a0, b0, c0, a1, b1, c1):
        return a0 + a1, b0 + b1, c0 + c1

    spec = [tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.float64)]
    return reducer.get_concrete_function(*(spec + spec))


def _slow(values: tf.Tensor, axis: int, sizes, sumsq: tf.Tensor, max_abs: tf.Tensor, fused: bool):
    """(l2, max_abs, nan, inf) in a rare branch, of a tensor (``axis`` 0) or of a block's rows.

    One more pass gives the NaN and Inf counts and the sum of squares in
    float64 (used where the float32 columns may have lost too much, see
    ``_narrow_ok``), in one reduction: the branch runs rarely, but XLA compiles
    it for every tensor read alone and every block. ``sizes``: elements per
    tensor (``_narrow_ok``); padding is zeros, which change no result.
    """
    zero = tf.zeros_like(sumsq, tf.int64)
    if not values.dtype.is_floating:
        return tf.sqrt(sumsq), max_abs, zero, zero
    operands = [tf.cast(tf.math.is_nan(values), tf.int64), tf.cast(tf.math.is_inf(values), tf.int64),
                tf.square(tf.cast(values, tf.float64))]
    if fused:
        nan, inf, exact = _VARIADIC_REDUCE(operands, [tf.zeros([], tf.int64), tf.zeros([], tf.int64),
                                                      tf.zeros([], tf.float64)],
                                           dimensions_to_reduce=[axis], reducer=_three_sums_reducer())
    else:
        nan, inf, exact = (tf.reduce_sum(t, axis) for t in operands)
    if values.dtype == tf.float32:
        sumsq = tf.where(_narrow_ok(sumsq, max_abs, sizes), sumsq, exact)
    # NaN wins over inf over finite values, whatever max did with NaN.
    return tf.sqrt(sumsq), tf.where(nan > 0, tf.constant(np.nan, tf.float64), max_abs), nan, inf


def _block_key(x: tf.Tensor):
    """(dtype, words per row) of the block a flat tensor is read in; None for a tensor read alone.

    Tensors under ``MAX_BLOCK_WORDS`` words (biases, norms, the loss, the
    kernels of small and middle-sized layers) are read together, as the
    zero-padded rows of one block per dtype and power-of-two row length. Their
    hash, max |x| and sum of squares then come from the block's reductions, not
    from kernels of their own: XLA compiles each kernel separately, on every
    device, and a model has hundreds of such tensors per replica (5 kinds of
    each variable), which cost seconds of compilation when the step is traced.
    The block is a copy, a cost that is small next to those tensors' share of
    the pass; larger tensors are read alone, where they are.
    """
    dtype = tf.uint8 if x.dtype == tf.bool else x.dtype
    words = -(-int(x.shape[0]) // (8 // dtype.size))
    if words >= MAX_BLOCK_WORDS:
        return None
    return dtype, max(_MIN_ROW_WORDS, 1 << max(words - 1, 0).bit_length())


MAX_BLOCK_WORDS = 1 << 16
_MIN_ROW_WORDS = 64


class _Block:
    """Flat tensors of one dtype as the rows of a zero-padded [rows, slices, words, elements per word] block.

    A row of at least ``SLICES * MIN_SLICE`` words is cut into ``SLICES``
    slices read side by side, as ``_column_partials`` reads a large tensor.
    """

    def __init__(self, tensors: Sequence[tf.Tensor], dtype: tf.DType, row_words: int):
        per_word = 8 // dtype.size
        width = row_words * per_word
        parts, zeros = [], {}  # one zeros op per padding length: tracing time grows with the ops made
        for x in tensors:
            x = tf.cast(x, tf.uint8) if x.dtype == tf.bool else x
            n = int(x.shape[0])
            if n < width and width - n not in zeros:
                zeros[width - n] = tf.zeros([width - n], dtype)
            parts += [x, zeros[width - n]] if n < width else [x]
        self.dtype = dtype
        self.sizes = np.array([int(x.shape[0]) for x in tensors], np.int64)
        self.slices = SLICES if row_words >= SLICES * MIN_SLICE else 1
        self.pieces = tf.reshape(tf.concat(parts, 0),
                                 [len(tensors), self.slices, row_words // self.slices, per_word])
        self.words = -(-self.sizes // per_word)

    def hash_max_sumsq(self, fused: bool) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Per row, as a tensor read alone: hash (int64 bits), max |x| and sum of squares (float64)."""
        pieces, dtype, slices = self.pieces, self.dtype, self.slices
        m = int(pieces.shape[2])
        # The padding's words are not the tensor's: they add nothing to the hash.
        index = tf.reshape(tf.range(slices * m, dtype=tf.int64), [1, slices, m])
        real = index < tf.constant(self.words[:, None, None])
        mixed = tf.where(real, _mix64(_words(pieces) + _index_terms(slices, m, 1, fused)[None]), _u64(0))
        part_key, part_sq = _key_and_square(pieces)
        if slices == 1:
            mixed, part_key, part_sq = mixed[:, 0], part_key[:, 0], part_sq[:, 0]
        else:  # float32: the 2 * SLICES squares of a column summed in float32, as for a large tensor
            mixed, part_key, part_sq = _reduce_slices(mixed, part_key, part_sq, fused, axis=1)
        total, max_key, sumsq = _reduce_slices(mixed, part_key, tf.cast(part_sq, tf.float64), fused, axis=1)
        total += _length_terms(self.sizes, dtype)
        return tf.bitcast(total, tf.int64), _abs_value(max_key, dtype), sumsq

    def slow(self, sumsq: tf.Tensor, max_abs: tf.Tensor, fused: bool):
        """(l2, max_abs, nan, inf) per row, for the slow branch of ``_device_part`` (see ``_slow``)."""
        rows = tf.reshape(self.pieces, [len(self.sizes), -1])
        return _slow(rows, 1, self.sizes.astype(np.float64), sumsq, max_abs, fused)


def _fast_ok(tensors: Sequence[tf.Tensor], sumsq: tf.Tensor, max_abs: tf.Tensor) -> tf.Tensor:
    """Whether the one pass's results are final for all ``tensors``: finite, and within ``L2_RTOL`` for float32."""
    floating = np.array([x.dtype.is_floating for x in tensors])
    narrow = np.array([x.dtype == tf.float32 for x in tensors])
    sizes = np.array([x.shape.num_elements() for x in tensors], np.float64)
    # A NaN or an infinity makes the sum of squares NaN or inf too.
    ok = tf.logical_or(tf.constant(~floating), tf.math.is_finite(sumsq))
    ok = tf.logical_and(ok, tf.logical_or(tf.constant(~narrow), _narrow_ok(sumsq, max_abs, sizes)))
    return tf.reduce_all(ok)


def _device_part(tensors: Sequence[tf.Tensor], fused: bool) -> List[tf.Tensor]:
    """The five fingerprint vectors; work beyond the one pass only when some result needs it.

    Large tensors are read one by one (``_column_partials``), small ones
    together (``_Block``). One condition for all of them decides whether any
    needs its NaN/Inf counts or its sum of squares again in float64.
    """
    alone, blocks = [], {}
    for i, x in enumerate(tensors):
        key = _block_key(x)
        if key is None:
            alone.append(i)
        else:
            blocks.setdefault(key, []).append(i)
    partials = [_column_partials(tensors[i], fused) for i in alone]
    picked, *singles = _finish_alone([tensors[i] for i in alone], partials, fused)
    alone = [alone[k] for k in picked]
    built = [(_Block([tensors[i] for i in members], dtype, row_words), members)
             for (dtype, row_words), members in blocks.items()]
    rows = [block.hash_max_sumsq(fused) for block, _ in built]
    # Results in the order [tensors read alone, then each block's rows]; one gather puts them back in
    # the order of ``tensors`` (slicing each row out of its block would cost XLA a kernel per row).
    order = np.array(alone + [i for _, members in built for i in members], np.int64)
    back = np.argsort(order)

    def ordered(alone_values, block_values):
        out = tf.concat(list(alone_values) + list(block_values), 0)
        return out if (order == np.arange(len(order))).all() else tf.gather(out, back)

    hashes, maxes, sums = (ordered(singles[k], [r[k] for r in rows]) for k in range(3))
    zeros = tf.zeros([len(tensors)], tf.int64)

    def fast():
        return tf.sqrt(sums), maxes, zeros, zeros

    def slow():
        out = []
        if alone:  # ``singles`` holds a vector per group, in the order of ``alone``
            alone_maxes, alone_sums = tf.concat(singles[1], 0), tf.concat(singles[2], 0)
            for j, i in enumerate(alone):
                x = tensors[i]
                out.append(_slow(x, 0, x.shape.num_elements(), alone_sums[j], alone_maxes[j], fused))
        per_block = [block.slow(r[2], r[1], fused) for (block, _), r in zip(built, rows)]
        return _with_barrier([ordered([tf.stack([o[k] for o in out])] if out else [], [b[k] for b in per_block])
                              for k in range(4)], fused)

    l2s, maxes, nans, infs = tf.cond(_fast_ok(tensors, sums, maxes), fast, slow)
    return [hashes, l2s, maxes, nans, infs]


@functools.partial(tf.function, jit_compile=True, autograph=False)
def _device_part_xla(tensors: Sequence[tf.Tensor]) -> List[tf.Tensor]:
    return _device_part(tensors, fused=_VARIADIC_REDUCE is not None)


def _dynamic_one(x: tf.Tensor, fused: bool) -> List[tf.Tensor]:
    """[hash, l2, max_abs, nan, inf] of a flat tensor whose length is known only at run time.

    An input batch of unknown size (a dataset batched without
    ``drop_remainder``), as large as a model's weights for images. It is read
    as ``_column_partials`` reads a tensor of known length: the bulk as
    ``SLICES`` slices side by side, whose partial results shrink ``SLICES``-fold
    twice, and the last few elements as one zero-padded row whose padding is
    left out of the hash. Only the lengths are unknown when the step is traced;
    XLA compiles the pass for each run-time shape.
    """
    flat = tf.cast(x, tf.uint8) if x.dtype == tf.bool else x
    dtype, width = flat.dtype, flat.dtype.size
    per_word = 8 // width
    n = tf.size(flat, out_type=tf.int64)
    unit = SLICES ** 3 * per_word  # the bulk: SLICES slices of a multiple of SLICES**2 words
    bulk = n // unit * unit
    gold = _u64(hashing.INDEX_MUL_64)

    # The bulk: word j (from 0) of slice s, column c is j = s * m + c, with index term (j + 1) * GOLDEN.
    main = tf.reshape(flat[:bulk], [SLICES, -1, per_word])
    m = tf.shape(main, out_type=tf.int64)[1]
    col = tf.cast(tf.range(SLICES, dtype=tf.int64) * m + 1, tf.uint64) * gold
    col = _with_barrier([col], fused)[0]  # see ``_index_terms``
    mixed = _mix64(_words(main) + tf.cast(tf.range(m, dtype=tf.int64), tf.uint64)[None, :] * gold + col[:, None])
    # float32: the 2 * SLICES squares of a column summed in float32, as for a tensor of known length.
    h, k, q = _reduce_slices(mixed, *_key_and_square(main), fused)
    cols = (h, k, tf.cast(q, tf.float64))
    for _ in range(2):
        cols = _reduce_slices(*(tf.reshape(t, [SLICES, -1]) for t in cols), fused)
    whole = _reduce_slices(*cols, fused)
    # The rest, fewer than ``unit`` elements, zero-padded to ``unit``: only its first words are the tensor's.
    rest = flat[bulk:]
    rest = tf.concat([rest, tf.zeros(tf.reshape(unit - tf.size(rest, out_type=tf.int64), [1]), dtype)], 0)
    pieces = tf.reshape(rest, [unit // per_word, per_word])
    c = tf.range(unit // per_word, dtype=tf.int64)
    mixed = _mix64(_words(pieces) + tf.cast(bulk // per_word + c + 1, tf.uint64) * gold)
    mixed = tf.where(c < (n - bulk + per_word - 1) // per_word, mixed, _u64(0))
    key, square = _key_and_square(pieces)
    last = _reduce_slices(mixed, key, tf.cast(square, tf.float64), fused)
    total = whole[0] + last[0] + _mix64(tf.cast(n, tf.uint64) * _u64(width))
    max_abs = _abs_value(tf.maximum(whole[1], last[1]), dtype)
    sumsq = whole[2] + last[2]
    zero = tf.zeros([], tf.int64)
    if not dtype.is_floating:
        return [tf.bitcast(total, tf.int64), tf.sqrt(sumsq), max_abs, zero, zero]
    size = tf.cast(n, tf.float64)
    ok = tf.math.is_finite(sumsq)
    if dtype == tf.float32:
        ok = tf.logical_and(ok, _narrow_ok(sumsq, max_abs, size))
    l2, max_abs, nan, inf = tf.cond(ok, lambda: (tf.sqrt(sumsq), max_abs, zero, zero),
                                    lambda: _with_barrier(_slow(flat, 0, size, sumsq, max_abs, fused), fused))
    return [tf.bitcast(total, tf.int64), l2, max_abs, nan, inf]


def _dynamic_part(tensors: Sequence[tf.Tensor], fused: bool) -> List[tf.Tensor]:
    rows = [_dynamic_one(x, fused) for x in tensors]
    return [tf.stack([r[k] for r in rows]) for k in range(5)]


# Compiled once per run-time shape (an epoch's last batch adds one more).
@functools.partial(tf.function, jit_compile=True, autograph=False, reduce_retracing=True)
def _dynamic_part_xla(tensors: Sequence[tf.Tensor]) -> List[tf.Tensor]:
    return _dynamic_part(tensors, fused=_VARIADIC_REDUCE is not None)


def fingerprint_all(tensors: Sequence[tf.Tensor], use_xla: bool = True) -> List[tf.Tensor]:
    """Fingerprints of ``tensors`` on the current device: [hash, l2, max_abs, nan, inf] vectors.

    Args:
        tensors: Tensors with static shapes, or shapes known only at run time
            (an input batch of unknown size), which take a second call.
        use_xla: Compile the hash, max |x| and counts with XLA (default);
            without it the same ops run as ordinary TensorFlow kernels.

    Returns:
        Five vectors, one entry per tensor: the hash (int64 holding the uint64
        bits), l2 and max |x| (float64), NaN and Inf counts (int64).
    """
    if not tensors:
        return [tf.zeros([0], tf.int64), tf.zeros([0], tf.float64), tf.zeros([0], tf.float64),
                tf.zeros([0], tf.int64), tf.zeros([0], tf.int64)]
    # Flat outside the compiled function: inside it, viewing an n-d tensor as slices
    # costs XLA an index computation per element that stops vectorization.
    tensors = [tf.convert_to_tensor(t) for t in tensors]
    tensors = [t if t.shape.rank == 1 else tf.reshape(t, [-1]) for t in tensors]
    static = [k for k, t in enumerate(tensors) if t.shape.is_fully_defined()]
    if len(static) == len(tensors):
        return _device_part_xla(tensors) if use_xla else _device_part(tensors, fused=False)
    dynamic = [k for k, t in enumerate(tensors) if not t.shape.is_fully_defined()]
    parts = _dynamic_part_xla([tensors[k] for k in dynamic]) if use_xla else _dynamic_part(
        [tensors[k] for k in dynamic], fused=False)
    if static:
        fixed = [tensors[k] for k in static]
        fixed = _device_part_xla(fixed) if use_xla else _device_part(fixed, fused=False)
        parts = [tf.concat([f, d], 0) for f, d in zip(fixed, parts)]
    # Back to the order of ``tensors``.
    order = np.argsort(np.array(static + dynamic, dtype=np.int64))
    return [tf.gather(p, order) for p in parts]
