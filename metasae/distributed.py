"""Stitching evaluations on new tokens, in process or spread over a Ray cluster as token shards.

`stitch_eval` measures, for a (small, large) SAE pair on the residual stream of `tokens`, everything the
Stitching page shows: each large latent's kind and swap group, ΔMSE per latent and per group, the attribution
estimate of ΔCE per latent and per group, and the interpolation curve (L0, MSE, CE) from the small SAE to the
large one.

How the work splits. Every quantity is a sum over token positions divided by the token count, so a shard of
contexts returns *partial sums* (un-normalised) and the driver adds them and divides once; the result equals
the single-process one up to float rounding (tests: 1e-5). Two rounds are needed, because the interpolation
applies groups in the order of their *global* ΔMSE:

1. per shard: ΔMSE sums per latent and per group (closed forms of `metasae.stitching`), and, with "ce", the
   attribution sums Σ_t <δ_t, dL/dx_t> from one forward + backward per batch;
2. the driver orders the groups (most MSE benefit first, as `stitching.interpolate` does), then per shard:
   `stitching.interpolate` with that order gives the exact squared error and L0 counts after every step (the
   error update is incremental per token, so it is a per-shard sum too) and, with "ce", the summed next-token
   loss at ~12 steps with the groups applied so far spliced into the model.

So the curve is exact over all tokens (no subset). On Ray, round 2 recomputes the shard's residuals (a forward
pass up to the hook and the SAE encodes) instead of keeping state in a worker between rounds; in process the
state is kept. Position 0 of every context is an attention sink and is skipped, as everywhere in metasae.

Ray. `ray_address` is passed to `ray.init(address=...)` when Ray is not initialised yet: "auto" (a running
cluster this machine belongs to), "local" (start a private local Ray), "host:6379" (a cluster's head) or
"ray://host:10001" (Ray Client). One task per shard; a task asks for one GPU when the cluster has GPUs, else
one CPU. Tasks receive the SAEs, their tokens and the model *source* (`lm.source`: "smollm2", an HF id, a
folder, a .gguf file or "tiny:<kind>:<seed>"); each worker process loads the model once and keeps it (on CUDA
when it has a GPU). Every node needs metasae and the model (the Docker image has both). The backend reads
`--ray-address` or the environment variable METASAE_RAY_ADDRESS and passes it here; this module reads no
environment itself.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from metasae import stitching as st
from metasae.atlas import Manifest
from metasae.sae import Sae, SaeError

METRICS = ("mse", "ce")
BATCH_CTX = 8  # contexts per forward pass (and per cancel / progress check in process)
_NNZ_CHUNK = 1 << 18  # nonzeros per gather when summing attribution terms or rebuilding reconstructions


class Cancelled(Exception):
    """should_stop() became true: the evaluation stopped between shards or batches."""


# --- one shard's work (the same code runs in process and in a Ray task) ------------------------------------


def _no_stop() -> None:
    return None


@dataclass
class _Shard:
    """One shard's tokens, both SAEs' activations on them, and the rows the MSE side measures.

    `cs` covers every position >= 1 (the CE side: attribution and the CE curve, as `stitching.ce_set`); `msp`
    holds the MSE side: the same positions rounded to the store's precision and without attention sinks, as
    the build's evaluation set (`ActivationStore.flat(.., max_norm_ratio)`). Without filtering or rounding
    `msp` is `cs.sp`.
    """

    cs: st.CeSet
    msp: st.Sparse
    n_sinks: int  # positions >= 1 left out of the MSE side (norm above the cap)


@torch.no_grad()
def _resid(lm, hook: str, tokens: torch.Tensor, check: Callable[[], None] = _no_stop) -> torch.Tensor:
    """The residual at `hook` (n_ctx, ctx_len, d), fp32 on the CPU, BATCH_CTX contexts per forward pass."""
    parts = []
    for b in range(0, tokens.shape[0], BATCH_CTX):
        check()
        parts.append(lm.resid(tokens[b:b + BATCH_CTX], hook).float().cpu())
    return torch.cat(parts)


def _mse_rows(resid: torch.Tensor, acts_dtype: torch.dtype | None) -> torch.Tensor:
    """Positions >= 1 as (N, d) fp32 rows, rounded through `acts_dtype` (the build stores fp16) when given."""
    flat = resid[:, 1:].reshape(-1, resid.shape[-1])
    return flat if acts_dtype is None else flat.to(acts_dtype).float()


def norm_cap(rows: Sequence[torch.Tensor], max_norm_ratio: float | None) -> float | None:
    """`max_norm_ratio` x the median row norm over all `rows` (the build's `activations.keep_rows` cut)."""
    if max_norm_ratio is None:
        return None
    return float(max_norm_ratio * torch.cat([r.norm(dim=-1) for r in rows]).median())


def _encode(lm, small: Sae, large: Sae, rows: torch.Tensor) -> st.Sparse:
    if lm.device.type == "cpu":
        return st.sparse_acts(small, large, rows)
    # encode on the accelerator, keep the sparse algebra on the CPU (stitching's index maths is CPU code)
    dev = lm.device
    g = st.sparse_acts(small.to(device=dev), large.to(device=dev), rows.to(dev))
    return st.Sparse(g.t.cpu(), g.latent.cpu(), g.value.cpu(), g.resid.cpu(), g.sq_err, g.n_tokens)


@torch.no_grad()
def _prepare(lm, hook: str, tokens: torch.Tensor, small: Sae, large: Sae, check: Callable[[], None] = _no_stop,
             resid: torch.Tensor | None = None, cap: float | None = None, max_norm_ratio: float | None = None,
             acts_dtype: torch.dtype | None = None) -> _Shard:
    """Both SAEs' nonzeros and the small-SAE-spliced residual on `tokens` (positions >= 1).

    The MSE side drops rows with norm above `cap` (else `max_norm_ratio` x this shard's median norm).
    """
    resid = _resid(lm, hook, tokens, check) if resid is None else resid
    C, T, d = resid.shape
    if d != small.d_in:
        raise SaeError(f"the model's residual at {hook} has d_model {d}, the SAEs have d_in {small.d_in}")
    flat = resid[:, 1:].reshape(-1, d)
    sp = _encode(lm, small, large, flat)
    base = resid.clone()
    base[:, 1:] = (flat - sp.resid.to(flat.dtype)).view(C, T - 1, d)
    cs = st.CeSet(tokens, resid, base, torch.full((C,), float("nan")), sp)
    rows = _mse_rows(resid, acts_dtype)
    if cap is None:
        cap = norm_cap([rows], max_norm_ratio)
    keep = None if cap is None else rows.norm(dim=-1) <= cap
    if acts_dtype is None and (keep is None or bool(keep.all())):
        return _Shard(cs, sp, 0)
    if keep is not None:
        rows = rows[keep]
    if rows.shape[0] == 0:
        raise SaeError("every token of this evaluation is an attention sink (norm above the cap); send more text")
    return _Shard(cs, _encode(lm, small, large, rows), 0 if keep is None else int((~keep).sum()))


def _stats_sums(lm, hook: str, sh: _Shard, small: Sae, large: Sae, m: st.Match, with_ce: bool,
                check: Callable[[], None] = _no_stop) -> dict:
    """Round 1 partial sums over this shard's tokens (float64 numpy arrays)."""
    sp = sh.msp
    n = sp.n_tokens
    out = {"n_tokens": n, "n_ce_tokens": sh.cs.sp.n_tokens, "n_sinks": sh.n_sinks,
           "latent_mse": st.latent_delta_mse(small, large, sp).double().numpy() * n,
           "group_mse": st.group_delta_mse(small, large, m, sp).double().numpy() * n}
    if with_ce:
        out["latent_attr"], out["group_attr"] = _attribution_sums(lm, hook, sh.cs, small, large, m, check)
    return out


def _attribution_sums(lm, hook: str, cs: st.CeSet, small: Sae, large: Sae, m: st.Match,
                      check: Callable[[], None]) -> tuple[np.ndarray, np.ndarray]:
    """Σ_t <a_j(t) d_j, dL/dx_t> per large latent and Σ_t <δ_g(t), dL/dx_t> per group, one backward per batch.

    The same terms as `stitching.delta_ce_attribution` (one gradient serves both item sets), un-normalised.
    """
    grads = []
    for b in range(0, cs.tokens.shape[0], BATCH_CTX):
        check()
        with torch.enable_grad():
            x = cs.base[b:b + BATCH_CTX].clone().requires_grad_(True)
            lm.token_losses_from(cs.tokens[b:b + BATCH_CTX], hook, x).sum().backward()
        assert x.grad is not None  # x requires grad and the loss depends on it
        grads.append(x.grad[:, 1:].reshape(-1, x.shape[-1]).cpu())
    G = torch.cat(grads)
    sp = cs.sp
    D = st._decoders(small, large)
    G = G.to(D.dtype)
    signs = m.signs().to(D.dtype)
    group = torch.as_tensor(m.group)
    lat_sum = torch.zeros(large.width, dtype=torch.float64)
    grp_sum = torch.zeros(m.n_groups, dtype=torch.float64)
    for lo in range(0, len(sp.t), _NNZ_CHUNK):
        t, lat = sp.t[lo:lo + _NNZ_CHUNK], sp.latent[lo:lo + _NNZ_CHUNK]
        term = sp.value[lo:lo + _NNZ_CHUNK] * (G[t] * D[lat]).sum(1)  # a_l <d_l, g_t>
        is_large = lat >= small.width
        lat_sum.index_add_(0, lat[is_large] - small.width, term[is_large].double())
        grp_sum.index_add_(0, group[lat], (term * signs[lat]).double())
    return lat_sum.numpy(), grp_sum.numpy()


def _ce_sum_fn(lm, hook: str, cs: st.CeSet, small: Sae, large: Sae, m: st.Match,
               check: Callable[[], None], on_point: Callable[[], None] = _no_stop):
    """ce_fn for `stitching.interpolate` returning the SUMMED next-token loss of this shard.

    The reconstruction with groups `applied` = small reconstruction + Σ over the applied groups' nonzeros of
    sign · a · d (exactly what interpolate's residual update subtracts), plus the b_dec swap at the end.
    """
    sp = cs.sp
    D = st._decoders(small, large)
    g_nnz = torch.as_tensor(m.group)[sp.latent]
    sv = sp.value * m.signs().to(sp.value.dtype)[sp.latent]
    C, T, d = cs.resid.shape
    x_hat = cs.base[:, 1:].reshape(-1, d).to(D.dtype)
    shift = (large.b_dec - small.b_dec).to(D.dtype)

    @torch.no_grad()
    def ce(applied, bias_swapped: bool) -> float:
        keep = torch.nonzero(torch.isin(g_nnz, torch.as_tensor(np.asarray(applied, dtype=np.int64))))[:, 0]
        recon = x_hat.clone()
        for lo in range(0, len(keep), _NNZ_CHUNK):
            i = keep[lo:lo + _NNZ_CHUNK]
            recon.index_add_(0, sp.t[i], sv[i, None] * D[sp.latent[i]])
        if bias_swapped:
            recon += shift
        new = cs.resid.clone()
        new[:, 1:] = recon.view(C, T - 1, d).to(new.dtype)
        total = 0.0
        for b in range(0, C, BATCH_CTX):
            check()
            total += float(lm.token_losses_from(cs.tokens[b:b + BATCH_CTX], hook, new[b:b + BATCH_CTX]).double().sum())
        on_point()
        return total

    return ce


def _curve_sums(lm, hook: str, sh: _Shard, small: Sae, large: Sae, m: st.Match, order: np.ndarray,
                with_ce: bool, check: Callable[[], None] = _no_stop,
                on_point: Callable[[], None] = _no_stop) -> dict:
    """Round 2: summed squared error, L0 count and (with ce) summed loss after each interpolation step."""
    ce_fn = _ce_sum_fn(lm, hook, sh.cs, small, large, m, check, on_point) if with_ce else None
    df = st.interpolate(small, large, m, sh.msp, order=order, ce_fn=ce_fn)
    n = sh.msp.n_tokens
    ce = [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
          for v in df["ce_loss"].astype(object)]
    return {"n_tokens": n, "n_ce_tokens": sh.cs.sp.n_tokens, "err": df["mse"].to_numpy(np.float64) * n, "l0": df["l0"].to_numpy(np.float64) * n,
            "ce": ce, "steps": df[["step", "action", "latent", "group"]].astype(object).to_dict("records")}


# --- Ray workers --------------------------------------------------------------------------------------------

_WORKER_LM: dict = {}  # (source, dtype) -> LanguageModel, one per worker process (the last one used)


def load_model(source: str, dtype: torch.dtype = torch.float32, device: str | None = None):
    """Load a model from its source string as `metasae build` does (metasae.model_spec), on CUDA where there is one."""
    from metasae.model_spec import load_model as load

    return load(source, dtype=dtype, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))


def fingerprint(lm) -> float:
    """A cheap identity check of a model's weights: the float64 sum of its input embedding matrix."""
    return float(lm.model.get_input_embeddings().weight.detach().double().sum())


def _worker_model(source: str, dtype_name: str, fp: float | None):
    key = (source, dtype_name)
    if key not in _WORKER_LM:
        _WORKER_LM.clear()  # one model per worker: a GPU holds one copy, not one per past request
        _WORKER_LM[key] = load_model(source, getattr(torch, dtype_name))
    lm = _WORKER_LM[key]
    if fp is not None:
        mine = fingerprint(lm)
        if not math.isclose(mine, fp, rel_tol=1e-6, abs_tol=1e-6):
            raise RuntimeError(f"the worker's model {source!r} differs from the driver's (embedding sum {mine} vs "
                               f"{fp}): is the same model installed on every node?")
    return lm


def _task_stats(source, dtype_name, fp, hook, tokens, small, large, m, with_ce, rows_kw) -> dict:
    lm = _worker_model(source, dtype_name, fp)
    sh = _prepare(lm, hook, tokens, small, large, **rows_kw)
    return _stats_sums(lm, hook, sh, small, large, m, with_ce)


def _task_curve(source, dtype_name, fp, hook, tokens, small, large, m, order, with_ce, rows_kw) -> dict:
    lm = _worker_model(source, dtype_name, fp)
    sh = _prepare(lm, hook, tokens, small, large, **rows_kw)
    return _curve_sums(lm, hook, sh, small, large, m, order, with_ce)


_RAY_LOCK = threading.Lock()
_REMOTE: dict = {}


def _init_ray_in_keeper_thread(ray, address: str) -> None:
    """ray.init from a daemon thread that never ends.

    Measured here (Ray 2.60): after the thread that ran `ray.init(address="local")` ended, the next call from
    another thread could not reach the GCS ("Failed to connect to GCS within 60 seconds") and the process was
    terminated, presumably because Ray's parent-death signal is tied to the spawning *thread* on Linux. Backend
    jobs run in worker threads, so the init happens in a thread that lives as long as the process.
    """
    done = threading.Event()
    error: list[BaseException] = []
    stay = threading.Event()

    def keeper() -> None:
        try:
            ray.init(address=address, log_to_driver=False)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            error.append(e)
            done.set()
            return
        done.set()
        stay.wait()

    threading.Thread(target=keeper, name="metasae-ray-keeper", daemon=True).start()
    done.wait()
    if error:
        raise error[0]


def _ray(address: str):
    import ray

    with _RAY_LOCK:
        if not ray.is_initialized():
            if threading.current_thread() is threading.main_thread():
                ray.init(address=address, log_to_driver=False)
            else:
                _init_ray_in_keeper_thread(ray, address)
        if not _REMOTE:
            _REMOTE["stats"] = ray.remote(_task_stats)
            _REMOTE["curve"] = ray.remote(_task_curve)  # type: ignore[arg-type]  # ray's overloads stop at 10 args
    return ray


def shard_bounds(n_ctx: int, n_shards: int) -> list[tuple[int, int]]:
    """Contiguous context ranges of near-equal size (the first n_ctx % n_shards shards get one more)."""
    n_shards = max(1, min(n_shards, n_ctx))
    edges = np.linspace(0, n_ctx, n_shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


# --- the driver ---------------------------------------------------------------------------------------------


def _check_args(lm, hook, tokens, metrics, n_shards) -> tuple[str, ...]:
    bad = [x for x in metrics if x not in METRICS]
    if isinstance(metrics, str) or bad:
        raise ValueError(f"metrics must be a subset of {list(METRICS)}, got {metrics!r}")
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be a (n_ctx >= 1, ctx_len >= 2) tensor of token ids, got {shape}")
    if tokens.is_floating_point():
        raise ValueError(f"tokens must hold integer token ids, got dtype {tokens.dtype}")
    if n_shards is not None and (not isinstance(n_shards, int) or n_shards < 1):
        raise ValueError(f"n_shards must be a positive integer or None, got {n_shards!r}")
    if not isinstance(lm, str):
        lm.layer_of(hook)  # ModelError for an unknown or out-of-range hook
    return tuple(metrics)


def stitch_eval(lm, hook: str, tokens: torch.Tensor, small: Sae, large: Sae, metrics=("mse", "ce"),
                threshold: float = 0.7, ray_address: str | None = None, n_shards: int | None = None,
                progress: Callable[[float, str], None] | None = None,
                should_stop: Callable[[], bool] | None = None, max_norm_ratio: float | None = None,
                acts_dtype: torch.dtype | str | None = None, attr_exact_pairs_per_ctx: int = 0) -> dict:
    """Stitching evaluation of (small, large) on `tokens` (n_ctx, ctx_len); see the module docstring.

    `lm` is a LanguageModel (with Ray it may also be just its source string). Without `ray_address` it runs
    in this process on `lm`, in batches of 8 contexts (`n_shards` is then ignored); with one, over `n_shards`
    Ray tasks (default: one per GPU of the cluster, else one per CPU, at most one per context).
    `progress(frac, message)` is called from this thread; `should_stop()` is polled between batches (in
    process) or while waiting for shards (Ray, whose pending tasks are then cancelled) and raises Cancelled.

    The MSE side (ΔMSE, the curve's MSE and L0) is measured as the build measures it: `max_norm_ratio` leaves
    out attention-sink positions (norm above that multiple of the median norm over all tokens; per shard on
    Ray) and `acts_dtype` rounds the residual first (the build's activation store is float16); the CE side
    (attribution, the curve's CE) uses every position >= 1, as the build's `stitching.ce_set` does.
    `build_settings(manifest)` gives both for an atlas; the defaults (None) filter and round nothing.
    `attr_exact_pairs_per_ctx` > 0 replaces the largest latent-context attribution terms by their exact change,
    as the build does (`stitching.attr_exact_pairs_per_ctx`); the selection is global over all contexts, so only
    the in-process path applies it (on Ray, `attr_exact_pairs` in the result is 0: first-order attribution).

    Returns {"n_tokens" (MSE-side tokens), "n_ce_tokens", "n_sink_tokens", "kind", "group_id", "delta_mse", "group_delta_mse", "delta_ce_attr",
    "group_delta_ce_attr" (the last two only with "ce"), "curve": [{"step", "action", "l0", "mse", "ce_loss",
    "group", "latent"}...]} plus "group_action", "nearest_small", "nearest_small_cos", "small_width",
    "large_width", "threshold", "n_shards", "ray". MSE is the summed squared error per token (as in the atlas);
    ΔCE values are mean next-token loss changes per token; ce_loss is None at the steps where it is not measured.
    """
    metrics = _check_args(lm, hook, tokens, metrics, n_shards)
    with_ce = "ce" in metrics
    say = progress or (lambda _f, _m: None)

    def check() -> None:
        if should_stop is not None and should_stop():
            raise Cancelled("stitching evaluation cancelled")

    check()
    t0 = time.time()
    small, large = (s if s.W_dec.device.type == "cpu" else s.to(device="cpu") for s in (small, large))
    m = st.match(small, large, threshold)
    tokens = tokens.long().cpu()
    if isinstance(acts_dtype, str):
        acts_dtype = getattr(torch, acts_dtype.removeprefix("torch."))
    rows_kw = {"max_norm_ratio": max_norm_ratio, "acts_dtype": acts_dtype}
    n_ce = min(12, m.n_groups + 1) + 1 if with_ce else 0  # CE points interpolate measures (incl. the bias step)
    if ray_address is None:
        stats, curves, used, sh = _run_local(lm, hook, tokens, small, large, m, with_ce, n_ce, say, check, rows_kw)
    else:
        stats, curves, used = _run_ray(lm, hook, tokens, small, large, m, with_ce, ray_address, n_shards, say,
                                       should_stop, rows_kw)
        sh = None
    result = _assemble(m, small, large, stats, curves, with_ce)
    budget = 0
    if with_ce and attr_exact_pairs_per_ctx > 0 and ray_address is None:
        say(0.999, "attribution: exact changes of its largest terms")
        budget = attr_exact_pairs_per_ctx * sh.cs.tokens.shape[0]
        L = large.width
        per_latent = torch.cat([torch.full((small.width,), L), torch.arange(L)])
        result["delta_ce_attr"] = st.delta_ce_attribution(lm, hook, sh.cs, small, large, per_latent,
                                                          torch.ones(small.width + L), L + 1,
                                                          exact_pairs=budget)[:L].tolist()
    result["attr_exact_pairs"] = budget
    result.update(n_shards=used, max_norm_ratio=max_norm_ratio,
                  acts_dtype=None if acts_dtype is None else str(acts_dtype).removeprefix("torch."), ray=ray_address is not None, seconds=round(time.time() - t0, 3))
    say(1.0, f"done: {result['n_tokens']} tokens in {result['seconds']:.1f}s")
    return result


def _order(stats: list[dict]) -> np.ndarray:
    n = sum(s["n_tokens"] for s in stats)
    group_mse = sum(s["group_mse"] for s in stats) / n
    return np.argsort(group_mse, kind="stable")


def _run_local(lm, hook, tokens, small, large, m, with_ce, n_ce, say, check, rows_kw):
    bounds = shard_bounds(tokens.shape[0], math.ceil(tokens.shape[0] / BATCH_CTX))
    w0, w1 = (0.3, 0.5) if with_ce else (0.6, 0.9)  # progress bar shares: forward passes, then round 1
    resids = []
    for i, (a, b) in enumerate(bounds):
        resids.append(_resid(lm, hook, tokens[a:b], check))
        say(w0 * (i + 1) / len(bounds), f"model forward passes: contexts {b}/{tokens.shape[0]}")
    # one cap over all tokens, as the build's evaluation set has one median
    cap = norm_cap([_mse_rows(r, rows_kw["acts_dtype"]) for r in resids], rows_kw["max_norm_ratio"])
    shards, stats = [], []
    for i, ((a, b), resid) in enumerate(zip(bounds, resids, strict=True)):
        sh = _prepare(lm, hook, tokens[a:b], small, large, check, resid=resid, cap=cap,
                      acts_dtype=rows_kw["acts_dtype"])
        stats.append(_stats_sums(lm, hook, sh, small, large, m, with_ce, check))
        shards.append(sh)
        say(w0 + (w1 - w0) * (i + 1) / len(bounds),
            f"ΔMSE{'/ΔCE' if with_ce else ''} on contexts {b}/{tokens.shape[0]}")
    check()
    sh = _concat(shards)
    done = [0]

    def on_point() -> None:
        done[0] += 1
        frac = min(0.999, w1 + (1 - w1) * done[0] / max(n_ce, 1) * 0.999)
        say(frac, f"interpolation curve: CE point {done[0]}/{n_ce}")

    curve = _curve_sums(lm, hook, sh, small, large, m, _order(stats), with_ce, check, on_point)
    return stats, [curve], 1, sh


def _concat_sparse(sps: Sequence[st.Sparse]) -> st.Sparse:
    off, parts = 0, []
    for sp in sps:
        parts.append(sp.t + off)
        off += sp.n_tokens
    return st.Sparse(torch.cat(parts), torch.cat([s.latent for s in sps]), torch.cat([s.value for s in sps]),
                     torch.cat([s.resid for s in sps]), sum(s.sq_err for s in sps), off)


def _concat(shards: Sequence[_Shard]) -> _Shard:
    if len(shards) == 1:
        return shards[0]
    css = [s.cs for s in shards]
    sp = _concat_sparse([c.sp for c in css])
    cs = st.CeSet(torch.cat([c.tokens for c in css]), torch.cat([c.resid for c in css]),
                  torch.cat([c.base for c in css]), torch.cat([c.base_loss for c in css]), sp)
    same = all(s.msp is s.cs.sp for s in shards)
    return _Shard(cs, sp if same else _concat_sparse([s.msp for s in shards]), sum(s.n_sinks for s in shards))


def _absolute_if_local(source: str) -> str:
    """A model folder or .gguf given relative to the driver's directory, made absolute for the workers."""
    from pathlib import Path

    from metasae.lm import DEFAULT_MODEL
    from metasae.model_spec import is_tiny

    if source == DEFAULT_MODEL or is_tiny(source):
        return source
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source  # else a hub id, resolved by each worker


def _cluster_default_shards(ray, n_ctx: int) -> tuple[int, dict]:
    res = ray.cluster_resources()
    n_gpu = int(res.get("GPU", 0))
    opts = {"num_gpus": 1} if n_gpu > 0 else {"num_cpus": 1}
    return max(1, min(n_ctx, n_gpu or int(res.get("CPU", 1)))), opts


def _run_ray(lm, hook, tokens, small, large, m, with_ce, address, n_shards, say, should_stop, rows_kw):
    ray = _ray(address)
    default, opts = _cluster_default_shards(ray, tokens.shape[0])
    bounds = shard_bounds(tokens.shape[0], n_shards or default)
    if isinstance(lm, str):
        source, dtype_name, fp = lm, "float32", None
    else:
        source, dtype_name, fp = lm.source, str(lm.dtype).removeprefix("torch."), fingerprint(lm)
    source = _absolute_if_local(source)
    refs = [ray.put(x) for x in (small, large, m)]
    common = (source, dtype_name, fp, hook)
    w1 = 0.5 if with_ce else 0.6
    say(0.0, f"{len(bounds)} shards on Ray ({'GPU' if 'num_gpus' in opts else 'CPU'} tasks)")
    stats = _gather(ray, [_REMOTE["stats"].options(**opts).remote(*common, tokens[a:b], *refs, with_ce, rows_kw)
                          for a, b in bounds], 0.0, w1, "ΔMSE" + ("/ΔCE" if with_ce else ""), say, should_stop)
    order = ray.put(_order(stats))
    curves = _gather(ray, [_REMOTE["curve"].options(**opts).remote(*common, tokens[a:b], *refs, order, with_ce,
                                                                          rows_kw)
                           for a, b in bounds], w1, 0.999 - w1, "interpolation curve", say, should_stop)
    return stats, curves, len(bounds)


def _gather(ray, refs: list, start: float, span: float, what: str, say, should_stop) -> list:
    """Wait for all refs (results in submission order), reporting progress and honouring should_stop."""
    pending, n = list(refs), len(refs)
    try:
        while pending:
            if should_stop is not None and should_stop():
                raise Cancelled("stitching evaluation cancelled")
            ready, pending = ray.wait(pending, num_returns=1, timeout=0.2)
            if ready:
                ray.get(ready)  # surface a failed task at once
                say(start + span * (n - len(pending)) / n, f"{what}: shard {n - len(pending)}/{n} done")
    except BaseException:
        for r in pending:
            ray.cancel(r)
        raise
    return ray.get(refs)


def _assemble(m: st.Match, small: Sae, large: Sae, stats: list[dict], curves: list[dict], with_ce: bool) -> dict:
    n = sum(s["n_tokens"] for s in stats)
    n_ce = sum(s["n_ce_tokens"] for s in stats)
    if sum(c["n_tokens"] for c in curves) != n or sum(c["n_ce_tokens"] for c in curves) != n_ce:
        raise RuntimeError("round 2 covered a different number of tokens than round 1")

    def total(key: str, parts: list[dict], over: int = n) -> np.ndarray:
        return sum(p[key] for p in parts) / over

    out = {"n_tokens": int(n), "n_ce_tokens": int(n_ce), "n_sink_tokens": int(sum(s["n_sinks"] for s in stats)),
           "small_width": small.width, "large_width": large.width, "threshold": m.threshold,
           "kind": m.kind.tolist(), "group_id": m.group_large.tolist(),
           "group_action": m.group_actions().tolist(), "nearest_small": m.nearest_small.tolist(),
           "nearest_small_cos": m.nearest_small_cos.astype(float).tolist(),
           "delta_mse": total("latent_mse", stats).tolist(), "group_delta_mse": total("group_mse", stats).tolist()}
    if with_ce:
        out["delta_ce_attr"] = total("latent_attr", stats, n_ce).tolist()
        out["group_delta_ce_attr"] = total("group_attr", stats, n_ce).tolist()
    err, l0 = total("err", curves), total("l0", curves)
    curve = []
    for i, step in enumerate(curves[0]["steps"]):
        ces = [c["ce"][i] for c in curves]
        ce = None if any(v is None for v in ces) else sum(ces) / n_ce
        curve.append({"step": int(step["step"]), "action": str(step["action"]), "l0": float(l0[i]),
                      "mse": float(err[i]), "ce_loss": ce, "group": _int_or_none(step["group"]),
                      "latent": _int_or_none(step["latent"])})
    out["curve"] = curve
    return out


def build_settings(manifest: Manifest) -> dict:
    """The `stitch_eval` options that measure what an atlas's build measured: its `max_norm_ratio` (attention
    sinks out of the MSE side), the activation store's float16 rounding and the attribution's exact pairs.
    Atlases without a recorded build config (imported, synthetic) get none of them."""
    cfg = manifest.build.config
    if not cfg:
        return {"max_norm_ratio": None, "acts_dtype": None, "attr_exact_pairs_per_ctx": 0}
    ratio = cfg.get("max_norm_ratio")
    pairs = cfg.get("stitching_attr_exact_pairs_per_ctx")  # absent: built before it existed, first order
    return {"max_norm_ratio": float(ratio) if isinstance(ratio, (int, float)) else None, "acts_dtype": "float16",
            "attr_exact_pairs_per_ctx": int(pairs) if isinstance(pairs, int) and not isinstance(pairs, bool) else 0}


def _int_or_none(v) -> int | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return int(v)
