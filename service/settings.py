"""Service settings: one pydantic-settings object, read from ``MTRANK_*`` environment variables.

Every field can be set as ``MTRANK_<FIELD>`` (``MTRANK_FEATURE_STORE=redis``,
``MTRANK_WEIGHTS='{"<head>": 1, "<other head>": 2}'``); ``mtrank serve`` options override them.
Nothing here names a task: head names come from the served model (unset ``weights``: the model's
fitted combination, else 1 per head).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Combine = Literal["product", "sum"]
StoreKind = Literal["embedded", "redis"]
ForwardBackend = Literal["onnx", "eager"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MTRANK_", extra="ignore", validate_default=True)

    # -- model -------------------------------------------------------------------------------
    artifacts: Path = Field(default=Path("artifacts"), description="artifacts dir holding models/LATEST")
    reload_interval_s: float = Field(default=2.0, gt=0, description="how often the watcher polls LATEST")
    wait_for_model: bool = Field(
        default=False,
        description="`mtrank serve`: start (unready) without a models/LATEST and wait for one, "
        "instead of exiting with an error",
    )
    warmup_batch: int = Field(default=512, ge=1, le=100_000, description="batch size of the warm-up passes")
    torch_threads: int = Field(
        default=1, ge=1, le=256, description="torch intra-op threads (torch.set_num_threads)"
    )
    forward_in_thread: bool = Field(
        default=True, description="run encode + forward in a worker thread (keeps the event loop responsive)"
    )
    forward_workers: int = Field(default=2, ge=1, le=64, description="threads for model forward passes")
    forward_backend: ForwardBackend = Field(
        default="onnx",
        description="onnx: the request graph runs in ONNX Runtime, built at every model load and checked "
        "against eager first (eager when that fails); eager: plain torch",
    )
    inline_max_candidates: int = Field(
        default=128,
        ge=0,
        le=100_000,
        description="requests with at most this many candidates are scored on the event loop, without "
        "the hop to the forward thread (which costs more than it saves for them)",
    )
    checkpoint_key: SecretStr | None = Field(
        default=None,
        description="deployment key: load only checkpoints whose manifest is signed with it (HMAC-SHA256); "
        "`mtrank train` signs with the same MTRANK_CHECKPOINT_KEY",
    )
    latest_read_timeout_s: float = Field(
        default=2.0, gt=0, le=600, description="deadline of one read of models/LATEST (off the event loop)"
    )
    reload_retry_initial_s: float = Field(
        default=1.0, gt=0, description="first retry of a version that failed transiently (files missing)"
    )
    reload_retry_max_s: float = Field(
        default=60.0, gt=0, description="longest wait between retries (the wait doubles up to it)"
    )
    stale_temp_age_s: float = Field(
        default=3600.0, ge=0, description="at start, remove temp checkpoint files/folders older than this"
    )

    # -- feature store -----------------------------------------------------------------------
    feature_store: StoreKind = "embedded"
    data_dir: Path | None = Field(
        default=None,
        description="embedded store: directory of the user/video tables (default: the checkpoint's)",
    )
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool | None = Field(
        default=None,
        description="redis_url names a Redis Cluster node; unset = asked at start (INFO cluster)",
    )
    redis_prefix: str = Field(default="mtrank:", min_length=1, max_length=200)
    redis_timeout_ms: float = Field(
        default=30.0, gt=0, le=60_000, description="deadline of one feature fetch"
    )
    redis_breaker_failures: int = Field(
        default=3, ge=1, description="consecutive Redis failures after which fetches skip Redis for a while"
    )
    redis_breaker_reset_s: float = Field(
        default=1.0, gt=0, description="how long fetches skip Redis after that"
    )
    store_min_present: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Redis: not ready (evicted) when fewer of the entity keys sampled by materialize exist",
    )
    unknown_rate_window: int = Field(
        default=200, ge=1, description="Redis: requests per window of the unknown user / video rate"
    )
    unknown_rate_margin: float = Field(
        default=0.3,
        gt=0,
        le=1,
        description="Redis: responses are degraded (unknown_rate) when a window's unknown rate exceeds "
        "the materialised data's by more than this (1 = never)",
    )

    # -- events (POST /events: feedback appended to the user histories) -----------------------
    events_token: SecretStr | None = Field(
        default=None, description="bearer token POST /events requires; unset = no token needed"
    )
    max_events: int = Field(default=1000, ge=1, le=100_000, description="events per POST /events")
    event_id_ttl_s: int = Field(
        default=7 * 24 * 3600, ge=1, description="Redis: how long an event id is remembered (idempotency)"
    )
    event_ids: int = Field(
        default=1_000_000, ge=1, description="embedded store: how many of the latest event ids are remembered"
    )

    # -- request handling --------------------------------------------------------------------
    max_candidates: int = Field(default=2000, ge=1, le=100_000)
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    max_in_flight: int = Field(
        default=16,
        ge=1,
        le=10_000,
        description="per worker process: /rank requests admitted at once; more are answered 503 at once "
        "(with Retry-After) instead of queueing",
    )
    max_in_flight_age_ms: float = Field(
        default=30.0,
        ge=0,
        le=60_000,
        description="per worker process: /rank requests are answered 503 at once while 4 or more are in "
        "flight and the oldest has been so for longer than this (the worker is behind); 0 = only "
        "max_in_flight",
    )
    strict_features: bool = Field(
        default=True,
        description="422 for context keys and inline feature names the model does not declare "
        "(false: they are ignored)",
    )
    combine: Combine | None = Field(
        default=None,
        description="product or sum of the weighted heads; unset = the model's fitted combination, else "
        "product when every head of the served model is binary (probabilities) and sum otherwise",
    )
    weights: dict[str, float] | None = Field(
        default=None,
        description="per-head weights of the combined score (replacing the model's fitted combination); "
        "unset = the fitted weights, else 1 for every head of the served model",
    )
    weight_min: float = 0.0
    weight_max: float = 10.0

    # -- admin / server ----------------------------------------------------------------------
    admin_token: SecretStr | None = Field(
        default=None, description="bearer token of /admin/*; unset = disabled"
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(
        default=1, ge=1, le=64, description="`mtrank serve`: worker processes sharing the port"
    )
    log_level: str = "INFO"
    access_log: bool = False

    # -- HTTP limits of `mtrank serve` ---------------------------------------------------------
    http_max_header_bytes: int = Field(
        default=16 * 1024, ge=1024, le=1 << 20, description="request line + headers; a larger head gets 400"
    )
    http_header_timeout_s: float = Field(
        default=10.0, gt=0, description="from connection (or first byte of a request) to its last header"
    )
    http_body_timeout_s: float = Field(
        default=30.0, gt=0, description="from the last header to the last byte of the body"
    )
    http_keep_alive_s: int = Field(default=5, ge=1, description="idle keep-alive connections close after")
    http_max_connections: int = Field(
        default=1000, ge=1, description="open connections (and requests in flight); beyond it: 503"
    )

    @field_validator("admin_token", "checkpoint_key", "events_token", mode="before")
    @classmethod
    def _empty_token_is_unset(cls, v: object) -> object:
        if v is None or (isinstance(v, str) and v.strip() == ""):
            return None
        if isinstance(v, SecretStr) and v.get_secret_value().strip() == "":
            return None
        return v

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, v: str) -> str:
        v = v.upper()
        if v not in {"CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"}:
            raise ValueError(f"log_level must be one of CRITICAL, ERROR, WARNING, INFO, DEBUG, got {v!r}")
        return v

    @model_validator(mode="after")
    def _check_weights(self) -> Settings:
        if not (math.isfinite(self.weight_min) and math.isfinite(self.weight_max)):
            raise ValueError("weight_min and weight_max must be finite")
        if not 0 <= self.weight_min <= self.weight_max:
            raise ValueError("need 0 <= weight_min <= weight_max")
        if self.weights is None:
            return self
        if not self.weights:
            raise ValueError("weights must name at least one head (or be unset: 1 for every head)")
        for name, w in self.weights.items():
            if not (math.isfinite(w) and self.weight_min <= w <= self.weight_max):
                raise ValueError(f"weight {name!r}={w} outside [{self.weight_min}, {self.weight_max}]")
        if not any(w > 0 for w in self.weights.values()):
            raise ValueError("at least one weight must be > 0")
        return self

    @property
    def redis_timeout_s(self) -> float:
        return self.redis_timeout_ms / 1000.0
