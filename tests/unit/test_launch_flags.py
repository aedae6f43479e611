"""launch/train.py's flag parsing (no TensorFlow: the parser never imports it)."""

import os
import subprocess
import sys

import pytest

from launch import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("flag", ["--seed", "--shuffle-seed"])
def test_seeds_accept_an_integer_or_none(flag):
    dest = flag[2:].replace("-", "_")
    assert getattr(train.build_parser().parse_args([flag, "7"]), dest) == 7
    assert getattr(train.build_parser().parse_args([flag, "none"]), dest) is None
    assert getattr(train.build_parser().parse_args([flag, "None"]), dest) is None


def test_default_seeds_are_fixed():
    args = train.build_parser().parse_args([])
    assert (args.seed, args.shuffle_seed) == (1, 2)


def test_a_bad_seed_names_what_was_received(capsys):
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--seed", "abc"])
    assert "must be an integer or 'none' (unseeded). Received: 'abc'" in capsys.readouterr().err


def test_parsing_flags_does_not_start_tensorflow():
    # In a fresh interpreter: this process may already hold TensorFlow from another test.
    code = ("import sys; from launch import train; train.build_parser().parse_args(['--seed', 'none']); "
            "sys.exit('tensorflow' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60).returncode == 0
