"""The atlas contract (DESIGN.md, "Atlas format"): what an atlas folder holds, how it is written, checked, read.

An atlas is a folder holding Parquet tables (``schema.TABLES``: required and optional ones), sae-lens SAE folders
(``saes/<width>/``, ``meta_sae/``) and ``manifest.json`` (``manifest.Manifest``), written last, that records
the sha256 of every other file. Names that start with a dot (temp files, ``.cache/``, ``.git/``,
``.gitattributes``) are not part of an atlas.

- ``schema``: tables, columns, keys, which are required, the build stage that writes each; format versions
- ``manifest``: the typed ``Manifest`` with every default, reading and migrating manifest.json
- ``io``: atomic writes of tables, JSON and the manifest
- ``checks``: ``verify`` and the file checks behind it
- ``reader``: the indexed ``Atlas`` reader
"""

from metasae.atlas.checks import MAX_SAFETENSORS_HEADER, check_parquet, check_weights, links_outside, verify
from metasae.atlas.errors import AtlasError, UnknownLatentError
from metasae.atlas.io import (
    atlas_files,
    sha256_file,
    write_json_atomic,
    write_manifest,
    write_table,
    write_table_parts,
)
from metasae.atlas.manifest import (
    COS_THRESHOLD,
    BuildInfo,
    CorpusInfo,
    HeldoutBin,
    Manifest,
    MetaRows,
    MetaSaeInfo,
    ModelInfo,
    Overlap,
    SaeInfo,
    SeedBaseline,
    SeedStability,
    ShowcaseItem,
    StitchingInfo,
    StitchPair,
    load_manifest,
    migrate,
    read_manifest,
)
from metasae.atlas.reader import LAZY_ABOVE, Atlas, release_memory, rows_of
from metasae.atlas.schema import (
    DEAD_LABEL,
    FORMAT_VERSION,
    KEYS,
    KINDS,
    MANIFEST,
    MIN_FORMAT_VERSION,
    OPTIONAL_TABLES,
    REQUIRED_TABLES,
    SAE_FILES,
    SCHEMAS,
    TABLES,
    TableSpec,
    conform,
    missing_table_message,
    same_type,
)

__all__ = [
    "COS_THRESHOLD", "DEAD_LABEL", "FORMAT_VERSION", "KEYS", "KINDS", "LAZY_ABOVE", "MANIFEST",
    "MAX_SAFETENSORS_HEADER", "MIN_FORMAT_VERSION", "OPTIONAL_TABLES", "REQUIRED_TABLES", "SAE_FILES", "SCHEMAS",
    "TABLES", "Atlas", "AtlasError", "BuildInfo", "CorpusInfo", "HeldoutBin", "Manifest", "MetaRows", "MetaSaeInfo", "ModelInfo",
    "Overlap", "SaeInfo", "SeedBaseline", "SeedStability", "ShowcaseItem", "StitchPair", "StitchingInfo",
    "TableSpec", "UnknownLatentError", "atlas_files", "check_parquet", "check_weights", "conform",
    "links_outside", "load_manifest", "migrate", "missing_table_message", "read_manifest", "release_memory",
    "rows_of", "same_type", "sha256_file", "verify", "write_json_atomic", "write_manifest", "write_table",
    "write_table_parts",
]
