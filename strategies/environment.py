"""The run environment recorded in every trace file's root attributes.

Two runs that should agree but do not very often differ here first: a version,
an environment variable that changes kernels, a flag, a device. Everything is
gathered once per process, as plain strings and numbers.
"""

from __future__ import annotations

import os
import platform
import re
import socket
import sys
from typing import Any, Dict

import h5py
import numpy as np
import tensorflow as tf

_NUMERICS_ENV = re.compile(
    r"^(TF_.*|XLA_FLAGS|OMP_.*|MKL_.*|KMP_.*|OPENBLAS_.*|CUDA_VISIBLE_DEVICES|NCCL_.*|CUBLAS_.*|CUDNN_.*"
    r"|NVIDIA_TF32_OVERRIDE|PYTHONHASHSEED|HOROVOD_.*)$")
_SKIP_ENV = frozenset({"TF_CONFIG"})  # carries host:port lists that always differ


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def numerics_env() -> Dict[str, str]:
    """Environment variables known to change TensorFlow numerics or placement."""
    return {k: v for k, v in sorted(os.environ.items()) if _NUMERICS_ENV.match(k) and k not in _SKIP_ENV}


def collect() -> Dict[str, Any]:
    """Process-wide environment: versions, build, devices, host, numerics flags."""
    import keras  # noqa: PLC0415 - only the capture side needs it

    try:
        build = {k: str(v) for k, v in tf.sysconfig.get_build_info().items()}
    except Exception:  # noqa: BLE001 - build info is best effort on exotic builds
        build = {}
    try:
        determinism = bool(tf.config.experimental.is_op_determinism_enabled())
    except AttributeError:
        determinism = False
    from tracer import __version__  # noqa: PLC0415

    return {
        "versions": {
            "tracer": __version__,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "numpy": np.__version__,
            "h5py": h5py.__version__,
            "hdf5": h5py.version.hdf5_version,
            "python": platform.python_version(),
        },
        "tf_build": build,
        "devices": sorted(d.name for d in tf.config.list_logical_devices()),  # each worker lists itself first
        "physical_devices": [f"{d.device_type}:{d.name}" for d in tf.config.list_physical_devices()],
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "env": numerics_env(),
        "op_determinism": determinism,
        "xla_auto_jit": str(tf.config.optimizer.get_jit() or ""),
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
        "command_line": list(sys.argv),
    }
