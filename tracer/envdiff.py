"""The environment diff: every run-level root attribute that differs between two runs."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping

from tracer import schema

_SKIP = schema.PER_FILE_ATTRS | {schema.ATTR_SCHEMA}


def env_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """``[{"key", "a", "b"}]`` for every attribute whose value differs (None = absent), sorted by key.

    Generic over whatever attributes the capture side wrote; only the
    per-file ones in ``schema.PER_FILE_ATTRS`` are skipped.
    """
    out = []
    for key in sorted(set(a) | set(b)):
        if key in _SKIP:
            continue
        va, vb = a.get(key), b.get(key)
        if va != vb:
            out.append({"key": key, "a": va, "b": vb})
    return out
