"""The `aux` backend: bearer token on every /v1 route, /health answering while a model loads, idle release of
weights, and jobs (a fake evaluator with a known duration) cancelled midway or failing out of GPU memory."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

ROUTES = [("POST", "/v1/encode", {"width": 64, "latent": 0}),
          ("POST", "/v1/activations", {"text": "hi", "width": 64}),
          ("POST", "/v1/stitch", {"small": 64, "large": 128, "text": "hello there"}),
          ("GET", "/v1/jobs", None), ("GET", "/v1/jobs/abc", None), ("DELETE", "/v1/jobs/abc", None),
          ("GET", "/openapi.json", None), ("GET", "/docs", None), ("GET", "/redoc", None)]
NO_JOB = "0" * 32


@pytest.fixture(scope="module")
def anon(aux_server):
    with httpx.Client(base_url=aux_server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def http(aux_server, aux_token):
    with httpx.Client(base_url=aux_server.url, timeout=60, headers={"Authorization": f"Bearer {aux_token}"}) as c:
        yield c


def wait_job(http, job_id: str, timeout: float = 60) -> dict:
    end = time.monotonic() + timeout
    while (j := http.get(f"/v1/jobs/{job_id}").json())["status"] not in ("done", "failed", "cancelled"):
        assert time.monotonic() < end, j
        time.sleep(0.05)
    return j


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_every_v1_route_needs_the_token(anon, aux_token, method, path, body):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": aux_token},
                    {"Authorization": "Basic x"}, {"Authorization": f"Bearer {aux_token}x"}):
        r = anon.request(method, path, json=body, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["detail"].startswith("Authorization") and r.headers["www-authenticate"] == "Bearer"


def test_right_token_passes_and_health_says_little_without_it(anon, http, aux_server):
    assert http.get("/v1/jobs").status_code == 200
    assert http.get(f"/v1/jobs/{NO_JOB}").status_code == 404  # past auth: an unknown job
    h = anon.get("/health").json()
    assert h == {"status": h["status"], "auth": True, "version": h["version"]}  # no paths, device or model
    full = http.get("/health").json()
    assert full["auth"] is True and full["atlas"] == aux_server.atlas and full["device"] == "cpu"
    spec = http.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "swagger" in http.get("/docs").text.lower()


def test_health_answers_at_once_while_the_model_loads(anon, http):
    """The aux backend spends 2 s more in every model load (METASAE_LOAD_DELAY_S): /health must not wait."""
    assert http.get("/health").json()["loaded"]["model"] is False
    out = {}
    t = threading.Thread(target=lambda: out.update(r=http.post("/v1/activations", json={"text": "hello",
                                                                                          "width": 64})))
    t.start()
    seen, slowest = set(), 0.0
    while t.is_alive():
        t0 = time.perf_counter()
        h = http.get("/health").json()
        slowest = max(slowest, time.perf_counter() - t0)
        seen.add(h["status"])
        if h["status"] == "loading":
            assert h["loading"] and set(h["loading"]) <= {"model", "sae:64"}
        time.sleep(0.05)
    t.join()
    assert out["r"].status_code == 200, out["r"].text
    assert "loading" in seen and slowest < 1.0, (seen, slowest)
    h = http.get("/health").json()
    assert h["status"] == "ready" and h["loaded"]["model"] is True and 64 in h["loaded"]["saes"]


def test_idle_weights_are_released_and_reloaded(anon, http):
    assert http.post("/v1/encode", json={"width": 64, "latent": 1}).status_code == 200
    released = http.get("/health").json()["released"]
    end = time.monotonic() + 20
    while (h := http.get("/health").json())["released"] == released:
        assert time.monotonic() < end, h
        time.sleep(0.2)
    assert h["loaded"] == {"model": False, "meta_sae": False, "saes": []}
    r = http.post("/v1/encode", json={"width": 64, "latent": 1})  # loads again on the next need
    assert r.status_code == 200 and r.json()["meta_latents"]


def test_cancel_a_job_midway(http):
    text = "x" * 32 * 40  # 40 contexts x 0.1 s in the fake evaluator
    job_id = http.post("/v1/stitch", json={"small": 64, "large": 128, "text": text}).json()["job_id"]
    end = time.monotonic() + 30
    while (j := http.get(f"/v1/jobs/{job_id}").json())["progress"] < 0.2:
        assert time.monotonic() < end and j["status"] in ("queued", "running"), j
        time.sleep(0.05)
    assert http.delete(f"/v1/jobs/{job_id}").status_code == 200
    j = wait_job(http, job_id, timeout=5)
    assert j["status"] == "cancelled" and 0.2 <= j["progress"] < 0.9 and j["result"] is None


def test_cancel_a_queued_job(http):
    first = http.post("/v1/stitch", json={"small": 64, "large": 128, "text": "y" * 32 * 30}).json()["job_id"]
    second = http.post("/v1/stitch", json={"small": 64, "large": 128, "text": "z" * 64}).json()["job_id"]
    assert http.get(f"/v1/jobs/{second}").json()["status"] == "queued"  # one worker: it waits for the first
    j = http.delete(f"/v1/jobs/{second}").json()
    assert j["status"] == "cancelled" and j["progress"] == 0
    http.delete(f"/v1/jobs/{first}")
    assert wait_job(http, first)["status"] == "cancelled"
    assert wait_job(http, second)["status"] == "cancelled"


def test_out_of_gpu_memory_in_a_job_fails_it_and_the_service_lives_on(http):
    j = wait_job(http, http.post("/v1/stitch", json={"small": 64, "large": 128,
                                                     "text": "OOM " * 20}).json()["job_id"])
    assert j["status"] == "failed" and j["message"].startswith("out of memory while running stitch job")
    assert "retry" in j["message"]
    j = wait_job(http, http.post("/v1/stitch", json={"small": 64, "large": 128, "text": "fine " * 10}).json()["job_id"])
    assert j["status"] == "done" and j["result"]["fake"] is True
