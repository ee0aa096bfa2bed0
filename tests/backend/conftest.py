"""Backend fixtures: the tiny atlas (built once per session) and real `metasae backend` processes on loopback.

Set METASAE_TEST_ATLAS to a tiny-preset atlas folder to skip the one-minute build (e.g. while iterating).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from backend_fakes import TOKEN, fake_env

from metasae.backend.client import LocalBackendProcess


@pytest.fixture(scope="session")
def tiny_atlas(tmp_path_factory) -> Path:
    given = os.environ.get("METASAE_TEST_ATLAS")
    if given:
        path = Path(given)
        assert (path / "manifest.json").is_file(), f"METASAE_TEST_ATLAS={given} is not an atlas"
        return path
    from metasae.cli import main

    root = tmp_path_factory.mktemp("backend-atlas")
    out = root / "atlas"
    assert main(["build", "--preset", "tiny", "--out", str(out), "--work", str(root / "work"), "--quiet"]) == 0
    return out


def start(atlas: Path, tmp: Path, name: str, token: str | None = None, **env: str) -> LocalBackendProcess:
    base = {"OMP_NUM_THREADS": "1", "METASAE_TORCH_THREADS": "1", "METASAE_IDLE_TIMEOUT_S": "0"}
    return LocalBackendProcess(atlas, token=token, env=base | env, log_path=tmp / f"{name}.log")


@pytest.fixture(scope="session")
def servers(tiny_atlas, tmp_path_factory):
    """Two backends started side by side: `main` (real evaluator, no token) and `aux` (token, fake slow
    evaluator, 2 s extra per model load, 2 s idle timeout)."""
    tmp = tmp_path_factory.mktemp("backend-logs")
    procs = {
        "main": start(tiny_atlas, tmp, "main"),
        "aux": start(tiny_atlas, tmp, "aux", token=TOKEN, METASAE_LOAD_DELAY_S="2", METASAE_IDLE_TIMEOUT_S="2",
                     **fake_env()),
    }
    try:
        for p in procs.values():
            p.wait_ready(120, status=("ready",))
        yield procs
    finally:
        for p in procs.values():
            p.stop()


@pytest.fixture(scope="session")
def main_server(servers) -> LocalBackendProcess:
    return servers["main"]


@pytest.fixture(scope="session")
def aux_server(servers) -> LocalBackendProcess:
    return servers["aux"]


@pytest.fixture(scope="session")
def aux_token() -> str:
    return TOKEN
