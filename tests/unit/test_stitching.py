"""metasae.stitching: a planted ladder, closed forms vs brute force, exact ΔCE and attribution (tiny LM)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

from metasae.sae import Sae, SaeError
from metasae.stitching import (
    StitchError,
    ce_fn_for,
    ce_set,
    delta_ce_attribution,
    delta_ce_exact,
    delta_ce_loop,
    delta_mse_loop,
    greedy_order,
    group_delta_mse,
    interpolate,
    latent_delta_mse,
    match,
    sparse_acts,
)
from metasae.train import ce_with_reconstruction, evaluate_sae

HOOK = "blocks.2.hook_resid_pre"
F64 = torch.float64


# --- the planted ladder -----------------------------------------------------------------------------------


@dataclass
class Ladder:
    small: Sae
    large: Sae
    dirs: torch.Tensor  # (20, d) orthonormal: 0..11 small latents, 12..19 perturbations and new directions
    kind: list[str]  # planted kind of each large latent
    nearest: list[int | None]  # planted nearest small latent (None: orthogonal to all)
    cos: list[float]  # planted cosine with it
    groups: set[frozenset[int]]  # planted groups, combined indexing (small 0..S-1, large S..)
    actions: dict[frozenset[int], str]


def _normed(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def _fit_encoder(W_dec: torch.Tensor, x: torch.Tensor, frac: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Tied encoder with biases set so each latent's pre-activation is positive on about `frac` of x."""
    W_enc = (W_dec / (W_dec**2).sum(1, keepdim=True)).T.contiguous()
    b_enc = -torch.quantile(x @ W_enc, 1 - frac, dim=0)
    return W_enc, b_enc


def planted_ladder(
    d: int = 24,
    seed: int = 0,
    x: torch.Tensor | None = None,
    scale: float = 1.5,
    frac: float = 0.3,
    jumprelu: bool = False,
    dtype: torch.dtype = F64,
) -> Ladder:
    """Small SAE of 12 orthonormal latents; the large one splits 0,1,2, merges 3+4, keeps 5,6,7, drops
    8..11 and adds 4 new directions (3 orthogonal to every small latent, 1 at cos 0.25 to small latent 5)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    dirs = q.T[:20].contiguous()
    s_dec = dirs[:12]
    rows, kind, nearest, cos, parents = [], [], [], [], []

    def plant(row, k, near, c, par):
        rows.append(row), kind.append(k), nearest.append(near), cos.append(c), parents.append(par)

    for i in (0, 1, 2):  # splits: cos 0.894 with the parent
        for sign in (1, -1):
            plant(
                _normed(s_dec[i] + sign * 0.5 * dirs[12 + i]), "reconstruction", i, 1 / math.sqrt(1.25), {i}
            )
    # a merge of small 3 and 4: cos 0.711 and 0.704
    plant(_normed(1.01 * s_dec[3] + s_dec[4]), "reconstruction", 3, 1.01 / math.sqrt(1.01**2 + 1), {3, 4})
    for i in (5, 6, 7):  # kept, slightly perturbed
        plant(_normed(s_dec[i] + 0.05 * dirs[15]), "reconstruction", i, 1 / math.sqrt(1.0025), {i})
    for k in (16, 17, 18):  # new, orthogonal to every small latent
        plant(dirs[k], "novel", None, 0.0, set())
    plant(0.25 * s_dec[5] + math.sqrt(1 - 0.25**2) * dirs[19], "novel", 5, 0.25, set())
    # shuffle the large latents so nothing lines up by index
    perm = torch.randperm(len(rows), generator=g).tolist()
    l_dec = torch.stack([rows[p] for p in perm])
    kind, nearest, cos, parents = ([v[p] for p in perm] for v in (kind, nearest, cos, parents))

    S, L = 12, len(rows)
    groups: dict[frozenset[int], str] = {}
    for i in range(S):
        members = {i} | {S + j for j in range(L) if i in parents[j]}
        if i == 4:
            continue  # merged into small 3's group
        if i == 3:
            members |= {4}
        groups[frozenset(members)] = "swap" if len(members) > 1 else "remove"
    for j in range(L):
        if not parents[j]:
            groups[frozenset({S + j})] = "add"

    if x is None:  # synthetic data: sparse combinations of the small and new directions
        x = _synthetic(dirs, 600, g)
    s_dec, l_dec = s_dec * scale, l_dec * scale
    mu = x.mean(0)
    b_dec_s = mu + 0.05 * torch.randn(d, generator=g, dtype=F64)
    b_dec_l = mu + 0.05 * torch.randn(d, generator=g, dtype=F64)

    def sae(W_dec, b_dec):
        W_enc, b_enc = _fit_encoder(W_dec, x - b_dec, frac)
        b_enc = b_enc - b_dec @ W_enc  # the encoder sees x - b_dec without apply_b_dec_to_input
        thr = 0.3 * torch.quantile(torch.relu(x @ W_enc + b_enc), 0.9, dim=0) if jumprelu else None
        return Sae(W_enc, b_enc, W_dec, b_dec, threshold=thr, hook_name=HOOK).to(dtype=dtype)

    return Ladder(sae(s_dec, b_dec_s), sae(l_dec, b_dec_l), dirs, kind, nearest, cos, set(groups), groups)


def _synthetic(dirs: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    feats = torch.cat([dirs[:12], dirs[16:20]])
    on = torch.rand(n, len(feats), generator=g, dtype=F64) < 0.25
    mag = 0.5 + 1.5 * torch.rand(n, len(feats), generator=g, dtype=F64)
    x = (on * mag) @ feats + 0.05 * torch.randn(n, dirs.shape[1], generator=g, dtype=F64)
    return x + 0.3


def _partition(group: np.ndarray) -> set[frozenset[int]]:
    return {frozenset(np.nonzero(group == g)[0].tolist()) for g in np.unique(group)}


@pytest.fixture(scope="module")
def ladder() -> Ladder:
    return planted_ladder()


@pytest.fixture(scope="module")
def data(ladder) -> torch.Tensor:
    return _synthetic(ladder.dirs, 500, torch.Generator().manual_seed(1))


# --- match ------------------------------------------------------------------------------------------------


def test_match_recovers_the_planted_ladder(ladder):
    m = match(ladder.small, ladder.large, 0.7)
    S, L = 12, ladder.large.width
    assert (m.n_small, m.n_large) == (S, L) == (12, 14)
    assert m.kind.tolist() == ladder.kind
    for j in range(L):
        if ladder.nearest[j] is not None:
            assert m.nearest_small[j] == ladder.nearest[j], j
        assert m.nearest_small_cos[j] == pytest.approx(ladder.cos[j], abs=1e-5), j
    assert _partition(m.group) == ladder.groups
    assert m.n_groups == len(ladder.groups) == 15
    actions = m.group_actions()
    for members, action in ladder.actions.items():
        gid = m.group[next(iter(members))]
        assert actions[gid] == action, sorted(members)
    assert sorted(actions.tolist()) == sorted(ladder.actions.values())
    # edges: exactly the planted (small, large) pairs
    planted_edges = {(s, c - S) for grp in ladder.groups for s in grp if s < S for c in grp if c >= S}
    assert {tuple(e) for e in m.edges.tolist()} == planted_edges
    # group ids numbered by first member: 0, 1, 2, ... in order of appearance
    _, first = np.unique(m.group, return_index=True)
    assert (np.diff(first) > 0).all() and m.group[0] == 0
    # nearest large latent of each kept small latent is its copy
    for s in (5, 6, 7):
        assert ladder.nearest[m.nearest_large[s]] == s
        assert m.nearest_large_cos[s] == pytest.approx(1 / math.sqrt(1.0025), abs=1e-5)
    assert torch.equal(m.signs(), torch.cat([-torch.ones(S), torch.ones(L)]))


def test_match_at_a_higher_threshold_turns_splits_into_novel_latents(ladder):
    m = match(ladder.small, ladder.large, 0.95)  # splits (0.894) and the merge (0.71) fall below
    expect = ["reconstruction" if c >= 0.95 else "novel" for c in ladder.cos]
    assert m.kind.tolist() == expect and expect.count("reconstruction") == 3
    actions = m.group_actions()
    assert sorted(actions.tolist()).count("swap") == 3
    for s in (0, 1, 2, 3, 4, 8):
        assert actions[m.group[s]] == "remove"
    # chunking the similarity matrix changes nothing (but argmax among ~0 cosines, which rounding decides)
    m2 = match(ladder.small, ladder.large, 0.95, chunk=3)
    assert np.array_equal(m.group, m2.group)
    planted = [j for j, n in enumerate(ladder.nearest) if n is not None]
    assert np.array_equal(m.nearest_small[planted], m2.nearest_small[planted])
    np.testing.assert_allclose(m.nearest_small_cos, m2.nearest_small_cos, atol=1e-6)
    np.testing.assert_allclose(m.nearest_large_cos, m2.nearest_large_cos, atol=1e-6)
    assert np.array_equal(m.nearest_large[:8], m2.nearest_large[:8])  # small latents with a large partner


# --- ΔMSE -------------------------------------------------------------------------------------------------


def _mse(x: torch.Tensor, recon: torch.Tensor) -> float:
    return float(((x - recon) ** 2).sum()) / x.shape[0]


@pytest.mark.parametrize("jumprelu", [False, True])
def test_latent_delta_mse_equals_the_loop(jumprelu):
    lad = planted_ladder(jumprelu=jumprelu)
    x = _synthetic(lad.dirs, 500, torch.Generator().manual_seed(1))
    sp = sparse_acts(lad.small, lad.large, x)
    closed = latent_delta_mse(lad.small, lad.large, sp).double()
    loop = delta_mse_loop(lad.small, lad.large, x, range(lad.large.width)).double()
    assert closed.shape == loop.shape == (14,)
    assert bool((loop != 0).all())  # every large latent fires somewhere
    torch.testing.assert_close(closed, loop, rtol=1e-5, atol=1e-12)
    # the planted new directions are what the small SAE lacks: inserting them helps
    for j, k in enumerate(lad.kind):
        if k == "novel":
            assert closed[j] < 0, j
    if jumprelu:
        assert lad.large.threshold is not None and bool((lad.large.threshold > 0).all())


def _brute_force_recon(
    small: Sae,
    large: Sae,
    x: torch.Tensor,
    drop_small: torch.Tensor,
    add_large: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The small SAE's reconstruction with some small latents removed and some large latents added."""
    a_s, a_l = small.encode(x), large.encode(x)
    recon = (a_s * ~drop_small) @ small.W_dec + (a_l * add_large) @ large.W_dec
    return recon + (small.b_dec if bias is None else bias)


@pytest.mark.parametrize("jumprelu", [False, True])
def test_group_delta_mse_equals_brute_force(jumprelu):
    lad = planted_ladder(jumprelu=jumprelu, seed=2)
    x = _synthetic(lad.dirs, 400, torch.Generator().manual_seed(3)).float().double()
    m = match(lad.small, lad.large, 0.7)
    sp = sparse_acts(lad.small, lad.large, x)
    closed = group_delta_mse(lad.small, lad.large, m, sp).double()
    base = _mse(x, lad.small.reconstruct(x))
    assert sp.sq_err / sp.n_tokens == pytest.approx(base, rel=1e-12)
    brute = torch.tensor(
        [
            _mse(
                x,
                _brute_force_recon(
                    lad.small,
                    lad.large,
                    x,
                    torch.as_tensor(m.group_small == g),
                    torch.as_tensor(m.group_large == g),
                ),
            )
            - base
            for g in range(m.n_groups)
        ],
        dtype=F64,
    )
    assert bool((brute != 0).all())
    torch.testing.assert_close(closed, brute, rtol=1e-5, atol=1e-12)
    # single-large-latent groups agree with the per-latent closed form
    per_latent = latent_delta_mse(lad.small, lad.large, sp).double()
    for j in range(lad.large.width):
        if lad.kind[j] == "novel":
            assert closed[m.group_large[j]] == pytest.approx(float(per_latent[j]), rel=1e-6)


def test_chunking_changes_nothing(ladder, data, monkeypatch):
    """Token chunks in sparse_acts and key chunks in the group deltas are bookkeeping only."""
    import functools

    from metasae import stitching

    m = match(ladder.small, ladder.large, 0.7)
    sp = sparse_acts(ladder.small, ladder.large, data)
    sp7 = sparse_acts(ladder.small, ladder.large, data, chunk=7)
    key = lambda s: (s.t * 100 + s.latent).argsort()  # noqa: E731
    assert torch.equal(sp.t[key(sp)], sp7.t[key(sp7)]) and torch.equal(
        sp.latent[key(sp)], sp7.latent[key(sp7)]
    )
    torch.testing.assert_close(
        sp.value[key(sp)], sp7.value[key(sp7)], rtol=1e-12, atol=1e-14
    )  # matmul shapes
    torch.testing.assert_close(sp.resid, sp7.resid, rtol=1e-12, atol=1e-14)
    whole = group_delta_mse(ladder.small, ladder.large, m, sp)
    monkeypatch.setattr(stitching, "_group_deltas", functools.partial(stitching._group_deltas, max_keys=5))
    torch.testing.assert_close(
        group_delta_mse(ladder.small, ladder.large, m, sp7), whole, rtol=1e-6, atol=1e-9
    )


def test_interpolate_runs_exactly_from_small_to_large(ladder, data):
    m = match(ladder.small, ladder.large, 0.7)
    x = data.float().double()  # the analysis reads activations in fp32; make the brute force see the same
    sp = sparse_acts(ladder.small, ladder.large, x)
    df = interpolate(ladder.small, ladder.large, m, sp)
    assert len(df) == m.n_groups + 2
    assert df["step"].tolist() == list(range(m.n_groups + 2))
    assert df["action"].iloc[0] == "start" and df["action"].iloc[-1] == "bias"
    ev_s, ev_l = evaluate_sae(ladder.small, x), evaluate_sae(ladder.large, x)
    assert df["mse"].iloc[0] == pytest.approx(ev_s["mse"], rel=1e-9)
    assert df["l0"].iloc[0] == pytest.approx(ev_s["l0"], rel=1e-9)
    assert df["mse"].iloc[-1] == pytest.approx(ev_l["mse"], rel=1e-9)
    assert df["l0"].iloc[-1] == pytest.approx(ev_l["l0"], rel=1e-6)  # L0 accumulates fp32 steps
    assert abs(ev_l["mse"] - ev_s["mse"]) > 0.1 * ev_s["mse"]  # distinct end points
    # default order: most MSE benefit first; the group column records it
    order = df["group"].iloc[1:-1].astype(int).to_numpy()
    gd = group_delta_mse(ladder.small, ladder.large, m, sp).numpy()
    assert sorted(order.tolist()) == list(range(m.n_groups))
    assert (np.diff(gd[order]) >= 0).all()
    actions = m.group_actions()
    assert df["action"].iloc[1:-1].tolist() == actions[order].tolist()
    for _, row in df.iloc[1:-1].iterrows():  # a single added latent is named
        members = np.nonzero(m.group == row["group"])[0]
        if row["action"] == "add":
            assert row["latent"] == members[0] - 12
        else:
            assert row["latent"] is None or np.isnan(row["latent"])
    # every intermediate point equals a brute-force recompute
    for step in (1, 4, 7, 11, m.n_groups):
        applied = order[:step]
        recon = _brute_force_recon(
            ladder.small,
            ladder.large,
            x,
            torch.as_tensor(np.isin(m.group_small, applied)),
            torch.as_tensor(np.isin(m.group_large, applied)),
        )
        assert df["mse"].iloc[step] == pytest.approx(_mse(x, recon), rel=1e-9), step
        l0 = float(
            ((ladder.small.encode(x) > 0) & ~torch.as_tensor(np.isin(m.group_small, applied))).sum()
            + ((ladder.large.encode(x) > 0) & torch.as_tensor(np.isin(m.group_large, applied))).sum()
        )
        assert df["l0"].iloc[step] == pytest.approx(l0 / x.shape[0], rel=1e-6), step


def test_interpolate_follows_a_given_order_and_refuses_a_bad_one(ladder, data):
    m = match(ladder.small, ladder.large, 0.7)
    sp = sparse_acts(ladder.small, ladder.large, data)
    order = np.arange(m.n_groups)[::-1].copy()
    df = interpolate(ladder.small, ladder.large, m, sp, order=order)
    assert df["group"].iloc[1:-1].astype(int).tolist() == order.tolist()
    default = interpolate(ladder.small, ladder.large, m, sp)
    assert df["mse"].iloc[-1] == pytest.approx(default["mse"].iloc[-1], rel=1e-9)  # same end point
    for bad in (order[:-1], np.zeros(m.n_groups, dtype=int), np.arange(1, m.n_groups + 1)):
        with pytest.raises(StitchError, match="permutation"):
            interpolate(ladder.small, ladder.large, m, sp, order=bad)


def test_greedy_order_predicts_every_step_of_its_path(ladder, data):
    """Each greedy step is the group that lowers the error most at that point: checked against interpolate's
    exact error after every step and against a brute-force search over the groups left."""
    m = match(ladder.small, ladder.large, 0.7)
    sp = sparse_acts(ladder.small, ladder.large, data.double())
    order, steps = greedy_order(ladder.small, ladder.large, m, sp)
    assert sorted(order.tolist()) == list(range(m.n_groups))
    df = interpolate(ladder.small, ladder.large, m, sp, order=order)
    exact = np.diff(df["mse"].to_numpy()[:-1]) * sp.n_tokens
    np.testing.assert_allclose(steps, exact, rtol=1e-6, atol=1e-6 * abs(exact).max())
    # brute force: at each step, try every group left with interpolate and keep the best
    done: list[int] = []
    for g in order[:4]:
        left = [h for h in range(m.n_groups) if h not in done]
        after = {h: interpolate(ladder.small, ladder.large, m, sp,
                                order=np.array(done + [h] + [x for x in left if x != h]))["mse"].iloc[len(done) + 1]
                 for h in left}
        assert after[int(g)] == pytest.approx(min(after.values()), rel=1e-9)
        done.append(int(g))
    # the first step is the group that helps most alone
    assert order[0] == int(np.argmin(group_delta_mse(ladder.small, ladder.large, m, sp).numpy()))


# --- ΔCE on a tiny model ----------------------------------------------------------------------------------


def make_ce_case(double: bool = False):
    """A planted ladder in d_model 32 whose encoders are fitted to the tiny Llama's residual stream."""
    from metasae.lm import tiny_model

    lm = tiny_model("llama", seed=0)
    if double:
        lm.model.double()
    tokens = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    resid = lm.resid(tokens, HOOK)
    x = resid[:, 1:].reshape(-1, 32).double()
    scale = float(x.norm(dim=1).mean())
    lad = planted_ladder(d=32, seed=4, x=x, scale=0.5 * scale, frac=0.25, dtype=torch.float32)
    return lm, tokens, lad


@pytest.fixture(scope="module")
def ce_case():
    return make_ce_case()


@pytest.fixture(scope="module")
def ce_case64():
    """The same case on a float64 model: tiny loss changes (linear regime) drown in fp32 rounding."""
    return make_ce_case(True)


def _item_per_large(S: int, L: int) -> torch.Tensor:
    return torch.cat([torch.full((S,), L), torch.arange(L)])


# fp32: observed max |exact - loop| 6e-7 (float noise of batching the forward passes differently), so 2e-6;
# fp64: ~1e-9, so a tolerance 1000x tighter than the smallest effect.
PRECISIONS = {"fp32": ("ce_case", 2e-6), "fp64": ("ce_case64", 1e-8)}


@pytest.mark.parametrize("precision", ["fp32", "fp64"])
def test_delta_ce_exact_equals_the_loop_for_every_large_latent(request, precision):
    fixture, atol = PRECISIONS[precision]
    lm, tokens, lad = request.getfixturevalue(fixture)
    S, L = lad.small.width, lad.large.width
    cs = ce_set(lm, HOOK, tokens, lad.small, lad.large, batch_ctx=3)
    m = match(lad.small, lad.large, 0.7)
    item_of = _item_per_large(S, L)
    exact = delta_ce_exact(
        lm, HOOK, cs, lad.small, lad.large, item_of, m.signs(), range(L), batch=3, items_per_chunk=5
    )
    loop = delta_ce_loop(lm, HOOK, tokens, lad.small, lad.large, range(L))
    assert exact.shape == loop.shape == (L,)
    # every latent fires and moves the loss (most by far more than the tolerance): not a 0 == 0 comparison
    assert float(loop.abs().min()) > 1e-5 and int((loop.abs() > 1e-4).sum()) >= 12
    torch.testing.assert_close(exact.double(), loop.double(), rtol=0, atol=atol)
    # a subset, in any order, gives the same numbers
    some = delta_ce_exact(lm, HOOK, cs, lad.small, lad.large, item_of, m.signs(), [9, 2, 11])
    torch.testing.assert_close(some.double(), loop[[9, 2, 11]].double(), rtol=0, atol=atol)
    # the baseline is the small SAE spliced at positions >= 1, position 0 left clean
    base = ce_with_reconstruction(lm, HOOK, tokens, lad.small.reconstruct, batch_ctx=3)
    assert float(cs.base_loss.sum()) / cs.n_tokens == pytest.approx(base["ce_loss"], abs=atol)
    torch.testing.assert_close(cs.base[:, 0], cs.resid[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(cs.resid, lm.resid(tokens, HOOK).float(), rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["fp32", "fp64"])
def test_delta_ce_exact_for_groups_equals_brute_force(request, precision):
    fixture, atol = PRECISIONS[precision]
    lm, tokens, lad = request.getfixturevalue(fixture)
    m = match(lad.small, lad.large, 0.7)
    cs = ce_set(lm, HOOK, tokens, lad.small, lad.large)
    exact = delta_ce_exact(
        lm, HOOK, cs, lad.small, lad.large, torch.as_tensor(m.group), m.signs(), range(m.n_groups)
    )
    resid = lm.resid(tokens, HOOK).float()  # the analysis keeps the residual in fp32
    x = resid[:, 1:]

    def ce(drop_small, add_large, bias=None):
        r = resid.clone()
        r[:, 1:] = _brute_force_recon(
            lad.small, lad.large, x, torch.as_tensor(drop_small), torch.as_tensor(add_large), bias
        )
        with torch.no_grad():
            return float(lm.token_losses_from(tokens, HOOK, r).double().mean())

    base = ce(np.zeros(12, bool), np.zeros(14, bool))
    brute = torch.tensor(
        [ce(m.group_small == g, m.group_large == g) - base for g in range(m.n_groups)], dtype=F64
    )
    assert float(brute.abs().min()) > 5e-6 and int((brute.abs() > 1e-4).sum()) >= 10
    torch.testing.assert_close(exact.double(), brute, rtol=0, atol=atol)
    # the interpolation's CE points: small SAE, groups applied in order, large SAE (with its own b_dec)
    ce_fn = ce_fn_for(lm, HOOK, cs, lad.small, lad.large, m)
    df = interpolate(lad.small, lad.large, m, cs.sp, ce_fn=ce_fn, n_ce_points=4)
    assert int(df["ce_loss"].notna().sum()) == 5  # 4 points along the way and the bias step
    assert df["ce_loss"].iloc[0] == pytest.approx(base, abs=atol)
    large_ce = ce_with_reconstruction(lm, HOOK, tokens, lad.large.reconstruct)["ce_loss"]
    assert df["ce_loss"].iloc[-1] == pytest.approx(large_ce, abs=atol)
    order = df["group"].iloc[1:-1].astype(int).to_numpy()
    for step in df.index[df["ce_loss"].notna()][1:-1]:
        applied = order[:step]
        want = ce(np.isin(m.group_small, applied), np.isin(m.group_large, applied))
        assert df["ce_loss"].iloc[step] == pytest.approx(want, abs=atol), step


def _aligned_ladder(ce_case, s: float):
    """Two large latents with decoder rows along -/+ Σ_t a_j(t) dL/dx_t at the small SAE's baseline."""
    lm, tokens, lad = ce_case
    cs = ce_set(lm, HOOK, tokens, lad.small, lad.large)
    xg = cs.base.clone().requires_grad_(True)
    lm.token_losses_from(tokens, HOOK, xg).sum().backward()
    G = xg.grad[:, 1:].reshape(-1, 32)
    a = lad.large.encode(cs.resid[:, 1:].reshape(-1, 32))
    j_down, j_up = (int(j) for j in (a > 0).sum(0).argsort(descending=True)[:2])
    W_dec = lad.large.W_dec.clone()
    v = {j: a[:, j] @ G for j in (j_down, j_up)}
    W_dec[j_down] = -s * v[j_down] / v[j_down].norm()
    W_dec[j_up] = s * v[j_up] / v[j_up].norm()
    large = replace(lad.large, W_dec=W_dec)
    return lm, tokens, lad.small, large, j_down, j_up, v


@pytest.mark.parametrize("s", [1e-3, 0.3])
def test_attribution_sign_and_value_on_a_planted_gradient_direction(ce_case64, s):
    scale = float(ce_case64[2].large.W_dec.norm(dim=1).mean())
    lm, tokens, small, large, j_down, j_up, v = _aligned_ladder(ce_case64, s * scale)
    S, L = small.width, large.width
    cs = ce_set(lm, HOOK, tokens, small, large)
    item_of, signs = _item_per_large(S, L), torch.cat([-torch.ones(S), torch.ones(L)])
    attr = delta_ce_attribution(lm, HOOK, cs, small, large, item_of, signs, L + 1)
    exact = delta_ce_exact(lm, HOOK, cs, small, large, item_of, signs, range(L))
    assert attr.shape == (L + 1,) and exact.shape == (L,)
    # planted value: Σ_t a_j(t) <d_j, g_t> / n_tokens = ∓ s |v_j| / n_tokens
    for j, sgn in ((j_down, -1), (j_up, 1)):
        assert float(attr[j]) == pytest.approx(sgn * s * scale * float(v[j].norm()) / cs.n_tokens, rel=1e-4)
        assert np.sign(float(exact[j])) == sgn
    if s < 0.01:  # linear regime: the first-order estimate is the exact change
        for j in (j_down, j_up):
            assert float(attr[j]) == pytest.approx(float(exact[j]), rel=0.01)


def test_attribution_approaches_exact_for_small_activations(ce_case64):
    lm, tokens, lad = ce_case64
    S, L = lad.small.width, lad.large.width
    large = replace(lad.large, W_dec=lad.large.W_dec * 1e-2)  # shrink every inserted vector
    cs = ce_set(lm, HOOK, tokens, lad.small, large)
    item_of, signs = _item_per_large(S, L), torch.cat([-torch.ones(S), torch.ones(L)])
    attr = delta_ce_attribution(lm, HOOK, cs, lad.small, large, item_of, signs, L + 1)[:L]
    exact = delta_ce_exact(lm, HOOK, cs, lad.small, large, item_of, signs, range(L))
    big = exact.abs() > 0.1 * float(exact.abs().max())
    assert int(big.sum()) >= 5
    torch.testing.assert_close(attr[big], exact[big], rtol=0.1, atol=0)
    assert bool((torch.sign(attr[big]) == torch.sign(exact[big])).all())


# --- bad input --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0, 0.0, -1, 1.5, float("nan"), float("inf"), "0.7", None])
def test_bad_thresholds_are_refused(ladder, threshold):
    with pytest.raises(StitchError, match="threshold must be in"):
        match(ladder.small, ladder.large, threshold)


def test_threshold_one_is_allowed(ladder):
    m = match(ladder.small, ladder.large, 1.0)
    assert (m.kind == "novel").all()  # no planted pair is identical


def test_mismatched_saes_are_refused(ladder, make_sae):
    with pytest.raises(SaeError, match="different d_in"):
        match(ladder.small, make_sae(16, 30, hook_name=HOOK))
    other_hook = replace(ladder.large, hook_name="blocks.3.hook_resid_pre")
    with pytest.raises(SaeError, match="different hooks"):
        match(ladder.small, other_hook)


def test_empty_or_malformed_activations_are_refused(ladder, tiny_llama):
    for acts in (torch.zeros(0, 24), torch.zeros(24), torch.zeros(2, 3, 24)):
        with pytest.raises(StitchError, match="non-empty"):
            sparse_acts(ladder.small, ladder.large, acts)
    for tokens in (torch.zeros(0, 8, dtype=torch.long), torch.zeros(3, 1, dtype=torch.long)):
        with pytest.raises(StitchError, match="need"):
            ce_set(tiny_llama, HOOK, tokens, ladder.small, ladder.large)
