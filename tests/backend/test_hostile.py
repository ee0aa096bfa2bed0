"""Hostile inputs to the backend (issue 14): a blank token, bad weights, a model that wants custom code, foreign
Host headers, docs and /health with a token, strict JSON types, and a Content-Length with no body behind it.

Most run in process (TestClient on the tiny atlas); the Content-Length case needs a real uvicorn server."""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from metasae.atlas import write_manifest
from metasae.backend.app import create_app
from metasae.backend.config import Settings
from metasae.backend.resources import Resources

LOCAL = "http://127.0.0.1"


def client(atlas: Path, raise_server_exceptions: bool = True, **settings) -> TestClient:
    s = Settings.from_env(atlas=str(atlas), idle_timeout_s=0, **settings)
    res = Resources(s, device="cpu")
    res.open_atlas()
    return TestClient(create_app(s, res, background=False), base_url=LOCAL,
                      raise_server_exceptions=raise_server_exceptions)


@pytest.fixture
def atlas_copy(tiny_atlas, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_atlas, tmp_path / "atlas"))


def resign(atlas: Path, edit=None) -> None:
    m = json.loads((atlas / "manifest.json").read_text())
    if edit:
        edit(m)
    write_manifest(atlas, m)


# -- 1. a token that is set but blank


@pytest.mark.parametrize("blank", ["", " ", "   \t\n"])
def test_a_blank_token_is_an_error_at_start(monkeypatch, tiny_atlas, capsys, blank):
    from metasae.cli import main

    monkeypatch.setenv("METASAE_TOKEN", blank)
    with pytest.raises(ValueError, match="METASAE_TOKEN is set but empty"):
        Settings.from_env()
    assert main(["backend", "--atlas", str(tiny_atlas), "--port", "0"]) == 2
    assert "METASAE_TOKEN is set but empty" in capsys.readouterr().err
    with pytest.raises(ValueError, match="token is set but empty"):
        Settings.from_values(token=blank)


# -- 3. weights that pass an old verify but cannot be served


def _damage(path: Path, how: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    if how == "nan":
        t = load_file(path)
        t["W_dec"][0, 0] = float("nan")
        save_file(t, path)
    elif how == "pickle":
        torch.save({"W_dec": torch.zeros(2)}, path)
    elif how == "header_2_40":
        raw = path.read_bytes()
        path.write_bytes((1 << 40).to_bytes(8, "little") + raw[8:])
    elif how == "wrong_shape":
        t = load_file(path)
        t["W_enc"] = t["W_enc"][:, :5].contiguous()
        save_file(t, path)


@pytest.mark.parametrize(("how", "needle"), [("nan", "NaN/inf"), ("pickle", "pickle"),
                                             ("header_2_40", "header of 1099511627776 bytes"),
                                             ("wrong_shape", "'W_enc' has shape")])
def test_bad_weights_found_at_start_make_every_route_a_503_with_the_reason(atlas_copy, how, needle):
    _damage(atlas_copy / "saes/128/sae_weights.safetensors", how)
    resign(atlas_copy)  # the checksums agree: only the weight checks can tell
    with client(atlas_copy) as c:
        h = c.get("/health")
        assert h.status_code == 503 and "saes/128/sae_weights.safetensors" in h.json()["atlas_error"]
        assert needle in h.json()["atlas_error"]
        r = c.post("/v1/encode", json={"width": 64, "latent": 0})
        assert r.status_code == 503 and "could not be opened" in r.json()["detail"] and needle in r.json()["detail"]


@pytest.mark.parametrize(("how", "needle"), [("nan", "NaN/inf"), ("pickle", "pickle"),
                                             ("header_2_40", "header of 1099511627776 bytes"),
                                             ("wrong_shape", "'W_enc' has shape")])
def test_weights_damaged_while_serving_are_a_503_naming_the_width(atlas_copy, how, needle):
    with client(atlas_copy) as c:
        assert c.post("/v1/encode", json={"width": 64, "latent": 0}).status_code == 200
        _damage(atlas_copy / "saes/128/sae_weights.safetensors", how)
        r = c.post("/v1/encode", json={"width": 128, "latent": 0})
        assert r.status_code == 503, r.text
        assert r.json()["detail"].startswith("width: the SAE of width 128 cannot be loaded") and needle in r.text
        r = c.post("/v1/activations", json={"text": "hi", "width": 128})
        assert r.status_code == 503 and r.json()["detail"].startswith("width: the SAE of width 128")
        assert c.post("/v1/encode", json={"width": 64, "latent": 1}).status_code == 200  # the rest lives on


def test_a_damaged_meta_sae_is_a_503_naming_it(atlas_copy):
    with client(atlas_copy) as c:
        _damage(atlas_copy / "meta_sae/sae_weights.safetensors", "pickle")
        r = c.post("/v1/encode", json={"vector": [0.5] * 32})
        assert r.status_code == 503 and r.json()["detail"].startswith("meta_sae: the atlas's meta-SAE cannot be")


def test_a_model_that_asks_for_custom_code_is_a_503_not_run(atlas_copy, tmp_path):
    model = tmp_path / "custom-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "evil", "architectures": ["Evil"],
                                                   "auto_map": {"AutoModelForCausalLM": "evil.Evil"}}))
    (model / "evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('code ran')\n")
    resign(atlas_copy, lambda m: m["model"].update(source=str(model)))
    with client(atlas_copy) as c:
        r = c.post("/v1/activations", json={"text": "hi", "width": 64})
        assert r.status_code == 503, r.text
        assert r.json()["detail"].startswith("model: the atlas's language model") and "trust_remote_code" in r.text
        assert c.post("/v1/encode", json={"width": 64, "latent": 0}).status_code == 200  # needs no model
    assert not (tmp_path / "ran").exists()


def test_an_unexpected_failure_is_a_json_500_that_says_what(atlas_copy, monkeypatch):
    with client(atlas_copy, raise_server_exceptions=False) as c:
        monkeypatch.setattr(Resources, "meta_labels", lambda self: 1 / 0)
        r = c.post("/v1/encode", json={"width": 64, "latent": 0})
        assert r.status_code == 500 and r.json()["detail"].startswith("internal error: ZeroDivisionError")


# -- 5. Host header (DNS rebinding), /health and the docs with a token


@pytest.mark.parametrize(("host", "settings", "status"), [
    ("evil.example", {}, 400),
    ("evil.example:8000", {}, 400),
    ("127.0.0.1:8000", {}, 200),
    ("localhost:8000", {}, 200),
    ("[::1]:8000", {}, 200),
    ("10.1.2.3", {}, 200),  # an IP literal cannot be re-pointed by DNS
    ("gpu.example", {"allowed_hosts": ("gpu.example",)}, 200),
    ("evil.example", {"allowed_hosts": ("gpu.example",), "token": "t"}, 400),  # a list is enforced with a token too
    ("evil.example", {"token": "t"}, 200),  # with a token and no list: any name (the token protects the routes)
    ("evil.example", {"allowed_hosts": ("*",)}, 200),
])
def test_host_header_is_checked(tiny_atlas, host, settings, status):
    with client(tiny_atlas, **settings) as c:
        r = c.get("/health", headers={"Host": host})
        assert r.status_code == status, r.text
        if status == 400:
            assert r.json()["detail"].startswith("Host: ")


def test_allowed_hosts_from_the_environment(monkeypatch, tiny_atlas):
    monkeypatch.setenv("METASAE_ALLOWED_HOSTS", "GPU.example, other.example")
    assert Settings.from_env(atlas=str(tiny_atlas)).allowed_hosts == ("gpu.example", "other.example")
    with client(tiny_atlas) as c:
        assert c.get("/health", headers={"Host": "gpu.example:9000"}).status_code == 200
        assert c.get("/health", headers={"Host": "evil.example"}).status_code == 400


def test_with_a_token_health_is_minimal_and_docs_need_the_token(tiny_atlas):
    with client(tiny_atlas, token="s3cret") as c:
        anon = c.get("/health")
        assert anon.status_code == 200 and anon.json() == {"status": "ready", "auth": True,
                                                           "version": anon.json()["version"]}
        assert str(tiny_atlas) not in anon.text and "/" not in json.dumps(anon.json()).replace("\\/", "")
        wrong = c.get("/health", headers={"Authorization": "Bearer nope"}).json()
        assert set(wrong) == {"status", "auth", "version"}
        full = c.get("/health", headers={"Authorization": "Bearer s3cret"}).json()
        assert full["atlas"] == str(tiny_atlas) and full["model"] == "tiny-llama-0"
        for path in ("/openapi.json", "/docs", "/redoc"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["detail"].startswith("Authorization")
            assert c.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    with client(tiny_atlas, token="s3cret", public_docs=True) as c:
        assert c.get("/openapi.json").status_code == 200 and c.get("/docs").status_code == 200
    with client(tiny_atlas) as c:  # no token: the full report and the docs for anyone on loopback
        assert c.get("/health").json()["atlas"] == str(tiny_atlas) and c.get("/openapi.json").status_code == 200


# -- 7. strict JSON types (no "1_000" or true taken as numbers)


STRICT = [
    ("/v1/encode", {"vector": ["1_000"] + [0.1] * 31}, "vector[0]"),
    ("/v1/encode", {"vector": [True] + [0.1] * 31}, "vector[0]"),
    ("/v1/encode", {"vector": [0.1] * 31 + ["0.5"]}, "vector[31]"),
    ("/v1/encode", {"vector": [0.1] * 31 + [None]}, "vector[31]"),
    ("/v1/encode", {"width": True, "latent": 0}, "width"),
    ("/v1/encode", {"width": 64, "latent": True}, "latent"),
    ("/v1/encode", {"width": 64, "latent": "3"}, "latent"),
    ("/v1/encode", {"width": 64, "latent": 3, "max_terms": "4"}, "max_terms"),
    ("/v1/activations", {"text": "hi", "width": 64, "top_k": "5"}, "top_k"),
    ("/v1/activations", {"text": 123, "width": 64}, "text"),
    ("/v1/stitch", {"small": 64, "large": 128, "n_tokens": "64"}, "n_tokens"),
    ("/v1/stitch", {"small": 64, "large": 128, "n_tokens": 64, "threshold": "0.5"}, "threshold"),
    ("/v1/stitch", {"small": 64, "large": 128, "n_tokens": 64, "seed": True}, "seed"),
]


@pytest.mark.parametrize(("path", "body", "field"), STRICT, ids=[f"{p}-{f}-{i}" for i, (p, _b, f) in enumerate(STRICT)])
def test_strings_and_booleans_are_not_numbers(tiny_atlas, path, body, field):
    with client(tiny_atlas) as c:
        r = c.post(path, json=body)
        assert r.status_code == 422, r.text
        assert r.json()["detail"].startswith(f"{field}: "), r.json()["detail"]


# -- 8. a Content-Length with nothing behind it, on a real server


def _raw(url: str, request: bytes, timeout: float = 10.0) -> tuple[bytes, float]:
    host, port = url.removeprefix("http://").split(":")
    t = time.perf_counter()
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data, time.perf_counter() - t


@pytest.mark.parametrize("length", [10**14, 2 * 10**6])
def test_a_huge_content_length_without_a_body_is_answered_413_at_once(main_server, length):
    head = (f"POST /v1/encode HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()
    data, seconds = _raw(main_server.url, head)
    assert data.startswith(b"HTTP/1.1 413"), data[:200]
    assert b'"detail":"body: larger than the limit' in data and seconds < 2.0, seconds
    # and the server goes on
    data, _ = _raw(main_server.url, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200")
