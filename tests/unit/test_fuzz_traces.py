"""Fuzzing: damaged and hostile trace files never crash, hang or exhaust the analyzer.

Every case is a copy of a valid run (real TraceWriter) with one file damaged in
one of the ways ``tests/unit/tracefuzz.py`` lists. Both tools run in a
subprocess with a time and address-space limit; see ``tracefuzz.judge`` for
what each mutation class must produce. ``bench/bench_reliability.py --fuzz``
runs the same with 2,000+ cases.
"""

import collections
import io
import os
import contextlib

import h5py
import pytest

from tests.unit import tracefuzz
from tests.unit.tracegen import write_run
from tracer import schema
from tracer.bisect import main as bisect
from tracer.check import main as check
from tracer.writer import fixed_string

N_CASES = 240
CASE_TIMEOUT = 20.0


def run_fuzz(tmp_path, n, seed):
    good = write_run(tmp_path / "good", steps=12, replicas=2, full=True)
    cases = tracefuzz.make_cases(good, str(tmp_path / "cases"), n, seed=seed)
    results = tracefuzz.run_batch(cases, str(tmp_path), timeout=CASE_TIMEOUT * 10)
    return cases, results


def test_mutated_traces_get_a_clean_answer(tmp_path):
    cases, results = run_fuzz(tmp_path, N_CASES, seed=20240)
    assert len(cases) == N_CASES
    kinds = collections.Counter(c["kind"] for c in cases)
    assert set(kinds) == set(tracefuzz.MUTATIONS), "every mutation class is exercised"
    failures = []
    outcome = collections.Counter()
    for case in cases:
        res = results[case["id"]]
        problems = tracefuzz.judge(case, res)
        if problems:
            failures.append(f"case {case['id']} {case['kind']} ({case['what']}, file {case['file']}): "
                            + "; ".join(problems))
        else:
            outcome[(case["expect"], res["bisect"]["code"])] += 1
    assert not failures, "\n".join(failures[:10])
    # Memory stays bounded: the absurd shapes (2**40 rows) were refused, not allocated.
    peak = max(r["maxrss_mb"] for r in results.values())
    assert peak < 600, f"analyzer peak RSS {peak:.0f} MB"
    print(f"{len(cases)} mutated runs, outcomes (expectation, bisect exit): {dict(outcome)}, "
          f"peak RSS {peak:.0f} MB")


def test_judge_catches_a_traceback_and_a_hang():
    """The harness itself can fail: a traceback, a hang or an unnamed file are reported."""
    case = {"expect": "error", "file": "/x/replica-0.h5", "run": "/x"}
    ok = {"code": 2, "out": "", "err": "tracer.bisect: error: /x/replica-0.h5: bad\n", "exc": None}
    assert tracefuzz.judge(case, {"bisect": ok, "check": ok}) == []
    boom = dict(ok, exc="Traceback ...KeyError", code=None)
    assert "exception" in tracefuzz.judge(case, {"bisect": boom, "check": ok})[0]
    unnamed = dict(ok, err="tracer.check: error: something\n")
    assert "does not name the file" in tracefuzz.judge(case, {"bisect": ok, "check": unnamed})[0]
    assert tracefuzz.judge(case, {"hang": True}) == ["hang (no result within the time limit)"]
    silent = dict(ok, code=0, err="")
    assert "expected exit 2" in tracefuzz.judge(case, {"bisect": silent, "check": ok})[0]


def _capture(main, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_tensor_names_with_escape_sequences_are_escaped(tmp_path):
    a = write_run(tmp_path / "a", replicas=2)
    b = write_run(tmp_path / "b", replicas=2)
    for run in (a, b):
        for name in os.listdir(run):
            with h5py.File(os.path.join(run, name), "r+") as f:
                text = f[schema.META_TENSORS][()].decode()
                text = text.replace('"dense/bias"', '"dense/\\u001b[2J\\u001b[31mbias\\r\\u0007"')
                del f[schema.META_TENSORS]
                f[schema.META_TENSORS] = fixed_string(text)
    # Make the renamed tensor the origin of a divergence in B, so its name is printed.
    path = os.path.join(b, "replica-1.h5")
    with h5py.File(path, "r+") as f:
        specs = schema.decode_tensors(f[schema.META_TENSORS][()].decode())
        col = next(i for i, t in enumerate(specs) if t.kind == "local_grad" and "bias" in t.name)
        f["fingerprints/hash"][5, col] ^= 1
    code, out, err = _capture(bisect, [a, b])
    assert code == 1, out + err
    assert "\x1b" not in out and "\r" not in out and "\x07" not in out
    assert "dense/\\x1b[2J\\x1b[31mbias\\x0d\\x07" in out, out
    code, out, err = _capture(bisect, [a, b, "--json"])
    assert code == 1 and "\x1b" not in out  # JSON escapes control characters itself
    # One-line errors escape names too: --strict lists the tensors only one run has.
    for name in os.listdir(b):
        with h5py.File(os.path.join(b, name), "r+") as f:
            renamed = [t if t.kind != "weight" else schema.TensorSpec(t.kind, "\x1b]0;pwned\x07" + t.name,
                                                                      t.shape, t.dtype) for t in specs]
            del f[schema.META_TENSORS]
            f[schema.META_TENSORS] = fixed_string(schema.encode_tensors(renamed))
    code, out, err = _capture(bisect, [a, b, "--strict"])
    assert code == 2 and err.count("\n") == 1, err
    assert "\x1b" not in err and "\x07" not in err and "\\x1b]0;pwned\\x07" in err, err


@pytest.mark.parametrize("make", ["fifo", "dev_zero"])
def test_special_files_are_refused_without_blocking(tmp_path, make):
    run = write_run(tmp_path / "run", replicas=1)
    path = os.path.join(run, "replica-0.h5")
    os.remove(path)
    if make == "fifo":
        os.mkfifo(path)
    else:
        os.symlink("/dev/zero", path)
    code, out, err = _capture(check, [run])
    assert code == 2
    assert err.startswith(f"tracer.check: error: {path}: not a regular file"), err
