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

from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

DEFAULT_STITCH_FN = "metasae.distributed:stitch_eval"
ENV_PREFIX = "METASAE_"
BLANK_ENV_TOKEN = ("METASAE_TOKEN is set but empty: unset it to run without authentication, or give the token every "
                   "/v1 request must send")


class _BlankIsUnset(EnvSettingsSource):
    """A blank METASAE_* variable reads as unset (its default), as `VAR= cmd` and compose files give blanks; except
    the token, where a blank is far more likely a failed secret lookup than a wish to run without authentication."""

    def __call__(self) -> dict[str, Any]:
        values = super().__call__()
        blank = {k for k, v in values.items() if isinstance(v, str) and not v.strip()}
        if "token" in blank:
            raise ValueError(BLANK_ENV_TOKEN)
        return {k: v for k, v in values.items() if k not in blank}


class Settings(BaseSettings):
    """Everything the service reads from its environment; see the module docstring for the variables.

    `Settings()` reads METASAE_* variables over the defaults and keyword arguments over both; `from_env` is that with
    the errors reworded for the command line; `from_values` ignores the environment."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    atlas: str = "data"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    token: str | None = None
    ray_address: str | None = None
    device: str = "auto"
    idle_timeout_s: float = Field(600.0, ge=0)
    max_body_bytes: int = Field(1_000_000, ge=1)
    max_text_chars: int = Field(20_000, ge=1)
    max_tokens: int = Field(2048, ge=1)
    max_stitch_tokens: int = Field(262_144, ge=1)
    max_jobs: int = Field(8, ge=1)
    job_ttl_s: float = 3600.0
    torch_threads: int = 0
    preload: bool = False
    stitch_fn: str = DEFAULT_STITCH_FN
    load_delay_s: float = Field(0.0, ge=0)
    parent_pid: int | None = None
    # NoDecode: a comma list, not the JSON pydantic-settings expects for a tuple; None: auto (module docstring)
    allowed_hosts: Annotated[tuple[str, ...] | None, NoDecode] = None
    public_docs: bool = False

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        # No .env file or secrets folder: the service's inputs are the flags and the process environment, nothing
        # picked up from whatever directory it was started in.
        return init_settings, _BlankIsUnset(settings_cls)

    @field_validator("token")
    @classmethod
    def _token_not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("token is set but empty: give a token, or none to run without authentication")
        return v.strip() if v is not None else None

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _comma_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            return tuple(h.strip().lower() for h in v.split(",") if h.strip())
        return v

    @field_validator("stitch_fn")
    @classmethod
    def _module_function(cls, v: str) -> str:
        if ":" not in v:
            raise ValueError(f"stitch_fn must be module:function, got {v!r}")
        return v

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Settings from METASAE_* variables; keyword arguments that are not None (the `metasae backend` flags) win
        over them. Errors are one ValueError line naming the variable (or setting) and the value."""
        unknown = set(overrides) - set(cls.model_fields)
        if unknown:
            raise TypeError(f"unknown settings {sorted(unknown)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        try:
            return cls(**given)
        except ValidationError as e:
            raise ValueError(_explain(e, given)) from None

    @classmethod
    def from_values(cls, **values: Any) -> Settings:
        """These values over the defaults, the environment ignored: for documents that must not depend on the
        shell they are generated in (docs/openapi.json)."""
        try:
            checked = _NoEnv(**values)
        except ValidationError as e:
            raise ValueError(_explain(e, values)) from None
        # Validated above by the same fields and validators; model_construct only gives the instance this class.
        return cls.model_construct(**dict(checked))


class _NoEnv(Settings):
    """Settings from keyword arguments and defaults only (what `Settings.from_values` validates with)."""

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def _explain(e: ValidationError, given: dict[str, Any]) -> str:
    """`environment variable METASAE_PORT='x': <why>` (or `setting port=...` for a flag) for each bad value."""
    parts = []
    for err in e.errors(include_url=False):
        field = str(err["loc"][0]) if err["loc"] else ""
        why = err["msg"].removeprefix("Value error, ")
        if field and field not in given:
            parts.append(f"environment variable {ENV_PREFIX}{field.upper()}={err['input']!r}: {why}")
        elif field:
            parts.append(f"setting {field}={err['input']!r}: {why}")
        else:
            parts.append(why)
    return "; ".join(parts)
