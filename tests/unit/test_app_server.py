"""Too-deep page addresses are redirected to their page; Streamlit's own routes pass through untouched."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from metasae.app_server import DeepPathRedirect, page_redirect


@pytest.mark.parametrize(("path", "query", "want"), [
    ("/latent/extra/path", "", "/latent"),
    ("/latent/extra/path", "width=576&latent=3", "/latent?width=576&latent=3"),
    ("/nosuchpage/x", "", "/nosuchpage"),
    ("/latent/", "", None),                        # one segment: Streamlit's own trailing-slash redirect
    ("/latent", "width=1", None),
    ("/", "", None),
    ("/static/js/index.abc.js", "", None),
    ("/latent/_stcore/health", "", None),          # the frontend probes these while finding its base path
    ("/latent/extra/_stcore/stream", "", None),
    ("/media/abc.png", "", None),
    ("/component/x/index.html", "", None),
])
def test_page_redirect(path: str, query: str, want: str | None) -> None:
    assert page_redirect(path, query) == want


def test_middleware_redirects_only_too_deep_gets() -> None:
    inner = Starlette(routes=[Route("/{path:path}", lambda r: PlainTextResponse("served " + r.url.path),
                                    methods=["GET", "POST", "HEAD"])],
                      middleware=[Middleware(DeepPathRedirect)])
    client = TestClient(inner, follow_redirects=False)
    r = client.get("/latent/extra/path?width=576&latent=3")
    assert r.status_code == 307 and r.headers["location"] == "/latent?width=576&latent=3"
    assert client.get("/latent?width=576").text == "served /latent"
    assert client.get("/latent/_stcore/health").text == "served /latent/_stcore/health"
    assert client.post("/latent/extra/path").text == "served /latent/extra/path"  # not a page load
