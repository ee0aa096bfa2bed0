"""Dashboard statistics for every latent of an SAE in one streaming pass, and offline labels.

One pass over the token contexts keeps, per latent, a running count, sum and max, a histogram and a running
top-k of contexts (by the latent's max activation in the context, so examples come from distinct contexts) via
torch.topk over chunks. Per-token activations of the chosen examples are recomputed afterwards for those
(latent, context) pairs only. This replaces SAEDashboard-style passes that revisit the tokens once per latent.

Labels, offline: the tokens a latent fires on most (activation-weighted counts over its top contexts), joined
by " / ", with its top boosted token appended in brackets when it is not already among them. Meta-latent labels
combine the most frequent top tokens of their members, weighted by membership weight.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from metasae.activations import keep_rows
from metasae.atlas import DEAD_LABEL
from metasae.sae import Sae

N_BINS = 24


@dataclass
class LatentStats:
    """Per-latent statistics of one SAE over a token set."""

    density: np.ndarray  # (w,) fraction of tokens where the latent is active
    mean_act: np.ndarray  # (w,) mean activation when active
    max_act: np.ndarray  # (w,)
    hist_counts: np.ndarray  # (w, N_BINS)
    hist_edges: np.ndarray  # (N_BINS + 1,) shared log-spaced edges
    top_ctx: np.ndarray  # (w, k) context index of the top contexts (-1 = none)
    top_val: np.ndarray  # (w, k) the latent's max activation in that context
    top_pos: np.ndarray  # (w, k) position of that max within the context
    n_tokens: int


def _edges(sample: torch.Tensor) -> torch.Tensor:
    pos = sample[sample > 0]
    lo = float(pos.quantile(0.001)) if pos.numel() > 10 else 1e-3
    hi = float(pos.max()) * 4 if pos.numel() else 10.0
    return torch.logspace(np.log10(max(lo, 1e-6)), np.log10(max(hi, lo * 10)), N_BINS + 1)


@torch.no_grad()
def latent_stats(sae: Sae, chunks: Iterator[tuple[int, torch.Tensor]], k: int = 32, n_tokens: int | None = None,
                 progress: bool = True, desc: str = "stats", max_norm_ratio: float | None = None) -> LatentStats:
    """One pass over (first context index, acts (n_ctx, T, d)) chunks; position 0 is skipped.

    `max_norm_ratio` leaves out the tokens the SAEs were trained without (norm above that multiple of the
    batch's median: attention sinks). Kept in, the demo's few sinks fire ~400 of 576 latents at ~100x their usual
    activation, so they became nearly every latent's top example and its label ("0 / 1 / 9").
    """
    w = sae.width
    count = torch.zeros(w, dtype=torch.float64)
    total = torch.zeros(w, dtype=torch.float64)
    mx = torch.zeros(w)
    hist = torch.zeros(w, N_BINS, dtype=torch.long)
    top_val = torch.full((k, w), -1.0)
    top_ctx = torch.full((k, w), -1, dtype=torch.long)
    top_pos = torch.zeros((k, w), dtype=torch.long)
    edges = None
    seen = 0
    bar = tqdm(total=n_tokens, desc=desc, unit="tok", unit_scale=True, disable=not progress)
    for first, acts in chunks:
        for b in range(0, acts.shape[0], 16):
            x = acts[b:b + 16, 1:].float()
            n_ctx, T1, d = x.shape
            flat = x.reshape(-1, d)
            a = sae.encode(flat)  # (n_ctx*T1, w)
            kept = n_ctx * T1
            if max_norm_ratio is not None:
                keep = keep_rows(flat, max_norm_ratio)
                a[~keep] = 0
                kept = int(keep.sum())
            if edges is None:
                edges = _edges(a)
            active = a > 0
            count += active.sum(0)
            total += a.sum(0)
            mx = torch.maximum(mx, a.max(0).values)
            bins = torch.bucketize(a, edges).clamp_(1, N_BINS) - 1
            idx = bins + torch.arange(w) * N_BINS
            hist += torch.bincount(idx[active], minlength=w * N_BINS).view(w, N_BINS)
            per_ctx, pos = a.view(n_ctx, T1, w).max(1)  # (n_ctx, w)
            cand_val = torch.cat([top_val, per_ctx])
            cand_ctx = torch.cat([top_ctx, (torch.arange(n_ctx) + first + b)[:, None].expand(n_ctx, w)])
            cand_pos = torch.cat([top_pos, pos + 1])
            kk = min(k, cand_val.shape[0])
            top_val, sel = cand_val.topk(kk, dim=0)
            top_ctx, top_pos = cand_ctx.gather(0, sel), cand_pos.gather(0, sel)
            seen += kept
            bar.update(n_ctx * T1)
    bar.close()
    if seen == 0 or edges is None:  # edges come with the first chunk
        raise ValueError("no tokens to compute statistics on")
    none = top_val <= 0
    top_ctx[none] = -1
    return LatentStats(density=(count / seen).float().numpy(), mean_act=(total / count.clamp_min(1)).float().numpy(),
                       max_act=mx.numpy(), hist_counts=hist.numpy(), hist_edges=edges.numpy(),
                       top_ctx=top_ctx.T.numpy(), top_val=top_val.clamp_min(0).T.numpy(), top_pos=top_pos.T.numpy(),
                       n_tokens=seen)


@torch.no_grad()
def per_latent_stats_loop(sae: Sae, acts: torch.Tensor, latents: list[int], k: int = 32) -> list[dict]:
    """Reference / baseline: the SAEDashboard way, one pass over all tokens per latent."""
    out = []
    for j in latents:
        col = []
        for b in range(0, acts.shape[0], 16):
            x = acts[b:b + 16, 1:].float()
            pre = x @ sae.W_enc[:, j] + sae.b_enc[j]
            col.append(_act_one(sae, j, pre))
        a = torch.cat(col)  # (n_ctx, T1)
        per_ctx, pos = a.max(1)
        v, c = per_ctx.topk(min(k, len(per_ctx)))
        out.append({"density": float((a > 0).float().mean()), "max_act": float(a.max()),
                    "top_ctx": c[v > 0].tolist(), "top_val": v[v > 0].tolist()})
    return out


def _act_one(sae: Sae, j: int, pre: torch.Tensor) -> torch.Tensor:
    a = torch.relu(pre)
    if sae.threshold is not None:
        a = a * (pre > sae.threshold[j])
    return a


@torch.no_grad()
def example_rows(sae: Sae, stats: LatentStats, ctx_acts: Callable[[np.ndarray], torch.Tensor],
                 tokens: torch.Tensor, decode: Callable[[list[int]], list[str]], n_examples: int = 10,
                 window: int = 24, width_label: int | None = None) -> pd.DataFrame:
    """Top examples with a token window and the latent's per-token activations, for every latent.

    `ctx_acts(ctx_indices)` returns activations (n, T, d) of those contexts.
    """
    w = sae.width
    kk = min(n_examples, stats.top_ctx.shape[1])
    lat = np.repeat(np.arange(w), kk)
    rank = np.tile(np.arange(kk), w)
    ctx = stats.top_ctx[:, :kk].reshape(-1)
    pos = stats.top_pos[:, :kk].reshape(-1)
    val = stats.top_val[:, :kk].reshape(-1)
    keep = ctx >= 0
    lat, rank, ctx, pos, val = lat[keep], rank[keep], ctx[keep], pos[keep], val[keep]
    T = tokens.shape[1]
    rows = []
    vocab_cache: dict[int, str] = {}

    def tok_str(i: int) -> str:
        if i not in vocab_cache:
            vocab_cache[i] = decode([i])[0]
        return vocab_cache[i]

    for b in range(0, len(lat), 2048):
        sl = slice(b, b + 2048)
        x = ctx_acts(ctx[sl]).float()  # (n, T, d)
        pre = torch.einsum("ntd,dn->nt", x, sae.W_enc[:, torch.as_tensor(lat[sl])]) + sae.b_enc[lat[sl]][:, None]
        a = torch.relu(pre)
        if sae.threshold is not None:
            a = a * (pre > sae.threshold[lat[sl]][:, None])
        a[:, 0] = 0  # position 0 is never analysed
        for i in range(len(a)):
            p = int(pos[b + i])
            lo = max(1, min(p - window + 4, T - window))
            hi = min(T, lo + window)
            ids = tokens[ctx[b + i], lo:hi].tolist()
            rows.append((int(lat[b + i]), int(rank[b + i]), float(val[b + i]), [tok_str(t) for t in ids],
                         a[i, lo:hi].tolist(), p - lo))
    df = pd.DataFrame(rows, columns=["latent", "rank", "activation", "tokens", "acts", "position"])
    if width_label is not None:
        df.insert(0, "sae_width", width_label)
    return df


@torch.no_grad()
def boosted_tokens(W_dec: torch.Tensor, W_U: torch.Tensor, decode: Callable[[list[int]], list[str]], k: int = 10,
                   chunk: int = 2048) -> list[list[str]]:
    """Tokens each decoder row boosts most through the unembedding (direct logit effect)."""
    out: list[list[str]] = []
    cache: dict[int, str] = {}
    for b in range(0, W_dec.shape[0], chunk):
        idx = (W_dec[b:b + chunk].float() @ W_U).topk(k, dim=1).indices
        for row in idx.tolist():
            for i in row:
                if i not in cache:
                    cache[i] = decode([i])[0]
            out.append([cache[i] for i in row])
    return out


_CLEAN = re.compile(r"\s+")


def _clean(tok: str) -> str:
    return _CLEAN.sub(" ", tok).strip() or repr(tok)


def top_tokens(stats: LatentStats, tokens: torch.Tensor, k: int = 8) -> list[list[str]]:
    """Per latent, the token ids it fires on most (activation-weighted over its top contexts)."""
    ids = np.where(stats.top_ctx >= 0, tokens[np.clip(stats.top_ctx, 0, None), stats.top_pos].numpy(), -1)
    out = []
    for row_ids, row_val in zip(ids, stats.top_val, strict=True):
        c: Counter = Counter()
        for i, v in zip(row_ids.tolist(), row_val.tolist(), strict=True):
            if i >= 0 and v > 0:
                c[i] += v
        out.append([i for i, _ in c.most_common(k)])
    return out


def label_latent(top_toks: list[str], boosted: list[str], n: int = 3) -> str:
    """Offline label: the top activating tokens, plus the top boosted token when it adds something."""
    toks: list[str] = []
    for t in top_toks:
        t = _clean(t)
        if t.lower() not in (x.lower() for x in toks):
            toks.append(t)
        if len(toks) == n:
            break
    if not toks:
        return DEAD_LABEL
    label = " / ".join(toks)
    if boosted:
        b = _clean(boosted[0])
        if b.lower() not in (x.lower() for x in toks):
            label += f" [→{b}]"
    return label


def label_meta_from_members(member_labels: list[str], weights: list[float], n: int = 3, parts: int = 2) -> str:
    """Meta-latent label from the labels of its strongest live members: "a/b | c/d | e/f".

    Measured on the first demo atlas: meta-latent 414 read "developed / statesman / have" from pooled member
    tokens, but "developed/pioneered | who/whose | statesman/physicist" from its top members' own labels.
    """
    picked: list[str] = []
    for lab, _w in sorted(zip(member_labels, weights, strict=True), key=lambda p: -p[1]):
        if not lab or lab == DEAD_LABEL:
            continue
        short = "/".join(x.strip() for x in lab.split(" [→")[0].split(" / ")[:parts])
        # digit/punctuation members ("0/1": on the demo atlas in most meta-latents) name nothing a reader can use
        if not any(ch.isalpha() for ch in short):
            continue
        if short and short not in picked:
            picked.append(short)
        if len(picked) == n:
            break
    return " | ".join(picked) if picked else "(no live members)"


def token_idf(all_top_tokens: list[list[str]], top: int = 5) -> dict[str, float]:
    """Inverse document frequency of each cleaned token over many latents' top tokens: log(n / (1 + df))."""
    df: Counter = Counter()
    for toks in all_top_tokens:
        df.update({_clean(t).lower() for t in list(toks)[:top]})
    n = max(len(all_top_tokens), 1)
    return {t: math.log(n / (1 + c)) for t, c in df.items()}


def label_meta(members_top_tokens: list[list[str]], weights: list[float], n: int = 3,
               idf: dict[str, float] | None = None) -> str:
    """Meta-latent label from its members' top tokens, weighted by membership weight and rank.

    With `idf` (see token_idf) tokens that top many latents anyway ("the", "of") count for less, so the label
    names what the members share rather than what every latent has.
    """
    c: defaultdict[str, float] = defaultdict(float)  # float weights: a Counter is typed for int counts
    for toks, w in zip(members_top_tokens, weights, strict=True):
        for rank, t in enumerate(list(toks)[:5]):
            key = _clean(t).lower()
            c[key] += w / (1 + rank) * (max(idf.get(key, 0.0), 0.0) if idf is not None else 1.0)
    # sorted is stable, so ties keep first-seen order, as Counter.most_common does
    words = [t for t, v in sorted(c.items(), key=lambda kv: kv[1], reverse=True)[:n] if v > 0]
    return " / ".join(words) if words else "(no members)"
