# ce-eval container image.
#   CPU (default):  docker build -t ce-eval .
#   GPU (CuPy):     docker build --build-arg VARIANT=gpu -t ce-eval:gpu .
# Multi-stage: the wheel and the virtual environment are built in throw-away stages; the
# runtime stage holds only the interpreter, the venv and a non-root user.
ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04

# ---- wheel: build the ce-eval wheel (pure Python) -------------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ce_engine ce_engine
COPY service service
COPY client client
# An optional CA bundle (build secret "pipca") for networks that intercept TLS.
RUN --mount=type=secret,id=pipca \
    if [ -s /run/secrets/pipca ]; then export PIP_CERT=/run/secrets/pipca; fi; \
    python -m venv /tmp/build-env \
    && /tmp/build-env/bin/pip install --quiet "build>=1.2" \
    && /tmp/build-env/bin/python -m build --wheel --outdir /wheels .

# ---- runtime bases: one per variant, each with Python >= 3.11 and nothing to compile with ----
FROM ${PYTHON_IMAGE} AS base-cpu
ENV CE_EVAL_EXTRAS=postgres

FROM ${CUDA_IMAGE} AS base-gpu
# Ubuntu 24.04 ships Python 3.12; the CUDA runtime libraries come with the base image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3=3.12.* python3-venv=3.12.* \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s /usr/bin/python3 /usr/local/bin/python
ENV CE_EVAL_EXTRAS=postgres,gpu

# ---- venv: install the wheel with the variant's extras, using the runtime's own interpreter --
# hadolint ignore=DL3006
FROM base-${VARIANT} AS venv
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=wheel /wheels /wheels
RUN --mount=type=secret,id=pipca \
    if [ -s /run/secrets/pipca ]; then export PIP_CERT=/run/secrets/pipca; fi; \
    python -m venv /opt/venv \
    && wheel="$(ls /wheels/ce_eval-*.whl)" \
    && /opt/venv/bin/pip install --quiet "${wheel}[${CE_EVAL_EXTRAS}]" \
    && /opt/venv/bin/pip uninstall --quiet --yes pip

# ---- runtime ----------------------------------------------------------------------------------
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="ce-eval" \
      org.opencontainers.image.variant="${VARIANT}" \
      org.opencontainers.image.description="Loss-evaluation microservice (HTTP :8000, gRPC :50051)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/ce-eval/ce-eval"
RUN groupadd --gid 10001 ce-eval \
    && useradd --uid 10001 --gid ce-eval --no-create-home --home-dir /app --shell /usr/sbin/nologin ce-eval \
    && mkdir -p /app/data \
    && chown ce-eval:ce-eval /app/data
COPY --from=venv /opt/venv /opt/venv
COPY --chmod=0755 scripts/container_healthcheck.py /usr/local/bin/ce-eval-healthcheck
# Only /app/data is written to (the SQLite default, SQLite's temp files, CuPy's kernel cache), so
# the container runs with --read-only; mount a volume there to keep runs across restarts.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/app/data \
    SQLITE_TMPDIR=/app/data \
    CUPY_CACHE_DIR=/app/data/cupy-kernels \
    CE_EVAL_HOST=0.0.0.0 \
    CE_EVAL_PORT=8000 \
    CE_EVAL_GRPC_PORT=50051 \
    CE_EVAL_DATABASE_URL=sqlite:////app/data/ce-eval.db \
    CE_EVAL_BACKEND=auto
WORKDIR /app
VOLUME ["/app/data"]
USER 10001:10001
EXPOSE 8000 50051
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["ce-eval-healthcheck"]
# Exec form: ce-eval is PID 1 and receives SIGTERM itself; uvicorn then stops accepting,
# finishes in-flight requests (graceful timeout) and runs the shutdown lifespan.
STOPSIGNAL SIGTERM
ENTRYPOINT ["ce-eval"]
CMD ["serve"]
