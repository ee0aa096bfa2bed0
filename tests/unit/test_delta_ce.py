"""ΔCE speed-ups held to their references: prefix (key/value) reuse vs whole-context runs and the per-latent loop,
and the attribution's exact-pair correction vs per-context brute force (tiny Llama, fp32 and fp64)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_stitching import HOOK, _item_per_large, make_ce_case

from metasae.lm import ModelError, tiny_model
from metasae.stitching import (
    _pair_loss_changes,
    ce_set,
    delta_ce_attribution,
    delta_ce_attributions,
    delta_ce_exact,
    delta_ce_loop,
    match,
)


@pytest.fixture(scope="module")
def case32():
    return make_ce_case()


@pytest.fixture(scope="module")
def case64():
    return make_ce_case(True)


# fp32: whole-context and suffix runs batch the same sums differently (~5e-7 observed on ΔCE); fp64: ~1e-12.
# Against the loop, which keeps the residual in fp32, fp64 agrees to ~1e-9 (as in test_stitching).
TOL = {"fp32": 2e-6, "fp64": 1e-9}
LOOP_TOL = {"fp32": 2e-6, "fp64": 1e-8}


@pytest.mark.parametrize("precision", ["fp32", "fp64"])
def test_suffix_runs_equal_whole_context_runs(request, precision):
    lm, tokens, _ = request.getfixturevalue("case32" if precision == "fp32" else "case64")
    T = tokens.shape[1]
    resid = lm.resid(tokens, HOOK)
    with torch.no_grad():
        whole = lm.token_losses_from(tokens, HOOK, resid)
    rec, cache = lm.record_prefix(tokens, HOOK, resid)
    torch.testing.assert_close(rec, whole, rtol=0, atol=TOL[precision])
    g = torch.Generator().manual_seed(1)
    for start, rows in ((1, [0, 1, 2, 3]), (5, [3, 3, 0]), (T - 2, [2, 1])):
        rows_t = torch.tensor(rows)
        changed = resid[rows_t].clone()
        changed[:, start:] += torch.randn(changed[:, start:].shape, generator=g, dtype=changed.dtype)
        with torch.no_grad():
            want = lm.token_losses_from(tokens[rows_t], HOOK, changed)
        got = lm.token_losses_suffix(tokens[rows_t], HOOK, changed[:, start:], start, cache.take(rows_t, start))
        assert got.shape == (len(rows), T - 1 - start)
        # the change is real (the suffix moved) and the suffix run reproduces it
        assert float((want[:, start:] - whole[rows_t, start:]).abs().max()) > 1e-3
        torch.testing.assert_close(got, want[:, start:], rtol=0, atol=TOL[precision])
    with pytest.raises(ModelError, match="does not fit"):
        lm.token_losses_suffix(tokens, HOOK, resid[:, 3:], 2, cache.take(torch.arange(4), 2))


def test_gpt2_has_no_prefix_reuse_and_exact_falls_back():
    lm = tiny_model("gpt2", seed=0)
    assert not lm.supports_prefix_cache
    tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ModelError, match="prefix reuse"):
        lm.record_prefix(tokens, HOOK, lm.resid(tokens, HOOK))


@pytest.mark.parametrize("precision", ["fp32", "fp64"])
def test_pair_loss_changes_with_prefix_equal_whole_runs_for_any_first_position(request, precision):
    lm, tokens, lad = request.getfixturevalue("case32" if precision == "fp32" else "case64")
    cs = ce_set(lm, HOOK, tokens, lad.small, lad.large, batch_ctx=3)
    C, T, d = cs.base.shape
    g = torch.Generator().manual_seed(2)
    n = 23
    ctx = torch.randint(0, C, (n,), generator=g)
    first = torch.randint(1, T - 1, (n,), generator=g)
    first[:3] = torch.tensor([1, T - 1, T - 2])  # whole context, last position only (no effect), last prediction
    pert = torch.randn(n, T, d, generator=g) * (torch.arange(T)[None, :, None] >= first[:, None, None])
    whole = _pair_loss_changes(lm, HOOK, cs, ctx, pert, first, batch=4, reuse_prefix=False)
    reused = _pair_loss_changes(lm, HOOK, cs, ctx, pert, first, batch=4, reuse_prefix=True)
    assert float(whole[1]) == pytest.approx(0, abs=TOL[precision]) and float(reused[1]) == 0
    assert float(whole.abs()[2:].min()) > 1e-4
    # summed losses of ~0.5 per context: fp32 rounding is relative here (1.3e-5 observed on 0.6)
    torch.testing.assert_close(reused, whole, rtol=1e-4 if precision == "fp32" else 0, atol=TOL[precision])


@pytest.mark.parametrize("precision", ["fp32", "fp64"])
def test_delta_ce_exact_with_prefix_reuse_equals_whole_runs_and_the_loop(request, precision):
    lm, tokens, lad = request.getfixturevalue("case32" if precision == "fp32" else "case64")
    S, L = lad.small.width, lad.large.width
    cs = ce_set(lm, HOOK, tokens, lad.small, lad.large, batch_ctx=3)
    m = match(lad.small, lad.large, 0.7)
    item_of = _item_per_large(S, L)
    # the planted latents first fire at different positions: reuse skips a real prefix for many pairs
    first = torch.stack([(lad.large.encode(cs.resid[:, 1:])[..., j] > 0).float().argmax(1) for j in range(L)])
    assert int((first > 0).sum()) >= 8
    whole = delta_ce_exact(lm, HOOK, cs, lad.small, lad.large, item_of, m.signs(), range(L), reuse_prefix=False)
    reused = delta_ce_exact(lm, HOOK, cs, lad.small, lad.large, item_of, m.signs(), range(L), batch=2,
                            items_per_chunk=5, reuse_prefix=True)
    loop = delta_ce_loop(lm, HOOK, tokens, lad.small, lad.large, range(L))
    assert float(loop.abs().min()) > 1e-5
    torch.testing.assert_close(reused.double(), whole.double(), rtol=0, atol=TOL[precision])
    torch.testing.assert_close(reused.double(), loop.double(), rtol=0, atol=LOOP_TOL[precision])
    assert lm.supports_prefix_cache  # so the default is the reuse path
    default = delta_ce_exact(lm, HOOK, cs, lad.small, lad.large, item_of, m.signs(), [7, 0, 3])
    torch.testing.assert_close(default.double(), reused[[7, 0, 3]].double(), rtol=0, atol=TOL[precision])
    # groups (swap / add / remove with signs) too
    group = torch.as_tensor(m.group)
    g_whole = delta_ce_exact(lm, HOOK, cs, lad.small, lad.large, group, m.signs(), range(m.n_groups),
                             reuse_prefix=False)
    g_reused = delta_ce_exact(lm, HOOK, cs, lad.small, lad.large, group, m.signs(), range(m.n_groups), batch=3)
    assert float(g_whole.abs().max()) > 5e-4  # 9.4e-4 observed: far above the tolerance
    torch.testing.assert_close(g_reused.double(), g_whole.double(), rtol=0, atol=TOL[precision])


def _per_context_reference(lm, tokens, small, large, item_of, signs, n_items, budget):
    """Brute force: attribution and exact ΔL of every (item, context) from one-context CE sets, then the top
    `budget` pairs by |attribution| take their exact value."""
    C = tokens.shape[0]
    attr = torch.zeros(n_items, C, dtype=torch.float64)
    exact = torch.zeros(n_items, C, dtype=torch.float64)
    for c in range(C):
        cs = ce_set(lm, HOOK, tokens[c:c + 1], small, large)
        n = cs.n_tokens
        attr[:, c] = delta_ce_attribution(lm, HOOK, cs, small, large, item_of, signs, n_items).double() * n
        exact[:, c] = delta_ce_exact(lm, HOOK, cs, small, large, item_of, signs, range(n_items),
                                     reuse_prefix=False).double() * n
    flat = attr.flatten()
    fires = flat != 0
    order = torch.argsort(flat.abs(), descending=True)[: min(budget, int(fires.sum()))]
    mixed = flat.clone()
    mixed[order] = exact.flatten()[order]
    n_tok = C * (tokens.shape[1] - 1)
    return attr.sum(1) / n_tok, exact.sum(1) / n_tok, mixed.view(n_items, C).sum(1) / n_tok


@pytest.mark.parametrize("budget", [0, 7, 10**6])
def test_attribution_with_exact_pairs_equals_per_context_brute_force(case64, budget):
    lm, tokens, lad = case64
    S, L = lad.small.width, lad.large.width
    large = replace(lad.large, W_dec=lad.large.W_dec * 3)  # strong, non-linear effects
    item_of = torch.cat([torch.full((S,), L), torch.arange(L)])  # small latents: one item, not evaluated
    signs = torch.cat([torch.zeros(S), torch.ones(L)])
    attr_ref, exact_ref, mixed_ref = _per_context_reference(lm, tokens, lad.small, large, item_of, signs, L + 1,
                                                            budget)
    cs = ce_set(lm, HOOK, tokens, lad.small, large)
    got = delta_ce_attribution(lm, HOOK, cs, lad.small, large, item_of, signs, L + 1, exact_pairs=budget,
                               batch=3)
    assert got.shape == (L + 1,)
    torch.testing.assert_close(got[:L].double(), mixed_ref[:L], rtol=1e-5, atol=1e-9)
    if budget == 0:
        torch.testing.assert_close(got[:L].double(), attr_ref[:L], rtol=1e-5, atol=1e-9)
    if budget >= 10**6:  # every pair exact: the exact ΔCE of every item
        torch.testing.assert_close(got[:L].double(), exact_ref[:L], rtol=0, atol=1e-9)
    # the effects are far from linear here, and the corrected pairs matter: attribution alone is off
    assert float((attr_ref[:L] - exact_ref[:L]).abs().max()) > 0.1 * float(exact_ref[:L].abs().max())
    if budget == 7:
        err_plain = float((attr_ref[:L] - exact_ref[:L]).abs().sum())
        err_mixed = float((got[:L].double() - exact_ref[:L]).abs().sum())
        assert err_mixed < 0.9 * err_plain, (err_mixed, err_plain)  # 0.0023 vs 0.0028 observed
    # both estimates from one gradient pass (what the build records) equal the two separate ones
    first, corrected = delta_ce_attributions(lm, HOOK, cs, lad.small, large, item_of, signs, L + 1,
                                             exact_pairs=budget, batch=3)
    torch.testing.assert_close(first[:L].double(), attr_ref[:L], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(corrected, got, rtol=0, atol=0)
