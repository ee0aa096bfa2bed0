"""The atlas folder contract: writing, verifying, opening and indexed lookups (against brute force)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from metasae.atlas import (
    FORMAT_VERSION,
    KEYS,
    SCHEMAS,
    Atlas,
    AtlasError,
    UnknownLatentError,
    atlas_files,
    sha256_file,
    verify,
    write_json_atomic,
    write_manifest,
    write_table,
)
from metasae.synthetic_atlas import PLANTED, PLANTED_META, make_synthetic_atlas


@pytest.fixture(scope="module")
def atlas_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_atlas(tmp_path_factory.mktemp("atlas") / "a", seed=0)


@pytest.fixture(scope="module")
def atlas(atlas_dir: Path) -> Atlas:
    return Atlas.open(atlas_dir)


@pytest.fixture()
def copy(atlas_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the atlas that a test may damage."""
    return Path(shutil.copytree(atlas_dir, tmp_path / "copy"))


def _problems_about(problems: list[str], *needles: str) -> list[str]:
    return [p for p in problems if all(n in p for n in needles)]


# ------------------------------------------------------------------------------ synthetic atlas


def test_synthetic_atlas_verifies_and_has_the_manifest_fields(atlas_dir: Path) -> None:
    assert verify(atlas_dir) == []
    m = json.loads((atlas_dir / "manifest.json").read_text())
    assert m["format_version"] == FORMAT_VERSION
    assert m["model"]["name"] == "synthetic" and m["model"]["d_model"] == 32
    assert [s["width"] for s in m["saes"]] == [64, 128, 256]
    assert m["meta_sae"]["width"] == 32 and m["meta_sae"]["k"] == 4
    assert [(p["small"], p["large"]) for p in m["stitching"]["pairs"]] == [(64, 128), (128, 256)]
    assert 0.2 < m["stitching"]["pairs"][0]["novel_frac"] < 0.5
    assert set(m["files"]) == set(atlas_files(atlas_dir))
    assert {"latents.parquet", "saes/128/cfg.json", "saes/128/sae_weights.safetensors",
            "meta_sae/sae_weights.safetensors"} <= set(m["files"])
    assert m["files"]["latents.parquet"] == sha256_file(atlas_dir / "latents.parquet")


def test_synthetic_atlas_is_deterministic_in_seed(atlas_dir: Path, tmp_path: Path) -> None:
    same = make_synthetic_atlas(tmp_path / "same", seed=0, with_weights=False)
    other = make_synthetic_atlas(tmp_path / "other", seed=1, with_weights=False)
    tables = [f"{n}.parquet" for n in SCHEMAS]
    assert [sha256_file(same / t) for t in tables] == [sha256_file(atlas_dir / t) for t in tables]
    assert sha256_file(other / "latents.parquet") != sha256_file(atlas_dir / "latents.parquet")
    assert json.loads((same / "manifest.json").read_text())["weights"] is False
    with pytest.raises(FileExistsError):
        make_synthetic_atlas(same, seed=0, with_weights=False)


def test_sae_folders_load_with_sae_lens(atlas: Atlas) -> None:
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(atlas.sae_path(128)))
    assert tuple(sae.W_dec.shape) == (128, 32)
    meta = SAE.load_from_disk(str(atlas.meta_sae_path()))
    assert tuple(meta.W_dec.shape) == (32, 32)
    with pytest.raises(UnknownLatentError):
        atlas.sae_path(100)


# ------------------------------------------------------------------------------ lookups


def test_planted_latent_page(atlas: Atlas) -> None:
    e = PLANTED["einstein"]
    row = atlas.latent(e["width"], e["latent"])
    assert row["label"] == "Albert Einstein physicist"
    assert row["top_tokens"][:2] == [" Einstein", " relativity"]
    assert row["kind"] == "reconstruction" and row["nearest_smaller"] == 2
    dec = atlas.decomposition(128, 7)
    assert list(dec.columns) == ["meta_latent", "weight", "rank", "label"]
    assert dec["meta_latent"].tolist() == [3, 11, 5, 20]
    np.testing.assert_allclose(dec["weight"], [0.5, 0.3, 0.15, 0.05], rtol=1e-6)
    assert dec["label"].tolist() == [PLANTED_META[m] for m in (3, 11, 5, 20)]
    ex = atlas.examples(128, 7)
    assert [x["rank"] for x in ex] == [0, 1, 2, 3, 4]
    assert all(x["tokens"][x["position"]] == " Einstein" and len(x["tokens"]) == 16 for x in ex)
    assert all(x["acts"][x["position"]] == pytest.approx(x["activation"]) for x in ex)
    assert [x["activation"] for x in ex] == sorted((x["activation"] for x in ex), reverse=True)


def test_family_links_planted_ladder(atlas: Atlas) -> None:
    fam = atlas.family(128, 7)
    assert fam["smaller"]["sae_width"] == 64 and fam["smaller"]["latent"] == 2
    assert fam["smaller"]["cos"] == pytest.approx(0.97, abs=1e-6)
    assert fam["smaller"]["label"] == "physics and physicists"
    assert fam["larger"]["latent"] == 42 and fam["larger"]["label"] == "Marie Curie chemist"
    children = fam["children"]
    assert children[0]["latent"] == 42 and [c["cos"] for c in children] == sorted((c["cos"] for c in children),
                                                                                  reverse=True)
    assert 100 in [c["latent"] for c in children]  # the novel "quantum" latent points here too
    assert 7 in fam["group"] and fam["group_id"] == 2
    smallest = atlas.family(64, 2)
    assert smallest["smaller"] is None and smallest["kind"] is None and smallest["larger"]["latent"] == 7
    assert atlas.family(256, 42)["larger"] is None


def test_indexed_lookups_match_brute_force(atlas: Atlas, atlas_dir: Path) -> None:
    dec = pd.read_parquet(atlas_dir / "decompositions.parquet")
    ex = pd.read_parquet(atlas_dir / "examples.parquet")
    rng = np.random.default_rng(0)
    for _ in range(25):
        w = int(rng.choice(atlas.widths))
        i = int(rng.integers(atlas.n_latents(w)))
        want = dec[(dec.sae_width == w) & (dec.latent == i)].sort_values("weight", ascending=False, kind="stable")
        got = atlas.decomposition(w, i)
        assert got["meta_latent"].tolist() == want["meta_latent"].tolist()
        assert got["weight"].tolist() == want["weight"].tolist()
        want_ex = ex[(ex.sae_width == w) & (ex.latent == i)]
        assert [x["rank"] for x in atlas.examples(w, i)] == want_ex["rank"].tolist()
        assert atlas.latent(w, i)["latent"] == i and atlas.latent(w, i)["sae_width"] == w
    for m in (3, 11, 17, 30):
        want = dec[dec.meta_latent == m].sort_values("weight", ascending=False, kind="stable")
        got = atlas.members(m)
        assert list(got.columns) == ["sae_width", "latent", "weight", "label"]
        assert sorted(zip(got.sae_width, got.latent, strict=True)) == sorted(zip(want.sae_width, want.latent,
                                                                                  strict=True))
        assert got["weight"].tolist() == sorted(want["weight"].tolist(), reverse=True)
        only = atlas.members(m, width=128)
        assert set(only.sae_width) <= {128} and len(only) == int((want.sae_width == 128).sum())
        # co-occurrence: count latents holding both m and x
        holders = want[["sae_width", "latent"]].drop_duplicates()
        both = dec.merge(holders, on=["sae_width", "latent"])
        counts = both[both.meta_latent != m].groupby("meta_latent").size()
        co = atlas.cooccurring_meta(m, top=5)
        assert co["count"].tolist() == sorted(counts.tolist(), reverse=True)[:5]
        assert all(counts[r.meta_latent] == r.count for r in co.itertuples())


def test_members_of_planted_meta_latent(atlas: Atlas) -> None:
    members = atlas.members(11)
    keyed = {(r.sae_width, r.latent): r.weight for r in members.itertuples()}
    assert keyed[(128, 7)] == pytest.approx(0.3) and keyed[(256, 42)] == pytest.approx(0.35)
    assert atlas.meta_latent(11)["label"] == "prominent figures"
    assert atlas.meta_latent(11)["n_members"] == len(members)


@pytest.mark.parametrize(("width", "latent", "needle"), [
    (999, 0, "width 999"), (128, 128, "latent 128"), (128, -1, "latent -1"), (128, "7", "integer"),
    (128, 7.0, "integer"), (128, 2**40, "latent"),
])
def test_unknown_latent_raises_key_error(atlas: Atlas, width: object, latent: object, needle: str) -> None:
    with pytest.raises(KeyError) as info:
        atlas.latent(width, latent)  # type: ignore[arg-type]
    assert isinstance(info.value, UnknownLatentError) and needle in str(info.value)
    with pytest.raises(UnknownLatentError):
        atlas.decomposition(width, latent)  # type: ignore[arg-type]


def test_unknown_meta_latent_and_width(atlas: Atlas) -> None:
    with pytest.raises(UnknownLatentError, match="meta-latent 9999"):
        atlas.meta_latent(9999)
    with pytest.raises(UnknownLatentError):
        atlas.members(9999)
    with pytest.raises(UnknownLatentError, match="width 3"):
        atlas.latents_table(3)


def test_tables_and_stitching_curve(atlas: Atlas) -> None:
    assert atlas.widths == [64, 128, 256] and atlas.n_latents(256) == 256
    table = atlas.latents_table(128, columns=["latent", "kind", "label"])
    assert table["latent"].tolist() == list(range(128)) and list(table.columns) == ["latent", "kind", "label"]
    curve = atlas.stitching_curve(64, 128)
    assert curve["step"].tolist() == list(range(len(curve)))
    assert curve["action"].iloc[0] == "start" and set(curve["action"].iloc[1:]) <= {"add", "swap"}
    n_novel = int((table["kind"] == "novel").sum())
    n_groups = atlas.latents_table(128, columns=["group_id"])["group_id"].dropna().nunique()
    assert len(curve) == 1 + n_novel + n_groups
    assert curve["ce_loss"].isna().any() and curve["ce_loss"].notna().any()
    assert atlas.stitching_curve(64, 256).empty
    assert atlas.stitching_pairs() == [(64, 128), (128, 256)]


# ------------------------------------------------------------------------------ writing


def _latents_frame(n: int = 3) -> pd.DataFrame:
    return pd.DataFrame({
        "sae_width": [8] * n, "latent": list(range(n))[::-1], "label": [f"l{i}" for i in range(n)][::-1],
        "density": np.linspace(0.1, 0.3, n), "mean_act": 1.0, "max_act": 2.0,
        "top_tokens": [["a", "b"]] * n, "top_logits": [["c"]] * n, "extra": ["x"] * n,
    })


def test_write_table_casts_sorts_fills_and_keeps_extras(tmp_path: Path) -> None:
    path = write_table(tmp_path, "latents", _latents_frame())
    t = pq.read_table(path)
    assert t.column("latent").to_pylist() == [0, 1, 2] and t.column("label").to_pylist() == ["l0", "l1", "l2"]
    assert t.schema.field("density").type == pa.float32() and t.schema.field("latent").type == pa.int32()
    assert t.column("kind").null_count == 3 and t.column("hist_counts").null_count == 3
    assert t.column_names[-1] == "extra"
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"
    assert [p.name for p in tmp_path.iterdir()] == ["latents.parquet"]  # no temp file left behind


@pytest.mark.parametrize(("change", "needle"), [
    (lambda df: df.drop(columns=["density"]), "required column 'density' is missing"),
    (lambda df: df.assign(latent=["a", "b", "c"]), "column 'latent'"),
    (lambda df: df.assign(latent=[2**40, 1, 2]), "cannot be cast to int32"),
    (lambda df: df.assign(latent=[1, 1, 2]), "duplicate key"),
    (lambda df: df.assign(label=["x", None, "z"]), "'label' has 1 null values"),
])
def test_write_table_rejects_bad_input_and_keeps_old_file(tmp_path: Path, change, needle: str) -> None:
    good = write_table(tmp_path, "latents", _latents_frame())
    before = sha256_file(good)
    with pytest.raises(AtlasError) as info:
        write_table(tmp_path, "latents", change(_latents_frame()))
    assert "latents.parquet" in str(info.value) and needle in str(info.value)
    assert sha256_file(good) == before and len(list(tmp_path.iterdir())) == 1


def test_write_table_unknown_name_and_keys(tmp_path: Path) -> None:
    with pytest.raises(AtlasError, match="unknown atlas table"):
        write_table(tmp_path, "nope", _latents_frame())
    assert KEYS["examples"] == ("sae_width", "latent", "rank")


def test_write_json_atomic_and_manifest(tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "x.json", {"a": float("nan"), "b": np.float32(1.5), "c": np.arange(2)})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": None, "b": 1.5, "c": [0, 1]}
    (tmp_path / ".hidden").write_text("not part of the atlas")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.txt").write_text("hello")
    write_manifest(tmp_path, {"format_version": 99, "files": {"stale": "0"}, "model": {"name": "m"}, "saes": [],
                              "meta_sae": {}})
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["format_version"] == FORMAT_VERSION and m["model"] == {"name": "m"}
    assert m["files"] == {"sub/f.txt": sha256_file(tmp_path / "sub/f.txt"), "x.json": sha256_file(tmp_path / "x.json")}


# ------------------------------------------------------------------------------ verifying bad atlases


def _rewrite_manifest(root: Path, edit) -> None:
    m = json.loads((root / "manifest.json").read_text())
    edit(m)
    (root / "manifest.json").write_text(json.dumps(m))


def test_verify_missing_folder_and_manifest(tmp_path: Path, copy: Path) -> None:
    assert _problems_about(verify(tmp_path / "nope"), "does not exist")
    (copy / "manifest.json").unlink()
    assert _problems_about(verify(copy), "manifest.json", "missing")
    with pytest.raises(AtlasError, match="manifest.json"):
        Atlas.open(copy)


def test_verify_invalid_json_and_format_version(copy: Path) -> None:
    (copy / "manifest.json").write_text("{not json")
    assert _problems_about(verify(copy), "manifest.json", "invalid JSON")
    (copy / "manifest.json").write_text("[1, 2]")
    assert _problems_about(verify(copy), "expected a JSON object")
    (copy / "manifest.json").write_text(json.dumps({"format_version": 2}))
    problems = verify(copy)
    assert _problems_about(problems, "format_version 2 found", f"supports format_version {FORMAT_VERSION}")
    with pytest.raises(AtlasError, match="format_version 2 found"):
        Atlas.open(copy, verify=False)  # the version is checked even without a full verify
    (copy / "manifest.json").write_text(json.dumps({"model": {"name": "x"}}))
    assert _problems_about(verify(copy), "format_version is missing")


def test_verify_missing_and_unlisted_files(copy: Path) -> None:
    (copy / "examples.parquet").unlink()
    shutil.copy(copy / "latents.parquet", copy / "late.parquet")
    problems = verify(copy)
    assert _problems_about(problems, "examples.parquet", "missing on disk")
    assert _problems_about(problems, "late.parquet", "not listed in manifest.json")
    with pytest.raises(AtlasError, match="examples.parquet"):
        Atlas.open(copy)


def test_verify_truncated_and_corrupt_parquet(copy: Path) -> None:
    data = (copy / "latents.parquet").read_bytes()
    (copy / "latents.parquet").write_bytes(data[: len(data) // 2])
    assert _problems_about(verify(copy), "latents.parquet", "sha256 differs")
    assert _problems_about(verify(copy, checksums=False), "latents.parquet", "cannot be read as Parquet")
    with pytest.raises(AtlasError, match="latents.parquet"):
        Atlas.open(copy, verify=False)
    raw = bytearray((copy / "examples.parquet").read_bytes())
    raw[len(raw) // 3: len(raw) // 3 + 64] = bytes(64)
    (copy / "examples.parquet").write_bytes(bytes(raw))
    assert _problems_about(verify(copy), "examples.parquet", "sha256 differs")
    (copy / "stitching.parquet").write_bytes(b"PAR1 this is not parquet")
    assert _problems_about(verify(copy, checksums=False), "stitching.parquet", "cannot be read as Parquet")


def test_verify_missing_column_and_wrong_type(copy: Path) -> None:
    t = pq.read_table(copy / "latents.parquet")
    pq.write_table(t.drop_columns(["density"]), copy / "latents.parquet")
    m = pq.read_table(copy / "meta_latents.parquet")
    m = m.set_column(m.schema.get_field_index("n_members"), "n_members", m["n_members"].cast(pa.string()))
    pq.write_table(m, copy / "meta_latents.parquet")
    write_manifest(copy, json.loads((copy / "manifest.json").read_text()))  # checksums fine, columns not
    problems = verify(copy)
    assert _problems_about(problems, "latents.parquet", "required column 'density' is missing")
    assert _problems_about(problems, "meta_latents.parquet", "'n_members' has type string, expected int32")
    with pytest.raises(AtlasError, match="density"):
        Atlas.open(copy)


def test_verify_sae_folders_and_weights_flag(copy: Path) -> None:
    (copy / "saes/128/cfg.json").unlink()
    _rewrite_manifest(copy, lambda m: m["files"].pop("saes/128/cfg.json"))
    assert _problems_about(verify(copy), "saes/128/", "missing cfg.json")
    shutil.rmtree(copy / "meta_sae")
    _rewrite_manifest(copy, lambda m: [m["files"].pop(k) for k in list(m["files"]) if k.startswith("meta_sae/")])
    assert _problems_about(verify(copy), "meta_sae/", "sae_weights.safetensors")
    shutil.rmtree(copy / "saes")
    m = json.loads((copy / "manifest.json").read_text())
    m["weights"] = False
    write_manifest(copy, m)
    assert verify(copy) == []
    opened = Atlas.open(copy)
    with pytest.raises(AtlasError, match="weights: false"):
        opened.sae_path(128)


def test_verify_rejects_paths_outside_the_atlas(copy: Path) -> None:
    _rewrite_manifest(copy, lambda m: m["files"].update({"../outside.txt": "0" * 64, "/etc/passwd": "0"}))
    problems = verify(copy)
    assert _problems_about(problems, "'../outside.txt'", "not a relative path")
    assert _problems_about(problems, "'/etc/passwd'", "not a relative path")


def test_open_checks_expected_model(atlas_dir: Path) -> None:
    assert Atlas.open(atlas_dir, expect_model="synthetic").model_name == "synthetic"
    with pytest.raises(AtlasError, match="'gpt2'"):
        Atlas.open(atlas_dir, expect_model="gpt2")


def test_decomposition_is_sorted_by_weight_not_rank(copy: Path) -> None:
    dec = pd.read_parquet(copy / "decompositions.parquet")
    mine = (dec.sae_width == 128) & (dec.latent == 7)
    dec.loc[mine, "rank"] = np.array([3, 2, 1, 0], dtype=np.int8)  # ranks now disagree with the weights 0.5, 0.3, 0.15, 0.05
    write_table(copy, "decompositions", dec)
    write_manifest(copy, json.loads((copy / "manifest.json").read_text()))
    got = Atlas.open(copy).decomposition(128, 7)
    assert got["meta_latent"].tolist() == [3, 11, 5, 20] and got["rank"].tolist() == [3, 2, 1, 0]


def test_open_rejects_tables_written_out_of_key_order(copy: Path) -> None:
    t = pq.read_table(copy / "examples.parquet")
    pq.write_table(t.take(pa.array(np.arange(t.num_rows)[::-1])), copy / "examples.parquet")
    write_manifest(copy, json.loads((copy / "manifest.json").read_text()))
    assert verify(copy) == []  # the format checks pass; the order is caught when indexing
    with pytest.raises(AtlasError, match=r"examples.parquet: rows are not sorted"):
        Atlas.open(copy)


def test_example_acts_are_read_lazily_across_row_groups(copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import metasae.atlas.reader as reader_module
    import metasae.atlas.schema as schema_module

    ex = pd.read_parquet(copy / "examples.parquet")
    monkeypatch.setattr(schema_module, "ROW_GROUP_SIZE", 7)  # 5 examples per latent: many straddle two groups
    monkeypatch.setattr(reader_module, "_ACTS_CACHE_GROUPS", 2)  # and the cache must evict
    write_table(copy, "examples", ex)
    write_manifest(copy, json.loads((copy / "manifest.json").read_text()))
    assert pq.ParquetFile(copy / "examples.parquet").num_row_groups == -(-len(ex) // 7)
    opened = Atlas.open(copy)
    assert "acts" not in opened.tables["examples"].column_names
    for w, i in [(64, 1), (64, 2), (128, 7), (256, 255), (64, 1)]:
        want = ex[(ex.sae_width == w) & (ex.latent == i)]
        got = opened.examples(w, i)
        assert [list(x["acts"]) for x in got] == [list(a) for a in want["acts"]]
        assert [x["tokens"] for x in got] == [list(t) for t in want["tokens"]]
    assert len(opened._acts_cache) <= 2


# ------------------------------------------------------------------------------ hostile atlases (issue 14)


def test_manifest_with_nan_or_infinity_literals_is_refused(copy: Path) -> None:
    text = (copy / "manifest.json").read_text()
    for literal in ("NaN", "Infinity", "-Infinity"):
        (copy / "manifest.json").write_text(text.replace('"format_version": 1,', f'"format_version": 1, "x": {literal},'))
        problems = verify(copy)
        assert _problems_about(problems, "manifest.json", f"literal {literal}"), problems
        with pytest.raises(AtlasError, match=f"literal {literal}"):
            Atlas.open(copy, verify=False)


def test_symlinks_out_of_the_atlas_are_refused(copy: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not atlas data")
    (copy / "README.md").symlink_to(secret)  # not a tracked file: only the link check can catch it
    (copy / "saes" / "link").symlink_to(tmp_path, target_is_directory=True)
    problems = verify(copy, checksums=False)
    assert _problems_about(problems, "README.md", "symbolic link", "outside the atlas")
    assert _problems_about(problems, "saes/link", "outside the atlas")
    with pytest.raises(AtlasError, match="outside the atlas"):
        Atlas.open(copy, verify=False)
    # a tracked table replaced by a link to an outside copy of itself: checksums match, the link is refused
    (copy / "README.md").unlink()
    (copy / "saes" / "link").unlink()
    outside = tmp_path / "latents.parquet"
    shutil.move(copy / "latents.parquet", outside)
    (copy / "latents.parquet").symlink_to(outside)
    assert [p.split(":")[0] for p in verify(copy)] == ["latents.parquet"]


def test_links_inside_the_atlas_and_into_a_hub_blob_store_are_fine(copy: Path, tmp_path: Path) -> None:
    (copy / "notes").mkdir()
    (copy / "notes" / "same.parquet").symlink_to(copy / "latents.parquet")
    assert verify(copy, checksums=False) == []
    # the layout snapshot_download makes: <repo>/snapshots/<rev>/<file> -> ../../blobs/<sha256>
    repo = tmp_path / "datasets--a--b"
    snap = repo / "snapshots" / "rev"
    shutil.copytree(copy, snap)
    (repo / "blobs").mkdir()
    for f in sorted(snap.glob("*.parquet")):
        blob = repo / "blobs" / sha256_file(f)
        shutil.move(f, blob)
        f.symlink_to(Path("../../blobs") / blob.name)
    assert verify(snap) == []


def _weights(copy: Path, width: int = 128) -> Path:
    return copy / "saes" / str(width) / "sae_weights.safetensors"


def _resign(copy: Path) -> None:
    write_manifest(copy, json.loads((copy / "manifest.json").read_text()))


def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return n, json.loads(raw[8: 8 + n])


@pytest.mark.parametrize(("damage", "needle"), [
    ("pickle", "pickle / torch.save archive"),
    ("zip", "pickle / torch.save archive"),
    ("header_2_40", "header of 1099511627776 bytes"),
    ("header_90mb", "header of 94371840 bytes"),
    ("header_past_end", "follow the length"),
    ("header_not_json", "not valid JSON"),
    ("truncated", "truncated or padded"),
    ("nan", "holds 1 NaN/inf values"),
    ("inf", "holds 2 NaN/inf values"),
    ("wrong_shape", "'W_dec' has shape [128, 16]"),
    ("empty", "too short"),
])
def test_bad_weights_are_caught_by_verify(copy: Path, damage: str, needle: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    path = _weights(copy)
    raw = path.read_bytes()
    n, header = _header(path)
    if damage == "pickle":
        torch.save({"W_dec": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    elif damage == "zip":
        torch.save({"W_dec": torch.zeros(2)}, path)
    elif damage == "header_2_40":
        path.write_bytes((1 << 40).to_bytes(8, "little") + raw[8:])
    elif damage == "header_90mb":
        path.write_bytes((90 << 20).to_bytes(8, "little") + raw[8:])
    elif damage == "header_past_end":
        path.write_bytes((len(raw)).to_bytes(8, "little") + raw[8:])
    elif damage == "header_not_json":
        path.write_bytes(raw[:8] + b"{" * n + raw[8 + n:])
    elif damage == "truncated":
        path.write_bytes(raw[:-4])
    elif damage in ("nan", "inf"):
        t = load_file(path)
        if damage == "nan":
            t["W_dec"][3, 4] = float("nan")
        else:
            t["b_enc"][0], t["b_enc"][5] = float("inf"), float("-inf")
        save_file(t, path)
    elif damage == "wrong_shape":
        t = load_file(path)
        t["W_dec"] = t["W_dec"][:, :16].contiguous()
        save_file(t, path)
    elif damage == "empty":
        path.write_bytes(b"")
    _resign(copy)  # checksums agree: only the weight checks can tell
    problems = verify(copy)
    assert _problems_about(problems, "saes/128/sae_weights.safetensors", needle), problems
    assert not _problems_about(problems, "saes/64/")


def test_verify_fast_skips_only_the_value_scan(copy: Path) -> None:
    from safetensors.torch import load_file, save_file

    t = load_file(_weights(copy))
    t["W_enc"][0, 0] = float("nan")
    save_file(t, _weights(copy))
    _resign(copy)
    assert _problems_about(verify(copy), "W_enc", "NaN/inf")
    assert verify(copy, checksums=False) == []  # --fast: header and shapes only


def test_info_prints_null_and_missing_metrics_as_dashes(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from metasae.cli import main

    def edit(m: dict) -> None:
        m["saes"][0].update(l0=None, ce_loss=None)  # what write_json_atomic makes of NaN
        del m["saes"][1]["mse"]
        m["saes"][2] = {"width": 256}
        m["meta_sae"]["fvu"] = None
        m["stitching"] = {"pairs": [{"small": 64, "large": 128, "novel_frac": None}]}

    _rewrite_manifest(copy, edit)
    assert main(["info", str(copy)]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in out if line.split() and line.split()[0].isdigit()}
    assert rows["64"][1] == "-" and rows["64"][4] == "-" and rows["64"][2] != "-"
    assert rows["128"][2] == "-" and rows["256"][1:] == ["-"] * 5
    assert "pair 64->128: novel -, - groups" in out and out[-1].endswith("FVU -")
    good = (copy / "manifest.json").read_text()
    (copy / "manifest.json").write_text(good.replace("null", "NaN", 1))
    assert main(["info", str(copy)]) == 2
    assert "literal NaN" in capsys.readouterr().err
    (copy / "manifest.json").write_text(good)
    _rewrite_manifest(copy, lambda m: m.update(corpus=None))
    assert main(["info", str(copy)]) == 2
    assert "corpus: Input should be a valid dictionary" in capsys.readouterr().err
