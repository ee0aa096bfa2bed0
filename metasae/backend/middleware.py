"""ASGI middleware of the backend: body-size limit, Host check, docs behind the token, OPTIONS / 405 `Allow`.

Each answers its refusals as `{"detail": "<field>: <problem>"}` like the routes do.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
from typing import Any

from starlette.responses import JSONResponse
from starlette.routing import Match

DRAIN_CAP = 64 << 20  # an oversized body is read and dropped up to this much, so a client still sending sees the 413
DRAIN_IDLE_S = 1.0  # ... but only while it keeps sending: a client that declared a huge body and sends none is let go
DOCS_PATHS = ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")


async def answer(send: Any, status: int, detail: str, headers: dict[str, str] | None = None,
                 more_body: bool = False) -> None:
    """Send a JSON error. With `more_body`, the whole answer (Content-Length included) goes out but the exchange
    stays open, so the caller can still read what the client sends and finish with `finish(send)`."""
    resp = JSONResponse({"detail": detail}, status_code=status, headers=headers)
    await send({"type": "http.response.start", "status": resp.status_code, "headers": resp.raw_headers})
    await send({"type": "http.response.body", "body": resp.body, "more_body": more_body})


async def finish(send: Any) -> None:
    await send({"type": "http.response.body", "body": b"", "more_body": False})


class BodyLimit:
    """Bodies over `max_bytes` (by Content-Length or as streamed) get a 413, sent at once: a client that declares
    10^14 bytes and sends nothing has its answer without waiting for a body."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _detail(self) -> str:
        return f"body: larger than the limit of {self.max_bytes} bytes (METASAE_MAX_BODY_BYTES)"

    async def _reject(self, receive: Any, send: Any, drain: bool) -> None:
        await answer(send, 413, self._detail(), {"Connection": "close"}, more_body=True)
        drained = 0
        while drain and drained < DRAIN_CAP:  # read (and drop) what the client is still sending
            try:
                msg = await asyncio.wait_for(receive(), DRAIN_IDLE_S)
            except TimeoutError:
                break
            if msg["type"] != "http.request":
                break
            drained += len(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        await finish(send)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_bytes
            except ValueError:
                too_big = False  # uvicorn already refuses malformed Content-Length headers
            if too_big:
                return await self._reject(receive, send, drain=True)
            return await self.app(scope, receive, send)  # the server holds the body to its Content-Length
        # No Content-Length (chunked): read the body here, up to the limit, then hand it on.
        chunks, seen = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return await self.app(scope, _replay([msg]), send)
            chunks.append(msg.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                return await self._reject(receive, send, drain=msg.get("more_body", False))
            if not msg.get("more_body", False):
                break
        await self.app(scope, _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}],
                                      receive), send)


def _replay(messages: list[dict], then: Any = None) -> Any:
    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive


def host_name(value: str) -> str:
    """The name part of a Host header (`[::1]:8000` -> `::1`, `Example.org:80` -> `example.org`)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostCheck:
    """Refuse requests whose Host header names a host this backend was not told about (DNS rebinding: a web page
    on evil.example whose name is re-pointed at 127.0.0.1 sends `Host: evil.example`). IP literals, localhost and
    the bound host always pass (a rebinding attack needs a name it controls); `allowed` adds names, `*` any."""

    def __init__(self, app: Any, bound: str, allowed: tuple[str, ...]):
        self.app = app
        self.any = "*" in allowed
        self.names = {"localhost", host_name(bound)} | {host_name(h) for h in allowed}

    def ok(self, host: str) -> bool:
        name = host_name(host)
        return self.any or name in self.names or _is_ip(name)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if not self.ok(host):
                return await answer(send, 400, f"Host: {host!r} is not a name of this backend (set "
                                               "METASAE_ALLOWED_HOSTS to accept it)")
        await self.app(scope, receive, send)


class DocsGuard:
    """With a token (and not METASAE_PUBLIC_DOCS), /docs, /redoc and /openapi.json need the bearer token too."""

    def __init__(self, app: Any, token: str):
        self.app, self.token = app, token.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] in DOCS_PATHS:
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, cred = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(cred.strip(), self.token):
                return await answer(send, 401, "Authorization: the API docs of this backend need its bearer token "
                                               "(or METASAE_PUBLIC_DOCS=1)", {"WWW-Authenticate": "Bearer"})
        await self.app(scope, receive, send)


class AllowedMethods:
    """OPTIONS answers 204 with every method the path supports; a method it does not support gets a 405 whose
    `Allow` lists all of them (Starlette's own 405 names only the first route that matched the path)."""

    def __init__(self, app: Any, routes: list[Any]):
        self.app, self.routes = app, routes

    def methods(self, scope: dict) -> set[str]:
        found: set[str] = set()
        for route in self.routes:
            if route.matches({**scope, "method": next(iter(route.methods))})[0] != Match.NONE:
                found |= set(route.methods)
        return found

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            methods = self.methods(scope)
            if methods and scope["method"] not in methods:
                allow = ", ".join(sorted(methods | {"OPTIONS"}))
                if scope["method"] == "OPTIONS":
                    await send({"type": "http.response.start", "status": 204,
                                "headers": [(b"allow", allow.encode())]})
                    return await send({"type": "http.response.body", "body": b""})
                return await answer(send, 405, f"method: {scope['method']} is not allowed on {scope['path']} "
                                               f"(allowed: {allow})", {"Allow": allow})
        await self.app(scope, receive, send)
