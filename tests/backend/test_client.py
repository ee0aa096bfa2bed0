"""The client: HttpBackend against real backends, BackendError carrying the service's message, and get_backend
starting, reusing, and — after the backend is killed during a job — restarting a local backend."""

from __future__ import annotations

import inspect
import os
import time

import pytest
from backend_fakes import fake_env

from metasae.backend import client as client_mod
from metasae.backend.client import HttpBackend, get_backend, stop_local_backend
from metasae.backend.contract import Backend, BackendError

TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def be(main_server):
    with HttpBackend(main_server.url) as b:
        yield b



@pytest.fixture(autouse=True)
def no_local_backend_from_earlier_tests():
    """The app starts its own local backend when it opens an atlas (app tests run first in the same process):
    these tests count on starting, finding or killing theirs, so each begins without one."""
    stop_local_backend()
    yield

def test_http_backend_has_the_protocol_methods():
    for name, member in inspect.getmembers(Backend, inspect.isfunction):
        if name.startswith("_"):
            continue
        mine = inspect.signature(getattr(HttpBackend, name))
        for p in inspect.signature(member).parameters.values():
            assert p.name in mine.parameters and mine.parameters[p.name].kind == p.kind, (name, p.name)


def test_every_method_round_trips(be):
    assert be.health()["status"] == "ready"
    by_latent = be.encode(width=64, latent=3)
    assert by_latent["meta_latents"] and by_latent["fvu"] >= 0
    assert be.encode(vector=[0.05] * 32)["d_model"] == 32
    acts = be.activations(TEXT, 64, top_k=2)
    assert len(acts["tokens"]) == len(TEXT) and all(len(t) <= 2 for t in acts["top"])
    job_id = be.start_stitch(64, 128, text=TEXT * 3, metrics=("mse",))["job_id"]
    assert be.job(job_id)["id"] == job_id
    done = be.wait(job_id, timeout=120)
    assert done["status"] == "done" and len(done["result"]["delta_mse"]) == 128
    assert be.cancel(job_id)["status"] == "done"  # cancelling a finished job changes nothing


def test_errors_raise_backend_error_with_the_service_message(be):
    with pytest.raises(BackendError, match=r"^width: Input should be 64, 128 or 256") as e:
        be.encode(width=100, latent=0)
    assert e.value.status == 422
    with pytest.raises(BackendError, match=r"^vector: List should have at least 32 items") as e:
        be.encode(vector=[1.0, 2.0])
    with pytest.raises(BackendError, match=r"^vector\[0\]: Input should be a finite number"):
        be.encode(vector=[float("nan")] * 32)
    with pytest.raises(BackendError, match=r"^text: ") as e:
        be.activations("", 64)
    with pytest.raises(BackendError, match=r"^job_id: ") as e:
        be.job("0" * 32)
    assert e.value.status == 404


def test_token(aux_server, aux_token):
    with pytest.raises(BackendError, match="^Authorization: missing bearer token") as e:
        HttpBackend(aux_server.url).job("0" * 32)
    assert e.value.status == 401
    with pytest.raises(BackendError, match="^Authorization: wrong bearer token"):
        HttpBackend(aux_server.url, token="nope").job("0" * 32)
    with pytest.raises(BackendError) as e:
        HttpBackend(aux_server.url, token=aux_token).job("0" * 32)
    assert e.value.status == 404


def test_unreachable_backend_is_a_clear_error():
    with pytest.raises(BackendError, match=r"cannot reach the metasae backend at http://127.0.0.1:9") as e:
        HttpBackend("http://127.0.0.1:9").health()
    assert e.value.status is None


def test_get_backend_uses_the_url_and_token_from_the_environment(monkeypatch, aux_server, aux_token):
    monkeypatch.setenv("METASAE_BACKEND_URL", aux_server.url + "/")
    monkeypatch.setenv("METASAE_TOKEN", aux_token)
    b = get_backend()
    assert isinstance(b, HttpBackend) and b.url == aux_server.url
    assert b.job.__self__ is b and b.health()["auth"] is True
    with pytest.raises(BackendError) as e:
        b.job("0" * 32)
    assert e.value.status == 404  # the token went along
    assert client_mod._local is None  # nothing was started


def test_get_backend_without_an_atlas_says_so(monkeypatch, tmp_path):
    monkeypatch.delenv("METASAE_BACKEND_URL", raising=False)
    monkeypatch.setenv("METASAE_ATLAS", str(tmp_path / "none"))
    with pytest.raises(BackendError, match="no atlas at"):
        get_backend()


def test_local_backend_killed_during_a_job_then_a_retry_works(monkeypatch, tiny_atlas):
    monkeypatch.delenv("METASAE_BACKEND_URL", raising=False)
    monkeypatch.delenv("METASAE_TOKEN", raising=False)
    monkeypatch.setenv("METASAE_ATLAS", str(tiny_atlas))
    for k, v in fake_env().items():
        monkeypatch.setenv(k, v)
    try:
        b = get_backend()
        proc = client_mod._local
        assert proc is not None and proc.alive() and b.url.startswith("http://127.0.0.1:")
        assert get_backend() is b  # reused
        assert proc.token and b.health()["auth"] is True  # a private random token protects it
        job_id = b.start_stitch(64, 128, text="k" * 32 * 100)["job_id"]  # 10 s in the fake evaluator
        deadline = time.monotonic() + 120  # bounded: a job that failed or never starts must not hang the suite
        while (j := b.job(job_id))["progress"] < 0.1:
            assert j["status"] in ("queued", "running"), j
            assert time.monotonic() < deadline, f"the job made no progress in 120 s: {j}"
            time.sleep(0.05)
        proc.kill()  # SIGKILL: what a crash or an OOM-killer looks like
        with pytest.raises(BackendError, match="cannot reach the metasae backend") as e:
            b.job(job_id)
        assert e.value.status is None and "start it again and retry" in str(e.value)
        b2 = get_backend()  # notices the dead process and starts a new one
        assert b2 is not b and client_mod._local is not proc and client_mod._local.alive()
        with pytest.raises(BackendError, match="restarted backend forgets every job"):
            b2.job(job_id)
        retry = b2.start_stitch(64, 128, text="k" * 64)["job_id"]
        assert b2.wait(retry, timeout=60)["status"] == "done"
        last = client_mod._local
    finally:
        stop_local_backend()
    assert client_mod._local is None and not last.alive()
    assert os.environ.get("METASAE_BACKEND_URL") is None
