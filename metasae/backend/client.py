"""Talk to a metasae backend over HTTP: `HttpBackend` (the `Backend` protocol of contract.py) and `get_backend`.

`get_backend()` decides where the heavy work goes:

- `METASAE_BACKEND_URL` set (e.g. a GPU host): an `HttpBackend` for it, with `METASAE_TOKEN` as bearer token;
- otherwise: on first need it starts `metasae backend` for the atlas in `METASAE_ATLAS` (default `data`) as a
  subprocess on 127.0.0.1 and a free port, with a random token only this process knows, waits for `/health`,
  and hands out a client for it. The subprocess is reused for the process lifetime, restarted if it died, and
  terminated at exit (it also exits by itself when this process is gone). Its log is
  `<tmp>/metasae-backend-*.log`, removed after a clean stop and kept when the backend died.
"""

from __future__ import annotations

import atexit
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import GenericAlias
from typing import Any

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from metasae.backend.contract import Backend, BackendError
from metasae.backend.schemas import (
    ActivationsResponse,
    EncodeResponse,
    HealthResponse,
    JobResponse,
    StitchStarted,
)
from metasae.backend.schemas.intervene import InterveneResponse

__all__ = ["Backend", "BackendError", "HttpBackend", "LocalBackendProcess", "get_backend", "stop_local_backend"]

DEFAULT_TIMEOUT_S = 120.0


class HttpBackend:
    """A `Backend` over HTTP (httpx); every failure raises BackendError with the service's message.

    Each method sends the body its route's schema describes and returns that route's response model (see
    `ROUTES`; tests/backend/test_openapi.py checks both against /openapi.json). The models also read like the
    dicts they replace (`r["status"]`, `r.get("model")`)."""

    # method -> (HTTP method, path, response model): what the OpenAPI contract says each one calls and answers
    ROUTES: dict[str, tuple[str, str, type[BaseModel]]] = {
        "health": ("GET", "/health", HealthResponse),
        "encode": ("POST", "/v1/encode", EncodeResponse),
        "activations": ("POST", "/v1/activations", ActivationsResponse),
        "start_stitch": ("POST", "/v1/stitch", StitchStarted),
        "job": ("GET", "/v1/jobs/{job_id}", JobResponse),
        "cancel": ("DELETE", "/v1/jobs/{job_id}", JobResponse),
        "jobs": ("GET", "/v1/jobs", JobResponse),  # a list of them
        "intervene": ("POST", "/v1/intervene", InterveneResponse),
    }

    def __init__(self, url: str, token: str | None = None, timeout: float = DEFAULT_TIMEOUT_S):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def __repr__(self) -> str:
        return f"HttpBackend({self.url!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HttpBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, name: str, json: dict | None = None, **path: str) -> Any:
        """Call the route of client method `name` and parse its answer as the route's response model."""
        method, template, model = self.ROUTES[name]
        data = self._request(method, template.format(**path), json)
        kind: Any = GenericAlias(list, (model,)) if name == "jobs" else model  # list[model], model being a value
        try:
            return TypeAdapter(kind).validate_python(data)
        except ValidationError as e:
            raise BackendError(f"the backend at {self.url} answered {method} {template} with a body that does not "
                               f"fit its contract ({e.error_count()} problems: {e.errors()[0]['msg']})") from e

    def _request(self, method: str, path: str, json: dict | None = None) -> Any:
        try:
            r = self._http.request(method, path, json=json)
        except httpx.TimeoutException as e:
            raise BackendError(f"the metasae backend at {self.url} did not answer {method} {path} in time "
                               f"({type(e).__name__})") from e
        except httpx.TransportError as e:
            raise BackendError(f"cannot reach the metasae backend at {self.url} ({type(e).__name__}: {e}); "
                               "it may have stopped or restarted: start it again and retry") from e
        if r.status_code >= 400:
            raise BackendError(_detail(r), status=r.status_code)
        try:
            return r.json()
        except ValueError as e:
            raise BackendError(f"the backend at {self.url} answered {method} {path} with non-JSON "
                               f"({r.text[:200]!r})", status=r.status_code) from e

    # -- the Backend protocol

    def health(self) -> HealthResponse:
        return self._call("health")

    def encode(self, *, width: int | None = None, latent: int | None = None,
               vector: list[float] | None = None) -> EncodeResponse:
        body: dict[str, Any] = {k: v for k, v in (("width", width), ("latent", latent)) if v is not None}
        if vector is not None:
            vector = [float(x) for x in vector]
            bad = [i for i, x in enumerate(vector) if not math.isfinite(x)]
            if bad:  # JSON has no NaN/inf: refuse here, with the message the service would give
                raise BackendError(f"vector[{bad[0]}]: Input should be a finite number ({len(bad)} NaN/inf values)")
            body["vector"] = vector
        return self._call("encode", body)

    def activations(self, text: str, width: int, top_k: int = 5) -> ActivationsResponse:
        return self._call("activations", {"text": text, "width": width, "top_k": top_k})

    def intervene(self, prompt: str, width: int, latent: int, edits: list[dict[str, Any]], *,
                  positions: str | None = None, fire_latent: int | None = None, targets: list[str] | None = None,
                  top_k: int | None = None, max_new_tokens: int | None = None) -> InterveneResponse:
        """POST /v1/intervene (fields as in metasae.backend.schemas.intervene; None = the route's default)."""
        body: dict[str, Any] = {"prompt": prompt, "width": width, "latent": latent, "edits": edits}
        for k, v in (("positions", positions), ("fire_latent", fire_latent), ("targets", targets),
                     ("top_k", top_k), ("max_new_tokens", max_new_tokens)):
            if v is not None:
                body[k] = v
        return self._call("intervene", body)

    def start_stitch(self, small: int, large: int, *, text: str | None = None, n_tokens: int | None = None,
                     metrics: tuple[str, ...] = ("mse", "ce"), threshold: float | None = None) -> StitchStarted:
        body: dict[str, Any] = {"small": small, "large": large, "metrics": list(metrics)}
        for k, v in (("text", text), ("n_tokens", n_tokens), ("threshold", threshold)):
            if v is not None:
                body[k] = v
        return self._call("start_stitch", body)

    def job(self, job_id: str) -> JobResponse:
        return self._call("job", job_id=job_id)

    def cancel(self, job_id: str) -> JobResponse:
        return self._call("cancel", job_id=job_id)

    def jobs(self) -> list[JobResponse]:
        """Every job the backend still keeps (results left out)."""
        return self._call("jobs")

    # -- conveniences

    def wait(self, job_id: str, timeout: float = 600.0, poll: float = 0.2) -> JobResponse:
        """Poll a job until it is done, failed or cancelled (BackendError on timeout)."""
        end = time.monotonic() + timeout
        while True:
            j = self.job(job_id)
            if j.status in ("done", "failed", "cancelled"):
                return j
            if time.monotonic() > end:
                raise BackendError(f"job {job_id} still {j.status} ({j.progress:.0%}) after {timeout:.0f} s")
            time.sleep(poll)

    def wait_ready(self, timeout: float = 60.0, poll: float = 0.1) -> HealthResponse:
        """Poll /health until it answers (any status but error); BackendError after `timeout`."""
        end = time.monotonic() + timeout
        while True:
            try:
                return self.health()
            except BackendError as e:
                if e.status is not None or time.monotonic() > end:
                    raise
            time.sleep(poll)


def _detail(r: httpx.Response) -> str:
    try:
        d = r.json().get("detail")
    except (ValueError, AttributeError):
        d = None
    if isinstance(d, str) and d:
        return d
    if d:  # FastAPI's own list-of-errors shape
        return str(d)
    return f"HTTP {r.status_code} {r.reason_phrase}: {r.text[:200]}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalBackendProcess:
    """`metasae backend` as a child process on 127.0.0.1 (used by get_backend, the tests, the benchmark)."""

    def __init__(self, atlas: str | os.PathLike, port: int | None = None, token: str | None = None,
                 env: dict[str, str] | None = None, log_path: str | os.PathLike | None = None,
                 exit_with_parent: bool = True):
        self.atlas = str(atlas)
        self.port = port or free_port()
        self.token = token
        self.url = f"http://127.0.0.1:{self.port}"
        self._temp_log = log_path is None  # removed after a clean stop, kept when the process died
        self.log_path = Path(log_path) if log_path else Path(
            tempfile.mkstemp(prefix="metasae-backend-", suffix=".log")[1])
        child_env = {**os.environ, **(env or {})}
        child_env.pop("METASAE_TOKEN", None)
        if token:
            child_env["METASAE_TOKEN"] = token
        if exit_with_parent:
            child_env["METASAE_PARENT_PID"] = str(os.getpid())
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "metasae.cli", "backend", "--atlas", self.atlas, "--host", "127.0.0.1",
                 "--port", str(self.port)],
                env=child_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.client = HttpBackend(self.url, token=token)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 90.0, status: tuple[str, ...] = ("loading", "ready")) -> HealthResponse:
        """Wait until /health answers with one of `status` (default: any but error); BackendError with the
        log's tail if the process exits, the atlas cannot be opened, or `timeout` passes."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self.alive():
                raise BackendError(f"the metasae backend for {self.atlas} exited with code {self.proc.returncode}:"
                                   f"\n{self.log_tail()}")
            try:
                h = self.client.health()
                if h.status in status:
                    return h
            except BackendError as e:
                if e.status is not None:
                    raise
            time.sleep(0.1)
        self.stop()
        raise BackendError(f"the metasae backend for {self.atlas} did not answer /health in {timeout:.0f} s:\n"
                           f"{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`."""
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
            if self._temp_log and self.proc.returncode in (0, -signal.SIGTERM):
                self.log_path.unlink(missing_ok=True)
        self.client.close()

    def kill(self) -> None:
        """SIGKILL at once (what a crash looks like)."""
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)


_local: LocalBackendProcess | None = None
_local_lock = threading.Lock()
_atexit_registered = False


def stop_local_backend() -> None:
    """Terminate the backend get_backend() started (registered with atexit)."""
    global _local
    with _local_lock:
        if _local is not None:
            _local.stop()
            _local = None


def get_backend(atlas: str | os.PathLike | None = None, start_timeout: float = 90.0,
                preload: bool = False) -> HttpBackend:
    """The backend to use: METASAE_BACKEND_URL if set, else one local subprocess (started on first need;
    `preload` makes a newly started one load its model and SAEs at once instead of on the first request)."""
    global _local, _atexit_registered
    url = os.environ.get("METASAE_BACKEND_URL", "").strip()
    if url:
        return HttpBackend(url, token=os.environ.get("METASAE_TOKEN") or None)
    with _local_lock:
        # METASAE_ATLAS may list several atlases (the app's switcher); a local backend serves the first
        atlas = str(atlas or (os.environ.get("METASAE_ATLAS") or "data").split(",")[0].strip())
        other_atlas = _local is not None and Path(_local.atlas).resolve() != Path(atlas).resolve()
        if _local is None or not _local.alive() or other_atlas:
            if not Path(atlas, "manifest.json").is_file():
                raise BackendError(f"no atlas at {atlas} for a local backend (set METASAE_ATLAS, or "
                                   "METASAE_BACKEND_URL to use a running backend)")
            if _local is not None:  # it died, or serves another atlas: replace it
                _local.stop()
                _local = None
            if not _atexit_registered:
                atexit.register(stop_local_backend)
                _atexit_registered = True
            proc = LocalBackendProcess(atlas, token=secrets.token_urlsafe(24),
                                       env={"METASAE_PRELOAD": "1"} if preload else None)
            proc.wait_ready(start_timeout)
            _local = proc
        return _local.client
