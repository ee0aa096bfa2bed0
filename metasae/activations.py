"""Hook activations streamed to disk shards (safetensors, fp16), resumable, and a shuffling data provider.

Layout of a store folder: `meta.json` (what was asked: model, hook, shapes, tokens checksum), `tokens.safetensors`
(the contexts, int32) and `shard_00000.safetensors` ... each holding `acts` (n_ctx_in_shard, ctx_len, d_model).
A shard is written to a temp name and renamed, so a killed build leaves only whole shards and resumes after them.
Position 0 of every context is kept on disk but skipped by the provider and the statistics: its residual norm is
orders of magnitude larger than the rest (an attention sink), which would dominate any SAE loss.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

META = "meta.json"
TOKENS = "tokens.safetensors"


def _build_worker(load_lm: Callable[[], object], tokens: torch.Tensor, hook: str, root: str, shard_ctx: int,
                  worker: tuple[int, int], progress: bool) -> None:
    torch.set_num_threads(1)
    ActivationStore.build(load_lm(), tokens, hook, root, shard_ctx=shard_ctx, progress=progress, worker=worker)


def keep_rows(x: torch.Tensor, max_norm_ratio: float) -> torch.Tensor:
    """Mask of rows whose norm is at most `max_norm_ratio` x the median row norm.

    Besides position 0, a few tokens per hundred thousand are attention sinks with norms 10-100x the rest; in
    SmolLM2's layer 15 they are 0.006% of tokens but over half the variance, so they would dominate MSE and FVU.
    """
    n = x.float().norm(dim=-1)
    return n <= max_norm_ratio * n.median()


class ActivationError(ValueError):
    """A store that is missing, incomplete or was built for something else."""


def tokens_digest(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int32).contiguous().numpy().tobytes()).hexdigest()[:16]


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: parallel workers may race on meta
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class ActivationStore:
    """A folder of activation shards for one (model, hook, token set)."""

    root: Path
    meta: dict

    @property
    def n_ctx(self) -> int:
        return int(self.meta["n_ctx"])

    @property
    def ctx_len(self) -> int:
        return int(self.meta["ctx_len"])

    @property
    def d_model(self) -> int:
        return int(self.meta["d_model"])

    @property
    def shard_ctx(self) -> int:
        return int(self.meta["shard_ctx"])

    @property
    def n_shards(self) -> int:
        return -(-self.n_ctx // self.shard_ctx)

    @property
    def n_train_tokens(self) -> int:
        return self.n_ctx * (self.ctx_len - 1)

    def shard_path(self, i: int) -> Path:
        return self.root / f"shard_{i:05d}.safetensors"

    @classmethod
    def build(cls, lm, tokens: torch.Tensor, hook: str, root: str | Path, shard_ctx: int = 256,
              batch_ctx: int = 16, progress: bool = True, worker: tuple[int, int] = (0, 1)) -> ActivationStore:
        """Compute (or resume computing) activations of `tokens` at `hook` into `root`.

        `worker=(i, n)` computes only the shards with index = i mod n, so n single-threaded processes can fill
        one store side by side (see `build_parallel`); every shard is written atomically, so they never collide.
        """
        root = Path(root)
        if tokens.ndim != 2 or tokens.shape[0] == 0:
            raise ActivationError(f"tokens must be a non-empty (n_ctx, ctx_len) tensor, got {tuple(tokens.shape)}")
        lm.layer_of(hook)  # fail before writing anything if the hook does not exist
        meta = {"model": lm.name, "hook": hook, "n_ctx": int(tokens.shape[0]), "ctx_len": int(tokens.shape[1]),
                "d_model": lm.d_model, "shard_ctx": shard_ctx, "dtype": "float16", "tokens": tokens_digest(tokens)}
        root.mkdir(parents=True, exist_ok=True)
        if (root / META).exists():
            old = json.loads((root / META).read_text())
            if old != meta:
                diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
                raise ActivationError(f"activation store {root} was built for something else {diff}; "
                                      "use another folder or delete it")
        else:
            _save_atomic({"tokens": tokens.to(torch.int32)}, root / TOKENS)
            tmp = root / f"{META}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(meta, indent=1))
            os.replace(tmp, root / META)
        store = cls(root, meta)
        todo = [i for i in range(store.n_shards) if i % worker[1] == worker[0] and not store.shard_path(i).exists()]
        bar = tqdm(total=len(todo) * shard_ctx * tokens.shape[1], desc=f"activations {hook}", unit="tok",
                   unit_scale=True, disable=not progress or not todo)
        for i in todo:
            # a killed build's half-written temp files of this shard (any process's) go before it is redone
            for stale in root.glob(f"{store.shard_path(i).name}*.tmp"):
                stale.unlink(missing_ok=True)
            lo, hi = i * shard_ctx, min((i + 1) * shard_ctx, store.n_ctx)
            parts = []
            for b in range(lo, hi, batch_ctx):
                chunk = tokens[b:min(b + batch_ctx, hi)]
                parts.append(lm.resid(chunk, hook).to("cpu", torch.float16))
                bar.update(chunk.numel())
            _save_atomic({"acts": torch.cat(parts)}, store.shard_path(i))
        bar.close()
        return store

    @classmethod
    def build_parallel(cls, load_lm: Callable[[], object], tokens: torch.Tensor, hook: str, root: str | Path,
                       workers: int, shard_ctx: int = 256, progress: bool = True) -> ActivationStore:
        """`build` spread over `workers` processes of one torch thread each.

        On a 2-core machine that also runs other work, one process with two torch threads slowed from ~1450 to
        ~320 tok/s (its threads wait on each other whenever one is descheduled); single-threaded processes on
        disjoint shards degrade only in proportion to the load. `load_lm` must be picklable (a module function).
        """
        if workers <= 1:
            return cls.build(load_lm(), tokens, hook, root, shard_ctx=shard_ctx, progress=progress)
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_build_worker, args=(load_lm, tokens, hook, str(root), shard_ctx, (i, workers),
                                                         progress and i == 0)) for i in range(workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        bad = [p.exitcode for p in procs if p.exitcode != 0]
        if bad:
            raise ActivationError(f"{len(bad)} activation worker(s) failed (exit codes {bad}); run the build again "
                                  "to resume from the shards already written")
        return cls.open(root)

    @classmethod
    def open(cls, root: str | Path) -> ActivationStore:
        """Open a complete store; names the first missing shard otherwise."""
        root = Path(root)
        if not (root / META).is_file():
            raise ActivationError(f"{root} is not an activation store (no {META})")
        store = cls(root, json.loads((root / META).read_text()))
        missing = [store.shard_path(i).name for i in range(store.n_shards) if not store.shard_path(i).is_file()]
        if missing:
            raise ActivationError(f"activation store {root} is incomplete: missing {missing[0]}"
                                  + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                                  + "; run the build again to resume")
        return store

    def tokens(self) -> torch.Tensor:
        return load_file(str(self.root / TOKENS))["tokens"].long()

    def shard(self, i: int) -> torch.Tensor:
        path = self.shard_path(i)
        if not path.is_file():
            raise ActivationError(f"missing shard {path}")
        try:
            acts = load_file(str(path))["acts"]
        except Exception as e:
            raise ActivationError(f"corrupt shard {path}: {e}") from e
        expect = (min(self.shard_ctx, self.n_ctx - i * self.shard_ctx), self.ctx_len, self.d_model)
        if tuple(acts.shape) != expect:
            raise ActivationError(f"shard {path} has shape {tuple(acts.shape)}, expected {expect}")
        return acts

    def iter_contexts(self, max_ctx: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """(first context index, acts (n, ctx_len, d) fp16) shard by shard, in order."""
        limit = self.n_ctx if max_ctx is None else min(max_ctx, self.n_ctx)
        for i in range(self.n_shards):
            lo = i * self.shard_ctx
            if lo >= limit:
                return
            yield lo, self.shard(i)[: limit - lo]

    def flat(self, max_ctx: int | None = None, max_norm_ratio: float | None = None) -> torch.Tensor:
        """All activations (positions >= 1) of the first contexts as one fp32 (n, d) tensor — for evaluation sets."""
        x = torch.cat([a[:, 1:].reshape(-1, self.d_model).float() for _, a in self.iter_contexts(max_ctx)])
        return x if max_norm_ratio is None else x[keep_rows(x, max_norm_ratio)]

    def provider(self, batch_size: int, seed: int = 0, buffer_shards: int = 8,
                 skip_ctx: int = 0, max_norm_ratio: float | None = None) -> Iterator[torch.Tensor]:
        """Endless fp32 batches (batch_size, d), shuffled across shards; deterministic given seed.

        Holds `buffer_shards` shards in memory at a time, mixes their rows, and moves through the shards in a
        fresh random order each epoch. `skip_ctx` leaves the first contexts out (held out for evaluation).
        `max_norm_ratio` drops rows whose norm exceeds that multiple of the buffer's median norm (see `keep_rows`).
        """
        g = torch.Generator().manual_seed(seed)
        first = skip_ctx // self.shard_ctx
        if first >= self.n_shards:
            raise ActivationError(f"no training shards left after holding out {skip_ctx} contexts")
        while True:
            order = (torch.randperm(self.n_shards - first, generator=g) + first).tolist()
            yielded = False
            for s in range(0, len(order), buffer_shards):
                rows = []
                for i in order[s:s + buffer_shards]:
                    acts = self.shard(i)
                    lo = max(0, skip_ctx - i * self.shard_ctx)
                    rows.append(acts[lo:, 1:].reshape(-1, self.d_model))
                buf = torch.cat(rows)
                if max_norm_ratio is not None:
                    buf = buf[keep_rows(buf, max_norm_ratio)]
                perm = torch.randperm(buf.shape[0], generator=g)
                for b in range(0, buf.shape[0] - batch_size + 1, batch_size):
                    yielded = True
                    yield buf[perm[b:b + batch_size]].float()
            if not yielded:  # every buffer is smaller than one batch: fail instead of looping forever
                raise ActivationError(f"batch_size {batch_size} is larger than any buffer of {buffer_shards} shards "
                                      f"({self.shard_ctx} contexts each); lower it or raise buffer_shards")
