"""Importing ladders from sae-lens: the hub path against a local offline cache, and local folders in a build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata

from metasae.cli import main
from metasae.sae import Sae, SaeError
from metasae.train import import_ladder

RELEASE = "gpt2-small-res-jb-feature-splitting"
REPO = "models--jbloom--GPT2-Small-Feature-Splitting-Experiment-Layer-8"


def _sae_lens_sae(d_in: int, width: int, hook: str, seed: int, apply_b_dec: bool = False) -> StandardSAE:
    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=width, apply_b_dec_to_input=apply_b_dec,
                                        metadata=SAEMetadata(hook_name=hook, model_name="gpt2-small")))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return sae


@pytest.mark.slow  # a fresh Python process
def test_from_pretrained_reads_an_offline_hub_cache(tmp_path: Path) -> None:
    """sae-lens's real from_pretrained (release yaml -> repo -> hf_hub_download) with HF_HUB_OFFLINE=1."""
    snap = tmp_path / "hub" / REPO / "snapshots" / ("0" * 40)
    sae = _sae_lens_sae(24, 48, "blocks.8.hook_resid_pre", 0)
    sae.save_model(snap / "blocks.8.hook_resid_pre_768")
    (tmp_path / "hub" / REPO / "refs").mkdir(parents=True)
    (tmp_path / "hub" / REPO / "refs" / "main").write_text("0" * 40)
    code = (
        "import torch; from metasae.sae import Sae\n"
        f"s = Sae.from_pretrained('{RELEASE}', 'blocks.8.hook_resid_pre_768')\n"
        "torch.manual_seed(1); x = torch.randn(5, s.d_in)\n"
        "print(s.width, s.hook_name, s.encode(x).sum().item())\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    width, hook, total = r.stdout.split()
    torch.manual_seed(1)
    x = torch.randn(5, 24)
    assert (int(width), hook) == (48, "blocks.8.hook_resid_pre")
    assert float(total) == pytest.approx(float(sae.encode(x).sum()), rel=1e-5)


@pytest.mark.slow  # a fresh Python process
def test_offline_hub_miss_is_a_clear_error(tmp_path: Path) -> None:
    code = f"from metasae.sae import Sae\nSae.from_pretrained('{RELEASE}', 'blocks.8.hook_resid_pre_768')\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path), "HF_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0
    assert "cannot load sae-lens release 'gpt2-small-res-jb-feature-splitting'" in r.stderr


@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_import_ladder_from_folders_keeps_outputs(tmp_path: Path, apply_b_dec: bool) -> None:
    hook = "blocks.2.hook_resid_pre"
    saes = [_sae_lens_sae(32, w, hook, i, apply_b_dec) for i, w in enumerate((64, 128))]
    for s in saes:
        s.save_model(tmp_path / f"{hook}_{s.cfg.d_sae}")
    ladder = import_ladder([str(tmp_path / f"{hook}_{w}") for w in (64, 128)])
    x = torch.randn(7, 32)
    for ours, theirs in zip(ladder, saes, strict=True):
        assert torch.allclose(ours.reconstruct(x), theirs(x), atol=1e-5)
        assert not ours.apply_b_dec_to_input  # folded: the form stitching needs
    with pytest.raises(SaeError, match="strictly growing widths"):
        import_ladder([str(tmp_path / f"{hook}_128"), str(tmp_path / f"{hook}_64")])
    with pytest.raises(SaeError, match="neither a folder nor"):
        import_ladder(["not-a-release"])


@pytest.mark.slow  # a full build
def test_build_with_imported_ladder(tmp_path: Path) -> None:
    """`metasae build --import-release FOLDER` runs every stage on sae-lens SAEs instead of training."""
    hook = "blocks.2.hook_resid_pre"
    folder = tmp_path / "release"
    for i, w in enumerate((64, 128)):
        _sae_lens_sae(32, w, hook, i).save_model(folder / f"{hook}_{w}")
    out = tmp_path / "atlas"
    args = ["build", "--preset", "tiny", "--out", str(out), "--work", str(tmp_path / "w"), "--quiet",
            "--widths", "64,128", "--import-release", str(folder), "--n-tokens", "8192"]
    assert main(args) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert [s["width"] for s in m["saes"]] == [64, 128]
    # the atlas's SAEs are the imported ones (stored in fp16)
    x = torch.randn(4, 32)
    ref = Sae.load(folder / f"{hook}_128")
    got = Sae.load(out / "saes" / "128")
    assert torch.allclose(got.reconstruct(x), ref.reconstruct(x), atol=5e-2)
