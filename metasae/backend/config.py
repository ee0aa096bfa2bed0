"""Backend settings: environment variables (Neuronpedia style), overridden by `metasae backend` flags.

| variable                      | default                          | meaning                                              |
|-------------------------------|----------------------------------|------------------------------------------------------|
| METASAE_ATLAS                 | data                             | atlas folder to serve                                |
| METASAE_HOST / METASAE_PORT   | 127.0.0.1 / 8000                 | where to listen (loopback unless told otherwise)     |
| METASAE_TOKEN                 | (none)                           | bearer token every /v1 route then requires (set but  |
|                               |                                  | empty or blank is an error, not "no auth")           |
| METASAE_ALLOWED_HOSTS         | (auto)                           | Host header values accepted (comma list; * any). auto:|
|                               |                                  | without a token only IP literals, localhost and the  |
|                               |                                  | bound host (DNS rebinding); with a token, any        |
| METASAE_PUBLIC_DOCS           | 0                                | 1: /docs, /redoc, /openapi.json need no token        |
| METASAE_RAY_ADDRESS           | (none)                           | Ray cluster for stitching jobs (`auto`, `ray://...`) |
| METASAE_DEVICE                | auto                             | auto (CUDA when available), cpu, cuda, cuda:N        |
| METASAE_IDLE_TIMEOUT_S        | 600                              | release model and SAEs after this idle time (0: never)|
| METASAE_MAX_BODY_BYTES        | 1000000                          | request bodies above this get 413                    |
| METASAE_MAX_TEXT_CHARS        | 20000                            | longest `text` accepted                              |
| METASAE_MAX_TOKENS            | 2048                             | most tokens one /v1/activations request may give     |
| METASAE_MAX_STITCH_TOKENS     | 262144                           | most tokens one stitching job may evaluate           |
| METASAE_MAX_JOBS              | 8                                | queued + running jobs at once (more get 429)         |
| METASAE_JOB_TTL_S             | 3600                             | finished jobs are forgotten after this               |
| METASAE_TORCH_THREADS         | 0                                | torch CPU threads (0: 1 on CPU, torch's default on GPU)|
| METASAE_PRELOAD               | 0                                | 1: load model and SAEs at start instead of on demand |
| METASAE_STITCH_FN             | metasae.distributed:stitch_eval  | the stitching evaluator (module:function)            |
| METASAE_LOAD_DELAY_S          | 0                                | testing aid: extra seconds spent in each model load  |
| METASAE_PARENT_PID            | (none)                           | exit when this process is gone (auto-started backends)|
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any

DEFAULT_STITCH_FN = "metasae.distributed:stitch_eval"


def _env(name: str, default: Any, kind: type) -> Any:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        if kind is bool:
            return raw.strip().lower() in ("1", "true", "yes", "on")
        return kind(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a valid {kind.__name__}") from None


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment; see the module docstring for the variables."""

    atlas: str = "data"
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    ray_address: str | None = None
    device: str = "auto"
    idle_timeout_s: float = 600.0
    max_body_bytes: int = 1_000_000
    max_text_chars: int = 20_000
    max_tokens: int = 2048
    max_stitch_tokens: int = 262_144
    max_jobs: int = 8
    job_ttl_s: float = 3600.0
    torch_threads: int = 0
    preload: bool = False
    stitch_fn: str = DEFAULT_STITCH_FN
    load_delay_s: float = 0.0
    parent_pid: int | None = None
    allowed_hosts: tuple[str, ...] | None = None  # None: auto (see the module docstring)
    public_docs: bool = False

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Settings from METASAE_* variables; keyword arguments that are not None win over them."""
        d = cls()
        raw_token = os.environ.get("METASAE_TOKEN")
        if raw_token is not None and not raw_token.strip():
            raise ValueError("METASAE_TOKEN is set but empty: unset it to run without authentication, or give the "
                             "token every /v1 request must send")
        hosts = _env("METASAE_ALLOWED_HOSTS", None, str)
        env = {
            "atlas": _env("METASAE_ATLAS", d.atlas, str),
            "host": _env("METASAE_HOST", d.host, str),
            "port": _env("METASAE_PORT", d.port, int),
            "token": _env("METASAE_TOKEN", None, str),
            "ray_address": _env("METASAE_RAY_ADDRESS", None, str),
            "device": _env("METASAE_DEVICE", d.device, str),
            "idle_timeout_s": _env("METASAE_IDLE_TIMEOUT_S", d.idle_timeout_s, float),
            "max_body_bytes": _env("METASAE_MAX_BODY_BYTES", d.max_body_bytes, int),
            "max_text_chars": _env("METASAE_MAX_TEXT_CHARS", d.max_text_chars, int),
            "max_tokens": _env("METASAE_MAX_TOKENS", d.max_tokens, int),
            "max_stitch_tokens": _env("METASAE_MAX_STITCH_TOKENS", d.max_stitch_tokens, int),
            "max_jobs": _env("METASAE_MAX_JOBS", d.max_jobs, int),
            "job_ttl_s": _env("METASAE_JOB_TTL_S", d.job_ttl_s, float),
            "torch_threads": _env("METASAE_TORCH_THREADS", d.torch_threads, int),
            "preload": _env("METASAE_PRELOAD", d.preload, bool),
            "stitch_fn": _env("METASAE_STITCH_FN", d.stitch_fn, str),
            "load_delay_s": _env("METASAE_LOAD_DELAY_S", d.load_delay_s, float),
            "parent_pid": _env("METASAE_PARENT_PID", None, int),
            "allowed_hosts": tuple(h.strip().lower() for h in hosts.split(",") if h.strip()) if hosts else None,
            "public_docs": _env("METASAE_PUBLIC_DOCS", d.public_docs, bool),
        }
        env.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(env) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown settings {sorted(unknown)}")
        return cls(**env).validated()

    def validated(self) -> Settings:
        for name in ("max_body_bytes", "max_text_chars", "max_tokens", "max_stitch_tokens", "max_jobs"):
            if getattr(self, name) < 1:
                raise ValueError(f"setting {name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if self.idle_timeout_s < 0 or self.load_delay_s < 0:
            raise ValueError("idle_timeout_s and load_delay_s must be >= 0")
        if ":" not in self.stitch_fn:
            raise ValueError(f"stitch_fn must be module:function, got {self.stitch_fn!r}")
        if self.token is not None and not self.token.strip():
            raise ValueError("token is set but empty: give a token, or none to run without authentication")
        return replace(self, token=self.token.strip() if self.token else None)
