"""metasae.activations: shards equal the residual, kill-resume is byte-identical, the provider is sound."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from metasae.activations import META, TOKENS, ActivationError, ActivationStore, tokens_digest

HOOK = "blocks.2.hook_resid_pre"
N_CTX, CTX_LEN, SHARD_CTX = 10, 9, 4  # 3 shards, the last one partial (2 contexts)


def _tokens(seed: int = 0, n: int = N_CTX) -> torch.Tensor:
    return torch.randint(0, 256, (n, CTX_LEN), generator=torch.Generator().manual_seed(seed))


def _build(lm, tokens, root, **kw) -> ActivationStore:
    return ActivationStore.build(
        lm, tokens, HOOK, root, shard_ctx=SHARD_CTX, batch_ctx=3, progress=False, **kw
    )


def _snapshot(root) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.iterdir())}


def test_shards_equal_the_models_residual(tiny_llama, tmp_path):
    tokens = _tokens()
    store = _build(tiny_llama, tokens, tmp_path / "s")
    assert (store.n_ctx, store.ctx_len, store.d_model, store.n_shards) == (10, 9, 32, 3)
    assert store.n_train_tokens == 10 * 8
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted(
        [META, TOKENS, "shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors"]
    )
    ref = tiny_llama.resid(tokens, HOOK)
    # fp16 storage: relative rounding 2^-11, plus tiny batch-composition noise of the fp32 forward
    parts = [store.shard(i) for i in range(3)]
    assert [p.shape[0] for p in parts] == [4, 4, 2] and all(p.dtype == torch.float16 for p in parts)
    torch.testing.assert_close(torch.cat(parts).float(), ref, rtol=1e-3, atol=1e-4)
    assert torch.equal(store.tokens(), tokens)
    flat = store.flat()
    assert flat.shape == (80, 32) and flat.dtype == torch.float32
    torch.testing.assert_close(flat, ref[:, 1:].reshape(-1, 32), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(store.flat(max_ctx=5), flat[: 5 * 8], rtol=0, atol=0)
    starts = [lo for lo, _ in store.iter_contexts(max_ctx=6)]
    assert starts == [0, 4]
    meta = json.loads((tmp_path / "s" / META).read_text())
    assert (
        meta["hook"] == HOOK and meta["tokens"] == tokens_digest(tokens) and meta["model"] == tiny_llama.name
    )
    reopened = ActivationStore.open(tmp_path / "s")
    assert reopened.meta == store.meta


def test_kill_resume_is_byte_identical_and_leaves_whole_shards_alone(tiny_llama, tmp_path):
    tokens = _tokens(1)
    _build(tiny_llama, tokens, tmp_path / "whole")
    _build(tiny_llama, tokens, tmp_path / "killed")
    killed = tmp_path / "killed"
    (killed / "shard_00001.safetensors").unlink()  # the build died while writing shard 1 ...
    (killed / "shard_00001.safetensors.tmp").write_bytes(b"half a shard")  # ... leaving its temp file
    old = 1_000_000_000 * 10**9  # mark the surviving files with an old mtime: a rewrite would change it
    for p in killed.iterdir():
        os.utime(p, ns=(old, old))
    with pytest.raises(ActivationError, match="shard_00001.safetensors"):
        ActivationStore.open(killed)

    _build(tiny_llama, tokens, killed)
    whole, resumed = _snapshot(tmp_path / "whole"), _snapshot(killed)
    assert sorted(resumed) == sorted(whole)  # the temp file is gone, nothing extra
    for name in whole:
        assert resumed[name][0] == whole[name][0], f"{name} differs from an uninterrupted build"
    for name in (META, TOKENS, "shard_00000.safetensors", "shard_00002.safetensors"):
        assert resumed[name][1] == old, f"{name} was rewritten"
    assert resumed["shard_00001.safetensors"][1] != old
    ActivationStore.open(killed)


@pytest.mark.parametrize("change", ["tokens", "hook", "shard_ctx"])
def test_building_something_else_into_the_same_folder_is_refused_untouched(tiny_llama, tmp_path, change):
    root = tmp_path / "s"
    _build(tiny_llama, _tokens(2), root)
    (
        root / "shard_00002.safetensors"
    ).unlink()  # even an incomplete store must not be "resumed" with other data
    before = _snapshot(root)
    kw = dict(shard_ctx=SHARD_CTX, batch_ctx=3, progress=False)
    tokens, hook = _tokens(2), HOOK
    if change == "tokens":
        tokens = _tokens(3)
    elif change == "hook":
        hook = "blocks.1.hook_resid_pre"
    else:
        kw["shard_ctx"] = 5
    with pytest.raises(ActivationError, match="built for something else") as e:
        ActivationStore.build(tiny_llama, tokens, hook, root, **kw)
    assert str(root) in str(e.value)
    assert {"tokens": "tokens", "hook": "hook", "shard_ctx": "shard_ctx"}[change] in str(e.value)
    assert _snapshot(root) == before


def test_bad_tokens_and_hooks_fail_before_writing(tiny_llama, tmp_path):
    with pytest.raises(ActivationError, match="non-empty"):
        _build(tiny_llama, torch.zeros(0, 5, dtype=torch.long), tmp_path / "a")
    with pytest.raises(ActivationError, match="non-empty"):
        _build(tiny_llama, torch.zeros(5, dtype=torch.long), tmp_path / "a")
    from metasae.lm import ModelError

    with pytest.raises(ModelError):
        ActivationStore.build(
            tiny_llama, _tokens(), "blocks.9.hook_resid_pre", tmp_path / "b", progress=False
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_open_names_the_missing_shard(tiny_llama, tmp_path):
    root = tmp_path / "s"
    _build(tiny_llama, _tokens(4), root)
    (root / "shard_00002.safetensors").unlink()
    with pytest.raises(ActivationError, match=r"incomplete: missing shard_00002\.safetensors;"):
        ActivationStore.open(root)
    (root / "shard_00000.safetensors").unlink()
    with pytest.raises(ActivationError, match=r"missing shard_00000\.safetensors and 1 more"):
        ActivationStore.open(root)
    with pytest.raises(ActivationError, match="not an activation store"):
        ActivationStore.open(tmp_path / "nothing_here")


def test_a_shard_of_the_wrong_shape_is_refused(tiny_llama, tmp_path):
    root = tmp_path / "s"
    store = _build(tiny_llama, _tokens(4), root)
    save_file(
        {"acts": torch.zeros(3, CTX_LEN, 32, dtype=torch.float16)}, str(root / "shard_00000.safetensors")
    )
    with pytest.raises(ActivationError, match=r"shard_00000\.safetensors has shape \(3, 9, 32\)"):
        store.shard(0)


# --- the provider, on a planted store: each row holds its own id, position 0 holds a marker -------------

P_CTX, P_LEN, P_SHARD, P_D = 12, 5, 4, 3
MARKER = -1000.0


def _planted_store(root, sinks: tuple[tuple[int, int], ...] = ()) -> ActivationStore:
    """Rows hold their training row id in every dim; `sinks` (ctx, pos) hold 10000 (an attention sink's norm)."""
    root.mkdir()
    meta = {
        "model": "planted",
        "hook": HOOK,
        "n_ctx": P_CTX,
        "ctx_len": P_LEN,
        "d_model": P_D,
        "shard_ctx": P_SHARD,
        "dtype": "float16",
        "tokens": "x",
    }
    (root / META).write_text(json.dumps(meta))
    ids = torch.arange(P_CTX * (P_LEN - 1), dtype=torch.float32).view(P_CTX, P_LEN - 1)  # training row ids
    acts = torch.empty(P_CTX, P_LEN, P_D)
    acts[:, 0] = MARKER
    acts[:, 1:] = ids[..., None]
    for c, p in sinks:
        acts[c, p] = 10_000.0
    store = ActivationStore(root, meta)
    for i in range(store.n_shards):
        save_file(
            {"acts": acts[i * P_SHARD : (i + 1) * P_SHARD].half().contiguous()}, str(store.shard_path(i))
        )
    return ActivationStore.open(root)


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_provider_epoch_covers_every_row_once_and_never_position_zero(tmp_path):
    store = _planted_store(tmp_path / "p")
    n_rows = P_CTX * (P_LEN - 1)  # 48
    # buffer_shards=2 -> buffers of 32 and 16 rows, both multiples of the batch: one epoch = 6 batches
    batches = _take(store.provider(8, seed=3, buffer_shards=2), 2 * n_rows // 8)
    for b in batches:
        assert b.shape == (8, P_D) and b.dtype == torch.float32
        assert bool((b != MARKER).all())
        assert bool((b == b[:, :1]).all())  # rows are whole rows, not mixed
    for epoch in (batches[:6], batches[6:]):
        ids = torch.cat([b[:, 0] for b in epoch]).long()
        assert sorted(ids.tolist()) == list(range(n_rows))
    first, second = torch.cat(batches[:6]), torch.cat(batches[6:])
    assert not torch.equal(first, second)  # a fresh order each epoch


def test_provider_is_deterministic_for_a_seed_and_shuffles(tmp_path):
    store = _planted_store(tmp_path / "p")
    a = torch.cat(_take(store.provider(4, seed=11), 20))
    b = torch.cat(_take(store.provider(4, seed=11), 20))
    c = torch.cat(_take(store.provider(4, seed=12), 20))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    ids = a[:48, 0].long().tolist()
    assert ids != sorted(ids)  # actually shuffled


def test_provider_holds_out_the_first_contexts(tmp_path):
    store = _planted_store(tmp_path / "p")
    skip = 5  # contexts 0..4 held out; context 4 sits inside shard 1
    held_out_ids = set(range(skip * (P_LEN - 1)))
    ids = torch.cat([b[:, 0] for b in _take(store.provider(4, seed=0, skip_ctx=skip), 7)]).long().tolist()
    assert sorted(ids) == list(range(skip * (P_LEN - 1), P_CTX * (P_LEN - 1)))  # 28 rows: all the rest, once
    assert not held_out_ids & set(ids)
    with pytest.raises(ActivationError, match="no training shards"):
        next(store.provider(4, skip_ctx=12))


def test_provider_refuses_a_batch_larger_than_its_buffers_instead_of_hanging(tmp_path):
    store = _planted_store(tmp_path / "p")
    with pytest.raises(ActivationError, match="batch_size 64 is larger"):
        next(store.provider(64))  # 48 training rows in all
    with pytest.raises(ActivationError, match="raise buffer_shards"):
        next(store.provider(20, buffer_shards=1))  # 16 rows a shard, 48 in all
    assert next(store.provider(20, buffer_shards=3)).shape == (20, P_D)


def test_attention_sinks_are_left_out_of_training_and_evaluation_rows(tmp_path):
    sinks = ((0, 1), (5, 3), (11, 4))
    store = _planted_store(tmp_path / "p", sinks)
    sink_ids = {c * (P_LEN - 1) + p - 1 for c, p in sinks}
    n_rows = P_CTX * (P_LEN - 1)
    # one epoch with buffer_shards=3 is one buffer of 48 rows -> 45 kept -> 11 batches of 4 (one row left over)
    kept = torch.cat(_take(store.provider(4, seed=0, buffer_shards=3, max_norm_ratio=5.0), 11))
    assert not bool((kept == 10_000).any())
    assert set(kept[:, 0].long().tolist()) <= set(range(n_rows)) - sink_ids
    assert len(set(kept[:, 0].long().tolist())) == 44
    flat = store.flat(max_norm_ratio=5.0)
    assert sorted(flat[:, 0].long().tolist()) == sorted(set(range(n_rows)) - sink_ids)
    assert store.flat().shape[0] == n_rows  # without the ratio nothing is dropped
