"""The stages of `metasae build`, in order (`STAGES`). Each writes its outputs under the work folder and skips
what is already there, so a killed build resumes; each names the config sections its outputs depend on, so a
changed setting redoes its stage and the later ones only.

To add a stage: write `def stage_x(ctx: BuildContext) -> None` (skip when its outputs exist), then add a
`StageSpec` to `STAGES` at its place with its outputs and the config it depends on.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from metasae import novelty
from metasae.atlas import write_json_atomic
from metasae.model_spec import is_tiny
from metasae.parallel import run_jobs
from metasae.pipeline.assemble import stage_assemble
from metasae.pipeline.config import BuildConfig
from metasae.pipeline.context import BuildContext, load_model, n_eval_ctx
from metasae.sae import Sae

if TYPE_CHECKING:
    import numpy as np


def contexts(ctx: BuildContext) -> torch.Tensor:
    """Token contexts of the corpus (saved once, so later stages and resumes see the same tokens)."""
    from safetensors.torch import load_file, save_file

    from metasae.corpus import available_sources, build_contexts

    cfg, work = ctx.cfg, ctx.work
    path = work / "contexts.safetensors"
    if path.is_file():
        return load_file(str(path))["tokens"].long()
    sources = list(cfg.corpus.sources)
    have = available_sources()
    missing = [s for s in sources if s in have and not have[s]]
    if missing:
        ctx.log(f"corpus: {missing} not installed here (apt-get install wordnet-base); using "
                f"{sorted(set(sources) - set(missing))}")
        sources = [s for s in sources if s not in missing]
    toks = build_contexts(sources, ctx.lm.tokenizer, cfg.corpus.ctx_len, cfg.corpus.n_tokens, seed=cfg.seed)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"tokens": toks.to(torch.int32).contiguous()}, str(tmp))
    os.replace(tmp, path)
    write_json_atomic(work / "corpus.json", {"sources": sources, "n_tokens": int(toks.numel()),
                                             "n_ctx": int(toks.shape[0]), "ctx_len": cfg.corpus.ctx_len})
    return toks


def stage_activations(ctx: BuildContext) -> None:
    """Corpus contexts and their residual activations at the hook (fp16 shards)."""
    from metasae.activations import ActivationStore

    cfg = ctx.cfg
    tokens = contexts(ctx)
    if ctx.workers > 1 and not is_tiny(cfg.model):
        ctx.store = ActivationStore.build_parallel(functools.partial(load_model, cfg), tokens, cfg.hook,
                                                   ctx.work / "acts", ctx.workers, shard_ctx=cfg.corpus.shard_ctx,
                                                   progress=ctx.progress)
    else:
        ctx.store = ActivationStore.build(ctx.lm, tokens, cfg.hook, ctx.work / "acts",
                                          shard_ctx=cfg.corpus.shard_ctx, progress=ctx.progress)


SEED_TWIN = "_seed"


def ladder_jobs(cfg: BuildConfig) -> list[tuple[str, int, int]]:
    """(folder name, width, seed) of every SAE the ladder stage trains: the rungs, then the seed twin."""
    widths = cfg.ladder.widths
    jobs = [(str(w), w, cfg.seed + i) for i, w in enumerate(widths)]
    if cfg.ladder.seed_baseline and widths:
        jobs.append((f"{widths[0]}{SEED_TWIN}", widths[0], cfg.seed + 1000))
    return jobs


def read_work_config(work: Path) -> BuildConfig:
    """The config a work folder was (or is being) built with, in either stored form."""
    return BuildConfig.from_dict(json.loads((work / "config.json").read_text()))


def train_ladder_jobs(work: Path, jobs: list[tuple[str, int, int]], progress: bool = True) -> None:
    """Train some of the ladder's SAEs (module-level, so worker processes can run it)."""
    from metasae.activations import ActivationStore
    from metasae.train import train_ladder

    cfg = read_work_config(work)
    store = ActivationStore.open(work / "acts")
    # the SAEs are named after the loaded model, which the activation store recorded
    train_ladder(store, [j[1] for j in jobs], cfg.train.train_config(cfg.seed), work / "saes", hook=cfg.hook,
                 model=store.meta["model"], eval_ctx=n_eval_ctx(cfg), progress=progress,
                 center_mean=cfg.train.center_mean, dense_pcs=cfg.train.dense_pcs, seeds=[j[2] for j in jobs],
                 names=[j[0] for j in jobs])


def stage_ladder(ctx: BuildContext) -> None:
    """One SAE per width (trained, or imported from sae-lens), plus the seed twin of the smallest."""
    from metasae.train import import_ladder

    cfg, work = ctx.cfg, ctx.work
    release = cfg.ladder.import_release
    if release:
        ids = cfg.ladder.import_ids or [f"{cfg.hook}_{w}" for w in cfg.ladder.widths]
        specs = [str(Path(release) / i) if Path(release).is_dir() else f"{release}:{i}" for i in ids]
        saes = import_ladder(specs)
        for s in saes:
            if not (work / "saes" / str(s.width) / "sae_weights.safetensors").is_file():
                s.save(work / "saes" / str(s.width))
        ctx.saes = saes
        return
    jobs = ladder_jobs(cfg)
    todo = [j for j in jobs if not (work / "saes" / j[0] / "sae_weights.safetensors").is_file()]
    if todo and (cfg.train.center_mean or cfg.train.dense_pcs):
        # fit the shared centre once, before any worker needs it
        train_ladder_jobs(work, [], progress=False)
    run_jobs([functools.partial(train_ladder_jobs, work, [j], ctx.progress) for j in todo], ctx.workers,
             costs=[j[1] for j in todo])
    ctx.saes = [Sae.load(work / "saes" / str(w)) for w in cfg.ladder.widths]


def stage_evaluate(ctx: BuildContext) -> None:
    """L0, FVU, CE with the reconstruction spliced in, slot shares; the same-width seed baseline."""
    from metasae.train import ce_with_reconstruction, evaluate_sae

    cfg, work = ctx.cfg, ctx.work
    path = work / "evaluate.json"
    if path.is_file():
        return
    acts, lm = ctx.eval_acts, ctx.lm
    tokens = ctx.eval_tokens()
    rows = []
    for sae in ctx.saes:
        row = {"width": sae.width, **evaluate_sae(sae, acts), **novelty.slot_shares(sae, acts)}
        row.update(ce_with_reconstruction(lm, cfg.hook, tokens, sae.reconstruct))
        ctx.log(f"  width {sae.width}: L0 {row['l0']:.1f}  FVU {row['fvu']:.3f}  CE {row['ce_loss']:.3f} "
                f"(clean {row['ce_clean']:.3f}), always-on share of slots {row['always_on_share']:.1%}")
        rows.append(row)
    widths, threshold = cfg.ladder.widths, cfg.stitching.threshold
    twin = work / "saes" / f"{widths[0]}{SEED_TWIN}" if widths else None
    baseline = None
    if cfg.ladder.seed_baseline and twin is not None and (twin / "sae_weights.safetensors").is_file():
        baseline = novelty.seed_baseline(ctx.saes[0], Sae.load(twin), acts, threshold)
        ctx.log(f"  seed baseline at width {baseline['width']}: {baseline['mismatch_frac']:.1%} of live latents "
                f"without a partner at cos >= {threshold}; functional novel {baseline['novel_frac_functional']:.1%}")
    write_json_atomic(work / "seed_baseline.json", baseline)
    write_json_atomic(path, rows)


def stage_stitching(ctx: BuildContext) -> None:
    """Every neighbouring pair: match, ΔMSE (closed form), ΔCE (attribution for all, exact for a sample), curves."""
    work = ctx.work
    saes = ctx.saes
    todo = [i for i in range(len(saes) - 1)
            if not (work / "stitch" / f"{saes[i].width}_{saes[i + 1].width}" / "done.json").is_file()]
    if ctx.workers > 1 and len(todo) > 1:
        # pairs are independent: one single-threaded process each (each loads the model once, ~15 s)
        run_jobs([functools.partial(stitch_pair_job, work, i, ctx.progress) for i in todo], ctx.workers,
                 costs=[saes[i].width + saes[i + 1].width for i in todo])
        for i in todo:
            ctx.log(json.dumps(json.loads((work / "stitch" / f"{saes[i].width}_{saes[i + 1].width}" /
                                           "done.json").read_text())))
        return
    for i in todo:
        _stitch_pair(ctx, saes[i], saes[i + 1])


def stitch_pair_job(work: Path, i: int, progress: bool) -> None:
    """Stitch the ladder's pair (i, i+1) in a worker process (module-level, picklable)."""
    ctx = BuildContext(cfg=read_work_config(work), work=work, out=work, progress=progress)
    _stitch_pair(ctx, ctx.saes[i], ctx.saes[i + 1])


def _stitch_pair(ctx: BuildContext, small: Sae, large: Sae) -> None:
    """Match, ΔMSE (closed form), ΔCE (attribution for all, exact for a sample) and the curve of one pair."""
    import numpy as np
    import pandas as pd
    from scipy.stats import spearmanr

    from metasae import stitching as st
    from metasae.atlas import write_table

    cfg, work = ctx.cfg, ctx.work
    threshold, hook = cfg.stitching.threshold, cfg.hook
    folder = work / "stitch" / f"{small.width}_{large.width}"
    folder.mkdir(parents=True, exist_ok=True)
    m = st.match(small, large, threshold)
    sp = st.sparse_acts(small, large, ctx.eval_acts)
    d_lat = st.latent_delta_mse(small, large, sp).numpy()
    d_grp = st.group_delta_mse(small, large, m, sp).numpy()
    fam = novelty.family_match(m)
    lm = ctx.lm
    cs = st.ce_set(lm, hook, ctx.eval_tokens(), small, large)
    S, L = small.width, large.width
    per_latent = torch.cat([torch.full((S,), L), torch.arange(L)])
    ones = torch.ones(S + L)
    budget = cfg.stitching.attr_exact_pairs_per_ctx * cs.tokens.shape[0]
    plain_t, attr_t = st.delta_ce_attributions(lm, hook, cs, small, large, per_latent, ones, L + 1,
                                               exact_pairs=budget)
    attr_plain, attr_lat = plain_t[:L].numpy(), attr_t[:L].numpy()
    group_t = torch.as_tensor(m.group)
    attr_grp = st.delta_ce_attribution(lm, hook, cs, small, large, group_t, m.signs(), m.n_groups).numpy()
    n_ex = min(cfg.stitching.exact_ce_latents, L)
    sample = st.exact_ce_sample(attr_lat, n_ex, seed=cfg.seed)
    exact = st.delta_ce_exact(lm, hook, cs, small, large, per_latent, ones, sample.tolist(),
                              progress=ctx.progress).numpy()
    ce_exact = np.full(L, np.nan, dtype=np.float32)
    ce_exact[sample] = exact
    actions = m.group_actions()
    grp_exact = np.full(m.n_groups, np.nan, dtype=np.float32)
    pick = st.exact_ce_groups(m, attr_grp, n_ex)
    if len(pick):
        grp_exact[pick] = st.delta_ce_exact(lm, hook, cs, small, large, group_t, m.signs(), pick.tolist(),
                                            progress=ctx.progress).numpy()
    curve = st.interpolate(small, large, m, sp, ce_fn=st.ce_fn_for(lm, hook, cs, small, large, m),
                           progress=ctx.progress)
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
    live = novelty.live_mask(large, ctx.eval_acts)
    fracs = novelty.novel_fractions(d_lat, m.nearest_small_cos, live, threshold)
    valid = ~np.isnan(ce_exact)
    rho, rho_plain = (float(spearmanr(ce_exact[valid], a[valid]).statistic) if valid.sum() > 2 else float("nan")
                      for a in (attr_lat, attr_plain))
    summary = {"small": S, "large": L, "novel_frac": float((m.kind == "novel").mean()),
               "n_groups": m.n_groups, "n_swap": int((actions == "swap").sum()),
               "n_add": int((actions == "add").sum()), "n_remove": int((actions == "remove").sum()),
               "attr_spearman": rho, "attr_spearman_plain": rho_plain, "attr_exact_pairs": budget,
               "n_exact_ce": int(valid.sum()), "eval_tokens": sp.n_tokens,
               "ce_tokens": cs.n_tokens, **fracs,
               "monotone_frac": novelty.monotone_frac(novelty.group_path_mse(curve)),
               # share of groups that lower MSE applied alone: when few do, no order of them descends monotonically
               "groups_help_alone": float((d_grp < 0).mean()),
               "families_help_alone": float((st.group_delta_mse(small, large, fam, sp).numpy() < 0).mean()),
               "n_families": fam.n_groups}
    ctx.log(f"  {S}->{L}: novel (functional, live) {fracs['novel_frac_functional']:.1%}, cosine-novel among live "
            f"{fracs['novel_frac_cos_live']:.1%}, groups {m.n_groups}, MSE does not rise in "
            f"{summary['monotone_frac']:.1%} of steps ({summary['groups_help_alone']:.1%} of groups lower it "
            f"alone), attribution vs exact Spearman {rho:.2f}")
    np.save(folder / "group.npy", m.group)
    write_json_atomic(folder / "done.json", summary)


def stage_stats(ctx: BuildContext) -> None:
    """Statistics, examples, boosted tokens and labels for every latent of every width."""
    import numpy as np
    import pandas as pd

    from metasae import stats as stt
    from metasae.atlas import write_table

    cfg, work = ctx.cfg, ctx.work
    folder = work / "stats"
    folder.mkdir(exist_ok=True)
    store, lm = ctx.store, ctx.lm
    n_ctx = min(store.n_ctx, max(1, cfg.stats.tokens // (store.ctx_len - 1)))
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
    for sae in ctx.saes:
        lat_path, ex_path = folder / f"latents_{sae.width}.parquet", folder / f"examples_{sae.width}.parquet"
        if lat_path.is_file() and ex_path.is_file():
            continue
        s = stt.latent_stats(sae, ctx_chunks(), k=32, n_tokens=n_ctx * (store.ctx_len - 1),
                             progress=ctx.progress, desc=f"stats {sae.width}",
                             max_norm_ratio=cfg.train.max_norm_ratio)
        ex = stt.example_rows(sae, s, ctx_acts, tokens, decode, cfg.stats.n_examples, cfg.stats.example_window,
                              sae.width)
        top_ids = stt.top_tokens(s, tokens)
        top_str = [[decode([int(i)])[0] for i in row] for row in top_ids]  # ids, whatever the annotation
        boosted = stt.boosted_tokens(sae.W_dec, W_U, decode)
        df = pd.DataFrame({"sae_width": sae.width, "latent": np.arange(sae.width),
                           # top activating tokens only: lens tokens agreed with them for 1.5-3.4% of live latents
                           "label": [stt.label_latent(t, []) for t in top_str],
                           "density": s.density, "mean_act": s.mean_act, "max_act": s.max_act,
                           "top_tokens": top_str, "top_logits": boosted,
                           "hist_counts": list(s.hist_counts.astype(np.int32)),
                           "hist_edges": [s.hist_edges.astype(np.float32)] * sae.width})
        if cfg.stats.llm_labels:
            from metasae.labels import LlmLabeller

            lab = LlmLabeller(cfg.stats.llm_labels, cfg.stats.llm_model)
            by_lat = {j: g.sort_values("rank").to_dict("records") for j, g in ex.groupby("latent")}
            df["label"] = lab.label_many([(t, b, by_lat.get(j, [])) for j, (t, b) in
                                          enumerate(zip(top_str, boosted, strict=True))])
        write_table(folder, "examples", ex)
        (folder / "examples.parquet").rename(ex_path)
        df.to_parquet(lat_path)


def stage_meta(ctx: BuildContext) -> None:
    """Meta-SAEs on the kept decoder rows (several seeds + a random-row control); decompositions of every latent."""
    import pandas as pd

    from metasae import meta as mt
    from metasae import showcase
    from metasae import stats as stt
    from metasae.atlas import write_table

    cfg, work, mc = ctx.cfg, ctx.work, ctx.cfg.meta
    if (work / "meta.json").is_file():
        return
    saes = ctx.saes
    lat = {s.width: pd.read_parquet(work / "stats" / f"latents_{s.width}.parquet") for s in saes}
    rc = mt.recipe([(s.width, s.W_dec, lat[s.width].density.to_numpy()) for s in saes],
                   mt.RowFilter(mc.min_density, mc.max_density), pooled=mc.rows == "pooled", n_seeds=mc.seeds,
                   seed=cfg.seed)
    folder = work / "meta_seeds"
    folder.mkdir(exist_ok=True)
    mcfg = mc.meta_config(cfg.seed)
    todo = [n for n in rc.jobs if not (folder / n / "sae_weights.safetensors").is_file()]
    run_jobs([functools.partial(mt.train_meta_job, rc.jobs[n].train_rows, mcfg, rc.jobs[n].seed, folder / n,
                                ctx.progress) for n in todo], ctx.workers)
    metas = {n: Sae.load(folder / n) for n in rc.jobs}
    meta = metas["seed0"]
    meta.save(work / "meta_sae")
    decomp = mt.decomposition_table(meta, saes)
    write_table(work, "decompositions", decomp)
    mt.decomposability(meta, saes).to_parquet(work / "decomposability.parquet")
    info = mt.recipe_summary(rc, metas, saes, decomp, mc.k, cfg.stitching.threshold)
    # meta-latents: members, labels from the strongest live members' labels, boosted tokens of the meta rows
    lm = ctx.lm
    all_lat = pd.concat(lat.values(), ignore_index=True)
    table = mt.meta_latent_table(meta, decomp, all_lat, stt.boosted_tokens(meta.W_dec, lm.unembed(), lm.decode_tokens))
    write_table(work, "meta_latents", table)
    picks = showcase.choose(all_lat)
    seeds = [metas[n] for n in rc.seed_names]
    info["showcase"] = [showcase.check(p, [mt.decomposition_table(x, saes) for x in seeds], all_lat) for p in picks]
    ctx.log(f"  meta-SAE: {meta.width} meta-latents on {len(rc.jobs['seed0'].rows)} rows; variance explained train "
            f"{1 - info['train_fvu']:.1%}, held-out {1 - info['heldout_fvu']:.1%}, random-row control held-out "
            f"{1 - info['random_heldout_fvu']:.1%}; seed stability {info['seed_stability']['matched_frac']:.1%}")
    write_json_atomic(work / "meta.json", info)


@dataclass(frozen=True)
class StageSpec:
    """A stage of the pipeline: what it writes under the work folder and which settings those outputs depend on
    (config paths or whole sections, beyond what the earlier stages depend on)."""

    name: str
    run: Callable[[BuildContext], None]
    outputs: tuple[str, ...]
    depends_on: tuple[str, ...]


# The pipeline, in order. A changed setting redoes the first stage that depends on it and every later one, so
# a new meta-SAE recipe keeps the hours of activations and ladder training.
STAGES: tuple[StageSpec, ...] = (
    StageSpec("activations", stage_activations, ("contexts.safetensors", "corpus.json", "acts"),
              ("model", "hook", "seed", "corpus")),
    StageSpec("ladder", stage_ladder, ("saes", "dense.safetensors"), ("ladder", "train")),
    # the seed baseline counts partners at the stitching threshold
    StageSpec("evaluate", stage_evaluate, ("evaluate.json", "seed_baseline.json"),
              ("evaluate", "stitching.threshold")),
    StageSpec("stitching", stage_stitching, ("stitch",), ("stitching",)),
    StageSpec("stats", stage_stats, ("stats",), ("stats",)),
    StageSpec("meta", stage_meta, ("meta_sae", "meta_seeds", "meta.json", "decompositions.parquet",
                                   "meta_latents.parquet", "decomposability.parquet"), ("meta",)),
    # the atlas folder, not the work folder: it compares its manifest's settings itself
    StageSpec("assemble", stage_assemble, (), ()),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
