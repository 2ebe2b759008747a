"""Service settings, read once from ``CE_EVAL_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
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
    backend: Literal["auto", "numpy", "cupy"] = Field(
        "auto", description="Default array backend when a request does not name one."
    )
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Largest request body.")
    max_elements: int = Field(
        256 * 1024 * 1024, ge=1, description="Largest number of tensor elements in one request."
    )
    max_inflight: int = Field(8, ge=1, description="Evaluations running at once (more → 503).")
    log_level: str = Field("info", description="debug | info | warning | error.")
    log_format: Literal["json", "text"] = Field("json", description="Log line format.")
    echo_max_chars: int = Field(120, ge=0, description="Longest echo of bad input in errors.")
