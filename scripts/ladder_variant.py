"""Train a build's two smallest rungs (and the seed twin) with other training settings, on the build's own cached
activations, and measure their stitching the way the build does: is a missed target a matter of training?

    python scripts/ladder_variant.py WORK OUT --set train.tokens=9000000
    python scripts/ladder_variant.py WORK OUT --set train.architecture=standard   # ReLU + L1, like the paper's

OUT becomes a work folder of its own (config.json with the changes, `acts` linked to WORK's, the shared centre
copied), trained with `train_ladder_jobs` and the same seeds as `metasae build`, so `--set` nothing reproduces
WORK's rungs. Resumable: trained rungs are kept. Prints and writes OUT/variant.json: FVU per rung, the seed
baseline, functional and cosine-novel fractions, the share of groups that lower MSE alone, the share of stitching
steps whose MSE does not rise and the path's peak over its start. The results for data/ are in data/README.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from metasae import novelty
from metasae import stitching as st
from metasae.activations import ActivationStore
from metasae.atlas.io import write_json_atomic
from metasae.pipeline.context import n_eval_ctx
from metasae.pipeline.stages import SEED_TWIN, ladder_jobs, read_work_config, train_ladder_jobs
from metasae.sae import Sae
from metasae.train import evaluate_sae


def parse_value(text: str) -> object:
    """`9000000` -> int, `standard` -> str, `none` -> None (JSON where it parses)."""
    if text.lower() == "none":
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def prepare(work: Path, out: Path, changes: dict[str, object]) -> None:
    """OUT as a work folder sharing WORK's activations and centre, with the changed settings and two rungs."""
    if not (work / "config.json").is_file():
        raise SystemExit(f"{work} is not a build's work folder (no config.json)")
    base = read_work_config(work)
    try:
        cfg = base.with_values({"ladder.widths": base.ladder.widths[:2], **changes})
    except (ValueError, TypeError) as e:  # an unknown path, or a value of the wrong type for its setting
        raise SystemExit(f"bad --set {changes}: {e}") from None
    (out / "saes").mkdir(parents=True, exist_ok=True)
    if (out / "config.json").is_file() and read_work_config(out) != cfg:
        raise SystemExit(f"{out} was trained with other settings; choose another folder")
    write_json_atomic(out / "config.json", cfg.to_dict())
    if not (out / "acts").exists():
        (out / "acts").symlink_to((work / "acts").resolve(), target_is_directory=True)
    centre = work / "saes" / "dense.safetensors"
    if centre.is_file() and not (out / "saes" / centre.name).is_file():
        shutil.copy(centre, out / "saes" / centre.name)


def measure(out: Path) -> dict:
    """The build's stitching measures for OUT's pair and its seed baseline, on the build's evaluation tokens."""
    cfg = read_work_config(out)
    acts = ActivationStore.open(out / "acts").flat(n_eval_ctx(cfg), cfg.train.max_norm_ratio)
    small_w, large_w = cfg.ladder.widths
    small, large = (Sae.load(out / "saes" / str(w)) for w in (small_w, large_w))
    th = cfg.stitching.threshold
    ev = {str(s.width): evaluate_sae(s, acts) for s in (small, large)}
    res: dict = {"config": {"train": cfg.to_dict()["train"]},
                 "fvu": {w: e["fvu"] for w, e in ev.items()}, "l0": {w: e["l0"] for w, e in ev.items()}}
    twin = out / "saes" / f"{small_w}{SEED_TWIN}"
    if (twin / "sae_weights.safetensors").is_file():
        res["seed_baseline"] = novelty.seed_baseline(small, Sae.load(twin), acts, th)
    m = st.match(small, large, th)
    sp = st.sparse_acts(small, large, acts)
    d = st.latent_delta_mse(small, large, sp).numpy()
    res.update(novelty.novel_fractions(d, m.nearest_small_cos, novelty.live_mask(large, acts), th))
    res["groups_help_alone"] = float((st.group_delta_mse(small, large, m, sp).numpy() < 0).mean())
    curve = st.interpolate(small, large, m, sp)
    mse = novelty.group_path_mse(curve)
    res["monotone_frac"] = novelty.monotone_frac(mse)
    res["peak_over_start"] = float(mse.max() / mse[0])
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                   help="a build setting to change, e.g. train.tokens=9000000 (repeatable)")
    p.add_argument("--widths", type=int, nargs="*", default=None,
                   help="train only these widths in this process (run several side by side); then measure none")
    a = p.parse_args()
    torch.set_num_threads(1)
    changes = {k: parse_value(v) for k, v in (s.split("=", 1) for s in a.set)}
    prepare(a.work, a.out, changes)
    jobs = ladder_jobs(read_work_config(a.out))
    if a.widths is not None:
        train_ladder_jobs(a.out, [j for j in jobs if j[1] in set(a.widths)])
        return
    train_ladder_jobs(a.out, [j for j in jobs if not (a.out / "saes" / j[0] / "sae_weights.safetensors").is_file()])
    res = measure(a.out)
    write_json_atomic(a.out / "variant.json", res)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
