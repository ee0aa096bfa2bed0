"""Tokens and numbers as plain text: what view models put in labels and sentences (no HTML here)."""

from __future__ import annotations

import functools
import math
import unicodedata
from typing import Any

import numpy as np

MISSING = "—"  # a value the atlas does not have
_MARKERS = ("\u0120", "\u2581", "\u010a")


def show_token(tok: Any) -> str:
    """A token as readable text: BPE space markers become spaces, newlines ⏎, control bytes \\xNN."""
    if tok is None:
        return ""
    s = str(tok)
    if s.isprintable() and not any(m in s for m in _MARKERS):  # the common case, at C speed
        return s
    return _show_special(s)


@functools.lru_cache(maxsize=65536)
def _show_special(s: str) -> str:
    s = s.replace("\u0120", " ").replace("\u2581", " ").replace("\u010a", "\n")
    out = []
    for ch in s:
        if ch == "\n":
            out.append("⏎")
        elif ch == "\t":
            out.append("⇥")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def fmt(x: Any, digits: int = 4) -> str:
    """A number for a metric: significant digits, '—' for missing values."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return MISSING
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    v = float(x)
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e7):  # compact: metrics have little room
        return f"{v:.{max(digits - 2, 1)}e}"
    return f"{v:.{digits}g}"


def number(x: Any) -> float | None:
    """A finite float, or None for anything else (missing, NaN, not a number)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def latent_name(width: int, latent: int, label: Any = None) -> str:
    """'128/7 · label' — how a latent is named in links."""
    base = f"{int(width)}/{int(latent)}"
    return f"{base} · {show_token(label)}" if label else base
