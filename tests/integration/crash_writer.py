"""A process that writes a trace with the real TraceWriter until it is killed (TF-free crash victim).

``python -m tests.integration.crash_writer PATH FLUSH_EVERY [STEPS]`` writes the small
model of ``tracegen`` with full tensors every step (the heaviest write
pattern), values known by construction, and prints ``handed <step>`` on stdout
after handing each step to the writer, so the killer knows how many steps
the process had produced when it died.
"""

import sys

from tests.unit.tracegen import _stack, _value, model_tensors
from tracer.config import CaptureConfig
from tracer.hashing import fingerprint
from tracer.writer import TraceWriter

VARIABLES = (("dense/kernel", (64, 48)), ("dense/bias", (48,)), ("out/kernel", (48, 10)))
SEED = 7

def tensors():
    return model_tensors(variables=VARIABLES, batch=(32, 64))

def expected(step: int, specs=None):
    """The full tensors of ``step``, as the victim wrote them."""
    specs = specs or tensors()
    return [_value(specs, j, step, 0, SEED, []) for j in range(len(specs))]

def main(argv):
    path, flush_every = argv[0], int(argv[1])
    steps = int(argv[2]) if len(argv) > 2 else 10**6
    specs = tensors()
    config = CaptureConfig(mode="full", flush_every=flush_every)
    with TraceWriter(path, specs, attrs={"num_replicas": 1, "replica": 0}, config=config) as w:
        init = [expected(0, specs)[c] for c in w.initial_columns]
        w.write_initial(0, _stack([fingerprint(x) for x in init]), init)
        for s in range(steps):
            vals = expected(s, specs)
            w.write_step(s, _stack([fingerprint(x) for x in vals]), vals)
            sys.stdout.write(f"handed {s}\n")
            sys.stdout.flush()

if __name__ == "__main__":
    main(sys.argv[1:])
