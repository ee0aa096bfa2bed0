"""Text search and meta-latent search: ranking, filters, brute-force agreement, hostile input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from metasae.atlas import SCHEMAS, Atlas, UnknownLatentError, write_manifest, write_table
from metasae.search import RESULT_COLUMNS, SearchIndex
from metasae.synthetic_atlas import PLANTED, make_synthetic_atlas


@pytest.fixture(scope="module")
def atlas(tmp_path_factory: pytest.TempPathFactory) -> Atlas:
    path = make_synthetic_atlas(tmp_path_factory.mktemp("atlas") / "a", seed=3, with_weights=False)
    return Atlas.open(path)


@pytest.fixture(scope="module")
def index(atlas: Atlas) -> SearchIndex:
    return SearchIndex(atlas)


def _mini_atlas(root: Path) -> Atlas:
    """Five hand-made latents, one per ranking band, written through the public writer."""
    labels = ["cat", "black cat sleeping", "dog", "fish", "C++ (a+)+ [x] 100% 'quoted' \"dq\" ünïcödé"]
    top = [[" the"], [" the"], [" Cat", " bark"], [" water"], [" plus"]]
    examples_tokens = [[" a", " b", " c"], [" a", " b", " c"], [" a", " b", " c"], [" my", " cats", " swim"],
                       [" x", " y", " z"]]
    n = len(labels)
    write_table(root, "latents", pd.DataFrame({
        "sae_width": 16, "latent": range(n), "label": labels, "density": [0.1, 0.2, 0.3, 0.4, 0.5],
        "mean_act": 1.0, "max_act": 2.0, "top_tokens": top, "top_logits": [[" z"]] * n,
        "kind": [None, "novel", "reconstruction", "novel", None], "delta_mse": [-1.0, -2.0, -3.0, -4.0, -5.0],
    }))
    write_table(root, "decompositions", pd.DataFrame({
        "sae_width": 16, "latent": np.repeat(np.arange(n), 2), "meta_latent": [0, 1] * n,
        "weight": [0.5, 0.1] * n, "rank": [0, 1] * n,
    }))
    write_table(root, "meta_latents", pd.DataFrame({"meta_latent": [0, 1], "label": ["m0", "m1"], "n_members": n}))
    write_table(root, "examples", pd.DataFrame({
        "sae_width": 16, "latent": range(n), "rank": 0, "activation": 1.0, "tokens": examples_tokens,
        "acts": [[0.0, 1.0, 0.5]] * n, "position": 1,
    }))
    empty = {f.name: pa.array([], f.type) for f in SCHEMAS["stitching"]}
    write_table(root, "stitching", pa.table(empty))
    write_manifest(root, {"model": {"name": "mini"}, "saes": [], "meta_sae": {}, "weights": False})
    return Atlas.open(root)


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> SearchIndex:
    return SearchIndex(_mini_atlas(tmp_path_factory.mktemp("mini")))


def test_ranking_bands_exact_label_token_example(mini: SearchIndex) -> None:
    r = mini.text("CAT")
    assert list(r.columns) == RESULT_COLUMNS
    assert r["latent"].tolist() == [0, 1, 2, 3]
    assert r["match"].tolist() == ["label (exact)", "label", "top token", "example"]
    assert r["score"].tolist() == sorted(r["score"].tolist(), reverse=True)
    assert r["score"].iloc[0] == 4.0 and 3 < r["score"].iloc[1] < 4 and 2 < r["score"].iloc[2] < 3
    assert 1 < r["score"].iloc[3] < 2
    assert mini.text("cat", limit=2)["latent"].tolist() == [0, 1]


def test_multi_word_queries_need_every_word(mini: SearchIndex) -> None:
    assert mini.text("black cat")["latent"].tolist() == [1]  # label substring
    assert mini.text("cat bark")["latent"].tolist() == [2]  # both words among the top tokens
    assert mini.text("cat zebra").empty
    assert mini.text("ck ca")["latent"].tolist() == [1]  # a label substring across a word boundary
    assert mini.text("cat black").empty  # both words are in label 1, but not in this order


def test_filters(mini: SearchIndex) -> None:
    assert mini.text("cat", kind="novel")["latent"].tolist() == [1, 3]
    assert mini.text("cat", kind=["novel", "reconstruction"])["latent"].tolist() == [1, 2, 3]
    assert mini.text("cat", min_density=0.15, max_density=0.35)["latent"].tolist() == [1, 2]
    assert mini.text("cat", max_delta_mse=-2.5)["latent"].tolist() == [2, 3]
    assert mini.text("cat", min_delta_mse=-1.5)["latent"].tolist() == [0]
    assert mini.text("cat", widths=[32]).empty and len(mini.text("cat", widths=[16])) == 4


@pytest.mark.parametrize(("query", "expected"), [
    ("", []), ("   ", []), ("'", [4]), ('"', [4]), ("'; DROP TABLE latents; --", []), ("\" OR 1=1 --", []),
    (".*", []), ("[", [4]), ("(", [4]), ("*", []), ("+", [4]), ("?", []), ("\\", []), ("%", [4]), ("_", []),
    ("$1", []), ("^", []), ("|", []), ("{}", []), ("(?i)cat", []), ("\x00", []), ("\ud800", []),
    ("\U0001f642", []), ("a" * 10_000, []), ("cat " * 2500, [2, 3]),
    ("".join(chr(c) for c in range(0x100, 0x100 + 3000)) * 3, []),
])
def test_hostile_queries_are_literal_and_safe(mini: SearchIndex, query: str, expected: list[int]) -> None:
    r = mini.text(query)
    assert list(r.columns) == RESULT_COLUMNS
    assert r["latent"].tolist() == expected  # metacharacters are plain text; SQL is just words


def test_regex_and_sql_characters_match_literally(mini: SearchIndex) -> None:
    assert mini.text("(a+)+ [x]")["latent"].tolist() == [4]
    assert mini.text("100%")["latent"].tolist() == [4]
    assert mini.text("'quoted' \"dq\"")["latent"].tolist() == [4]
    assert mini.text("ÜNÏCÖDÉ")["latent"].tolist() == [4]
    assert mini.text("c++")["latent"].tolist() == [4]
    with pytest.raises(TypeError):
        mini.text(None)  # type: ignore[arg-type]
    assert mini.text("cat", limit=0).empty


def test_planted_latents_are_found(index: SearchIndex) -> None:
    e = PLANTED["einstein"]
    top = index.text("Albert Einstein physicist").iloc[0]
    assert (top.sae_width, top.latent, top.match, top.score) == (e["width"], e["latent"], "label (exact)", 4.0)
    r = index.text("einstein")
    assert (r.iloc[0].sae_width, r.iloc[0].latent) == (128, 7)
    assert index.text("relativity").iloc[0][["latent", "match"]].tolist() == [7, "top token"]
    hidden = PLANTED["hidden"]
    found = index.text("Zyzzogeton")
    assert found[["sae_width", "latent", "match"]].values.tolist() == [[hidden["width"], hidden["latent"], "example"]]


def test_label_matches_agree_with_pandas(atlas: Atlas, index: SearchIndex) -> None:
    table = pd.concat([atlas.latents_table(w, ["sae_width", "latent", "label", "kind", "density"])
                       for w in atlas.widths])
    spanning = [lab[2:-2] for lab in table["label"].iloc[[5, 50, 300]] if " " in lab[2:-2]]
    assert len(spanning) == 3  # substrings that cross a word boundary inside the label
    for q in ("ea", "st", "ou", "the", *spanning):
        want = table[table["label"].str.lower().str.contains(q, regex=False)]
        got = index.text(q, limit=10_000)
        got = got[got["match"].str.startswith("label")]
        assert sorted(zip(got.sae_width, got.latent, strict=True)) == sorted(zip(want.sae_width, want.latent,
                                                                                  strict=True))
        novel = index.text(q, kind="novel", min_density=1e-3, widths=[128, 256], limit=10_000)
        novel = novel[novel["match"].str.startswith("label")]
        sub = want[(want.kind == "novel") & (want.density >= 1e-3) & want.sae_width.isin([128, 256])]
        assert sorted(novel["latent"].tolist()) == sorted(sub["latent"].tolist())


def _brute_force(atlas_dir: Path, required: dict[int, float]) -> list[tuple[int, int, float]]:
    dec = pd.read_parquet(atlas_dir / "decompositions.parquet")
    hits = None
    for m, t in required.items():
        rows = dec[(dec.meta_latent == m) & (dec.weight >= t)].set_index(["sae_width", "latent"])["weight"]
        hits = rows.to_frame(m) if hits is None else hits.join(rows.to_frame(m), how="inner")
    assert hits is not None
    total = hits.sum(axis=1).astype(np.float64)
    return sorted(((w, i, float(s)) for (w, i), s in total.items()), key=lambda x: (-x[2], x[0], x[1]))


def test_by_meta_matches_brute_force(atlas: Atlas, index: SearchIndex) -> None:
    got = index.by_meta({3: 0.2, 11: 0.2})
    keys = list(zip(got.sae_width, got.latent, strict=True))
    assert (128, 7) in keys and (256, 42) in keys
    assert got.set_index(["sae_width", "latent"]).loc[(128, 7), "score"] == pytest.approx(0.8)
    rng = np.random.default_rng(0)
    for _ in range(20):
        w = int(rng.choice(atlas.widths))
        d = atlas.decomposition(w, int(rng.integers(atlas.n_latents(w))))
        required = {int(m): float(x) * 0.5 for m, x in zip(d.meta_latent[:2], d.weight[:2], strict=True)}
        want = _brute_force(atlas.path, required)
        got = index.by_meta(required, limit=10_000)
        assert list(zip(got.sae_width, got.latent, strict=True)) == [(a, b) for a, b, _ in want]
        np.testing.assert_allclose(got["score"], [s for _, _, s in want], rtol=1e-6)


def test_by_meta_list_form_threshold_widths_and_errors(index: SearchIndex) -> None:
    loose = index.by_meta([3, 11], limit=10_000)
    strict = index.by_meta([3, 11], min_weight=0.3, limit=10_000)
    assert set(zip(strict.sae_width, strict.latent, strict=True)) <= set(zip(loose.sae_width, loose.latent,
                                                                              strict=True))
    assert (256, 42) in set(zip(strict.sae_width, strict.latent, strict=True))
    assert (128, 7) in set(zip(strict.sae_width, strict.latent, strict=True))  # 0.5 and 0.3 both pass 0.3
    assert set(index.by_meta([3, 11], widths=[256])["sae_width"]) == {256}
    assert index.by_meta([]).empty and index.by_meta({3: 0.1}, limit=0).empty
    assert len(index.by_meta([3], limit=3)) == 3
    with pytest.raises(UnknownLatentError, match="meta-latent 4096"):
        index.by_meta([3, 4096])
    with pytest.raises(UnknownLatentError):
        index.by_meta(["3; DROP"])  # type: ignore[list-item]
