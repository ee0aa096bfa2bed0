"""Writing an atlas: every file atomically (temp file, fsync, rename), tables cast and sorted by the schema,
the manifest last with the sha256 of every other file."""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from metasae.atlas import schema
from metasae.atlas.errors import AtlasError
from metasae.atlas.manifest import Manifest, to_json_text
from metasae.atlas.schema import FORMAT_VERSION, KEYS, MANIFEST, SCHEMAS, conform


def _temp_path(final: Path) -> Path:
    # Same folder (so os.replace is atomic), dot-prefixed (so manifests and verify never count it).
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(final: Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(temp_path)``, fsync, then rename over ``final`` so readers never see half a file."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(final)
    try:
        write(tmp)
        _fsync_path(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # Make the rename itself durable; some filesystems refuse fsync on a folder (the data is synced anyway).
    with contextlib.suppress(OSError):
        _fsync_path(final.parent, directory=True)
    return final


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (temp file, fsync, rename); NaN/inf become null."""
    text = to_json_text(obj)
    return atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _key_arrays(table: pa.Table, keys: Iterable[str]) -> list[np.ndarray]:
    return [table.column(k).to_numpy() for k in keys]


def _sort_unique(table: pa.Table, name: str) -> pa.Table:
    """Sort by the table's keys (skipped when already sorted) and reject duplicate keys."""
    keys = KEYS[name]
    arrays = _key_arrays(table, keys)
    if table.num_rows < 2:
        return table
    order = np.lexsort(arrays[::-1])
    if not np.array_equal(order, np.arange(len(order))):
        table = table.take(pa.array(order))
        arrays = [a[order] for a in arrays]
    same = np.ones(len(order) - 1, dtype=bool)
    for a in arrays:
        same &= a[1:] == a[:-1]
    if same.any():
        i = int(np.flatnonzero(same)[0])
        key = ", ".join(f"{k}={int(a[i])}" for k, a in zip(keys, arrays, strict=True))
        raise AtlasError(f"{name}.parquet: duplicate key ({key}); keys {keys} must be unique")
    return table


def write_table(atlas_dir: str | os.PathLike, name: str, table: pa.Table | pd.DataFrame) -> Path:
    """Cast ``table`` to ``SCHEMAS[name]``, sort by ``KEYS[name]`` and write ``<name>.parquet`` atomically."""
    table = _sort_unique(conform(table, name), name)
    final = Path(atlas_dir) / f"{name}.parquet"

    def write(tmp: Path) -> None:
        # read at call time, so a test can shrink the row groups
        pq.write_table(table, tmp, compression="zstd", row_group_size=schema.ROW_GROUP_SIZE)

    return atomic_write(final, write)


def write_table_parts(atlas_dir: str | os.PathLike, name: str, parts: Iterable[pa.Table | pd.DataFrame]) -> Path:
    """``write_table`` for a table too large to hold at once: ``parts`` come in key order (each is sorted, and
    its first key must follow the previous part's last), each is written as it comes, atomically as a whole.
    Parts of a whole number of ``ROW_GROUP_SIZE`` rows give the row groups ``write_table`` would."""
    final = Path(atlas_dir) / f"{name}.parquet"

    def write(tmp: Path) -> None:
        writer, last = None, None
        try:
            for part in parts:
                part = _sort_unique(conform(part, name), name)
                if part.num_rows == 0:
                    continue
                keys = [tuple(int(a[0]) for a in _key_arrays(part.slice(i, 1), KEYS[name]))
                        for i in (0, part.num_rows - 1)]
                if last is not None and keys[0] <= last:
                    raise AtlasError(f"{name}.parquet: part starting at key {keys[0]} does not follow key {last}")
                last = keys[1]
                if writer is None:
                    writer = pq.ParquetWriter(tmp, part.schema, compression="zstd")
                writer.write_table(part, row_group_size=schema.ROW_GROUP_SIZE)
        finally:
            if writer is not None:
                writer.close()
        if writer is None:  # no rows at all: an empty table of the schema
            pq.write_table(conform(SCHEMAS[name].empty_table(), name), tmp, compression="zstd")

    return atomic_write(final, write)


def is_hidden(rel: PurePosixPath) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def atlas_files(atlas_dir: str | os.PathLike) -> list[str]:
    """Relative posix paths of the files that make up the atlas (all but the manifest, README.md, hidden names)."""
    root = Path(atlas_dir)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            rel = PurePosixPath(Path(dirpath, fn).relative_to(root).as_posix())
            # a top-level README.md is the folder's (or hub dataset card's) documentation, not atlas content
            if not is_hidden(rel) and rel.as_posix() not in (MANIFEST, "README.md"):
                out.append(rel.as_posix())
    return sorted(out)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(atlas_dir: str | os.PathLike, manifest: Manifest | Mapping[str, Any]) -> Path:
    """Validate ``manifest`` (a dict becomes a Manifest; AtlasError names bad fields), set ``format_version``
    and ``files`` (sha256 of every atlas file), then write manifest.json last."""
    root = Path(atlas_dir)
    m = Manifest.coerce(manifest, source=str(root / MANIFEST))
    files = {rel: sha256_file(root / rel) for rel in atlas_files(root)}
    m = m.model_copy(update={"format_version": FORMAT_VERSION, "files": files})
    out = m.to_dict()
    out = {"format_version": out.pop("format_version"), **out}
    out["files"] = out.pop("files")  # last, as before: the long list after the facts
    return write_json_atomic(root / MANIFEST, out)
