"""SAE stitching between a small and a large SAE on the same hook (Leask et al. 2025, section 3).

Every latent of both SAEs belongs to one *group*: a connected component of the bipartite graph whose edges join
a small and a large latent with decoder cosine >= threshold. A group of one large latent is *novel* (action
`add`), of one small latent is dropped (`remove`), otherwise it is swapped (`swap`): its small latents leave and
its large latents enter the small SAE together. The small SAE's b_dec is kept until a final `bias` step, so the
interpolation ends exactly at the large SAE.

All effects come from sparse activations (token, latent, value) and closed forms, never a loop that re-runs the
SAE per latent: with residual r = x - x̂ and a change δ = Σ_l s_l a_l d_l, the summed squared error changes by
Σ_t -2<r_t, δ_t> + ||δ_t||^2.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm.auto import tqdm

from metasae.atlas import COS_THRESHOLD
from metasae.sae import Sae, check_pair


class StitchError(ValueError):
    """Bad stitching input (threshold, shapes, empty token set)."""


@dataclass
class Match:
    """Decoder-similarity structure between a small (S) and large (L) SAE.

    Combined latent index: small latents are 0..S-1, large latents S..S+L-1.
    """

    threshold: float
    n_small: int
    n_large: int
    nearest_small: np.ndarray  # (L,) best small latent of each large latent
    nearest_small_cos: np.ndarray  # (L,)
    nearest_large: np.ndarray  # (S,)
    nearest_large_cos: np.ndarray  # (S,)
    group: np.ndarray  # (S+L,) group id of each combined latent
    n_groups: int
    edges: np.ndarray  # (E, 2) small, large pairs with cos >= threshold

    @property
    def group_small(self) -> np.ndarray:
        return self.group[: self.n_small]

    @property
    def group_large(self) -> np.ndarray:
        return self.group[self.n_small:]

    @property
    def kind(self) -> np.ndarray:
        """'novel' or 'reconstruction' for each large latent."""
        return np.where(self.nearest_small_cos >= self.threshold, "reconstruction", "novel")

    def group_actions(self) -> np.ndarray:
        """'add' | 'remove' | 'swap' for each group."""
        n_s = np.bincount(self.group_small, minlength=self.n_groups)
        n_l = np.bincount(self.group_large, minlength=self.n_groups)
        return np.where(n_s == 0, "add", np.where(n_l == 0, "remove", "swap"))

    def signs(self) -> torch.Tensor:
        """-1 for small latents (they leave), +1 for large ones (they enter)."""
        return torch.cat([-torch.ones(self.n_small), torch.ones(self.n_large)])


def check_threshold(threshold: float) -> None:
    if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        raise StitchError(f"threshold must be in (0, 1], got {threshold!r}")


@torch.no_grad()
def match(small: Sae, large: Sae, threshold: float = COS_THRESHOLD, chunk: int = 4096) -> Match:
    """Nearest neighbours, novel/reconstruction kinds and swap groups from decoder cosine similarity."""
    check_threshold(threshold)
    check_pair(small, large)
    us, ul = small.unit_decoder().float(), large.unit_decoder().float()
    S, L = us.shape[0], ul.shape[0]
    best_s = torch.full((L,), -2.0)
    arg_s = torch.zeros(L, dtype=torch.long)
    best_l = torch.full((S,), -2.0)
    arg_l = torch.zeros(S, dtype=torch.long)
    edges = []
    for b in range(0, L, chunk):
        cos = ul[b:b + chunk] @ us.T  # (l, S)
        v, i = cos.max(1)
        best_s[b:b + chunk], arg_s[b:b + chunk] = v, i
        v2, i2 = cos.max(0)
        upd = v2 > best_l
        best_l[upd], arg_l[upd] = v2[upd], i2[upd] + b
        li, si = torch.nonzero(cos >= threshold, as_tuple=True)
        edges.append(torch.stack([si, li + b], 1))
    e = torch.cat(edges).numpy() if edges else np.zeros((0, 2), dtype=np.int64)
    group, n_groups = components(S + L, e[:, 0], e[:, 1] + S)
    return Match(threshold=float(threshold), n_small=S, n_large=L, nearest_small=arg_s.numpy(),
                 nearest_small_cos=best_s.numpy(), nearest_large=arg_l.numpy(), nearest_large_cos=best_l.numpy(),
                 group=group, n_groups=n_groups, edges=e)


def components(n: int, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of an n-node undirected graph given by edges (rows[i], cols[i]), as (group id per
    node, number of groups); groups are numbered by their first node so ids are stable and deterministic."""
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    n_groups, labels = connected_components(graph, directed=False)
    _, first = np.unique(labels, return_index=True)
    return np.argsort(np.argsort(first))[labels].astype(np.int64), int(n_groups)


# --- sparse activations -----------------------------------------------------------------------------------


@dataclass
class Sparse:
    """Nonzero activations of both SAEs on N tokens, in combined latent indexing, plus the small residual."""

    t: torch.Tensor  # (nnz,) token index
    latent: torch.Tensor  # (nnz,) combined latent index
    value: torch.Tensor  # (nnz,) activation
    resid: torch.Tensor  # (N, d) x - x̂_small (small SAE with its own b_dec)
    sq_err: float  # Σ ||resid||^2
    n_tokens: int


@torch.no_grad()
def sparse_acts(small: Sae, large: Sae, acts: torch.Tensor, chunk: int = 4096) -> Sparse:
    """Encode N tokens with both SAEs and keep only nonzeros (the whole analysis works from these)."""
    if acts.ndim != 2 or acts.shape[0] == 0:
        raise StitchError(f"need a non-empty (n_tokens, d) activation matrix, got {tuple(acts.shape)}")
    ts, ls, vs, rs = [], [], [], []
    for b in range(0, acts.shape[0], chunk):
        x = acts[b:b + chunk].float()
        a_s = small.encode(x)
        rs.append(x - small.decode(a_s))
        for a, off in ((a_s, 0), (large.encode(x), small.width)):
            t, lat = torch.nonzero(a, as_tuple=True)
            ts.append(t + b)
            ls.append(lat + off)
            vs.append(a[t, lat])
    work = _work_dtype(small, large)  # one dtype for values, residuals and decoders (fp64 SAEs stay fp64)
    resid = torch.cat(rs).to(work)
    return Sparse(torch.cat(ts), torch.cat(ls), torch.cat(vs).to(work), resid, float((resid**2).sum()),
                  acts.shape[0])


def _work_dtype(small: Sae, large: Sae) -> torch.dtype:
    return torch.promote_types(torch.promote_types(small.W_dec.dtype, large.W_dec.dtype), torch.float32)


def _decoders(small: Sae, large: Sae) -> torch.Tensor:
    return torch.cat([small.W_dec, large.W_dec]).to(_work_dtype(small, large))


@torch.no_grad()
def latent_delta_mse(small: Sae, large: Sae, sp: Sparse) -> torch.Tensor:
    """ΔMSE of inserting each large latent alone into the small SAE (negative = helps), per token.

    Σ_t a_j(t) <r_t, d_j> comes from one sparse (L x N) @ (N x d) product; no per-latent loop.
    """
    is_large = sp.latent >= small.width
    lat = sp.latent[is_large] - small.width
    val = sp.value[is_large]
    A_T = torch.sparse_coo_tensor(torch.stack([lat, sp.t[is_large]]), val, (large.width, sp.n_tokens))
    ar = torch.sparse.mm(A_T, sp.resid)  # (L, d) = Σ_t a_j(t) r_t
    D = large.W_dec.to(ar.dtype)
    cross = (ar * D).sum(1)
    sq = val.new_zeros(large.width).index_add_(0, lat, val**2)
    return (-2 * cross + sq * (D**2).sum(1)) / sp.n_tokens


def _group_deltas(sp: Sparse, group: torch.Tensor, signs: torch.Tensor, D: torch.Tensor, n_groups: int,
                  max_keys: int = 65536):
    """Yield (group ids, token ids, δ rows) for every (token, group) where the group is active."""
    g = group[sp.latent]
    key = g * sp.n_tokens + sp.t
    order = torch.argsort(key, stable=True)
    key, lat, val = key[order], sp.latent[order], sp.value[order] * signs[sp.latent[order]]
    uniq, inv = torch.unique_consecutive(key, return_inverse=True)
    bounds = torch.searchsorted(inv, torch.arange(0, len(uniq) + max_keys, max_keys).clamp_max(len(uniq)))
    for lo_k, (lo, hi) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)):
        if lo == hi:
            continue
        base = lo_k * max_keys
        delta = D.new_zeros(int(inv[hi - 1]) - base + 1, D.shape[1])
        delta.index_add_(0, inv[lo:hi] - base, val[lo:hi, None] * D[lat[lo:hi]])
        k = uniq[base:base + delta.shape[0]]
        yield k // sp.n_tokens, k % sp.n_tokens, delta


@torch.no_grad()
def group_delta_mse(small: Sae, large: Sae, m: Match, sp: Sparse) -> torch.Tensor:
    """ΔMSE of applying each group alone (add / remove / swap) to the small SAE, per token."""
    group = torch.as_tensor(m.group)
    out = torch.zeros(m.n_groups, dtype=torch.float64)
    for g, t, delta in _group_deltas(sp, group, m.signs(), _decoders(small, large), m.n_groups):
        # adding δ to the reconstruction changes the error r by -δ
        change = -2 * (sp.resid[t] * delta).sum(1) + (delta**2).sum(1)
        out.index_add_(0, g, change.double())
    return (out / sp.n_tokens).float()


MAX_GREEDY_GROUPS = 20_000  # the greedy order holds a dense groups x groups matrix (20k: 3.2 GB in fp64)


@torch.no_grad()
def greedy_order(small: Sae, large: Sae, m: Match, sp: Sparse) -> tuple[np.ndarray, np.ndarray]:
    """The exact greedy path: each step applies the group that lowers the error most given the steps before it.

    The error Σ_t ||r_t||² is quadratic in the reconstruction, so after a set H of groups, group g changes it by
    its change alone plus 2 Σ_{h in H} G[g, h], where G[g, h] = Σ_t δ_g(t)·δ_h(t) = Pᵀ((ÃÃᵀ) ⊙ (DDᵀ))P
    (Ã: signed activations, latents x tokens; D: decoder rows; P: latent -> group). No step re-encodes anything.
    Returns (order, each step's change of Σ_t ||r_t||², which `interpolate` reproduces step by step).
    """
    from scipy.sparse import csr_matrix

    if m.n_groups > MAX_GREEDY_GROUPS:
        raise StitchError(f"the greedy order needs a dense {m.n_groups} x {m.n_groups} matrix; at most "
                          f"{MAX_GREEDY_GROUPS} groups")
    D = _decoders(small, large).double()
    n_lat = D.shape[0]
    val = (sp.value.double() * m.signs().double()[sp.latent]).numpy()
    A = csr_matrix((val, (sp.latent.numpy(), sp.t.numpy())), shape=(n_lat, sp.n_tokens))
    C = torch.from_numpy((A @ A.T).toarray()) * (D @ D.T)
    P = torch.as_tensor(m.group)
    G = torch.zeros(m.n_groups, n_lat, dtype=torch.float64).index_add_(0, P, C)
    G = torch.zeros(m.n_groups, m.n_groups, dtype=torch.float64).index_add_(1, P, G)
    cross = torch.from_numpy(A @ sp.resid.double().numpy()).mul_(D).sum(1)  # Σ_t Ã_i(t) r_t·d_i
    change = -2 * torch.zeros(m.n_groups, dtype=torch.float64).index_add_(0, P, cross) + G.diagonal()
    left = torch.ones(m.n_groups, dtype=torch.bool)
    order, steps = np.empty(m.n_groups, dtype=np.int64), np.empty(m.n_groups)
    for i in range(m.n_groups):
        g = int(torch.where(left, change, torch.inf).argmin())
        order[i], steps[i], left[g] = g, float(change[g]), False
        change += 2 * G[:, g]
    return order, steps


@torch.no_grad()
def delta_mse_loop(small: Sae, large: Sae, acts: torch.Tensor, latents: Iterable[int]) -> torch.Tensor:
    """Reference: for each latent, build the small SAE plus that latent and re-run it (the naive anchor)."""
    x = acts.float()
    base = float(((x - small.reconstruct(x)) ** 2).sum()) / x.shape[0]
    out = []
    for j in latents:
        stitched = Sae(W_enc=torch.cat([small.W_enc, large.W_enc[:, j:j + 1]], 1),
                       b_enc=torch.cat([small.b_enc, large.b_enc[j:j + 1]]),
                       W_dec=torch.cat([small.W_dec, large.W_dec[j:j + 1]]), b_dec=small.b_dec,
                       threshold=_cat_thresholds(small, large, j), apply_b_dec_to_input=False)
        if small.apply_b_dec_to_input or large.apply_b_dec_to_input:
            raise StitchError("the reference loop assumes apply_b_dec_to_input=False")
        out.append(float(((x - stitched.reconstruct(x)) ** 2).sum()) / x.shape[0] - base)
    return torch.tensor(out)


def _cat_thresholds(small: Sae, large: Sae, j: int) -> torch.Tensor | None:
    if small.threshold is None and large.threshold is None:
        return None
    ts = small.threshold if small.threshold is not None else torch.zeros(small.width)
    tl = large.threshold if large.threshold is not None else torch.zeros(large.width)
    return torch.cat([ts, tl[j:j + 1]])


# --- ΔCE ------------------------------------------------------------------------------------------------


@dataclass
class CeSet:
    """Evaluation contexts with both SAEs' activations and the small-SAE-spliced baseline."""

    tokens: torch.Tensor  # (C, T)
    resid: torch.Tensor  # (C, T, d) clean residual at the hook
    base: torch.Tensor  # (C, T, d) small reconstruction at positions >= 1, clean at 0
    base_loss: torch.Tensor  # (C,) summed next-token loss per context with base spliced
    sp: Sparse  # activations on positions >= 1 (token index = c * (T-1) + (pos-1))
    # (hook, per-token base losses (C, T-1), PrefixCache of the layers after the hook), made on first use
    prefix: tuple | None = None

    @property
    def n_tokens(self) -> int:
        return self.tokens.shape[0] * (self.tokens.shape[1] - 1)


@torch.no_grad()
def ce_set(lm, hook: str, tokens: torch.Tensor, small: Sae, large: Sae, batch_ctx: int = 8) -> CeSet:
    """Run the model once over `tokens` and prepare everything the ΔCE estimates need."""
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise StitchError(f"need (n_ctx >= 1, ctx_len >= 2) tokens, got {tuple(tokens.shape)}")
    resid = torch.cat([lm.resid(tokens[b:b + batch_ctx], hook).float().cpu()
                       for b in range(0, tokens.shape[0], batch_ctx)])
    C, T, d = resid.shape
    flat = resid[:, 1:].reshape(-1, d)
    sp = sparse_acts(small, large, flat)
    base = resid.clone()
    base[:, 1:] = (flat - sp.resid).view(C, T - 1, d)
    base_loss = torch.cat([lm.token_losses_from(tokens[b:b + batch_ctx], hook, base[b:b + batch_ctx]).sum(1).cpu()
                           for b in range(0, C, batch_ctx)])
    return CeSet(tokens, resid, base, base_loss, sp)


def _item_deltas(cs: CeSet, item_of: torch.Tensor, signs: torch.Tensor, D: torch.Tensor, items: torch.Tensor):
    """Sparse rows (item, context, position, δ) for the requested items; item_of maps combined latent -> item."""
    sp = cs.sp
    T1 = cs.tokens.shape[1] - 1
    keep = torch.isin(item_of[sp.latent], items)
    sub = Sparse(sp.t[keep], sp.latent[keep], sp.value[keep], sp.resid, sp.sq_err, sp.n_tokens)
    for it, t, delta in _group_deltas(sub, item_of, signs, D, int(item_of.max()) + 1):
        yield it, t // T1, t % T1 + 1, delta


def _base_prefix(lm, hook: str, cs: CeSet, batch_ctx: int = 8):
    """Per-token base losses and the base run's keys/values after the hook (one pass, kept on the CeSet)."""
    from metasae.lm import PrefixCache

    if cs.prefix is None or cs.prefix[0] != hook:
        losses, caches = [], []
        for b in range(0, cs.tokens.shape[0], batch_ctx):
            loss, cache = lm.record_prefix(cs.tokens[b:b + batch_ctx], hook, cs.base[b:b + batch_ctx])
            losses.append(loss.double().cpu())
            caches.append(cache)
        cs.prefix = (hook, torch.cat(losses), PrefixCache.concat(caches))
    return cs.prefix[1], cs.prefix[2]


@torch.no_grad()
def _pair_loss_changes(lm, hook: str, cs: CeSet, ctx: torch.Tensor, pert: torch.Tensor, first: torch.Tensor,
                       batch: int, reuse_prefix: bool | None) -> torch.Tensor:
    """Summed loss change (float64) of each (context, perturbation) pair; `first` = first perturbed position.

    With prefix reuse (Llama-style models) positions before `first` are not recomputed: their keys/values come
    from the base run, so pairs run in order of `first`, in batches of about batch * T positions.
    """
    T = cs.tokens.shape[1]
    out = torch.zeros(len(ctx), dtype=torch.float64)
    if reuse_prefix is None:
        reuse_prefix = bool(getattr(lm, "supports_prefix_cache", False))
    if not reuse_prefix:
        for b in range(0, len(ctx), batch):
            c = ctx[b:b + batch]
            loss = lm.token_losses_from(cs.tokens[c], hook, cs.base[c] + pert[b:b + batch]).sum(1).cpu()
            out[b:b + batch] = (loss - cs.base_loss[c]).double()
        return out
    base_tok, cache = _base_prefix(lm, hook, cs)
    order = torch.argsort(first, stable=True)
    order = order[first[order] < T - 1]  # a change at the last position reaches no prediction: exactly 0
    i, n = 0, len(order)
    while i < n:
        s = int(first[order[i]])
        j = min(n, i + max(1, (batch * T) // (T - s)))
        idx = order[i:j]
        c = ctx[idx]
        resid = cs.base[c, s:] + pert[idx, s:]
        loss = lm.token_losses_suffix(cs.tokens[c], hook, resid, s, cache.take(c, s, lm.device))
        out[idx] = loss.double().cpu().sum(1) - base_tok[c, s:].sum(1)
        i = j
    return out


def _pairs_of(cs: CeSet, item_of: torch.Tensor, signs: torch.Tensor, D: torch.Tensor, items: torch.Tensor,
              only: torch.Tensor | None = None):
    """(item, context, first position, dense perturbation (P, T, d)) of every (item, context) where the item fires;
    `only` restricts them to the given keys item * C + context."""
    C, T = cs.tokens.shape
    rows = list(_item_deltas(cs, item_of, signs, D, items))
    if not rows:
        e = torch.zeros(0, dtype=torch.long)
        return e, e, e, D.new_zeros(0, T, D.shape[1])
    it, c, pos, delta = (torch.cat(x) for x in zip(*rows, strict=True))
    key = it * C + c
    if only is not None:
        keep = torch.isin(key, only)
        key, pos, delta = key[keep], pos[keep], delta[keep]
    pair_key, pair = torch.unique(key, return_inverse=True)
    pert = delta.new_zeros(len(pair_key), T, D.shape[1])
    pert.index_put_((pair, pos), delta, accumulate=True)
    first = torch.full((len(pair_key),), T, dtype=torch.long).scatter_reduce_(0, pair, pos, "amin")
    return pair_key // C, pair_key % C, first, pert


@torch.no_grad()
def delta_ce_exact(lm, hook: str, cs: CeSet, small: Sae, large: Sae, item_of: torch.Tensor, signs: torch.Tensor,
                   items: Sequence[int], batch: int = 16, items_per_chunk: int = 64,
                   progress: bool = False, reuse_prefix: bool | None = None) -> torch.Tensor:
    """Exact ΔCE (mean next-token loss change over the set) of applying each item alone to the small SAE.

    An item is a large latent or a group (item_of maps combined latents to items). Only contexts where the item
    fires are re-run, and (item, context) pairs from many items share each forward pass. With `reuse_prefix`
    (default: whenever the model supports it) each pair runs only from the first position where its item fires,
    the clean prefix's keys/values taken from one recorded base pass; False recomputes whole contexts (the
    reference the tests hold it to).
    """
    items_t = torch.as_tensor(list(items), dtype=torch.long)
    D = _decoders(small, large)
    out = torch.zeros(len(items_t), dtype=torch.float64)
    pos_of_item = torch.full((int(item_of.max()) + 1,), -1, dtype=torch.long)
    pos_of_item[items_t] = torch.arange(len(items_t))
    bar = tqdm(total=len(items_t), desc="exact ΔCE", disable=not progress)
    for lo in range(0, len(items_t), items_per_chunk):
        chunk = items_t[lo:lo + items_per_chunk]
        p_item, p_ctx, first, pert = _pairs_of(cs, item_of, signs, D, chunk)
        if len(p_item):
            loss = _pair_loss_changes(lm, hook, cs, p_ctx, pert, first, batch, reuse_prefix)
            out.index_add_(0, pos_of_item[p_item], loss)
        bar.update(len(chunk))
    bar.close()
    return (out / cs.n_tokens).float()


def _attribution_pairs(lm, hook: str, cs: CeSet, small: Sae, large: Sae, item_of: torch.Tensor,
                       signs: torch.Tensor, batch_ctx: int):
    """Σ_t <δ_t, dL/dx_t> per (item, context) where the item fires: (keys item * C + context, float64 values)."""
    D = _decoders(small, large)
    C, T = cs.tokens.shape
    grads = []
    for b in range(0, C, batch_ctx):
        x = cs.base[b:b + batch_ctx].clone().requires_grad_(True)
        lm.token_losses_from(cs.tokens[b:b + batch_ctx], hook, x).sum().backward()
        assert x.grad is not None  # x requires grad and the loss depends on it
        grads.append(x.grad[:, 1:].reshape(-1, x.shape[-1]).cpu())
    G = torch.cat(grads)  # (N, d)
    sp = cs.sp
    # <a_l d_l, g_t> for each nonzero: only nnz dot products.
    contrib = (sp.value * signs[sp.latent] * (G[sp.t] * D[sp.latent]).sum(1)).double()
    keys, inv = torch.unique(item_of[sp.latent] * C + sp.t // (T - 1), return_inverse=True)
    return keys, contrib.new_zeros(len(keys)).index_add_(0, inv, contrib)


def delta_ce_attribution(lm, hook: str, cs: CeSet, small: Sae, large: Sae, item_of: torch.Tensor,
                         signs: torch.Tensor, n_items: int, batch_ctx: int = 8, exact_pairs: int = 0,
                         batch: int = 16, reuse_prefix: bool | None = None) -> torch.Tensor:
    """ΔCE of every item: attribution Σ_t <δ_t, dL/dx_t> from one forward + backward per batch of contexts.

    exact_pairs > 0 corrects the estimate where it is least linear: the (item, context) pairs with the largest
    attributed |change| (at most exact_pairs of them, over all items) get their exact loss change (one forward of
    the context from the item's first firing position, as in delta_ce_exact), the others keep the first-order
    term. A large effect is a large |attribution| in a few contexts (saturation of the downstream model is the
    source of the error), so a budget of a few pairs per context fixes the ranking of the large effects.
    """
    return delta_ce_attributions(lm, hook, cs, small, large, item_of, signs, n_items, batch_ctx, exact_pairs, batch,
                                 reuse_prefix)[1]


def delta_ce_attributions(lm, hook: str, cs: CeSet, small: Sae, large: Sae, item_of: torch.Tensor,
                          signs: torch.Tensor, n_items: int, batch_ctx: int = 8, exact_pairs: int = 0,
                          batch: int = 16, reuse_prefix: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(first-order, corrected) ΔCE of every item from one gradient pass: `delta_ce_attribution` without and
    with its `exact_pairs` correction, for callers that report both."""
    C = cs.tokens.shape[0]
    keys, val = _attribution_pairs(lm, hook, cs, small, large, item_of, signs, batch_ctx)

    def per_item(v: torch.Tensor) -> torch.Tensor:
        return (v.new_zeros(n_items).index_add_(0, keys // C, v) / cs.n_tokens).to(_work_dtype(small, large))

    first_order = per_item(val)
    if exact_pairs <= 0 or not len(keys):
        return first_order, first_order
    val = val.clone()
    with torch.no_grad():
        chosen = keys[torch.argsort(val.abs(), descending=True)[: exact_pairs]]
        D = _decoders(small, large)
        items = torch.unique(chosen // C)
        for lo in range(0, len(items), 64):  # bounded dense perturbation tensors
            p_item, p_ctx, first, pert = _pairs_of(cs, item_of, signs, D, items[lo:lo + 64], only=chosen)
            exact = _pair_loss_changes(lm, hook, cs, p_ctx, pert, first, batch, reuse_prefix)
            val[torch.searchsorted(keys, p_item * C + p_ctx)] = exact
    return first_order, per_item(val)


@torch.no_grad()
def delta_ce_loop(lm, hook: str, tokens: torch.Tensor, small: Sae, large: Sae, latents: Iterable[int],
                  naive: bool = False) -> torch.Tensor:
    """Reference: per latent, splice (small SAE + that latent) into every context and re-run the model.

    naive=True re-runs the whole model with a replacing hook (a plain run-with-hooks loop); otherwise only the
    layers after the hook run (our splice), which isolates what batching and skipping silent contexts gain.
    """
    resid = lm.resid(tokens, hook).float()
    x = resid[:, 1:]

    def loss_with(recon: torch.Tensor) -> float:
        r = resid.clone()
        r[:, 1:] = recon
        run = lm.token_losses_hooked if naive else lm.token_losses_from
        return float(run(tokens, hook, r).sum())

    a_s = small.encode(x)
    base_recon = small.decode(a_s)
    base = loss_with(base_recon)
    n = tokens.shape[0] * (tokens.shape[1] - 1)
    out = []
    for j in latents:
        a_j = large.encode(x)[..., j:j + 1]
        out.append((loss_with(base_recon + a_j * large.W_dec[j]) - base) / n)
    return torch.tensor(out)


# --- interpolation ----------------------------------------------------------------------------------------


@torch.no_grad()
def interpolate(small: Sae, large: Sae, m: Match, sp: Sparse, order: np.ndarray | None = None,
                ce_fn=None, n_ce_points: int = 12, progress: bool = False) -> pd.DataFrame:
    """Apply groups one at a time (default: most MSE benefit first) from the small SAE to the large one.

    Records L0 and exact MSE (the error is updated incrementally, cross-terms included) after every step; when
    `ce_fn(applied_groups: np.ndarray | None, bias_swapped: bool) -> float` is given, CE at ~n_ce_points steps.
    """
    group = torch.as_tensor(m.group)
    if order is None:
        order = np.argsort(group_delta_mse(small, large, m, sp).numpy(), kind="stable")
    order = np.asarray(order)
    if sorted(order.tolist()) != list(range(m.n_groups)):
        raise StitchError("order must be a permutation of all group ids")
    actions = m.group_actions()
    D = _decoders(small, large)
    signs = m.signs()
    # per-group nonzeros, so each step touches only its own tokens
    g_of = group[sp.latent]
    srt = torch.argsort(g_of, stable=True)
    starts = torch.searchsorted(g_of[srt], torch.arange(m.n_groups + 1))
    l0_change = torch.zeros(m.n_groups).index_add_(0, g_of, signs[sp.latent]) / sp.n_tokens
    r = sp.resid.clone()
    err = float((r**2).sum())
    l0 = float((sp.latent < small.width).sum()) / sp.n_tokens
    ce_steps = set(np.linspace(0, m.n_groups, min(n_ce_points, m.n_groups + 1)).round().astype(int).tolist())
    rows = [dict(step=0, action="start", latent=None, group=None, l0=l0, mse=err / sp.n_tokens,
                 ce_loss=ce_fn(order[:0], False) if ce_fn else None)]
    n_small = m.n_small
    for step, g in enumerate(tqdm(order, desc="interpolate", disable=not progress), start=1):
        idx = srt[starts[g]:starts[g + 1]]
        if len(idx):
            t, lat = sp.t[idx], sp.latent[idx]
            ut, inv = torch.unique(t, return_inverse=True)
            delta = D.new_zeros(len(ut), D.shape[1]).index_add_(0, inv, (sp.value[idx] * signs[lat])[:, None] * D[lat])
            err += float((-2 * (r[ut] * delta).sum(1) + (delta**2).sum(1)).sum())
            r[ut] -= delta
        l0 += float(l0_change[g])
        members = np.nonzero(m.group == g)[0]
        single_large = actions[g] == "add" and len(members) == 1
        rows.append(dict(step=step, action=str(actions[g]),
                         latent=int(members[0] - n_small) if single_large else None, group=int(g), l0=l0,
                         mse=err / sp.n_tokens,
                         ce_loss=ce_fn(order[:step], False) if ce_fn and step in ce_steps else None))
    # final step: the large SAE's own b_dec
    shift = (small.b_dec - large.b_dec).to(r.dtype)
    err = float(((r + shift) ** 2).sum())
    rows.append(dict(step=m.n_groups + 1, action="bias", latent=None, group=None, l0=l0, mse=err / sp.n_tokens,
                     ce_loss=ce_fn(order, True) if ce_fn else None))
    return pd.DataFrame(rows)


def ce_fn_for(lm, hook: str, cs: CeSet, small: Sae, large: Sae, m: Match):
    """A ce_fn for `interpolate`: mean CE on the CeSet with the given groups applied."""
    group_small, group_large = torch.as_tensor(m.group_small), torch.as_tensor(m.group_large)
    x = cs.resid[:, 1:]
    a_s, a_l = small.encode(x), large.encode(x)

    @torch.no_grad()
    def ce(applied: np.ndarray, bias_swapped: bool) -> float:
        applied_t = torch.as_tensor(np.asarray(applied, dtype=np.int64))
        keep_s = ~torch.isin(group_small, applied_t)
        add_l = torch.isin(group_large, applied_t)
        recon = (a_s * keep_s) @ small.W_dec + (a_l * add_l) @ large.W_dec
        recon = recon + (large.b_dec if bias_swapped else small.b_dec)
        new = cs.resid.clone()
        new[:, 1:] = recon
        total = sum(float(lm.token_losses_from(cs.tokens[b:b + 8], hook, new[b:b + 8]).sum())
                    for b in range(0, cs.tokens.shape[0], 8))
        return total / cs.n_tokens

    return ce


def exact_ce_sample(attr: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Which latents get an exact ΔCE (sorted ids): the half with the largest attributed effect, plus a random
    draw among the rest that fire on the CE tokens (a latent silent there has ΔCE exactly 0 both ways: a tie
    that says nothing about attribution's ranking); from all latents when too few fire."""
    rng = np.random.default_rng(seed)
    n = min(n, len(attr))
    top = np.argsort(-np.abs(attr))[: n // 2]
    rest = np.setdiff1d(np.flatnonzero(attr != 0), top)
    if len(rest) < n - len(top):
        rest = np.setdiff1d(np.arange(len(attr)), top)
    return np.sort(np.concatenate([top, rng.choice(rest, n - len(top), replace=False)]))


def exact_ce_groups(m: Match, attr_grp: np.ndarray, n: int) -> np.ndarray:
    """Which groups get an exact ΔCE (sorted ids): the swap/remove groups with the largest attributed effect
    (the ones a reader weighs against the novel latents)."""
    ids = np.flatnonzero(m.group_actions() != "add")
    return np.sort(ids[np.argsort(-np.abs(attr_grp[ids]))[:n]])
