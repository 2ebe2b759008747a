#!/usr/bin/env bash
# Container smoke test: build the image, run it read-only as non-root, wait for health, evaluate
# over HTTP and gRPC, push a small run, check /metrics, stop it with SIGTERM (graceful drain).
# Every step runs and reports PASS/FAIL; the script exits 1 if any step failed.
#
#   scripts/docker-smoke.sh                        # CPU image, ports published on 127.0.0.1
#   CE_SMOKE_VARIANT=gpu scripts/docker-smoke.sh   # GPU image (needs --gpus; see README)
# Environment: DOCKER (docker CLI, default docker), CE_SMOKE_IMAGE (tag, default ce-eval:smoke),
# CE_SMOKE_SKIP_BUILD=1 (reuse the tag), CE_SMOKE_NETWORK=host (engines without bridge
# networking), CE_SMOKE_CA_BUNDLE=path (CA bundle handed to pip as a build secret).
set -uo pipefail
cd "$(dirname "$0")/.."

DOCKER=${DOCKER:-docker}
IMAGE=${CE_SMOKE_IMAGE:-ce-eval:smoke}
VARIANT=${CE_SMOKE_VARIANT:-cpu}
NETWORK=${CE_SMOKE_NETWORK:-bridge}
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

step "run (read-only root, non-root, no capabilities, data volume)"
run_args=(-d --name "$NAME" --read-only --cap-drop ALL --security-opt no-new-privileges
          -v "$VOLUME:/app/data" -e CE_EVAL_LOG_FORMAT=text)
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
if "$DOCKER" exec "$NAME" sh -c 'command -v gcc || command -v cc || command -v make' >/dev/null 2>&1; then
    fail "no build tools in the runtime image"
else
    pass "no build tools in the runtime image"
fi

step "HTTP: healthz, readyz, evaluate, /docs + /dashboard, run push, /metrics"
if "$PYTHON" scripts/smoke_checks.py --url "http://127.0.0.1:$HTTP_PORT" \
        --steps healthz,readyz,evaluate,pages,run-push,metrics; then
    pass http
else
    fail "http (see the FAIL lines above)"
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
