"""What determines an atlas: `BuildConfig`, one typed section per part of the pipeline.

Every section is a frozen dataclass that checks its values when made (so a bad preset, flag or work-folder
config fails before any stage runs). The work folder stores the nested form; `from_dict` also reads the flat
form that builds before the sections wrote (and that the atlas manifest's `build.config` still holds, since
pages and the backend read it), so old work folders and atlases compare equal to the same settings today.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Union

from metasae.atlas import COS_THRESHOLD

if typing.TYPE_CHECKING:
    from metasae.meta import MetaConfig
    from metasae.train import TrainConfig

ARCHITECTURES = ("standard", "batchtopk")
META_ROWS = ("largest", "pooled")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class CorpusConfig:
    """The token contexts the activations are computed on."""

    sources: list[str] = field(default_factory=lambda: ["wiki", "wordnet"])
    ctx_len: int = 128
    n_tokens: int = 3_000_000
    shard_ctx: int = 256  # contexts per activation shard (the unit of resuming and of worker processes)

    def __post_init__(self) -> None:
        _check(bool(self.sources), "corpus.sources: name at least one corpus source")
        _check(self.ctx_len >= 2, f"corpus.ctx_len must be at least 2 (position 0 is left out), got {self.ctx_len}")
        _check(self.n_tokens >= self.ctx_len, f"corpus.n_tokens ({self.n_tokens}) must fill one context "
                                              f"({self.ctx_len})")
        _check(self.shard_ctx >= 1, f"corpus.shard_ctx must be positive, got {self.shard_ctx}")


@dataclass(frozen=True)
class LadderConfig:
    """Which SAEs make the ladder: trained widths (see `train`) or an imported sae-lens release."""

    widths: list[int] = field(default_factory=lambda: [576, 1152, 2304, 4608])
    import_release: str | None = None  # sae-lens release (or folder of width subfolders) instead of training
    import_ids: list[str] | None = None
    eval_tokens: int = 32_768  # held out of training, for evaluation and stitching
    seed_baseline: bool = True  # train the smallest rung a second time with another seed: the chance baseline

    def __post_init__(self) -> None:
        _check(bool(self.widths) and all(w > 0 for w in self.widths),
               f"ladder.widths must be positive, got {self.widths}")
        _check(all(a < b for a, b in zip(self.widths, self.widths[1:], strict=False)),
               f"ladder.widths must increase (stitching pairs neighbours), got {self.widths}")
        _check(self.import_ids is None or len(self.import_ids) == len(self.widths),
               f"ladder.import_ids ({self.import_ids}) needs one id per width ({self.widths})")
        _check(self.eval_tokens >= 1, f"ladder.eval_tokens must be positive, got {self.eval_tokens}")


@dataclass(frozen=True)
class LadderTrainConfig:
    """How each rung is trained (the build's part of `metasae.train.TrainConfig`; seeds come from the build)."""

    architecture: str = "batchtopk"  # "standard" (ReLU + L1, the paper's) or "batchtopk"
    tokens: int = 1_000_000
    batch_size: int = 1024
    k: float = 32  # batchtopk: active latents per token
    l1_coefficient: float = 5.0  # standard: the sparsity penalty (sets L0 there, as k does for batchtopk)
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
    # a latent silent for this many training tokens counts as dead and is trained by the AuxK loss (batchtopk);
    # none: a quarter of training (sae-lens's window as the ladder used it before this option)
    dead_window_tokens: int | None = None

    def __post_init__(self) -> None:
        _check(self.architecture in ARCHITECTURES,
               f"train.architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        _check(self.tokens >= 0, f"train.tokens must not be negative, got {self.tokens}")
        _check(self.batch_size >= 1, f"train.batch_size must be positive, got {self.batch_size}")
        _check(self.k > 0, f"train.k must be positive, got {self.k}")
        _check(self.l1_coefficient > 0, f"train.l1_coefficient must be positive, got {self.l1_coefficient}")
        _check(self.lr > 0, f"train.lr must be positive, got {self.lr}")
        _check(self.max_norm_ratio is None or self.max_norm_ratio > 0,
               f"train.max_norm_ratio must be positive or none, got {self.max_norm_ratio}")
        _check(self.dense_pcs >= 0, f"train.dense_pcs must not be negative, got {self.dense_pcs}")
        _check(self.dead_window_tokens is None or self.dead_window_tokens >= self.batch_size,
               f"train.dead_window_tokens must be at least one batch ({self.batch_size}) or none, "
               f"got {self.dead_window_tokens}")

    def train_config(self, seed: int) -> TrainConfig:
        from metasae.train import TrainConfig

        return TrainConfig(architecture=self.architecture, n_tokens=self.tokens, batch_size=self.batch_size,
                           lr=self.lr, k=self.k, l1_coefficient=self.l1_coefficient, center_input=self.center_input,
                           max_norm_ratio=self.max_norm_ratio, dead_window_tokens=self.dead_window_tokens,
                           seed=seed)


@dataclass(frozen=True)
class EvaluateConfig:
    """The ladder's evaluation (FVU, L0 on the held-out tokens; CE with the reconstruction spliced in)."""

    ce_ctx: int = 48  # contexts of the held-out set that CE (and ΔCE) runs on

    def __post_init__(self) -> None:
        _check(self.ce_ctx >= 1, f"evaluate.ce_ctx must be positive, got {self.ce_ctx}")


@dataclass(frozen=True)
class StitchingConfig:
    """Matching neighbouring rungs and measuring ΔMSE / ΔCE."""

    threshold: float = COS_THRESHOLD  # decoder cosine at which a larger latent counts as a smaller one's
    exact_ce_latents: int = 256  # latents per pair whose ΔCE is computed exactly (attribution for all)
    # (latent, context) pairs per evaluation context whose attributed ΔCE is replaced by the exact change: the
    # largest ones, where the first-order estimate is least linear (Spearman vs exact 0.63 -> 0.72 at ~4x the
    # attribution's cost, docs/benchmarks.md); 0: plain attribution
    attr_exact_pairs_per_ctx: int = 8

    def __post_init__(self) -> None:
        _check(0 < self.threshold <= 1, f"stitching.threshold must be in (0, 1], got {self.threshold}")
        _check(self.exact_ce_latents >= 0, f"stitching.exact_ce_latents must not be negative, "
                                           f"got {self.exact_ce_latents}")
        _check(self.attr_exact_pairs_per_ctx >= 0, f"stitching.attr_exact_pairs_per_ctx must not be negative, "
                                                   f"got {self.attr_exact_pairs_per_ctx}")


@dataclass(frozen=True)
class StatsConfig:
    """Per-latent statistics, examples and labels."""

    tokens: int = 500_000
    n_examples: int = 10
    example_window: int = 24
    llm_labels: str | None = None  # base URL of an OpenAI-compatible endpoint; off by default
    llm_model: str = "gpt-4o-mini"

    def __post_init__(self) -> None:
        _check(self.tokens >= 1, f"stats.tokens must be positive, got {self.tokens}")
        _check(self.n_examples >= 1, f"stats.n_examples must be positive, got {self.n_examples}")
        _check(self.example_window >= 1, f"stats.example_window must be positive, got {self.example_window}")


@dataclass(frozen=True)
class MetaRecipeConfig:
    """The meta-SAE recipe: which decoder rows, how the meta-SAE trains (`metasae.meta.MetaConfig`), how many seeds."""

    width: int | None = None  # default: rows // 21
    k: float = 4
    batches: int = 2000
    batch_size: int = 4096
    rows: str = "largest"  # "largest": the widest rung's decoder rows; "pooled": live rows of every rung
    min_density: float = 0.0  # rows of latents rarer than this (dead, ultra-rare) are left out of training
    max_density: float = 1.0  # ... and of latents denser than this (always-on, the dense pathway)
    seeds: int = 1  # meta-SAEs trained with different seeds to measure how stable decompositions are

    def __post_init__(self) -> None:
        _check(self.width is None or self.width >= 1, f"meta.width must be positive or none, got {self.width}")
        _check(self.k > 0, f"meta.k must be positive, got {self.k}")
        _check(self.batches >= 1, f"meta.batches must be positive, got {self.batches}")
        _check(self.batch_size >= 1, f"meta.batch_size must be positive, got {self.batch_size}")
        _check(self.rows in META_ROWS, f"meta.rows must be one of {META_ROWS}, got {self.rows!r}")
        _check(0 <= self.min_density <= self.max_density <= 1,
               f"meta densities need 0 <= min_density ({self.min_density}) <= max_density ({self.max_density}) <= 1")
        _check(self.seeds >= 1, f"meta.seeds must be positive, got {self.seeds}")

    def meta_config(self, seed: int) -> MetaConfig:
        from metasae.meta import MetaConfig

        return MetaConfig(width=self.width, k=self.k, batch_size=self.batch_size, n_batches=self.batches, seed=seed)


SECTIONS: dict[str, type] = {"corpus": CorpusConfig, "ladder": LadderConfig, "train": LadderTrainConfig,
                             "evaluate": EvaluateConfig, "stitching": StitchingConfig, "stats": StatsConfig,
                             "meta": MetaRecipeConfig}


@dataclass(frozen=True)
class BuildConfig:
    """Everything that determines an atlas; a preset fills it and flags override single values."""

    model: str = "smollm2"
    hook: str = "blocks.15.hook_resid_pre"
    seed: int = 0  # corpus order and every training seed derive from it
    preset: str | None = None
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    ladder: LadderConfig = field(default_factory=LadderConfig)
    train: LadderTrainConfig = field(default_factory=LadderTrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    stitching: StitchingConfig = field(default_factory=StitchingConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    meta: MetaRecipeConfig = field(default_factory=MetaRecipeConfig)

    def __post_init__(self) -> None:
        _check(bool(self.model), "model: name a model spec (smollm2, tiny:llama, a hub id, a folder, a .gguf)")
        _check(bool(self.hook), "hook: name a hook point, e.g. blocks.15.hook_resid_pre")
        for name, kind in SECTIONS.items():
            _check(isinstance(getattr(self, name), kind), f"{name} must be a {kind.__name__}")
        _check(self.ladder.import_release is not None or self.train.tokens >= self.train.batch_size,
               f"train.tokens ({self.train.tokens}) must be at least one batch ({self.train.batch_size}) "
               "unless the ladder is imported")

    def to_dict(self) -> dict[str, Any]:
        """The nested JSON form (what the work folder's config.json holds)."""
        return dataclasses.asdict(self)

    def to_flat(self) -> dict[str, Any]:
        """The flat form of builds before the sections (the atlas manifest's `build.config`), same key order."""
        return {name: self.get(path) for name, path in flat_names().items()}

    def get(self, path: str) -> Any:
        """A value by dotted path, e.g. `train.k`."""
        obj: Any = self
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BuildConfig:
        """A config from its nested form, the old flat form, or a mix; missing values are today's defaults
        (options added after a build started count as their defaults)."""
        values: dict[str, Any] = {}
        flat = flat_names()  # old flat names and the `<section>_<field>` names of options added since
        for key, value in data.items():
            if key in SECTIONS and isinstance(value, Mapping):
                for k, v in value.items():
                    values[f"{key}.{k}"] = v
            else:
                values[flat.get(key, key)] = value
        return cls().with_values(values)

    def with_values(self, values: Mapping[str, Any]) -> BuildConfig:
        """This config with some values replaced, by dotted path (`train.k`) or flat name (`k`,
        `stitching_attr_exact_pairs_per_ctx`); validated."""
        known = set(paths())
        flat = flat_names()
        by_section: dict[str, dict[str, Any]] = {}
        top: dict[str, Any] = {}
        bad = []
        for key, value in values.items():
            path = flat.get(key, key)
            if path not in known:
                bad.append(key)
            elif "." in path:
                section, name = path.split(".", 1)
                by_section.setdefault(section, {})[name] = value
            else:
                top[path] = value
        if bad:
            raise ValueError(f"unknown build options {sorted(bad)}")
        for section, changes in by_section.items():
            top[section] = replace(getattr(self, section), **changes)
        return replace(self, **top)


# The flat names of builds before the sections, in their old order (for reading old work folders and manifests,
# and as CLI aliases); a field added later has the flat name `<section>_<field>`.
LEGACY_PATHS: dict[str, str] = {
    "model": "model", "sources": "corpus.sources", "hook": "hook", "ctx_len": "corpus.ctx_len",
    "n_tokens": "corpus.n_tokens", "widths": "ladder.widths", "import_release": "ladder.import_release",
    "import_ids": "ladder.import_ids", "architecture": "train.architecture", "train_tokens": "train.tokens",
    "batch_size": "train.batch_size", "k": "train.k", "lr": "train.lr", "center_input": "train.center_input",
    "max_norm_ratio": "train.max_norm_ratio", "center_mean": "train.center_mean", "dense_pcs": "train.dense_pcs",
    "seed_baseline": "ladder.seed_baseline", "threshold": "stitching.threshold", "meta_width": "meta.width",
    "meta_k": "meta.k", "meta_batches": "meta.batches", "meta_batch_size": "meta.batch_size",
    "meta_rows": "meta.rows", "meta_min_density": "meta.min_density", "meta_max_density": "meta.max_density",
    "meta_seeds": "meta.seeds", "stats_tokens": "stats.tokens", "eval_tokens": "ladder.eval_tokens",
    "ce_ctx": "evaluate.ce_ctx", "exact_ce_latents": "stitching.exact_ce_latents", "n_examples": "stats.n_examples",
    "example_window": "stats.example_window", "shard_ctx": "corpus.shard_ctx", "llm_labels": "stats.llm_labels",
    "llm_model": "stats.llm_model", "seed": "seed", "preset": "preset",
}


def paths() -> Iterator[str]:
    """Every leaf option as a dotted path, in declaration order."""
    for f in fields(BuildConfig):
        if f.name in SECTIONS:
            yield from (f"{f.name}.{g.name}" for g in fields(SECTIONS[f.name]))
        else:
            yield f.name


def flat_names() -> dict[str, str]:
    """flat name -> dotted path for every option: the legacy names first, in their order, then newer ones."""
    out = dict(LEGACY_PATHS)
    covered = set(out.values())
    out.update({p.replace(".", "_"): p for p in paths() if p not in covered})
    return out


def field_type(path: str) -> Any:
    """The resolved type annotation of an option (`int`, `list[str]`, `float | None`, ...)."""
    owner: type = BuildConfig
    *sections, name = path.split(".")
    for s in sections:
        owner = SECTIONS[s]
    return typing.get_type_hints(owner)[name]


def _bool(text: str) -> bool:
    """'true'/'false' (and yes/no, 1/0, on/off); anything else is an error, never silently truthy."""
    v = text.strip().lower()
    if v in ("true", "yes", "1", "on"):
        return True
    if v in ("false", "no", "0", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parser_for(tp: Any) -> Callable[[str], Any]:
    """How a command-line value of type `tp` is read: bools strictly, lists comma-separated, 'none' for None."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        parse = parser_for(inner)
        return lambda text: None if text.strip().lower() in ("none", "null") else parse(text)
    if origin is list:
        parse = parser_for(args[0])
        return lambda text: [parse(x.strip()) for x in text.split(",") if x.strip()]
    if tp is bool:
        return _bool
    if tp in (int, float, str):
        return typing.cast(Callable[[str], Any], tp)
    raise TypeError(f"no command-line form for options of type {tp!r}")


def format_value(value: Any) -> str:
    """A value as `parser_for` reads it back."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(format_value, value))
    return str(value)


def flag(path: str) -> str:
    return "--" + path.replace(".", "-").replace("_", "-")


def legacy_flag(path: str) -> str | None:
    """The flag an option had before the sections, where it differs from `flag(path)`."""
    old = {p: n for n, p in LEGACY_PATHS.items()}.get(path)
    return None if old is None or flag(old) == flag(path) else flag(old)
