"""metasae.report's derived tables, checked against per-latent loops over the planted synthetic atlas."""

from __future__ import annotations

import numpy as np
import pytest

from metasae import report
from metasae.atlas import Atlas, Manifest
from metasae.atlas.manifest import MetaSaeInfo
from metasae.synthetic_atlas import make_synthetic_atlas


@pytest.fixture(scope="module")
def atlas(tmp_path_factory) -> Atlas:
    return Atlas.open(make_synthetic_atlas(tmp_path_factory.mktemp("report") / "a", widths=(32, 64), plant=False))


def test_ladder_health_counts_match_a_loop(atlas):
    h = report.ladder_health(atlas).set_index("width")
    for w in atlas.widths:
        dens = [atlas.latent(w, i)["density"] for i in range(atlas.n_latents(w))]
        assert h.loc[w, "dead"] == pytest.approx(sum(d == 0 for d in dens) / len(dens))
        assert h.loc[w, "rare"] == pytest.approx(sum(0 < d < report.LIVE_DENSITY for d in dens) / len(dens))
        assert h.loc[w, "always_on"] == sum(d > report.ALWAYS_ON_DENSITY for d in dens)


def test_pair_detail_novel_among_live_and_small_effect_spearman(atlas):
    small, large = atlas.widths
    d = report.pair_detail(atlas, small, large)
    rows = [atlas.latent(large, i) for i in range(atlas.n_latents(large))]
    live = [r for r in rows if r["density"] >= report.LIVE_DENSITY]
    assert d["live_frac"] == pytest.approx(len(live) / len(rows))
    assert d["novel_live"] == pytest.approx(np.mean([r["kind"] == "novel" for r in live]))
    pairs = [(r["delta_ce"], r["delta_ce_attr"]) for r in rows
             if r["delta_ce"] is not None and np.isfinite(r["delta_ce"]) and abs(r["delta_ce"]) < 0.05]
    assert d["n_small"] == len(pairs) > 2
    from scipy.stats import spearmanr

    assert d["spearman_small"] == pytest.approx(spearmanr(*zip(*pairs, strict=True)).statistic, abs=1e-9)


def test_targets_are_read_from_the_manifest_and_judged():
    seeds_ok = [{"scientist_members": 3, "german_member": True}] * 3
    m = Manifest.coerce({
        "model": {"name": "m"},
        "stitching": {"pairs": [{"small": 8, "large": 16, "novel_frac_functional": 0.30, "novel_frac_cos_live": 0.6,
                                 "monotone_frac": 0.95},
                                {"small": 16, "large": 32, "novel_frac_functional": 0.60, "novel_frac_cos_live": 0.5,
                                 "monotone_frac": 0.91}],
                      "seed_baseline": {"mismatch_frac": 0.64}},
        "saes": [{"width": 8, "always_on_share": 0.0}, {"width": 16, "always_on_share": 0.2, "stats_rare_frac": 0.1}],
        "meta_sae": {"train_fvu": 0.5, "heldout_fvu": 0.7, "random_heldout_fvu": 0.95},
        "showcase": [{"role": "person", "width": 16, "latent": 1, "seeds": seeds_ok},
                     {"role": "nationality", "width": 16, "latent": 2,
                      "seeds": [*seeds_ok[:2], {"scientist_members": 0, "german_member": False}]}]})
    got = {t[0].split(":")[0].split(",")[0]: (t[2], t[3]) for t in report.targets(m)}
    assert got["functional novel fraction of live latents"] == ("30.0% / 60.0%", False)  # 60% is above 55%
    assert got["cosine-novel among live latents"][1] is True
    assert got["same-width seed mismatch (smallest rung)"] == ("64.0%", True)
    assert got["always-on latents' share of active slots"] == ("0.0% / 20.0%", False)
    assert got["meta-SAE variance explained"] == ("50.0% / 30.0% / 5.0%", True)  # 5% * 5 <= 30%
    assert got["person showcase"] == ("3 of 3", True)
    assert got["nationality showcase"] == ("2 of 3", False)
    assert got["stitching curves"][1] is True


def test_intervention_block_is_copied_with_headings_one_level_down(tmp_path) -> None:
    from metasae.report import EVAL_END, EVAL_START, intervention_block

    assert "not measured yet" in intervention_block(tmp_path / "missing.md")[0]
    (tmp_path / "intervention.md").write_text(f"# x\n{EVAL_START}\n\n### Verdict\n| a | b |\n{EVAL_END}\ntail\n")
    assert intervention_block(tmp_path / "intervention.md") == ["#### Verdict", "| a | b |"]


def test_atlas_readme_targets_are_rewritten_between_markers_only(tmp_path) -> None:
    from metasae.report import TARGETS_END, TARGETS_START, update_atlas_readme

    rows = [("novel", "25-55%", "30.0%", True), ("rare", "< 15%", "39.0%", False)]
    readme = tmp_path / "README.md"
    readme.write_text(f"# Atlas\n\nintro\n\n{TARGETS_START}\n| old | table |\n{TARGETS_END}\n\nafter\n")
    assert update_atlas_readme(readme, rows)
    text = readme.read_text()
    assert "| old | table |" not in text and text.startswith("# Atlas\n\nintro\n\n") and text.endswith("\n\nafter\n")
    assert "| novel | 25-55% | 30.0% | yes |" in text and "| rare | < 15% | 39.0% | no |" in text
    assert update_atlas_readme(readme, rows) and readme.read_text() == text  # idempotent
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    assert not update_atlas_readme(plain, rows) and plain.read_text() == "no markers\n"
    assert not update_atlas_readme(tmp_path / "missing.md", rows)


def test_sibling_rows_read_each_bin_of_the_manifest():
    ms = MetaSaeInfo.model_validate({"heldout_by_nearest": [
        {"lo": -1.0, "hi": 0.5, "n": 330, "heldout_fvu": 0.79}, {"lo": 0.5, "hi": 0.7, "n": 0, "heldout_fvu": None},
        {"lo": 0.7, "hi": 1.0, "n": 324, "heldout_fvu": 0.383}]})
    assert report._sibling_rows(ms) == [
        "| held-out rows whose nearest training row has cos below 0.5 (330 rows) | 21.0% | | |",
        "| held-out rows whose nearest training row has cos 0.5 to 0.7 (0 rows) | — | | |",
        "| held-out rows whose nearest training row has cos at or above 0.7 (324 rows) | 61.7% | | |"]
    assert report._sibling_rows(MetaSaeInfo()) == []  # older atlases
