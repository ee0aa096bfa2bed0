"""Dashboard-path benchmark on a synthetic atlas: cold start, memory, latent page and search latency.

    python -m benchmarks.app --json [--scale quick|paper|1m] [--lazy] [--rebuild]

Scales: ``paper`` (default; the paper's ladder, 195,840 latents), ``quick`` (11,520), ``1m`` (widths 2^12..2^19,
1,044,480 latents, a meta-SAE of 2^13). The atlas is generated once under .cache/ (gitignored; ~1.5 GB at 1m,
with a progress bar) and reused. An atlas above ``metasae.atlas.LAZY_ABOVE`` latents (or any with ``--lazy``) is
opened lazily: its search index is built once (stored under the atlas's hidden .cache/, timed as
``index_build_s``) before the measured process starts. Loading and timing happen in a fresh subprocess so cold
start and RSS are those of a process that holds only the atlas. Prints a table, then (with --json) one JSON
object as the last line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from metasae.atlas import read_manifest, verify, write_manifest
from metasae.synthetic_atlas import PAPER, make_synthetic_atlas, vocabulary

GOALS = {"latent_page_p95_ms": 100, "search_p95_ms": 50, "rss_mb": 2048, "cold_start_s": 10}
ROOT = Path(__file__).resolve().parent.parent
QUICK = {**PAPER, "widths": (768, 1536, 3072, 6144), "n_meta": 512}
MILLION = {**PAPER, "widths": tuple(2**i for i in range(12, 20)), "n_meta": 2**13}
SCALES = {"quick": QUICK, "paper": PAPER, "1m": MILLION}
N_PAGES, N_QUERIES, SEED = 300, 200, 0


def _params(scale: str) -> dict[str, Any]:
    return {**SCALES[scale], "with_weights": False}


def ensure_atlas(scale: str, rebuild: bool = False) -> tuple[Path, float | None]:
    """The benchmark atlas, generated unless a verifying one with the same parameters exists."""
    params = _params(scale)
    path = ROOT / ".cache" / f"bench_atlas_{scale}"
    manifest, _ = read_manifest(path)
    same = manifest is not None and manifest.get("build", {}).get("bench_params") == json.loads(
        json.dumps(params))
    if same and not rebuild and not verify(path, checksums=False):
        return path, None
    t0 = time.perf_counter()
    print(f"generating the {scale} benchmark atlas in {path} (once)", file=sys.stderr)
    make_synthetic_atlas(path, seed=SEED, overwrite=True, progress=True, **params)
    # remember the parameters so a later run can tell whether the cached atlas is the one it wants
    manifest, _ = read_manifest(path)
    assert manifest is not None
    manifest["build"]["bench_params"] = params
    write_manifest(path, manifest)
    return path, time.perf_counter() - t0


def _p95_ms(times: list[float]) -> float:
    return float(np.percentile(np.asarray(times) * 1000, 95))


def _text_queries(atlas: Any, rng: np.random.Generator) -> list[tuple[str, dict[str, Any]]]:
    words = vocabulary()
    labels = [atlas.latent(int(w), int(rng.integers(atlas.n_latents(int(w)))))["label"]
              for w in rng.choice(atlas.widths, size=30)]
    queries = [words[i] for i in rng.integers(len(words), size=70)]
    queries += [words[i][:3] for i in rng.integers(len(words), size=30)]
    queries += [f"{words[i]} {words[j]}" for i, j in rng.integers(len(words), size=(30, 2))]
    queries += labels + ["einstein", "Albert Einstein physicist", "zyzzogeton", "xqzvw", "e", "th"]
    queries += ["'; DROP TABLE latents; --", ".*(a+)+$", "a" * 10_000, "\ud800", "\U0001f642 emoji"]
    out: list[tuple[str, dict[str, Any]]] = [(q, {}) for q in queries]
    filters = [{"widths": [atlas.widths[-1]]}, {"kind": "novel", "min_density": 1e-3},
               {"max_delta_mse": -1e-4}, {"widths": atlas.widths[:2], "kind": "reconstruction"}]
    out += [(words[i], filters[j % len(filters)]) for j, i in enumerate(rng.integers(len(words), size=N_QUERIES - len(out)))]
    return out


def ensure_index(path: Path, lazy: bool) -> float | None:
    """Build the stored search index of a lazily read atlas unless it exists; seconds taken, None if it did."""
    from metasae.atlas import Atlas
    from metasae.search import build_cache

    atlas = Atlas.open(path, verify=False, lazy=True if lazy else None)
    if not atlas.lazy:
        return None
    t0 = time.perf_counter()
    folder = build_cache(atlas, progress=True)
    took = time.perf_counter() - t0
    print(f"search index: {folder}", file=sys.stderr)
    return None if took < 1 else took  # under a second: it was already stored


def worker(path: Path, lazy: bool = False) -> dict[str, Any]:
    """Runs in the fresh subprocess: open, index, measure."""
    import psutil

    from metasae.atlas import Atlas
    from metasae.search import SearchIndex

    # wall times are the goals; CPU times (process_time) beside them say how much of a wall time was the work
    # itself and how much waiting for a core on a shared machine
    t0, c0 = time.perf_counter(), time.process_time()
    atlas = Atlas.open(path, lazy=True if lazy else None)
    t_open = time.perf_counter() - t0
    index = SearchIndex(atlas)
    cold, cold_cpu = time.perf_counter() - t0, time.process_time() - c0
    rss_start_mb = psutil.Process().memory_info().rss / 2**20

    rng = np.random.default_rng(SEED)
    page, page_cpu = [], []
    for _ in range(N_PAGES):
        w = int(rng.choice(atlas.widths))
        i = int(rng.integers(atlas.n_latents(w)))
        t, c = time.perf_counter(), time.process_time()
        atlas.latent(w, i)
        dec = atlas.decomposition(w, i)
        atlas.examples(w, i)
        atlas.family(w, i)
        atlas.members(int(dec["meta_latent"].iloc[0]))
        page.append(time.perf_counter() - t)
        page_cpu.append(time.process_time() - c)

    text, search_cpu = [], []
    for q, kw in _text_queries(atlas, rng):
        t, c = time.perf_counter(), time.process_time()
        index.text(q, **kw)
        text.append(time.perf_counter() - t)
        search_cpu.append(time.process_time() - c)
    meta = []
    for j in range(N_QUERIES):
        w = int(rng.choice(atlas.widths))
        dec = atlas.decomposition(w, int(rng.integers(atlas.n_latents(w))))
        n = 1 + j % 3
        required = {int(m): float(x) * 0.5 for m, x in zip(dec["meta_latent"][:n], dec["weight"][:n], strict=True)}
        t, c = time.perf_counter(), time.process_time()
        index.by_meta(required) if j % 2 else index.by_meta(list(required), min_weight=0.05)
        meta.append(time.perf_counter() - t)
        search_cpu.append(time.process_time() - c)
    # resident memory after every page and query (the lazy reader's row-group caches are full by then)
    rss_mb = max(rss_start_mb, psutil.Process().memory_info().rss / 2**20)
    return {
        "cold_start_s": round(cold, 3), "open_s": round(t_open, 3), "rss_mb": round(rss_mb, 1),
        "rss_start_mb": round(rss_start_mb, 1), "cold_start_cpu_s": round(cold_cpu, 3),
        "latent_page_p95_cpu_ms": round(_p95_ms(page_cpu), 3), "search_p95_cpu_ms": round(_p95_ms(search_cpu), 3),
        "latent_page_p95_ms": round(_p95_ms(page), 3), "latent_page_median_ms": round(float(np.median(page)) * 1000, 3),
        "text_search_p95_ms": round(_p95_ms(text), 3), "by_meta_p95_ms": round(_p95_ms(meta), 3),
        "search_p95_ms": round(max(_p95_ms(text), _p95_ms(meta)), 3),
        "n_latents": int(sum(atlas.n_latents(w) for w in atlas.widths)), "lazy": atlas.lazy, "n_pages": N_PAGES,
        "n_text_queries": len(text), "n_meta_queries": len(meta),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--scale", choices=list(SCALES), default="paper", help="atlas size (default: paper)")
    ap.add_argument("--quick", action="store_true", help="same as --scale quick")
    ap.add_argument("--lazy", action="store_true", help="read the atlas lazily whatever its size")
    ap.add_argument("--rebuild", action="store_true", help="regenerate the cached atlas")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.lazy)))
        return 0

    scale = "quick" if args.quick else args.scale
    path, gen_s = ensure_atlas(scale, args.rebuild)
    index_s = ensure_index(path, args.lazy)
    cmd = [sys.executable, "-m", "benchmarks.app", "--worker", str(path)] + (["--lazy"] if args.lazy else [])
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        return proc.returncode
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update({"atlas": str(path.relative_to(ROOT)), "scale": scale, "quick": scale == "quick",
                   "generate_s": None if gen_s is None else round(gen_s, 1),
                   "index_build_s": None if index_s is None else round(index_s, 1), "goals": GOALS})
    result["ok"] = all(result[k] <= v for k, v in GOALS.items())

    print(f"metasae dashboard benchmark ({scale}: {result['n_latents']:,} latents, "
          f"{'lazy' if result['lazy'] else 'in memory'}, atlas {result['atlas']})")
    print(f"{'metric':<22}{'measured':>12}{'goal':>10}")
    for key, goal in GOALS.items():
        print(f"{key:<22}{result[key]:>12}{goal:>10}  {'ok' if result[key] <= goal else 'MISSED'}")
    for key in ("open_s", "latent_page_median_ms", "text_search_p95_ms", "by_meta_p95_ms", "rss_start_mb",
                "cold_start_cpu_s", "latent_page_p95_cpu_ms", "search_p95_cpu_ms", "generate_s", "index_build_s"):
        print(f"{key:<22}{str(result[key]):>12}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
