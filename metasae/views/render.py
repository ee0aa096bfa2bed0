"""HTML snippets and tables for display or download; the one place the dashboard escapes text into HTML."""

from __future__ import annotations

import html
import io
import math
from typing import Any

import pandas as pd

from metasae.views.text import MISSING, fmt, show_token


def token_chips(tokens: list[Any] | None, limit: int = 10) -> str:
    """HTML chips for a list of tokens (escaped; leading/trailing spaces shown as ␣)."""
    if not tokens:
        return "<span style='color:#888'>none</span>"
    chips = []
    for t in list(tokens)[:limit]:
        s = show_token(t)
        s = ("␣" + s[1:] if s.startswith(" ") else s) or "∅"
        chips.append(f"<code style='margin:0 4px 4px 0;display:inline-block'>{html.escape(s)}</code>")
    return "".join(chips)


def example_html(tokens: list[Any], acts: list[float] | None, position: int | None, scale: float | None) -> str:
    """One example as HTML: each token shaded by its activation (orange), the max token outlined."""
    acts = list(acts or [0.0] * len(tokens))
    top = scale if scale and scale > 0 else max([a for a in acts if a is not None] + [1e-12])
    spans = []
    for j, (t, a) in enumerate(zip(tokens, acts, strict=False)):
        a = 0.0 if a is None or not math.isfinite(a) else float(a)
        alpha = min(max(a / top, 0.0), 1.0) if top > 0 else 0.0
        style = f"background:rgba(255,140,0,{alpha:.2f});white-space:pre;border-radius:3px;padding:0 1px"
        if j == position:
            style += ";outline:2px solid #c0392b"
        spans.append(f"<span title='{a:.4g}' style='{style}'>{html.escape(show_token(t))}</span>")
    return "<div style='font-family:monospace;line-height:1.9;font-size:0.92em'>" + "".join(spans) + "</div>"


def to_csv(df: pd.DataFrame) -> bytes:
    """A table as CSV bytes (what a download button hands out); lists are kept as their text."""
    return df.to_csv(index=False).encode()


def to_parquet(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.reset_index(drop=True).to_parquet(buf, index=False)
    return buf.getvalue()


def styled(df: pd.DataFrame, column_config: dict[str, Any] | None = None) -> Any:
    """The table with missing values drawn as '—' (Streamlit shows 'None'); numbers keep their column format."""
    fmts: dict[str, Any] = {}
    for col in df.columns:
        cfg = (column_config or {}).get(col)
        spec = (cfg or {}).get("type_config", {}).get("format") if isinstance(cfg, dict) else None
        if pd.api.types.is_numeric_dtype(df[col]) and not pd.api.types.is_bool_dtype(df[col]):
            fmts[col] = _printf(spec) if spec else (lambda v: fmt(v, 4))
    if not len(df) or not (df.isna().to_numpy().any() or fmts):
        return df
    return df.style.format(fmts, na_rep=MISSING)


def _printf(spec: str) -> Any:
    """A printf-style column format ('%.3f', '%d', '%.2e') as a function."""

    def f(v: Any) -> str:
        try:
            return spec % (int(v) if spec.endswith("d") else float(v))
        except (TypeError, ValueError):
            return str(v)

    return f
