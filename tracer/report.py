"""Render a comparison for people (text, verdict first) and for programs (one JSON object).

Tensor names and attribute values come from files: they are data, and every
control character is escaped before it reaches a terminal.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Dict, List, Optional, Sequence

from tracer.causes import CAUSES

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
SPARK = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 60


def escape(text: Any) -> str:
    """``text`` as a string with control characters shown as ``\\xNN`` / ``\\uNNNN``."""
    s = text if isinstance(text, str) else str(text)

    def sub(m):
        c = ord(m.group(0))
        return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
    return _CONTROL.sub(sub, s)


def num(x) -> str:
    """Short human form of a metric."""
    if x is None:
        return "?"
    if isinstance(x, str):
        return x
    x = float(x)
    if math.isinf(x) or math.isnan(x):
        return str(x)
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.3g}"


def sparkline(values: Sequence[float], width: int = SPARK_WIDTH) -> str:
    """Log-scale sparkline of non-negative values, folded (max) to at most ``width`` characters."""
    vals = [float(v) if not isinstance(v, str) else math.inf for v in values]
    if not vals:
        return ""
    if len(vals) > width:
        per = -(-len(vals) // width)
        vals = [max(vals[i:i + per]) for i in range(0, len(vals), per)]
    finite = [v for v in vals if 0 < v < math.inf]
    if not finite:
        return "".join("█" if v == math.inf else " " for v in vals)
    lo, hi = math.log10(min(finite)), math.log10(max(finite))
    linear = hi - lo < 1.0  # within one decade a log scale only magnifies jitter
    out = []
    for v in vals:
        if v <= 0:
            out.append(" ")
        elif v == math.inf:
            out.append("!")
        else:
            t = v / 10**hi if linear else (math.log10(v) - lo) / (hi - lo)
            out.append(SPARK[min(len(SPARK) - 1, int(t * (len(SPARK) - 1) + 0.5))])
    return "".join(out)


def where(f: Dict[str, Any]) -> str:
    """``local_grad 'dense/kernel' on replica 2 at step 17`` for a finding dict."""
    name = escape(f["tensor"])
    micro = f" (micro-step {f['micro_step']})" if f.get("micro_step", -1) >= 0 else ""
    when = (f"before the first update (initial snapshot, step {f['step']})" if f.get("snapshot") == "initial"
            else f"at step {f['step']}")
    return f"{f['kind']} '{name}'{micro} on replica {f['replica']} {when}"


def magnitude(f: Dict[str, Any]) -> str:
    parts = []
    if f.get("shapes"):
        parts.append(f"shapes differ (run A {tuple(f['shapes'][0])}, run B {tuple(f['shapes'][1])}): elements "
                     f"on one side only count as differing without bound")
    if f.get("n_diff") is not None:
        parts.append(f"n_diff={f['n_diff']}/{f['size']}")
    parts += [f"max_abs={num(f['max_abs'])}", f"max_rel={num(f['max_rel'])}", f"max_ulp={num(f['max_ulp'])}"]
    if f.get("first_index"):  # None without full tensors, [] for a scalar
        parts.append(f"first differing index {tuple(f['first_index'])}")
    if f.get("nonfinite"):
        parts.append(f"nonfinite mismatches={f['nonfinite']}")
    src = ("from full tensors" if f.get("source") == "full" else
           "lower bounds from fingerprint statistics; full tensors at this step would give n_diff, exact values "
           "and the first differing index")
    return ", ".join(parts) + f" ({src})"


def _span(steps: dict, short: bool = False) -> str:
    """``N steps (a..b)``, or ``N (a..b)`` when ``short``; a trace without steps says so."""
    if not steps["count"]:
        return "0 (no step recorded)" if short else "no step (none recorded)"
    return f"{steps['count']}{'' if short else ' steps'} ({steps['first']}..{steps['last']})"


def render_text(d: Dict[str, Any], prog: str = "tracer.bisect") -> str:
    """The human report of a comparison dict (``Result.to_dict()``), verdict first."""
    lines: List[str] = []
    first, fb = d["first"], d["first_bitwise"]
    steps = d["steps_compared"]
    tol = d["tolerance"]
    check = prog == "tracer.check"
    snap = d.get("search") == "full-snapshots"
    if first:
        verdict = "REPLICAS DISAGREE" if check else "DIVERGED"
        if snap and d["bracket"][0] is not None:
            verdict += f" between step {d['bracket'][0]} and step {d['bracket'][1]}"
        lines.append(f"{prog}: {verdict}: {where(first)} (origin"
                     + (")" if not snap or d["exact"] else " in that snapshot)"))
        lines.append(f"  verdict: {first['verdict']['text']}  [tolerance: {tol_text(tol)}]")
        if snap:
            lines.append(f"  search: {bracket_text(d)}")
        c = CAUSES[first["cause"]]
        lines.append(f"  cause: {first['cause']}: {c.explanation}")
        if first.get("detail"):
            lines.append(f"         {escape(first['detail'])}")
        lines.append(f"  next: {first.get('next_step') or c.next_step}")
        lines.append(f"  magnitude: {magnitude(first)}")
        if first["replicas"] and len(first["replicas"]) > 1:
            lines.append(f"  replicas where it differs: {first['replicas']}")
        if first["n_inherited"]:
            shown = ", ".join(f"{x['kind']} '{escape(x['tensor'])}'" for x in first["inherited"][:4])
            more = f" and {first['n_inherited'] - 4} more" if first["n_inherited"] > 4 else ""
            lines.append(f"  inherited at the same step: {first['n_inherited']} tensor(s): {shown}{more}")
    nonfinite = d.get("first_nonfinite")
    if first and nonfinite:
        seen = [f"run {run.upper()} at step {x['step']}: {where(dict(x, snapshot='step')).rsplit(' at step', 1)[0]} "
                f"(nan={x['nan']}, inf={x['inf']})" for run, x in sorted(nonfinite.items()) if x]
        clean = [f"run {run.upper()} has none" for run, x in sorted(nonfinite.items()) if not x]
        lines.append(f"  first NaN/Inf: {'; '.join(seen + clean)}")
    if check and not first:
        lines.append(f"{prog}: all replicas agree bitwise on allreduced_grad, optimizer_slot and weight in "
                     f"{_span(steps)}")
    elif not first and snap:
        lines.append(f"{prog}: no divergence beyond tolerance at the last of {steps['count']} common full "
                     f"snapshots (steps {steps['first']}..{steps['last']}), so none before it either under the "
                     f"assumption below [tolerance: {tol_text(tol)}]")
    elif not first:
        lines.append(f"{prog}: no divergence beyond tolerance in {_span(steps)} [tolerance: {tol_text(tol)}]")
    if fb and (not first or (fb["step"], fb["kind"], fb["tensor"], fb["snapshot"]) !=
               (first["step"], first["kind"], first["tensor"], first["snapshot"])):
        lines.append(f"  first bitwise difference: {where(fb)}; {fb['verdict']['text']} (cause if it mattered: "
                     f"{fb['cause']})")
        lines.append(f"    magnitude: {magnitude(fb)}")
    elif not fb and snap:
        lines.append("  every full tensor of the snapshots read is equal (bitwise identical)")
    elif not fb:
        lines.append("  every compared fingerprint hash is equal (bitwise identical)")
    div = d["divergent_steps"]
    if snap:
        sn = d["snapshots"]
        lines.append(f"  snapshots read: {sn['read']} of {sn['common']} common full snapshots (steps "
                     f"{steps['first']}..{steps['last']}; log2 = {sn['log2_common']}), "
                     f"{d['tensors']['compared']} tensors, replica pairs {d['tensors']['replica_pairs']}")
        lines.append(f"  assumption: {d['assumption']}")
    else:
        lines.append(f"  steps compared: {_span(steps, short=True)}, "
                     f"{d['tensors']['compared']} tensors, replica pairs {d['tensors']['replica_pairs']}; "
                     f"bitwise-different steps: {div['count']}"
                     + (f" ({div['first']}..{div['last']})" if div["count"] else ""))
    g = d.get("growth")
    if g and g["values"]:
        src = "full tensors" if g["source"] == "full" else "fingerprint statistics, lower bound"
        per = f", {g['bucket']} steps per point" if g.get("bucket", 1) > 1 else ""
        lines.append(f"  growth of max|dw|/max|w| from step {g['steps'][0]} ({src}{per}):")
        lines.append(f"    {num(g['values'][0])} {sparkline(g['values'])} {num(g['values'][-1])}"
                     f"  (max {num(max(_f(v) for v in g['values']))})")
    env = d["env_diff"]
    if env:
        lines.append(f"  environment diff ({len(env)}):")
        for e in env[:40]:
            lines.append(f"    {escape(e['key'])}: {escape(_short(e['a']))} -> {escape(_short(e['b']))}")
        if len(env) > 40:
            lines.append(f"    ... {len(env) - 40} more (see --json)")
    else:
        lines.append("  environment diff: none")
    for note in d["notes"]:
        lines.append(f"  note: {escape(note)}")
    return "\n".join(lines) + "\n"


def bracket_text(d: Dict[str, Any]) -> str:
    """``diverged between step X and step Y`` of a full-snapshot search."""
    lo, hi = d["bracket"]
    sn = d["snapshots"]
    if d["first"]["snapshot"] == "initial":
        where_ = f"diverged before the first update (initial snapshot, step {hi})"
    elif lo is None:
        where_ = f"diverged at or before step {hi} (the first common full snapshot already differs)"
    else:
        where_ = f"diverged between step {lo} and step {hi} (last equal and first different full snapshot)"
        if not d["exact"]:
            where_ += "; the fingerprint scan would name the exact step"
    return f"{where_}; binary search read {sn['read']} of {sn['common']} full snapshots"


def _f(v) -> float:
    return math.inf if isinstance(v, str) else float(v)


def _short(v: Optional[Any], limit: int = 120) -> str:
    s = "(absent)" if v is None else repr(v) if isinstance(v, str) else str(v)
    return s if len(s) <= limit else s[:limit - 3] + "..."


def tol_text(tol: Dict[str, Any]) -> str:
    mode = tol["mode"]
    if mode == "bitwise":
        return "bitwise"
    if mode == "ulp":
        return f"max_ulp > {tol['threshold']}"
    if mode == "allclose":
        return f"|a-b| > atol + rtol*|x|, rtol={tol['rtol']:g}, atol={tol['atol']:g}"
    if mode == "auto":
        return (f"auto: {tol['metric']} > {tol['factor']:g} * eps(dtype) * K, K={tol['reduction_length']} "
                f"(float32: {num(tol['thresholds']['float32'])})")
    return f"noise: max_rel > {tol['factor']:g} * max_rel(A, repeat of A)"


def _jsonable(x: Any) -> Any:
    """Strict JSON: non-finite floats become strings ("inf", "nan"), unknown objects their str()."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def render_json(d: Dict[str, Any]) -> str:
    return json.dumps(_jsonable(d), indent=2, allow_nan=False)
