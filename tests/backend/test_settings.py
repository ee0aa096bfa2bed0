"""Backend settings (metasae.backend.config): every documented METASAE_* variable is read, blanks and bad values
give one line naming the variable and value, a blank token is an error, and flags win over the environment."""

from __future__ import annotations

import re
from typing import Any

import pytest

import metasae.backend.config as config
from metasae.backend.config import Settings

# One non-default value per setting, as the environment spells it, and what it must become.
ENV_VALUES: dict[str, tuple[str, Any]] = {
    "atlas": ("/srv/atlas", "/srv/atlas"),
    "host": ("0.0.0.0", "0.0.0.0"),
    "port": ("9001", 9001),
    "token": (" s3cret ", "s3cret"),
    "allowed_hosts": ("Example.org, 10.0.0.2,,", ("example.org", "10.0.0.2")),
    "public_docs": ("1", True),
    "ray_address": ("ray://head:10001", "ray://head:10001"),
    "device": ("cuda:1", "cuda:1"),
    "idle_timeout_s": ("2.5", 2.5),
    "max_body_bytes": ("1234", 1234),
    "max_text_chars": ("99", 99),
    "max_tokens": ("64", 64),
    "max_stitch_tokens": ("4096", 4096),
    "max_jobs": ("3", 3),
    "job_ttl_s": ("60", 60.0),
    "torch_threads": ("2", 2),
    "preload": ("yes", True),
    "stitch_fn": ("pkg.mod:fn", "pkg.mod:fn"),
    "load_delay_s": ("0.5", 0.5),
    "parent_pid": ("4321", 4321),
}
NUMERIC = [name for name, (_, parsed) in ENV_VALUES.items() if type(parsed) in (int, float)]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No METASAE_* variable from the shell running the tests."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("METASAE_"):
            monkeypatch.delenv(name)


def documented_variables() -> set[str]:
    return set(re.findall(r"METASAE_[A-Z_]+", config.__doc__ or ""))


def test_the_docstring_table_lists_exactly_the_settings():
    assert documented_variables() == {f"METASAE_{name.upper()}" for name in Settings.model_fields}
    assert set(ENV_VALUES) == set(Settings.model_fields)


def test_defaults_without_environment():
    s = Settings.from_env()
    assert (s.atlas, s.host, s.port, s.token, s.allowed_hosts, s.public_docs, s.preload) == (
        "data", "127.0.0.1", 8000, None, None, False, False)
    assert (s.idle_timeout_s, s.max_body_bytes, s.max_tokens, s.stitch_fn) == (
        600.0, 1_000_000, 2048, "metasae.distributed:stitch_eval")
    assert s == Settings() == Settings.from_values()


def test_every_variable_is_read_and_parsed(monkeypatch):
    for name, (raw, _) in ENV_VALUES.items():
        monkeypatch.setenv(f"METASAE_{name.upper()}", raw)
    s = Settings.from_env()
    assert {name: getattr(s, name) for name in ENV_VALUES} == {name: v for name, (_, v) in ENV_VALUES.items()}


@pytest.mark.parametrize("name", [n for n in ENV_VALUES if n != "token"])
@pytest.mark.parametrize("blank", ["", "  "])
def test_a_blank_variable_reads_as_unset(monkeypatch, name, blank):
    monkeypatch.setenv(f"METASAE_{name.upper()}", blank)
    assert getattr(Settings.from_env(), name) == Settings.model_fields[name].default


@pytest.mark.parametrize("blank", ["", " ", "\t\n"])
def test_a_blank_token_is_an_error_not_no_auth(monkeypatch, blank):
    monkeypatch.setenv("METASAE_TOKEN", blank)
    for make in (Settings.from_env, Settings):
        with pytest.raises(ValueError, match="METASAE_TOKEN is set but empty"):
            make()
    with pytest.raises(ValueError, match="METASAE_TOKEN is set but empty"):
        Settings.from_env(token="a flag does not hide a broken environment")
    with pytest.raises(ValueError, match="setting token=.*token is set but empty"):
        Settings.from_values(token=blank)


@pytest.mark.parametrize("name", NUMERIC)
def test_a_bad_number_names_the_variable_and_the_value(monkeypatch, name):
    monkeypatch.setenv(f"METASAE_{name.upper()}", "lots")
    with pytest.raises(ValueError) as err:
        Settings.from_env()
    assert str(err.value).startswith(f"environment variable METASAE_{name.upper()}='lots': ")
    assert "\n" not in str(err.value), "one line for the command line, not pydantic's report"


@pytest.mark.parametrize("raw", ["maybe", "2"])
def test_a_bad_boolean_is_an_error(monkeypatch, raw):
    monkeypatch.setenv("METASAE_PRELOAD", raw)
    with pytest.raises(ValueError, match=f"METASAE_PRELOAD='{raw}'"):
        Settings.from_env()


@pytest.mark.parametrize(("name", "value"), [("max_tokens", 0), ("max_jobs", -1), ("port", 70000),
                                              ("idle_timeout_s", -1.0), ("stitch_fn", "no_colon")])
def test_out_of_range_values_name_the_setting(monkeypatch, name, value):
    with pytest.raises(ValueError, match=f"^setting {name}="):
        Settings.from_env(**{name: value})
    monkeypatch.setenv(f"METASAE_{name.upper()}", str(value))
    with pytest.raises(ValueError, match=f"^environment variable METASAE_{name.upper()}="):
        Settings.from_env()


def test_flags_win_over_the_environment_and_none_means_not_given(monkeypatch):
    monkeypatch.setenv("METASAE_PORT", "9001")
    monkeypatch.setenv("METASAE_ATLAS", "/env/atlas")
    monkeypatch.setenv("METASAE_PRELOAD", "1")
    s = Settings.from_env(port=1234, atlas=None, preload=None, device="cpu")
    assert (s.port, s.atlas, s.preload, s.device) == (1234, "/env/atlas", True, "cpu")
    assert Settings.from_env(preload=False).preload is False  # an explicit False flag still wins


def test_unknown_override_is_a_type_error():
    with pytest.raises(TypeError, match="unknown settings"):
        Settings.from_env(prot=1)


def test_from_values_ignores_the_environment(monkeypatch):
    monkeypatch.setenv("METASAE_MAX_TEXT_CHARS", "5")
    monkeypatch.setenv("METASAE_TOKEN", "from-env")
    s = Settings.from_values(atlas="a")
    assert (s.atlas, s.max_text_chars, s.token) == ("a", 20_000, None)
    assert type(s) is Settings


def test_settings_are_frozen():
    s = Settings.from_env()
    with pytest.raises(ValueError):
        s.port = 1  # type: ignore[misc]
    assert hash(s) == hash(Settings.from_env())


def test_the_backend_command_passes_its_flags_over_the_environment(monkeypatch):
    """`metasae backend --port` beats METASAE_PORT; unset flags leave the environment's values."""
    import metasae.atlas
    import metasae.backend.server
    from metasae.cli import main

    served: list[Settings] = []
    monkeypatch.setattr(metasae.atlas, "read_manifest", lambda _path: ({}, []))
    monkeypatch.setattr(metasae.backend.server, "serve", served.append)
    monkeypatch.setenv("METASAE_PORT", "9001")
    monkeypatch.setenv("METASAE_HOST", "0.0.0.0")
    monkeypatch.setenv("METASAE_TOKEN", "tok")
    assert main(["backend", "--atlas", "/some/atlas", "--port", "1234", "--idle-timeout", "7"]) == 0
    (s,) = served
    assert (s.atlas, s.port, s.host, s.token, s.idle_timeout_s, s.preload) == (
        "/some/atlas", 1234, "0.0.0.0", "tok", 7.0, False)


def test_other_metasae_variables_are_not_settings_errors(monkeypatch):
    """The app and the client read their own METASAE_* variables (METASAE_BACKEND_URL, ...) from the same
    environment a backend starts in: extra="forbid" must not turn them into errors."""
    for name in ("METASAE_BACKEND_URL", "METASAE_CACHE", "METASAE_TEST_ATLAS"):
        monkeypatch.setenv(name, "http://gpu:8000")
    assert Settings.from_env() == Settings.from_values()
