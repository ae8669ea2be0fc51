"""Service settings: one typed class, read from `COLA_BATCH_*` environment variables.

Contract: `Settings()` reads the environment (and a `.env` file only if COLA_BATCH_ENV_FILE
names one); every field has a default that works on one machine with local storage and the
embedded Redis. `get_settings()` returns a process-wide cached instance; tests build their own
`Settings(...)` instead of mutating it. Secrets are `SecretStr`, so they never print.
Object-storage credentials are NOT settings: they come from the standard AWS variables
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...) read by `cola_batch.storage`.
"""

from __future__ import annotations

import os
from functools import lru_cache

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every tunable of the service. Env var = `COLA_BATCH_` + field name, upper case."""

    model_config = SettingsConfigDict(env_prefix="COLA_BATCH_", extra="ignore", frozen=True)

    redis_url: SecretStr | None = Field(
        None,
        description="Broker and job-state Redis, e.g. redis://:password@host:6379/0 or "
        "rediss://...; None starts an embedded redis-server (single machine only).",
    )
    embedded_redis_dir: str = Field(
        "~/.cache/cola-batch/redis",
        description="Data directory of the embedded Redis used when redis_url is None.",
    )
    default_output: str = Field(
        "./runs",
        description="Output base URI used when `submit` gets no --output (local path, "
        "file://, or s3://bucket/prefix).",
    )
    queue_batch: str = Field("cola-batch", description="Celery queue for batch shards.")
    queue_interactive: str = Field(
        "cola-interactive",
        description="Celery queue for small, latency-sensitive jobs; workers poll it first.",
    )
    shard_size: int = Field(
        1000,
        gt=0,
        le=1_000_000,
        description="Rows per staged shard. Size it so one shard runs far below "
        "visibility_timeout_s on the slowest worker.",
    )
    visibility_timeout_s: int = Field(
        6 * 3600,
        gt=0,
        description="Redis transport visibility timeout: an unacked shard is redelivered "
        "after this long. Must exceed the longest shard run by a wide margin.",
    )
    max_attempts: int = Field(
        3,
        gt=0,
        le=100,
        description="Deliveries of one shard before it is dead-lettered instead of retried.",
    )
    worker_prefetch: int = Field(
        1, ge=1, description="Celery worker_prefetch_multiplier (1 = one shard at a time)."
    )
    worker_read_ahead: bool = Field(
        True,
        description="While a shard's last quarter generates, peek at the queue head (without "
        "taking it) and download that shard's staged input, so the next shard starts "
        "without waiting on storage. Costs one extra read of a shard another worker takes.",
    )
    storage_retries: int = Field(
        5, ge=0, le=50, description="Retries of one object-storage call on transient errors."
    )
    storage_backoff_initial_s: float = Field(
        0.2, gt=0, description="First retry delay; doubles each retry (with jitter)."
    )
    storage_backoff_max_s: float = Field(10.0, gt=0, description="Cap on one retry delay.")
    s3_conditional_put: bool = Field(
        True,
        description="Use `If-None-Match: *` for create-once writes. Disable for S3 servers "
        "that reject it; create-once then falls back to check-then-put (racy).",
    )
    max_prompt_chars: int = Field(
        1_000_000, gt=0, description="Longest accepted prompt (after the template), in characters."
    )
    max_line_bytes: int = Field(
        16 * 2**20,
        gt=0,
        description="Longest accepted JSONL line in bytes; longer lines are rejected "
        "without being loaded into memory.",
    )
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="Prometheus metrics port of workers; None = off."
    )
    api_token: SecretStr | None = Field(
        None, description="Bearer token every HTTP endpoint requires; None = no auth."
    )
    log_level: str = Field("INFO", description="Python logging level name.")
    soft_shutdown_s: int = Field(
        60,
        ge=0,
        description="On SIGTERM a worker stops taking shards and lets the running one finish "
        "for this long; a shard still running then is requeued at once.",
    )
    worker_model: str | None = Field(
        None, description="Model root a worker process loads (set by `cola-batch worker`)."
    )
    worker_node: str | None = Field(
        None,
        description="Celery node name of this worker (set by the launcher); its pool process "
        "announces under it in Redis once the model has loaded.",
    )
    worker_parent_pid: int | None = Field(
        None,
        description="Process that started this worker (set by `cola-batch worker`/`pool`/`run`): "
        "the worker stops when it dies, even SIGKILLed, instead of running on unsupervised.",
    )
    worker_device: str = Field(
        "auto",
        description="Device of a worker process: auto (cuda if visible, else cpu), cpu, cuda.",
    )
    worker_dtype: str = Field("bf16", description="Compute dtype of a worker: bf16 or fp32.")
    batch_tokens: int = Field(
        4096, gt=0, description="Token budget of one generation micro-batch in a worker."
    )
    max_context: int = Field(
        8192,
        gt=0,
        description="Longest sequence (prompt + generation, in tokens) a worker accepts; "
        "longer rows get error_code prompt_too_long.",
    )

    api_storage: str | None = Field(
        None,
        description="Base URI where `cola-batch serve` keeps uploaded files, batch output "
        "files and interactive requests; None = `<output>/_api`.",
    )
    api_model_name: str | None = Field(
        None,
        description="Model id `cola-batch serve` exposes and accepts; None = the basename of "
        "--model.",
    )
    max_request_bytes: int = Field(
        4 * 2**20,
        gt=0,
        description="Largest HTTP request body the API accepts, except file uploads (413).",
    )
    max_upload_bytes: int = Field(
        200 * 2**20, gt=0, description="Largest file the API accepts on POST /v1/files (413)."
    )
    chat_templates: str = Field(
        "",
        description="Chat template per served model name, e.g. `my-model=chatml,other=text` "
        "(templates: openai, text, chatml); unlisted models use `openai`.",
    )
    api_default_max_tokens: int = Field(
        256, gt=0, description="max_tokens of an API request that sets none (or 0)."
    )
    api_max_tokens_limit: int = Field(
        4096, gt=0, description="Upper clamp on an API request's max_tokens."
    )
    api_interactive_retention_s: int = Field(
        3600,
        gt=0,
        description="How long the Redis state of an answered /v1 chat/completions request "
        "lives on (its files are deleted at once); it never appears in `cola-batch jobs`.",
    )
    api_request_timeout_s: float = Field(
        600.0,
        gt=0,
        description="How long /v1/chat/completions and /v1/completions wait for a worker "
        "before cancelling the request (504).",
    )

    # `cola-batch pool` (local autoscaler). Windows must be longer than a shard: see
    # docs/deploy.md "Sizing".
    pool_poll_s: float = Field(
        2.0, gt=0, description="Seconds between two autoscaling decisions of `cola-batch pool`."
    )
    pool_shards_per_worker: int = Field(
        2,
        ge=1,
        description="Backlog (queued + in-flight shards) one pool worker is sized for: "
        "desired workers = ceil(backlog / this), clamped to --min/--max.",
    )
    pool_scale_up_window_s: float = Field(
        10.0,
        ge=0,
        description="The pool grows only when the backlog has called for more workers for this "
        "long (the lowest recommendation in the window wins): quick, but not on a blip.",
    )
    pool_scale_down_window_s: float = Field(
        600.0,
        ge=0,
        description="The pool shrinks only to the highest recommendation of this window: the "
        "backlog must stay low this long. Keep it longer than a shard.",
    )
    pool_load_timeout_s: float = Field(
        900.0,
        gt=0,
        description="A pool worker that does not answer Celery's ping this long after its "
        "start (model load included) is stopped and its slot reused.",
    )

    @model_validator(mode="after")
    def _distinct_queues(self) -> Settings:
        if self.queue_batch == self.queue_interactive:
            raise ValueError("queue_batch and queue_interactive must differ")
        return self

    def redis_url_value(self) -> str | None:
        """The Redis URL in clear text, for building clients only. Never log it."""
        return self.redis_url.get_secret_value() if self.redis_url is not None else None


def load_settings() -> Settings:
    """Settings read from the environment now (and COLA_BATCH_ENV_FILE, if set)."""
    env_file = os.environ.get("COLA_BATCH_ENV_FILE")
    if env_file:
        return Settings(_env_file=env_file)  # type: ignore[call-arg]
    return Settings()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment (workers, hot paths)."""
    return load_settings()
