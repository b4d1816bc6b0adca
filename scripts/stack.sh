#!/usr/bin/env bash
# The shared services of the scale-out path on one machine, without docker-compose:
#   PostgreSQL databases (MLflow backend, Optuna studies[, Prefect]) in a PostgreSQL that already runs,
#   `mlflow server` on the PostgreSQL backend with a proxied local artifact store,
#   a Prefect server with its own PREFECT_HOME, a `process` work pool and N Prefect workers.
# All state lives under $STACK_DIR (default .stack/): logs, pid files, artifacts, Prefect's home and
# the env file that points clients at the services. `down` stops only the processes whose pid files
# it wrote (checked against their start time, so a reused pid is never signalled).
#
#   scripts/stack.sh up [--workers N] [--no-prefect]   start (idempotent: running services are kept)
#   scripts/stack.sh down [--purge]                    stop; --purge also drops the databases and $STACK_DIR
#   scripts/stack.sh status                            what runs, and the URLs
#   scripts/stack.sh env                               the env file: `source .stack/env` (or eval "$(... env)")
#
# Settings (environment):
#   STACK_DIR (.stack)               all state
#   STACK_HOST (127.0.0.1)           interface the servers bind (0.0.0.0: other machines too)
#   STACK_ADVERTISE_HOST             host written to the env file (STACK_HOST; `hostname -f` for 0.0.0.0)
#   STACK_MLFLOW_PORT (5001), STACK_PREFECT_PORT (4201), STACK_MLFLOW_WORKERS (1)
#   STACK_WORKERS (2), STACK_POOL    Prefect workers and their pool (prefect.yaml's, else vae-pool)
#   STACK_PG (postgresql+psycopg://postgres@127.0.0.1:5432)   the PostgreSQL server, no database
#   STACK_DB_PREFIX (vae)            databases <prefix>_mlflow, <prefix>_optuna[, <prefix>_prefect]
#   STACK_PREFECT_DB (sqlite)        sqlite (in STACK_DIR) or postgres (asyncpg) for the Prefect server
#   PY (.venv/bin/python)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
[[ $PY = /* ]] || PY="$PWD/$PY"
BIN=$(dirname "$PY")
STACK_DIR=$(mkdir -p "${STACK_DIR:-$ROOT/.stack}" && cd "${STACK_DIR:-$ROOT/.stack}" && pwd)
# The settings of the last `up` in this folder fill in what is not given again, so `status` and
# `down` (and `down --purge`: which databases) address the stack that `up` started.
if [ -f "$STACK_DIR/settings" ]; then . "$STACK_DIR/settings"; fi
STACK_HOST=${STACK_HOST:-127.0.0.1}
STACK_MLFLOW_PORT=${STACK_MLFLOW_PORT:-5001}
STACK_PREFECT_PORT=${STACK_PREFECT_PORT:-4201}
STACK_WORKERS=${STACK_WORKERS:-2}
STACK_PG=${STACK_PG:-postgresql+psycopg://postgres@127.0.0.1:5432}
STACK_DB_PREFIX=${STACK_DB_PREFIX:-vae}
STACK_PREFECT_DB=${STACK_PREFECT_DB:-sqlite}
STACK_MLFLOW_WORKERS=${STACK_MLFLOW_WORKERS:-1}
STACK_START_TIMEOUT=${STACK_START_TIMEOUT:-120}

pool_from_prefect_yaml() {  # the first `work_pool: name:` in prefect.yaml, if any
  [ -f "$ROOT/prefect.yaml" ] || return 0
  awk '/work_pool:/ {wp=1; next} wp && /name:/ {gsub(/["'"'"']/, "", $2); print $2; exit}' "$ROOT/prefect.yaml"
}
STACK_POOL=${STACK_POOL:-$(pool_from_prefect_yaml)}
STACK_POOL=${STACK_POOL:-vae-pool}

# The host clients use: STACK_HOST, or this machine's name when the services bind every interface.
STACK_ADVERTISE_HOST=${STACK_ADVERTISE_HOST:-$([ "$STACK_HOST" = 0.0.0.0 ] && hostname -f || echo "$STACK_HOST")}
MLFLOW_URL="http://$STACK_ADVERTISE_HOST:$STACK_MLFLOW_PORT"
PREFECT_URL="http://$STACK_ADVERTISE_HOST:$STACK_PREFECT_PORT/api"
PG_OPTUNA="$STACK_PG/${STACK_DB_PREFIX}_optuna"
PG_MLFLOW="$STACK_PG/${STACK_DB_PREFIX}_mlflow"
PG_PREFECT="${STACK_PG/+psycopg/+asyncpg}/${STACK_DB_PREFIX}_prefect"
PIDS="$STACK_DIR/pids"
LOGS="$STACK_DIR/logs"
export DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false

say() { printf 'stack: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

# --- processes: started in their own session (pgid = pid), recorded as "pid start-time" -----------
start_time() { [ -r "/proc/$1/stat" ] && awk '{print $22}' "/proc/$1/stat" 2>/dev/null || echo "?"; }

alive() {  # alive NAME: the recorded process still runs (same pid AND same start time)
  local f="$PIDS/$1.pid" pid st
  [ -f "$f" ] || return 1
  read -r pid st < "$f"
  kill -0 "$pid" 2>/dev/null || return 1
  [ "$st" = "?" ] || [ "$(start_time "$pid")" = "$st" ]
}

launch() {  # launch NAME CMD...: run detached with its own process group, log to logs/NAME.log
  local name=$1; shift
  mkdir -p "$PIDS" "$LOGS"
  setsid "$@" > "$LOGS/$name.log" 2>&1 < /dev/null &
  local pid=$!
  echo "$pid $(start_time "$pid")" > "$PIDS/$name.pid"
}

stop() {  # stop NAME...: SIGTERM to each group, then SIGINT (Prefect workers), then SIGKILL
  local name pid st sig left=() pids=()
  for name in "$@"; do
    if alive "$name"; then read -r pid st < "$PIDS/$name.pid"; pids+=("$pid"); left+=("$name"); fi
    rm -f "$PIDS/$name.pid"
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  for sig in TERM INT KILL; do
    for pid in "${pids[@]}"; do kill -s "$sig" -- "-$pid" 2>/dev/null || true; done
    for _ in $(seq 32); do  # up to 8 s per signal (a Prefect worker may ignore SIGTERM)
      pgrep -g "$(IFS=,; echo "${pids[*]}")" > /dev/null 2>&1 || break 2
      sleep 0.25
    done
  done
  say "stopped ${left[*]}"
}

http_ok() {  # http_ok URL: the URL answers 2xx (curl, or Python where curl is missing)
  if command -v curl > /dev/null; then curl -sf -o /dev/null --max-time 5 "$1"
  else "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" "$1" 2> /dev/null; fi
}

wait_http() {  # wait_http NAME URL: until URL answers 200, the process dies or the timeout passes
  local name=$1 url=$2 t0=$SECONDS
  until http_ok "$url"; do
    alive "$name" || { tail -n 30 "$LOGS/$name.log" >&2; die "$name exited during start-up (log: $LOGS/$name.log)"; }
    (( SECONDS - t0 < STACK_START_TIMEOUT )) || die "$name did not answer $url within ${STACK_START_TIMEOUT}s (log: $LOGS/$name.log)"
    sleep 0.5
  done
  say "$name answers on $url after $((SECONDS - t0))s"
}

# --- PostgreSQL ------------------------------------------------------------------------------------
pg() {  # pg SQL...: run statements on the server's maintenance database (autocommit)
  "$PY" - "$STACK_PG" "$@" <<'EOF'
import sys
import psycopg
url = sys.argv[1].replace("postgresql+psycopg://", "postgresql://")
with psycopg.connect(url + "/postgres", autocommit=True, connect_timeout=5) as conn:
    for sql in sys.argv[2:]:
        conn.execute(sql)
EOF
}

pg_check() {
  pg "SELECT 1" 2> /dev/null || die "PostgreSQL does not answer at $STACK_PG. Start the machine's server, or
  Debian's package: sudo apt-get install postgresql && sudo service postgresql start, then
  sudo -u postgres psql -c \"ALTER USER postgres PASSWORD 'pw'\" and
  STACK_PG=postgresql+psycopg://postgres:pw@127.0.0.1:5432 scripts/stack.sh up"
}

create_db() {  # create_db NAME, unless it exists
  "$PY" - "$STACK_PG" "$1" <<'EOF'
import sys
import psycopg
from psycopg import sql
url, name = sys.argv[1].replace("postgresql+psycopg://", "postgresql://"), sys.argv[2]
with psycopg.connect(url + "/postgres", autocommit=True, connect_timeout=5) as conn:
    if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        print(f"stack: created database {name}", file=sys.stderr)
EOF
}

drop_dbs() {  # drop_dbs NAME...: drop the databases (and their open connections) if they exist
  "$PY" - "$STACK_PG" "$@" <<'EOF'
import sys
import psycopg
from psycopg import sql
url = sys.argv[1].replace("postgresql+psycopg://", "postgresql://")
with psycopg.connect(url + "/postgres", autocommit=True, connect_timeout=5) as conn:
    for name in sys.argv[2:]:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
            print(f"stack: dropped database {name}", file=sys.stderr)
EOF
}

# --- services --------------------------------------------------------------------------------------
up_databases() {
  pg_check
  create_db "${STACK_DB_PREFIX}_mlflow"
  create_db "${STACK_DB_PREFIX}_optuna"
  if [ "$STACK_PREFECT_DB" = postgres ]; then create_db "${STACK_DB_PREFIX}_prefect"; fi
  # Optuna's schema once, here: workers that all create it at their first connection would race.
  "$PY" -c "import optuna, sys; optuna.logging.set_verbosity(optuna.logging.WARNING); optuna.storages.RDBStorage(sys.argv[1])" "$PG_OPTUNA"
}

start_mlflow() {
  if alive mlflow; then say "mlflow already runs"; return; fi
  mkdir -p "$STACK_DIR/mlflow/artifacts"
  # Job execution (huey consumers for GenAI jobs) is off: 7 idle processes this project never uses.
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} \
    launch mlflow "$BIN/mlflow" server --backend-store-uri "$PG_MLFLOW" \
    --serve-artifacts --artifacts-destination "$STACK_DIR/mlflow/artifacts" \
    --host "$STACK_HOST" --port "$STACK_MLFLOW_PORT" --workers "$STACK_MLFLOW_WORKERS"
}

prefect_env() {  # the environment of the Prefect server, the CLI calls and the workers
  export PREFECT_HOME="$STACK_DIR/prefect" PREFECT_API_URL="$PREFECT_URL"
  if [ "$STACK_PREFECT_DB" = postgres ]; then
    export PREFECT_API_DATABASE_CONNECTION_URL="$PG_PREFECT"
  fi
}

start_prefect() {
  prefect_env
  if alive prefect; then say "prefect already runs"; return; fi
  launch prefect "$BIN/prefect" server start --host "$STACK_HOST" --port "$STACK_PREFECT_PORT" --analytics-off
}

up_pool() {
  prefect_env
  "$BIN/prefect" --no-prompt work-pool inspect "$STACK_POOL" > /dev/null 2>&1 \
    || "$BIN/prefect" --no-prompt work-pool create "$STACK_POOL" --type process > /dev/null
  say "work pool $STACK_POOL (process)"
}

up_workers() {
  local n=$1 i
  prefect_env
  # Flow runs inherit the worker's environment: they log to the tracking server, store trials in
  # PostgreSQL, and run from the checkout (the deployments' pull step sets the working directory).
  export MLFLOW_TRACKING_URI="$MLFLOW_URL" VAE_OPTUNA_STORAGE="$PG_OPTUNA"
  for ((i = 1; i <= n; i++)); do
    alive "worker-$i" && continue
    (cd "$ROOT" && launch "worker-$i" "$BIN/prefect" worker start --pool "$STACK_POOL" --type process \
      --name "$(hostname)-stack-$i" --install-policy never)
  done
  # Workers beyond N from an earlier `up` are stopped.
  for f in "$PIDS"/worker-*.pid; do
    [ -e "$f" ] || continue
    i=${f##*/worker-}; i=${i%.pid}
    if (( i > n )); then stop "worker-$i"; fi
  done
  say "$n worker(s) on pool $STACK_POOL"
}

write_settings() {
  local var
  for var in STACK_HOST STACK_ADVERTISE_HOST STACK_MLFLOW_PORT STACK_PREFECT_PORT STACK_PG STACK_DB_PREFIX \
             STACK_PREFECT_DB STACK_POOL STACK_MLFLOW_WORKERS; do
    printf '[ -n "${%s:-}" ] || %s=%q\n' "$var" "$var" "${!var}"
  done > "$STACK_DIR/settings"
}

write_env() {
  {
    echo "# The stack's services: source this file (written by scripts/stack.sh up)."
    echo "export MLFLOW_TRACKING_URI=$MLFLOW_URL"
    if alive prefect; then echo "export PREFECT_API_URL=$PREFECT_URL"; fi
    echo "export VAE_OPTUNA_STORAGE=$PG_OPTUNA"
  } > "$STACK_DIR/env"
}

cmd_up() {
  local workers=$STACK_WORKERS prefect=1
  while [ $# -gt 0 ]; do
    case $1 in
      --workers) workers=$2; shift 2 ;;
      --workers=*) workers=${1#*=}; shift ;;
      --no-prefect) prefect=0; shift ;;
      *) die "unknown option for up: $1" ;;
    esac
  done
  [ -x "$PY" ] || die "no Python at $PY (run make install, or set PY)"
  write_settings
  up_databases
  start_mlflow  # both servers start side by side; each is waited for below
  if [ "$prefect" = 1 ]; then start_prefect; fi
  wait_http mlflow "$MLFLOW_URL/health"
  if [ "$prefect" = 1 ]; then
    wait_http prefect "$PREFECT_URL/health"
    up_pool
    up_workers "$workers"
  fi
  write_env
  cmd_env
}

cmd_down() {
  local f name names=()
  for f in "$PIDS"/*.pid; do
    [ -e "$f" ] || continue
    name=${f##*/}; names+=("${name%.pid}")
  done
  stop "${names[@]}"
  if [ "${1:-}" = "--purge" ]; then
    drop_dbs "${STACK_DB_PREFIX}_mlflow" "${STACK_DB_PREFIX}_optuna" "${STACK_DB_PREFIX}_prefect"
    rm -rf "$STACK_DIR"
    say "removed $STACK_DIR"
  fi
}

cmd_status() {
  local f name pid st rc=0
  printf '%-12s %-8s %s\n' SERVICE PID STATE
  for f in "$PIDS"/*.pid; do
    [ -e "$f" ] || { echo "(nothing started from $STACK_DIR)"; return 3; }
    name=${f##*/}; name=${name%.pid}
    read -r pid st < "$f"
    if alive "$name"; then printf '%-12s %-8s %s\n' "$name" "$pid" running
    else printf '%-12s %-8s %s\n' "$name" "$pid" "dead (log: $LOGS/$name.log)"; rc=1; fi
  done
  http_ok "$MLFLOW_URL/health" && echo "mlflow   $MLFLOW_URL  healthy" || { echo "mlflow   $MLFLOW_URL  not answering"; rc=1; }
  if [ -f "$PIDS/prefect.pid" ]; then
    http_ok "$PREFECT_URL/health" && echo "prefect  $PREFECT_URL  healthy (pool $STACK_POOL)" \
      || { echo "prefect  $PREFECT_URL  not answering"; rc=1; }
  fi
  pg "SELECT 1" 2> /dev/null && echo "postgres $STACK_PG  answers (databases ${STACK_DB_PREFIX}_*)" \
    || { echo "postgres $STACK_PG  not answering"; rc=1; }
  return $rc
}

cmd_env() {
  [ -f "$STACK_DIR/env" ] || die "no $STACK_DIR/env: run scripts/stack.sh up first"
  cat "$STACK_DIR/env"
}

case ${1:-} in
  up) shift; cmd_up "$@" ;;
  down) shift; cmd_down "$@" ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
