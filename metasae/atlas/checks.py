"""``verify``: every problem an atlas folder has, each naming the file and, where there is one, the fix.

Checked without loading anything into the app: the manifest's version and fields, sha256 of every listed file,
files not listed, symbolic links out of the folder, each table's columns and types (a missing optional table is
fine), and the SAE folders' safetensors headers, shapes and (with checksums) NaN/inf values.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from metasae.atlas.io import atlas_files, sha256_file
from metasae.atlas.manifest import Manifest, manifest_problems, migrate, read_manifest, refuse_constant
from metasae.atlas.schema import MANIFEST, SAE_FILES, SCHEMAS, TABLES, same_type


def _safe_rel(rel: Any) -> PurePosixPath | None:
    # Lexical check only: hub snapshots hold symlinks into a blob store outside the folder, so no resolve().
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        return None
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or p.as_posix() != rel.rstrip("/"):
        return None
    return p


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _sae_folders(m: Manifest) -> list[tuple[str, int | None]]:
    """(relative folder, expected d_sae) for every SAE the manifest lists, meta-SAE included."""
    return [(s.folder, s.width) for s in m.saes] + [(m.meta_sae.path or "meta_sae", m.meta_sae.width)]


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
    if not (isinstance(d_in, int) and isinstance(d_sae, int) and _is_int(d_in) and _is_int(d_sae)):
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
            header = json.loads(fh.read(n).decode("utf-8"), parse_constant=refuse_constant)
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
    cfg = cfg or {}
    expected = _expected_shapes(cfg)
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
    raw, problems = read_manifest(root)
    if raw is None:
        return problems
    raw = migrate(raw)
    problems += links_outside(root)
    field_problems = manifest_problems(raw)
    problems += field_problems
    files = raw.get("files")
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
    for spec in TABLES.values():
        p = root / spec.file
        if not p.is_file():
            if spec.required and spec.file not in files:  # a listed one is reported as missing on disk above
                problems.append(f"{spec.file}: required table is missing (written by the build's "
                                f"'{spec.stage}' stage)")
            continue
        problems += check_parquet(p, spec.name)
    if not field_problems:
        m = Manifest.coerce(raw)
        if m.weights:
            for rel, width in _sae_folders(m):
                problems += _check_sae_folder(root, rel, width, finite=checksums)
    return problems
