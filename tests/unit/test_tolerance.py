"""Tolerances: both the first bitwise difference and the first one beyond tolerance, with metric and threshold."""

import json
import math

import numpy as np
import pytest

from tests.unit.tracegen import Plant, write_run
from tracer.bisect import main
from tracer.metrics import compare_full, compare_stats
from tracer.hashing import tensor_stats
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
    (["--auto"], "max_rel"),
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
    a = write_run(tmp_path / "a", full=True)
    b = write_run(tmp_path / "b", plants=[SMALL], full=True)
    rc, d = bisect_json(capsys, a, b, "--auto", "--reduction-length", "1")
    assert rc == 1 and d["first_step"] == 3  # 2.5e-7 > eps(float32) * 1
    assert d["first"]["verdict"]["threshold"] == pytest.approx(2.0**-23)
    rc, d = bisect_json(capsys, a, b, "--auto")
    assert rc == 0 and d["tolerance"]["reduction_length"] == 16  # 8 (batch dim) x 2 replicas


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


def test_tolerance_rejects_bad_values():
    with pytest.raises(ValueError, match=r"`rtol` must be a finite number >= 0. Received: rtol=-0.1"):
        Tolerance("allclose", rtol=-0.1)
    with pytest.raises(ValueError, match="`mode` must be one of"):
        Tolerance("fuzzy")
