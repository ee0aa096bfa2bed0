#!/usr/bin/env bash
# The GPU container built and run for real: build the image, run it, and check what a user relies on.
#
#   bash scripts/container_check.sh            # needs a running Docker engine, .venv (bash scripts/setup.sh)
#
# 1. the base image: METASAE_BASE_IMAGE, or (default `local`) one made here by scripts/make_base_image.sh
#    (debootstrap; the machine's CA bundle is trusted in that local base only, never in the Dockerfile);
# 2. `docker build` (BuildKit off, host network), timed; the image's size;
# 3. the container (host network, backend and app on loopback ports chosen here, METASAE_TOKEN set) until the
#    HEALTHCHECK says healthy; then /health, an encode of a latent of the bundled atlas, a /v1/activations call
#    (the SmolLM2 model on CPU), METASAE_TOKEN enforced (401 without, 200 with), the app's page in headless
#    Chromium without a traceback, no process running as root, a set-but-empty METASAE_TOKEN refused at start,
#    and `docker stop` ending it inside the grace period (by its own SIGTERM handling, not SIGKILL);
# 4. compose.yaml: every profile parses with the expected values, and the `single` one starts here (its GPU
#    reservation removed: this machine has no NVIDIA runtime) and answers on a loopback port; then (unless
#    METASAE_CHECK_SPLIT=0) the split one: gpu-host (backend + Ray head) and cpu-host (app) on this machine's
#    loopback, and a small stitching job that runs through the Ray head.
#
# Environment: METASAE_CHECK_IMAGE (tag, default metasae:check), METASAE_BASE_IMAGE (default local),
# METASAE_CHECK_SKIP_BUILD=1 (use the existing METASAE_CHECK_IMAGE), METASAE_CHECK_KEEP_IMAGE=0 (remove the image
# at the end), PYTHON (default .venv/bin/python; needs playwright and PyYAML), CHROMIUM (default /usr/bin/chromium).
# Exit status 0 when every check passed; containers it started are removed on any exit.
set -euo pipefail
cd "$(dirname "$0")/.."

image="${METASAE_CHECK_IMAGE:-metasae:check}"
base="${METASAE_BASE_IMAGE:-local}"
py="${PYTHON:-.venv/bin/python}"
chromium="${CHROMIUM:-/usr/bin/chromium}"
grace=10 # docker stop's grace period (the image's METASAE_STOP_GRACE is 8)
name="metasae-check-$$"
project="metasaecheck$$"
tmp="$(mktemp -d /tmp/metasae-check.XXXXXX)"
t_start=$(date +%s)

say() { printf '\n== %s\n' "$*"; }
fail() {
  printf 'FAIL: %s\n' "$*" >&2
  exit 1
}
cleanup() {
  local code=$?
  if [ "$code" != 0 ] && docker container inspect "$name" >/dev/null 2>&1; then
    echo "--- last log lines of $name:" >&2
    docker logs --tail 40 "$name" 2>&1 | sed 's/^/  /' >&2 || true
  fi
  docker rm -f "$name" "$name-empty-token" >/dev/null 2>&1 || true
  if [ -f "$tmp/compose.yaml" ]; then
    docker-compose -p "$project" -f "$tmp/compose.yaml" down -v --timeout 10 >/dev/null 2>&1 || true
  fi
  if [ -f "$tmp/split-compose.yaml" ]; then
    docker-compose -p "${project}split" -f "$tmp/split-compose.yaml" down -v --timeout 10 >/dev/null 2>&1 || true
  fi
  if [ "${METASAE_CHECK_KEEP_IMAGE:-1}" = 0 ]; then
    docker image rm -f "$image" >/dev/null 2>&1 || true
  fi
  rm -rf "$tmp"
  exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

docker info >/dev/null 2>&1 || fail "no Docker engine answers (start dockerd as root)"
[ -x "$py" ] || fail "$py not found (bash scripts/setup.sh)"
[ -f data/manifest.json ] || fail "data/ holds no atlas"

# --- 1-2. base and build ----------------------------------------------------------------------------------------
if [ "${METASAE_CHECK_SKIP_BUILD:-0}" = 1 ]; then
  say "using the existing image $image (METASAE_CHECK_SKIP_BUILD=1)"
  build_s="(not built)"
else
  if [ "$base" = local ]; then
    base=metasae-base:bookworm-local
    say "base image: $base (scripts/make_base_image.sh)"
    t0=$(date +%s)
    bash scripts/make_base_image.sh "$base"
    echo "base ready in $(($(date +%s) - t0)) s"
  fi
  say "docker build -t $image (BASE_IMAGE=$base)"
  t0=$(date +%s)
  if ! DOCKER_BUILDKIT=0 docker build --network host --build-arg "BASE_IMAGE=$base" -t "$image" . >"$tmp/build.log" 2>&1; then
    tail -40 "$tmp/build.log" >&2
    fail "docker build failed"
  fi
  build_s="$(($(date +%s) - t0)) s"
  grep -E '^torch [0-9]' "$tmp/build.log" || true # the Dockerfile's CUDA check prints the torch version
fi
size_bytes=$(docker image inspect -f '{{.Size}}' "$image")
size="$(awk -v b="$size_bytes" 'BEGIN {printf "%.2f GB", b / 1e9}')"
echo "build time: $build_s; image size: $size"
[ "$(docker image inspect -f '{{.Config.User}}' "$image")" = "10001:10001" ] || fail "the image's USER is not 10001"
[ -n "$(docker image inspect -f '{{if .Config.Healthcheck}}{{.Config.Healthcheck.Test}}{{end}}' "$image")" ] ||
  fail "the image has no HEALTHCHECK"

# N free loopback ports, printed on one line
# wait_healthy CONTAINER LABEL: poll the container's HEALTHCHECK (up to 240 s); fail with its log tail if it stops
wait_healthy() {
  local status=""
  for _ in $(seq 1 120); do
    status="$(docker inspect -f '{{.State.Health.Status}} {{.State.Status}}' "$1")"
    case "$status" in
      healthy*) return 0 ;;
      *exited* | *dead*) docker logs --tail 30 "$1" >&2; fail "$2 stopped: $status" ;;
    esac
    sleep 2
  done
  fail "$2: not healthy after 240 s: $status"
}

free_ports() {
  "$py" -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])' "$1"
}

# --- 3. the container -------------------------------------------------------------------------------------------
read -r backend_port app_port compose_port < <(free_ports 3)
token="$("$py" -c 'import secrets; print(secrets.token_hex(16))')"
say "docker run $image: backend on 127.0.0.1:$backend_port, app on 127.0.0.1:$app_port (host network)"
t0=$(date +%s)
# the image's HEALTHCHECK, polled every 3 s instead of 30 s so `healthy` shows sooner
METASAE_TOKEN="$token" docker run -d --name "$name" --network host --health-interval 3s \
  -e METASAE_TOKEN -e METASAE_BACKEND_HOST=127.0.0.1 -e "METASAE_BACKEND_PORT=$backend_port" \
  -e METASAE_APP_HOST=127.0.0.1 -e "METASAE_APP_PORT=$app_port" -e METASAE_TORCH_THREADS=2 "$image" >/dev/null
wait_healthy "$name" "the container"
healthy_s=$(($(date +%s) - t0))
echo "healthy after $healthy_s s"

say "requests: /health, encode, activations, the token, the app in Chromium"
t0=$(date +%s)
CHECK_BACKEND="http://127.0.0.1:$backend_port" CHECK_APP="http://127.0.0.1:$app_port" CHECK_TOKEN="$token" \
  CHROMIUM="$chromium" "$py" - <<'PY'
import json
import os
import time
import urllib.error
import urllib.request

backend, app, token = os.environ["CHECK_BACKEND"], os.environ["CHECK_APP"], os.environ["CHECK_TOKEN"]


def call(path, body=None, auth=True, timeout=300, bearer=None):
    bearer = bearer or (token if auth else None)
    req = urllib.request.Request(backend + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {bearer}"} if bearer else {})})
    t = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), time.monotonic() - t
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), time.monotonic() - t


manifest = json.load(open("data/manifest.json"))
widths = sorted(s["width"] for s in manifest["saes"])
code, health, _ = call("/health", auth=False)
assert code == 200 and health["status"] in ("loading", "ready"), (code, health)
assert "/opt/" not in json.dumps(health), f"/health without the token shows paths: {health}"
code, full, _ = call("/health")
print(f"/health: {code} {health} (with the token: device {full.get('device')}, status {full.get('status')})")

showcase = manifest.get("showcase") or [{"width": widths[-1], "latent": 0}]  # the latents the build picked to show
body = {"width": showcase[0]["width"], "latent": showcase[0]["latent"]}
assert call("/v1/encode", body, auth=False)[0] == 401, "encode without the token did not answer 401"
assert call("/v1/encode", body, bearer="wrong")[0] == 401, "encode with a wrong token did not answer 401"
code, out, dt = call("/v1/encode", body)
assert code == 200 and out["meta_latents"], (code, out)
top = ", ".join(f"{m['id']} {m['label']!r} {m['weight']:.2f}" for m in out["meta_latents"][:4])
print("METASAE_TOKEN: 401 without it, 401 with a wrong one, 200 with it")
print(f"/v1/encode {body}: 200 in {dt:.1f}s, fvu {out['fvu']:.2f}: {top}")

text = "Albert Einstein developed the theory of relativity in Berlin."
code, out, dt = call("/v1/activations", {"text": text, "width": widths[1], "top_k": 3}, timeout=600)
assert code == 200 and out["tokens"] and len(out["top"]) == len(out["tokens"]), (code, out)
assert any(out["top"]), "no token had an active latent"
print(f"/v1/activations (width {widths[1]}, {len(out['tokens'])} tokens, model loaded on first use): 200 in {dt:.1f}s")

from playwright.sync_api import sync_playwright

from metasae.browser import CHROMIUM_ARGS

with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=os.environ["CHROMIUM"], args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(180_000)
    t = time.monotonic()
    page.goto(app + "/")
    page.get_by_text("The ladder", exact=False).first.wait_for()  # the overview page's ladder section
    page.wait_for_function("!document.querySelector('[data-testid=stStatusWidget] "
                           "[data-testid=stStatusWidgetRunningIcon]') && !document.querySelector('[data-testid=stSpinner]')")
    page.wait_for_timeout(1000)
    main = page.locator("[data-testid='stMain']").inner_text()
    errors = page.locator("[data-testid='stException']").count()
    browser.close()
assert "Traceback" not in main and errors == 0, main[:2000]
print(f"app page in Chromium: {len(main)} characters of text, no traceback, in {time.monotonic() - t:.1f}s")
PY
echo "requests took $(($(date +%s) - t0)) s"

say "process users inside the container"
uids="$(docker exec "$name" sh -c 'for f in /proc/[0-9]*/status; do awk "/^Uid:/ {print \$2}" "$f" 2>/dev/null; done' | sort -u | tr '\n' ' ')"
echo "uids: $uids"
[ -n "$uids" ] || fail "no processes seen"
for u in $uids; do [ "$u" != 0 ] || fail "a process runs as root"; done
docker exec "$name" id

say "a set-but-empty METASAE_TOKEN is refused at start"
set +e
empty_out="$(timeout 120 docker run --name "$name-empty-token" --network host -e METASAE_TOKEN= \
  -e METASAE_BACKEND_HOST=127.0.0.1 -e "METASAE_BACKEND_PORT=$compose_port" "$image" backend 2>&1)"
empty_code=$?
set -e
docker rm -f "$name-empty-token" >/dev/null 2>&1 || true
echo "exit $empty_code: $(printf '%s\n' "$empty_out" | grep -m1 -i 'METASAE_TOKEN is set but empty' || true)"
if [ "$empty_code" = 0 ] || [ "$empty_code" = 124 ]; then
  fail "an empty METASAE_TOKEN did not stop the backend (exit $empty_code): $empty_out"
fi
printf '%s' "$empty_out" | grep -q 'METASAE_TOKEN is set but empty' || fail "no clear message for an empty token"

say "docker stop -t $grace"
t0=$("$py" -c 'import time; print(time.time())')
docker stop -t "$grace" "$name" >/dev/null
stop_s=$("$py" -c "import time; print(f'{time.time() - $t0:.1f}')")
exit_code=$(docker inspect -f '{{.State.ExitCode}}' "$name")
echo "stopped in $stop_s s, exit status $exit_code"
[ "$exit_code" = 143 ] || fail "exit status $exit_code after docker stop (143: its own SIGTERM handling; 137: SIGKILL)"
"$py" -c "import sys; sys.exit(0 if $stop_s < $grace else 1)" || fail "docker stop took ${stop_s}s (grace ${grace}s)"
docker logs "$name" 2>&1 | grep -E 'Traceback' && fail "a traceback in the container's log"
docker rm -f "$name" >/dev/null

# --- 4. compose.yaml ----------------------------------------------------------------------------------------------
say "compose.yaml: the profiles parse"
unset METASAE_TOKEN METASAE_BACKEND_URL METASAE_ALLOWED_HOSTS METASAE_PUBLIC_DOCS || true
for profile in single gpu-host cpu-host; do
  docker-compose -f compose.yaml --profile "$profile" config >"$tmp/config-$profile.yaml" || fail "compose config: $profile"
done
"$py" - "$tmp" <<'PY'
import sys

import yaml

tmp = sys.argv[1]
cfg = {p: yaml.safe_load(open(f"{tmp}/config-{p}.yaml"))["services"] for p in ("single", "gpu-host", "cpu-host")}
one, gpu, cpu = cfg["single"]["metasae"], cfg["gpu-host"]["backend"], cfg["cpu-host"]["app"]
for svc in (one, gpu, cpu):
    env = svc["environment"]
    assert env.get("METASAE_TOKEN") is None, "an unset METASAE_TOKEN must not be passed as a value (empty = error)"
    assert env["METASAE_ATLAS"] == "/atlas" and any(v.startswith(tuple("/.")) and v.endswith(":/atlas:ro")
                                                    for v in svc["volumes"]), svc["volumes"]
for svc in (one, gpu):
    assert svc["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
assert "deploy" not in cpu, "the app host needs no GPU"
assert one["command"] == ["all"] and one["ports"][0].startswith("127.0.0.1:8501:8501")
assert gpu["network_mode"] == "host" and gpu["environment"]["METASAE_RAY_ADDRESS"] == "127.0.0.1:6379"
assert "ray start --head" in gpu["command"][-1] and "entrypoint.sh backend" in gpu["command"][-1]
assert "METASAE_BACKEND_URL" in cpu["environment"] and "entrypoint.sh app" in cpu["command"][-1]
print("single: app + backend, GPU, app on 127.0.0.1:8501; gpu-host: backend + Ray head, GPU, host network; "
      "cpu-host: app -> METASAE_BACKEND_URL; no empty METASAE_TOKEN passed")
PY

say "compose.yaml: the single-host setup starts (without its GPU reservation) on 127.0.0.1:$compose_port"
METASAE_IMAGE="$image" METASAE_APP_PUBLISH="$compose_port" docker-compose -f compose.yaml --profile single config \
  >"$tmp/single.yaml"
"$py" - "$tmp/single.yaml" <<'PY'
import sys

import yaml

path = sys.argv[1]
cfg = yaml.safe_load(open(path))
svc = cfg["services"]["metasae"]
svc.pop("deploy")  # no NVIDIA runtime here
svc.pop("build")  # the image built above
svc.pop("profiles")  # the only service of this file
svc["restart"] = "no"
svc["healthcheck"] = {"interval": "3s"}
yaml.safe_dump(cfg, open(path.replace("single.yaml", "compose.yaml"), "w"))
PY
t0=$(date +%s)
docker-compose -p "$project" -f "$tmp/compose.yaml" up -d >"$tmp/compose-up.log" 2>&1 ||
  fail "docker-compose up failed: $(tail -5 "$tmp/compose-up.log")"
cid="$(docker-compose -p "$project" -f "$tmp/compose.yaml" ps -q metasae)"
[ -n "$cid" ] || fail "docker-compose up started no container: $(tail -5 "$tmp/compose-up.log")"
wait_healthy "$cid" "the compose container"
docker exec "$cid" sh -c 'test -z "${METASAE_TOKEN+set}"' || fail "compose passed a METASAE_TOKEN that was not set"
for _ in $(seq 1 60); do
  curl -fsS -m 5 "http://127.0.0.1:$compose_port/_stcore/health" >/dev/null 2>&1 && break
  sleep 2
done
curl -fsS -m 5 "http://127.0.0.1:$compose_port/_stcore/health" >/dev/null || fail "compose: the app does not answer"
echo "compose single: healthy after $(($(date +%s) - t0)) s, the app answers on 127.0.0.1:$compose_port"
docker-compose -p "$project" -f "$tmp/compose.yaml" down -v --timeout "$grace" >/dev/null 2>&1

if [ "${METASAE_CHECK_SPLIT:-1}" = 1 ]; then
  say "compose.yaml: the split setup starts here (gpu-host: backend + Ray head; cpu-host: app), a stitching job via Ray"
  read -r split_backend split_ray split_app < <(free_ports 3)
  METASAE_IMAGE="$image" METASAE_TOKEN="$token" METASAE_BACKEND_BIND=127.0.0.1 METASAE_BACKEND_PORT="$split_backend" \
    METASAE_RAY_PORT="$split_ray" docker-compose -f compose.yaml --profile gpu-host --profile cpu-host config \
    >"$tmp/split.yaml"
  "$py" - "$tmp" "$split_app" "$split_backend" <<'PY'
import sys

import yaml

tmp, app_port, backend_port = sys.argv[1:4]
cfg = yaml.safe_load(open(f"{tmp}/split.yaml"))
# `config` lists every service; keep the two of these profiles
cfg["services"] = {k: v for k, v in cfg["services"].items() if {"gpu-host", "cpu-host"} & set(v.get("profiles", []))}
assert set(cfg["services"]) == {"backend", "app"}, cfg["services"].keys()
for name, svc in cfg["services"].items():
    for key in ("deploy", "build", "profiles", "ports"):
        svc.pop(key, None)  # no NVIDIA runtime here; the image built above; one file for both hosts
    svc["restart"] = "no"
    svc["healthcheck"] = {"interval": "3s"}
    svc["network_mode"] = "host"  # both "hosts" are this machine: everything on loopback
svc = cfg["services"]["backend"]
svc["shm_size"] = "1gb"
app = cfg["services"]["app"]["environment"]
app.update(METASAE_APP_HOST="127.0.0.1", METASAE_APP_PORT=app_port,
           METASAE_BACKEND_URL=f"http://127.0.0.1:{backend_port}")
yaml.safe_dump(cfg, open(f"{tmp}/split-compose.yaml", "w"))
PY
  t0=$(date +%s)
  split_url="http://127.0.0.1:$split_backend"
  docker-compose -p "${project}split" -f "$tmp/split-compose.yaml" up -d >"$tmp/split-up.log" 2>&1 ||
    fail "docker-compose up (split) failed: $(tail -5 "$tmp/split-up.log")"
  for svc in backend app; do
    cid="$(docker-compose -p "${project}split" -f "$tmp/split-compose.yaml" ps -q "$svc")"
    [ -n "$cid" ] || fail "split: no $svc container"
    wait_healthy "$cid" "split: $svc"
  done
  echo "split: backend (Ray head) and app healthy after $(($(date +%s) - t0)) s"
  CHECK_BACKEND="$split_url" CHECK_TOKEN="$token" "$py" - <<'PY'
import json
import os
import time
import urllib.request

url, headers = os.environ["CHECK_BACKEND"], {"Content-Type": "application/json",
                                             "Authorization": f"Bearer {os.environ['CHECK_TOKEN']}"}
widths = sorted(s["width"] for s in json.load(open("data/manifest.json"))["saes"])
body = {"small": widths[0], "large": widths[1], "n_tokens": 512, "metrics": ["mse"]}
req = urllib.request.Request(url + "/v1/stitch", data=json.dumps(body).encode(), headers=headers)
job = json.loads(urllib.request.urlopen(req, timeout=60).read())["job_id"]
t = time.monotonic()
while True:
    j = json.loads(urllib.request.urlopen(urllib.request.Request(f"{url}/v1/jobs/{job}", headers=headers),
                                          timeout=30).read())
    if j["status"] in ("done", "failed", "cancelled") or time.monotonic() - t > 600:
        break
    time.sleep(2)
assert j["status"] == "done", j
kinds = j["result"]["kind"]
print(f"split: stitching job {body['small']}->{body['large']} on {j['result']['n_tokens']} tokens through the Ray "
      f"head: done in {time.monotonic() - t:.0f}s, {kinds.count('novel')}/{len(kinds)} novel")
PY
  docker-compose -p "${project}split" -f "$tmp/split-compose.yaml" logs backend 2>&1 | grep -q "Connected to Ray cluster" ||
    fail "split: the backend did not use the Ray head"
  docker-compose -p "${project}split" -f "$tmp/split-compose.yaml" down -v --timeout "$grace" >/dev/null 2>&1
fi

say "container check passed"
echo "image $image: $size, build time $build_s, healthy after $healthy_s s, docker stop in $stop_s s," \
  "whole check $(($(date +%s) - t_start)) s"
