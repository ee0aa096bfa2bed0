"""Every route of a real `metasae backend` process (uvicorn on loopback), its values checked against the library
computed directly in this process, and every kind of bad input answered with a 4xx naming the field."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest
import torch
from test_hostile import STRICT

from metasae.atlas import Atlas
from metasae.corpus import build_contexts
from metasae.distributed import build_settings, stitch_eval
from metasae.lm import tiny_model
from metasae.meta import decompose
from metasae.sae import Sae

HOOK = "blocks.2.hook_resid_pre"
TEXT = "Albert Einstein was a German-born theoretical physicist who developed the theory of relativity."


@pytest.fixture(scope="module")
def http(main_server):
    with httpx.Client(base_url=main_server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def ref(tiny_atlas):
    """The same model, SAEs and meta-SAE, loaded here without the backend."""
    atlas = Atlas.open(tiny_atlas)
    assert atlas.manifest.model.source == "tiny:llama:0" and atlas.manifest.model.hook == HOOK
    return {"atlas": atlas, "lm": tiny_model("llama", seed=0), "meta": Sae.load(atlas.meta_sae_path()),
            "sae": {w: Sae.load(atlas.sae_path(w)) for w in atlas.widths}}


def wait_job(http, job_id: str, timeout: float = 120) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        j = http.get(f"/v1/jobs/{job_id}").json()
        if j["status"] in ("done", "failed", "cancelled"):
            return j
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s: {j}")


def test_health_reports_ready_device_and_model(http):
    h = http.get("/health").json()
    assert h["status"] == "ready" and h["device"] == "cpu" and h["model"] == "tiny-llama-0"
    assert h["auth"] is False and h["atlas_error"] is None


def test_openapi_docs_list_every_route(http):
    spec = http.get("/openapi.json").json()
    assert {"/health", "/v1/encode", "/v1/activations", "/v1/stitch", "/v1/jobs/{job_id}"} <= set(spec["paths"])
    assert set(spec["paths"]["/v1/jobs/{job_id}"]) == {"get", "delete"}
    assert "swagger" in http.get("/docs").text.lower()


@pytest.mark.parametrize(("width", "latent"), [(64, 0), (128, 77), (256, 255)])
def test_encode_latent_equals_direct_decompose(http, ref, width, latent):
    r = http.post("/v1/encode", json={"width": width, "latent": latent})
    assert r.status_code == 200, r.text
    body = r.json()
    row = ref["sae"][width].W_dec[latent]
    w, i = decompose(ref["meta"], row)
    keep = w[0] > 0
    assert [m["id"] for m in body["meta_latents"]] == i[0][keep].tolist()
    np.testing.assert_allclose([m["weight"] for m in body["meta_latents"]], w[0][keep].numpy(), rtol=1e-5)
    recon = ref["meta"].reconstruct(row[None])[0]
    assert body["fvu"] == pytest.approx(float(((row - recon) ** 2).sum() / (row**2).sum()), rel=1e-5)
    labels = {m: ref["atlas"].meta_latent(m)["label"] for m in i[0][keep].tolist()}
    assert [m["label"] for m in body["meta_latents"]] == [labels[m["id"]] for m in body["meta_latents"]]
    assert body["d_model"] == 32


def test_encode_vector_equals_direct_decompose(http, ref):
    v = torch.randn(32, generator=torch.Generator().manual_seed(1))
    body = http.post("/v1/encode", json={"vector": v.tolist()}).json()
    w, i = decompose(ref["meta"], v)
    keep = w[0] > 0
    assert [m["id"] for m in body["meta_latents"]] == i[0][keep].tolist()
    np.testing.assert_allclose([m["weight"] for m in body["meta_latents"]], w[0][keep].numpy(), rtol=1e-5)
    # a decoder row sent as a vector answers exactly what the (width, latent) form answers
    row = ref["sae"][128].W_dec[5].tolist()
    assert http.post("/v1/encode", json={"vector": row}).json() == \
        http.post("/v1/encode", json={"width": 128, "latent": 5}).json()


def test_activations_equal_direct_encoding(http, ref):
    r = http.post("/v1/activations", json={"text": TEXT, "width": 128, "top_k": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = list(TEXT.encode())
    assert body["token_ids"] == ids and "".join(body["tokens"]) == TEXT and len(body["top"]) == len(ids)
    acts = ref["sae"][128].encode(ref["lm"].resid(torch.tensor([ids]), HOOK)[0])
    vals, idx = acts.topk(4, dim=-1)
    labels = ref["atlas"].latents_table(128, ["latent", "label"]).set_index("latent").label
    n_active = 0
    for t, top in enumerate(body["top"]):
        keep = vals[t] > 0
        assert [x["latent"] for x in top] == idx[t][keep].tolist()
        np.testing.assert_allclose([x["activation"] for x in top], vals[t][keep].numpy(), rtol=1e-4, atol=1e-6)
        assert [x["label"] for x in top] == [labels[x["latent"]] for x in top]
        n_active += len(top)
    assert n_active > len(ids)  # the SAE fires: the comparison above is not vacuous


def _check_stitch(result: dict, direct: dict, metrics: tuple[str, ...]) -> None:
    assert result["n_tokens"] == direct["n_tokens"]
    assert result["kind"] == direct["kind"] and result["group_id"] == direct["group_id"]
    np.testing.assert_allclose(result["delta_mse"], direct["delta_mse"], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(result["group_delta_mse"], direct["group_delta_mse"], rtol=1e-5, atol=1e-9)
    if "ce" in metrics:
        np.testing.assert_allclose(result["delta_ce_attr"], direct["delta_ce_attr"], rtol=1e-5, atol=1e-9)
        ce = [(a["ce_loss"], b["ce_loss"]) for a, b in zip(result["curve"], direct["curve"], strict=True)]
        assert sum(a is not None for a, _ in ce) >= 2
        assert all((a is None) == (b is None) and (a is None or a == pytest.approx(b, rel=1e-5)) for a, b in ce)
    else:
        assert "delta_ce_attr" not in result
    np.testing.assert_allclose([c["mse"] for c in result["curve"]], [c["mse"] for c in direct["curve"]], rtol=1e-5)


def test_stitch_on_text_equals_stitch_eval(http, ref):
    text = (TEXT + " ") * 8  # 776 bytes -> 24 contexts of the atlas's ctx_len 32 (the ragged tail dropped)
    r = http.post("/v1/stitch", json={"small": 64, "large": 128, "text": text, "metrics": ["mse", "ce"]})
    assert r.status_code == 202, r.text
    job = wait_job(http, r.json()["job_id"])
    assert job["status"] == "done", job["message"]
    assert job["progress"] == 1.0 and job["request"]["text"] == f"<{len(text)} characters>"
    res = job["result"]
    ids = list(text.encode())
    tokens = torch.tensor(ids[: len(ids) // 32 * 32]).view(-1, 32)
    direct = stitch_eval(ref["lm"], HOOK, tokens, ref["sae"][64], ref["sae"][128], metrics=("mse", "ce"),
                         threshold=0.7, **build_settings(ref["atlas"].manifest))
    assert res["n_tokens"] == 24 * 31  # position 0 of every context is skipped
    assert res["small"] == 64 and res["large"] == 128 and res["threshold"] == 0.7 and res["device"] == "cpu"
    assert res["tokens_per_s"] > 0
    _check_stitch(res, direct, ("mse", "ce"))


def test_stitch_on_corpus_tokens_equals_stitch_eval(http, ref, tiny_atlas):
    r = http.post("/v1/stitch", json={"small": 128, "large": 256, "n_tokens": 1024, "metrics": ["mse"],
                                      "threshold": 0.6, "seed": 3})
    job = wait_job(http, r.json()["job_id"])
    assert job["status"] == "done", job["message"]
    tokens = build_contexts(["wiki"], ref["lm"].tokenizer, 32, 1024, seed=3)
    direct = stitch_eval(ref["lm"], HOOK, tokens, ref["sae"][128], ref["sae"][256], metrics=("mse",),
                         threshold=0.6, **build_settings(ref["atlas"].manifest))
    assert job["result"]["threshold"] == 0.6
    _check_stitch(job["result"], direct, ("mse",))


def test_cancel_a_real_job_midway(http):
    r = http.post("/v1/stitch", json={"small": 64, "large": 128, "n_tokens": 200_000})
    job_id = r.json()["job_id"]
    end = time.monotonic() + 60
    while (j := http.get(f"/v1/jobs/{job_id}").json())["progress"] < 0.08:
        assert j["status"] in ("queued", "running") and time.monotonic() < end, j
        time.sleep(0.05)
    assert j["status"] == "running"
    d = http.delete(f"/v1/jobs/{job_id}")
    assert d.status_code == 200 and d.json()["status"] in ("running", "cancelled")
    t = time.monotonic()
    j = wait_job(http, job_id, timeout=30)
    assert j["status"] == "cancelled" and 0.08 <= j["progress"] < 0.6 and j["result"] is None
    assert time.monotonic() - t < 10  # stopped at the next batch, not at the end
    assert http.delete(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"  # cancelling again is harmless
    listed = {x["id"]: x for x in http.get("/v1/jobs").json()}
    assert listed[job_id]["status"] == "cancelled"
    # the service goes on: the next job runs to the end
    r = http.post("/v1/stitch", json={"small": 64, "large": 128, "text": TEXT * 2, "metrics": ["mse"]})
    assert wait_job(http, r.json()["job_id"])["status"] == "done"


def test_a_job_on_too_short_text_fails_with_a_message(http):
    j = wait_job(http, http.post("/v1/stitch", json={"small": 64, "large": 128, "text": "a"}).json()["job_id"])
    assert j["status"] == "failed" and j["message"].startswith("text: gives 1 token")


def test_unknown_job_is_404_naming_job_id(http):
    for method in ("GET", "DELETE"):
        r = http.request(method, "/v1/jobs/" + "0" * 32)
        assert r.status_code == 404 and r.json()["detail"].startswith("job_id: no job")
        r = http.request(method, "/v1/jobs/nope")  # not a job id at all: the schema's pattern refuses it
        assert r.status_code == 422 and r.json()["detail"].startswith("job_id: String should match pattern")


V = [0.1] * 32
BAD = [
    # (path, raw JSON body, status, field the message must start with)
    ("/v1/encode", '{"vector": [NaN' + ", 0.1" * 31 + "]}", 422, "vector[0]"),
    ("/v1/encode", '{"vector": [0.1, Infinity' + ", 0.1" * 30 + "]}", 422, "vector[1]"),
    ("/v1/encode", '{"vector": [0.1, -Infinity' + ", 0.1" * 30 + "]}", 422, "vector[1]"),
    ("/v1/encode", '{"vector": [1e400' + ", 0.1" * 31 + "]}", 422, "vector[0]"),
    ("/v1/encode", '{"vector": [1e39' + ", 0.1" * 31 + "]}", 422, "vector"),
    ("/v1/encode", json.dumps({"vector": [0.1] * 31}), 422, "vector"),
    ("/v1/encode", json.dumps({"vector": [0.1] * 33}), 422, "vector"),
    ("/v1/encode", json.dumps({"vector": []}), 422, "vector"),
    ("/v1/encode", json.dumps({"vector": ["a"] * 32}), 422, "vector[0]"),
    ("/v1/encode", json.dumps({"width": 100, "latent": 0}), 422, "width"),
    ("/v1/encode", json.dumps({"width": 64, "latent": 64}), 422, "latent"),
    ("/v1/encode", json.dumps({"width": 64, "latent": -1}), 422, "latent"),
    ("/v1/encode", json.dumps({"width": 64}), 422, "latent"),
    ("/v1/encode", json.dumps({"latent": 3}), 422, "width"),
    ("/v1/encode", json.dumps({"width": "64", "latent": 0}), 422, "width"),
    ("/v1/encode", json.dumps({"width": 64.5, "latent": 0}), 422, "width"),
    ("/v1/encode", json.dumps({"width": 64, "latent": 0, "vector": V}), 422, "vector"),
    ("/v1/encode", json.dumps({}), 422, "vector"),
    ("/v1/encode", json.dumps({"width": 64, "latent": 0, "colour": 1}), 422, "colour"),
    ("/v1/encode", '{"width": 64', 422, "body"),
    ("/v1/encode", "[1, 2]", 422, "body"),
    ("/v1/activations", json.dumps({"text": "", "width": 64}), 422, "text"),
    ("/v1/activations", json.dumps({"width": 64}), 422, "text"),
    ("/v1/activations", json.dumps({"text": "x" * 20_001, "width": 64}), 422, "text"),
    ("/v1/activations", json.dumps({"text": "x" * 3000, "width": 64}), 413, "text"),
    ("/v1/activations", json.dumps({"text": "hi", "width": 100}), 422, "width"),
    ("/v1/activations", json.dumps({"text": "hi", "width": 64, "top_k": 0}), 422, "top_k"),
    ("/v1/activations", json.dumps({"text": "hi", "width": 64, "top_k": 65}), 422, "top_k"),
    ("/v1/stitch", json.dumps({"small": 64, "large": 128}), 422, "text"),
    ("/v1/stitch", json.dumps({"small": 64, "large": 128, "text": "hello", "n_tokens": 64}), 422, "text"),
    ("/v1/stitch", json.dumps({"small": 64, "large": 128, "text": ""}), 422, "text"),
    ("/v1/stitch", json.dumps({"small": 64, "large": 128, "text": "   \n "}), 422, "text"),
    ("/v1/stitch", json.dumps({"small": 64, "large": 128, "text": "x" * 20_001}), 422, "text"),
    ("/v1/stitch", json.dumps({"small": 100, "large": 128, "n_tokens": 64}), 422, "small"),
    ("/v1/stitch", json.dumps({"small": 64, "large": 100, "n_tokens": 64}), 422, "large"),
    ("/v1/stitch", json.dumps({"small": 128, "large": 64, "n_tokens": 64}), 422, "large"),
    ("/v1/stitch", json.dumps({"small": 64, "large": 64, "n_tokens": 64}), 422, "large"),
    ("/v1/stitch", json.dumps({"small": 64, "large": 128, "n_tokens": 0}), 422, "n_tokens"),
    ("/v1/stitch", json.dumps({"small": 64, "large": 128, "n_tokens": 10}), 422, "n_tokens"),
    ("/v1/stitch", json.dumps({"small": 64, "large": 128, "n_tokens": 10**9}), 422, "n_tokens"),
    ("/v1/stitch", json.dumps({"small": 64, "large": 128, "n_tokens": 64, "metrics": ["kl"]}), 422, "metrics[0]"),
    ("/v1/stitch", json.dumps({"small": 64, "large": 128, "n_tokens": 64, "metrics": []}), 422, "metrics"),
    ("/v1/stitch", json.dumps({"small": 64, "large": 128, "n_tokens": 64, "metrics": ["ce", "ce"]}), 422,
     "metrics"),
    ("/v1/stitch", json.dumps({"small": 64, "large": 128, "n_tokens": 64, "threshold": 1.5}), 422, "threshold"),
    ("/v1/stitch", '{"small": 64, "large": 128, "n_tokens": 64, "threshold": NaN}', 422, "threshold"),
]


@pytest.mark.parametrize(("path", "raw", "status", "field"), BAD,
                         ids=[f"{p.rsplit('/', 1)[1]}-{i}-{f}" for i, (p, _r, _s, f) in enumerate(BAD)])
def test_bad_input_is_4xx_naming_the_field(http, path, raw, status, field):
    r = http.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert detail.startswith(field), detail


@pytest.mark.parametrize(("path", "body", "field"), STRICT,
                         ids=[f"{p.rsplit('/', 1)[1]}-{i}-{f}" for i, (p, _b, f) in enumerate(STRICT)])
def test_strings_and_booleans_are_not_numbers_on_a_real_server(http, path, body, field):
    r = http.post(path, json=body)
    assert r.status_code == 422 and r.json()["detail"].startswith(f"{field}: "), r.text


def test_body_over_the_limit_is_413(http):
    big = json.dumps({"vector": [0.123456789] * 100_000})  # ~1.3 MB > METASAE_MAX_BODY_BYTES (1 MB)
    r = http.post("/v1/encode", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["detail"].startswith("body")

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        for _ in range(20):
            yield b" " * 100_000

    r = http.post("/v1/encode", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["detail"].startswith("body")
    assert http.post("/v1/encode", json={"width": 64, "latent": 1}).status_code == 200  # and it goes on


def test_unknown_routes_and_methods(http):
    assert http.get("/v1/nothing").status_code == 404
    assert http.get("/v1/encode").status_code == 405
