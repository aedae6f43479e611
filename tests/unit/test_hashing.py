"""Properties of the reference fingerprint (tracer.hashing), which the capture side reproduces."""

import numpy as np
import pytest

from tracer.hashing import fingerprint, tensor_hash, tensor_stats


def test_every_single_bit_flip_changes_the_hash():
    x = np.random.default_rng(1).standard_normal(37).astype(np.float32)
    base = tensor_hash(x)
    bits = x.view(np.uint32)
    for i in range(x.size):
        for b in range(32):
            y = bits.copy()
            y[i] ^= np.uint32(1 << b)
            assert tensor_hash(y.view(np.float32)) != base, (i, b)


def test_hash_depends_on_position_not_only_on_the_multiset_of_values():
    x = np.arange(16, dtype=np.float32)
    assert tensor_hash(x) != tensor_hash(x[::-1].copy())
    assert tensor_hash(np.float32([1, 2])) != tensor_hash(np.float32([2, 1]))


def test_signed_zero_nan_payload_and_length_are_distinguished():
    quiet = np.array([0x7FC00000], np.uint32).view(np.float32)
    payload = np.array([0x7FC00001], np.uint32).view(np.float32)
    assert tensor_hash(np.float32([0.0])) != tensor_hash(np.float32([-0.0]))
    assert tensor_hash(quiet) != tensor_hash(payload)
    assert tensor_hash(np.float32([1.0])) != tensor_hash(np.float32([1.0, 0.0]))


def test_no_collisions_among_many_random_small_perturbations():
    rng = np.random.default_rng(2)
    x = rng.standard_normal(1000).astype(np.float32)
    hashes = {(): tensor_hash(x)}
    for _ in range(2000):
        idx = tuple(sorted(set(rng.integers(0, x.size, size=rng.integers(1, 4)).tolist())))
        y = x.copy()
        y[list(idx)] = np.nextafter(y[list(idx)], np.float32(np.inf))
        hashes[idx] = tensor_hash(y)
    assert len(set(hashes.values())) == len(hashes)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int8", "int32", "int64", "uint8", "bool"])
def test_every_supported_dtype_hashes(dtype):
    x = (np.arange(11) % 3).astype(dtype)
    assert isinstance(tensor_hash(x), int)


def test_stats_report_nan_and_inf():
    l2, max_abs, nan, inf = tensor_stats(np.float32([3.0, 4.0]))
    assert (l2, max_abs, nan, inf) == (5.0, 4.0, 0, 0)
    l2, max_abs, nan, inf = tensor_stats(np.float32([np.nan, np.inf, 1.0]))
    assert np.isnan(l2) and np.isnan(max_abs) and (nan, inf) == (1, 1)
    assert tensor_stats(np.float32([-np.inf, 2.0]))[1:] == (np.inf, 0, 1)
    assert fingerprint(np.zeros(0, np.float32)) == (0, 0.0, 0.0, 0, 0)


def test_object_arrays_are_refused():
    with pytest.raises(ValueError, match="object"):
        tensor_hash(np.array([object()], dtype=object))
