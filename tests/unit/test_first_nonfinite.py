"""bisect names where the first NaN/Inf appeared, also when the divergence started earlier with a finite change."""

import json

import numpy as np

from tests.unit.tracegen import Plant, write_run
from tracer.bisect import main


def bisect_json(capsys, *argv):
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_a_finite_change_then_a_nan_later(tmp_path, capsys):
    a = write_run(tmp_path / "a")
    b = write_run(tmp_path / "b", plants=[Plant(3, "optimizer_slot", "learning_rate", replica=None, rel=1e6),
                                          Plant(5, "local_grad", "dense/kernel", replica=1, value=np.nan)])
    code, d = bisect_json(capsys, a, b)
    assert code == 1
    assert (d["first"]["step"], d["first"]["tensor"], d["cause"]) == (3, "learning_rate", "optimizer")
    assert d["first_nonfinite"]["a"] is None
    assert {k: d["first_nonfinite"]["b"][k] for k in ("step", "kind", "tensor", "replica", "nan")} == {
        "step": 5, "kind": "local_grad", "tensor": "dense/kernel", "replica": 1, "nan": 1}
    main([a, b])
    assert ("first NaN/Inf: run B at step 5: local_grad 'dense/kernel' on replica 1 (nan=1, inf=0); "
            "run A has none") in \
        capsys.readouterr().out


def test_no_nonfinite_key_when_everything_is_finite(tmp_path, capsys):
    a = write_run(tmp_path / "a")
    b = write_run(tmp_path / "b", plants=[Plant(2, "weight", "dense/kernel", replica=None)])
    code, d = bisect_json(capsys, a, b)
    assert code == 1 and d["first_nonfinite"] is None
    main([a, b])
    assert "first NaN/Inf" not in capsys.readouterr().out
