"""``manifest.json`` as a typed model: every section the code reads, with its default, in one place.

Both writers (the build's assembly and ``synthetic_atlas``) build a ``Manifest``; every reader goes through its
attributes. Keys this code does not know are kept (``extra="allow"``) and written back unchanged, so an atlas
written by a newer metasae round-trips through an older one. Fields a later build added are optional with a
default, so an older atlas still validates. ``to_dict`` writes only what was given or read (pydantic's
``exclude_unset``): reading a manifest and writing it again gives the same JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from metasae.atlas.errors import AtlasError
from metasae.atlas.schema import FORMAT_VERSION, MANIFEST, MIN_FORMAT_VERSION

# Decoder cosine at or above which a larger latent counts as a reconstruction of a smaller one (the paper's
# proxy for novelty); the build's `--threshold` default and what an atlas that records none was built with.
COS_THRESHOLD = 0.7
DEFAULT_CTX_LEN = 128  # tokens per context of an atlas that records none (the build's default)


class _Section(BaseModel):
    # Unknown keys are kept and written back: forward compatibility with atlases from newer builds.
    model_config = ConfigDict(extra="allow")


class ModelInfo(_Section):
    name: str
    source: str | None = None  # any spec metasae.model_spec.load_model understands
    hook: str | None = None
    d_model: int | None = None


class CorpusInfo(_Section):
    sources: list[str] = Field(default_factory=list)
    n_tokens: int | None = None
    ctx_len: int | None = None


class BuildInfo(_Section):
    command: str | None = None  # the command that rebuilds this atlas
    seed: int | None = None
    preset: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)  # the build's settings, as `build_settings` reads them
    versions: dict[str, str] = Field(default_factory=dict)  # package versions (the build's assembly)
    packages: dict[str, str] = Field(default_factory=dict)  # package versions (synthetic atlases)
    created: str | None = None


class SaeInfo(_Section):
    """One rung of the ladder: where its weights are and how well it reconstructs."""

    width: int
    path: str | None = None
    architecture: str | None = None
    l0: float | None = None
    mse: float | None = None
    fvu: float | None = None
    ce_loss: float | None = None
    ce_clean: float | None = None
    ce_delta: float | None = None
    dead_frac: float | None = None
    n_dead: int | None = None
    n_rare: int | None = None
    n_dense: int | None = None
    n_always_on: int | None = None
    always_on_share: float | None = None
    dense_share: float | None = None
    # dead / rare / dense as the statistics pass counted them (the n_* above come from the evaluation tokens)
    stats_n_dead: int | None = None
    stats_n_rare: int | None = None
    stats_n_dense: int | None = None
    stats_rare_frac: float | None = None

    @property
    def folder(self) -> str:
        """The SAE's folder, relative to the atlas."""
        return self.path or f"saes/{self.width}"


class MetaRows(_Section):
    """Which decoder rows the meta-SAE was trained on."""

    source: str | None = None  # "pooled" over the widths, or "largest"
    n_rows: int | None = None
    n_train: int | None = None
    n_heldout: int | None = None
    min_density: float | None = None
    max_density: float | None = None
    by_width: dict[str, int] = Field(default_factory=dict)


class SeedStability(_Section):
    matched_frac: float | None = None
    per_seed: list[float | None] = Field(default_factory=list)
    n_seeds: int | None = None
    threshold: float = COS_THRESHOLD


class Overlap(_Section):
    """Co-membership (sharing a meta-latent) against sharing a stitching group."""

    pairs_meta: int | None = None
    pairs_stitch: int | None = None
    pairs_both: int | None = None
    overlap: float | None = None  # null: too few stitching pairs to measure
    chance: float | None = None
    overlap_of_meta: float | None = None
    jaccard: float | None = None
    min_stitch_pairs: int | None = None

    @property
    def value(self) -> float | None:
        """The build's overlap; atlases from before ``overlap`` was recorded report their own ratio."""
        return self.overlap if "overlap" in self.model_fields_set else self.overlap_of_meta


class LargestOnly(_Section):
    n_rows: int | None = None
    train_fvu: float | None = None
    heldout_fvu: float | None = None


class HeldoutBin(_Section):
    """Held-out rows whose nearest training row has cosine in [lo, hi), and the meta-SAE's FVU on them."""

    lo: float
    hi: float
    n: int
    heldout_fvu: float | None = None


class MetaSaeInfo(_Section):
    path: str = "meta_sae"
    width: int | None = None
    k: int | None = None
    fvu: float | None = None
    train_fvu: float | None = None
    heldout_fvu: float | None = None
    random_train_fvu: float | None = None
    random_heldout_fvu: float | None = None
    seed_heldout_fvu: list[float | None] = Field(default_factory=list)
    largest_only: LargestOnly | None = None
    heldout_by_nearest: list[HeldoutBin] = Field(default_factory=list)
    rows: MetaRows | None = None
    seed_stability: SeedStability | float | None = None  # a bare number in synthetic atlases
    fvu_by_width: dict[str, float | None] = Field(default_factory=dict)
    terms_per_latent: float | None = None
    overlap: Overlap | None = None

    @property
    def seed_matched_frac(self) -> float | None:
        """Share of meta-latents found again by the other seeds."""
        s = self.seed_stability
        return s.matched_frac if isinstance(s, SeedStability) else s

    @property
    def overlap_value(self) -> float | None:
        return self.overlap.value if self.overlap is not None else None

    @property
    def overlap_recorded(self) -> bool:
        """Whether the build tried to measure the overlap (it may still be null: not measurable)."""
        return "overlap" in self.model_fields_set


class StitchPair(_Section):
    """The build's summary of one (small, large) pair."""

    small: int
    large: int
    novel_frac: float | None = None
    n_groups: int | None = None
    n_swap: int | None = None
    n_add: int | None = None
    n_remove: int | None = None
    attr_spearman: float | None = None  # attribution (with its exact pairs) vs exact ΔCE on the sampled latents
    attr_spearman_plain: float | None = None  # the same for first-order attribution alone
    attr_exact_pairs: int | None = None  # (latent, context) pairs whose attributed change was made exact
    n_exact_ce: int | None = None
    eval_tokens: int | None = None
    ce_tokens: int | None = None
    n_live_large: int | None = None
    novel_frac_functional: float | None = None
    novel_frac_cos_live: float | None = None
    cos_novel_that_help: float | None = None
    cos_recon_that_help: float | None = None
    monotone_frac: float | None = None
    groups_help_alone: float | None = None
    families_help_alone: float | None = None
    n_families: int | None = None


class SeedBaseline(_Section):
    """The smallest rung trained twice with different seeds: what non-convergence alone gives."""

    width: int | None = None
    threshold: float | None = None
    n_live: int | None = None
    mismatch_frac: float | None = None
    median_max_cos: float | None = None
    novel_frac_functional: float | None = None
    seeds: list[int] = Field(default_factory=list)


class StitchingInfo(_Section):
    threshold: float = COS_THRESHOLD
    pairs: list[StitchPair] = Field(default_factory=list)
    seed_baseline: SeedBaseline | None = None


class ShowcaseSeed(_Section):
    meta_latents: list[int] = Field(default_factory=list)
    scientist_members: int | None = None
    german_member: bool | None = None


class ShowcaseItem(_Section):
    """A latent the build picked to show (a person, a nationality, a science word)."""

    role: str | None = None
    width: int
    latent: int
    label: str | None = None
    score: float | None = None
    why: str | None = None
    seeds: list[ShowcaseSeed] = Field(default_factory=list)


class Manifest(_Section):
    """The whole ``manifest.json``; ``format_version`` and ``files`` are filled in by ``write_manifest``."""

    format_version: int = FORMAT_VERSION
    model: ModelInfo
    corpus: CorpusInfo = Field(default_factory=CorpusInfo)
    build: BuildInfo = Field(default_factory=BuildInfo)
    saes: list[SaeInfo]
    meta_sae: MetaSaeInfo
    stitching: StitchingInfo = Field(default_factory=StitchingInfo)
    showcase: list[ShowcaseItem] = Field(default_factory=list)
    files: dict[str, str] = Field(default_factory=dict)  # relative path -> sha256 of every other atlas file
    weights: bool = True  # False: built without SAE weights (paper-scale synthetic atlases)
    synthetic: bool = False

    @classmethod
    def coerce(cls, obj: Manifest | Mapping[str, Any], source: str = MANIFEST) -> Manifest:
        """``obj`` itself, or the dict validated into a Manifest (numpy numbers, paths and NaN made JSON first);
        AtlasError naming ``source`` and every bad field otherwise."""
        if isinstance(obj, Manifest):
            return obj
        try:
            return cls.model_validate(to_json_value(obj))
        except ValidationError as e:
            raise AtlasError(f"{source}: " + "; ".join(validation_problems(e))) from None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: what was given or read, unknown keys included (defaults not given are left out)."""
        return self.model_dump(mode="json", exclude_unset=True)

    @property
    def ctx_len(self) -> int:
        """Tokens per context the atlas was measured on (corpus, else build config, else the default)."""
        ctx = self.corpus.ctx_len or self.build.config.get("ctx_len")
        return int(ctx) if isinstance(ctx, int) and ctx > 0 else DEFAULT_CTX_LEN

    def sae(self, width: int) -> SaeInfo | None:
        """The record of one width, None when the manifest lists no such SAE."""
        return next((s for s in self.saes if s.width == width), None)


def validation_problems(e: ValidationError) -> list[str]:
    """One 'a.b.0.c: message' line per pydantic error."""
    return [f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in e.errors()]


def manifest_problems(raw: Mapping[str, Any]) -> list[str]:
    """Problems with the fields of a parsed manifest.json (empty: it validates into a Manifest)."""
    try:
        Manifest.model_validate(to_json_value(raw))
    except ValidationError as e:
        return [f"{MANIFEST}: {p}" for p in validation_problems(e)]
    return []


def _json_default(obj: Any) -> Any:
    # a build's settings may be nested dataclasses or pydantic models
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return Path(obj).as_posix()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def finite(obj: Any) -> Any:
    """``obj`` with NaN/inf replaced by None, tuples by lists and keys by str."""
    # NaN/inf are not JSON; null keeps every JSON reader (browsers included) accepting the manifest.
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def to_json_text(obj: Any) -> str:
    """Indented JSON of ``obj`` (numpy values, paths allowed; NaN/inf written as null)."""
    return json.dumps(finite(obj), indent=2, default=_json_default, allow_nan=False) + "\n"


def to_json_value(obj: Any) -> Any:
    """``obj`` as plain JSON values, exactly as ``to_json_text`` would write it."""
    return json.loads(to_json_text(obj))


# ----------------------------------------------------------------------------------------------- reading

# format_version v -> a function upgrading a v manifest (a dict) to v + 1. An atlas keeps its bytes on disk;
# readers migrate in memory. A new version adds an entry here and a test on a manifest of the old version.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def migrate(raw: dict[str, Any]) -> dict[str, Any]:
    """A parsed manifest of any supported format_version, upgraded step by step to ``FORMAT_VERSION``."""
    version = raw.get("format_version", FORMAT_VERSION)
    while isinstance(version, int) and version < FORMAT_VERSION:
        raw = {**MIGRATIONS[version](dict(raw)), "format_version": version + 1}
        version += 1
    return raw


def supported_versions() -> str:
    if MIN_FORMAT_VERSION == FORMAT_VERSION:
        return f"format_version {FORMAT_VERSION}"
    return f"format_version {MIN_FORMAT_VERSION} to {FORMAT_VERSION}"


def refuse_constant(name: str) -> Any:
    raise ValueError(f"holds the literal {name}, which JSON does not allow (metasae writes null for a missing "
                     "or non-finite number)")


def read_manifest(atlas_dir: str | os.PathLike) -> tuple[dict[str, Any] | None, list[str]]:
    """Parse manifest.json and check its format_version; returns (the JSON object or None, problems).
    ``load_manifest`` gives the typed, migrated Manifest."""
    root = Path(atlas_dir)
    path = root / MANIFEST
    if not root.is_dir():
        return None, [f"{root}: atlas folder does not exist or is not a folder"]
    if not path.is_file():
        return None, [f"{path}: missing (an atlas is complete only once its manifest is written)"]
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, [f"{path}: invalid JSON ({e})"]
    except ValueError as e:  # NaN / Infinity literals: Python's json reads them, every other reader refuses
        return None, [f"{path}: {e}"]
    if not isinstance(manifest, dict):
        return None, [f"{path}: expected a JSON object, got {type(manifest).__name__}"]
    if "format_version" not in manifest:
        return None, [f"{path}: format_version is missing (this metasae supports {supported_versions()})"]
    version = manifest["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) \
            or not MIN_FORMAT_VERSION <= version <= FORMAT_VERSION:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
        fix = " (written by a newer metasae: upgrade metasae to read it)" if newer else ""
        return None, [f"{path}: format_version {version!r} found, this metasae supports {supported_versions()}{fix}"]
    return manifest, []


def load_manifest(atlas_dir: str | os.PathLike) -> Manifest:
    """The typed manifest of an atlas folder, migrated to the current format; AtlasError naming the problems."""
    raw, problems = read_manifest(atlas_dir)
    if raw is None:
        raise AtlasError("; ".join(problems))
    return Manifest.coerce(migrate(raw), source=str(Path(atlas_dir) / MANIFEST))
