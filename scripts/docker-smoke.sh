#!/usr/bin/env bash
# Container smoke test: build the image, run it read-only as non-root with /app/data mounted the
# way docker-compose.yml mounts it (its tmpfs options and TMPDIR/SQLITE_TMPDIR/CUPY_CACHE_DIR),
# wait for health, evaluate over HTTP and gRPC, push a small run into the SQLite store on
# /app/data, check /metrics, stop it with SIGTERM (graceful drain).
# Every step runs and reports PASS/FAIL; the script exits 1 if any step failed.
#
#   scripts/docker-smoke.sh                        # CPU image, ports published on 127.0.0.1
#   CE_SMOKE_VARIANT=gpu scripts/docker-smoke.sh   # GPU image (needs --gpus; see README)
# Environment: DOCKER (docker CLI, default docker), CE_SMOKE_IMAGE (tag, default ce-eval:smoke),
# CE_SMOKE_SKIP_BUILD=1 (reuse the tag), CE_SMOKE_NETWORK=host (engines without bridge
# networking), CE_SMOKE_CA_BUNDLE=path (CA bundle handed to pip as a build secret),
# CE_SMOKE_DATA=tmpfs (default: compose's /app/data tmpfs) or volume (a named volume, which the
# engine fills from the image's /app/data, ownership included).
set -uo pipefail
cd "$(dirname "$0")/.."

DOCKER=${DOCKER:-docker}
IMAGE=${CE_SMOKE_IMAGE:-ce-eval:smoke}
VARIANT=${CE_SMOKE_VARIANT:-cpu}
NETWORK=${CE_SMOKE_NETWORK:-bridge}
DATA=${CE_SMOKE_DATA:-tmpfs}
COMPOSE_YML=docker-compose.yml
NAME=ce-eval-smoke-$$
VOLUME=ce-eval-smoke-data-$$
PYTHON=${PYTHON:-python3}
failed=()

free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
step() { printf '\n== %s\n' "$1"; }
pass() { printf 'PASS %s\n' "$1"; }
fail() { printf 'FAIL %s\n' "$1"; failed+=("$1"); }
cleanup() {
    "$DOCKER" rm -f "$NAME" >/dev/null 2>&1 || true
    "$DOCKER" volume rm -f "$VOLUME" >/dev/null 2>&1 || true
}
trap cleanup EXIT

# The ce-eval service's `tmpfs:` entry for /app/data and its `environment:` value of a variable,
# read from the compose file so that the smoke run mounts exactly what compose mounts.
compose_tmpfs() { sed -nE 's/^[[:space:]]*-[[:space:]]*"?(\/app\/data(:[^" ]*)?)"?[[:space:]]*$/\1/p' "$COMPOSE_YML" | head -n 1; }
compose_env() { sed -nE "s/^[[:space:]]*$1:[[:space:]]*\"?([^\" ]+)\"?[[:space:]]*$/\1/p" "$COMPOSE_YML" | head -n 1; }

HTTP_PORT=$(free_port)
GRPC_PORT=$(free_port)

step "build $IMAGE (VARIANT=$VARIANT)"
if [[ "${CE_SMOKE_SKIP_BUILD:-0}" == 1 ]]; then
    pass "build (skipped, reusing $IMAGE)"
else
    build_args=(--build-arg "VARIANT=$VARIANT" -t "$IMAGE")
    [[ "$NETWORK" == host ]] && build_args+=(--network host)
    [[ -n "${CE_SMOKE_CA_BUNDLE:-}" ]] && build_args+=(--secret "id=pipca,src=$CE_SMOKE_CA_BUNDLE")
    if DOCKER_BUILDKIT=1 "$DOCKER" build --quiet "${build_args[@]}" .; then
        pass build
    else
        fail build
        printf '\nsmoke FAILED: the image did not build\n'
        exit 1
    fi
fi

step "run (read-only root, non-root, no capabilities, /app/data as $DATA)"
run_args=(-d --name "$NAME" --read-only --cap-drop ALL --security-opt no-new-privileges
          -e CE_EVAL_LOG_FORMAT=text)
if [[ "$DATA" == volume ]]; then
    run_args+=(-v "$VOLUME:/app/data")
else
    tmpfs=$(compose_tmpfs)
    if [[ "$tmpfs" == /app/data:* ]]; then
        pass "compose mounts --tmpfs $tmpfs"
    else
        fail "compose file has no /app/data tmpfs with options (found '${tmpfs}')"
        tmpfs=/app/data
    fi
    run_args+=(--tmpfs "$tmpfs")
    for variable in TMPDIR SQLITE_TMPDIR CUPY_CACHE_DIR; do
        value=$(compose_env "$variable")
        if [[ -n "$value" ]]; then run_args+=(-e "$variable=$value"); else
            fail "compose sets no $variable"
        fi
    done
fi
[[ "$VARIANT" == gpu ]] && run_args+=(--gpus all)
if [[ "$NETWORK" == host ]]; then
    run_args+=(--network host -e "CE_EVAL_PORT=$HTTP_PORT" -e "CE_EVAL_GRPC_PORT=$GRPC_PORT")
    INNER_GRPC_PORT=$GRPC_PORT
else
    run_args+=(-p "127.0.0.1:$HTTP_PORT:8000" -p "127.0.0.1:$GRPC_PORT:50051")
    INNER_GRPC_PORT=50051
fi
if "$DOCKER" run "${run_args[@]}" "$IMAGE" >/dev/null; then pass run; else fail run; fi

step "wait for HEALTHCHECK (GET /healthz)"
health=starting
for _ in $(seq 60); do
    health=$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$NAME" 2>/dev/null || echo gone)
    [[ "$health" == healthy || "$health" == unhealthy || "$health" == gone ]] && break
    sleep 1
done
if [[ "$health" == healthy ]]; then pass "health ($health)"; else
    fail "health ($health)"; "$DOCKER" logs --tail 30 "$NAME" 2>&1 || true
fi

step "container hardening"
uid=$("$DOCKER" exec "$NAME" id -u 2>/dev/null)
if [[ -n "$uid" && "$uid" != 0 ]]; then pass "non-root (uid $uid)"; else fail "non-root (uid '${uid}')"; fi
if ! "$DOCKER" exec "$NAME" touch /app/not-writable 2>/dev/null \
   && "$DOCKER" exec "$NAME" touch /app/data/writable 2>/dev/null; then
    pass "read-only root, writable /app/data"
else
    fail "read-only root, writable /app/data"
fi
owner=$("$DOCKER" exec "$NAME" stat -c '%u:%g' /app/data 2>/dev/null)
if [[ -n "$uid" && "$owner" == "$uid:$("$DOCKER" exec "$NAME" id -g 2>/dev/null)" ]]; then
    pass "/app/data owned by the service user ($owner)"
else
    fail "/app/data owned by '${owner}', the service runs as uid '${uid}'"
fi
# tempfile.gettempdir() falls back to the working directory (read-only) when TMPDIR is unusable;
# CuPy creates its kernel cache directory on first use.
if "$DOCKER" exec "$NAME" sh -c 'test "$(python -c "import tempfile; print(tempfile.gettempdir())")" = "$TMPDIR" \
        && python -c "import tempfile; tempfile.TemporaryFile().close()" \
        && mkdir -p "$CUPY_CACHE_DIR" && test -w "$CUPY_CACHE_DIR" && test -w "$SQLITE_TMPDIR"' 2>/dev/null; then
    pass "TMPDIR, SQLITE_TMPDIR and CUPY_CACHE_DIR writable"
else
    fail "TMPDIR, SQLITE_TMPDIR or CUPY_CACHE_DIR not writable"
    "$DOCKER" exec "$NAME" env 2>&1 | grep -E '^(TMPDIR|SQLITE_TMPDIR|CUPY_CACHE_DIR)=' || true
fi
# Exit 0 only when the shell ran and found none (a stopped container is no pass).
if "$DOCKER" exec "$NAME" sh -c 'for t in gcc cc make; do command -v "$t" && exit 1; done; exit 0' \
        >/dev/null 2>&1; then
    pass "no build tools in the runtime image"
else
    fail "no build tools in the runtime image (or the container is not running)"
fi

step "HTTP: healthz, readyz, evaluate, /docs + /dashboard, run push, /metrics"
if "$PYTHON" scripts/smoke_checks.py --url "http://127.0.0.1:$HTTP_PORT" \
        --steps healthz,readyz,evaluate,pages,run-push,metrics; then
    pass http
else
    fail "http (see the FAIL lines above)"
fi
database=$("$DOCKER" exec "$NAME" sh -c 'echo "$CE_EVAL_DATABASE_URL"' 2>/dev/null)
if [[ "$database" == sqlite:////app/data/* ]]; then
    if "$DOCKER" exec "$NAME" test -s "${database#sqlite:///}" 2>/dev/null; then
        pass "run store written at ${database#sqlite:///}"
    else
        fail "no SQLite run store at ${database#sqlite:///}"
    fi
fi

step "gRPC: health, reflection, Evaluate (client inside the image)"
if "$DOCKER" exec -i "$NAME" python - --grpc "127.0.0.1:$INNER_GRPC_PORT" --steps grpc \
        < scripts/smoke_checks.py; then
    pass grpc
else
    fail "grpc (see the FAIL line above)"
fi

step "SIGTERM: graceful stop"
"$DOCKER" stop -t 40 "$NAME" >/dev/null 2>&1
code=$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$NAME" 2>/dev/null || echo '?')
logs=$("$DOCKER" logs "$NAME" 2>&1 | tail -n 8)
if [[ "$code" == 0 ]] && grep -q "Application shutdown complete" <<<"$logs"; then
    pass "stopped on SIGTERM, exit 0, shutdown complete"
else
    fail "graceful stop (exit $code)"
    printf '%s\n' "$logs"
fi

if ((${#failed[@]})); then
    printf '\nsmoke FAILED (%d): %s\n' "${#failed[@]}" "${failed[*]}"
    exit 1
fi
printf '\nsmoke passed\n'
