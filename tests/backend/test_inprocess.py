"""Pieces checked without a server process: settings from the environment, out-of-memory answers (a real
GPU OOM cannot be provoked on a CPU machine, so the error is injected), JSON cleaning of job results."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from metasae.backend.app import create_app
from metasae.backend.config import Settings
from metasae.backend.jobs import jsonable
from metasae.backend.resources import Resources


def test_settings_from_env(monkeypatch):
    monkeypatch.setenv("METASAE_PORT", "9001")
    monkeypatch.setenv("METASAE_TOKEN", " tok ")
    monkeypatch.setenv("METASAE_PRELOAD", "yes")
    monkeypatch.setenv("METASAE_IDLE_TIMEOUT_S", "2.5")
    s = Settings.from_env(atlas="/x", port=None)
    assert (s.atlas, s.port, s.token, s.preload, s.idle_timeout_s, s.host) == ("/x", 9001, "tok", True, 2.5,
                                                                                 "127.0.0.1")
    assert Settings.from_env(port=1234).port == 1234  # a flag wins over the environment
    monkeypatch.setenv("METASAE_MAX_BODY_BYTES", "lots")
    with pytest.raises(ValueError, match="METASAE_MAX_BODY_BYTES"):
        Settings.from_env()
    monkeypatch.delenv("METASAE_MAX_BODY_BYTES")
    with pytest.raises(ValueError, match="max_tokens"):
        Settings.from_env(max_tokens=0)


def test_jsonable_turns_nan_into_null_and_tensors_into_lists():
    out = jsonable({"a": float("nan"), "b": torch.tensor([1.0, float("inf")]), "c": np.float32(2.5),
                    "d": (np.int64(3), None)})
    assert out == {"a": None, "b": [1.0, None], "c": 2.5, "d": [3, None]}


@pytest.fixture
def app_client(tiny_atlas):
    settings = Settings.from_env(atlas=str(tiny_atlas), idle_timeout_s=0)
    res = Resources(settings, device="cpu")
    res.open_atlas()
    with TestClient(create_app(settings, res, background=False), base_url="http://127.0.0.1") as c:
        yield c, res


def test_out_of_gpu_memory_is_a_503_and_the_service_lives_on(app_client, monkeypatch):
    c, res = app_client
    assert c.post("/v1/encode", json={"width": 64, "latent": 2}).status_code == 200
    real_meta = res.meta

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")

    monkeypatch.setattr(res, "meta", oom)
    r = c.post("/v1/encode", json={"width": 64, "latent": 2})
    assert r.status_code == 503
    assert r.json()["detail"].startswith("out of memory while encoding (CUDA out of memory.")
    monkeypatch.setattr(res, "meta", real_meta)
    assert c.post("/v1/encode", json={"width": 64, "latent": 2}).status_code == 200
    assert c.get("/health").json()["status"] == "ready"


def test_idle_release_waits_for_requests_to_end(tiny_atlas):
    res = Resources(Settings.from_env(atlas=str(tiny_atlas), idle_timeout_s=10), device="cpu")
    res.open_atlas()
    with res.use():
        res.meta()
        assert not res.release_if_idle(now=res.last_used + 100)  # in use: kept
    assert not res.release_if_idle(now=res.last_used + 5)  # not idle long enough
    assert res.release_if_idle(now=res.last_used + 11)
    assert res.status()["loaded"]["meta_sae"] is False and res.n_released == 1
    assert math.isfinite(res.meta().W_dec.sum().item())  # and loads again


def test_an_atlas_that_cannot_be_opened_is_reported_not_fatal(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    settings = Settings.from_env(atlas=str(tmp_path))
    res = Resources(settings, device="cpu")
    res.open_atlas()
    with TestClient(create_app(settings, res, background=False), base_url="http://127.0.0.1") as c:
        h = c.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "error" and "format_version" in h.json()["atlas_error"]
        r = c.post("/v1/encode", json={"width": 64, "latent": 0})
        assert r.status_code == 503 and "could not be opened" in r.json()["detail"]


def test_cli_refuses_a_folder_that_is_no_atlas(tmp_path, capsys):
    from metasae.cli import main

    assert main(["backend", "--atlas", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert "atlas folder does not exist" in capsys.readouterr().err


def test_preload_loads_everything(tiny_atlas):
    res = Resources(Settings.from_env(atlas=str(tiny_atlas)), device="cpu")
    res.open_atlas()
    res.preload()
    assert res.status()["loaded"] == {"model": True, "meta_sae": True, "saes": [64, 128, 256]}
    assert res.status()["status"] == "ready"


def test_parent_watch():
    import os

    from metasae.backend.app import _alive

    assert _alive(os.getppid())
    assert not _alive(os.getpid())  # not our parent: an auto-started backend whose parent was replaced exits
