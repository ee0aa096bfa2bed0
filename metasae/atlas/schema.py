"""The atlas's tables: columns, keys, which are required, and the build stage that writes each.

To add a table: one ``TableSpec`` in ``TABLES`` (``required=False`` so atlases built before it still open), the
writer in the build stage named by ``stage``, and a reader method on ``Atlas`` that checks ``has_table``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import pyarrow as pa

from metasae.atlas.errors import AtlasError

# The manifest format this code writes, and the oldest it still reads (``manifest.migrate`` upgrades older ones).
FORMAT_VERSION = 1
MIN_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ROW_GROUP_SIZE = 8192  # a lookup by key decodes at most one small row group in readers that push filters down
SAE_FILES = ("cfg.json", "sae_weights.safetensors")
DEAD_LABEL = "(dead)"  # the label of a latent that never fired on the statistics tokens
KINDS = ("novel", "reconstruction")


@dataclass(frozen=True)
class TableSpec:
    """One table: its Arrow schema, unique sort key, whether every atlas holds it, and who writes it."""

    name: str
    schema: pa.Schema
    keys: tuple[str, ...]
    required: bool
    stage: str  # the `metasae build` stage that writes it: what to rerun when it is missing

    @property
    def file(self) -> str:
        return f"{self.name}.parquet"


def _f(name: str, typ: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, typ, nullable=nullable)


_S, _I8, _I16, _I32, _I64, _F32 = pa.string(), pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.float32()
_LS, _LI32, _LF32 = pa.list_(pa.string()), pa.list_(pa.int32()), pa.list_(pa.float32())

# Non-nullable fields must be given to write_table; nullable ones are filled with nulls when absent.
TABLES: dict[str, TableSpec] = {t.name: t for t in (
    TableSpec("latents", pa.schema([
        _f("sae_width", _I32), _f("latent", _I32), _f("label", _S), _f("density", _F32),
        _f("mean_act", _F32), _f("max_act", _F32), _f("top_tokens", _LS), _f("top_logits", _LS),
        _f("kind", _S, True), _f("nearest_smaller", _I32, True), _f("nearest_smaller_cos", _F32, True),
        _f("nearest_larger", _I32, True), _f("nearest_larger_cos", _F32, True), _f("group_id", _I32, True),
        _f("delta_mse", _F32, True), _f("delta_ce", _F32, True), _f("delta_ce_attr", _F32, True),
        _f("group_delta_mse", _F32, True), _f("group_delta_ce", _F32, True),
        _f("hist_counts", _LI32, True), _f("hist_edges", _LF32, True),
    ]), ("sae_width", "latent"), required=True, stage="stats"),
    TableSpec("decompositions", pa.schema([
        _f("sae_width", _I32), _f("latent", _I32), _f("meta_latent", _I32), _f("weight", _F32), _f("rank", _I8),
    ]), ("sae_width", "latent", "rank"), required=True, stage="meta"),
    TableSpec("meta_latents", pa.schema([
        _f("meta_latent", _I32), _f("label", _S), _f("n_members", _I32), _f("density", _F32, True),
        _f("top_tokens", _LS, True), _f("top_logits", _LS, True),
        _f("hist_counts", _LI32, True), _f("hist_edges", _LF32, True),
    ]), ("meta_latent",), required=True, stage="meta"),
    TableSpec("examples", pa.schema([
        _f("sae_width", _I32), _f("latent", _I32), _f("rank", _I16), _f("activation", _F32),
        _f("tokens", _LS), _f("acts", _LF32), _f("position", _I16),
    ]), ("sae_width", "latent", "rank"), required=True, stage="stats"),
    # Optional: a single-SAE atlas, or one assembled before its stitching stage ran, has no curves.
    TableSpec("stitching", pa.schema([
        _f("small_width", _I32), _f("large_width", _I32), _f("step", _I32), _f("action", _S),
        _f("latent", _I32, True), _f("group", _I32, True), _f("l0", _F32), _f("mse", _F32),
        _f("ce_loss", _F32, True),
    ]), ("small_width", "large_width", "step"), required=False, stage="stitching"),
    # Optional (added after format 1's first atlases): each rung's training-batch FVU against training tokens,
    # the convergence evidence; the assembly copies it from the SAEs' training metadata.
    TableSpec("training_curves", pa.schema([
        _f("sae_width", _I32), _f("tokens", _I64), _f("fvu", _F32),
    ]), ("sae_width", "tokens"), required=False, stage="assemble"),
)}
SCHEMAS: dict[str, pa.Schema] = {name: t.schema for name, t in TABLES.items()}
KEYS: dict[str, tuple[str, ...]] = {name: t.keys for name, t in TABLES.items()}
REQUIRED_TABLES = tuple(name for name, t in TABLES.items() if t.required)
OPTIONAL_TABLES = tuple(name for name, t in TABLES.items() if not t.required)


def missing_table_message(name: str, command: str | None = None) -> str:
    """What to tell a reader when an optional table is absent: which build stage writes it, and how to run it."""
    spec = TABLES[name]
    how = f"`{command}`" if command else "`metasae build` into this atlas's folder"
    return (f"This atlas has no {spec.file}: it is written by the build's '{spec.stage}' stage. Rerun {how} "
            f"(the build resumes, runs the '{spec.stage}' stage and reassembles the atlas), then reload.")


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
