"""Fixtures for the dashboard tests: a planted synthetic atlas, broken copies of it, and a page runner."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from metasae.synthetic_atlas import make_synthetic_atlas

APP = str(Path(__file__).resolve().parents[2] / "dashboard.py")  # app.py only serves it (st.App)


@pytest.fixture(scope="session")
def synthetic_atlas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default planted synthetic atlas (widths 64/128/256, 32 meta-latents, tiny SAE weights)."""
    return make_synthetic_atlas(tmp_path_factory.mktemp("atlas") / "planted")


@pytest.fixture(scope="session")
def corrupt_atlas(synthetic_atlas: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy whose latents table was truncated after the manifest was written."""
    out = tmp_path_factory.mktemp("corrupt") / "corrupt"
    shutil.copytree(synthetic_atlas, out)
    p = out / "latents.parquet"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return out


@pytest.fixture
def run_page(monkeypatch: pytest.MonkeyPatch) -> Callable[..., AppTest]:
    """run_page(atlas, page, **query_params) -> the AppTest after one run of that page (no exception raised)."""

    def run(source: Path | str, page: str = "overview", /, *, timeout: float = 60, **params: str) -> AppTest:
        monkeypatch.setenv("METASAE_ATLAS", str(source))
        at = AppTest.from_file(APP, default_timeout=timeout)
        if page != "overview":
            at.switch_page(f"pages/{page}.py")
        for k, v in params.items():
            at.query_params[k] = v
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    return run


@pytest.fixture(scope="session")
def old_manifest_atlas(synthetic_atlas: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy without the manifest fields later builds add (showcase, seed baseline, functional novel fraction,
    held-out FVU, latent counts): an atlas written before them must still open."""
    import json

    from metasae.atlas import MANIFEST, write_manifest

    out = tmp_path_factory.mktemp("old") / "old"
    shutil.copytree(synthetic_atlas, out)
    m = json.loads((out / MANIFEST).read_text())
    m.pop("showcase")
    m["meta_sae"].pop("heldout_by_nearest")
    m["stitching"].pop("seed_baseline")
    for p in m["stitching"]["pairs"]:
        for k in ("novel_frac_functional", "novel_frac_cos_live", "n_live_large", "monotone_frac"):
            p.pop(k)
    for s in m["saes"]:
        for k in ("n_dead", "n_rare", "n_dense", "always_on_share"):
            s.pop(k)
    m["meta_sae"] = {k: v for k, v in m["meta_sae"].items() if k in ("path", "width", "k", "fvu")}
    (out / "training_curves.parquet").unlink()  # an optional table added later
    write_manifest(out, m)
    return out
