#!/usr/bin/env bash
# Container entrypoint: runs the metasae backend (FastAPI, GPU when there is one) and/or the dashboard.
#
#   entrypoint.sh [MODE] [ARGS...]      MODE: all (default) | backend | app; else $METASAE_MODE
#   entrypoint.sh COMMAND [ARGS...]     any other command on PATH runs as is (metasae info /atlas, bash, ...)
#
#   all      backend on $METASAE_BACKEND_HOST:$METASAE_BACKEND_PORT and the app on
#            $METASAE_APP_HOST:$METASAE_APP_PORT, the app pointed at the backend (METASAE_BACKEND_URL)
#   backend  the backend alone (a GPU host serving an app that runs elsewhere; set METASAE_TOKEN)
#   app      the app alone; it uses $METASAE_BACKEND_URL when set, else starts a backend itself on first need
# ARGS are appended to the backend command (all, backend) or to `streamlit run` (app).
#
# Environment: METASAE_ATLAS (atlas folder, default <app dir>/data), METASAE_TOKEN (bearer token the backend
# requires and the app sends; passed by environment, never on a command line), METASAE_RAY_ADDRESS (Ray
# cluster for stitching jobs: --ray-address), METASAE_BACKEND_HOST/PORT (0.0.0.0/8000), METASAE_APP_HOST/PORT
# (0.0.0.0/8501), METASAE_BACKEND_URL (app mode), METASAE_STOP_GRACE (seconds between SIGTERM and SIGKILL
# when stopping children, whole seconds, default 20), METASAE_RUN_DIR (where the mode is noted for the HEALTHCHECK, /tmp).
#
# In `all` mode this script stays the parent of both children: SIGTERM/SIGINT stop them (SIGTERM, then
# SIGKILL after the grace period) and it exits 143/130; when either child exits, the other one is stopped and
# the script exits with the child's status (1 if that was 0: a service that stops on its own is a failure,
# so restart policies see it). Single modes exec the command (signals reach it directly).
set -euo pipefail

log() { printf 'entrypoint: %s\n' "$*" >&2; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
app_dir="${METASAE_APP_DIR:-$(dirname "$here")}"

mode="${METASAE_MODE:-all}"
if [ $# -gt 0 ]; then
  case "$1" in
    all | backend | app)
      mode="$1"
      shift
      ;;
    -*) ;; # options for the default mode's command
    *)
      if command -v -- "$1" >/dev/null 2>&1; then
        exec "$@"
      fi
      log "unknown mode or command '$1' (modes: all, backend, app)"
      exit 64
      ;;
  esac
fi
case "$mode" in
  all | backend | app) ;;
  *)
    log "unknown METASAE_MODE '$mode' (modes: all, backend, app)"
    exit 64
    ;;
esac

# the HEALTHCHECK (docker/healthcheck.py) reads the mode from here: it does not see our arguments
printf '%s\n' "$mode" >"${METASAE_RUN_DIR:-/tmp}/metasae.mode" 2>/dev/null || true

export METASAE_ATLAS="${METASAE_ATLAS:-$app_dir/data}"
backend_host="${METASAE_BACKEND_HOST:-0.0.0.0}"
backend_port="${METASAE_BACKEND_PORT:-8000}"
app_host="${METASAE_APP_HOST:-0.0.0.0}"
app_port="${METASAE_APP_PORT:-8501}"
grace="${METASAE_STOP_GRACE:-20}"
case "$grace" in
  '' | *[!0-9]*)
    log "METASAE_STOP_GRACE must be whole seconds, got '$grace': using 20"
    grace=20
    ;;
esac
cd "$app_dir"

backend_cmd=(metasae backend --atlas "$METASAE_ATLAS" --host "$backend_host" --port "$backend_port")
if [ -n "${METASAE_RAY_ADDRESS:-}" ]; then
  backend_cmd+=(--ray-address "$METASAE_RAY_ADDRESS")
fi
app_cmd=(streamlit run "$app_dir/app.py" --server.address "$app_host" --server.port "$app_port"
  --server.headless true --browser.gatherUsageStats false)

if [ "$mode" != app ]; then
  [ -f "$METASAE_ATLAS/manifest.json" ] || log "warning: $METASAE_ATLAS has no manifest.json (mount an atlas, set METASAE_ATLAS)"
  if [ -z "${METASAE_TOKEN:-}" ] && [ "$backend_host" != 127.0.0.1 ] && [ "$backend_host" != localhost ]; then
    log "warning: the backend listens on $backend_host without METASAE_TOKEN: anyone who reaches port $backend_port can use it"
  fi
fi

case "$mode" in
  backend)
    log "mode backend: ${backend_cmd[*]} $*"
    exec "${backend_cmd[@]}" "$@"
    ;;
  app)
    log "mode app on $app_host:$app_port, backend ${METASAE_BACKEND_URL:-(started by the app on first need)}"
    exec "${app_cmd[@]}" "$@"
    ;;
esac

# mode all: two children, supervised here (wait -n -p needs bash >= 5.1)
if [ "${BASH_VERSINFO[0]}" -lt 5 ] || { [ "${BASH_VERSINFO[0]}" -eq 5 ] && [ "${BASH_VERSINFO[1]}" -lt 1 ]; }; then
  log "mode all needs bash >= 5.1 (this is $BASH_VERSION)"
  exit 70
fi
export METASAE_BACKEND_URL="http://127.0.0.1:$backend_port"
pids=()
names=()
stop_signal=""

alive() { # the children still running (bash reaps exited ones as they end)
  local p
  for p in "${pids[@]}"; do
    if kill -0 "$p" 2>/dev/null; then
      printf '%s\n' "$p"
    fi
  done
}

stop_children() { # SIGTERM, then SIGKILL to whatever still runs after the grace period
  local p ticks=0
  kill "$waker" 2>/dev/null || true
  for p in "${pids[@]}"; do
    kill -s TERM "$p" 2>/dev/null || true
  done
  while [ -n "$(alive)" ] && [ "$ticks" -lt $((grace * 10)) ]; do
    sleep 0.1
    ticks=$((ticks + 1))
  done
  for p in $(alive); do
    log "process $p ignored SIGTERM for ${grace}s: SIGKILL"
    kill -s KILL "$p" 2>/dev/null || true
  done
  wait 2>/dev/null || true
}

# shellcheck disable=SC2317  # invoked by the traps below
on_signal() {
  stop_signal="$1"
  # a signal that lands just before `wait -n` starts would not interrupt it; the waker's death always does
  kill "$waker" 2>/dev/null || true
  log "got SIG$1: stopping the backend and the app"
}
sleep infinity >/dev/null 2>&1 &
waker=$!
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT

log "mode all: backend on $backend_host:$backend_port, app on $app_host:$app_port (METASAE_BACKEND_URL=$METASAE_BACKEND_URL)"
"${backend_cmd[@]}" "$@" &
pids+=($!)
names+=(backend)
"${app_cmd[@]}" &
pids+=($!)
names+=(app)

set +e
died=""
code=0
while [ -z "$stop_signal" ] && [ -z "${died:-}" ]; do
  wait -n -p died "${pids[@]}" "$waker" # returns early (status > 128) when a trapped signal arrives
  code=$?
  if [ "${died:-}" = "$waker" ]; then
    died=""
  fi
  if [ -z "$stop_signal" ] && [ -z "${died:-}" ] && [ "$code" -eq 127 ]; then
    died=unknown # no child left to wait for
  fi
done

if [ -n "$stop_signal" ]; then
  # TERM for both: background children of a non-interactive shell ignore SIGINT
  stop_children
  case "$stop_signal" in
    INT) exit 130 ;;
    *) exit 143 ;;
  esac
fi

for i in "${!pids[@]}"; do
  if [ "${pids[$i]}" = "${died:-}" ]; then
    log "the ${names[$i]} exited with status $code: stopping the other process"
  fi
done
trap - TERM INT
stop_children
if [ "$code" -eq 0 ]; then
  code=1
fi
exit "$code"
