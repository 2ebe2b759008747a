#!/usr/bin/env bash
# Scale-out check: 3 ce-eval replicas sharing one PostgreSQL behind nginx (HTTP and gRPC), then
# one run pushed by several concurrent clients (every batch sent twice) through nginx must show
# exact totals. Exits 1 if any step failed.
#
#   scripts/scale-smoke.sh                  # compose `scale` profile when a Docker engine with
#                                           # networking is up, else the same processes locally
#   scripts/scale-smoke.sh --mode process   # replicas + nginx + PostgreSQL as local processes
#   scripts/scale-smoke.sh --mode compose   # docker compose --profile scale
# Process mode needs nginx and the PostgreSQL server binaries (initdb, pg_ctl) and uses
# .venv/bin/ce-eval (override with CE_EVAL_BIN) and .venv/bin/python for the checks.
set -uo pipefail
cd "$(dirname "$0")/.."

REPLICAS=3
CLIENTS=${CE_SCALE_CLIENTS:-8}
BATCHES=${CE_SCALE_BATCHES:-24}
MODE=auto
[[ "${1:-}" == --mode ]] && MODE=${2:?--mode needs process or compose}
PYTHON=${PYTHON:-.venv/bin/python}
CE_EVAL_BIN=${CE_EVAL_BIN:-.venv/bin/ce-eval}
STEPS=healthz,readyz,evaluate,pages,balance,grpc,run-push,metrics
CHECK_ARGS=(--steps "$STEPS" --expect-upstreams "$REPLICAS" --clients "$CLIENTS" --batches "$BATCHES")

if [[ "$MODE" == auto ]]; then
    MODE=process
    if docker compose version >/dev/null 2>&1 && docker info >/dev/null 2>&1 \
       && docker network inspect bridge >/dev/null 2>&1; then
        MODE=compose
    fi
fi
echo "scale smoke: mode $MODE, $REPLICAS replicas, $CLIENTS clients, $BATCHES batches (each sent twice)"

if [[ "$MODE" == compose ]]; then
    project=ce-eval-scale-$$
    compose=(docker compose -p "$project" --profile scale)
    trap '"${compose[@]}" down -v --remove-orphans >/dev/null 2>&1' EXIT
    "${compose[@]}" up -d --build --wait || { echo "FAIL compose up"; exit 1; }
    status=0
    "$PYTHON" scripts/smoke_checks.py --url http://127.0.0.1:8080 --grpc 127.0.0.1:50052 \
        "${CHECK_ARGS[@]}" || status=1
    exit "$status"
fi

# ---- process mode ------------------------------------------------------------------------------
for tool in nginx; do
    command -v "$tool" >/dev/null || { echo "FAIL setup: $tool not found"; exit 1; }
done
PG_BIN=$(dirname "$(command -v pg_ctl 2>/dev/null || ls /usr/lib/postgresql/*/bin/pg_ctl 2>/dev/null | tail -n1)")
[[ -x "$PG_BIN/initdb" ]] || { echo "FAIL setup: PostgreSQL server binaries (initdb, pg_ctl) not found"; exit 1; }
[[ -x "$CE_EVAL_BIN" ]] || { echo "FAIL setup: $CE_EVAL_BIN not found (make install the venv first)"; exit 1; }

work=$(mktemp -d /tmp/ce-eval-scale.XXXXXX)
chmod 755 "$work"
pids=()
free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
as_postgres() {
    if [[ $(id -u) == 0 ]]; then su postgres -s /bin/sh -c "$*"; else sh -c "$*"; fi
}
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null; done
    [[ -f "$work/nginx.pid" ]] && nginx -p "$work" -c "$work/nginx.conf" -e "$work/nginx-error.log" -s stop 2>/dev/null
    [[ -d "$work/pg" ]] && as_postgres "$PG_BIN/pg_ctl -D $work/pg -m fast stop" >/dev/null 2>&1
    rm -rf "$work"
}
trap cleanup EXIT

pg_port=$(free_port)
mkdir "$work/pg"
[[ $(id -u) == 0 ]] && chown postgres "$work/pg"
as_postgres "$PG_BIN/initdb -D $work/pg -U ce_eval --auth=trust >/dev/null" \
  && as_postgres "$PG_BIN/pg_ctl -D $work/pg -o \"-k $work/pg -p $pg_port -h 127.0.0.1\" -l $work/pg/log -w start >/dev/null" \
  || { echo "FAIL setup: PostgreSQL did not start"; exit 1; }
echo "PASS postgres: 127.0.0.1:$pg_port"
database_url="postgresql+psycopg://ce_eval@127.0.0.1:$pg_port/postgres"

http_servers=""
grpc_servers=""
for i in $(seq "$REPLICAS"); do
    http_port=$(free_port); grpc_port=$(free_port)
    CE_EVAL_PORT=$http_port CE_EVAL_GRPC_PORT=$grpc_port CE_EVAL_DATABASE_URL=$database_url \
        CE_EVAL_BACKEND=numpy CE_EVAL_LOG_LEVEL=warning \
        "$CE_EVAL_BIN" serve >"$work/replica-$i.log" 2>&1 &
    pids+=($!)
    http_servers+="        server 127.0.0.1:$http_port;\n"
    grpc_servers+="        server 127.0.0.1:$grpc_port;\n"
    replica_ports+=("$http_port")
done

lb_http=$(free_port); lb_grpc=$(free_port)
# The repository's nginx.conf with the replica addresses and ports of this machine.
sed -e "s#^ *server ce-eval-replica:8000;#${http_servers}#" \
    -e "s#^ *server ce-eval-replica:50051;#${grpc_servers}#" \
    -e "s#listen 8080;#listen 127.0.0.1:$lb_http;#" \
    -e "s#listen 50052 http2;#listen 127.0.0.1:$lb_grpc http2;#" \
    -e "s#/tmp/#$work/#g" deploy/nginx/nginx.conf >"$work/nginx.conf"
if ! nginx -q -t -p "$work" -c "$work/nginx.conf" -e "$work/nginx-error.log"; then
    echo "FAIL setup: nginx rejected the configuration"; exit 1
fi

for i in $(seq "$REPLICAS"); do
    port=${replica_ports[$((i - 1))]}
    for _ in $(seq 60); do
        curl -fs "http://127.0.0.1:$port/healthz" >/dev/null && break
        kill -0 "${pids[$((i - 1))]}" 2>/dev/null || break
        sleep 0.5
    done
    if curl -fs "http://127.0.0.1:$port/healthz" >/dev/null; then
        echo "PASS replica $i: http://127.0.0.1:$port"
    else
        echo "FAIL replica $i did not become healthy:"; tail -n 20 "$work/replica-$i.log"; exit 1
    fi
done
nginx -p "$work" -c "$work/nginx.conf" -e "$work/nginx-error.log" \
    || { echo "FAIL setup: nginx did not start"; exit 1; }
echo "PASS nginx: HTTP 127.0.0.1:$lb_http, gRPC 127.0.0.1:$lb_grpc"

"$PYTHON" scripts/smoke_checks.py --url "http://127.0.0.1:$lb_http" --grpc "127.0.0.1:$lb_grpc" \
    "${CHECK_ARGS[@]}"
