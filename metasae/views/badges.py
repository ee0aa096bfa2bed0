"""Dead / dense flags for latents, shared by every page that lists latents, and their thresholds."""

from __future__ import annotations

from typing import Any

import pandas as pd

from metasae.atlas import DEAD_LABEL
from metasae.views.text import number

DENSE = 0.1  # density above which a latent counts as dense (fires on more than 1 token in 10)
RARE = 1e-4  # below it (and above 0) a latent is rare; at or above it, live
ALWAYS_ON = 0.5  # density above which a latent fires on most tokens


def badge(density: Any, label: Any = None, dense: float = DENSE) -> str:
    """'dead', 'dense' or '' for a latent (dead: never fired on the statistics tokens)."""
    d = number(density)
    if label == DEAD_LABEL or d == 0:
        return "dead"
    if d is not None and d > dense:
        return "dense"
    return ""


def with_badges(df: pd.DataFrame, dense: float = DENSE) -> pd.DataFrame:
    """Adds a 'flag' column (dead / dense / empty) after 'latent' from the density and label columns."""
    df = df.copy()
    dens = df["density"] if "density" in df else pd.Series([None] * len(df), index=df.index)
    labs = df["label"] if "label" in df else pd.Series([None] * len(df), index=df.index)
    flags = [badge(d, lab, dense) for d, lab in zip(dens, labs, strict=True)]
    at = list(df.columns).index("latent") + 1 if "latent" in df else 0
    df.insert(at, "flag", flags)
    return df
