"""Writes ``launch/data/default.npz``, the dataset the reference job ships with.

Run once; the output is committed. 4096 examples x 64 features, 10 classes:
Gaussian clusters around random class centres, plus a nonlinear term so the
MLP has something to learn for more than a few steps. Features are quantized
to multiples of 1/32 so the float32 bits compress well (the file stays well
under 1 MB) and are exactly representable: the data itself is never a source
of rounding differences.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import numpy as np

SEED = 20240611
NUM_EXAMPLES = 4096
NUM_FEATURES = 64
NUM_CLASSES = 10


def make(seed: int = SEED, n: int = NUM_EXAMPLES, f: int = NUM_FEATURES, c: int = NUM_CLASSES):
    """The default dataset's arrays, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, size=(c, f))
    y = rng.integers(0, c, size=n).astype(np.int32)
    x = centres[y] + rng.normal(0.0, 1.5, size=(n, f))
    x += 0.5 * np.sin(2.0 * x[:, ::-1])
    x = np.clip(np.round(x * 32.0) / 32.0, -8.0, 8.0).astype(np.float32)
    return {"x": x, "y": y, "num_classes": np.int32(c)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "data", "default.npz"))
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, **make(args.seed))
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
