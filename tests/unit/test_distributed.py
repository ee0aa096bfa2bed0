"""metasae.distributed: sharded stitching evaluations equal the single-process ones (in process and on Ray)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from metasae import distributed as dist
from metasae import stitching as st
from metasae.atlas import Manifest
from metasae.lm import tiny_model
from metasae.sae import Sae

HOOK = "blocks.1.hook_resid_pre"
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")  # source "tiny:llama:0": Ray workers rebuild the same weights from it


@pytest.fixture(scope="module")
def pair(lm, make_sae):
    """A small SAE and a large one holding noisy copies of some small rows (so swap groups exist) + new rows."""
    small = make_sae(lm.d_model, 24, seed=1, hook_name=HOOK)
    extra = make_sae(lm.d_model, 24, seed=2, hook_name=HOOK)
    g = torch.Generator().manual_seed(3)
    copies = small.W_dec[:16] + 0.15 * torch.randn(16, lm.d_model, generator=g)
    copies = torch.cat([copies, small.W_dec[:4] + 0.2 * torch.randn(4, lm.d_model, generator=g)])  # splits
    W_dec = torch.cat([copies, extra.W_dec])
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    large = Sae(W_enc=W_dec.T.contiguous(), b_enc=torch.cat([small.b_enc[:16], small.b_enc[:4], extra.b_enc]),
                W_dec=W_dec, b_dec=extra.b_dec, hook_name=HOOK)
    return small, large


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (11, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def local(lm, pair, tokens):
    seen = []
    res = dist.stitch_eval(lm, HOOK, tokens, *pair, progress=lambda f, msg: seen.append((f, msg)))
    return res, seen


def close(a, b, **kw) -> None:
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               **(TOL | kw))


def test_pair_has_every_kind_of_group(pair):
    m = st.match(*pair)
    actions = set(m.group_actions().tolist())
    assert {"add", "swap", "remove"} <= actions
    assert set(m.kind.tolist()) == {"novel", "reconstruction"}


def test_in_process_equals_direct_stitching_on_all_tokens(lm, pair, tokens, local):
    small, large = pair
    res, seen = local
    cs = st.ce_set(lm, HOOK, tokens, small, large)
    m = st.match(small, large)
    assert res["n_tokens"] == tokens.shape[0] * (tokens.shape[1] - 1) == cs.n_tokens
    assert res["kind"] == m.kind.tolist() and res["group_id"] == m.group_large.tolist()
    assert (cs.sp.value > 0).all() and len(cs.sp.value) > 100  # the SAEs do fire on the tiny model
    close(res["delta_mse"], st.latent_delta_mse(small, large, cs.sp))
    close(res["group_delta_mse"], st.group_delta_mse(small, large, m, cs.sp))
    S, L = small.width, large.width
    per_latent = torch.cat([torch.full((S,), L), torch.arange(L)])
    attr = st.delta_ce_attribution(lm, HOOK, cs, small, large, per_latent, torch.ones(S + L), L + 1)[:L]
    close(res["delta_ce_attr"], attr)
    gattr = st.delta_ce_attribution(lm, HOOK, cs, small, large, torch.as_tensor(m.group), m.signs(), m.n_groups)
    close(res["group_delta_ce_attr"], gattr)
    assert np.abs(res["delta_ce_attr"]).max() > 0
    # the curve is stitching.interpolate on all tokens, CE included (same points, same values)
    ref = st.interpolate(small, large, m, cs.sp, ce_fn=st.ce_fn_for(lm, HOOK, cs, small, large, m))
    curve = res["curve"]
    assert [c["step"] for c in curve] == ref["step"].tolist()
    assert [c["action"] for c in curve] == ref["action"].tolist()
    close([c["mse"] for c in curve], ref["mse"])
    close([c["l0"] for c in curve], ref["l0"])
    ref_ce = ref["ce_loss"].astype(object).tolist()
    assert [c["ce_loss"] is None for c in curve] == [v is None or v != v for v in ref_ce]
    close([c["ce_loss"] for c in curve if c["ce_loss"] is not None], [v for v in ref_ce if v == v and v is not None])
    assert curve[-1]["action"] == "bias" and curve[0]["action"] == "start"
    # ends at the large SAE itself
    x = cs.resid[:, 1:].reshape(-1, lm.d_model)
    close(curve[-1]["mse"], float(((x - large.reconstruct(x)) ** 2).sum()) / len(x), rtol=1e-4)
    # progress is monotone and ends at 1.0
    fr = [f for f, _ in seen]
    assert fr == sorted(fr) and fr[-1] == 1.0 and all(0 <= f <= 1 for f in fr)


def test_mse_only_skips_ce(lm, pair, tokens, local):
    res = dist.stitch_eval(lm, HOOK, tokens, *pair, metrics=("mse",))
    assert "delta_ce_attr" not in res and "group_delta_ce_attr" not in res
    assert all(c["ce_loss"] is None for c in res["curve"])
    close(res["delta_mse"], local[0]["delta_mse"])
    close([c["mse"] for c in res["curve"]], [c["mse"] for c in local[0]["curve"]])


def test_cancel_in_process(lm, pair, tokens):
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(dist.Cancelled):
        dist.stitch_eval(lm, HOOK, tokens, *pair, should_stop=stop)
    with pytest.raises(dist.Cancelled):
        dist.stitch_eval(lm, HOOK, tokens, *pair, should_stop=lambda: True)


@pytest.mark.parametrize("kw, match", [
    (dict(metrics=("mse", "kl")), "metrics"),
    (dict(metrics="mse"), "metrics"),
    (dict(n_shards=0), "n_shards"),
    (dict(threshold=1.5), "threshold"),
])
def test_bad_arguments(lm, pair, tokens, kw, match):
    with pytest.raises(ValueError, match=match):
        dist.stitch_eval(lm, HOOK, tokens, *pair, **kw)


def test_bad_tokens_and_hook(lm, pair, tokens):
    with pytest.raises(ValueError, match="tokens"):
        dist.stitch_eval(lm, HOOK, tokens[0], *pair)
    with pytest.raises(ValueError, match="tokens"):
        dist.stitch_eval(lm, HOOK, tokens[:, :1], *pair)
    with pytest.raises(ValueError, match="hook"):
        dist.stitch_eval(lm, "blocks.9.hook_resid_pre", tokens, *pair)


def test_shard_bounds():
    b = dist.shard_bounds(11, 3)
    assert len(b) == 3 and b[0][0] == 0 and b[-1][1] == 11 and all(x[1] == y[0] for x, y in zip(b[:-1], b[1:], strict=True))
    assert {hi - lo for lo, hi in b} <= {3, 4}
    assert dist.shard_bounds(2, 5) == [(0, 1), (1, 2)]
    assert dist.shard_bounds(7, 1) == [(0, 7)]


def test_worker_model_loader_rebuilds_the_tiny_model(lm):
    again = dist.load_model(lm.source, device="cpu")
    assert dist.fingerprint(again) == dist.fingerprint(lm)
    assert dist.fingerprint(dist.load_model("tiny:llama:1", device="cpu")) != dist.fingerprint(lm)
    with pytest.raises(RuntimeError, match="differs"):
        dist._worker_model(lm.source, "float32", dist.fingerprint(lm) + 1.0)


# --- Ray: a local cluster of 2 worker CPUs started (and shut down) by this module ------------------------


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray instance is already initialised in this process")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=80 * 2**20,
             configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_ray_cancel_then_results_equal_single_process(ray_local, lm, pair, tokens, local):
    # cancelled midway (once the first shard is back, the others pending): raises, the cluster stays usable
    msgs: list[str] = []
    with pytest.raises(dist.Cancelled):
        dist.stitch_eval(lm, HOOK, tokens, *pair, ray_address="local", n_shards=3,
                         progress=lambda f, msg: msgs.append(msg),
                         should_stop=lambda: any("shard 1/3" in x for x in msgs))
    assert any("shard 1/3" in x for x in msgs) and not any("interpolation" in x for x in msgs)
    seen = []
    res = dist.stitch_eval(lm, HOOK, tokens, *pair, ray_address="local", n_shards=3,
                           progress=lambda f, msg: seen.append((f, msg)))
    ref = local[0]
    assert res["ray"] and res["n_shards"] == 3 and res["n_tokens"] == ref["n_tokens"]
    assert res["kind"] == ref["kind"] and res["group_id"] == ref["group_id"]
    for key in ("delta_mse", "group_delta_mse", "delta_ce_attr", "group_delta_ce_attr"):
        close(res[key], ref[key])
    assert [c["step"] for c in res["curve"]] == [c["step"] for c in ref["curve"]]
    for key in ("mse", "l0"):
        close([c[key] for c in res["curve"]], [c[key] for c in ref["curve"]])
    assert [c["ce_loss"] is None for c in res["curve"]] == [c["ce_loss"] is None for c in ref["curve"]]
    close([c["ce_loss"] for c in res["curve"] if c["ce_loss"] is not None],
          [c["ce_loss"] for c in ref["curve"] if c["ce_loss"] is not None])
    fr = [f for f, _ in seen]
    assert fr == sorted(fr) and fr[-1] == 1.0
    assert any("shard 3/3" in msg for _, msg in seen)


@pytest.mark.slow  # starts Ray
def test_ray_started_off_the_main_thread_is_owned_by_a_thread_that_lives_on():
    """A local Ray dies with the thread that started it: a backend job thread must not be that thread."""
    import threading

    calls = []

    class FakeRay:
        def init(self, address, **kw):
            calls.append((address, threading.current_thread()))

    worker = threading.Thread(target=dist._init_ray_in_keeper_thread, args=(FakeRay(), "local"))
    worker.start()
    worker.join()
    (address, owner), = calls
    assert address == "local" and owner.name == "metasae-ray-keeper" and owner.daemon and owner.is_alive()

    class FailingRay:
        def init(self, address, **kw):
            raise ConnectionError(f"no cluster at {address}")

    with pytest.raises(ConnectionError, match="no cluster at head:6379"):
        dist._init_ray_in_keeper_thread(FailingRay(), "head:6379")


# --- the build's path and the backend's path on the same real SmolLM2 tokens ----------------------------------


@pytest.mark.slow
def test_fresh_evaluation_equals_the_build_on_the_same_smollm2_tokens(smollm2, make_sae, tmp_path):
    """stage_stitching (what the atlas stores) and stitch_eval with the atlas's build settings (what the backend
    runs) give the same numbers on the same tokens, attention sink included; without those settings the MSE
    side is dominated by the sink (issue 11: fresh curves 100x the stored ones)."""
    from metasae.activations import ActivationStore
    from metasae.pipeline.config import BuildConfig
    from metasae.pipeline.context import BuildContext
    from metasae.pipeline.stages import stage_stitching

    hook = "blocks.15.hook_resid_pre"
    text = ("Albert Einstein was a German-born theoretical physicist. Marie Curie was a chemist. The river "
            "flows to Paris, France, and the city council met on Monday to discuss the new bridge.")
    ids = smollm2.tokenizer(text)["input_ids"]
    rows = [ids[i:i + 24] for i in (0, 4, 8)]
    rows.append(ids[:8] + [0] + ids[8:23])  # <|endoftext|> mid-context: an attention sink (norm ~10k vs ~170)
    tokens = torch.tensor(rows)
    d = smollm2.d_model
    small = make_sae(d, 48, seed=11, hook_name=hook)
    extra = make_sae(d, 40, seed=12, hook_name=hook)
    g = torch.Generator().manual_seed(13)
    W = torch.cat([small.W_dec[:24] + 0.2 * torch.randn(24, d, generator=g), extra.W_dec])
    W = W / W.norm(dim=1, keepdim=True)
    large = Sae(W_enc=W.T.contiguous(), b_enc=torch.cat([small.b_enc[:24], extra.b_enc]), W_dec=W,
                b_dec=extra.b_dec, hook_name=hook)

    cfg = BuildConfig().with_values({"model": "smollm2", "hook": hook, "corpus.ctx_len": 24, "ladder.widths": [48, 64],
                                     "ladder.eval_tokens": 4 * 23, "evaluate.ce_ctx": 4,
                                     "stitching.exact_ce_latents": 2, "train.max_norm_ratio": 5.0})
    store = ActivationStore.build(smollm2, tokens, hook, tmp_path / "acts", shard_ctx=2, progress=False)
    ctx = BuildContext(cfg=cfg, work=tmp_path, out=tmp_path / "atlas", progress=False, log=lambda _m: None,
                       _store=store, _saes=[small, large], _lm=smollm2)
    stage_stitching(ctx)
    folder = tmp_path / "stitch" / "48_64"
    built = pd.read_parquet(folder / "large.parquet")
    curve = pd.read_parquet(folder / "stitching.parquet")
    summary = json.loads((folder / "done.json").read_text())

    manifest = Manifest.coerce({"model": {"name": "smollm2"}, "saes": [], "meta_sae": {},
                                "build": {"config": cfg.to_flat()}})  # as the assembly records it
    res = dist.stitch_eval(smollm2, hook, tokens, small, large, threshold=cfg.stitching.threshold,
                           **dist.build_settings(manifest))
    assert res["n_sink_tokens"] == 1 and res["n_tokens"] == summary["eval_tokens"] == 4 * 23 - 1
    assert res["n_ce_tokens"] == summary["ce_tokens"] == 4 * 23
    assert res["kind"] == built["kind"].tolist() and res["group_id"] == built["group_id"].tolist()
    tol = dict(rtol=1e-4, atol=1e-6)
    close(res["delta_mse"], built["delta_mse"], **tol)
    close(np.asarray(res["group_delta_mse"])[built["group_id"]], built["group_delta_mse"], **tol)
    # the attribution with its largest terms made exact, the same pairs on both paths
    assert res["attr_exact_pairs"] == summary["attr_exact_pairs"] == 8 * 4
    close(res["delta_ce_attr"], built["delta_ce_attr"], **tol)
    assert [c["step"] for c in res["curve"]] == curve["step"].tolist()
    assert [c["action"] for c in res["curve"]] == curve["action"].tolist()
    close([c["mse"] for c in res["curve"]], curve["mse"], **tol)
    close([c["l0"] for c in res["curve"]], curve["l0"], **tol)
    ce = [(c["ce_loss"], b) for c, b in zip(res["curve"], curve["ce_loss"], strict=True) if c["ce_loss"] is not None]
    assert len(ce) >= 2 and len(ce) == int(curve["ce_loss"].notna().sum())
    close([a for a, _ in ce], [b for _, b in ce], **tol)

    # the old fresh path: the sink stays in the MSE side, and the curve's MSE is many times the stored one
    raw = dist.stitch_eval(smollm2, hook, tokens, small, large, threshold=cfg.stitching.threshold, metrics=("mse",))
    assert raw["n_sink_tokens"] == 0 and raw["curve"][0]["mse"] > 10 * curve["mse"].iloc[0]
