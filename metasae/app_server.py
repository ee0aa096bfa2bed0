"""The dashboard's HTTP layer: what `streamlit run app.py` serves around the Streamlit script (dashboard.py).

Streamlit's page is a single-page app whose assets are addressed relative to the page (`./static/js/...`). A
deep path such as `/latent/extra/path` makes the browser ask for `/latent/extra/static/js/...`, which Streamlit
answers with index.html (its fallback for client-side routes): the script never loads and the tab stays blank
forever. Every page of the dashboard is one path segment deep, so a longer path is sent to its first segment,
query kept: `/latent/extra/path?width=576` -> `/latent?width=576`, and an unknown first segment gets Streamlit's
own "page not found" notice.
"""

from __future__ import annotations

from starlette.responses import RedirectResponse
from starlette.types import ASGIApp, Receive, Scope, Send

# Path segments that belong to Streamlit's own routes: the frontend probes `<page>/_stcore/health` and friends
# while it works out the base path, and assets live under these; none of them may be redirected.
RESERVED_SEGMENTS = frozenset({"_stcore", "static", "media", "component", "app", "favicon.png", "manifest.json"})


def page_redirect(path: str, query: str = "") -> str | None:
    """Where a deeper-than-one-segment page address should go, or None when it is served as is."""
    parts = [p for p in path.split("/") if p]
    if len(parts) < 2 or RESERVED_SEGMENTS.intersection(parts):
        return None
    return "/" + parts[0] + (f"?{query}" if query else "")


class DeepPathRedirect:
    """ASGI middleware: GET/HEAD of a too-deep page address answers 307 to the page it names (`page_redirect`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") in ("GET", "HEAD"):
            target = page_redirect(scope.get("path", ""), scope.get("query_string", b"").decode("latin-1"))
            if target is not None:
                await RedirectResponse(target, status_code=307)(scope, receive, send)
                return
        await self.app(scope, receive, send)
