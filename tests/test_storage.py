"""Storage: atomic whole-file writes, create-once, listing and streaming reads, on local disk and
on a real S3 server (SeaweedFS); transient faults are retried, permanent ones are not; secrets
never reach the logs."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from fault_proxy import FaultProxy
from services import S3Server

from cola_batch import storage
from cola_batch.storage import RetryPolicy


@pytest.fixture(params=["local", "s3"])
def base(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A writable base URI: a local directory, or a fresh bucket on the test S3 server."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/prefix"


def test_write_read_list_exists(base: str, fast_retry: RetryPolicy) -> None:
    storage.write_bytes_atomic(f"{base}/a/one.bin", b"\x00\x01", retry=fast_retry)
    storage.write_text_atomic(f"{base}/a/two.txt", "zwei ✓", retry=fast_retry)
    storage.write_text_atomic(f"{base}/a/sub/three.txt", "3", retry=fast_retry)
    assert storage.read_bytes(f"{base}/a/one.bin") == b"\x00\x01"
    assert storage.read_text(f"{base}/a/two.txt") == "zwei ✓"
    assert storage.exists(f"{base}/a/two.txt") and not storage.exists(f"{base}/a/nope")
    listed = storage.list_files(f"{base}/a")
    assert [u.rsplit("/", 1)[1] for u in listed] == ["one.bin", "two.txt"]
    assert storage.list_files(f"{base}/missing") == []
    with storage.open_input(f"{base}/a/two.txt") as handle:
        assert handle.read(4) == b"zwei"
        handle.seek(0)
        assert handle.read() == "zwei ✓".encode()


def test_replacing_a_file_never_shows_a_partial_version(base: str, fast_retry: RetryPolicy) -> None:
    uri = f"{base}/big.bin"
    versions = [bytes([v]) * (3 * 2**20) for v in range(1, 6)]
    storage.write_bytes_atomic(uri, versions[0], retry=fast_retry)
    seen: list[bytes] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            seen.append(storage.read_bytes(uri, retry=fast_retry))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for data in versions[1:]:
            storage.write_bytes_atomic(uri, data, retry=fast_retry)
    finally:
        done.set()
        thread.join(timeout=60)
    assert seen, "the reader never ran"
    assert all(data in versions for data in seen)  # whole versions only, never a mix or a cut
    assert storage.read_bytes(uri) == versions[-1]


def test_write_if_absent_has_exactly_one_winner(base: str, fast_retry: RetryPolicy) -> None:
    uri = f"{base}/commits/shard-00000.json"
    results: list[tuple[int, bool]] = []
    barrier = threading.Barrier(8)

    def contender(index: int) -> None:
        barrier.wait(timeout=10)
        results.append((index, storage.write_if_absent(uri, f"{index}".encode(), retry=fast_retry)))

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    winners = [index for index, created in results if created]
    assert len(results) == 8 and len(winners) == 1
    assert storage.read_text(uri) == str(winners[0])
    assert storage.write_if_absent(uri, b"late", retry=fast_retry) is False


def test_upload_and_delete(base: str, tmp_path: Path, fast_retry: RetryPolicy) -> None:
    local = tmp_path / "spool.jsonl"
    local.write_bytes(b'{"a": 1}\n' * 1000)
    storage.upload_file_atomic(str(local), f"{base}/x/rejected.jsonl", retry=fast_retry)
    assert storage.read_bytes(f"{base}/x/rejected.jsonl") == local.read_bytes()
    storage.delete(f"{base}/x", recursive=True, retry=fast_retry)
    assert not storage.exists(f"{base}/x/rejected.jsonl")
    storage.delete(f"{base}/never-was", recursive=True, retry=fast_retry)  # not an error


def test_missing_files_fail_at_once_without_retries(base: str) -> None:
    slow = RetryPolicy(retries=5, backoff_initial_s=5, backoff_max_s=5)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{base}/absent.bin", retry=slow)  # would take 25 s if retried


# ---------------------------------------------------------------- local specifics


def test_local_atomic_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "dir" / "manifest.json"
    for n in range(5):
        storage.write_text_atomic(str(target), "x" * n)
    storage.write_if_absent(str(tmp_path / "deep" / "dir" / "_SUCCESS"), b"")
    assert sorted(os.listdir(target.parent)) == ["_SUCCESS", "manifest.json"]
    assert target.read_text() == "xxxx"


def test_file_uris_and_relative_paths_normalise_to_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert storage.normalize_uri("runs/") == str(tmp_path / "runs")
    assert storage.normalize_uri(f"file://{tmp_path}/x") == f"{tmp_path}/x"
    assert storage.normalize_uri("s3a://Bucket/p/") == "s3://Bucket/p"
    storage.write_text_atomic("file://" + str(tmp_path / "f.txt"), "hi")
    assert (tmp_path / "f.txt").read_text() == "hi"


def test_redact_hides_userinfo() -> None:
    assert storage.redact("redis://:hunter2@host:6379/0") == "redis://***@host:6379/0"
    assert storage.redact("s3://bucket/key") == "s3://bucket/key"


def test_transient_and_permanent_errors_are_told_apart() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(code: str, status: int) -> ClientError:
        response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
        return ClientError(response, "PutObject")  # type: ignore[arg-type]

    def wrapped(cause: BaseException) -> OSError:
        try:
            raise OSError("translated") from cause
        except OSError as exc:
            return exc

    assert storage.is_transient(ConnectionResetError())
    assert storage.is_transient(TimeoutError())
    assert storage.is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert storage.is_transient(wrapped(client_error("ServiceUnavailable", 503)))
    assert storage.is_transient(wrapped(client_error("SlowDown", 503)))
    assert not storage.is_transient(wrapped(client_error("AccessDenied", 403)))
    assert not storage.is_transient(wrapped(client_error("NoSuchKey", 404)))
    assert not storage.is_transient(FileNotFoundError("x"))
    assert not storage.is_transient(ValueError("x"))


# ---------------------------------------------------------------- S3 faults


@pytest.fixture
def faulty_s3(
    s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[FaultProxy, str]:
    """The test bucket reached through a fault-injecting proxy (AWS_ENDPOINT_URL points at it)."""
    with FaultProxy(s3_server.s3_port) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        yield proxy, s3_bucket


@pytest.mark.parametrize("mode", ["http503", "reset"])
@pytest.mark.parametrize(
    "operation",
    [
        lambda uri: storage.write_bytes_atomic(uri, b"payload", retry=_RETRY),
        lambda uri: storage.write_if_absent(uri, b"payload", retry=_RETRY),
    ],
    ids=["write", "create-once"],
)
def test_s3_writes_survive_transient_faults(
    faulty_s3: tuple[FaultProxy, str], mode: str, operation: Callable[[str], object]
) -> None:
    proxy, bucket = faulty_s3
    uri = f"{bucket}/retried/{mode}.bin"
    proxy.fail_next(3, mode=mode)
    operation(uri)
    assert proxy.injected == 3
    assert storage.read_bytes(uri, retry=_RETRY) == b"payload"


def test_s3_gives_up_after_the_configured_retries(faulty_s3: tuple[FaultProxy, str]) -> None:
    proxy, bucket = faulty_s3
    proxy.fail_next(100)
    with pytest.raises(OSError):
        storage.write_bytes_atomic(f"{bucket}/never.bin", b"x", retry=RetryPolicy(1, 0.01, 0.01))
    assert 2 <= proxy.injected <= 8  # 2 tries of ours (s3fs may retry a dropped connection)
    proxy.fail_next(0)
    assert not storage.exists(f"{bucket}/never.bin", retry=_RETRY)


def test_credentials_never_appear_in_retry_logs(
    faulty_s3: tuple[FaultProxy, str], s3_server: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    proxy, bucket = faulty_s3
    proxy.fail_next(2)
    with caplog.at_level(logging.DEBUG):
        storage.write_bytes_atomic(f"{bucket}/logged.bin", b"x", retry=_RETRY)
    retry_lines = [r for r in caplog.records if r.name == "cola_batch.storage"]
    assert retry_lines and proxy.injected == 2
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert s3_server.secret_key not in text


_RETRY = RetryPolicy(retries=5, backoff_initial_s=0.01, backoff_max_s=0.05)
