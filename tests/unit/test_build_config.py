"""The build's typed configuration: sections, presets, flags (bools, None, old flat names), the old flat form
of work folders and manifests read back as the same settings, and the stage registry's dependencies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from metasae.cli import build_config, parser
from metasae.pipeline.config import BuildConfig, MetaRecipeConfig, paths
from metasae.pipeline.presets import PRESETS, command_for, from_preset
from metasae.pipeline.run import prepare_work, stale_stages
from metasae.pipeline.stages import STAGES

DATA = Path(__file__).resolve().parents[2] / "data"

# data/manifest.json's build.config and the demo work folder's config.json as the builds before the sections
# wrote them (2026-12-06): the hours of activations and SAEs behind the bundled atlas are keyed by this
OLD_DEMO = {
    "model": "smollm2", "sources": ["wiki", "wordnet"], "hook": "blocks.15.hook_resid_pre", "ctx_len": 128,
    "n_tokens": 1998848, "widths": [576, 1152, 2304, 4608], "import_release": None, "import_ids": None,
    "architecture": "batchtopk", "train_tokens": 3000000, "batch_size": 512, "k": 32, "lr": 0.001,
    "center_input": False, "max_norm_ratio": 5.0, "center_mean": True, "dense_pcs": 0, "seed_baseline": True,
    "threshold": 0.7, "meta_width": 1152, "meta_k": 4, "meta_batches": 2000, "meta_batch_size": 1024,
    "meta_rows": "pooled", "meta_min_density": 0.0001, "meta_max_density": 0.1, "meta_seeds": 3,
    "stats_tokens": 500000, "eval_tokens": 32768, "ce_ctx": 32, "exact_ce_latents": 16, "n_examples": 10,
    "example_window": 24, "shard_ctx": 256, "llm_labels": None, "llm_model": "gpt-4o-mini", "seed": 0,
    "preset": "demo",
}


def _cfg(*flags: str) -> BuildConfig:
    return build_config(parser().parse_args(["build", "--out", "x", *flags]))


@pytest.mark.parametrize("flag", ["--center-input", "--train-center-input"])
def test_bool_flags_are_bools_under_old_and_new_names(flag: str) -> None:
    assert _cfg("--preset", "tiny", flag, "false").train.center_input is False
    assert _cfg("--preset", "tiny", flag, "true").train.center_input is True
    assert _cfg("--preset", "tiny", "--seed-baseline", "no").ladder.seed_baseline is False
    with pytest.raises(SystemExit):
        _cfg("--preset", "tiny", flag, "maybe")


def test_flags_override_single_nested_values_of_the_preset() -> None:
    cfg = _cfg("--preset", "tiny", "--meta-k", "2", "--train-k", "4", "--widths", "32,64", "--meta-width", "none",
               "--stitching-threshold", "0.5")
    tiny = PRESETS["tiny"]
    assert (cfg.meta.k, cfg.train.k, cfg.ladder.widths, cfg.meta.width, cfg.stitching.threshold) == (
        2, 4, [32, 64], None, 0.5)
    # everything else is the preset's
    assert cfg.with_values({"meta.k": tiny.meta.k, "train.k": tiny.train.k, "ladder.widths": tiny.ladder.widths,
                            "meta.width": tiny.meta.width, "stitching.threshold": 0.7}) == tiny
    assert _cfg("--preset", "tiny") == tiny and _cfg() == PRESETS["demo"]


def test_presets_are_typed_and_not_shared_mutably() -> None:
    assert all(isinstance(c, BuildConfig) and c.preset == name for name, c in PRESETS.items())
    cfg = from_preset("tiny", {"meta_k": 2})  # old flat names still override
    assert cfg.meta.k == 2 and PRESETS["tiny"].meta.k == 4


@pytest.mark.parametrize("values, message", [
    ({"meta.rows": "all"}, "meta.rows"),
    ({"ladder.widths": [128, 64]}, "increase"),
    ({"meta.min_density": 0.5, "meta.max_density": 0.1}, "min_density"),
    ({"train.architecture": "topk"}, "architecture"),
    ({"train.tokens": 10}, "at least one batch"),
    ({"train.l1_coefficient": 0}, "l1_coefficient"),
    ({"no_such_option": 1}, "unknown build options"),
])
def test_bad_settings_fail_before_any_stage(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_preset("tiny", values)


def test_command_for_parses_back_to_the_same_config() -> None:
    cfg = from_preset("tiny", {"train.center_input": True, "ladder.seed_baseline": False, "meta.width": None,
                               "corpus.sources": ["wiki", "wordnet"], "train.max_norm_ratio": None})
    cmd = command_for(cfg, "out")
    assert cmd.startswith("metasae build --preset tiny --out out ")
    assert _cfg(*cmd.split()[2:]) == cfg
    assert command_for(PRESETS["demo"], "data") == "metasae build --preset demo --out data"


def _before_auxk() -> BuildConfig:
    """The demo preset before its short AuxK window and wider meta-SAE (2026-12-06): what the old flat form
    stands for."""
    return from_preset("demo", {"train.dead_window_tokens": None, "meta.width": 1152})


def test_old_flat_config_is_the_demo_preset_of_its_time() -> None:
    """The old work folder reads back as the demo preset of its day; today's demo (its short AuxK window) retrains
    the ladder from there, and the bundled atlas's manifest counts as built with today's preset."""
    demo, before = from_preset("demo"), _before_auxk()
    assert BuildConfig.from_dict(OLD_DEMO) == before
    assert stale_stages(OLD_DEMO, before) == []
    assert stale_stages(OLD_DEMO, demo) == ["ladder", "evaluate", "stitching", "stats", "meta"]
    # the manifest keeps its shape; options added since (each with its default) come last
    added = {"train_l1_coefficient": 5.0, "train_dead_window_tokens": None, "stitching_attr_exact_pairs_per_ctx": 8}
    assert before.to_flat() == {**OLD_DEMO, **added} and list(before.to_flat()) == [*OLD_DEMO, *added]
    assert (demo.to_flat()["train_dead_window_tokens"], demo.to_flat()["meta_width"]) == (20_480, 2304)
    assert BuildConfig.from_dict(demo.to_dict()) == demo
    manifest = DATA / "manifest.json"
    if manifest.is_file():
        from metasae.pipeline.assemble import built_with_same_settings

        built = json.loads(manifest.read_text())["build"]
        assert built_with_same_settings(built["config"], demo)
        assert command_for(demo, "data") == built["command"]


def test_old_flat_work_folder_keeps_its_outputs(tmp_path: Path) -> None:
    work = tmp_path / "work"
    outputs = [work / "acts" / "shard_0.safetensors", work / "saes" / "576" / "x", work / "meta.json",
               work / "stats" / "latents_576.parquet"]
    for p in outputs:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("cached")
    (work / "config.json").write_text(json.dumps(OLD_DEMO))
    logs: list[str] = []
    prepare_work(_before_auxk(), work, force=False, log=logs.append)
    assert all(p.is_file() for p in outputs) and logs == []
    stored = json.loads((work / "config.json").read_text())
    assert stored["meta"]["k"] == 4 and BuildConfig.from_dict(stored) == _before_auxk()
    # a changed meta setting drops the meta stage's outputs only
    prepare_work(_before_auxk().with_values({"meta.k": 2}), work, force=False, log=logs.append)
    assert not (work / "meta.json").exists() and all(p.is_file() for p in outputs if p.name != "meta.json")
    assert "redoing stages ['meta']" in logs[0]


def test_options_missing_from_an_old_config_count_as_their_defaults() -> None:
    old = {k: v for k, v in OLD_DEMO.items() if k != "dense_pcs"}  # as if dense_pcs came later
    assert stale_stages(old, _before_auxk()) == []
    assert stale_stages(old, _before_auxk().with_values({"train.dense_pcs": 2}))[0] == "ladder"


def test_every_option_invalidates_a_stage() -> None:
    deps = [d for s in STAGES for d in s.depends_on]
    loose = [p for p in paths() if p != "preset" and not any(p == d or p.startswith(d + ".") for d in deps)]
    assert loose == []
    base = PRESETS["tiny"]
    assert stale_stages(base, base.with_values({"stitching.threshold": 0.5}))[0] == "evaluate"
    assert stale_stages(base, base.with_values({"corpus.shard_ctx": 64}))[0] == "activations"


def test_train_section_makes_the_train_config_of_either_architecture() -> None:
    cfg = from_preset("tiny", {"train.architecture": "standard", "train.l1_coefficient": 2.5, "train.k": 8})
    tc = cfg.train.train_config(seed=4)
    assert (tc.architecture, tc.l1_coefficient, tc.k, tc.seed) == ("standard", 2.5, 8, 4)
    assert stale_stages(cfg, cfg.with_values({"train.l1_coefficient": 3.0}))[0] == "ladder"


def test_meta_section_makes_the_meta_config() -> None:
    mc = MetaRecipeConfig(width=16, k=2, batches=10, batch_size=32).meta_config(seed=3)
    assert (mc.width, mc.k, mc.n_batches, mc.batch_size, mc.seed) == (16, 2, 10, 32, 3)


def test_exact_ce_sample_and_groups() -> None:
    from metasae import stitching as st

    attr = np.array([0.0, 5.0, -4.0, 0.0, 0.1, 0.2, 0.0, 3.0])
    s = st.exact_ce_sample(attr, 4, seed=0)
    assert list(s) == sorted(s) and {1, 2} <= set(s) and set(s) <= set(np.flatnonzero(attr))
    assert list(st.exact_ce_sample(attr, 4, seed=0)) == list(s)


def test_the_flat_form_reads_back_options_added_after_the_legacy_names() -> None:
    """A manifest's flat `build.config` holds `<section>_<field>` names for newer options: they read back."""
    cfg = from_preset("demo").with_values({"stitching.attr_exact_pairs_per_ctx": 3})
    assert cfg.to_flat()["stitching_attr_exact_pairs_per_ctx"] == 3
    assert BuildConfig.from_dict(cfg.to_flat()) == cfg
    assert cfg.with_values({"stitching_attr_exact_pairs_per_ctx": 5}).stitching.attr_exact_pairs_per_ctx == 5
