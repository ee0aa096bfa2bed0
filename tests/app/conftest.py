"""Fixtures for the dashboard tests: a planted synthetic atlas, broken copies of it, and a page runner."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from metasae.synthetic_atlas import make_synthetic_atlas

APP = str(Path(__file__).resolve().parents[2] / "app.py")


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
