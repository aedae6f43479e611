"""Tolerances: both the first bitwise difference and the first one beyond tolerance, with metric and threshold."""

import json
import math

import numpy as np
import pytest

from tests.unit.tracegen import Plant, _base, model_tensors, write_run
from tracer.bisect import main
from tracer.metrics import compare_full, compare_stats
from tracer.hashing import L2_RTOL, tensor_stats
from tracer.tolerance import Tolerance

# A round-off sized change at step 3 that vanishes, then a real one at step 8 that persists.
SMALL = Plant(3, "local_grad", "dense/kernel", replica=0, rel=2.5e-7, index=4, persist=False)
LARGE = Plant(8, "local_grad", "dense/bias", replica=1, rel=1e-2)


def bisect_json(capsys, *argv):
    rc = main([*map(str, argv), "--json"])
    return rc, json.loads(capsys.readouterr().out)


@pytest.fixture(params=[True, False], ids=["full", "fingerprints"])
def runs(request, tmp_path):
    a = write_run(tmp_path / "a", full=request.param)
    b = write_run(tmp_path / "b", plants=[SMALL, LARGE], full=request.param)
    return a, b, request.param


@pytest.mark.parametrize("flags, metric", [
    (["--ulp", "16"], "max_ulp"),
    (["--rtol", "1e-5"], "max(|a-b| - rtol*|x|)"),
    (["--rtol", "1e-5", "--atol", "1e-6"], "max(|a-b| - rtol*|x|)"),
    (["--auto"], "max|a-b|/max|x|"),
])
def test_first_bitwise_and_first_beyond_tolerance(runs, capsys, flags, metric):
    a, b, full = runs
    rc, d = bisect_json(capsys, a, b, *flags)
    assert rc == 1
    fb, first = d["first_bitwise"], d["first"]
    assert (fb["step"], fb["kind"], fb["tensor"], fb["replica"]) == (3, "local_grad", "dense/kernel", 0)
    assert fb["verdict"]["beyond"] is False and fb["verdict"]["metric"] == metric
    assert (d["first_step"], first["tensor"], first["replica"], d["cause"]) == (8, "dense/bias", 1, "numerics")
    assert first["verdict"]["beyond"] is True and first["verdict"]["metric"] == metric
    assert first["verdict"]["value"] > first["verdict"]["threshold"]
    assert fb["source"] == first["source"] == ("full" if full else "stats")
    if full:
        assert fb["n_diff"] == 1 and fb["max_ulp"] <= 4 and fb["first_index"] == [1, 1]


def test_text_prints_metric_and_threshold_of_both_verdicts(runs, capsys):
    a, b, _ = runs
    assert main([a, b, "--ulp", "16"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "tracer.bisect: DIVERGED: local_grad 'dense/bias' on replica 1 at step 8 (origin)"
    assert out[1].startswith("  verdict: max_ulp = ") and "> 16  [tolerance: max_ulp > 16]" in out[1]
    line = next(x for x in out if x.startswith("  first bitwise difference:"))
    assert "local_grad 'dense/kernel' on replica 0 at step 3" in line and "<= 16" in line


def test_only_round_off_differences_exit_0_but_are_reported(tmp_path, capsys):
    a = write_run(tmp_path / "a", full=True)
    b = write_run(tmp_path / "b", plants=[SMALL], full=True)
    rc, d = bisect_json(capsys, a, b, "--ulp", "8")
    assert rc == 0 and d["diverged"] is False and d["first"] is None
    assert d["first_bitwise"]["step"] == 3
    assert main([a, b]) == 1  # bitwise by default
    capsys.readouterr()


def test_noise_floor_from_a_repeated_run(tmp_path, capsys):
    a = write_run(tmp_path / "a")
    # The repeat of A differs by round-off from step 3 on: that is the noise floor.
    noise = write_run(tmp_path / "noise", plants=[Plant(3, "local_grad", "dense/kernel", replica=0, rel=1e-6)])
    b = write_run(tmp_path / "b", plants=[Plant(3, "local_grad", "dense/kernel", replica=0, rel=5e-7),
                                          Plant(8, "local_grad", "dense/bias", replica=1, rel=1e-2)])
    rc, d = bisect_json(capsys, a, b, "--noise", noise)
    assert rc == 1
    assert d["first_bitwise"]["step"] == 3 and d["first_bitwise"]["verdict"]["beyond"] is False
    assert (d["first_step"], d["first"]["tensor"]) == (8, "dense/bias")
    assert d["tolerance"]["mode"] == "noise"
    # A deterministic repeat (bitwise equal to A) makes every difference count.
    rc, d = bisect_json(capsys, a, b, "--noise", a)
    assert rc == 1 and d["first_step"] == 3


def test_auto_threshold_scales_with_eps_and_reduction_length(tmp_path, capsys):
    # 2.5e-7 relative on the tensor's largest element: max|a-b|/max|x| is 2.5e-7 too.
    spec = next(t for t in model_tensors() if (t.kind, t.name) == ("local_grad", "dense/kernel"))
    largest = int(np.argmax(np.abs(_base(spec, 3, 0, seed=0))))
    a = write_run(tmp_path / "a", full=True)
    b = write_run(tmp_path / "b", plants=[Plant(3, "local_grad", "dense/kernel", replica=0, rel=2.5e-7,
                                                index=largest, persist=False)], full=True)
    rc, d = bisect_json(capsys, a, b, "--auto", "--reduction-length", "1")
    assert rc == 1 and d["first_step"] == 3  # 2.5e-7 > eps(float32) * 1
    assert d["first"]["verdict"]["threshold"] == pytest.approx(2.0**-23)
    assert d["first"]["verdict"]["value"] == pytest.approx(2.5e-7, rel=0.3)  # float32 rounding of the change
    rc, d = bisect_json(capsys, a, b, "--auto")
    assert rc == 0 and d["tolerance"]["reduction_length"] == 16  # 8 (batch dim) x 2 replicas


def _sequential_sum(terms: np.ndarray, order) -> np.ndarray:
    """Float32 sum over axis 0, one term after the other in ``order`` (as a loop or a ring all-reduce adds)."""
    acc = np.zeros(terms.shape[1:], np.float32)
    for i in order:
        acc = acc + terms[i]
    return acc


def test_auto_bound_is_relative_to_the_tensors_scale_not_to_each_element():
    # The same 256-term sums in two orders: the round-off of each sum is bounded by eps * K * sum|terms|,
    # and the sums that cancel to nearly zero have a large relative error of their own.
    k = 256
    terms = np.random.default_rng(0).standard_normal((k, 64, 32)).astype(np.float32)
    a = _sequential_sum(terms, range(k))
    tol = Tolerance("auto", reduction_length=k)
    threshold = tol.threshold("float32")
    for b in (_sequential_sum(terms, reversed(range(k))),
              _sequential_sum(terms, range(k // 2)) + _sequential_sum(terms, range(k // 2, k))):
        d = compare_full(a, b, "float32")
        assert d.n_diff > 0 and d.max_rel > threshold  # element-wise, it would be called a divergence
        assert d.scaled_abs == pytest.approx(d.max_abs / float(np.abs(a).max()), rel=1e-3)
        v = tol.judge(d, "float32")
        assert not v.beyond and v.metric == "max|a-b|/max|x|" and v.value < threshold
    # A real change: 1e-3 relative on the largest element is far beyond round-off.
    changed = a.copy()
    i = np.unravel_index(np.argmax(np.abs(a)), a.shape)
    changed[i] *= np.float32(1 + 1e-3)
    v = tol.judge(compare_full(a, changed, "float32"), "float32")
    assert v.beyond and v.value == pytest.approx(1e-3, rel=1e-3)
    # From fingerprint statistics the metric is a lower bound, with the same threshold.
    stats = [dict(zip(("l2", "max_abs", "nan", "inf"), tensor_stats(x))) for x in (a, changed)]
    v = tol.judge(compare_stats(*stats, a.size, "float32"), "float32")
    assert v.beyond and v.value == pytest.approx(1e-3, rel=1e-3)


WIDE = model_tensors(variables=(("dense/kernel", (64, 32)), ("dense/bias", (32,)), ("out/kernel", (32, 2))))


@pytest.mark.parametrize("full", [True, False], ids=["full", "fingerprints"])
def test_auto_passes_reordered_sum_noise_and_fails_a_real_change(tmp_path, capsys, full):
    # Every element of an all-reduced gradient moves by up to 4 eps of the tensor's largest value, as when
    # 1 and 2 replicas add the same terms in another order; K = 64 x 2 replicas.
    noise = Plant(2, "allreduced_grad", "dense/kernel", replica=None, jitter=4 * 2.0**-23, persist=False)
    a = write_run(tmp_path / "a", tensors=WIDE, full=full)
    b = write_run(tmp_path / "b", tensors=WIDE, plants=[noise], full=full)
    rc, d = bisect_json(capsys, a, b, "--auto")
    fb = d["first_bitwise"]
    assert rc == 0 and d["first"] is None
    assert (fb["step"], fb["kind"], fb["tensor"], fb["cause"]) == (2, "allreduced_grad", "dense/kernel", "allreduce")
    assert fb["verdict"]["metric"] == "max|a-b|/max|x|" and fb["verdict"]["beyond"] is False
    threshold = 2.0**-23 * 128
    assert fb["verdict"]["threshold"] == pytest.approx(threshold)
    if full:
        assert fb["max_rel"] > threshold  # near-zero elements: element-wise, this noise would count
    # A real change on top, later: 1e-3 relative on the largest element of a weight.
    spec = next(t for t in WIDE if (t.kind, t.name) == ("weight", "out/kernel"))
    largest = int(np.argmax(np.abs(_base(spec, 6, 0, seed=0))))
    real = Plant(6, "weight", "out/kernel", replica=None, rel=1e-3, index=largest)
    c = write_run(tmp_path / "c", tensors=WIDE, plants=[noise, real], full=full)
    rc, d = bisect_json(capsys, a, c, "--auto")
    f = d["first"]
    assert rc == 1 and (f["step"], f["kind"], f["tensor"]) == (6, "weight", "out/kernel")
    assert f["verdict"]["beyond"] and f["verdict"]["value"] == pytest.approx(1e-3, rel=1e-2)
    assert d["first_bitwise"]["step"] == 2
    assert main([a, c, "--auto"]) == 1
    verdict = capsys.readouterr().out.splitlines()[1]
    assert verdict.startswith("  verdict: max|a-b|/max|x| = 0.000999 > 1.53e-05  [tolerance: auto: "
                              "max|a-b|/max|x| > 1 * eps(dtype) * K, K=128 (float32: 1.53e-05)]"), verdict


def test_nonfinite_is_always_beyond_tolerance(tmp_path, capsys):
    a = write_run(tmp_path / "a")
    b = write_run(tmp_path / "b", plants=[Plant(5, "loss", "loss", replica=1, value=np.inf)])
    rc, d = bisect_json(capsys, a, b, "--rtol", "1")
    assert rc == 1 and d["first_step"] == 5 and d["cause"] == "nonfinite"


def test_compare_full_metrics():
    a = np.array([[1.0, 2.0], [3.0, -0.0]], dtype=np.float32)
    b = a.copy()
    b[0, 1] = np.nextafter(np.float32(2.0), np.float32(3.0))
    b[1, 1] = 0.0
    d = compare_full(a, b, "float32")
    assert d.n_diff == 2 and d.first_index == (0, 1)
    assert d.max_ulp == 1 and d.max_abs == pytest.approx(2.0**-22)
    assert d.max_rel == pytest.approx(2.0**-22 / float(b[0, 1]))
    same = compare_full(a, a.copy(), "float32")
    assert same.n_diff == 0 and same.first_index is None and same.max_abs == 0
    c = a.copy()
    c[1, 0] = np.nan
    assert math.isinf(compare_full(a, c, "float32").max_abs)


def test_stats_bounds_never_exceed_the_truth():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = rng.standard_normal(50).astype(np.float32)
        b = (a * (1 + rng.standard_normal(50) * 10.0 ** rng.integers(-7, -1))).astype(np.float32)
        exact = compare_full(a, b, "float32")
        sa, sb = dict(zip(("l2", "max_abs", "nan", "inf"), tensor_stats(a))), dict(
            zip(("l2", "max_abs", "nan", "inf"), tensor_stats(b)))
        bound = compare_stats(sa, sb, a.size, "float32")
        assert bound.max_abs <= exact.max_abs * (1 + 1e-9) + 1e-12
        assert bound.max_rel <= exact.max_rel * (1 + 1e-9) + 1e-12
        assert bound.max_ulp <= exact.max_ulp


def test_stats_bounds_stay_below_the_truth_when_each_norm_carries_its_recorded_rounding():
    # The device's l2 may be off by a relative L2_RTOL (float32 partial sums); two tensors one ulp apart in one
    # element must not get a bound above that ulp from norms rounded in opposite directions.
    rng = np.random.default_rng(2)
    for _ in range(100):
        a = rng.standard_normal(4096).astype(np.float32)
        b = a.copy()
        k = int(rng.integers(a.size))
        b[k] = np.nextafter(b[k], np.float32(np.inf))
        exact = compare_full(a, b, "float32")
        sa, sb = (dict(zip(("l2", "max_abs", "nan", "inf"), tensor_stats(x))) for x in (a, b))
        for sign in (1, -1):
            ra, rb = dict(sa), dict(sb)
            ra["l2"] *= 1 + sign * L2_RTOL
            rb["l2"] *= 1 - sign * L2_RTOL
            bound = compare_stats(ra, rb, a.size, "float32")
            assert bound.max_abs <= exact.max_abs * (1 + 1e-9) + 1e-12


def test_tolerance_rejects_bad_values():
    with pytest.raises(ValueError, match=r"`rtol` must be a finite number >= 0. Received: rtol=-0.1"):
        Tolerance("allclose", rtol=-0.1)
    with pytest.raises(ValueError, match="`mode` must be one of"):
        Tolerance("fuzzy")


def test_scaled_abs_bound_from_statistics_never_exceeds_the_truth():
    rng = np.random.default_rng(1)
    for _ in range(200):
        a = rng.standard_normal(50).astype(np.float32)
        b = (a + rng.standard_normal(50) * 10.0 ** rng.integers(-7, -1)).astype(np.float32)
        exact = compare_full(a, b, "float32")
        stats = [dict(zip(("l2", "max_abs", "nan", "inf"), tensor_stats(x))) for x in (a, b)]
        bound = compare_stats(*stats, a.size, "float32")
        scale = max(np.abs(a).max(), np.abs(b).max())
        assert exact.scaled_abs == pytest.approx(exact.max_abs / scale, rel=1e-12)
        assert bound.scaled_abs <= exact.scaled_abs * (1 + 1e-9) + 1e-12
