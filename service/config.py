"""Service settings, read once from ``CE_EVAL_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every field is also the environment variable ``CE_EVAL_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="CE_EVAL_", extra="ignore")

    host: str = Field("127.0.0.1", description="HTTP bind address.")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port.")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = disabled).")
    database_url: str = Field(
        "sqlite:///./data/ce-eval.db", description="SQLAlchemy URL of the run store."
    )
    database_connect_timeout_s: float = Field(
        5.0,
        gt=0,
        le=300,
        description="Seconds to wait for a run-store connection before answering 503.",
    )
    database_statement_timeout_s: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="PostgreSQL: longest statement, lock wait or idle transaction (0 = none).",
    )
    push_writer: bool = Field(
        True,
        description=(
            "Run the write transactions of batch pushes in a worker process of their own, "
            "beside the server's evaluations instead of in turn with them (GIL); false, or "
            "SQLite in memory: in the server's threads."
        ),
    )
    backend: Literal["auto", "numpy", "cupy"] = Field(
        "auto", description="Default array backend when a request does not name one."
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="HTTP: seconds a request's headers may take to arrive (→ 408)."
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description=(
            "Seconds a request body may go without a byte arriving (HTTP → 408), or a gRPC "
            "EvaluateStream without a chunk (→ DEADLINE_EXCEEDED)."
        ),
    )
    max_connections: int = Field(
        4096,
        ge=1,
        description=(
            "HTTP: open connections at most; the next is answered 503 and closed at once "
            "(the file-descriptor limit is raised to fit where the hard limit allows)."
        ),
    )
    grpc_keepalive_time_s: float = Field(
        60.0, gt=0, description="gRPC: seconds between keepalive pings on an idle connection."
    )
    grpc_keepalive_timeout_s: float = Field(
        20.0, gt=0, description="gRPC: seconds a keepalive ping may go unanswered before closing."
    )
    grpc_max_connection_idle_s: float = Field(
        300.0, gt=0, description="gRPC: a connection with no RPC for this long is closed (GOAWAY)."
    )
    grpc_max_connection_age_s: float = Field(
        3600.0, gt=0, description="gRPC: a connection older than this is closed (GOAWAY)."
    )
    grpc_max_connection_age_grace_s: float = Field(
        30.0, ge=0, description="gRPC: seconds RPCs of an aged connection get to finish."
    )
    grpc_max_concurrent_streams: int = Field(
        100, ge=1, description="gRPC: concurrent RPCs per connection."
    )
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Largest request body.")
    max_buffered_bytes: int = Field(
        1024 * 1024 * 1024,
        ge=1,
        description=(
            "Bytes of large request bodies (HTTP of 4 MiB or more, gRPC EvaluateStream) held "
            "at once over all connections; a body that would pass it gets 503 + Retry-After "
            "(gRPC UNAVAILABLE) before it is read. A body is always let in when none is held."
        ),
    )
    max_response_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description=(
            "Largest answer, estimated from the request before any work (output tensors in "
            "their encoding); beyond it 413 naming the output."
        ),
    )
    max_elements: int = Field(
        256 * 1024 * 1024, ge=1, description="Largest number of tensor elements in one request."
    )
    max_work: int = Field(
        2**34,
        ge=1,
        description=(
            "Largest estimated work of one request (multiply-adds): N·C·D for linear layers, "
            "N·C² for full Hessians, else the logits' size."
        ),
    )
    max_inflight: int = Field(
        16, ge=1, description="Evaluations admitted at once, running or queued (more → 503)."
    )
    compute_threads: int = Field(
        default_factory=lambda: os.cpu_count() or 1,
        ge=1,
        description="Threads running engine work off the event loop.",
        json_schema_extra={"env_default": "the number of CPUs (`os.cpu_count()`)"},
    )
    max_inflight_per_key: int | None = Field(
        None,
        ge=1,
        description=(
            "With API keys: compute threads one key may hold at once (its further work "
            "waits), so that other keys always find one."
        ),
        json_schema_extra={"env_default": "`CE_EVAL_COMPUTE_THREADS` − 1, at least 1"},
    )
    cpu_threads: int | None = Field(
        None,
        ge=1,
        description=(
            "Threads of the engine's fused NumPy kernels within one evaluation (the engine "
            "reads it too, without the server)."
        ),
        json_schema_extra={"env_default": "unset: the cores this process may run on"},
    )
    api_keys: str = Field("", description="Comma-separated API keys; empty = no authentication.")
    public_paths: str = Field(
        "/healthz,/readyz,/metrics,/docs,/openapi.json,/static-offline-docs,/v2/health,"
        "/dashboard,/static/",
        description="Comma-separated path prefixes served without an API key.",
    )
    rate_limit_per_s: float = Field(
        0.0, ge=0, description="Requests per second per API key (0 = unlimited)."
    )
    rate_limit_burst: float = Field(0.0, ge=0, description="Burst size of the per-key limit.")
    auth_failures_per_minute: float = Field(
        10.0,
        ge=0,
        description=(
            "Failed authentications per minute per client address (as many in a burst); "
            "beyond, every request from it gets 429 until the bucket refills (0 = unlimited)."
        ),
    )
    drain_delay_s: float = Field(
        0.0,
        ge=0,
        description="After SIGTERM: seconds /readyz answers 503 before the listener closes.",
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="Seconds in-flight requests get to finish after SIGTERM."
    )
    log_level: str = Field("info", description="debug | info | warning | error.")
    log_format: Literal["json", "text"] = Field("json", description="Log line format.")
    run_detail_max_classes: int = Field(
        64,
        ge=1,
        le=4096,
        description=(
            "GET /v1/runs/{id} includes per-class arrays, the confusion matrix and class names "
            "up to this many classes; larger runs serve them from /v1/runs/{id}/metrics/{name}."
        ),
    )
    echo_max_chars: int = Field(
        64,
        ge=0,
        description=(
            "Longest echo of client input (names, keys, values) in an error; longer ones end "
            "in '…' and give their length."
        ),
    )

    shared_memory: bool = Field(
        False,
        description=(
            "Serve Triton's system shared-memory extension (/v2/systemsharedmemory, tensors "
            "named by region over OIP and gRPC) to clients on this host; see SECURITY.md."
        ),
    )
    shared_memory_workers: int | None = Field(
        None,
        ge=0,
        description=(
            "Shared memory: worker processes that evaluate logits of 8 MiB or more from a "
            "mapping of their region, no copy (a truncation kills a worker, never the server), "
            "sharing CE_EVAL_CPU_THREADS out among those busy; 0 copies them into the server "
            "with pread instead."
        ),
        json_schema_extra={"env_default": "`CE_EVAL_COMPUTE_THREADS`"},
    )
    shared_memory_max_regions: int = Field(
        16, ge=1, description="Shared memory: regions one API key may have registered at once."
    )
    shared_memory_max_bytes: int = Field(
        1024**3,
        ge=1,
        description="Shared memory: total bytes of the regions one API key may have registered.",
    )

    @field_validator("cpu_threads", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("api_keys")
    @classmethod
    def _printable_ascii_keys(cls, value: str) -> str:
        """Keys travel in HTTP headers, which servers decode as Latin-1 bytes, so a key outside
        printable ASCII (0x21–0x7E) could never match: refused at start-up."""
        for position, key in enumerate(k.strip() for k in value.split(",") if k.strip()):
            bad = next((c for c in key if not "!" <= c <= "~"), None)
            if bad is not None:
                raise ValueError(
                    f"CE_EVAL_API_KEYS: key {position + 1} holds {bad!r} (U+{ord(bad):04X}); "
                    "keys must be printable ASCII (0x21-0x7E) to match an HTTP header"
                )
        return value

    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    def public_path_list(self) -> list[str]:
        return [p.strip() for p in self.public_paths.split(",") if p.strip()]
