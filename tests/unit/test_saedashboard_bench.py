"""The SAEDashboard side-by-side benchmark's comparison logic, on planted data (no SAEDashboard needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import saedashboard as sd


def _token_topk(acts: np.ndarray, K: int):
    """SAEDashboard's rule: the top-K (context, position) tokens of a (n_ctx, T) activation array."""
    flat = np.argsort(-acts, axis=None, kind="stable")[:K]
    c, p = np.unravel_index(flat, acts.shape)
    return c, p, acts[c, p]


def _context_topk(acts: np.ndarray, k: int):
    """Our rule: the top-k contexts by their max activation (position 0 skipped)."""
    a = acts[:, 1:]
    mx, pos = a.max(1), a.argmax(1) + 1
    order = np.argsort(-mx, kind="stable")[:k]
    val = mx[order]
    return np.where(val > 0, order, -1), pos[order], np.clip(val, 0, None)


def _planted(w=12, n_ctx=30, T=16, seed=0):
    rng = np.random.default_rng(seed)
    acts = np.maximum(rng.normal(size=(w, n_ctx, T)) - 1.5, 0).astype(np.float32)
    acts[:, :, 0] = 0  # silent at position 0, as the benchmark's SAE is
    acts[3] = 0  # a dead latent
    acts[4, 7, 5], acts[4, 7, 9] = 9.0, 8.0  # two top tokens in one context
    return acts


def _both(acts, k=5, K=8):
    ours = [np.stack(x) for x in zip(*(_context_topk(a, k) for a in acts), strict=True)]
    theirs = [np.stack(x) for x in zip(*(_token_topk(a, K) for a in acts), strict=True)]
    return ours, theirs


def test_dedup_keeps_each_context_at_its_max():
    c, p, v = sd.dedup_contexts(np.array([7, 7, 2, 5, 2]), np.array([5, 9, 1, 3, 4]),
                                np.array([9.0, 8.0, 4.0, 3.0, 0.0]))
    assert c.tolist() == [7, 2, 5] and p.tolist() == [5, 1, 3] and v.tolist() == [9.0, 4.0, 3.0]


def test_top_token_and_top_context_rules_agree_on_planted_data():
    acts = _planted()
    (oc, op, ov), (tc, tp, tv) = _both(acts)
    r = sd.compare_topk(oc, op, ov, tc, tp, tv)
    assert r["topk_agree"] == 1.0 and r["top1_agree"] == 1.0 and r["topk_value_max_abs_err"] == 0.0


def test_a_wrong_context_or_position_or_value_is_caught():
    acts = _planted()
    (oc, op, ov), (tc, tp, tv) = _both(acts)
    bad = tp.copy()
    bad[4, 0] += 1  # SAEDashboard's top token of latent 4 at another position
    assert sd.compare_topk(oc, op, ov, tc, bad, tv)["topk_agree"] == pytest.approx(11 / 12)
    worse = ov.copy()
    worse[5, 0] += 0.5
    r = sd.compare_topk(oc, op, worse, tc, tp, tv)
    assert r["topk_agree"] == pytest.approx(11 / 12) and r["topk_value_max_abs_err"] == pytest.approx(0.5)
    swapped = oc.copy()
    swapped[0, [0, 1]] = swapped[0, [1, 0]]
    r = sd.compare_topk(swapped, op, ov, tc, tp, tv)
    assert r["topk_agree"] < 1 and r["top1_agree"] < 1


def test_near_ties_may_swap():
    ours = (np.array([[1, 2, 3]]), np.array([[4, 4, 4]]), np.array([[5.0, 4.99995, 1.0]], np.float32))
    theirs = (np.array([[2, 1, 3]]), np.array([[4, 4, 4]]), np.array([[5.0, 4.99995, 1.0]], np.float32))
    assert sd.compare_topk(*ours, *theirs)["topk_agree"] == 1.0


def test_density_counts():
    r = sd.compare_density(np.array([3, 0, 10]), np.array([3, 0, 12]), n_tokens=100)
    assert r["density_agree"] == pytest.approx(2 / 3) and r["density_max_abs_err"] == pytest.approx(0.02)
    assert sd.compare_logits(np.array([[1, 2], [3, 4]]), np.array([[2, 1], [3, 5]])) == 0.5


@pytest.mark.slow  # runs both generators, SAEDashboard in its own venv
@pytest.mark.skipif(not sd.ENV_PYTHON.is_file(), reason="SAEDashboard's venv is absent (bash scripts/saedashboard_env.sh)")
def test_full_run_prints_the_json_keys(capsys):
    assert sd.main(["--quick", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(r) >= sd.JSON_KEYS
    assert r["topk_agree"] > 0.95 and r["density_agree"] > 0.95 and r["resid_max_abs_err"] < 1e-3
