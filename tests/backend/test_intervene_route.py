"""POST /v1/intervene in process, on a synthetic atlas served with the tiny Llama (d_model 32), against a
brute-force hook: a whole-model forward whose pre-hook edits the residual with the formula written out here."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from metasae.atlas import Atlas, read_manifest, write_manifest
from metasae.backend.app import create_app
from metasae.backend.config import Settings
from metasae.backend.resources import Resources
from metasae.lm import _decoder_layers, tiny_model
from metasae.sae import Sae
from metasae.synthetic_atlas import make_synthetic_atlas

WIDTH, L, LAYER = 64, 3, 1
HOOK = f"blocks.{LAYER}.hook_resid_pre"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def atlas_dir(tmp_path_factory):
    """A synthetic atlas whose manifest names the tiny Llama; latent L of width 64 made to fire strongly."""
    out = make_synthetic_atlas(tmp_path_factory.mktemp("intervene") / "atlas", widths=(64, 128, 256))
    path = Atlas.open(out).sae_path(WIDTH)
    sae = Sae.load(path)
    sae.b_enc[L] = 2.0
    sae.save(path)
    manifest, _ = read_manifest(out)
    manifest["model"] = {"name": "tiny-llama-0", "source": "tiny:llama:0", "hook": HOOK, "d_model": 32}
    write_manifest(out, manifest)
    return out


@pytest.fixture(scope="module")
def client(atlas_dir):
    settings = Settings.from_env(atlas=str(atlas_dir), idle_timeout_s=0, max_tokens=64)
    res = Resources(settings, device="cpu")
    res.open_atlas()
    with TestClient(create_app(settings, res, background=False), base_url="http://127.0.0.1") as c:
        yield c


@pytest.fixture(scope="module")
def ref(atlas_dir):
    a = Atlas.open(atlas_dir)
    return tiny_model("llama", seed=0), Sae.load(a.sae_path(WIDTH)), Sae.load(a.meta_sae_path())


def hooked_logp(lm, ids: list[int], edit) -> torch.Tensor:
    def pre(_mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        y = edit(x[0].clone())[None]
        return ((y, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": y})

    h = _decoder_layers(lm.model)[LAYER].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            return torch.log_softmax(lm.model(torch.tensor([ids])).logits[0, -1].float(), -1)
    finally:
        h.remove()


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p.exp() * (p - q)).sum())


def test_the_route_matches_a_brute_force_hook(client, ref):
    lm, sae, meta = ref
    ids = list(PROMPT.encode())
    d = sae.W_dec[L]
    u = d / d.norm()
    w = torch.relu(u @ meta.W_enc + meta.b_enc)  # StandardSAE meta-SAE: plain ReLU
    m = int(w.argmax())
    body = {"prompt": PROMPT, "width": WIDTH, "latent": L, "targets": [" Paris", "x"], "top_k": 3,
            "edits": [{"kind": "ablate"}, {"kind": "meta", "meta_scales": [{"meta_latent": m, "scale": 0.0}]},
                      {"kind": "steer", "steer_meta": m, "coef": 3.0}]}
    r = client.post("/v1/intervene", json=body)
    assert r.status_code == 200, r.text
    out = r.json()

    def a_L(x):
        return torch.relu(x @ sae.W_enc + sae.b_enc)[:, L]

    def ablate(x):
        x[1:] -= a_L(x)[1:, None] * d
        return x

    def remove(x):
        x[1:] -= a_L(x)[1:, None] * d.norm() * w[m] * meta.W_dec[m]
        return x

    def steer(x):
        x[1:] += 3.0 * meta.W_dec[m] / meta.W_dec[m].norm()
        return x

    clean = hooked_logp(lm, ids, lambda x: x)
    assert [t["id"] for t in out["clean"]["top"]] == clean.topk(3).indices.tolist()
    assert out["token_ids"] == ids and out["targets"][0]["id"] == ord(" ")
    for e, fn in zip(out["edits"], (ablate, remove, steer), strict=True):
        edited = hooked_logp(lm, ids, fn)
        assert e["kl"] == pytest.approx(kl(clean, edited), rel=1e-3, abs=1e-7) and e["kl"] > 0
        assert [t["id"] for t in e["top"]] == edited.topk(3).indices.tolist()
        assert e["targets"][1]["delta"] == pytest.approx(float(edited[ord("x")] - clean[ord("x")]), abs=1e-4)
        assert e["n_positions"] == len(ids) - 1
    assert [x["meta_latent"] for x in out["edits"][1]["decomposition"]] == torch.nonzero(w > 0).flatten().tolist()


def test_a_continuation_is_returned_when_asked(client):
    r = client.post("/v1/intervene", json={"prompt": "ab", "width": WIDTH, "latent": L, "max_new_tokens": 3,
                                           "edits": [{"kind": "ablate"}]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert isinstance(out["clean"]["continuation"], str) and isinstance(out["edits"][0]["continuation"], str)


@pytest.mark.parametrize("change, status, field", [
    ({"latent": 64}, 422, "latent"),
    ({"width": 65}, 422, "width"),
    ({"prompt": "x" * 65}, 413, "prompt"),
    ({"prompt": "a"}, 422, "prompt"),
    ({"targets": [""]}, 422, "targets[0]"),
    ({"edits": []}, 422, "edits"),
    ({"edits": [{"kind": "rotate"}]}, 422, "edits[0].kind"),
    ({"edits": [{"kind": "meta"}]}, 422, "edits[0].meta_scales"),
    ({"edits": [{"kind": "meta", "meta_scales": [{"meta_latent": 99, "scale": 0}]}]}, 422, "edits[0].meta_scales"),
    ({"edits": [{"kind": "steer", "steer_meta": 32}]}, 422, "edits[0].steer_meta"),
    ({"edits": [{"kind": "steer", "coef": "1"}]}, 422, "edits[0].coef"),
    ({"edits": [{"kind": "ablate"}] * 5}, 422, "edits"),
    ({"positions": "some"}, 422, "positions"),
    ({"max_new_tokens": 33}, 422, "max_new_tokens"),
    ({"colour": 1}, 422, "colour"),
])
def test_bad_input_is_a_4xx_naming_the_field(client, change, status, field):
    body = {"prompt": PROMPT, "width": WIDTH, "latent": L, "edits": [{"kind": "ablate"}]} | change
    r = client.post("/v1/intervene", json=body)
    assert r.status_code == status, r.text
    assert r.json()["detail"].startswith(f"{field}: "), r.json()["detail"]


def test_the_contract_lists_the_route_with_the_atlas_widths(client):
    spec = client.get("/openapi.json").json()
    assert "/v1/intervene" in spec["paths"]
    assert spec["components"]["schemas"]["InterveneRequest"]["properties"]["width"]["enum"] == [64, 128, 256]
    r = client.options("/v1/intervene")
    assert r.status_code == 204 and r.headers["allow"] == "OPTIONS, POST"
    r = client.get("/v1/intervene")
    assert r.status_code == 405 and r.json()["detail"].startswith("method: ")


def test_the_http_client_answers_what_the_route_answers(client):
    from metasae.backend.client import BackendError, HttpBackend
    from metasae.intervene import via_backend

    be = HttpBackend("http://127.0.0.1")
    be._http = client  # the in-process app behind the real client's parsing
    body = {"prompt": PROMPT, "width": WIDTH, "latent": L, "targets": [" Paris"], "top_k": 3,
            "edits": [{"kind": "ablate"}]}
    assert via_backend(be, body) == client.post("/v1/intervene", json=body).json()
    with pytest.raises(BackendError, match="latent"):
        be.intervene(**{**body, "latent": 64})
