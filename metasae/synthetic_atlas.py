"""Synthetic atlases: tiny ones with planted latents for tests, paper-scale ones for benchmarks.

Everything is drawn from one seeded numpy generator and built with vectorised Arrow kernels, so the
paper-scale atlas (195,840 latents, 2304 meta-latents, 10 examples x 32 tokens each) takes 20-30 s on 2 cores.
Words come from ``vocabulary()``: a few hundred common words written here plus pronounceable made-up
words, all generated deterministically (no third-party text).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from metasae.atlas import (
    COS_THRESHOLD,
    DEAD_LABEL,
    REQUIRED_TABLES,
    AtlasError,
    BuildInfo,
    CorpusInfo,
    HeldoutBin,
    Manifest,
    MetaRows,
    MetaSaeInfo,
    ModelInfo,
    SaeInfo,
    SeedBaseline,
    ShowcaseItem,
    StitchingInfo,
    StitchPair,
    write_manifest,
    write_table,
    write_table_parts,
)

DEFAULT_WIDTHS = (64, 128, 256)
PAPER_WIDTHS = (768, 1536, 3072, 6144, 12288, 24576, 49152, 98304)
PAPER = {"widths": PAPER_WIDTHS, "n_meta": 2304, "k": 4, "n_examples": 10, "ctx": 32, "d_model": 768}
SYNTHETIC_MODEL = "synthetic"
N_TOP = 10  # top tokens / boosted logits per latent
N_BINS = 20  # activation histogram bins
CHUNK_LATENTS = 8192  # latents per part of the examples table (x n_examples rows: whole row groups of 8192)

# Planted latents, placed by width index (0 = smallest width) so they exist in any ladder of >= 3 widths.
# ``decomposition`` is {meta_latent: weight}; every planted meta-latent id is < 32 (the default n_meta).
_PLANTED_SPEC: dict[str, dict[str, Any]] = {
    "physics": {
        "width_index": 0, "latent": 2, "label": "physics and physicists",
        "top_tokens": [" physics", " physicist", " Physics", " laws", " motion"],
        "decomposition": {3: 0.6, 5: 0.2, 9: 0.1, 14: 0.05},
    },
    "einstein": {
        "width_index": 1, "latent": 7, "label": "Albert Einstein physicist", "kind": "reconstruction",
        "nearest_smaller": ("physics", 0.97), "top_tokens": [" Einstein", " relativity", " Albert", " physicist"],
        "decomposition": {3: 0.5, 11: 0.3, 5: 0.15, 20: 0.05},
        "example_tokens": [" Albert", " Einstein"],  # placed at the max-activation position of every example
    },
    "curie": {
        "width_index": 2, "latent": 42, "label": "Marie Curie chemist", "kind": "reconstruction",
        "nearest_smaller": ("einstein", 0.96), "top_tokens": [" Curie", " radium", " Marie", " chemist"],
        "decomposition": {3: 0.4, 11: 0.35, 17: 0.2, 25: 0.05},
    },
    "quantum": {
        "width_index": 2, "latent": 100, "label": "quantum entanglement", "kind": "novel",
        "nearest_smaller": ("einstein", 0.41), "top_tokens": [" quantum", " entangled", " qubit"],
        "decomposition": {29: 0.7, 3: 0.2, 8: 0.1, 12: 0.05},
    },
    "hidden": {  # its marker token appears only in its examples: the example-text search must find it
        "width_index": 0, "latent": 5, "label": "assorted background text",
        "decomposition": {1: 0.5, 2: 0.3, 4: 0.1, 6: 0.05},
        "example_tokens": [" Zyzzogeton"],
    },
}
PLANTED_META = {3: "science", 5: "physics", 11: "prominent figures", 17: "chemistry", 20: "German",
                29: "quantum", 1: "miscellany"}
_PLANTED_WORDS = ("einstein", "curie", "physic", "relativ", "radium", "chemist", "quantum", "entangl",
                  "qubit", "zyzzogeton", "albert", "marie")


def planted_for(widths: tuple[int, ...] = DEFAULT_WIDTHS) -> dict[str, dict[str, Any]]:
    """The planted latents resolved to a ladder: each entry gains ``width`` (and nearest_smaller as an id)."""
    out: dict[str, dict[str, Any]] = {}
    for name, spec in _PLANTED_SPEC.items():
        entry = {k: v for k, v in spec.items() if k != "width_index"}
        entry["width"] = int(widths[spec["width_index"]])
        out[name] = entry
    for entry in out.values():
        if "nearest_smaller" in entry:
            parent, cos = entry["nearest_smaller"]
            entry["nearest_smaller"] = out[parent]["latent"]
            entry["nearest_smaller_cos"] = cos
    return out


PLANTED = planted_for(DEFAULT_WIDTHS)
"""Planted latents of the default tiny atlas, e.g. ``PLANTED["einstein"]``: width 128, latent 7,
label "Albert Einstein physicist", decomposition {3: 0.5, 11: 0.3, 5: 0.15, 20: 0.05}, nearest smaller
latent 2 of width 64 at cos 0.97. ``PLANTED_META`` labels the planted meta-latents."""

_COMMON_TEXT = """
the of and to in is was for on that with as by at from his her its their this which be are were
has had have not but one two three first new after also time year years city war world state people
school music film game team party river church house king queen power water light energy space star
planet earth moon sun fire stone iron gold silver glass paper book story song poem letter word number
name language law court trade market money bank price tax road bridge train ship car plane engine
machine computer network code data signal sound color colour red green blue black white north south
east west island mountain forest desert ocean sea lake valley village town country nation empire army
battle peace treaty union council church temple god spirit death life birth child mother father
brother sister family friend doctor teacher student farmer soldier artist writer painter singer
player leader king prince science theory experiment atom cell gene protein disease medicine body heart
brain blood bone animal bird fish horse dog cat tree flower seed fruit grain food bread wine salt sugar
milk meat cloth wool cotton silk wood metal coal oil gas heat cold rain snow wind storm summer winter
spring autumn morning night day week month hour minute second history culture art museum library
university college student degree prize award medal record sport football cricket tennis chess
"""
_ONSETS_TEXT = "b br bl c ch cl cr d dr f fl fr g gl gr h j k l m n p pl pr qu r s sh sl sm sn sp st str t th tr v w z"
_VOWELS_TEXT = "a e i o u ai ea ee oa ou y"
_CODAS = ["", "", "n", "r", "l", "s", "t", "m", "nd", "st", "x", "ck", "ng", "rn", "lt"]


def vocabulary(n: int = 4000) -> list[str]:
    """``n`` distinct lowercase words: the common words above, then made-up ones (fixed, seed-independent)."""
    rng = np.random.default_rng(20250208)
    words = list(dict.fromkeys(_COMMON_TEXT.split()))
    seen = set(words)
    onsets, vowels, codas = np.array(_ONSETS_TEXT.split()), np.array(_VOWELS_TEXT.split()), np.array(_CODAS)
    m = 4096

    def syllables() -> np.ndarray:
        return (onsets[rng.integers(len(onsets), size=m)] + vowels[rng.integers(len(vowels), size=m)]
                + codas[rng.integers(len(codas), size=m)])

    while len(words) < n:
        two = syllables() + syllables()
        batch = np.where(rng.random(m) < 0.2, two + syllables(), two)
        for w in batch.tolist():
            if w not in seen and not any(p in w for p in _PLANTED_WORDS) and len(words) < n:
                seen.add(w)
                words.append(w)
    return words


def _list_array(values: pa.Array, n_rows: int, per_row: int) -> pa.ListArray:
    offsets = pa.array(np.arange(n_rows + 1, dtype=np.int32) * per_row)
    return pa.ListArray.from_arrays(offsets, values)


def _token_lists(rng: np.random.Generator, tokens: pa.Array, n_rows: int, per_row: int) -> pa.ListArray:
    return _list_array(pc.take(tokens, pa.array(rng.integers(len(tokens), size=n_rows * per_row))), n_rows, per_row)


def _hist(rng: np.random.Generator, density: np.ndarray, max_act: np.ndarray) -> tuple[pa.Array, pa.Array]:
    n = len(density)
    decay = np.exp(-np.arange(N_BINS) / rng.uniform(2, 6, size=(n, 1)))
    counts = np.floor(density[:, None] * 1e6 * decay).astype(np.int32)
    edges = (max_act[:, None] * np.linspace(0, 1, N_BINS + 1)[None, :]).astype(np.float32)
    return _list_array(pa.array(counts.ravel()), n, N_BINS), _list_array(pa.array(edges.ravel()), n, N_BINS + 1)


def _labels(rng: np.random.Generator, words: pa.Array, n: int) -> pa.Array:
    a, b, c = (pc.take(words, pa.array(rng.integers(len(words), size=n))) for _ in range(3))
    two = pc.binary_join_element_wise(a, b, " ")
    return pc.if_else(pa.array(rng.random(n) < 0.4), pc.binary_join_element_wise(two, c, " "), two)


class _Ladder:
    """Per-latent columns for all widths, concatenated in (width, latent) order."""

    def __init__(self, widths: tuple[int, ...]) -> None:
        self.widths = widths
        self.sizes = np.array(widths, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self.n = int(self.sizes.sum())
        self.width = np.repeat(self.sizes, self.sizes).astype(np.int32)
        self.latent = np.concatenate([np.arange(w, dtype=np.int32) for w in widths])

    def row_of(self, width: int, latent: int) -> int:
        return int(self.starts[self.widths.index(width)] + latent)


def make_synthetic_atlas(
    out_dir: str | Path,
    widths: tuple[int, ...] = DEFAULT_WIDTHS,
    n_meta: int = 32,
    k: int = 4,
    n_examples: int = 5,
    ctx: int = 16,
    seed: int = 0,
    plant: bool = True,
    with_weights: bool = True,
    d_model: int = 32,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write a complete atlas (tables, SAE folders, manifest) that ``verify`` accepts; deterministic in seed.

    ``with_weights=False`` skips the sae-lens folders and records ``"weights": false`` in the manifest (use it
    at paper scale). ``overwrite`` replaces an existing atlas folder (one holding manifest.json). ``progress``
    shows a progress bar over the examples table (most of the time at a million latents).
    """
    widths = tuple(int(w) for w in widths)
    out = Path(out_dir)
    if list(widths) != sorted(set(widths)) or not widths or widths[0] <= 0:
        raise ValueError(f"widths must be distinct, positive and ascending, got {widths}")
    if plant and (len(widths) < 3 or n_meta < 32 or k < 4 or widths[0] <= 5 or widths[1] <= 7 or widths[2] <= 100):
        raise ValueError("plant=True needs >= 3 widths (>= 6, 8, 101 latents), n_meta >= 32 and k >= 4")
    if n_meta < 2 * k:
        raise ValueError(f"n_meta ({n_meta}) must be at least 2*k ({2 * k})")
    if out.exists() and any(out.iterdir()):
        if not (overwrite and (out / "manifest.json").is_file()):
            raise FileExistsError(f"{out}: not empty (pass overwrite=True to replace an existing atlas)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    words = vocabulary()
    word_arr = pa.array(words)
    base_tokens = [" " + w for w in words] + [" " + w.capitalize() for w in words[:500]]
    lad = _Ladder(widths)
    planted = planted_for(widths) if plant else {}
    # Tokens are drawn as indices into one token list (planted tokens appended, never drawn at random) and
    # turned into strings once, after planting, so nothing loops over the tens of millions of example tokens.
    extra = sorted({t for p in planted.values() for t in p.get("top_tokens", []) + p.get("example_tokens", [])})
    tok_arr = pa.array(base_tokens + [t for t in extra if t not in set(base_tokens)])
    n_random = len(base_tokens)

    latents, top_idx = _latents_table(rng, lad, word_arr, tok_arr.slice(0, n_random))
    dec = _decompositions(rng, lad, n_meta, k)
    examples = _Examples(rng, lad, n_random, latents["max_act"].to_numpy(), n_examples, ctx)
    if planted:
        latents, dec = _plant(lad, planted, latents, dec, top_idx, examples, tok_arr, k)
    latents = latents.append_column("top_tokens", _list_array(pc.take(tok_arr, pa.array(top_idx.ravel())),
                                                              lad.n, N_TOP))
    del top_idx
    latents = _relations(rng, lad, latents)
    latents = _decomposability(latents, dec, lad, seed)
    meta = _meta_table(rng, n_meta, dec, lad.n, word_arr, tok_arr.slice(0, n_random), planted)
    stitching, stats = _stitching(rng, lad, latents)
    kinds = latents["kind"].to_numpy(zero_copy_only=False)
    groups = latents["group_id"].fill_null(-1).to_numpy()
    density = latents["density"].to_numpy()
    pairs = []  # one summary per (small, large) pair, as the build's assembly records
    for i in range(1, len(widths)):
        s, e = lad.starts[i], lad.starts[i] + lad.sizes[i]
        live = density[s:e] > 0
        novel = kinds[s:e] == "novel"
        pairs.append(StitchPair(
            small=widths[i - 1], large=widths[i], novel_frac=float(np.mean(novel)),
            n_groups=int(len(np.unique(groups[s:e][groups[s:e] >= 0]))),
            # planted: the functional test (insertion lowers MSE) finds fewer novel latents than cosine
            novel_frac_functional=round(0.6 * float(np.mean(novel[live])), 4),
            novel_frac_cos_live=float(np.mean(novel[live])), n_live_large=int(live.sum()), monotone_frac=0.97))
    for i, w in enumerate(widths):
        d = density[lad.starts[i]:lad.starts[i] + w]
        stats[w].update(n_dead=int((d == 0).sum()), n_rare=int(((d > 0) & (d < 1e-4)).sum()),
                        n_dense=int((d > 0.1).sum()),
                        always_on_share=round(float(d[d > 0.5].sum() / max(d.sum(), 1e-12)), 4))

    tables = {"latents": latents, "decompositions": dec, "meta_latents": meta, "stitching": stitching,
              "training_curves": _training_curves(widths)}
    for name, table in tables.items():
        write_table(out, name, table)
    del latents, dec, tables
    # the examples table (10 x 32 tokens a latent) is written in parts: a million-latent atlas never holds it whole
    write_table_parts(out, "examples", examples.parts(tok_arr, progress))
    missing = [t for t in REQUIRED_TABLES if not (out / f"{t}.parquet").is_file()]
    assert not missing, f"the synthetic atlas does not write the required tables {missing}"
    if with_weights:
        _write_weights(out, widths, n_meta, d_model, seed)
    manifest = Manifest(
        model=ModelInfo(name=SYNTHETIC_MODEL, source="metasae.synthetic_atlas", hook="blocks.0.hook_resid_pre",
                        d_model=d_model),
        corpus=CorpusInfo(sources=["synthetic"], n_tokens=int(lad.n * n_examples * ctx)),
        build=BuildInfo(
            command=(f"make_synthetic_atlas(widths={widths}, n_meta={n_meta}, k={k}, n_examples={n_examples}, "
                     f"ctx={ctx}, seed={seed}, plant={plant}, with_weights={with_weights})"),
            seed=seed, packages={"pyarrow": pa.__version__, "numpy": np.__version__},
            created="2025-01-01T00:00:00+00:00",  # fixed so the same seed gives the same bytes
        ),
        saes=[SaeInfo(width=w, path=f"saes/{w}", **stats[w]) for w in widths],
        meta_sae=MetaSaeInfo(path="meta_sae", width=n_meta, k=k, fvu=0.52, train_fvu=0.52, heldout_fvu=0.61,
                             random_heldout_fvu=0.97, seed_stability=0.42, overlap=None,
                             heldout_by_nearest=[HeldoutBin(lo=-1.0, hi=0.5, n=40, heldout_fvu=0.78),
                                                 HeldoutBin(lo=0.5, hi=0.7, n=20, heldout_fvu=0.6),
                                                 HeldoutBin(lo=0.7, hi=1.0, n=30, heldout_fvu=0.35)],
                             rows=MetaRows(source="pooled", n_rows=lad.n, min_density=1e-4, max_density=0.1)),
        stitching=StitchingInfo(threshold=COS_THRESHOLD, pairs=pairs,
                                seed_baseline=SeedBaseline(width=widths[1], mismatch_frac=0.31, median_max_cos=0.74,
                                                           seeds=[seed, seed + 1])),
        showcase=[ShowcaseItem(role=role, width=planted[name]["width"], latent=planted[name]["latent"],
                               label=planted[name]["label"], why=why)
                  for role, name, why in (("person", "einstein", "a named person, decomposed into science + "
                                                                 "prominent figures + German"),
                                          ("science", "physics", "a science topic with a clear family"))
                  if name in planted],
        weights=with_weights,
        synthetic=True,
    )
    write_manifest(out, manifest)
    return out


def make_paper_scale_atlas(out_dir: str | Path, seed: int = 0, overwrite: bool = False,
                           **overrides: Any) -> Path:
    """The paper's ladder shape (GPT-2 small feature-splitting widths) without SAE weights."""
    params = {**PAPER, "with_weights": False, **overrides}
    return make_synthetic_atlas(out_dir, seed=seed, overwrite=overwrite, plant=True, **params)


def _latents_table(rng: np.random.Generator, lad: _Ladder, words: pa.Array,
                   tokens: pa.Array) -> tuple[pa.Table, np.ndarray]:
    """Per-latent statistics; top tokens come back as an index matrix for planting (see make_synthetic_atlas)."""
    n = lad.n
    density = (10 ** rng.uniform(-5, -1.5, size=n)).astype(np.float32)
    mean_act = rng.uniform(0.5, 5, size=n).astype(np.float32)
    max_act = (mean_act * rng.uniform(2, 6, size=n)).astype(np.float32)
    counts, edges = _hist(rng, density, max_act)
    delta_mse = (-rng.exponential(1e-4, size=n)).astype(np.float32)
    delta_ce = (-rng.exponential(1e-3, size=n)).astype(np.float32)
    top_idx = rng.integers(len(tokens), size=(n, N_TOP))
    labels = _labels(rng, words, n)
    # the last latents of every width: always on, dense, dead (as real ladders have; set after the random draws
    # so every other value stays what this seed always gave)
    for i, w in enumerate(lad.widths):
        last = lad.starts[i] + w
        density[[last - 1, last - 2, last - 3]] = (0.6, 0.25, 0.0)
    dead = np.flatnonzero(density == 0)
    labels = pa.array(np.where(np.isin(np.arange(n), dead), DEAD_LABEL, labels.to_numpy(zero_copy_only=False)),
                      pa.string())
    table = pa.table({
        "sae_width": lad.width, "latent": lad.latent, "label": labels,
        "density": density, "mean_act": mean_act, "max_act": max_act,
        "top_logits": _token_lists(rng, tokens, n, N_TOP),
        "delta_mse": delta_mse, "delta_ce": delta_ce,
        "delta_ce_attr": (delta_ce * rng.normal(1, 0.3, size=n)).astype(np.float32),
        "group_delta_mse": (delta_mse * rng.uniform(1, 3, size=n)).astype(np.float32),
        "group_delta_ce": (delta_ce * rng.uniform(1, 3, size=n)).astype(np.float32),
        "hist_counts": counts, "hist_edges": edges,
    })
    return table, top_idx


def _relations(rng: np.random.Generator, lad: _Ladder, lat: pa.Table) -> pa.Table:
    """kind / nearest_smaller / group_id for every width above the smallest, then nearest_larger from them."""
    n = lad.n
    kind = np.full(n, None, dtype=object)
    near_s = np.full(n, -1, dtype=np.int64)
    cos_s = np.full(n, np.nan, dtype=np.float32)
    have = lat.column_names
    if "_kind" in have:  # planted values (set by _plant) win over random ones
        fixed = lat["_kind"].to_numpy(zero_copy_only=False)
        fixed_near = lat["_near"].to_numpy()
        fixed_cos = lat["_cos"].to_numpy()
    else:
        fixed = np.full(n, None, dtype=object)
        fixed_near, fixed_cos = np.full(n, -1), np.full(n, np.nan)
    for i in range(1, len(lad.widths)):
        s, e, small = lad.starts[i], lad.starts[i] + lad.sizes[i], lad.sizes[i - 1]
        m = e - s
        novel = rng.random(m) < 0.35
        kind[s:e] = np.where(novel, "novel", "reconstruction")
        near_s[s:e] = rng.integers(small, size=m)
        cos_s[s:e] = np.where(novel, rng.uniform(0.2, COS_THRESHOLD, m), rng.uniform(COS_THRESHOLD, 0.95, m))
    planted = np.flatnonzero(fixed != None)  # noqa: E711 (elementwise on an object array)
    kind[planted], near_s[planted], cos_s[planted] = fixed[planted], fixed_near[planted], fixed_cos[planted]
    group = np.where(kind == "reconstruction", near_s, -1)

    # nearest_larger: the child with the highest cosine, else a random larger latent with a low cosine
    near_l = np.full(n, -1, dtype=np.int64)
    cos_l = np.full(n, np.nan, dtype=np.float32)
    for i in range(len(lad.widths) - 1):
        s, small = lad.starts[i], lad.sizes[i]
        ls, le = lad.starts[i + 1], lad.starts[i + 1] + lad.sizes[i + 1]
        near_l[s:s + small] = rng.integers(lad.sizes[i + 1], size=small)
        cos_l[s:s + small] = rng.uniform(0.1, 0.4, size=small)
        parent, c = near_s[ls:le], cos_s[ls:le]
        order = np.lexsort((-c, parent))
        first = order[np.r_[True, parent[order][1:] != parent[order][:-1]]]
        near_l[s + parent[first]] = first
        cos_l[s + parent[first]] = c[first]
    for col in ("_kind", "_near", "_cos"):
        if col in lat.column_names:
            lat = lat.drop_columns([col])
    masked = lambda a: pa.array(a, mask=a < 0, type=pa.int32())  # noqa: E731
    return (lat.append_column("kind", pa.array(kind, type=pa.string()))
            .append_column("nearest_smaller", masked(near_s))
            .append_column("nearest_smaller_cos", pa.array(cos_s, from_pandas=True))
            .append_column("nearest_larger", masked(near_l))
            .append_column("nearest_larger_cos", pa.array(cos_l, from_pandas=True))
            .append_column("group_id", masked(group)))


def _decomposability(lat: pa.Table, dec: pa.Table, lad: _Ladder, seed: int) -> pa.Table:
    """decomp_fvu / decomp_terms / decomp_entropy as metasae.meta.decomposability defines them: terms and entropy
    (nats, of the normalised weights) from the stored decomposition, FVU drawn (its own generator, so every other
    value stays what this seed always gave); planted latents are well explained (FVU 0.1)."""
    k = dec.num_rows // max(lad.n, 1)
    w = dec["weight"].to_numpy().reshape(lad.n, k).astype(np.float64)
    w = np.where(w > 0.005, w, 0.0)  # the padding weights (0.001) of planted rows are not active meta-latents
    p = w / np.maximum(w.sum(1, keepdims=True), 1e-12)
    ent = -(p * np.log(np.where(p > 0, p, 1.0))).sum(1)
    fvu = np.random.default_rng(seed + 12).uniform(0.05, 0.95, size=lad.n)
    fvu[np.isin(lat["label"].to_numpy(zero_copy_only=False), [s["label"] for s in _PLANTED_SPEC.values()])] = 0.1
    return (lat.append_column("decomp_fvu", pa.array(fvu.astype(np.float32)))
            .append_column("decomp_terms", pa.array((w > 0).sum(1).astype(np.int16)))
            .append_column("decomp_entropy", pa.array(ent.astype(np.float32))))


def _training_curves(widths: tuple[int, ...], points: int = 12) -> pa.Table:
    """Planted convergence: each rung's FVU falls geometrically to a floor that is lower for wider rungs."""
    step = np.arange(1, points + 1, dtype=np.int64)
    return pa.table({
        "sae_width": np.repeat(np.array(widths, dtype=np.int32), points),
        "tokens": np.tile(step * 250_000, len(widths)),
        "fvu": np.concatenate([(0.1 + 0.3 / (i + 1)) + 0.5 * np.exp(-step / 3.0) for i in range(len(widths))])
        .astype(np.float32),
    })


def _decompositions(rng: np.random.Generator, lad: _Ladder, n_meta: int, k: int) -> pa.Table:
    n = lad.n
    # Distinct meta-latents per latent, clustered (small steps) so co-occurrence has structure.
    first = rng.integers(n_meta, size=(n, 1))
    steps = np.minimum(1 + rng.geometric(0.08, size=(n, k - 1)), max(n_meta // k - 1, 1))
    metas = (first + np.concatenate([np.zeros((n, 1), dtype=np.int64), np.cumsum(steps, axis=1)], axis=1)) % n_meta
    weights = -np.sort(-rng.exponential(0.3, size=(n, k)), axis=1) + 0.01
    return pa.table({
        "sae_width": np.repeat(lad.width, k), "latent": np.repeat(lad.latent, k),
        "meta_latent": metas.ravel().astype(np.int32), "weight": weights.ravel().astype(np.float32),
        "rank": np.tile(np.arange(k, dtype=np.int8), n),
    })


class _Examples:
    """The examples table, drawn from the main generator exactly as one (rows, ctx) draw would be, but built and
    written ``CHUNK_LATENTS`` latents at a time.

    The main generator draws, in order: every example's max position, a (rows, ctx) float32 uniform for the
    per-token activations, then the (rows, ctx) token indices. Chunked draws of one distribution give the same
    values as one draw, so two copies of the generator (at the start of the uniforms and of the tokens) replay
    them chunk by chunk while the main generator skips past both (drawing and discarding in chunks), and every
    later table gets the values this seed always gave."""

    def __init__(self, rng: np.random.Generator, lad: _Ladder, n_tokens: int, max_act: np.ndarray,
                 n_examples: int, ctx: int) -> None:
        self.lad, self.n_tokens, self.n_examples, self.ctx = lad, n_tokens, n_examples, ctx
        self.max_act = max_act
        rows = lad.n * n_examples
        self.position = rng.integers(ctx // 2, ctx, size=rows).astype(np.int16)
        self._u = _copy(rng)
        _skip(rng, rows * ctx, lambda m: rng.random(m, dtype=np.float32))
        self._tok = _copy(rng)
        _skip(rng, rows * ctx, lambda m: rng.integers(n_tokens, size=m))
        self.planted: dict[int, list[tuple[int, int]]] = {}  # example row -> [(position, token index)]

    def parts(self, tokens: pa.Array, progress: bool = False) -> Iterator[pa.Table]:
        """The table in key order, CHUNK_LATENTS latents (a whole number of row groups) at a time."""
        lad, n_ex, ctx = self.lad, self.n_examples, self.ctx
        starts = range(0, lad.n, CHUNK_LATENTS)
        if progress:
            from tqdm import tqdm
            starts = tqdm(starts, desc="examples", unit="chunk", total=-(-lad.n // CHUNK_LATENTS))
        decay = np.linspace(1, 0.4, n_ex)
        for a in starts:
            b = min(a + CHUNK_LATENTS, lad.n)
            r0, r1 = a * n_ex, b * n_ex
            activation = (np.repeat(self.max_act[a:b], n_ex) * np.tile(decay, b - a)).astype(np.float32)
            position = self.position[r0:r1]
            # Sparse like real SAE activations: most context tokens do not fire the latent at all.
            u = self._u.random((r1 - r0, ctx), dtype=np.float32)
            acts = np.where(u < 0.2, (u * 5) ** 2 * activation[:, None] * 0.6, np.float32(0)).astype(np.float32)
            del u
            acts[np.arange(r1 - r0), position] = activation
            idx = self._tok.integers(self.n_tokens, size=(r1 - r0, ctx))
            for e, placed in self.planted.items():
                if r0 <= e < r1:
                    for pos, t in placed:
                        idx[e - r0, pos] = t
            yield pa.table({
                "sae_width": np.repeat(lad.width[a:b], n_ex), "latent": np.repeat(lad.latent[a:b], n_ex),
                "rank": np.tile(np.arange(n_ex, dtype=np.int16), b - a), "activation": activation,
                "acts": _list_array(pa.array(acts.ravel()), r1 - r0, ctx), "position": position,
                "tokens": _list_array(pc.take(tokens, pa.array(idx.ravel())), r1 - r0, ctx),
            })


def _copy(rng: np.random.Generator) -> np.random.Generator:
    out = np.random.Generator(type(rng.bit_generator)())
    out.bit_generator.state = rng.bit_generator.state
    return out


def _skip(rng: np.random.Generator, n: int, draw: Any, block: int = 1 << 24) -> None:
    for i in range(0, n, block):
        draw(min(block, n - i))


def _plant(lad: _Ladder, planted: dict[str, dict[str, Any]], lat: pa.Table, dec: pa.Table, top_idx: np.ndarray,
           examples: _Examples, tokens: pa.Array, k: int) -> tuple[pa.Table, pa.Table]:
    """Overwrite the planted rows (labels, tokens, decompositions, relations); ``top_idx`` changes in place and
    ``examples.planted`` records the example tokens to place."""
    index = {t: i for i, t in enumerate(tokens.to_pylist())}
    labels = lat["label"].to_pylist()
    kind = np.full(lad.n, None, dtype=object)
    near = np.full(lad.n, -1, dtype=np.int64)
    cos = np.full(lad.n, np.nan, dtype=np.float32)
    metas = dec["meta_latent"].to_numpy().copy()
    weights = dec["weight"].to_numpy().copy()
    positions = examples.position
    n_ex = examples.n_examples
    for p in planted.values():
        r = lad.row_of(p["width"], p["latent"])
        labels[r] = p["label"]
        top = [index[t] for t in p.get("top_tokens", [])]
        top_idx[r, : len(top)] = top
        if "kind" in p:
            kind[r], near[r], cos[r] = p["kind"], p["nearest_smaller"], p["nearest_smaller_cos"]
        items = sorted(p["decomposition"].items(), key=lambda kv: -kv[1])[:k]
        for j, (m, w) in enumerate(items):
            metas[r * k + j], weights[r * k + j] = m, w
        for j in range(len(items), k):  # pad with tiny weights on meta-latents the planted ones do not use
            metas[r * k + j], weights[r * k + j] = 31 - j, 0.001
        ex_tokens = [index[t] for t in p.get("example_tokens", [])]
        for e in range(r * n_ex, (r + 1) * n_ex):
            pos = int(positions[e])
            for j, t in enumerate(reversed(ex_tokens)):
                examples.planted.setdefault(e, []).append((pos - j, t))
    lat = lat.set_column(lat.schema.get_field_index("label"), "label", pa.array(labels, pa.string()))
    lat = lat.append_column("_kind", pa.array(kind, pa.string())).append_column(
        "_near", pa.array(near)).append_column("_cos", pa.array(cos))
    dec = dec.set_column(dec.schema.get_field_index("meta_latent"), "meta_latent", pa.array(metas))
    dec = dec.set_column(dec.schema.get_field_index("weight"), "weight", pa.array(weights))
    return lat, dec


def _meta_table(rng: np.random.Generator, n_meta: int, dec: pa.Table, n_latents: int, words: pa.Array,
                toks: pa.Array, planted: dict[str, Any]) -> pa.Table:
    members = np.bincount(dec["meta_latent"].to_numpy(), minlength=n_meta).astype(np.int32)
    density = (members / max(n_latents, 1)).astype(np.float32)
    labels = _labels(rng, words, n_meta).to_pylist()
    if planted:
        for m, label in PLANTED_META.items():
            labels[m] = label
    max_act = rng.uniform(0.5, 3, size=n_meta).astype(np.float32)
    counts, edges = _hist(rng, np.maximum(density, 1e-6), max_act)
    return pa.table({
        "meta_latent": np.arange(n_meta, dtype=np.int32), "label": pa.array(labels, pa.string()),
        "n_members": members, "density": density,
        "top_tokens": _token_lists(rng, toks, n_meta, N_TOP), "top_logits": _token_lists(rng, toks, n_meta, N_TOP),
        "hist_counts": counts, "hist_edges": edges,
    })


def _stitching(rng: np.random.Generator, lad: _Ladder, lat: pa.Table) -> tuple[pa.Table, dict[int, dict]]:
    """Curves from each small SAE to the next larger one: add novel latents, swap groups, MSE falls."""
    widths = lad.widths
    l0 = {w: 20.0 + 8.0 * np.log2(w / widths[0]) for w in widths}
    mse = {w: 0.2 * (w / widths[0]) ** -0.3 for w in widths}
    stats = {w: {"l0": l0[w], "mse": mse[w], "fvu": mse[w] / 0.8, "ce_loss": 3.0 + mse[w], "ce_delta": mse[w]}
             for w in widths}
    kind = lat["kind"].to_numpy(zero_copy_only=False)
    group = lat["group_id"].fill_null(-1).to_numpy()
    parts = []
    for i in range(len(widths) - 1):
        small, large = widths[i], widths[i + 1]
        s, e = lad.starts[i + 1], lad.starts[i + 1] + lad.sizes[i + 1]
        novel = np.flatnonzero(kind[s:e] == "novel").astype(np.int64)
        groups = np.unique(group[s:e][group[s:e] >= 0])
        acts = np.concatenate([np.zeros(len(novel), np.int8), np.ones(len(groups), np.int8)])
        ids = np.concatenate([novel, groups])
        order = rng.permutation(len(ids))
        acts, ids = acts[order], ids[order]
        n = len(ids) + 1
        t = np.linspace(0, 1, n) ** 0.7
        jitter = np.r_[0, rng.normal(0, 0.002, n - 2), 0] if n > 2 else np.zeros(n)
        ce = (3.0 + mse[small] + t * (mse[large] - mse[small])).astype(np.float32)
        ce_mask = np.arange(n) % 5 != 0  # measured on every 5th step only: exercises null ce_loss
        ce_mask[[0, -1]] = False
        action = np.array(["start", "add", "swap"], dtype=object)[np.r_[0, acts + 1]]
        parts.append(pa.table({
            "small_width": np.full(n, small, np.int32), "large_width": np.full(n, large, np.int32),
            "step": np.arange(n, dtype=np.int32), "action": pa.array(action, pa.string()),
            "latent": pa.array(np.r_[-1, np.where(acts == 0, ids, -1)], mask=np.r_[True, acts != 0], type=pa.int32()),
            "group": pa.array(np.r_[-1, np.where(acts == 1, ids, -1)], mask=np.r_[True, acts != 1], type=pa.int32()),
            "l0": (l0[small] + t * (l0[large] - l0[small])).astype(np.float32),
            "mse": (mse[small] + t * (mse[large] - mse[small]) + jitter).astype(np.float32),
            "ce_loss": pa.array(ce, mask=ce_mask),
        }))
    if not parts:
        return pa.table({"small_width": pa.array([], pa.int32())}).slice(0, 0), stats
    return pa.concat_tables(parts), stats


def _write_weights(out: Path, widths: tuple[int, ...], n_meta: int, d_model: int, seed: int) -> None:
    """Tiny sae-lens StandardSAE folders with seeded random weights (fp16), one per width plus the meta-SAE."""
    import torch  # heavy: only needed when weights are written
    from sae_lens import StandardSAE, StandardSAEConfig

    rng = np.random.default_rng(seed + 1)
    for rel, d_in, d_sae in [(f"saes/{w}", d_model, w) for w in widths] + [("meta_sae", d_model, n_meta)]:
        if d_sae * d_in > 50_000_000:
            raise AtlasError(f"{out / rel}: {d_sae}x{d_in} weights are too large for a synthetic atlas; "
                             "use with_weights=False")
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, dtype="float16"))
        w_dec = rng.normal(size=(d_sae, d_in))
        w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
        state = {"W_dec": w_dec, "W_enc": w_dec.T.copy(), "b_enc": np.zeros(d_sae), "b_dec": np.zeros(d_in)}
        with torch.no_grad():
            for name, value in state.items():
                getattr(sae, name).copy_(torch.from_numpy(value).to(torch.float16))
        sae.save_model(out / rel)
