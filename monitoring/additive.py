"""Merging what rollups hold: nested dicts, lists and numbers added element by element (no Django here, so the
drift benchmark can use it on its own)."""

from __future__ import annotations

from typing import Any


def add(a: Any, b: Any, sign: int = 1) -> Any:
    """``a + sign * b`` for nested dicts (by key), lists (element-wise) and numbers."""
    if b is None:
        return a
    if a is None:
        a = {} if isinstance(b, dict) else ([0] * len(b) if isinstance(b, list) else 0)
    if isinstance(b, dict):
        out = dict(a)
        for key, value in b.items():
            out[key] = add(out.get(key), value, sign)
        return out
    if isinstance(b, list):
        if len(a) != len(b):  # never for one version's bins; kept safe for hand-edited rows
            a = list(a) + [0] * (len(b) - len(a))
        return [x + sign * y for x, y in zip(a, b, strict=False)] + list(a[len(b):])
    result = a + sign * b
    return round(result, 9) if isinstance(result, float) else result
