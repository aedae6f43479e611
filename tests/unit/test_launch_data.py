"""The embedded dataset and the .npz loader (numpy only, no TensorFlow)."""

import numpy as np
import pytest

from launch import data, make_default_data


def test_embedded_dataset_is_what_the_generator_makes(tmp_path):
    assert make_default_data.main(["--out", str(tmp_path / "d.npz")]) == 0
    shipped, fresh = data.load(), data.load(str(tmp_path / "d.npz"))
    assert shipped.sha256 == fresh.sha256
    assert (shipped.num_examples, shipped.num_features, shipped.num_classes) == (4096, 64, 10)
    assert shipped.x.dtype == np.float32 and shipped.y.dtype == np.int32
    assert set(np.unique(shipped.y)) == set(range(10))


def test_embedded_dataset_is_small():
    import os

    assert os.path.getsize(data.DEFAULT_PATH) < 1_000_000


def test_user_npz_is_converted(tmp_path):
    np.savez(tmp_path / "u.npz", x=np.arange(12, dtype=np.float64).reshape(6, 2), y=np.array([0, 1, 2, 0, 1, 2]))
    d = data.load(str(tmp_path / "u.npz"))
    assert (d.x.dtype, d.y.dtype, d.num_classes, d.num_features) == (np.float32, np.int32, 3, 2)
    assert repr(d) == "<Dataset 'u.npz' examples=6 features=2 classes=3>"


@pytest.mark.parametrize("arrays,match", [
    ({"x": np.zeros((4, 2))}, r"\['y'\] missing. Received keys: \['x'\]"),
    ({"x": np.zeros(4), "y": np.zeros(4, int)}, r"'x' must be a 2-D numeric array.*shape=\(4,\)"),
    ({"x": np.zeros((4, 2)), "y": np.zeros(4)}, r"'y' must be a 1-D integer array.*dtype=float64"),
    ({"x": np.zeros((4, 2)), "y": np.zeros(3, int)}, "x has 4, y has 3"),
    ({"x": np.zeros((2, 2)), "y": np.array([0, -1])}, r"min\(y\)=-1"),
    ({"x": np.full((2, 2), np.nan), "y": np.array([0, 1])}, "4 NaN/Inf"),
    ({"x": np.zeros((2, 2)), "y": np.array([0, 0])}, "at least 2 classes"),
    ({"x": np.zeros((2, 2)), "y": np.array([0, 3]), "num_classes": 2}, r"num_classes=2"),
])
def test_bad_arrays(tmp_path, arrays, match):
    np.savez(tmp_path / "b.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        data.load(str(tmp_path / "b.npz"))


def test_not_an_npz(tmp_path):
    (tmp_path / "t.npz").write_text("hello")
    with pytest.raises(ValueError, match=r"must be an \.npz file"):
        data.load(str(tmp_path / "t.npz"))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data file not found"):
        data.load(str(tmp_path / "nope.npz"))
