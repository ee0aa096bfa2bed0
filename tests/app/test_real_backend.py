"""The Live and Stitching pages through a REAL `metasae backend` process (no fake): what the page shows must be
what the backend answers when asked directly.

The backend serves the tiny atlas (`metasae build --preset tiny`, ~15 s; set METASAE_TEST_ATLAS to a
tiny-preset atlas folder to reuse one) and the app reaches it through METASAE_BACKEND_URL + METASAE_TOKEN, i.e.
through `metasae.backend.client.get_backend`, as it would reach a GPU service.
"""

from __future__ import annotations

import base64
import json
import math
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from app_helpers import texts
from scipy.stats import spearmanr

from metasae.atlas import Atlas
from metasae.backend.client import LocalBackendProcess
from metasae.views.badges import DENSE
from metasae.views.live import LIVE_TOP_K

TEXT = "Albert Einstein was a German-born theoretical physicist."


def plotly_array(value) -> np.ndarray:
    """A plotly JSON array: a nested list, or plotly 6+'s typed-array form {dtype, bdata, shape}."""
    if isinstance(value, dict):
        shape = [int(n) for n in str(value.get("shape", "-1")).split(",")]
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"])).reshape(shape)
    return np.asarray(value, dtype=float)


@pytest.fixture(scope="module")
def real_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, LocalBackendProcess]]:
    """(tiny atlas, a `metasae backend` process serving it with a token), stopped after the module."""
    given = os.environ.get("METASAE_TEST_ATLAS")
    if given:
        atlas = Path(given)
        assert (atlas / "manifest.json").is_file(), f"METASAE_TEST_ATLAS={given} is not an atlas"
    else:
        from metasae.cli import main

        root = tmp_path_factory.mktemp("real-backend-atlas")
        atlas = root / "atlas"
        assert main(["build", "--preset", "tiny", "--out", str(atlas), "--work", str(root / "work"), "--quiet"]) == 0
    proc = LocalBackendProcess(atlas, token=secrets.token_urlsafe(16),
                               env={"OMP_NUM_THREADS": "1", "METASAE_TORCH_THREADS": "1",
                                    "METASAE_IDLE_TIMEOUT_S": "0"},
                               log_path=tmp_path_factory.mktemp("real-backend-log") / "backend.log")
    try:
        health = proc.wait_ready(120, status=("ready",))
        assert health["model"] == Atlas.open(atlas).model_name  # else the pages would refuse it
        yield atlas, proc
    finally:
        proc.stop()
    assert proc.proc.returncode is not None


@pytest.fixture
def page(real_backend, monkeypatch: pytest.MonkeyPatch, run_page):
    """page(name, **query_params) -> the AppTest after one run, with the app pointed at the real backend."""
    import metasae.ui as ui

    atlas, proc = real_backend
    monkeypatch.setenv("METASAE_BACKEND_URL", proc.url)
    monkeypatch.setenv("METASAE_TOKEN", proc.token)
    ui._backend.clear()  # a backend (or a fake) cached by an earlier test must not answer here
    ui.activations.clear()
    yield lambda name, **params: run_page(atlas, name, timeout=120, **params)
    ui._backend.clear()
    ui.activations.clear()


def test_live_text_shows_the_backends_top_latents(real_backend, page):
    _, proc = real_backend
    at = page("live", text=TEXT, tw="128")
    assert at.selectbox(key="lv_tw").value == 128 and at.text_area(key="lv_text").value == TEXT
    assert not at.error and not at.warning, [m.value for m in (*at.error, *at.warning)]

    # the same question asked without the page, then filtered by hand as the page says it does: dense latents
    # (density above DENSE) and the first token hidden, each token's 5 strongest of the rest
    direct = proc.client.activations(TEXT, 128, LIVE_TOP_K)
    lat = Atlas.open(real_backend[0]).latents_table(128, ["latent", "density"])
    density = dict(zip(lat["latent"].astype(int), lat["density"].astype(float), strict=True))
    top = {}
    for pos, t in enumerate(direct["top"]):
        keep = [x for x in t if density.get(int(x["latent"]), 0.0) <= DENSE] if pos else []
        if keep:
            top[pos] = sorted(keep, key=lambda x: -float(x["activation"]))[:5]
    assert len(top) >= 10 and sum(len(t) == 5 for t in top.values()) > len(top) // 2

    shown = next(d.value for d in at.dataframe if "position" in d.value.columns)  # the per-token table
    assert {"open", "position", "token", "rank", "latent", "activation", "label"} <= set(shown.columns)
    assert list(shown["position"]) == [p for p, t in top.items() for _ in t]
    assert list(shown["rank"]) == [r for t in top.values() for r in range(len(t))]
    assert [int(x) for x in shown["latent"]] == [int(item["latent"]) for t in top.values() for item in t]
    np.testing.assert_allclose(shown["activation"].to_numpy(float),
                               [float(item["activation"]) for t in top.values() for item in t], rtol=1e-6)
    # not a degenerate answer: the tokens' top latents differ and fire
    assert len({int(t[0]["latent"]) for t in top.values()}) > 1 and float(shown["activation"].max()) > 0

    # the heatmap: tokens across, the 20 latents most active anywhere down, each cell the backend's activation
    (heat,) = [json.loads(c.proto.spec)["data"][0] for c in at.get("plotly_chart") if c.proto.id.endswith("heat")]
    assert heat["type"] == "heatmap"
    best: dict[int, float] = {}
    for t in top.values():
        for item in t:
            best[int(item["latent"])] = max(best.get(int(item["latent"]), -math.inf), float(item["activation"]))
    rows = sorted(best, key=best.get, reverse=True)[:20]
    assert [int(str(y).split(" · ")[0]) for y in heat["y"]] == rows
    n_tok = max(top) + 1  # positions 0 .. the last shown token (hidden ones stay empty columns)
    assert [str(x).split(":")[0] for x in heat["x"]] == [str(p) for p in range(n_tok)]
    expected = np.full((len(rows), n_tok), np.nan)
    for p, t in top.items():
        for item in t:
            if int(item["latent"]) in rows:
                expected[rows.index(int(item["latent"])), p] = float(item["activation"])
    np.testing.assert_allclose(plotly_array(heat["z"]), expected, rtol=1e-6, equal_nan=True)


def test_stitching_fresh_evaluation_shows_the_finished_job(real_backend, page):
    atlas_path, proc = real_backend
    text = TEXT + " " + TEXT  # ~110 byte tokens: a second or two on the tiny model
    at = page("stitching", pair="64-128")
    assert not at.error and not at.success
    at.text_area[0].input(text)
    at.button[0].click().run()  # the form's submit button ("Run evaluation")
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error and not at.warning, [m.value for m in (*at.error, *at.warning)]

    job_id = None
    end = time.monotonic() + 60
    while not at.success:  # the progress fragment polls the job on each run; a finished job reruns the page
        job = at.session_state["stitch_job"] if "stitch_job" in at.session_state else None  # noqa: SIM401
        if job:
            job_id = job_id or job["id"]
            assert job["id"] == job_id  # one job, not a new one per rerun
        assert time.monotonic() < end, f"the page did not show the result in 60 s: {texts(at)}"
        time.sleep(0.3)
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        assert not at.error, [e.value for e in at.error]
    if job_id is None:  # it finished within the click's own run
        (done,) = at.session_state["stitch_results"].values()
        job_id = done["id"]
    assert "stitch_job" not in at.session_state or not at.session_state["stitch_job"]

    state = proc.client.job(job_id)  # the finished job, fetched without the page
    assert state["status"] == "done" and state["kind"] == "stitch"
    req = state["request"]
    assert (req["small"], req["large"], req["text"]) == (64, 128, f"<{len(text)} characters>")
    assert "n_tokens" not in req and sorted(req["metrics"]) == ["ce", "mse"]
    result = state["result"]
    n_tokens = int(result["n_tokens"])
    assert 0 < n_tokens <= len(text.encode()) and len(result["kind"]) == len(result["delta_mse"]) == 128

    # the success line: the job's token count and the rank correlation of its ΔMSE with the atlas's
    stored = Atlas.open(atlas_path).latents_table(128, ["latent", "kind", "delta_mse"]).sort_values("latent")
    assert list(stored["latent"]) == list(range(128))
    fresh_dmse = np.asarray(result["delta_mse"], dtype=float)
    stored_dmse = stored["delta_mse"].to_numpy(float)
    ok = np.isfinite(fresh_dmse) & np.isfinite(stored_dmse)
    assert ok.sum() > 2
    rho = float(spearmanr(fresh_dmse[ok], stored_dmse[ok]).statistic)
    agree = float(np.mean(np.asarray(result["kind"], dtype=object) == stored["kind"].to_numpy(dtype=object)))
    message = at.success[0].value
    assert message.startswith(f"Fresh evaluation on {n_tokens:,} tokens: ΔMSE rank correlation with the atlas "), message
    assert f"same kind for {agree:.0%} of the latents" in message, message
    assert math.isfinite(rho)
    shown_rho = float(message.split("rank correlation with the atlas ")[1].split(",")[0])
    assert shown_rho == pytest.approx(rho, abs=1.5e-3), (shown_rho, rho)

    # the per-latent table: the job's kind and ΔMSE next to the atlas's, latent by latent
    table = at.dataframe[-1].value.sort_values("latent")
    assert {"open", "latent", "label", "kind", "stored_kind", "delta_mse", "stored_delta_mse"} <= set(table.columns)
    assert list(table["latent"]) == list(range(128))
    assert list(table["kind"]) == list(result["kind"])
    assert list(table["stored_kind"]) == list(stored["kind"])
    np.testing.assert_allclose(table["delta_mse"].to_numpy(float), fresh_dmse, rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(table["stored_delta_mse"].to_numpy(float), stored_dmse, rtol=1e-6, equal_nan=True)
