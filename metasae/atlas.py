"""Read, write and verify an atlas folder (the contract in DESIGN.md, "Atlas format").

An atlas is a folder holding five Parquet tables (``SCHEMAS``), sae-lens SAE folders (``saes/<width>/``,
``meta_sae/``) and ``manifest.json``, written last, that records the sha256 of every other file. Names that
start with a dot (temp files, ``.cache/``, ``.git/``, ``.gitattributes``) are not part of an atlas.

``Atlas.open`` reads every table once into Arrow memory (except the examples' per-token ``acts``, decoded one
row group at a time on demand and kept in a small LRU) and builds sorted-key offset arrays, so one dashboard
latent page is a handful of binary searches and slices (no scan per lookup). Above ``LAZY_ABOVE`` latents (or
with ``lazy=True``) it reads lazily instead: only the key, label, family and decomposition columns at open;
latent rows, examples, whole widths and stitching curves come from Parquet row groups on demand (projected
columns, row-group statistics for the curves, a small LRU of decoded groups), with the same answers
(tests/unit/test_lazy_atlas.py). That is how a million-latent atlas stays within the dashboard's goals
(docs/benchmarks.md). Opened objects are read-only
and safe to share between threads (e.g. through ``st.cache_resource``). Measured on the paper-scale synthetic
atlas (195,840 latents, 2304 meta-latents, 4 meta-latents and 10 examples x 32 tokens per latent;
``python -m benchmarks.app``, 2 CPU cores shared with other jobs): ~0.9 GB resident after ``Atlas.open`` plus
``SearchIndex`` (target <= 2 GB), cold start ~3-5 s including sha256 verification (target <= 10 s), latent
page p95 < 10 ms.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import operator
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ROW_GROUP_SIZE = 8192  # a lookup by key decodes at most one small row group in readers that push filters down
SAE_FILES = ("cfg.json", "sae_weights.safetensors")
_MAX_LISTED_PROBLEMS = 8


DEAD_LABEL = "(dead)"  # the label of a latent that never fired on the statistics tokens

class AtlasError(Exception):
    """An atlas folder, table or manifest is unusable; the message names the file and the problem."""


class UnknownLatentError(KeyError):
    """A width, latent or meta-latent that the atlas does not hold."""

    def __str__(self) -> str:  # KeyError would print the message quoted, as a repr
        return str(self.args[0]) if self.args else ""


def _f(name: str, typ: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, typ, nullable=nullable)


_S, _I8, _I16, _I32, _F32 = pa.string(), pa.int8(), pa.int16(), pa.int32(), pa.float32()
_LS, _LI32, _LF32 = pa.list_(pa.string()), pa.list_(pa.int32()), pa.list_(pa.float32())

# Non-nullable fields must be given to write_table; nullable ones are filled with nulls when absent.
SCHEMAS: dict[str, pa.Schema] = {
    "latents": pa.schema([
        _f("sae_width", _I32), _f("latent", _I32), _f("label", _S), _f("density", _F32),
        _f("mean_act", _F32), _f("max_act", _F32), _f("top_tokens", _LS), _f("top_logits", _LS),
        _f("kind", _S, True), _f("nearest_smaller", _I32, True), _f("nearest_smaller_cos", _F32, True),
        _f("nearest_larger", _I32, True), _f("nearest_larger_cos", _F32, True), _f("group_id", _I32, True),
        _f("delta_mse", _F32, True), _f("delta_ce", _F32, True), _f("delta_ce_attr", _F32, True),
        _f("group_delta_mse", _F32, True), _f("group_delta_ce", _F32, True),
        _f("hist_counts", _LI32, True), _f("hist_edges", _LF32, True),
    ]),
    "decompositions": pa.schema([
        _f("sae_width", _I32), _f("latent", _I32), _f("meta_latent", _I32), _f("weight", _F32), _f("rank", _I8),
    ]),
    "meta_latents": pa.schema([
        _f("meta_latent", _I32), _f("label", _S), _f("n_members", _I32), _f("density", _F32, True),
        _f("top_tokens", _LS, True), _f("top_logits", _LS, True),
        _f("hist_counts", _LI32, True), _f("hist_edges", _LF32, True),
    ]),
    "examples": pa.schema([
        _f("sae_width", _I32), _f("latent", _I32), _f("rank", _I16), _f("activation", _F32),
        _f("tokens", _LS), _f("acts", _LF32), _f("position", _I16),
    ]),
    "stitching": pa.schema([
        _f("small_width", _I32), _f("large_width", _I32), _f("step", _I32), _f("action", _S),
        _f("latent", _I32, True), _f("group", _I32, True), _f("l0", _F32), _f("mse", _F32),
        _f("ce_loss", _F32, True),
    ]),
}
KEYS: dict[str, tuple[str, ...]] = {
    "latents": ("sae_width", "latent"),
    "decompositions": ("sae_width", "latent", "rank"),
    "meta_latents": ("meta_latent",),
    "examples": ("sae_width", "latent", "rank"),
    "stitching": ("small_width", "large_width", "step"),
}
KINDS = ("novel", "reconstruction")
ACTIONS = ("start", "add", "swap", "remove", "bias")


# ----------------------------------------------------------------------------------------------- writing


def _temp_path(final: Path) -> Path:
    # Same folder (so os.replace is atomic), dot-prefixed (so manifests and verify never count it).
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(final: Path, write: Any) -> Path:
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


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return Path(obj).as_posix()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _finite(obj: Any) -> Any:
    # NaN/inf are not JSON; write null so every JSON reader (browsers included) accepts the manifest.
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (temp file, fsync, rename); NaN/inf become null."""
    text = json.dumps(_finite(obj), indent=2, default=_json_default, allow_nan=False) + "\n"
    return _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _base_type(t: pa.DataType) -> pa.DataType:
    """Type with list field names, large variants and dictionary encoding erased, for comparisons."""
    if pa.types.is_dictionary(t):
        return _base_type(t.value_type)
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t):
        return pa.list_(_base_type(t.value_type))
    return t


def same_type(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Whether a column of type ``actual`` satisfies ``expected`` (ignores list field names and encodings)."""
    return _base_type(actual).equals(_base_type(expected))


def conform(table: pa.Table | pd.DataFrame, name: str) -> pa.Table:
    """Cast ``table`` to the schema of table ``name``: required columns first, extras kept after them."""
    fname = f"{name}.parquet"
    if name not in SCHEMAS:
        raise AtlasError(f"{fname}: unknown atlas table {name!r} (known: {', '.join(SCHEMAS)})")
    if isinstance(table, pd.DataFrame):
        try:
            table = pa.Table.from_pandas(table, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
            raise AtlasError(f"{fname}: cannot convert the DataFrame to Arrow: {e}") from e
    if not isinstance(table, pa.Table):
        raise AtlasError(f"{fname}: expected a pyarrow Table or pandas DataFrame, got {type(table).__name__}")
    schema = SCHEMAS[name]
    columns, fields = [], []
    for field in schema:
        if field.name not in table.column_names:
            if not field.nullable:
                raise AtlasError(
                    f"{fname}: required column {field.name!r} is missing (got columns: {table.column_names})"
                )
            col = pa.chunked_array([pa.nulls(table.num_rows, field.type)])
        else:
            col = table.column(field.name)
            if not col.type.equals(field.type):  # also turns large/dictionary/view variants into the schema's
                try:
                    col = col.cast(field.type)  # safe cast: overflow and lossy int casts raise
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
                    raise AtlasError(
                        f"{fname}: column {field.name!r} of type {col.type} cannot be cast to {field.type}: {e}"
                    ) from e
            if not field.nullable and col.null_count:
                raise AtlasError(f"{fname}: column {field.name!r} has {col.null_count} null values; it may not be null")
        columns.append(col)
        fields.append(field)
    for extra in table.column_names:
        if extra not in schema.names:
            columns.append(table.column(extra))
            fields.append(table.schema.field(extra))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


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
        pq.write_table(table, tmp, compression="zstd", row_group_size=ROW_GROUP_SIZE)

    return _atomic_write(final, write)


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
                keys = [tuple(int(a[0]) for a in _key_arrays(part.slice(i, 1), KEYS[name])) for i in (0, part.num_rows - 1)]
                if last is not None and keys[0] <= last:
                    raise AtlasError(f"{name}.parquet: part starting at key {keys[0]} does not follow key {last}")
                last = keys[1]
                if writer is None:
                    writer = pq.ParquetWriter(tmp, part.schema, compression="zstd")
                writer.write_table(part, row_group_size=ROW_GROUP_SIZE)
        finally:
            if writer is not None:
                writer.close()
        if writer is None:  # no rows at all: an empty table of the schema
            pq.write_table(conform(SCHEMAS[name].empty_table(), name), tmp, compression="zstd")

    return _atomic_write(final, write)


def _is_hidden(rel: PurePosixPath) -> bool:
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
            if not _is_hidden(rel) and rel.as_posix() not in (MANIFEST, "README.md"):
                out.append(rel.as_posix())
    return sorted(out)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(atlas_dir: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Fill ``format_version`` and ``files`` (sha256 of every atlas file), then write manifest.json last."""
    root = Path(atlas_dir)
    out = {k: v for k, v in manifest.items() if k not in ("format_version", "files")}
    out = {"format_version": FORMAT_VERSION, **out}
    out["files"] = {rel: sha256_file(root / rel) for rel in atlas_files(root)}
    return write_json_atomic(root / MANIFEST, out)


# ----------------------------------------------------------------------------------------------- verifying


def read_manifest(atlas_dir: str | os.PathLike) -> tuple[dict[str, Any] | None, list[str]]:
    """Parse manifest.json and check its format_version; returns (manifest or None, problems)."""
    root = Path(atlas_dir)
    path = root / MANIFEST
    if not root.is_dir():
        return None, [f"{root}: atlas folder does not exist or is not a folder"]
    if not path.is_file():
        return None, [f"{path}: missing (an atlas is complete only once its manifest is written)"]
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, [f"{path}: invalid JSON ({e})"]
    except ValueError as e:  # NaN / Infinity literals: Python's json reads them, every other reader refuses
        return None, [f"{path}: {e}"]
    if not isinstance(manifest, dict):
        return None, [f"{path}: expected a JSON object, got {type(manifest).__name__}"]
    version = manifest.get("format_version")
    if "format_version" not in manifest:
        return None, [f"{path}: format_version is missing (this metasae reads format_version {FORMAT_VERSION})"]
    if isinstance(version, bool) or version != FORMAT_VERSION:
        return None, [
            f"{path}: format_version {version!r} found, this metasae supports format_version {FORMAT_VERSION}"
        ]
    return manifest, []


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"holds the literal {name}, which JSON does not allow (metasae writes null for a missing "
                     "or non-finite number)")


def _safe_rel(rel: Any) -> PurePosixPath | None:
    # Lexical check only: hub snapshots hold symlinks into a blob store outside the folder, so no resolve().
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        return None
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or p.as_posix() != rel.rstrip("/"):
        return None
    return p


def _check_manifest_fields(m: dict[str, Any]) -> list[str]:
    problems = []
    model = m.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        problems.append(f"{MANIFEST}: model.name is missing (model must be {{name, source, hook, d_model}})")
    saes = m.get("saes")
    if not isinstance(saes, list) or not all(isinstance(s, dict) and _is_int(s.get("width")) for s in saes):
        problems.append(f"{MANIFEST}: saes must be a list of {{width, path, l0, mse, fvu, ce_loss, ce_delta}}")
    if not isinstance(m.get("meta_sae"), dict):
        problems.append(f"{MANIFEST}: meta_sae is missing (expected {{path, width, k, fvu}})")
    return problems


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _sae_folders(m: dict[str, Any]) -> list[tuple[str, int | None]]:
    """(relative folder, expected d_sae) for every SAE the manifest lists, meta-SAE included."""
    out: list[tuple[str, int | None]] = []
    saes = m.get("saes") if isinstance(m.get("saes"), list) else []
    for s in saes:
        if isinstance(s, dict) and _is_int(s.get("width")):
            out.append((str(s.get("path") or f"saes/{s['width']}"), s["width"]))
    meta = m.get("meta_sae")
    if isinstance(meta, dict):
        out.append((str(meta.get("path") or "meta_sae"), meta.get("width") if _is_int(meta.get("width")) else None))
    return out


def _check_sae_folder(root: Path, rel: str, width: int | None, finite: bool = True) -> list[str]:
    if _safe_rel(rel) is None:
        return [f"{MANIFEST}: SAE path {rel!r} is not a relative path inside the atlas"]
    folder = root / rel
    missing = [f for f in SAE_FILES if not (folder / f).is_file()]
    if missing:
        return [f"{rel}/: missing {' and '.join(missing)} (sae-lens format needs {' + '.join(SAE_FILES)})"]
    try:
        cfg = json.loads((folder / "cfg.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return [f"{rel}/cfg.json: invalid JSON ({e})"]
    if not isinstance(cfg, dict):
        return [f"{rel}/cfg.json: expected a JSON object, got {type(cfg).__name__}"]
    if width is not None and cfg.get("d_sae") not in (None, width):
        return [f"{rel}/cfg.json: d_sae is {cfg.get('d_sae')}, but manifest.json says width {width}"]
    return [f"{rel}/{SAE_FILES[1]}: {p}" for p in check_weights(folder / SAE_FILES[1], cfg, finite=finite)]


# safetensors: an 8-byte little-endian header length, a JSON header, then the raw tensors. Our SAE headers are a
# few hundred bytes; sae-lens ones a few KB. A larger claim is a damaged or hostile file (2**40 would be read into
# memory by the loader before it fails), so it is refused before anything is allocated.
MAX_SAFETENSORS_HEADER = 1 << 20
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# Exponent bits all set <=> NaN or inf, for each float layout (checked on the raw bits: no conversion, no bf16 in numpy)
_EXPONENT = {"F64": ("<u8", 0x7FF0000000000000), "F32": ("<u4", 0x7F800000), "F16": ("<u2", 0x7C00),
             "BF16": ("<u2", 0x7F80)}
_FINITE_CHUNK = 1 << 22


def _expected_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
    if not (_is_int(d_in) and _is_int(d_sae)):
        return {}
    return {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)}


def check_weights(path: str | os.PathLike, cfg: dict[str, Any] | None = None, finite: bool = True) -> list[str]:
    """Problems with one sae_weights.safetensors, found without loading it: not safetensors (a pickle renamed),
    a header too large or inconsistent with the file size, tensor shapes that disagree with ``cfg`` (d_in, d_sae),
    and — with ``finite`` (one sequential read of the file) — NaN/inf values."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":
            return ["is a pickle / torch.save archive, not safetensors (metasae never unpickles weights)"]
        if len(head) < 8:
            return [f"is {size} bytes, too short for a safetensors header"]
        n = int.from_bytes(head, "little")
        if n > MAX_SAFETENSORS_HEADER:
            return [f"claims a safetensors header of {n} bytes (limit {MAX_SAFETENSORS_HEADER}): damaged or not "
                    "safetensors"]
        if n > size - 8:
            return [f"claims a header of {n} bytes but only {size - 8} follow the length"]
        try:
            header = json.loads(fh.read(n).decode("utf-8"), parse_constant=_refuse_constant)
        except (UnicodeDecodeError, ValueError) as e:
            return [f"safetensors header is not valid JSON ({e})"]
    if not isinstance(header, dict):
        return ["safetensors header is not a JSON object"]
    problems, tensors, end = [], {}, 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(t, dict) and t.get("dtype") in _ITEMSIZE and isinstance(t.get("shape"), list)
              and all(_is_int(d) and d >= 0 for d in t["shape"]) and isinstance(t.get("data_offsets"), list)
              and len(t["data_offsets"]) == 2 and all(_is_int(o) for o in t["data_offsets"]))
        if not ok:
            problems.append(f"tensor {name!r}: malformed entry in the safetensors header ({str(t)[:120]})")
            continue
        (a, b), shape = t["data_offsets"], tuple(t["shape"])
        if not 0 <= a <= b or b - a != math.prod(shape) * _ITEMSIZE[t["dtype"]]:
            problems.append(f"tensor {name!r}: data_offsets {[a, b]} do not hold shape {list(shape)} of {t['dtype']}")
            continue
        tensors[name] = (t["dtype"], shape, a, b)
        end = max(end, b)
    if problems:
        return problems
    if 8 + n + end != size:
        return [f"the header describes {8 + n + end} bytes, the file has {size} (truncated or padded)"]
    expected = _expected_shapes(cfg or {})
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        if expected and name not in tensors:
            problems.append(f"tensor {name!r} is missing")
    for name, shape in expected.items():
        if name in tensors and tensors[name][1] != shape:
            problems.append(f"tensor {name!r} has shape {list(tensors[name][1])}, cfg.json (d_in {cfg['d_in']}, "
                            f"d_sae {cfg['d_sae']}) needs {list(shape)}")
    if finite and not problems:
        problems += _nonfinite(path, 8 + n, tensors)
    return problems


def _nonfinite(path: Path, start: int, tensors: dict[str, tuple[str, tuple[int, ...], int, int]]) -> list[str]:
    out = []
    for name, (dtype, _shape, a, b) in sorted(tensors.items(), key=lambda kv: kv[1][2]):
        if dtype not in _EXPONENT or a == b:
            continue
        bits, mask = _EXPONENT[dtype]
        raw = np.memmap(path, dtype=bits, mode="r", offset=start + a, shape=((b - a) // _ITEMSIZE[dtype],))
        bad = sum(int(np.count_nonzero((raw[i: i + _FINITE_CHUNK] & mask) == mask))
                  for i in range(0, len(raw), _FINITE_CHUNK))
        del raw
        if bad:
            out.append(f"tensor {name!r} holds {bad} NaN/inf values")
    return out


def check_parquet(path: Path, name: str) -> list[str]:
    """Problems with one table file: unreadable footer, missing required columns, wrong column types."""
    fname = path.name
    try:
        schema = pq.ParquetFile(path).schema_arrow
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError or others for corrupt files
        return [f"{fname}: cannot be read as Parquet ({type(e).__name__}: {e})"]
    problems = []
    for field in SCHEMAS[name]:
        if field.name not in schema.names:
            problems.append(f"{fname}: required column {field.name!r} is missing")
        elif not same_type(schema.field(field.name).type, field.type):
            problems.append(
                f"{fname}: column {field.name!r} has type {schema.field(field.name).type}, expected {field.type}"
            )
    return problems


def _tracked(rel: str) -> bool:
    """Files that must be listed in the manifest when present (tables and SAE folders)."""
    p = PurePosixPath(rel)
    return (len(p.parts) == 1 and p.suffix == ".parquet") or p.parts[0] in ("saes", "meta_sae")


def links_outside(atlas_dir: str | os.PathLike) -> list[str]:
    """Symbolic links in the atlas (hidden names aside) whose target lies outside it: refused, since the app, the
    backend and ``push`` would read (and upload) the target. A Hugging Face snapshot's links into its own
    cache's blob store (``<repo>/snapshots/<rev>/x -> <repo>/blobs/<sha>``) are how the hub stores files: allowed."""
    root = Path(atlas_dir).resolve()
    inside = [root]
    if root.parent.name == "snapshots":
        inside.append(root.parent.parent / "blobs")
    problems = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(dirnames + [f for f in filenames if not f.startswith(".")]):
            p = Path(dirpath, name)
            if not p.is_symlink():
                continue
            target = p.resolve()
            if not any(target == d or target.is_relative_to(d) for d in inside):
                rel = p.relative_to(root).as_posix()
                problems.append(f"{rel}: a symbolic link to {os.readlink(p)!r}, outside the atlas (refused: copy "
                                "the file into the atlas instead)")
    return problems  # (os.walk does not follow linked folders, so nothing below a refused link is read)


def verify(path: str | os.PathLike, checksums: bool = True) -> list[str]:
    """Every problem found in an atlas folder, each naming the file; an empty list means it is usable."""
    root = Path(path)
    manifest, problems = read_manifest(root)
    if manifest is None:
        return problems
    problems += links_outside(root)
    problems += _check_manifest_fields(manifest)
    files = manifest.get("files")
    if not isinstance(files, dict):
        problems.append(f"{MANIFEST}: 'files' is missing or not an object of {{relative path: sha256}}")
        files = {}
    for rel, digest in files.items():
        if _safe_rel(rel) is None:
            problems.append(f"{MANIFEST}: listed file {rel!r} is not a relative path inside the atlas")
            continue
        p = root / rel
        if not p.is_file():
            problems.append(f"{rel}: listed in manifest.json but missing on disk")
        elif checksums and sha256_file(p) != digest:
            problems.append(f"{rel}: sha256 differs from manifest.json (changed or truncated after the manifest)")
    for rel in atlas_files(root):
        if rel not in files and _tracked(rel):
            problems.append(f"{rel}: on disk but not listed in manifest.json (written after the manifest?)")
    for name in SCHEMAS:
        fname = f"{name}.parquet"
        p = root / fname
        if not p.is_file():
            if fname not in files:
                problems.append(f"{fname}: required table is missing")
            continue
        problems += check_parquet(p, name)
    if manifest.get("weights", True) is not False:
        for rel, width in _sae_folders(manifest):
            problems += _check_sae_folder(root, rel, width, finite=checksums)
    return problems


# ----------------------------------------------------------------------------------------------- reading

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


class _Tables(dict):
    """``Atlas.tables``: tables held in memory; one not held yet is read whole on first access (a lazily opened
    atlas holds only the small ones)."""

    def __init__(self, root: Path, tables: dict[str, pa.Table]) -> None:
        super().__init__(tables)
        self._root = root
        self._lock = threading.Lock()

    def __missing__(self, name: str) -> pa.Table:
        if name not in SCHEMAS:
            raise KeyError(name)
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

    def __init__(self, path: Path, manifest: dict[str, Any], tables: dict[str, pa.Table],
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
        problems = _verify(root) if verify else read_manifest(root)[1] or links_outside(root)
        if problems:
            shown = "\n  ".join(problems[:_MAX_LISTED_PROBLEMS])
            more = len(problems) - _MAX_LISTED_PROBLEMS
            tail = f"\n  ... and {more} more" if more > 0 else ""
            raise AtlasError(f"{root}: not a usable atlas ({len(problems)} problems):\n  {shown}{tail}")
        manifest, _ = read_manifest(root)
        assert manifest is not None
        if expect_model is not None:
            model = manifest.get("model", {}).get("name") if isinstance(manifest.get("model"), dict) else None
            if model != expect_model:
                raise AtlasError(f"{root / MANIFEST}: atlas is for model {model!r}, expected {expect_model!r}")
        if lazy is None:
            try:
                n = pq.ParquetFile(root / "latents.parquet").metadata.num_rows
            except Exception as e:  # a corrupt footer: the same message a full read would give
                raise AtlasError(f"{root / 'latents.parquet'}: cannot be read ({type(e).__name__}: {e})") from e
            lazy = n > LAZY_ABOVE
        names = ("meta_latents",) if lazy else tuple(SCHEMAS)
        atlas = cls(root, manifest, {name: _read_table(root, name) for name in names}, lazy=lazy)
        release_memory()
        return atlas

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
    def model_name(self) -> str | None:
        model = self.manifest.get("model")
        return model.get("name") if isinstance(model, dict) else None

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
        return np.where(self._meta_ids[pos] == ids, self._meta_label[pos], None)

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
        """Interpolation curve of one (small, large) pair by step; empty if the pair was not measured."""
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

    def stitching_pairs(self) -> list[tuple[int, int]]:
        """(small, large) pairs that have a stitching curve."""
        if self.lazy and self._pairs is not None:
            return list(self._pairs)
        t = self._columns("stitching", ["small_width", "large_width"])
        key = np.unique(_latent_key(_np(t["small_width"]), _np(t["large_width"]))) if t.num_rows else []
        pairs = [(int(k >> 32), int(k & 0xFFFFFFFF)) for k in key]
        if self.lazy:  # the file is not held: read its two columns once
            self._pairs = pairs
        return list(pairs)

    # -- SAE weights

    def _weights_or_raise(self) -> None:
        if self.manifest.get("weights", True) is False:
            raise AtlasError(f"{self.path / MANIFEST}: this atlas was built without SAE weights (weights: false)")

    def sae_path(self, width: int) -> Path:
        """Folder of the sae-lens SAE of one width (``SAE.load_from_disk`` reads it)."""
        self._weights_or_raise()
        for s in self.manifest.get("saes") or []:
            if isinstance(s, dict) and s.get("width") == width:
                return self.path / str(s.get("path") or f"saes/{width}")
        raise UnknownLatentError(f"width {width!r} has no SAE in {self.path / MANIFEST}")

    def meta_sae_path(self) -> Path:
        """Folder of the meta-SAE (sae-lens format)."""
        self._weights_or_raise()
        meta = self.manifest.get("meta_sae")
        return self.path / str((meta or {}).get("path") or "meta_sae")


_verify = verify  # Atlas.open's ``verify`` argument shadows the function inside it
