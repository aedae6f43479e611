"""Bad input: one line on stderr naming the file, exit status 2, no traceback."""

import json
import os
import subprocess
import sys

import h5py
import pytest

from tests.unit.tracegen import Plant, model_tensors, write_run
from tracer.bisect import main


def error_line(capsys):
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""
    return lines[0]


@pytest.fixture
def good(tmp_path):
    return write_run(tmp_path / "good")


def test_missing_file(tmp_path, good, capsys):
    missing = str(tmp_path / "nope")
    assert main([good, missing]) == 2
    line = error_line(capsys)
    assert line.startswith(f"tracer.bisect: error: {missing}: no such file or directory. ")


def test_not_hdf5(tmp_path, good, capsys):
    bad = tmp_path / "replica-0.h5"
    bad.write_text("hello, not a trace\n")
    assert main([good, str(bad)]) == 2
    assert error_line(capsys).startswith(f"tracer.bisect: error: {bad}: not an HDF5 file")


def test_empty_directory(tmp_path, good, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([good, str(empty)]) == 2
    assert error_line(capsys).startswith(f"tracer.bisect: error: {empty}: no replica-<N>.h5 trace files")


@pytest.mark.parametrize("keep", [0.2, 0.9, 0.999])
def test_truncated_file(tmp_path, good, capsys, keep):
    src = os.path.join(write_run(tmp_path / "t", steps=40), "replica-0.h5")
    data = open(src, "rb").read()
    cut = tmp_path / "cut" / "replica-0.h5"
    cut.parent.mkdir()
    cut.write_bytes(data[: int(len(data) * keep)])
    assert main([good, str(cut)]) == 2
    line = error_line(capsys)
    assert line.startswith(f"tracer.bisect: error: {cut}: HDF5 file cannot be opened"), line
    assert "truncated" in line


CRASH = """
import os, sys
from tests.unit.tracegen import model_tensors, _stack, _value
from tracer.hashing import fingerprint
from tracer.writer import TraceWriter
specs = model_tensors()
w = TraceWriter(sys.argv[1], specs, attrs={"num_replicas": 1})
for s in range(30):
    w.write_step(s, _stack([fingerprint(_value(specs, j, s, 0, 0, [])) for j in range(len(specs))]))
w.flush()
os._exit(0)  # killed: the file keeps its SWMR open-for-write flag
"""


def test_killed_writer_is_readable_and_its_truncation_detected(tmp_path, capsys):
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    path = crashed / "replica-0.h5"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", CRASH, str(path)], check=True, cwd=root, timeout=120)
    ref = write_run(tmp_path / "ref", replicas=1, steps=30)
    assert main([ref, str(crashed), "--json"]) in (0, 1)
    assert "not closed cleanly" in capsys.readouterr().out
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 9 // 10])
    assert main([ref, str(crashed)]) == 2  # and no hang inside HDF5
    assert "truncated or corrupt" in error_line(capsys)


def test_unknown_schema_version(tmp_path, good, capsys):
    run = write_run(tmp_path / "future")
    path = os.path.join(run, "replica-1.h5")
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 99
    assert main([good, run]) == 2
    line = error_line(capsys)
    assert line.startswith(f"tracer.bisect: error: {path}: schema version 99 is not supported")


def test_models_with_nothing_in_common(tmp_path, good, capsys):
    other = model_tensors(variables=(("conv/kernel", (2, 2)),), batch=(3,))
    other = [t for t in other if t.kind not in ("input", "loss")] + [
        t for t in other if t.kind == "input"]
    other = [t for t in other if t.name != "batch[0]" and t.name not in ("iteration", "learning_rate")]
    run = write_run(tmp_path / "other", tensors=other)
    assert main([good, run]) == 2
    line = error_line(capsys)
    assert line.startswith(f"tracer.bisect: error: {os.path.join(run, 'replica-0.h5')}: no tensor in common")


def test_partly_different_models_are_an_error_with_strict(tmp_path, good, capsys):
    other = model_tensors(variables=(("dense/kernel", (4, 3)), ("dense/bias", (3,)), ("head/kernel", (3, 2))))
    run = write_run(tmp_path / "other", tensors=other)
    assert main([good, run, "--strict"]) == 2
    line = error_line(capsys)
    assert line.startswith(f"tracer.bisect: error: {os.path.join(run, 'replica-0.h5')}: the runs trace "
                           f"different tensors")
    assert "only in A: 4" in line and "weight head/kernel" in line


def test_disjoint_step_ranges(tmp_path, good, capsys):
    later = write_run(tmp_path / "later", first_step=100)
    assert main([good, later]) == 2
    line = error_line(capsys)
    assert line.startswith(f"tracer.bisect: error: {os.path.join(later, 'replica-0.h5')}: no step in common")
    assert "A has steps 0..11, B has steps 100..111" in line


def test_partial_step_ranges_are_an_error_with_strict(tmp_path, good, capsys):
    later = write_run(tmp_path / "later", first_step=5)
    assert main([good, later, "--strict"]) == 2
    assert "cover different steps" in error_line(capsys)


@pytest.mark.parametrize("change", ["shape", "dtype"])
def test_shape_or_dtype_mismatch(tmp_path, good, capsys, change):
    if change == "shape":
        tensors = model_tensors(variables=(("dense/kernel", (4, 3)), ("dense/bias", (4,)), ("out/kernel", (3, 2))))
        expected = "has shape [4] float32, expected [3] float32"
    else:
        tensors = model_tensors(dtype="float64")
        # The input (per-replica) is skipped with a note; the first global tensor is the error.
        expected = "allreduced_grad out/kernel has shape [3, 2] float64, expected [3, 2] float32"
    run = write_run(tmp_path / "other", tensors=tensors)
    assert main([good, run]) == 2
    line = error_line(capsys)
    assert line.startswith(f"tracer.bisect: error: {os.path.join(run, 'replica-0.h5')}: ")
    assert expected in line


def test_inputs_of_another_batch_shape_are_skipped_with_a_note(tmp_path, good, capsys):
    # Gradient accumulation: the same model fed micro-batches of 2 instead of batches of 8.
    run = write_run(tmp_path / "micro", tensors=model_tensors(batch=(2, 4)))
    assert main([good, run, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert any("per-replica tensor(s) have another shape" in n and "batch[0] [8, 4] float32 vs [2, 4] float32" in n
               for n in report["notes"]), report["notes"]
    assert report["tensors"]["compared"] == len(model_tensors()) - 1


def test_directory_mixing_two_runs(tmp_path, capsys):
    run = write_run(tmp_path / "mixed", replicas=2, run_id="first")
    write_run(tmp_path / "second", replicas=3, run_id="second")
    os.replace(tmp_path / "second" / "replica-2.h5", tmp_path / "mixed" / "replica-2.h5")
    assert main([run, run]) == 2
    line = error_line(capsys)
    assert "replica-2.h5: run_id is 'second' but" in line


def test_conflicting_tolerances_are_a_usage_error(tmp_path, good, capsys):
    with pytest.raises(SystemExit) as exc:
        main([good, good, "--ulp", "3", "--auto"])
    assert exc.value.code == 2
    assert "choose one tolerance" in capsys.readouterr().err


def test_unexpected_errors_are_not_swallowed(tmp_path, good, monkeypatch):
    import tracer.compare

    def boom(self):
        raise KeyError("bug in tracer")
    monkeypatch.setattr(tracer.compare.Comparison, "run", boom)
    with pytest.raises(KeyError, match="bug in tracer"):
        main([good, good])


def test_python_m_tracer_bisect_smoke(tmp_path):
    a = write_run(tmp_path / "a")
    b = write_run(tmp_path / "b", plants=[Plant(3, "input", "batch[0]", replica=1)])
    proc = subprocess.run([sys.executable, "-m", "tracer.bisect", a, b], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))), timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.startswith("tracer.bisect: DIVERGED: input 'batch[0]' on replica 1 at step 3 (origin)")
    assert proc.stderr == ""  # no progress bar off a terminal, no runpy warning
    proc = subprocess.run([sys.executable, "-m", "tracer.bisect", a, str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_analyzer_never_imports_tensorflow(tmp_path):
    a = write_run(tmp_path / "a")
    b = write_run(tmp_path / "b", plants=[Plant(3, "weight", "dense/bias", replica=None)])
    code = (
        "import sys\n"
        "import tracer\n"
        "assert 'tracer.bisect' not in sys.modules and 'tracer.check' not in sys.modules\n"
        "from tracer.bisect import main as bisect\n"
        "from tracer.check import main as check\n"
        f"assert bisect([{a!r}, {b!r}, '--json']) == 1\n"
        f"assert bisect([{a!r}, {b!r}, '--auto']) == 1\n"
        f"assert check([{a!r}]) == 0\n"
        "assert 'tensorflow' not in sys.modules, 'tracer imported tensorflow'\n"
        "assert not any(m.startswith(('tensorflow', 'keras')) for m in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_notes_count_the_tensors_actually_compared(tmp_path, good, capsys):
    # Accumulation: B traces micro-step gradients A lacks, and its input is a micro-batch (skipped).
    run = write_run(tmp_path / "micro", tensors=model_tensors(batch=(2, 4), accumulate=2))
    assert main([good, run, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    common = len(model_tensors())
    compared = report["tensors"]["compared"]
    assert compared == common - 1
    note = next(n for n in report["notes"] if n.startswith("the runs trace different tensors"))
    assert note.endswith(f"; compared {compared} of the {common} common tensors (1 of another shape is not)"), note
    assert main([good, run, "--strict"]) == 2
    assert error_line(capsys).endswith(f"Drop --strict to compare {compared} of the {common} common tensors "
                                       f"(1 of another shape is not)")
