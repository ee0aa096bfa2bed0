"""POST /v1/stitch: queue a stitching evaluation of a (small, large) pair on new tokens; see /v1/jobs."""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Mapping
from typing import Any

from metasae.atlas import AtlasError, Manifest
from metasae.atlas.manifest import DEFAULT_CTX_LEN
from metasae.backend.config import Settings
from metasae.backend.endpoints.activations import token_ids
from metasae.backend.errors import ApiError, field_error
from metasae.backend.jobs import Job, JobCancelled, JobManager
from metasae.backend.resources import Resources
from metasae.backend.schemas import StitchRequest


def load_stitch_fn(spec: str) -> tuple[Callable, tuple[type[BaseException], ...]]:
    """The evaluator named `module:function` and the module's `Cancelled` exception (if it has one)."""
    module_name, _, fn_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        fn = getattr(module, fn_name)
    except (ImportError, AttributeError) as e:
        raise ApiError(501, f"the stitching evaluator {spec} is not available here: {e}") from e
    cancelled = getattr(module, "Cancelled", None)
    return fn, ((cancelled,) if isinstance(cancelled, type) and issubclass(cancelled, BaseException) else ())


def ctx_len_of(manifest: Mapping[str, Any]) -> int:
    """Tokens per context from a manifest.json object read before the atlas opens (``atlas_spec``); a manifest
    that does not validate gives the default."""
    try:
        return Manifest.coerce(manifest).ctx_len
    except AtlasError:
        return DEFAULT_CTX_LEN


def text_tokens(tokenizer, text: str, ctx_len: int, limit: int):
    """`text` cut into rows of ctx_len tokens (one shorter row when the text is shorter; the tail is dropped)."""
    import torch

    ids = token_ids(tokenizer, text)
    if len(ids) < 2:
        raise field_error("text", f"gives {len(ids)} token(s); stitching needs at least 2")
    if len(ids) > limit:
        raise field_error("text", f"gives {len(ids)} tokens, the limit is {limit}", 413)
    width = min(ctx_len, len(ids))
    rows = len(ids) // width
    return torch.tensor(ids[: rows * width], dtype=torch.long).view(rows, width)


def corpus_tokens(res: Resources, n_tokens: int, seed: int):
    """`n_tokens` tokens of the atlas's own corpus sources (those installed here), shuffled by `seed`."""
    from metasae.corpus import available_sources, build_contexts

    manifest: Manifest = res.atlas().manifest
    sources = manifest.corpus.sources or ["wiki"]  # an atlas that records no corpus: the default source
    have = available_sources()
    usable = [s for s in sources if have.get(s, True)]
    if not usable:
        raise field_error("n_tokens", f"none of the atlas's corpus sources {sources} is installed here; send text")
    return build_contexts(usable, res.lm().tokenizer, manifest.ctx_len, n_tokens, seed=seed)


def as_built(fn: Callable, manifest: Manifest) -> dict:
    """The options that make `fn` measure what the atlas's build measured (sink filtering, fp16 rounding), for
    an evaluator that takes them (`metasae.distributed.build_settings`); others get none."""
    import inspect

    from metasae.distributed import build_settings

    params = inspect.signature(fn).parameters
    return {k: v for k, v in build_settings(manifest).items() if k in params}


def stitch_job(req: StitchRequest, res: Resources, settings: Settings) -> Callable[[Job], dict]:
    fn, cancelled = load_stitch_fn(settings.stitch_fn)
    manifest: Manifest = res.atlas().manifest
    threshold = req.threshold or manifest.stitching.threshold
    built = as_built(fn, manifest)

    def run(job: Job) -> dict:
        with res.use():
            job.report(0.0, "loading the model and SAEs")
            lm = res.lm()
            small, large = res.sae(req.small, "small"), res.sae(req.large, "large")
            job.report(0.02, "preparing tokens")
            if req.text is not None:
                tokens = text_tokens(lm.tokenizer, req.text, res.atlas().manifest.ctx_len, settings.max_stitch_tokens)
            else:
                tokens = corpus_tokens(res, req.n_tokens, req.seed)
            job.report(0.05, f"evaluating on {tokens.numel()} tokens")

            def progress(fraction: float, message: str = "") -> None:
                job.progress = max(job.progress, min(1.0, 0.05 + 0.95 * float(fraction)))
                if message:
                    job.message = message

            t = time.perf_counter()
            try:
                out = fn(lm, res.hook, tokens, small, large, metrics=tuple(req.metrics), threshold=threshold,
                         ray_address=settings.ray_address, n_shards=req.n_shards, progress=progress,
                         should_stop=job.should_stop, **built)
            except cancelled as e:
                raise JobCancelled(str(e)) from e
            seconds = time.perf_counter() - t
            if job.should_stop():
                raise JobCancelled(job.id)
            out = dict(out)
            n = int(out.get("n_tokens") or tokens.numel())
            out.update(small=req.small, large=req.large, metrics=list(req.metrics), threshold=threshold,
                       seconds=seconds, tokens_per_s=n / seconds if seconds > 0 else None, device=res.device,
                       ray_address=settings.ray_address)
            return out

    return run


def start_stitch(req: StitchRequest, res: Resources, jobs: JobManager, settings: Settings) -> dict:
    """Queue the job. The body's schema (schemas.stitch_body) already holds exactly one of text / n_tokens, text
    that is not blank nor too long, n_tokens within the limits, widths of the atlas; what it cannot say is here."""
    res.check_width(req.small, "small")
    res.check_width(req.large, "large")
    if req.large <= req.small:
        raise field_error("large", f"must be wider than small ({req.large} <= {req.small})")
    if req.n_tokens is not None and req.n_tokens < (ctx := res.atlas().manifest.ctx_len):  # ctx unknown at start
        raise field_error("n_tokens", f"must be at least one context ({ctx} tokens), got {req.n_tokens}")
    summary = req.model_dump(exclude_none=True)
    if req.text is not None:
        summary["text"] = f"<{len(req.text)} characters>"
    job = jobs.submit("stitch", summary, stitch_job(req, res, settings))
    return {"job_id": job.id, "status": job.status}
