"""Meta-SAEs: a BatchTopK SAE trained on the decoder rows of another SAE (Leask et al. 2025, section 4).

Each decoder row (a latent's direction) is decomposed into a few meta-latents with weights. All widths of a
ladder share d_model, so one meta-SAE decomposes every latent of every width.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np
import pandas as pd
import torch

from metasae.atlas import COS_THRESHOLD
from metasae.sae import Sae, SaeError
from metasae.train import TrainConfig, train_sae


@dataclass
class MetaConfig:
    """Paper: 2304 meta-latents on 49152 rows (~width/21), k=4, lr 1e-3, batch 16384, 2000 batches, aux 1/16."""

    width: int | None = None  # default: n_rows // 21
    k: float = 4.0
    lr: float = 1e-3
    batch_size: int = 4096
    n_batches: int = 2000
    aux_loss_coefficient: float = 1 / 16
    seed: int = 0


def _row_batches(rows: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    while True:
        yield rows[torch.randint(0, rows.shape[0], (batch_size,), generator=g)]


def train_meta_sae(rows: torch.Tensor, cfg: MetaConfig | None = None, progress: bool = True) -> Sae:
    """Train a BatchTopK meta-SAE on decoder rows (no normalisation, as in the paper)."""
    if rows.ndim != 2 or rows.shape[0] < 2:
        raise SaeError(f"need at least two decoder rows (n, d), got {tuple(rows.shape)}")
    if not torch.isfinite(rows).all():
        raise SaeError("decoder rows hold NaN/inf values")
    cfg = cfg or MetaConfig()
    width = cfg.width or max(8, rows.shape[0] // 21)
    tcfg = TrainConfig(architecture="batchtopk", n_tokens=cfg.batch_size * cfg.n_batches, batch_size=cfg.batch_size,
                       lr=cfg.lr, k=cfg.k, aux_loss_coefficient=cfg.aux_loss_coefficient, seed=cfg.seed,
                       lr_decay_frac=0.2, normalize=False, center_input=False)
    meta = train_sae(_row_batches(rows.float(), cfg.batch_size, cfg.seed), rows.shape[1], width, tcfg,
                     hook="decoder_rows", model="meta-sae", init_b_dec=rows.float().mean(0), progress=progress)
    meta.metadata["meta"] = {"k": cfg.k, "n_rows": int(rows.shape[0])}
    return meta


@torch.no_grad()
def decompose(meta: Sae, vectors: torch.Tensor, max_terms: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, meta-latent ids) of each vector, sorted by weight, zero-padded to the longest decomposition."""
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.shape[-1] != meta.d_in:
        raise SaeError(f"vectors have dimension {vectors.shape[-1]}, the meta-SAE expects {meta.d_in}")
    if not torch.isfinite(vectors).all():
        raise SaeError("vectors hold NaN/inf values")
    acts = meta.encode(vectors.float())
    n = int(min(max_terms, max(1, int((acts > 0).sum(1).max()))))
    w, i = acts.topk(n, dim=1)
    return w, i


def decomposition_table(meta: Sae, saes: list[Sae], max_terms: int = 16) -> pd.DataFrame:
    """One row per (sae_width, latent, meta_latent): weight, rank — every latent of every width."""
    frames = []
    for sae in saes:
        w, i = decompose(meta, unit_rows(sae.W_dec), max_terms)
        lat = torch.arange(sae.width)[:, None].expand_as(w)
        rank = torch.arange(w.shape[1])[None].expand_as(w)
        keep = w > 0
        frames.append(pd.DataFrame({"sae_width": sae.width, "latent": lat[keep].numpy(),
                                    "meta_latent": i[keep].numpy(), "weight": w[keep].numpy(),
                                    "rank": rank[keep].numpy()}))
    return pd.concat(frames, ignore_index=True)


@torch.no_grad()
def meta_fvu(meta: Sae, rows: torch.Tensor) -> float:
    """Fraction of the decoder rows' variance the meta-SAE leaves unexplained."""
    rows = rows.float()
    err = ((rows - meta.reconstruct(rows)) ** 2).sum()
    return float(err / ((rows - rows.mean(0)) ** 2).sum().clamp_min(1e-12))


# edges of the held-out split by nearest training row: the same latent at another width sits at cos ~0.7+
SIBLING_EDGES: tuple[float, ...] = (0.5, 0.7)


@torch.no_grad()
def heldout_by_nearest(meta: Sae, train_rows: torch.Tensor, heldout_rows: torch.Tensor,
                       edges: tuple[float, ...] = SIBLING_EDGES) -> list[dict]:
    """Held-out FVU split by each held-out row's highest cosine with any training row.

    Pooled rows hold one latent at several widths, so a held-out row often has a sibling in the training set and
    its score is partly recall; the bin below the lowest edge is the generalisation to rows without one. Rows are
    unit vectors, so the dot product is the cosine. Bins are [lo, hi), the first from -1, the last to 1 inclusive;
    a bin of fewer than two rows has no variance to explain (None).
    """
    nearest = (heldout_rows.float() @ train_rows.float().T).max(1).values
    bounds = [-1.0, *edges, 1.0]
    out = []
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        sel = nearest >= lo
        if i < len(edges):  # the last bin keeps everything above its edge (a duplicate row's cosine can pass 1.0)
            sel &= nearest < hi
        n = int(sel.sum())
        out.append({"lo": lo, "hi": hi, "n": n, "heldout_fvu": meta_fvu(meta, heldout_rows[sel]) if n > 1 else None})
    return out


def _pairs(labels: np.ndarray, members: np.ndarray, max_group: int = 2000) -> set[tuple[int, int]]:
    """Unordered member pairs that share a label (groups over `max_group` members skipped: they would dominate)."""
    out: set[tuple[int, int]] = set()
    order = np.argsort(labels, kind="stable")
    labels, members = labels[order], members[order]
    for grp in np.split(members, np.flatnonzero(np.diff(labels)) + 1):
        grp = np.unique(grp)
        if 1 < len(grp) <= max_group:
            ii, jj = np.triu_indices(len(grp), 1)
            out.update(zip(grp[ii].tolist(), grp[jj].tolist(), strict=True))
    return out


MIN_STITCH_PAIRS = 100  # below this the overlap is one or two groups' accident: reported as not measurable


def comembership_overlap(decomp: pd.DataFrame, width: int, stitch_group: np.ndarray, n_small: int) -> dict:
    """How far the stitching structure is also meta-SAE structure (the paper: 28.92% on GPT-2, 3072 vs 49152).

    S: pairs of large latents joined through a common small latent (the same swap group). M: pairs of large
    latents that share a meta-latent. The headline is |M∩S| / |S| — of the pairs that stitching says re-cut the
    same small latent, the share that a meta-latent also groups — next to its chance level |M| / all pairs (what
    random pairs give). Dividing by |M| instead measures almost nothing: M has millions of pairs, S few.
    `overlap` is None when S has fewer than MIN_STITCH_PAIRS pairs.
    """
    d = decomp[decomp.sae_width == width]
    group_large = stitch_group[n_small:]
    M = _pairs(d.meta_latent.to_numpy(), d.latent.to_numpy())
    small_groups = np.unique(stitch_group[:n_small])
    in_recon = np.isin(group_large, small_groups)
    S = _pairs(group_large[in_recon], np.flatnonzero(in_recon))
    inter = len(M & S)
    n = len(group_large)
    chance = len(M) / max(n * (n - 1) / 2, 1)
    measurable = len(S) >= MIN_STITCH_PAIRS
    return {"pairs_meta": len(M), "pairs_stitch": len(S), "pairs_both": inter,
            "overlap": inter / len(S) if measurable else None, "chance": chance,
            "overlap_of_meta": inter / max(len(M), 1), "jaccard": inter / max(len(M | S), 1),
            "min_stitch_pairs": MIN_STITCH_PAIRS}


# --- the meta-SAE recipe: which rows, held-out split, random control, seeds --------------------------------


def unit_rows(W_dec: torch.Tensor) -> torch.Tensor:
    """Decoder rows scaled to unit norm (a latent's direction; the meta-SAE decomposes directions)."""
    W = W_dec.float()
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


@dataclass
class RowFilter:
    """Which latents' rows train the meta-SAE: live, not rarer than `min_density`, not denser than `max_density`.

    Dead and ultra-rare rows are noise the meta-SAE memorises (on the first demo atlas random unit vectors reached
    26% "variance explained" at the same size); always-on rows are the dense component, not features.
    """

    min_density: float = 0.0
    max_density: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_density <= self.max_density <= 1:
            raise ValueError(f"need 0 <= min_density <= max_density <= 1, got {self.min_density}, {self.max_density}")

    def keep(self, density: np.ndarray) -> np.ndarray:
        d = np.asarray(density, dtype=np.float64)
        return (d > 0) & (d >= self.min_density) & (d <= self.max_density)


def select_rows(sources: list[tuple[int, torch.Tensor, np.ndarray]], row_filter: RowFilter
                ) -> tuple[torch.Tensor, np.ndarray]:
    """Unit rows kept by the filter from each (width, W_dec, density), and their (width, latent) keys."""
    rows, keys = [], []
    for width, W_dec, density in sources:
        keep = np.flatnonzero(row_filter.keep(density))
        rows.append(unit_rows(W_dec)[torch.as_tensor(keep)])
        keys.append(np.stack([np.full(len(keep), width), keep], 1))
    out, k = torch.cat(rows), np.concatenate(keys)
    if len(out) < 2:
        raise SaeError(f"only {len(out)} decoder rows pass the filter {row_filter}; loosen it")
    return out, k


@dataclass
class Split:
    train: torch.Tensor
    heldout: torch.Tensor


def split_rows(n: int, heldout: float = 0.1, seed: int = 0) -> Split:
    """A seeded train / held-out split of n rows (held-out FVU tells generalisation from memorisation)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_out = max(1, int(round(n * heldout)))
    return Split(train=perm[n_out:].sort().values, heldout=perm[:n_out].sort().values)


def random_rows(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """n random unit vectors in d dimensions: the control a meta-SAE's variance explained must beat."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=1, keepdim=True)


def train_meta_job(rows: torch.Tensor, cfg: MetaConfig, seed: int, out: Path, progress: bool = False) -> None:
    """Train one meta-SAE and save it (module-level so a worker process can run it)."""
    from dataclasses import replace

    train_meta_sae(rows, replace(cfg, seed=seed), progress=progress).save(out)


class SeedStabilityResult(TypedDict, total=False):
    """What `seed_stability` returns (the manifest's meta_sae.seed_stability); one seed gives only the first two."""

    matched_frac: float
    n_seeds: int
    per_seed: list[float]
    threshold: float


@torch.no_grad()
def seed_stability(metas: list[Sae], decomp: pd.DataFrame, threshold: float = COS_THRESHOLD) -> SeedStabilityResult:
    """How far meta-SAEs of other seeds find the same meta-latents: the share of the first seed's used
    meta-latents with a decoder-cosine partner >= threshold in each other seed (mean over seeds)."""
    if len(metas) < 2:
        return {"matched_frac": float("nan"), "n_seeds": len(metas)}
    used = torch.as_tensor(np.unique(decomp.meta_latent.to_numpy()))
    u0 = metas[0].unit_decoder()[used]
    fracs = [float(((u0 @ m.unit_decoder().T).max(1).values >= threshold).float().mean()) for m in metas[1:]]
    return {"matched_frac": float(np.mean(fracs)), "per_seed": fracs, "n_seeds": len(metas), "threshold": threshold}


@torch.no_grad()
def decomposability(meta: Sae, saes: list[Sae]) -> pd.DataFrame:
    """Per latent: how well and how sparsely the meta-SAE explains its direction.

    `decomp_fvu` = ||u - û||^2 for the unit row u (0: fully explained, 1: not at all); `decomp_terms` = active
    meta-latents; `decomp_entropy` = entropy (nats) of the normalised meta-latent weights (0: one meta-latent).
    A latent that is explained well by few meta-latents is composite in the sense of the decomposability
    penalty of Levinson 2026 (arXiv 2604.03436); one the meta-SAE cannot explain is atomic relative to it.
    """
    frames = []
    for sae in saes:
        u = unit_rows(sae.W_dec)
        a = meta.encode(u)
        err = ((u - meta.decode(a)) ** 2).sum(1)
        p = a / a.sum(1, keepdim=True).clamp_min(1e-12)
        ent = -(p * torch.log(p.clamp_min(1e-12))).sum(1)
        frames.append(pd.DataFrame({"sae_width": sae.width, "latent": np.arange(sae.width),
                                    "decomp_fvu": err.numpy().astype(np.float32),
                                    "decomp_terms": (a > 0).sum(1).numpy().astype(np.int16),
                                    "decomp_entropy": ent.numpy().astype(np.float32)}))
    return pd.concat(frames, ignore_index=True)


def meta_latent_table(meta: Sae, decomp: pd.DataFrame, latents: pd.DataFrame, boosted: list[list[str]],
                      n_bins: int = 20) -> pd.DataFrame:
    """One row per meta-latent: label from its strongest live members, members, density, top tokens, histogram."""
    from metasae.stats import label_meta_from_members

    lab = latents.set_index(["sae_width", "latent"])
    d = decomp.join(lab[["label", "top_tokens"]], on=["sae_width", "latent"])
    # a member's purity: the share of its decomposition this meta-latent holds. Labels come from the purest
    # members: on the demo atlas a "0 / 1" digit latent split over many meta-latents was the heaviest member of
    # hundreds of them and put "0/1" in front of their labels
    d["purity"] = d.weight / d.groupby(["sae_width", "latent"]).weight.transform("sum")
    n_lat = len(latents)
    rows = []
    by_meta = dict(tuple(d.groupby("meta_latent")))
    for m in range(meta.width):
        mem = by_meta.get(m)
        if mem is None or not len(mem):
            rows.append({"meta_latent": m, "label": "(no members)", "n_members": 0, "density": 0.0,
                         "top_tokens": [], "top_logits": boosted[m], "hist_counts": np.zeros(n_bins, np.int32),
                         "hist_edges": np.linspace(0, 1, n_bins + 1).astype(np.float32)})
            continue
        mem = mem.sort_values("weight", ascending=False)
        counts, edges = np.histogram(mem.weight.to_numpy(), bins=n_bins)
        toks: dict[str, float] = {}
        for tt, w in zip(mem.top_tokens.to_numpy()[:50], mem.weight.to_numpy()[:50], strict=True):
            for t in list(tt)[:3]:
                toks[t] = toks.get(t, 0.0) + float(w)
        rows.append({"meta_latent": m, "label": label_meta_from_members(mem.label.tolist(),
                                                                         (mem.purity * mem.weight).tolist()),
                     "n_members": len(mem), "density": len(mem) / n_lat,
                     "top_tokens": [t for t, _ in sorted(toks.items(), key=lambda p: -p[1])[:10]],
                     "top_logits": boosted[m], "hist_counts": counts.astype(np.int32),
                     "hist_edges": edges.astype(np.float32)})
    return pd.DataFrame(rows)


@dataclass
class RecipeJob:
    """One meta-SAE of the recipe: the rows it sees, its seed, and their train / held-out split."""

    rows: torch.Tensor
    seed: int
    split: Split

    @property
    def train_rows(self) -> torch.Tensor:
        return self.rows[self.split.train]

    @property
    def heldout_rows(self) -> torch.Tensor:
        return self.rows[self.split.heldout]


@dataclass
class Recipe:
    """The meta-SAEs the build trains and compares: `seed0..` on the selected rows, `random` on random unit
    vectors of the same count (the control), and `largest` on the widest rung's rows alone when rows are pooled."""

    jobs: dict[str, RecipeJob]
    keys: np.ndarray  # (n_rows, 2): (sae width, latent) of each selected row
    row_filter: RowFilter
    source: str

    @property
    def seed_names(self) -> list[str]:
        return [n for n in self.jobs if n.startswith("seed")]


def recipe(sources: list[tuple[int, torch.Tensor, np.ndarray]], row_filter: RowFilter, pooled: bool, n_seeds: int,
           seed: int = 0, heldout: float = 0.1) -> Recipe:
    """The recipe's jobs on the rungs' (width, W_dec, density): every rung pooled, or the last (widest) alone."""
    rows, keys = select_rows(sources if pooled else sources[-1:], row_filter)
    split = split_rows(len(rows), heldout=heldout, seed=seed)
    jobs = {f"seed{i}": RecipeJob(rows, seed + i, split) for i in range(max(1, n_seeds))}
    jobs["random"] = RecipeJob(random_rows(len(rows), rows.shape[1], seed=seed + 7), seed, split)
    if pooled and len(sources) > 1:
        # the alternative the pooled recipe is measured against: the largest rung's rows alone, same filter
        lrows, _ = select_rows(sources[-1:], row_filter)
        jobs["largest"] = RecipeJob(lrows, seed, split_rows(len(lrows), heldout=heldout, seed=seed))
    return Recipe(jobs, keys, row_filter, "pooled" if pooled else "largest")


def recipe_summary(rc: Recipe, metas: dict[str, Sae], saes: list[Sae], decomp: pd.DataFrame, k: float,
                   threshold: float) -> dict:
    """What the recipe measured (the manifest's `meta_sae` facts): FVU on train / held-out rows for the seeds,
    the random-row control and the largest-only alternative, seed stability, FVU per width, terms per latent and
    the co-membership vs stitching overlap between the smallest and the largest rung."""
    from metasae import stitching as st

    fvu = {n: {"train": meta_fvu(metas[n], j.train_rows), "heldout": meta_fvu(metas[n], j.heldout_rows)}
           for n, j in rc.jobs.items()}
    meta, seed0 = metas["seed0"], rc.jobs["seed0"]
    overlap = None
    if len(saes) > 1:
        # co-membership vs stitching between the smallest and the largest rung (the paper: 3072 vs 49152)
        m = st.match(saes[0], saes[-1], threshold)
        overlap = comembership_overlap(decomp, saes[-1].width, m.group, saes[0].width)
    largest = rc.jobs.get("largest")
    return {"width": meta.width, "k": k, "fvu": fvu["seed0"]["train"],
            "train_fvu": fvu["seed0"]["train"], "heldout_fvu": fvu["seed0"]["heldout"],
            "random_train_fvu": fvu["random"]["train"], "random_heldout_fvu": fvu["random"]["heldout"],
            "seed_heldout_fvu": [fvu[n]["heldout"] for n in rc.seed_names],
            "heldout_by_nearest": heldout_by_nearest(meta, seed0.train_rows, seed0.heldout_rows),
            "largest_only": ({"n_rows": len(largest.rows), "train_fvu": fvu["largest"]["train"],
                              "heldout_fvu": fvu["largest"]["heldout"]} if largest is not None else None),
            "rows": {"source": rc.source, "n_rows": len(seed0.rows), "n_train": int(len(seed0.split.train)),
                     "n_heldout": int(len(seed0.split.heldout)), "min_density": rc.row_filter.min_density,
                     "max_density": rc.row_filter.max_density,
                     "by_width": {str(w): int((rc.keys[:, 0] == w).sum()) for w in sorted(set(rc.keys[:, 0].tolist()))}},
            "seed_stability": seed_stability([metas[n] for n in rc.seed_names], decomp, threshold),
            "fvu_by_width": {str(s.width): meta_fvu(meta, unit_rows(s.W_dec)) for s in saes},
            "terms_per_latent": float(decomp[decomp.sae_width == saes[-1].width].groupby("latent").size().mean()),
            "overlap": overlap}
