"""Search page: text, meta-latent and decomposability searches with the inputs checked and empty results
explained (the index itself is ``metasae.search``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from metasae.app_state import BadInput, clean_query
from metasae.atlas import UnknownLatentError


@dataclass
class SearchResult:
    results: pd.DataFrame
    message: str | None = None  # shown as info (empty query / no match)
    warning: str | None = None  # shown as warning (query cut)


def text_search(index: Any, query: str | None, widths: list[int] | None = None, kind: str | None = None,
                min_density: float | None = None, max_density: float | None = None,
                min_delta_mse: float | None = None, max_delta_mse: float | None = None,
                limit: int = 100) -> SearchResult:
    """Free-text search with the query cleaned first; empty queries and no matches come back as messages."""
    q, warning = clean_query(query)
    if not q:
        return SearchResult(pd.DataFrame(), "Type a word to search labels, top tokens and example text "
                                            "(e.g. a token the latent fires on).", warning)
    if min_density is not None and max_density is not None and min_density > max_density:
        raise BadInput(f"The minimum density ({min_density:g}) is above the maximum ({max_density:g}).")
    if min_delta_mse is not None and max_delta_mse is not None and min_delta_mse > max_delta_mse:
        raise BadInput(f"The minimum ΔMSE ({min_delta_mse:g}) is above the maximum ({max_delta_mse:g}).")
    res = index.text(q, widths=widths or None, kind=kind or None, min_density=min_density,
                     max_density=max_density, min_delta_mse=min_delta_mse, max_delta_mse=max_delta_mse, limit=limit)
    msg = None if len(res) else f"No latent matches {q[:80]!r} with these filters."
    return SearchResult(res, msg, warning)


def meta_search(index: Any, metas: list[int], min_weight: float = 0.0, widths: list[int] | None = None,
                limit: int = 100) -> SearchResult:
    """Latents whose decomposition holds every meta-latent in ``metas`` with weight >= ``min_weight``."""
    if not metas:
        return SearchResult(pd.DataFrame(), "Pick one or more meta-latents: the results are the latents whose "
                                            "decomposition holds all of them.")
    try:
        res = index.by_meta(list(metas), min_weight=float(min_weight), widths=widths or None, limit=limit)
    except UnknownLatentError as e:
        raise BadInput(str(e)) from None
    msg = None if len(res) else "No latent holds all of these meta-latents at that weight."
    return SearchResult(res, msg)


def decomp_search(index: Any, order: str, widths: list[int] | None = None, max_fvu: float | None = None,
                  min_terms: int | None = None, max_terms: int | None = None, limit: int = 100) -> SearchResult:
    """Live latents by decomposability (metasae.search.decomp_score): most composite or most atomic first."""
    if not index.has_decomposability():
        return SearchResult(pd.DataFrame(), "This atlas stores no decomposability scores (decomp_fvu, decomp_terms, "
                                            "decomp_entropy): it was built before they existed; rebuild it.")
    if min_terms is not None and max_terms is not None and min_terms > max_terms:
        raise BadInput(f"The minimum number of meta-latents ({min_terms}) is above the maximum ({max_terms}).")
    res = index.by_decomposability(order, widths=widths or None, max_fvu=max_fvu, min_terms=min_terms,
                                   max_terms=max_terms, limit=limit)
    return SearchResult(res, None if len(res) else "No live latent passes these filters.")
