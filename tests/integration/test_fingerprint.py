"""The in-graph fingerprint equals the NumPy reference bit for bit, with and without XLA."""

import ml_dtypes  # TensorFlow's own dependency, for bfloat16 in NumPy
import numpy as np
import pytest

from tracer.hashing import L2_RTOL, fingerprint

pytestmark = pytest.mark.tf

_RNG = np.random.default_rng(0)
CASES = {
    "f32 matrix": _RNG.standard_normal((64, 33)).astype(np.float32),
    "f32 odd length": _RNG.standard_normal((1023,)).astype(np.float32),
    "f32 signed zeros and non-finite": np.array([0.0, -0.0, np.nan, np.inf], np.float32),
    "f32 inf only": np.array([1.0, -np.inf], np.float32),
    "f32 scalar": np.float32(3.5),
    "f32 empty": np.zeros((0, 3), np.float32),
    "f64": _RNG.standard_normal((7,)),
    "f16": _RNG.standard_normal((5,)).astype(np.float16),
    "i64": np.arange(10, dtype=np.int64) - 4,
    "i32": np.array([1, -2, 3], np.int32),
    "u8": np.arange(13, dtype=np.uint8),
    "bool": np.array([True, False, True]),
    # Large enough for the sliced pass, with words left over and a partial last word.
    "f32 sliced, odd length": _RNG.standard_normal((8 * 256 * 2 * 3 + 17,)).astype(np.float32),
    "f32 sliced matrix with nan": np.where(_RNG.random((129, 257)) < 1e-3, np.nan,
                                           _RNG.standard_normal((129, 257))).astype(np.float32),
    "f32 sliced with -inf": np.concatenate([_RNG.standard_normal(5000), [-np.inf]]).astype(np.float32),
    "f64 sliced": _RNG.standard_normal((2049, 3)),
    "f16 sliced": _RNG.standard_normal((8 * 256 * 4 + 3,)).astype(np.float16),
    "bf16 sliced": _RNG.standard_normal((8 * 256 * 4 + 1,)).astype(ml_dtypes.bfloat16),
    "i32 sliced": _RNG.integers(-2**31, 2**31 - 1, 4099, dtype=np.int32),
    "u8 sliced": _RNG.integers(0, 255, 8 * 256 * 8 + 5, dtype=np.uint8),
    # float32 squares summed in float32 would overflow or underflow here: the pass must notice and use float64.
    "f32 sliced, squares overflow float32": (_RNG.standard_normal(5000) * 1e25).astype(np.float32),
    "f32 sliced, max|x| just above 2**62": np.concatenate([np.full(4999, 2.0 ** 62), [2.0 ** 63]]).astype(np.float32),
    "f32 sliced, squares underflow float32": (_RNG.standard_normal(5000) * 1e-25).astype(np.float32),
    "f32 sliced, mass in squares below float32's range": np.concatenate(
        [np.full(20000, 1e-20), [1e-18]]).astype(np.float32),
    "f32 scalar, square overflows float32": np.float32(3e38),
    # Whole slices and nothing left over, for a tensor of unknown length.
    "f32 whole slices, no rest": _RNG.standard_normal((3, 1024)).astype(np.float32),
    # Large enough to be read alone, not as a block's row.
    "f32 read alone, odd length": _RNG.standard_normal(2 ** 17 + 3).astype(np.float32),
    "f32 read alone, nan and inf": np.concatenate([_RNG.standard_normal(2 ** 17), [np.nan, -np.inf]]).astype(
        np.float32),
    "f32 read alone, squares overflow float32": (_RNG.standard_normal(2 ** 17 + 1) * 1e25).astype(np.float32),
    # Enough columns that the pass's partial results shrink once more before they are reduced.
    "f32 read alone, partials shrunk": _RNG.standard_normal(2 ** 21 + 3).astype(np.float32),
}


@pytest.mark.parametrize("use_xla, together, first_axis", [
    (True, True, "static"), (True, False, "static"), (False, True, "static"), (False, False, "static"),
    (True, True, "unknown"), (False, True, "unknown"),
], ids=["xla-one-call", "xla-call-per-tensor", "no-xla-one-call", "no-xla-call-per-tensor",
        "xla-one-call-unknown-first-axis", "no-xla-one-call-unknown-first-axis"])
def test_in_graph_fingerprint_matches_reference(tf_cpus, use_xla, together, first_axis):
    """One call for all cases takes the path for calls with a non-finite or out-of-range tensor;
    one call per case takes the one-pass path wherever that case allows it. With the first axis
    unknown when traced (a batch of unknown size), every tensor but the scalars takes the run-time
    shape path, and one call mixes both."""
    import tensorflow as tf

    from strategies.fingerprint import fingerprint_all

    names = list(CASES)
    signature = None
    if first_axis == "unknown":
        signature = [[tf.TensorSpec([None] * bool(np.ndim(CASES[n])) + list(np.shape(CASES[n])[1:]),
                                    tf.as_dtype(CASES[n].dtype)) for n in names]]

    @tf.function(input_signature=signature)
    def run(tensors):
        if together:
            return fingerprint_all(tensors, use_xla=use_xla)
        apart = [fingerprint_all([t], use_xla=use_xla) for t in tensors]
        return [tf.concat([a[k] for a in apart], 0) for k in range(5)]

    with tf.device(tf_cpus[1]):
        hashes, l2, max_abs, nan, inf = (v.numpy() for v in run([tf.constant(CASES[n]) for n in names]))
    for i, name in enumerate(names):
        ref_hash, ref_l2, ref_max, ref_nan, ref_inf = fingerprint(CASES[name])
        assert int(hashes[i:i + 1].view(np.uint64)[0]) == ref_hash, name
        np.testing.assert_allclose(l2[i], ref_l2, rtol=L2_RTOL, equal_nan=True, err_msg=name)
        np.testing.assert_equal(max_abs[i], ref_max, err_msg=name)
        assert (nan[i], inf[i]) == (ref_nan, ref_inf), name


def test_nan_payloads_and_signed_zero_change_the_in_graph_hash(tf_cpus):
    import tensorflow as tf

    from strategies.fingerprint import fingerprint_all

    quiet = np.array([np.nan], np.float32)
    payload = np.array([0x7FC00001], np.uint32).view(np.float32)
    values = [np.float32([0.0]), np.float32([-0.0]), quiet, payload]
    hashes = fingerprint_all([tf.constant(v) for v in values])[0].numpy()
    assert len(set(hashes.tolist())) == 4


@pytest.mark.parametrize("shapes, length", [
    ([(2 ** 17,), (2 ** 17 + 8,)], "known"), ([(1024,), (1024,)], "known"), ([(2 ** 17,), (10,)], "known"),
    ([(2 ** 17 + 3,)], "unknown"),
], ids=["read-alone-only", "one-block", "alone-and-block", "length-known-at-run-time"])
def test_rare_branch_stays_conditional(tf_cpus, shapes, length):
    """The NaN/Inf and float64 branch is a conditional in the compiled pass, whatever the mix of tensors.

    XLA turns a condition whose branches hold only element-wise ops and reductions into a select that
    computes both every call: a second full pass over every byte, at about half the pass's cost again.
    """
    import tensorflow as tf

    from strategies import fingerprint

    tensors = [tf.zeros(s, tf.float32) for s in shapes]
    compiled = fingerprint._device_part_xla if length == "known" else fingerprint._dynamic_part_xla
    hlo = compiled.experimental_get_compiler_ir(tensors)(stage="optimized_hlo")
    assert "conditional(" in hlo
