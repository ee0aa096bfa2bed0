"""docs/reliability.md: the bad-input cases, what each should get, and what it got when the table was written.

Every case is run here (in process: the tiny atlas behind a TestClient, or `verify` / `Settings` / `metasae info`
on a damaged copy), its answer is compared with the expected one, and the table rendered from the observations
must equal the committed file. Regenerate it with

    METASAE_WRITE_RELIABILITY=1 pytest tests/backend/test_reliability.py

The HTTP bodies are the same lists the real-server tests send (test_service.BAD, test_hostile.STRICT), and the
atlas damages the ones tests/unit/test_atlas.py checks; the schema-driven fuzz (test_openapi.py) adds its
generated requests on top (counted in the table's header, not listed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_hostile import STRICT, _damage
from test_service import BAD

from metasae.atlas import verify, write_manifest
from metasae.backend.app import create_app
from metasae.backend.config import Settings
from metasae.backend.resources import Resources
from metasae.synthetic_atlas import make_synthetic_atlas

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "reliability.md"
V = [0.1] * 32
TOKEN = "s3cret"


@dataclass
class Case:
    group: str
    case: str
    expected: str  # "<status> <field>" for HTTP, or a substring of the first problem / error
    run: Callable[[Path], str]  # -> what was observed, one line


def _short(text: str, tmp: Path, n: int = 200) -> str:
    text = " ".join(str(text).replace(str(tmp), "<tmp>").split())
    text = re.sub(r"(/tmp|<tmp>)/[^\s'\":]+", "<tmp>", text)
    return text if len(text) <= n else text[: n - 1] + "…"


# ----------------------------------------------------------------------------------------- HTTP cases

_apps: dict[tuple, TestClient] = {}


def _client(atlas: Path, **kw) -> TestClient:
    key = (str(atlas), tuple(sorted(kw.items())))
    if key not in _apps:
        s = Settings.from_env(atlas=str(atlas), idle_timeout_s=0, stitch_fn="backend_fakes:slow_stitch_eval", **kw)
        res = Resources(s, device="cpu")
        res.open_atlas()
        _apps[key] = TestClient(create_app(s, res, background=False), base_url="http://127.0.0.1")
    return _apps[key]


def http(method: str, path: str, body: str | dict | None = None, headers: dict | None = None,
         settings: dict | None = None, atlas: Callable[[Path], Path] | None = None) -> Callable[[Path], str]:
    def run(tiny: Path) -> str:
        where = atlas(tiny) if atlas else tiny
        c = _client(where, **(settings or {}))
        kw = {"content": body} if isinstance(body, str) else ({"json": body} if body is not None else {})
        r = c.request(method, path, headers={"Content-Type": "application/json", **(headers or {})}, **kw)
        detail = r.json().get("detail") if r.headers.get("content-type", "").startswith("application/json") else ""
        if isinstance(detail, str) or detail is None:
            return f"{r.status_code} {detail or ''}".strip()
        return f"{r.status_code} {json.dumps(detail)}"
    return run


def damaged_atlas(how: str, when: str = "start", file: str = "saes/128/sae_weights.safetensors"):
    """A copy of the tiny atlas with damaged weights (re-signed, so only the weight checks can tell)."""
    def make(tiny: Path) -> Path:
        out = tiny.parent / f"damaged-{how}-{when}-{file.split('/')[0]}"
        if not out.exists():
            shutil.copytree(tiny, out)
            if when == "start":
                _damage(out / file, how)
                write_manifest(out, json.loads((out / "manifest.json").read_text()))
        return out
    return make


def serving_damage(how: str, file: str, body: dict) -> Callable[[Path], str]:
    def run(tiny: Path) -> str:
        where = damaged_atlas(how, "serving", file)(tiny)
        c = _client(where)
        _damage(where / file, how)  # after the atlas was opened and verified
        r = c.post("/v1/encode", json=body)
        return f"{r.status_code} {r.json()['detail']}"
    return run


def _http_cases() -> list[Case]:
    cases = []
    for path, raw, status, field in BAD:
        cases.append(Case(f"POST {path}", _short(raw, Path("/nonexistent"), 70), f"{status} {field}",
                          http("POST", path, raw)))
    for path, body, field in STRICT:
        cases.append(Case(f"POST {path} (strict types)", _short(json.dumps(body), Path("/nonexistent"), 70),
                          f"422 {field}", http("POST", path, body)))
    hosts = [("evil.example", {}, "400 Host"), ("evil.example:8000", {}, "400 Host"), ("127.0.0.1:8000", {}, "200"),
             ("localhost:8000", {}, "200"), ("[::1]:8000", {}, "200"), ("10.1.2.3", {}, "200"),
             ("gpu.example", {"allowed_hosts": ("gpu.example",)}, "200"),
             ("evil.example", {"allowed_hosts": ("gpu.example",), "token": TOKEN}, "400 Host"),
             ("evil.example", {"token": TOKEN}, "200"), ("evil.example", {"allowed_hosts": ("*",)}, "200")]
    for host, kw, expected in hosts:
        what = ", ".join(f"{k}={v}" for k, v in kw.items()) or "no token, default hosts"
        cases.append(Case("Host header", f"Host: {host} ({what})", expected,
                          http("GET", "/health", headers={"Host": host}, settings=kw)))
    tok = {"token": TOKEN}
    for path in ("/openapi.json", "/docs", "/redoc"):
        cases.append(Case("token set", f"GET {path} without the token", "401 Authorization",
                          http("GET", path, settings=tok)))
    cases += [
        Case("token set", "GET /health without the token: status, auth, version only", '200 {"status", "auth", "version"}',
             lambda tiny: "200 " + json.dumps(sorted(_client(tiny, token=TOKEN).get("/health").json()))),
        Case("token set", "POST /v1/encode with a wrong token", "401 Authorization",
             http("POST", "/v1/encode", {"width": 64, "latent": 0}, {"Authorization": "Bearer nope"}, tok)),
        Case("token set", "POST /v1/encode with 'Basic' auth", "401 Authorization",
             http("POST", "/v1/encode", {"width": 64, "latent": 0}, {"Authorization": "Basic eDp5"}, tok)),
        Case("methods", "OPTIONS /v1/jobs/{id}", "204 DELETE, GET, OPTIONS",
             lambda tiny: (lambda r: f"{r.status_code} {r.headers.get('allow')}")(
                 _client(tiny).options("/v1/jobs/" + "0" * 32))),
        Case("methods", "PUT /v1/jobs/{id}", "405 method", http("PUT", "/v1/jobs/" + "0" * 32)),
        Case("methods", "GET /v1/encode", "405 method", http("GET", "/v1/encode")),
        Case("methods", "GET /v1/nothing", "404 path", http("GET", "/v1/nothing")),
        Case("methods", "GET /v1/jobs/nope (not a job id)", "422 job_id", http("GET", "/v1/jobs/nope")),
        Case("methods", "DELETE /v1/jobs/<32 zeros> (no such job)", "404 job_id", http("DELETE", "/v1/jobs/" + "0" * 32)),
        Case("body size", "1.3 MB JSON body (limit 1 MB)", "413 body",
             http("POST", "/v1/encode", json.dumps({"vector": [0.123456789] * 100_000}))),
        Case("body size", "Content-Length: 10^14 (declared; real server: test_hostile)", "413 body",
             http("POST", "/v1/encode", headers={"Content-Length": str(10**14)})),
        Case("body size", "vector of 70,000 floats (max 32)", "422 vector",
             http("POST", "/v1/encode", {"vector": [0.0] * 70_000})),
        Case("body size", "vector component 2.2e19 (float32 squares overflow)", "422 vector[0]",
             http("POST", "/v1/encode", {"vector": [2.2e19] + [0.0] * 31})),
    ]
    for how, needle in (("nan", "NaN/inf"), ("pickle", "pickle"), ("header_2_40", "header of 1099511627776"),
                        ("wrong_shape", "'W_enc' has shape")):
        cases.append(Case("bad weights", f"saes/128 weights: {how}, found at start", f"503 {needle}",
                          http("POST", "/v1/encode", {"width": 64, "latent": 0}, atlas=damaged_atlas(how))))
        cases.append(Case("bad weights", f"saes/128 weights: {how}, damaged while serving", f"503 width: … {needle}",
                          serving_damage(how, "saes/128/sae_weights.safetensors", {"width": 128, "latent": 0})))
    cases.append(Case("bad weights", "meta-SAE weights: pickle, damaged while serving", "503 meta_sae",
                      serving_damage("pickle", "meta_sae/sae_weights.safetensors", {"vector": V})))
    return cases


# ----------------------------------------------------------------------------------------- atlas files, settings, CLI


def _synthetic(tmp: Path, name: str) -> Path:
    base = tmp / "synthetic"
    if not base.exists():
        make_synthetic_atlas(base, seed=0)
    return Path(shutil.copytree(base, tmp / name))


def atlas_case(edit: Callable[[Path], None], checksums: bool = True) -> Callable[[Path], str]:
    def run(tiny: Path) -> str:
        a = _synthetic(tiny.parent, f"verify-{len(list(tiny.parent.glob('verify-*')))}")
        edit(a)
        problems = verify(a, checksums=checksums)
        return _short(problems[0] if problems else "no problem found", tiny.parent)
    return run


def _manifest(edit: Callable[[dict], None], sign: bool = False) -> Callable[[Path], None]:
    def do(a: Path) -> None:
        m = json.loads((a / "manifest.json").read_text())
        edit(m)
        if sign:
            write_manifest(a, m)
        else:
            (a / "manifest.json").write_text(json.dumps(m))
    return do


def _weights(how: str) -> Callable[[Path], None]:
    def do(a: Path) -> None:
        import torch
        from safetensors.torch import load_file, save_file

        p = a / "saes/128/sae_weights.safetensors"
        raw = p.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        if how == "pickle (legacy)":
            torch.save({"W_dec": torch.zeros(2)}, p, _use_new_zipfile_serialization=False)
        elif how == "zip (torch.save)":
            torch.save({"W_dec": torch.zeros(2)}, p)
        elif how == "header 2^40":
            p.write_bytes((1 << 40).to_bytes(8, "little") + raw[8:])
        elif how == "header 90 MB":
            p.write_bytes((90 << 20).to_bytes(8, "little") + raw[8:])
        elif how == "header past the end":
            p.write_bytes(len(raw).to_bytes(8, "little") + raw[8:])
        elif how == "header not JSON":
            p.write_bytes(raw[:8] + b"{" * n + raw[8 + n:])
        elif how == "truncated":
            p.write_bytes(raw[:-4])
        elif how == "empty":
            p.write_bytes(b"")
        else:
            t = load_file(p)
            if how == "NaN":
                t["W_dec"][3, 4] = float("nan")
            elif how == "inf":
                t["b_enc"][0] = float("inf")
            elif how == "wrong shape":
                t["W_dec"] = t["W_dec"][:, :16].contiguous()
            save_file(t, p)
        write_manifest(a, json.loads((a / "manifest.json").read_text()))
    return do


def _link(rel: str, target_is_dir: bool = False) -> Callable[[Path], None]:
    def do(a: Path) -> None:
        outside = a.parent / f"outside-{rel.replace('/', '-')}"
        if target_is_dir:
            outside.mkdir(exist_ok=True)
        else:
            outside.write_text("secret")
        (a / rel).symlink_to(outside, target_is_directory=target_is_dir)
    return do


def _cfg(**changes) -> Callable[[Path], None]:
    def do(a: Path) -> None:
        cfg = a / "saes/128/cfg.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), **changes}))
        write_manifest(a, json.loads((a / "manifest.json").read_text()))
    return do


def _settings(env: dict[str, str]) -> Callable[[Path], str]:
    def run(_tiny: Path) -> str:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            Settings.from_env()
            return "accepted"
        except ValueError as e:
            return f"error at start: {e}"
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return run


def _info(edit: Callable[[dict], None]) -> Callable[[Path], str]:
    def run(tiny: Path) -> str:
        import contextlib
        import io

        from metasae.cli import main

        a = _synthetic(tiny.parent, f"info-{len(list(tiny.parent.glob('info-*')))}")
        _manifest(edit)(a)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["info", str(a)])
        return f"exit {code}" + (f": {_short(err.getvalue(), tiny.parent)}" if code else ", no traceback")
    return run


def _file_cases() -> list[Case]:
    cases = [Case("start", f"METASAE_TOKEN={v!r}", "error at start", _settings({"METASAE_TOKEN": v}))
             for v in ("", " ", "  \t")]
    cases.append(Case("start", "METASAE_MAX_BODY_BYTES=lots", "error at start",
                      _settings({"METASAE_MAX_BODY_BYTES": "lots"})))
    for how, needle in (("pickle (legacy)", "pickle"), ("zip (torch.save)", "pickle"),
                        ("header 2^40", "header of 1099511627776 bytes"), ("header 90 MB", "header of 94371840"),
                        ("header past the end", "follow the length"), ("header not JSON", "not valid JSON"),
                        ("truncated", "truncated or padded"), ("empty", "too short"), ("NaN", "NaN/inf"),
                        ("inf", "NaN/inf"), ("wrong shape", "'W_dec' has shape")):
        cases.append(Case("verify: weights", f"saes/128 sae_weights.safetensors: {how}", needle,
                          atlas_case(_weights(how))))
    for literal in ("NaN", "Infinity", "-Infinity"):
        cases.append(Case("verify: manifest", f"manifest.json holds the literal {literal}", f"literal {literal}",
                          atlas_case(lambda a, lit=literal: (a / "manifest.json").write_text(
                              (a / "manifest.json").read_text().replace('"format_version": 1,',
                                                                         f'"format_version": 1, "x": {lit},')))))
    cases += [
        Case("verify: links", "README.md -> a file outside the atlas", "outside the atlas",
             atlas_case(_link("README.md"), checksums=False)),
        Case("verify: links", "saes/extra -> a folder outside the atlas", "outside the atlas",
             atlas_case(_link("saes/extra", target_is_dir=True), checksums=False)),
        Case("verify: manifest", "manifest.json is not JSON", "invalid JSON",
             atlas_case(lambda a: (a / "manifest.json").write_text("{not json"))),
        Case("verify: manifest", "manifest.json is a list", "expected a JSON object",
             atlas_case(lambda a: (a / "manifest.json").write_text("[1, 2]"))),
        Case("verify: manifest", "format_version 2", "format_version 2 found",
             atlas_case(lambda a: (a / "manifest.json").write_text('{"format_version": 2}'))),
        Case("verify: manifest", "a listed file outside the atlas (../outside.txt)", "not a relative path",
             atlas_case(_manifest(lambda m: m["files"].update({"../outside.txt": "0" * 64})))),
        Case("verify: tables", "examples.parquet deleted", "missing on disk",
             atlas_case(lambda a: (a / "examples.parquet").unlink())),
        Case("verify: tables", "latents.parquet truncated", "sha256 differs",
             atlas_case(lambda a: (a / "latents.parquet").write_bytes((a / "latents.parquet").read_bytes()[:100]))),
        Case("verify: tables", "an unlisted late.parquet", "not listed in manifest.json",
             atlas_case(lambda a: shutil.copy(a / "latents.parquet", a / "late.parquet"))),
        Case("verify: weights", "saes/128/cfg.json d_sae disagrees with the manifest", "d_sae is 7",
             atlas_case(_cfg(d_sae=7))),
        Case("metasae info", "l0 and ce_loss null, mse missing, fvu null", "exit 0, no traceback",
             _info(lambda m: (m["saes"][0].update(l0=None, ce_loss=None), m["saes"][1].pop("mse"),
                              m["meta_sae"].update(fvu=None)))),
        Case("metasae info", "a SAE entry that is only {width}", "exit 0, no traceback",
             _info(lambda m: m["saes"].__setitem__(2, {"width": 256}))),
        # the typed manifest names each field of the wrong shape instead of printing dashes for them
        Case("metasae info", "stitching pairs and corpus null", "corpus: Input should be a valid dictionary",
             _info(lambda m: m.update(stitching={"pairs": [{"small": 64}]}, corpus=None))),
    ]
    return cases


CASES = _http_cases() + _file_cases()


# ----------------------------------------------------------------------------------------- the table


def _matches(expected: str, observed: str) -> bool:
    if expected[:3].isdigit():  # "<status> <field or words>": the status, then the detail starts with the field
        status, _, rest = expected.partition(" ")
        if not observed.startswith(status):
            return False
        detail = observed[len(status):].strip()
        if not rest:
            return True
        if "…" in rest:  # "width: … needle": a prefix and a substring
            head, _, tail = rest.partition("…")
            return detail.startswith(head.strip()) and tail.strip() in detail
        if rest.startswith(("{", "DELETE")):
            return all(w.strip('"{} ,') in detail for w in rest.split())
        return detail.startswith(rest) or rest in detail
    return expected in observed


def render(observed: list[str], fuzz_note: str) -> str:
    lines = [
        "# Reliability: bad inputs",
        "",
        "Every row is run by `tests/backend/test_reliability.py` (in process, on the tiny test atlas) and the",
        "observation is written here by it; the test fails when an observation stops matching the expected",
        "answer or this file is out of date (`METASAE_WRITE_RELIABILITY=1 pytest tests/backend/test_reliability.py`",
        "rewrites it). HTTP answers read `<status> <detail>`; 4xx details name the field first.",
        "The same HTTP bodies also run against a real `metasae backend` process (`test_service.py`,",
        "`test_hostile.py`), and a Content-Length of 10^14 with no body is answered 413 within 2 s there.",
        "",
        f"{len(CASES)} listed cases. {fuzz_note}",
        "",
        "| # | group | case | expected | observed |",
        "|---|---|---|---|---|",
    ]
    for i, (c, o) in enumerate(zip(CASES, observed, strict=True), 1):
        cell = [c.group, c.case, c.expected, o]
        lines.append(f"| {i} | " + " | ".join(x.replace("|", "\\|") for x in cell) + " |")
    return "\n".join(lines) + "\n"


FUZZ_NOTE = ("On top of them, `tests/backend/test_openapi.py` sends schema-driven requests (hypothesis-jsonschema on "
             "the server's own /openapi.json; valid bodies must be accepted, one-mutation-invalid ones refused naming "
             "a field, every answer documented) to four targets: in process with and without a token, and the real "
             "backends with (`aux`) and without (`main`) a token.")


def test_every_bad_input_gets_its_expected_answer_and_the_table_is_in_sync(tiny_atlas, tmp_path):
    tiny = Path(shutil.copytree(tiny_atlas, tmp_path / "tiny"))
    observed = [_short(c.run(tiny), tmp_path) for c in CASES]
    wrong = [(c.group, c.case, c.expected, o) for c, o in zip(CASES, observed, strict=True)
             if not _matches(c.expected, o)]
    assert not wrong, "\n".join(map(str, wrong))
    assert len(CASES) >= 100
    text = render(observed, FUZZ_NOTE)
    if os.environ.get("METASAE_WRITE_RELIABILITY"):
        DOC.write_text(text, encoding="utf-8")
    assert DOC.read_text(encoding="utf-8") == text, "docs/reliability.md is out of date (see the module docstring)"


@pytest.fixture(autouse=True, scope="module")
def _close_apps():
    yield
    for c in _apps.values():
        c.close()
    _apps.clear()
