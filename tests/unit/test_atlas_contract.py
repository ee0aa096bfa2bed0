"""The atlas contract's typed parts: the Manifest model (defaults, unknown keys, round trips), optional tables,
the supported format_version range, and the bundled atlas read through the model without rebuilding it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

import metasae.atlas.checks as checks_module
import metasae.atlas.manifest as manifest_module
from metasae.atlas import (
    COS_THRESHOLD,
    FORMAT_VERSION,
    MANIFEST,
    MIN_FORMAT_VERSION,
    OPTIONAL_TABLES,
    REQUIRED_TABLES,
    TABLES,
    Atlas,
    AtlasError,
    Manifest,
    load_manifest,
    read_manifest,
    verify,
    write_manifest,
    write_table,
)
from metasae.synthetic_atlas import make_synthetic_atlas

DATA = Path(__file__).resolve().parents[2] / "data"
MINIMAL = {"model": {"name": "m"}, "saes": [{"width": 8}], "meta_sae": {}}


@pytest.fixture(scope="module")
def atlas_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_atlas(tmp_path_factory.mktemp("contract") / "a", seed=1)


@pytest.fixture()
def copy(atlas_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(atlas_dir, tmp_path / "copy"))


def _drop_table(root: Path, name: str) -> None:
    """Delete a table and re-sign the manifest, as an atlas assembled without it would be."""
    (root / TABLES[name].file).unlink()
    write_manifest(root, json.loads((root / MANIFEST).read_text()))


# ------------------------------------------------------------------------------ the Manifest model


def test_manifest_defaults_live_in_the_model_and_round_trip() -> None:
    m = Manifest.coerce(MINIMAL)
    assert m.stitching.threshold == COS_THRESHOLD == 0.7
    assert m.weights is True and m.synthetic is False and m.showcase == [] and m.stitching.pairs == []
    assert m.meta_sae.path == "meta_sae" and m.saes[0].folder == "saes/8" and m.ctx_len == 128
    assert m.stitching.seed_baseline is None and m.meta_sae.seed_matched_frac is None
    # defaults are not written: reading the JSON back gives the same model and the same JSON
    assert m.to_dict() == MINIMAL
    again = Manifest.coerce(json.loads(json.dumps(m.to_dict())))
    assert again == m and again.stitching.threshold == 0.7


def test_unknown_keys_survive_a_round_trip(tmp_path: Path) -> None:
    raw = {**MINIMAL, "from_the_future": {"x": [1, 2]},
           "model": {"name": "m", "quantisation": "q4"},
           "stitching": {"threshold": 0.6, "pairs": [{"small": 8, "large": 16, "new_metric": 0.5}]}}
    write_manifest(tmp_path, raw)
    written = json.loads((tmp_path / MANIFEST).read_text())
    assert written["from_the_future"] == {"x": [1, 2]} and written["model"]["quantisation"] == "q4"
    assert written["stitching"]["pairs"][0]["new_metric"] == 0.5
    m = load_manifest(tmp_path)
    assert m.stitching.threshold == 0.6 and m.stitching.pairs[0].small == 8
    assert m.model_extra == {"from_the_future": {"x": [1, 2]}}
    write_manifest(tmp_path, m)  # a Manifest is accepted as is
    assert json.loads((tmp_path / MANIFEST).read_text()) == written


def test_write_manifest_validates_a_dict_and_names_the_bad_field(tmp_path: Path) -> None:
    with pytest.raises(AtlasError, match=r"manifest.json: .*saes\.0\.width"):
        write_manifest(tmp_path, {**MINIMAL, "saes": [{"width": "wide"}]})
    with pytest.raises(AtlasError, match=r"model: Field required"):
        write_manifest(tmp_path, {"saes": [], "meta_sae": {}})
    assert not (tmp_path / MANIFEST).exists()


def test_the_bundled_atlas_reads_through_the_model_unchanged() -> None:
    """data/ is not rebuilt: its manifest validates and writing the model back gives the same JSON."""
    if not (DATA / MANIFEST).is_file():
        pytest.skip("data/ holds no atlas")
    raw = json.loads((DATA / MANIFEST).read_text())
    m = Manifest.coerce(raw)
    assert m.to_dict() == raw
    assert m.stitching.threshold == 0.7 and m.meta_sae.seed_matched_frac is not None
    assert [s.width for s in m.saes] == [576, 1152, 2304, 4608] and m.model.d_model == 576


def test_older_and_synthetic_shapes_validate() -> None:
    """The synthetic writer's bare seed-stability number, a null overlap and an atlas without the fields later
    builds added all validate; overlap read the old way (overlap_of_meta) when ``overlap`` was not recorded."""
    m = Manifest.coerce({**MINIMAL, "meta_sae": {"seed_stability": 0.42, "overlap": None}})
    assert m.meta_sae.seed_matched_frac == 0.42 and m.meta_sae.overlap_value is None
    assert m.meta_sae.overlap_recorded
    old = Manifest.coerce({**MINIMAL, "meta_sae": {"overlap": {"overlap_of_meta": 0.1}}})
    assert old.meta_sae.overlap_value == 0.1
    assert not Manifest.coerce(MINIMAL).meta_sae.overlap_recorded


# ------------------------------------------------------------------------------ optional and required tables


def test_schema_says_which_tables_are_required() -> None:
    assert set(REQUIRED_TABLES) | set(OPTIONAL_TABLES) == set(TABLES)
    assert "stitching" in OPTIONAL_TABLES and "latents" in REQUIRED_TABLES
    from metasae.pipeline.stages import STAGE_NAMES

    assert all(TABLES[t].stage in STAGE_NAMES for t in TABLES)  # the message names a stage that exists


@pytest.mark.parametrize("lazy", [False, True])
def test_an_atlas_without_an_optional_table_verifies_and_opens(copy: Path, lazy: bool) -> None:
    _drop_table(copy, "stitching")
    assert verify(copy) == []
    atlas = Atlas.open(copy, lazy=lazy)
    assert not atlas.has_table("stitching") and atlas.has_table("latents")
    assert atlas.stitching_pairs() == [] and atlas.stitching_curve(64, 128).empty
    message = atlas.missing_table_message("stitching")
    assert "stitching.parquet" in message and "'stitching' stage" in message
    with pytest.raises(AtlasError, match="stitching.parquet"):
        atlas.tables["stitching"]
    assert atlas.latent(128, 7)["label"]  # everything else still answers


@pytest.mark.parametrize("lazy", [False, True])
def test_training_curves_table_round_trips_and_may_be_absent(copy: Path, lazy: bool) -> None:
    """The table added after format 1's first atlases (docs/architecture.md's walkthrough): older atlases open."""
    _drop_table(copy, "training_curves")
    atlas = Atlas.open(copy, lazy=lazy)
    assert not atlas.has_table("training_curves") and atlas.training_curves().empty
    assert "'assemble' stage" in atlas.missing_table_message("training_curves")
    rows = pd.DataFrame({"sae_width": [128, 64, 64], "tokens": [512, 1024, 512], "fvu": [0.5, 0.3, 0.6]})
    write_table(copy, "training_curves", rows)
    manifest, _ = read_manifest(copy)
    write_manifest(copy, manifest)  # the new file enters the checksums
    assert verify(copy) == []
    got = Atlas.open(copy, lazy=lazy).training_curves()
    assert got.to_dict("list") == {"sae_width": [64, 64, 128], "tokens": [512, 1024, 512],
                                   "fvu": pytest.approx([0.6, 0.3, 0.5])}  # sorted by its key


def test_views_of_an_atlas_without_the_stitching_table(copy: Path) -> None:
    from metasae import app_state
    from metasae.views.overview import curves
    from metasae.views.stitching import pair_summary

    _drop_table(copy, "stitching")
    atlas = Atlas.open(copy)
    assert curves(atlas) == {}
    assert app_state.page_pairs(atlas) == [(64, 128), (128, 256)]  # kinds and deltas still per pair
    assert pair_summary(atlas, 64, 128)["novel_frac"] is not None


def test_a_missing_required_table_names_the_file_and_the_stage(copy: Path) -> None:
    _drop_table(copy, "decompositions")
    problems = verify(copy)
    assert any("decompositions.parquet" in p and "required table is missing" in p and "'meta' stage" in p
               for p in problems), problems
    with pytest.raises(AtlasError, match="decompositions.parquet"):
        Atlas.open(copy)


# ------------------------------------------------------------------------------ format_version range


@pytest.mark.parametrize("version", [MIN_FORMAT_VERSION - 1, FORMAT_VERSION + 1, "1", True, None])
def test_format_version_outside_the_supported_range(copy: Path, version: object) -> None:
    m = json.loads((copy / MANIFEST).read_text())
    m["format_version"] = version
    (copy / MANIFEST).write_text(json.dumps(m))
    problems = verify(copy)
    assert len(problems) == 1 and f"format_version {version!r} found" in problems[0]
    assert "supports format_version" in problems[0]
    if version == FORMAT_VERSION + 1:
        assert "newer metasae" in problems[0]
    with pytest.raises(AtlasError, match="format_version"):
        Atlas.open(copy, verify=False)


def test_an_older_format_is_migrated_when_read(copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A future format 2 that renamed a key: format 1 atlases still verify and open, migrated in memory."""
    for module in (manifest_module, checks_module):
        monkeypatch.setattr(module, "FORMAT_VERSION", 2, raising=False)
    monkeypatch.setattr(manifest_module, "MIGRATIONS", {1: lambda m: {**m, "synthetic": m.pop("is_synthetic")}})
    m = json.loads((copy / MANIFEST).read_text())
    m["is_synthetic"] = m.pop("synthetic")
    (copy / MANIFEST).write_text(json.dumps(m))
    assert verify(copy) == []
    atlas = Atlas.open(copy)
    assert atlas.manifest.synthetic is True and atlas.manifest.format_version == 2
    assert json.loads((copy / MANIFEST).read_text())["format_version"] == 1  # the file is left as it was
