"""The lazy reader (million-latent atlases) gives the in-memory reader's answers, values and all (issue 15.2).

A synthetic atlas of a few thousand latents is written with small row groups, so lookups straddle row groups and
the lazy caches evict; every public lookup and every kind of search is compared between ``Atlas.open(lazy=False)``
+ an in-memory ``SearchIndex`` and ``Atlas.open(lazy=True)`` + the stored, memory-mapped one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import metasae.atlas as atlas_module
import metasae.atlas.reader as reader_module
import metasae.atlas.schema as schema_module
import metasae.search as search_module
import metasae.synthetic_atlas as synthetic_module
from metasae.atlas import SCHEMAS, Atlas, AtlasError, UnknownLatentError, write_table, write_table_parts
from metasae.search import SearchIndex, build_cache, cache_dirs
from metasae.synthetic_atlas import make_synthetic_atlas, planted_for, vocabulary

WIDTHS = (256, 512, 1024, 2048)  # 3,840 latents


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    mp = pytest.MonkeyPatch()
    mp.setattr(schema_module, "ROW_GROUP_SIZE", 700)  # many row groups in every table
    try:
        return make_synthetic_atlas(tmp_path_factory.mktemp("lazy") / "a", widths=WIDTHS, n_meta=64, seed=5,
                                    with_weights=False)
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def eager(path: Path) -> Atlas:
    return Atlas.open(path, lazy=False)


@pytest.fixture(scope="module")
def lazy(path: Path) -> Atlas:
    mp = pytest.MonkeyPatch()
    mp.setattr(reader_module, "_ACTS_CACHE_GROUPS", 3)  # the row-group caches must evict
    mp.setattr(reader_module, "_LATENT_CACHE_GROUPS", 2)
    try:
        return Atlas.open(path, lazy=True)
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def indexes(eager: Atlas, lazy: Atlas) -> tuple[SearchIndex, SearchIndex]:
    return SearchIndex(eager), SearchIndex(lazy)


def _sample(atlas: Atlas, seed: int = 0, per_width: int = 12) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    out = []
    for w in atlas.widths:
        out += [(w, 0), (w, w - 1), (w, w - 3)] + [(w, int(i)) for i in rng.integers(w, size=per_width)]
    out += [(p["width"], p["latent"]) for p in planted_for(WIDTHS).values()]
    return out


def test_the_lazy_atlas_holds_only_the_small_tables(path: Path, lazy: Atlas, eager: Atlas) -> None:
    assert pq.ParquetFile(path / "latents.parquet").num_row_groups > 4
    assert lazy.lazy and not eager.lazy
    assert set(dict(lazy.tables)) == {"meta_latents"}
    assert set(dict(eager.tables)) == set(SCHEMAS)
    assert lazy.widths == eager.widths and lazy.n_meta_latents == eager.n_meta_latents
    assert lazy.columns("latents") == eager.columns("latents")
    assert Atlas.open(path).lazy is False  # 3,840 latents: below LAZY_ABOVE


def test_latent_pages_are_equal(eager: Atlas, lazy: Atlas) -> None:
    for w, i in _sample(eager) + _sample(eager, seed=1):  # the second pass hits evicted and cached groups
        assert lazy.latent(w, i) == eager.latent(w, i)
        pd.testing.assert_frame_equal(lazy.decomposition(w, i), eager.decomposition(w, i))
        assert lazy.examples(w, i) == eager.examples(w, i)
        assert lazy.family(w, i) == eager.family(w, i)
    assert len(lazy._ex_rows.cache) <= 3 and len(lazy._lat_rows.cache) <= 2
    einstein = planted_for(WIDTHS)["einstein"]
    got = lazy.examples(einstein["width"], einstein["latent"])
    assert got and all(" Einstein" in ex["tokens"] for ex in got)
    assert list(got[0]) == list(eager.examples(einstein["width"], einstein["latent"])[0])  # same key order


def test_meta_latents_tables_and_curves_are_equal(eager: Atlas, lazy: Atlas) -> None:
    for m in [0, 3, 11, 29, 63]:
        pd.testing.assert_frame_equal(lazy.members(m), eager.members(m))
        pd.testing.assert_frame_equal(lazy.members(m, width=512), eager.members(m, width=512))
        pd.testing.assert_frame_equal(lazy.cooccurring_meta(m), eager.cooccurring_meta(m))
        assert lazy.meta_latent(m) == eager.meta_latent(m)
    for w in WIDTHS:
        pd.testing.assert_frame_equal(lazy.latents_table(w), eager.latents_table(w))
        cols = ["latent", "label", "kind", "delta_mse", "decomp_fvu"]
        pd.testing.assert_frame_equal(lazy.latents_table(w, cols), eager.latents_table(w, cols))
    pd.testing.assert_frame_equal(lazy.meta_latents_table(), eager.meta_latents_table())
    assert lazy.stitching_pairs() == eager.stitching_pairs() == list(zip(WIDTHS, WIDTHS[1:], strict=False))
    for small, large in lazy.stitching_pairs() + [(256, 2048)]:
        pd.testing.assert_frame_equal(lazy.stitching_curve(small, large), eager.stitching_curve(small, large))
    # a table asked for whole is read whole (callers such as report.py)
    assert lazy.tables["decompositions"].equals(eager.tables["decompositions"])
    assert lazy.example_acts(0, 20) == eager.example_acts(0, 20)


def test_unknown_lookups_raise_the_same(lazy: Atlas) -> None:
    with pytest.raises(UnknownLatentError, match="not in width"):
        lazy.latent(256, 256)
    with pytest.raises(UnknownLatentError, match="width 100"):
        lazy.examples(100, 0)


def _queries() -> list[tuple[str, dict]]:
    words = vocabulary()
    rng = np.random.default_rng(3)
    qs = [words[i] for i in rng.integers(len(words), size=25)] + [words[i][:3] for i in rng.integers(len(words), size=10)]
    qs += [f"{words[i]} {words[j]}" for i, j in rng.integers(len(words), size=(8, 2))]
    qs += ["einstein", "Albert Einstein physicist", "zyzzogeton", "e", "th", "quantum", "curie", "physic",
           "'; DROP TABLE latents; --", ".*(a+)+$", "\ud800", "xqzvw", "(dead)"]
    filters = [{}, {"widths": [2048]}, {"kind": "novel", "min_density": 1e-3}, {"max_delta_mse": -1e-4},
               {"widths": [256, 512], "kind": "reconstruction"}, {"limit": 500}]
    return [(q, filters[i % len(filters)]) for i, q in enumerate(qs)] + [(q, {"limit": 5000}) for q in ("e", "a")]


def test_text_search_is_equal(indexes: tuple[SearchIndex, SearchIndex]) -> None:
    mem, stored = indexes
    assert stored.vocabulary_size() == mem.vocabulary_size()
    n_hits = 0
    for q, kw in _queries():
        want, got = mem.text(q, **kw), stored.text(q, **kw)
        pd.testing.assert_frame_equal(got, want, obj=f"text({q!r}, {kw})")
        n_hits += len(want)
    assert n_hits > 1000
    assert set(mem.text("zyzzogeton")["match"]) == {"example"}


def test_meta_and_decomposability_search_are_equal(eager: Atlas, indexes: tuple[SearchIndex, SearchIndex]) -> None:
    mem, stored = indexes
    rng = np.random.default_rng(4)
    for j in range(30):
        w = int(rng.choice(eager.widths))
        dec = eager.decomposition(w, int(rng.integers(w)))
        n = 1 + j % 3
        req = {int(m): float(x) * 0.5 for m, x in zip(dec["meta_latent"][:n], dec["weight"][:n], strict=True)}
        pd.testing.assert_frame_equal(stored.by_meta(req), mem.by_meta(req))
        pd.testing.assert_frame_equal(stored.by_meta(list(req), min_weight=0.05, widths=[512, 1024]),
                                      mem.by_meta(list(req), min_weight=0.05, widths=[512, 1024]))
    for order in ("composite", "atomic"):
        pd.testing.assert_frame_equal(stored.by_decomposability(order, max_fvu=0.5, limit=100),
                                      mem.by_decomposability(order, max_fvu=0.5, limit=100))
    assert stored.has_decomposability() == mem.has_decomposability()


def test_the_stored_index_is_reused_and_rebuilt_when_the_atlas_changes(
        lazy: Atlas, indexes: tuple[SearchIndex, SearchIndex], monkeypatch: pytest.MonkeyPatch) -> None:
    folder = cache_dirs(lazy)[0]
    assert (folder / "index.json").is_file() and folder.parent.name == ".cache"  # hidden: not part of the atlas
    assert atlas_module.verify(lazy.path) == []

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("rebuilt although a matching index is stored")

    monkeypatch.setattr(search_module, "_build", boom)
    again = SearchIndex(lazy)
    assert isinstance(again._ex.indices, np.ndarray) and not again._ex.indices.flags.writeable  # memory-mapped
    pd.testing.assert_frame_equal(again.text("einstein"), indexes[0].text("einstein"))
    monkeypatch.undo()
    # another example window is another index, built and stored beside the first
    key = json.loads((folder / "index.json").read_text())["key"]
    assert key["window"] == list(search_module.EXAMPLE_WINDOW)
    other = SearchIndex(lazy, example_window=(1, 0))
    mem_other = SearchIndex(Atlas.open(lazy.path, lazy=False), example_window=(1, 0))
    pd.testing.assert_frame_equal(other.text("zyzzogeton"), mem_other.text("zyzzogeton"))
    assert build_cache(lazy) == folder and cache_dirs(lazy, (1, 0))[0] != folder
    # a changed atlas (another sha256 in its manifest) does not match the stored index: it is rebuilt
    changed = Atlas.open(lazy.path, lazy=True)
    changed.manifest = changed.manifest.model_copy(
            update={"files": {**changed.manifest.files, "examples.parquet": "0" * 64}})
    assert search_module._load(folder, search_module._cache_key(changed, search_module.EXAMPLE_WINDOW)) is None


def test_a_read_only_atlas_folder_stores_the_index_in_the_user_cache(
        path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    atlas = Atlas.open(path, lazy=True)
    real_save = search_module._save

    def save(folder: Path, *a: object) -> None:
        if folder.is_relative_to(path):
            raise PermissionError(f"{folder}: read-only")
        real_save(folder, *a)

    monkeypatch.setattr(search_module, "_save", save)
    monkeypatch.setattr(search_module, "cache_dirs", lambda a, w=search_module.EXAMPLE_WINDOW: [
        path / ".cache" / "search-ro", tmp_path / "xdg" / "metasae" / "search" / "k"])
    index = SearchIndex(atlas)
    assert (tmp_path / "xdg" / "metasae" / "search" / "k" / "index.json").is_file()
    assert not index.text("einstein").empty


def test_write_table_parts_gives_write_table_and_checks_order(tmp_path: Path) -> None:
    ex = pq.read_table(make_synthetic_atlas(tmp_path / "a", with_weights=False) / "examples.parquet")
    write_table(tmp_path / "whole", "examples", ex)
    parts = [ex.slice(0, 700), ex.slice(700, 10), ex.slice(710, 0), ex.slice(710)]
    write_table_parts(tmp_path / "parts", "examples", iter(parts))
    assert pq.read_table(tmp_path / "parts" / "examples.parquet").equals(
        pq.read_table(tmp_path / "whole" / "examples.parquet"))
    with pytest.raises(AtlasError, match="does not follow"):
        write_table_parts(tmp_path / "bad", "examples", iter([ex.slice(700), ex.slice(0, 700)]))
    assert not (tmp_path / "bad" / "examples.parquet").exists()
    write_table_parts(tmp_path / "empty", "examples", iter([]))
    assert pq.read_table(tmp_path / "empty" / "examples.parquet").num_rows == 0


def test_examples_written_in_parts_are_those_of_one_draw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = make_synthetic_atlas(tmp_path / "whole", seed=2, with_weights=False)
    monkeypatch.setattr(synthetic_module, "CHUNK_LATENTS", 37)  # parts end mid-width and mid row group
    parts = make_synthetic_atlas(tmp_path / "parts", seed=2, with_weights=False, progress=True)
    for name in SCHEMAS:
        a, b = pq.read_table(whole / f"{name}.parquet"), pq.read_table(parts / f"{name}.parquet")
        assert a.equals(b), name
    assert isinstance(pa.__version__, str)
