"""The in-graph fingerprint equals the NumPy reference bit for bit, with and without XLA."""

import numpy as np
import pytest

from tracer.hashing import fingerprint

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
}


@pytest.mark.parametrize("use_xla", [True, False], ids=["xla", "no-xla"])
def test_in_graph_fingerprint_matches_reference(tf_cpus, use_xla):
    import tensorflow as tf

    from strategies.fingerprint import fingerprint_all

    names = list(CASES)

    @tf.function
    def run(tensors):
        return fingerprint_all(tensors, use_xla=use_xla)

    with tf.device(tf_cpus[1]):
        hashes, l2, max_abs, nan, inf = (v.numpy() for v in run([tf.constant(CASES[n]) for n in names]))
    for i, name in enumerate(names):
        ref_hash, ref_l2, ref_max, ref_nan, ref_inf = fingerprint(CASES[name])
        assert int(hashes[i:i + 1].view(np.uint64)[0]) == ref_hash, name
        np.testing.assert_allclose(l2[i], ref_l2, rtol=1e-5, equal_nan=True, err_msg=name)
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
