"""Shared pytest fixtures: real Redis and S3 services, and test-sized settings.

Services are session-scoped (started once, on first use, only by tests that ask for them);
per-test fixtures hand out isolated slices of them: a flushed Redis database, a fresh bucket.
Fixtures here are shared by every package's tests; keep each one small and documented.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from services import RedisServer, S3Server

from cola_batch.settings import Settings
from cola_batch.storage import RetryPolicy

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"

_REDIS_DBS = itertools.cycle(range(1, 64))  # db 0 stays free for ad-hoc use


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server (no persistence) for the whole session."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of an empty Redis database of `redis_server`, flushed for this test."""
    import redis

    url = redis_server.url_for_db(next(_REDIS_DBS))
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A private SeaweedFS S3 endpoint for the whole session."""
    server = S3Server()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Point the standard AWS_* variables (this process and its children) at `s3_server`."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def s3_bucket(s3_env: S3Server) -> str:
    """`s3://<fresh bucket>` on the test S3 server, with AWS_* env pointing at it."""
    return s3_env.create_bucket(f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def fast_retry() -> RetryPolicy:
    """Storage retries with millisecond backoff, so retry tests take no time."""
    return RetryPolicy(retries=4, backoff_initial_s=0.01, backoff_max_s=0.05)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings for one test: local default output under tmp_path, quick storage retries."""
    return Settings(
        default_output=str(tmp_path / "runs"),
        storage_retries=3,
        storage_backoff_initial_s=0.01,
        storage_backoff_max_s=0.05,
    )
