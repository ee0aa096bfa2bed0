"""Meta-SAEs: a BatchTopK SAE trained on the decoder rows of another SAE (Leask et al. 2025, section 4).

Each decoder row (a latent's direction) is decomposed into a few meta-latents with weights. All widths of a
ladder share d_model, so one meta-SAE decomposes every latent of every width.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

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
        w, i = decompose(meta, sae.W_dec.float(), max_terms)
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


def comembership_overlap(decomp: pd.DataFrame, width: int, stitch_group: np.ndarray, n_small: int) -> dict[str, float]:
    """How far sharing a meta-latent agrees with sharing a stitching group (paper: 28.92% on GPT-2).

    Pairs of large latents that share a meta-latent (M) vs pairs joined through a common small latent in the
    stitching graph, i.e. in the same swap group (S). Reports |M∩S|/|M|, |M∩S|/|S| and the Jaccard index.
    """
    d = decomp[decomp.sae_width == width]
    group_large = stitch_group[n_small:]

    def pairs_from(labels: np.ndarray, members: np.ndarray) -> set[tuple[int, int]]:
        out: set[tuple[int, int]] = set()
        order = np.argsort(labels, kind="stable")
        labels, members = labels[order], members[order]
        bounds = np.flatnonzero(np.diff(labels)) + 1
        for grp in np.split(members, bounds):
            grp = np.unique(grp)
            if 1 < len(grp) <= 2000:  # a meta-latent with thousands of members would dominate; paper-scale guard
                ii, jj = np.triu_indices(len(grp), 1)
                out.update(zip(grp[ii].tolist(), grp[jj].tolist(), strict=True))
        return out

    M = pairs_from(d.meta_latent.to_numpy(), d.latent.to_numpy())
    # groups containing at least one small latent (reconstruction groups)
    small_groups = np.unique(stitch_group[:n_small])
    in_recon = np.isin(group_large, small_groups)
    S = pairs_from(group_large[in_recon], np.flatnonzero(in_recon))
    inter = len(M & S)
    return {"pairs_meta": len(M), "pairs_stitch": len(S), "overlap_of_meta": inter / max(len(M), 1),
            "overlap_of_stitch": inter / max(len(S), 1), "jaccard": inter / max(len(M | S), 1)}
