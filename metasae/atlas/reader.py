"""``Atlas``: an opened atlas folder, indexed for the dashboard's lookups.

``Atlas.open`` reads every table once into Arrow memory (except the examples' per-token ``acts``, decoded one
row group at a time on demand and kept in a small LRU) and builds sorted-key offset arrays, so one dashboard
latent page is a handful of binary searches and slices (no scan per lookup). Above ``LAZY_ABOVE`` latents (or
with ``lazy=True``) it reads lazily instead: only the key, label, family and decomposition columns at open;
latent rows, examples, whole widths and stitching curves come from Parquet row groups on demand (projected
columns, row-group statistics for the curves, a small LRU of decoded groups), with the same answers
(tests/unit/test_lazy_atlas.py). That is how a million-latent atlas stays within the dashboard's goals
(docs/benchmarks.md). Opened objects are read-only and safe to share between threads (e.g. through
``st.cache_resource``). Measured on the paper-scale synthetic atlas (195,840 latents, 2304 meta-latents, 4
meta-latents and 10 examples x 32 tokens per latent; ``python -m benchmarks.app``, 2 CPU cores shared with other
jobs): ~0.9 GB resident after ``Atlas.open`` plus ``SearchIndex`` (target <= 2 GB), cold start ~3-5 s including
sha256 verification (target <= 10 s), latent page p95 < 10 ms.

An optional table (``schema.TABLES``) may be absent: ``has_table`` says so, its readers answer empty, and
``missing_table_message`` tells the user which build stage writes it.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import operator
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from metasae.atlas import checks
from metasae.atlas.errors import AtlasError, UnknownLatentError
from metasae.atlas.manifest import Manifest, load_manifest, read_manifest
from metasae.atlas.schema import KEYS, MANIFEST, SCHEMAS, TABLES, missing_table_message, same_type

_MAX_LISTED_PROBLEMS = 8

_READ_DICTIONARY = {"examples": ["tokens.list.element"]}  # token lists read dictionary-encoded: ~1/3 the memory
# Read on demand, one row group at a time (see Atlas.examples): per-token activations are only needed to draw
# one latent's examples, and decoding all of them is about half of a paper-scale cold start.
LAZY_COLUMNS = {"examples": ("acts",)}
_ACTS_CACHE_GROUPS = 32  # row groups of examples kept decoded (~1 MB of acts each at 32 tokens, ~3 MB lazily)
_LATENT_CACHE_GROUPS = 16  # row groups of latents kept decoded when lazy (~4 MB each)
# Above this many latents Atlas.open reads lazily (a paper-scale ladder, 195,840 latents, is held in memory: ~0.9 GB
# with its search index; a million-latent one would need ~5 GB).
LAZY_ABOVE = 1 << 18


def _read_table(root: Path, name: str) -> pa.Table:
    """A whole table but its ``LAZY_COLUMNS``, checked against ``SCHEMAS`` (absent nullable columns as nulls)."""
    lazy = LAZY_COLUMNS.get(name, ())
    names = _file_columns(root, name)
    wanted = names + [f.name for f in SCHEMAS[name] if f.name not in names]
    table = _read_columns(root, name, [c for c in wanted if c not in lazy], names)
    for field in SCHEMAS[name]:
        if field.name in lazy and field.name not in names:
            raise AtlasError(f"{root / name}.parquet: required column {field.name!r} is missing")
    return table


def _file_columns(root: Path, name: str) -> list[str]:
    try:
        return pq.ParquetFile(root / f"{name}.parquet").schema_arrow.names
    except Exception as e:  # corrupt footers surface as ArrowInvalid/OSError/ArrowException
        raise AtlasError(f"{root / name}.parquet: cannot be read ({type(e).__name__}: {e})") from e


def _read_columns(root: Path, name: str, columns: list[str], names: list[str] | None = None) -> pa.Table:
    """Some columns of a table, checked like ``_read_table``; a schema column absent from the file is read as
    nulls where it is nullable. Column order: the file's, then absent schema columns in schema order."""
    fname = f"{name}.parquet"
    names = _file_columns(root, name) if names is None else names
    try:
        table = pq.read_table(root / fname, columns=[c for c in names if c in columns], memory_map=True,
                              read_dictionary=_READ_DICTIONARY.get(name))
    except Exception as e:  # corrupt pages surface as ArrowInvalid/OSError/ArrowException
        raise AtlasError(f"{root / fname}: cannot be read ({type(e).__name__}: {e})") from e
    return _checked(table, name, root, columns)


def _checked(table: pa.Table, name: str, root: Path, columns: Iterable[str]) -> pa.Table:
    """``table`` (read from ``name``) with the schema's ``columns`` checked: absent nullable ones appended as
    nulls, absent required ones and wrong types refused, null keys refused."""
    fname = f"{name}.parquet"
    wanted = set(columns)
    for field in SCHEMAS[name]:
        if field.name not in wanted:
            continue
        if field.name not in table.column_names:
            if not field.nullable:
                raise AtlasError(f"{root / fname}: required column {field.name!r} is missing")
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
        elif not same_type(table.schema.field(field.name).type, field.type):
            raise AtlasError(
                f"{root / fname}: column {field.name!r} has type {table.schema.field(field.name).type}, "
                f"expected {field.type}"
            )
    for key in KEYS[name]:
        if key in wanted and key in table.column_names and table.column(key).null_count:
            raise AtlasError(f"{root / fname}: key column {key!r} holds nulls")
    return table


class _RowGroups:
    """One table's rows read from Parquet on demand, one row group at a time, the decoded groups kept in a small
    LRU. ``columns`` None means every column of the file (plus absent nullable schema columns, as nulls)."""

    def __init__(self, root: Path, name: str, columns: list[str] | None, cache_groups: int) -> None:
        self.root, self.name = root, name
        self.names = _file_columns(root, name)
        self.columns = self.names + [f.name for f in SCHEMAS[name] if f.name not in self.names] \
            if columns is None else list(columns)
        # the file stays memory-mapped (an atomic rewrite leaves this inode intact)
        self.file = pq.ParquetFile(root / f"{name}.parquet", memory_map=True,
                                   read_dictionary=_READ_DICTIONARY.get(name))
        sizes = [self.file.metadata.row_group(i).num_rows for i in range(self.file.num_row_groups)]
        self.start = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.num_rows = int(self.start[-1])
        self.cache_groups = cache_groups
        self.cache: OrderedDict[int, pa.Table] = OrderedDict()
        self.lock = threading.Lock()  # ParquetFile readers are not thread-safe; Streamlit serves sessions in threads

    def _read(self, groups: list[int], columns: list[str]) -> pa.Table:
        try:
            table = self.file.read_row_groups(groups, columns=[c for c in self.names if c in columns])
        except Exception as e:  # corrupt pages surface as ArrowInvalid/OSError
            raise AtlasError(f"{self.root / self.name}.parquet: row groups {groups[0]}..{groups[-1]} cannot be "
                             f"read ({e})") from e
        return _checked(table, self.name, self.root, columns)

    def group(self, g: int) -> pa.Table:
        with self.lock:
            if g in self.cache:
                self.cache.move_to_end(g)
                return self.cache[g]
            table = self._read([g], self.columns)
            self.cache[g] = table
            if len(self.cache) > self.cache_groups:
                self.cache.popitem(last=False)
            return table

    def _groups(self, start: int, end: int) -> range:
        first = max(int(np.searchsorted(self.start, start, "right")) - 1, 0)
        last = int(np.searchsorted(self.start, end, "left"))
        return range(first, max(last, first + 1) if end > start else first)

    def rows(self, start: int, end: int) -> pa.Table:
        """Rows [start, end) through the cache (a page's few rows)."""
        parts = []
        for g in self._groups(start, end):
            g0 = int(self.start[g])
            t = self.group(g)
            lo, hi = max(start, g0) - g0, min(end, int(self.start[g + 1])) - g0
            parts.append(t.slice(lo, hi - lo))
        return pa.concat_tables(parts) if parts else self._empty(self.columns)

    def read(self, start: int, end: int, columns: list[str] | None = None) -> pa.Table:
        """Rows [start, end) of ``columns`` read past the cache (a whole width's worth)."""
        columns = self.columns if columns is None else columns
        groups = list(self._groups(start, end))
        if not groups:
            return self._empty(columns)
        with self.lock:
            t = self._read(groups, columns)
        return t.slice(start - int(self.start[groups[0]]), end - start)

    def _empty(self, columns: list[str]) -> pa.Table:
        schema = self.file.schema_arrow
        table = pa.schema([schema.field(c) for c in self.names if c in columns]).empty_table()
        return _checked(table, self.name, self.root, columns)


class _Tables(dict[str, pa.Table]):
    """``Atlas.tables``: tables held in memory; one not held yet is read whole on first access (a lazily opened
    atlas holds only the small ones). An optional table the atlas lacks raises AtlasError saying what writes it."""

    def __init__(self, root: Path, tables: dict[str, pa.Table]) -> None:
        super().__init__(tables)
        self._root = root
        self._lock = threading.Lock()

    def __missing__(self, name: str) -> pa.Table:
        if name not in SCHEMAS:
            raise KeyError(name)
        if not (self._root / TABLES[name].file).is_file() and not TABLES[name].required:
            raise AtlasError(f"{self._root / TABLES[name].file}: {missing_table_message(name)}")
        with self._lock:
            if not dict.__contains__(self, name):
                self[name] = _read_table(self._root, name)
            return dict.__getitem__(self, name)


def _np(col: pa.ChunkedArray | pa.Array, fill: Any = None, dtype: Any = None) -> np.ndarray:
    """Column as numpy; nulls become ``fill`` (NaN for floats by default)."""
    if fill is not None and col.null_count:
        col = pc.fill_null(col, fill)
    arr = col.to_numpy() if isinstance(col, pa.ChunkedArray) else col.to_numpy(zero_copy_only=False)
    return arr.astype(dtype, copy=False) if dtype is not None else arr


def _latent_key(width: np.ndarray, latent: np.ndarray) -> np.ndarray:
    # One sortable int64 per (width, latent): both are non-negative int32, so the order matches (width, latent).
    return (width.astype(np.int64) << 32) | latent.astype(np.int64)


def rows_of(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Position of each key in ``sorted_keys``, -1 where absent."""
    if len(sorted_keys) == 0:
        return np.full(len(keys), -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return np.where(sorted_keys[pos] == keys, pos, -1)


def _check_sorted(keys: np.ndarray, path: Path) -> None:
    # The offset indexes rely on key order; a table written by another tool might not keep it.
    if len(keys) > 1 and np.any(keys[1:] < keys[:-1]):
        raise AtlasError(f"{path}: rows are not sorted by (sae_width, latent); rewrite it with write_table")


def release_memory() -> None:
    """Hand freed temporaries back to the OS after a one-off load/index build (long-lived app processes)."""
    pa.default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):  # glibc only; elsewhere the allocator keeps it
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _as_index(x: Any, what: str) -> int:
    try:
        i = operator.index(x)
    except TypeError:
        raise UnknownLatentError(f"{what} must be an integer, got {x!r}") from None
    return i


def _gather_ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, e) over all ranges, without a python loop."""
    lens = (ends - starts).astype(np.int64)
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    shift = np.repeat(starts.astype(np.int64) - np.cumsum(lens) + lens, lens)
    return shift + np.arange(total, dtype=np.int64)


class Atlas:
    """An opened atlas: tables in memory (or read lazily) plus sorted-key indexes; build with ``Atlas.open``.

    ``tables["examples"]`` holds every column but ``acts``; ``examples()`` / ``example_acts()`` add them.
    """

    def __init__(self, path: Path, manifest: Manifest, tables: dict[str, pa.Table],
                 lazy: bool = False) -> None:
        self.path = path
        self.manifest = manifest
        self.lazy = lazy
        self.tables = _Tables(path, tables)
        self._pairs: list[tuple[int, int]] | None = None
        self._index()

    def __repr__(self) -> str:
        return f"Atlas({str(self.path)!r}, model={self.model_name!r}, widths={self._widths})"

    # -- construction

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True, expect_model: str | None = None,
             lazy: bool | None = None) -> Atlas:
        """Open an atlas folder; raises AtlasError naming the problems (or a model other than ``expect_model``).

        ``lazy`` (default: when the atlas has more than ``LAZY_ABOVE`` latents) reads only the columns the
        indexes need at open, and latent rows, examples and whole widths from Parquet row groups on demand;
        ``tables`` then holds only the meta-latents, and reads any other table whole when asked for it. Both
        ways give the same answers."""
        root = Path(path)
        problems = checks.verify(root) if verify else read_manifest(root)[1] or checks.links_outside(root)
        if problems:
            shown = "\n  ".join(problems[:_MAX_LISTED_PROBLEMS])
            more = len(problems) - _MAX_LISTED_PROBLEMS
            tail = f"\n  ... and {more} more" if more > 0 else ""
            raise AtlasError(f"{root}: not a usable atlas ({len(problems)} problems):\n  {shown}{tail}")
        manifest = load_manifest(root)
        if expect_model is not None:
            model = manifest.model.name
            if model != expect_model:
                raise AtlasError(f"{root / MANIFEST}: atlas is for model {model!r}, expected {expect_model!r}")
        if lazy is None:
            try:
                n = pq.ParquetFile(root / "latents.parquet").metadata.num_rows
            except Exception as e:  # a corrupt footer: the same message a full read would give
                raise AtlasError(f"{root / 'latents.parquet'}: cannot be read ({type(e).__name__}: {e})") from e
            lazy = n > LAZY_ABOVE
        names = ("meta_latents",) if lazy else tuple(n for n, t in TABLES.items()
                                                     if t.required or (root / t.file).is_file())
        atlas = cls(root, manifest, {name: _read_table(root, name) for name in names}, lazy=lazy)
        release_memory()
        return atlas

    def has_table(self, name: str) -> bool:
        """Whether the atlas holds table ``name`` (an optional one may be absent: ``missing_table_message``)."""
        if name not in TABLES:
            raise KeyError(f"unknown atlas table {name!r} (known: {', '.join(TABLES)})")
        return dict.__contains__(self.tables, name) or (self.path / TABLES[name].file).is_file()

    def missing_table_message(self, name: str) -> str:
        """What a page shows instead of an absent optional table: the build stage that writes it."""
        return missing_table_message(name, self.manifest.build.command)

    def _columns(self, name: str, columns: list[str]) -> pa.Table:
        """Columns of a whole table: from memory when it is held, else a projected read of its file."""
        if dict.__contains__(self.tables, name):
            t = self.tables[name]
            return _checked(t, name, self.path, columns).select(columns)
        return _read_columns(self.path, name, columns).select(columns)

    def columns(self, name: str = "latents") -> list[str]:
        """Column names of a table (held or on disk), absent nullable schema columns included."""
        if dict.__contains__(self.tables, name):
            return list(self.tables[name].column_names)
        names = _file_columns(self.path, name)
        return names + [f.name for f in SCHEMAS[name] if f.name not in names]

    def _index(self) -> None:
        lat = self._columns("latents", ["sae_width", "latent", "label", "nearest_smaller", "nearest_smaller_cos",
                                        "group_id"])
        dec = self._columns("decompositions", ["sae_width", "latent", "meta_latent", "weight", "rank"])
        meta = self.tables["meta_latents"]
        fname = self.path / "latents.parquet"
        self._lat_width = _np(lat["sae_width"], dtype=np.int32)
        self._lat_latent = _np(lat["latent"], dtype=np.int32)
        if lat.num_rows and (self._lat_width.min() <= 0 or self._lat_latent.min() < 0):
            raise AtlasError(f"{fname}: sae_width must be > 0 and latent >= 0")
        self._lat_key = _latent_key(self._lat_width, self._lat_latent)
        if np.any(np.diff(self._lat_key) <= 0):
            raise AtlasError(f"{fname}: rows are not sorted by unique (sae_width, latent)")
        self._widths = [int(w) for w in np.unique(self._lat_width)]
        self._wrange = {
            w: (int(np.searchsorted(self._lat_width, w, "left")), int(np.searchsorted(self._lat_width, w, "right")))
            for w in self._widths
        }
        # one Arrow string array: members / search results gather a few labels (``labels_at``)
        self._labels = lat["label"].combine_chunks() if lat.num_rows else pa.array([], pa.string())
        if self.lazy:
            self._lat_rows = _RowGroups(self.path, "latents", None, _LATENT_CACHE_GROUPS)
            if self._lat_rows.num_rows != lat.num_rows:
                raise AtlasError(f"{fname}: changed while being opened")

        # decompositions: per latent row the [start, end) of its rows; per row its latent row.
        dkey = _latent_key(_np(dec["sae_width"]), _np(dec["latent"]))
        _check_sorted(dkey, self.path / "decompositions.parquet")
        self._dec_start = np.searchsorted(dkey, self._lat_key, "left")
        self._dec_end = np.searchsorted(dkey, self._lat_key, "right")
        self._dec_meta = _np(dec["meta_latent"], dtype=np.int32)
        self._dec_weight = _np(dec["weight"], dtype=np.float32)
        self._dec_rank = _np(dec["rank"], dtype=np.int8)
        self._dec_latrow = rows_of(self._lat_key, dkey)
        del dec, dkey
        # inverted index meta_latent -> decomposition rows, latent-row order within each meta-latent
        self._inv = np.argsort(self._dec_meta, kind="stable")
        self._inv_meta = self._dec_meta[self._inv]

        ex = self._columns("examples", ["sae_width", "latent"])
        ekey = _latent_key(_np(ex["sae_width"]), _np(ex["latent"]))
        _check_sorted(ekey, self.path / "examples.parquet")
        self._ex_start = np.searchsorted(ekey, self._lat_key, "left")
        self._ex_end = np.searchsorted(ekey, self._lat_key, "right")
        # in memory: every column but acts is held, acts come by row group; lazily: every column by row group
        self._ex_rows = _RowGroups(self.path, "examples", None if self.lazy else ["acts"], _ACTS_CACHE_GROUPS)
        self._acts_cache = self._ex_rows.cache
        if self._ex_rows.num_rows != ex.num_rows:
            raise AtlasError(f"{self.path / 'examples.parquet'}: changed while being opened")
        del ex, ekey
        self._rg_start = self._ex_rows.start

        self._meta_ids = _np(meta["meta_latent"], dtype=np.int64)
        if np.any(np.diff(self._meta_ids) <= 0):
            raise AtlasError(f"{self.path / 'meta_latents.parquet'}: rows are not sorted by unique meta_latent")
        self._meta_label = _np(meta["label"])

        self._near_small = _np(lat["nearest_smaller"], fill=-1, dtype=np.int64)
        self._near_small_cos = _np(pc.cast(lat["nearest_smaller_cos"], pa.float64()), dtype=np.float64)
        self._group = _np(lat["group_id"], fill=-1, dtype=np.int64)

    def labels_at(self, rows: np.ndarray) -> np.ndarray:
        """Labels of latents-table rows, as an object array of str (None where null)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.zeros(0, dtype=object)
        return self._labels.take(pa.array(rows)).to_numpy(zero_copy_only=False)

    # -- scalar lookups

    @property
    def widths(self) -> list[int]:
        """SAE widths present in the latents table, ascending."""
        return list(self._widths)

    @property
    def model_name(self) -> str:
        return self.manifest.model.name

    def n_latents(self, width: int) -> int:
        """Number of latents of one width."""
        s, e = self._width_range(width)
        return e - s

    @property
    def n_meta_latents(self) -> int:
        return len(self._meta_ids)

    def _width_range(self, width: Any) -> tuple[int, int]:
        w = _as_index(width, "width")
        if w not in self._wrange:
            raise UnknownLatentError(f"width {width!r} is not in this atlas (widths: {self._widths})")
        return self._wrange[w]

    def _row(self, width: Any, latent: Any) -> int:
        s, e = self._width_range(width)
        i = _as_index(latent, "latent")
        if 0 <= i < 2**31:
            key = (int(width) << 32) | i
            r = int(np.searchsorted(self._lat_key[s:e], key)) + s
            if r < e and self._lat_key[r] == key:
                return r
        raise UnknownLatentError(f"latent {latent!r} is not in width {width} (it has {e - s} latents)")

    def _meta_row(self, m: Any) -> int:
        i = _as_index(m, "meta-latent")
        r = int(np.searchsorted(self._meta_ids, i))
        if r < len(self._meta_ids) and self._meta_ids[r] == i:
            return r
        raise UnknownLatentError(f"meta-latent {m!r} is not in this atlas ({len(self._meta_ids)} meta-latents)")

    def _meta_labels(self, ids: np.ndarray) -> np.ndarray:
        if len(self._meta_ids) == 0:
            return np.full(len(ids), None, dtype=object)
        pos = np.minimum(np.searchsorted(self._meta_ids, ids), len(self._meta_ids) - 1)
        return np.where(self._meta_ids[pos] == ids, self._meta_label[pos], np.array(None, dtype=object))

    def latent(self, width: int, latent: int) -> dict[str, Any]:
        """One row of the latents table as a dict; UnknownLatentError for an unknown width or latent."""
        r = self._row(width, latent)
        if self.lazy:
            return self._lat_rows.rows(r, r + 1).to_pylist()[0]
        return self.tables["latents"].slice(r, 1).to_pylist()[0]

    def decomposition(self, width: int, latent: int) -> pd.DataFrame:
        """Meta-latents of one latent: DataFrame[meta_latent, weight, rank, label], by weight descending."""
        r = self._row(width, latent)
        s, e = self._dec_start[r], self._dec_end[r]
        w = self._dec_weight[s:e]
        order = np.argsort(-w, kind="stable")
        meta = self._dec_meta[s:e][order]
        return pd.DataFrame({
            "meta_latent": meta, "weight": w[order], "rank": self._dec_rank[s:e][order],
            "label": self._meta_labels(meta.astype(np.int64)),
        })

    def examples(self, width: int, latent: int) -> list[dict[str, Any]]:
        """Top activating examples of one latent, by rank: dicts with tokens, acts, position, activation."""
        r = self._row(width, latent)
        s, e = int(self._ex_start[r]), int(self._ex_end[r])
        if self.lazy:
            rows = self._ex_rows.rows(s, e).to_pylist()
            for row in rows:
                row["acts"] = row.pop("acts")  # last, as the in-memory way adds it
            return rows
        rows = self.tables["examples"].slice(s, e - s).to_pylist()
        for row, acts in zip(rows, self.example_acts(s, e), strict=True):
            row["acts"] = acts
        return rows

    def example_acts(self, start: int, end: int) -> list[list[float]]:
        """Per-token activations of examples-table rows [start, end), decoded one row group at a time."""
        return self._ex_rows.rows(start, end).column("acts").to_pylist()

    def meta_latent(self, m: int) -> dict[str, Any]:
        """One row of the meta_latents table as a dict."""
        return self.tables["meta_latents"].slice(self._meta_row(m), 1).to_pylist()[0]

    def meta_postings(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """(latent rows, weights) of the latents whose decomposition holds ``m``, latent rows ascending."""
        self._meta_row(m)
        s, e = np.searchsorted(self._inv_meta, m, "left"), np.searchsorted(self._inv_meta, m, "right")
        rows = self._inv[s:e]
        return self._dec_latrow[rows], self._dec_weight[rows]

    def members(self, m: int, width: int | None = None) -> pd.DataFrame:
        """Latents decomposed onto meta-latent ``m``: DataFrame[sae_width, latent, weight, label], weight desc."""
        latrows, weights = self.meta_postings(m)
        keep = latrows >= 0
        if width is not None:
            s, e = self._width_range(width)
            keep &= (latrows >= s) & (latrows < e)
        latrows, weights = latrows[keep], weights[keep]
        order = np.argsort(-weights, kind="stable")
        latrows, weights = latrows[order], weights[order]
        return pd.DataFrame({
            "sae_width": self._lat_width[latrows], "latent": self._lat_latent[latrows],
            "weight": weights, "label": self.labels_at(latrows),
        })

    def cooccurring_meta(self, m: int, top: int = 10) -> pd.DataFrame:
        """Meta-latents that most often share a latent with ``m``: DataFrame[meta_latent, count, fraction, label]."""
        latrows, _ = self.meta_postings(m)
        latrows = latrows[latrows >= 0]
        rows = _gather_ranges(self._dec_start[latrows], self._dec_end[latrows])
        others = self._dec_meta[rows]
        others = others[others != m]
        ids, counts = np.unique(others, return_counts=True)
        order = np.lexsort((ids, -counts))[: max(int(top), 0)]
        ids, counts = ids[order], counts[order]
        return pd.DataFrame({
            "meta_latent": ids, "count": counts,
            "fraction": counts / max(len(latrows), 1), "label": self._meta_labels(ids.astype(np.int64)),
        })

    def _neighbour(self, width: int | None, latent: int, cos: float) -> dict[str, Any] | None:
        if width is None or latent < 0:
            return None
        try:
            label = self.labels_at(np.array([self._row(width, latent)]))[0]
        except UnknownLatentError:
            label = None
        return {"sae_width": width, "latent": latent, "cos": None if math.isnan(cos) else cos, "label": label}

    def family(self, width: int, latent: int, max_children: int = 20) -> dict[str, Any]:
        """Nearest latents in the next smaller / larger width, children pointing here, and the swap group."""
        r = self._row(width, latent)
        row = self.latent(width, latent)
        k = self._widths.index(int(width))
        smaller = self._widths[k - 1] if k > 0 else None
        larger = self._widths[k + 1] if k + 1 < len(self._widths) else None

        def num(x: Any, default: Any) -> Any:
            return default if x is None else x

        children: list[dict[str, Any]] = []
        if larger is not None:
            s, e = self._wrange[larger]
            idx = np.flatnonzero(self._near_small[s:e] == int(latent)) + s
            idx = idx[np.argsort(-np.nan_to_num(self._near_small_cos[idx], nan=-2.0), kind="stable")]
            idx = idx[:max_children]
            children = [
                {"latent": int(self._lat_latent[i]), "cos": float(self._near_small_cos[i]), "label": label}
                for i, label in zip(idx, self.labels_at(idx), strict=True)
            ]
        group: list[int] = []
        if self._group[r] >= 0:
            s, e = self._wrange[int(width)]
            group = [int(x) for x in self._lat_latent[s:e][self._group[s:e] == self._group[r]]]
        return {
            "sae_width": int(width), "latent": int(latent), "label": row["label"], "kind": row["kind"],
            "group_id": row["group_id"],
            "smaller": self._neighbour(smaller, num(row["nearest_smaller"], -1), num(row["nearest_smaller_cos"], math.nan)),
            "larger": self._neighbour(larger, num(row["nearest_larger"], -1), num(row["nearest_larger_cos"], math.nan)),
            "children": children, "group": group,
        }

    # -- tables

    def latents_table(self, width: int, columns: list[str] | None = None) -> pd.DataFrame:
        """All latents of one width as a DataFrame (optionally only ``columns``)."""
        s, e = self._width_range(width)
        if self.lazy:
            return self._lat_rows.read(s, e, list(columns) if columns else None).to_pandas()
        t = self.tables["latents"].slice(s, e - s)
        return (t.select(columns) if columns else t).to_pandas()

    def meta_latents_table(self, columns: list[str] | None = None) -> pd.DataFrame:
        """The meta_latents table as a DataFrame."""
        t = self.tables["meta_latents"]
        return (t.select(columns) if columns else t).to_pandas()

    def stitching_curve(self, small: int, large: int) -> pd.DataFrame:
        """Interpolation curve of one (small, large) pair by step; empty if the pair was not measured (or the
        atlas has no stitching table)."""
        if not self.has_table("stitching"):
            return SCHEMAS["stitching"].empty_table().to_pandas()
        if self.lazy:  # the table is sorted by (small, large, step): row-group statistics skip the other pairs
            try:
                t = pq.read_table(self.path / "stitching.parquet", memory_map=True,
                                  filters=[("small_width", "=", int(small)), ("large_width", "=", int(large))])
            except Exception as e:
                raise AtlasError(f"{self.path / 'stitching.parquet'}: cannot be read ({e})") from e
            return _checked(t, "stitching", self.path, SCHEMAS["stitching"].names).to_pandas()
        t = self.tables["stitching"]
        mask = pc.and_(pc.equal(t["small_width"], int(small)), pc.equal(t["large_width"], int(large)))
        return t.filter(mask).to_pandas()

    def training_curves(self) -> pd.DataFrame:
        """Training-batch FVU against training tokens per rung (sae_width, tokens, fvu); empty when the atlas
        has no training_curves table (``missing_table_message("training_curves")`` says how to add it)."""
        if not self.has_table("training_curves"):
            return SCHEMAS["training_curves"].empty_table().to_pandas()
        return self._columns("training_curves", SCHEMAS["training_curves"].names).to_pandas()

    def stitching_pairs(self) -> list[tuple[int, int]]:
        """(small, large) pairs that have a stitching curve (none when the atlas has no stitching table)."""
        if not self.has_table("stitching"):
            return []
        if self.lazy and self._pairs is not None:
            return list(self._pairs)
        t = self._columns("stitching", ["small_width", "large_width"])
        key: Iterable[int] = np.unique(_latent_key(_np(t["small_width"]), _np(t["large_width"]))) \
            if t.num_rows else []
        pairs = [(int(k >> 32), int(k & 0xFFFFFFFF)) for k in key]
        if self.lazy:  # the file is not held: read its two columns once
            self._pairs = pairs
        return list(pairs)

    # -- SAE weights

    def _weights_or_raise(self) -> None:
        if not self.manifest.weights:
            raise AtlasError(f"{self.path / MANIFEST}: this atlas was built without SAE weights (weights: false)")

    def sae_path(self, width: int) -> Path:
        """Folder of the sae-lens SAE of one width (``SAE.load_from_disk`` reads it)."""
        self._weights_or_raise()
        sae = self.manifest.sae(width)
        if sae is None:
            raise UnknownLatentError(f"width {width!r} has no SAE in {self.path / MANIFEST}")
        return self.path / sae.folder

    def meta_sae_path(self) -> Path:
        """Folder of the meta-SAE (sae-lens format)."""
        self._weights_or_raise()
        return self.path / (self.manifest.meta_sae.path or "meta_sae")
