"""Helpers for reading what an AppTest run shows (imported by the tests as a sibling module)."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

PAGES = ["overview", "latent", "meta_latent", "search", "stitching", "live"]


def texts(at: AppTest) -> str:
    """All text the page shows (markdown, titles, headers, captions, metrics, messages, link labels)."""
    parts = []
    for group in (at.title, at.header, at.subheader, at.markdown, at.caption, at.info, at.warning, at.error,
                  at.success):
        parts += [str(e.value) for e in group]
    parts += [f"{m.label}: {m.value}" for m in at.metric]
    parts += [pl.proto.label for pl in at.page_link]
    return "\n".join(parts)


def links(at: AppTest) -> list[tuple[str, str, str]]:
    """(page, label, query string) of every page link."""
    return [(pl.proto.page, pl.proto.label, pl.proto.query_string) for pl in at.page_link]
