"""`metasae build --preset tiny`: a whole atlas, resumable after a real kill, bit-identical to a clean build."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from metasae.atlas import Atlas, verify
from metasae.cli import main
from metasae.sae import Sae

pytestmark = pytest.mark.filterwarnings("ignore")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_atlas(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    out = root / "atlas"
    assert main(["build", "--preset", "tiny", "--out", str(out), "--work", str(root / "work"), "--quiet"]) == 0
    return out


def test_tiny_build_is_a_complete_atlas(tiny_atlas: Path) -> None:
    assert verify(tiny_atlas) == []
    m = json.loads((tiny_atlas / "manifest.json").read_text())
    assert [s["width"] for s in m["saes"]] == [64, 128, 256]
    assert m["build"]["command"].startswith("metasae build --preset tiny --out ")
    lat = pd.read_parquet(tiny_atlas / "latents.parquet")
    assert len(lat) == 64 + 128 + 256
    # smallest width has no stitching partner below it; every larger latent is classified
    assert lat[lat.sae_width == 64].kind.isna().all()
    assert set(lat[lat.sae_width > 64].kind) <= {"novel", "reconstruction"}
    assert lat[lat.sae_width > 64].delta_mse.notna().all()
    assert lat[lat.sae_width > 64].delta_ce_attr.notna().all()
    cos = lat[lat.sae_width > 64].nearest_smaller_cos
    assert ((lat[lat.sae_width > 64].kind == "reconstruction") == (cos >= m["stitching"]["threshold"])).all()
    dec = pd.read_parquet(tiny_atlas / "decompositions.parquet")
    assert set(dec.sae_width) == {64, 128, 256}
    assert (dec.weight > 0).all()
    curve = pd.read_parquet(tiny_atlas / "stitching.parquet")
    for (s, lg), c in curve.groupby(["small_width", "large_width"]):
        c = c.sort_values("step")
        assert c.action.iloc[0] == "start" and c.action.iloc[-1] == "bias"
        # the curve ends at the large SAE: its MSE matches the large SAE's evaluation MSE on the same tokens
        large_mse = next(x["mse"] for x in m["saes"] if x["width"] == lg)
        assert c.mse.iloc[-1] == pytest.approx(large_mse, rel=1e-3)
        small_mse = next(x["mse"] for x in m["saes"] if x["width"] == s)
        assert c.mse.iloc[0] == pytest.approx(small_mse, rel=1e-3)
    atlas = Atlas.open(tiny_atlas)
    assert atlas.widths == [64, 128, 256]
    # the training_curves table holds what each SAE's training recorded (two places, one truth)
    table = atlas.training_curves()
    for w in atlas.widths:
        recorded = Sae.load(tiny_atlas / "saes" / str(w)).metadata["training_fvu"]
        rows = table[table.sae_width == w]
        assert len(recorded) >= 2 and rows.tokens.tolist() == [int(t) for t, _ in recorded]
        assert rows.fvu.tolist() == pytest.approx([f for _, f in recorded], rel=1e-6)


def test_info_and_verify_commands(tiny_atlas: Path, capsys) -> None:
    assert main(["verify", str(tiny_atlas)]) == 0
    assert main(["info", str(tiny_atlas)]) == 0
    out = capsys.readouterr().out
    assert "tiny-llama-0" in out and "256" in out


def test_existing_atlas_is_not_overwritten_without_force(tiny_atlas: Path, tmp_path: Path) -> None:
    out = tmp_path / "notes"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    work = tiny_atlas.parent / "work"
    code = main(["build", "--preset", "tiny", "--out", str(out), "--work", str(work), "--quiet"])
    assert code == 2
    assert (out / "mine.txt").read_text() == "keep me"


def test_other_settings_redo_only_the_stages_they_change(tiny_atlas: Path, tmp_path: Path) -> None:
    """A new meta-SAE setting keeps activations, ladder and statistics and replaces the (complete) atlas."""
    import shutil

    out, work = tmp_path / "atlas", tmp_path / "work"
    shutil.copytree(tiny_atlas, out)
    shutil.copytree(tiny_atlas.parent / "work", work)
    kept = {p: p.stat().st_mtime_ns for p in [*(work / "saes").rglob("*.safetensors"), *(work / "acts").glob("*"),
                                              *(work / "stats").glob("*")]}
    old_meta = (work / "meta_sae" / "sae_weights.safetensors").read_bytes()
    assert main(["build", "--preset", "tiny", "--out", str(out), "--work", str(work), "--quiet", "--meta-k", "2"]) == 0
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert (work / "meta_sae" / "sae_weights.safetensors").read_bytes() != old_meta
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["build"]["config"]["meta_k"] == 2 and manifest["meta_sae"]["k"] == 2
    assert verify(out) == []


def test_stale_stages_follow_the_pipeline() -> None:
    from metasae.pipeline.presets import from_preset
    from metasae.pipeline.run import stale_stages

    base = from_preset("tiny").to_flat()
    assert stale_stages(base, {**base}) == []
    assert stale_stages(base, {**base, "meta_k": 2}) == ["meta"]
    assert stale_stages(base, {**base, "stats_tokens": 1}) == ["stats", "meta"]
    assert stale_stages(base, {**base, "train_tokens": 2 * base["train_tokens"]})[0] == "ladder"
    assert stale_stages(base, {**base, "seed": 1})[0] == "activations"


def test_a_second_build_into_the_same_folder_is_locked_out(tmp_path: Path, capsys) -> None:
    import fcntl

    out, work = tmp_path / "atlas", tmp_path / "work"
    work.mkdir()
    with open(work / "build.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running build holds it
        code = main(["build", "--preset", "tiny", "--out", str(out), "--work", str(work), "--quiet"])
    assert code == 2
    assert "another `metasae build` is running" in capsys.readouterr().err
    assert not out.exists() and not (work / "config.json").exists()


def test_a_second_build_into_the_same_out_is_locked_out_even_with_its_own_work_folder(tmp_path: Path,
                                                                                     capsys) -> None:
    import fcntl

    out = tmp_path / "atlas"
    with open(tmp_path / f".{out.name}.build.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running build into `out` (other --work) holds it
        code = main(["build", "--preset", "tiny", "--out", str(out), "--work", str(tmp_path / "w2"), "--quiet"])
    assert code == 2
    assert "another `metasae build` is running" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "w2" / "config.json").exists()


def test_bool_flags_parse_false_as_false() -> None:
    from metasae.cli import build_config, parser

    a = parser().parse_args(["build", "--preset", "tiny", "--out", "x", "--center-mean", "false",
                             "--seed-baseline", "true"])
    cfg = build_config(a)
    assert cfg.train.center_mean is False and cfg.ladder.seed_baseline is True
    with pytest.raises(SystemExit):
        parser().parse_args(["build", "--preset", "tiny", "--out", "x", "--center-mean", "maybe"])


def test_killed_build_resumes_bit_identical(tiny_atlas: Path, tmp_path: Path) -> None:
    out, work = tmp_path / "atlas", tmp_path / "work"
    cmd = [sys.executable, "-m", "metasae.cli", "build", "--preset", "tiny", "--out", str(out), "--work",
           str(work), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # kill it for real once the ladder has started (after activations, before the atlas exists)
    deadline = time.time() + 300
    while time.time() < deadline and not (work / "saes" / "64" / "sae_weights.safetensors").exists():
        assert proc.poll() is None, "build ended before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    # make the two builds share a start time (the manifest records it)
    (work / "started.json").write_text((tiny_atlas.parent / "work" / "started.json").read_text())
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    a, b = _files(tiny_atlas), _files(out)
    assert a.keys() == b.keys()
    ma, mb = json.loads(a.pop("manifest.json")), json.loads(b.pop("manifest.json"))
    ma["build"].pop("command"), mb["build"].pop("command")  # the --out path differs
    assert ma == mb
    assert [k for k in a if a[k] != b[k]] == []
