"""A bounded load test on loopback: 200 concurrent /v1/encode and 50 concurrent /v1/activations requests to a
real backend process, with no errors and bounded time (latencies are printed; docs/benchmarks.md records them)."""

from __future__ import annotations

import httpx

from metasae.backend.loadtest import load_test


def test_concurrent_encode_and_activations_without_errors(main_server):
    with httpx.Client(base_url=main_server.url, timeout=120) as http:  # warm: every SAE loaded once
        for w in (64, 128, 256):
            assert http.post("/v1/encode", json={"width": w, "latent": 0}).status_code == 200
            assert http.post("/v1/activations", json={"text": "warm", "width": w}).status_code == 200
    out = load_test(main_server.url, widths=[64, 128, 256], n_latents=64, n_encode=200, n_activations=50)
    for name, r in out.items():
        print(f"\n{name}: {r['n']} concurrent, {r['errors']} errors, wall {r['wall_s']:.2f}s, "
              f"p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms, max {r['max_ms']:.1f} ms")
        assert r["errors"] == 0, r["first_errors"]
        assert r["wall_s"] < 60
    assert out["encode"]["n"] == 200 and out["activations"]["n"] == 50
    with httpx.Client(base_url=main_server.url) as http:  # and it still answers afterwards
        assert http.get("/health").json()["status"] == "ready"
