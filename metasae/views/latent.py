"""Latent page: one latent's row, decomposition, examples and family, its stitching effects, and the radial
latent -> meta-latents -> other latents graph."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from metasae.atlas import DEAD_LABEL, Atlas
from metasae.views.badges import badge
from metasae.views.text import show_token


@dataclass
class LatentView:
    width: int
    latent: int
    row: dict[str, Any]
    decomposition: pd.DataFrame
    examples: list[dict[str, Any]]
    family: dict[str, Any]

    @property
    def label(self) -> str:
        return show_token(self.row.get("label"))


def latent_view(atlas: Atlas, width: int, latent: int) -> LatentView:
    """Everything the latent page shows about one latent (UnknownLatentError if absent)."""
    return LatentView(width, latent, atlas.latent(width, latent), atlas.decomposition(width, latent),
                      atlas.examples(width, latent), atlas.family(width, latent))


def effects(row: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(name, value, help) of the latent's stitching effects that the atlas recorded."""
    spec = [
        ("ΔMSE", "delta_mse", "Change in reconstruction MSE when this latent is added to the smaller SAE "
                              "(novel) or removed; negative = it helps."),
        ("ΔCE", "delta_ce", "Change in next-token cross-entropy when the reconstruction is spliced into the "
                            "model, exact (ablation at the positions it fires)."),
        ("ΔCE (attribution)", "delta_ce_attr", "Attribution-patching estimate of ΔCE from one backward pass."),
        ("group ΔMSE", "group_delta_mse", "ΔMSE of swapping this latent's whole group in."),
        ("group ΔCE", "group_delta_ce", "ΔCE of swapping this latent's whole group in."),
    ]
    return [(name, row.get(col), help_) for name, col, help_ in spec if col in row]


@dataclass
class RadialGraph:
    """Nodes (with x, y) and edges of the latent -> meta-latents -> other latents graph."""

    nodes: pd.DataFrame  # kind (center|meta|latent), sae_width, latent, meta_latent, label, weight, x, y, parent
    # (node a, node b, weight, primary): primary edges form the tree (centre -> meta -> the members placed
    # around it); the others join a member to the further displayed meta-latents it also holds
    edges: list[tuple[int, int, float, bool]] = field(default_factory=list)

    def children(self, node: int) -> pd.DataFrame:
        """The member nodes placed around one meta-latent node."""
        return self.nodes[(self.nodes["kind"] == "latent") & (self.nodes["parent"] == node)]


def radial_graph(atlas: Atlas, width: int, latent: int, n_meta: int = 5, n_each: int = 5) -> RadialGraph:
    """Latent at the centre, its top meta-latents on a ring, and for each the strongest other members outside.

    Each latent is shown once (under the first meta-latent it is found for) and linked to every displayed
    meta-latent its decomposition holds.
    """
    row = atlas.latent(width, latent)
    dec = atlas.decomposition(width, latent).head(n_meta)
    nodes: list[dict[str, Any]] = [{"kind": "center", "sae_width": width, "latent": latent, "meta_latent": None,
                                    "label": row["label"], "weight": 1.0, "x": 0.0, "y": 0.0, "parent": -1}]
    edges: list[tuple[int, int, float, bool]] = []
    k = max(len(dec), 1)
    placed: dict[tuple[int, int], int] = {(width, latent): 0}
    member_sets: list[tuple[int, pd.DataFrame]] = []
    for j, (m, w, label) in enumerate(zip(dec["meta_latent"], dec["weight"], dec["label"], strict=True)):
        ang = 2 * math.pi * j / k + math.pi / 2
        nid = len(nodes)
        nodes.append({"kind": "meta", "sae_width": None, "latent": None, "meta_latent": int(m), "label": label,
                      "weight": float(w), "x": math.cos(ang), "y": math.sin(ang), "parent": 0})
        edges.append((0, nid, float(w), True))
        members = atlas.members(int(m))
        member_sets.append((nid, members))
        fresh = [r for r in members.itertuples(index=False) if (int(r.sae_width), int(r.latent)) not in placed]
        fresh = sorted(fresh, key=lambda r: r.label == DEAD_LABEL)[:n_each]  # live latents first (stable)
        step = min(2 * math.pi / k * 0.75, 1.4) / max(len(fresh) - 1, 1)  # members fan out around their meta
        for q, r in enumerate(fresh):
            a = ang + (q - (len(fresh) - 1) / 2) * step
            key = (int(r.sae_width), int(r.latent))
            placed[key] = len(nodes)
            edges.append((nid, len(nodes), float(r.weight), True))
            nodes.append({"kind": "latent", "sae_width": key[0], "latent": key[1], "meta_latent": None,
                          "label": r.label, "weight": float(r.weight), "x": 2.1 * math.cos(a),
                          "y": 2.1 * math.sin(a), "parent": nid})
    for node in nodes:  # dead / dense badges for the latent nodes
        node["flag"] = "" if node["kind"] == "meta" else badge(
            atlas.latent(int(node["sae_width"]), int(node["latent"])).get("density"), node["label"])
    parent = {i: n["parent"] for i, n in enumerate(nodes)}
    for nid, members in member_sets:
        weights = dict(zip(zip(members["sae_width"].astype(int), members["latent"].astype(int), strict=True),
                           members["weight"].astype(float), strict=True))
        for key, lid in placed.items():
            if lid != 0 and parent[lid] != nid and key in weights:
                edges.append((nid, lid, weights[key], False))
    return RadialGraph(pd.DataFrame(nodes), edges)


def node_params(node: dict[str, Any] | pd.Series) -> tuple[str, dict[str, str]]:
    """(page, query params) a radial-graph node links to: 'latent' or 'meta_latent'."""
    if node["kind"] == "meta":
        return "meta_latent", {"meta": str(int(node["meta_latent"]))}
    return "latent", {"width": str(int(node["sae_width"])), "latent": str(int(node["latent"]))}
