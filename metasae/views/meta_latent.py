"""Meta-latent page: one meta-latent's members, their spread over the widths, its co-occurring meta-latents;
and meta-latent names for pickers and tables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from metasae.atlas import Atlas, UnknownLatentError
from metasae.views.text import show_token


@dataclass
class MetaView:
    meta_latent: int
    row: dict[str, Any]
    members: pd.DataFrame  # sae_width, latent, weight, label
    per_width: pd.DataFrame  # sae_width, members, mean_weight
    cooccurring: pd.DataFrame  # meta_latent, count, fraction, label

    @property
    def label(self) -> str:
        return show_token(self.row.get("label"))


def meta_view(atlas: Atlas, m: int, top_cooccurring: int = 10) -> MetaView:
    """Everything the meta-latent page shows (UnknownLatentError if absent)."""
    row = atlas.meta_latent(m)
    members = atlas.members(m)
    per_width = (members.groupby("sae_width").agg(members=("latent", "size"), mean_weight=("weight", "mean"))
                 .reindex(atlas.widths, fill_value=0).reset_index())
    per_width["mean_weight"] = per_width["mean_weight"].astype(float)
    return MetaView(m, row, members, per_width, atlas.cooccurring_meta(m, top=top_cooccurring))


def meta_options(atlas: Atlas) -> list[tuple[int, str]]:
    """(meta-latent id, 'id · label') for pickers."""
    t = atlas.meta_latents_table(["meta_latent", "label"])
    return [(int(m), f"{int(m)} · {show_token(lab)}") for m, lab in zip(t["meta_latent"], t["label"], strict=True)]


def meta_label(atlas: Atlas, m: int) -> str:
    try:
        return show_token(atlas.meta_latent(int(m))["label"])
    except UnknownLatentError:
        return "(unknown)"
