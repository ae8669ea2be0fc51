"""Read-ahead: a worker fetches the next shard's staged input without taking the shard.

Shards are published with the production `enqueue_shard` onto a private redis-server; the
staged inputs are local files. "Another worker takes a shard" is kombu's own BRPOP on the list.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import redis

from cola_batch import keys
from cola_batch.schemas.job import ShardTask
from cola_batch.settings import Settings
from cola_batch.worker.broker import decode_shard_message, peek_next_shard
from cola_batch.worker.queue import enqueue_shard
from cola_batch.worker.readahead import ReadAhead

QUEUE = "cola-batch-test"


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def stage(tmp_path: Path, shard: int, redis_url: str) -> ShardTask:
    """Write a staged input and publish its shard task, as the producer does."""
    path = tmp_path / f"shard-{shard}.parquet"
    path.write_bytes(f"input of shard {shard}".encode())
    task = ShardTask(job_id="job-20261204-230000-0123456789ab", shard_id=shard, input_uri=str(path),
                     job_uri=str(tmp_path), row_start=0, row_end=1, row_count=1)  # fmt: skip
    enqueue_shard(task, queue=QUEUE, settings=Settings(redis_url=redis_url))
    return task


def take_one_as_another_worker(client: redis.Redis) -> None:
    assert client.brpop(keys.kombu_queue_lists(QUEUE), timeout=5) is not None


def test_peek_names_the_oldest_shard_and_leaves_it_queued(
    client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    first = stage(tmp_path, 0, redis_url)
    stage(tmp_path, 1, redis_url)

    assert peek_next_shard(client, QUEUE) == first
    assert peek_next_shard(client, QUEUE) == first
    assert client.llen(QUEUE) == 2


def test_peek_of_an_empty_or_foreign_queue_is_none(client: redis.Redis) -> None:
    assert peek_next_shard(client, QUEUE) is None
    client.lpush(QUEUE, b'{"body": "not base64", "headers": {"task": "cola_batch.run_shard"}}')
    assert peek_next_shard(client, QUEUE) is None
    assert decode_shard_message(b"\xff not json") is None
    assert decode_shard_message('{"headers": {"task": "someone.else"}, "body": ""}') is None


def test_the_held_input_is_handed_out_once_and_only_for_its_own_shard(
    client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    zero = stage(tmp_path, 0, redis_url)
    slot = ReadAhead(lambda: client)
    slot.fetch_head(QUEUE)

    assert slot.take(zero.input_uri) == b"input of shard 0"
    assert slot.take(zero.input_uri) is None
    slot.fetch_head(QUEUE)
    assert slot.take(str(tmp_path / "some-other-shard.parquet")) is None
    assert slot.take(zero.input_uri) is None  # a miss drops the stale copy
    assert (slot.hits, slot.misses) == (1, 3)


def test_following_starts_at_the_tail_and_tracks_the_queue_head(
    client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    tasks = [stage(tmp_path, shard, redis_url) for shard in range(3)]
    reads: list[str] = []

    def read(uri: str) -> bytes:
        reads.append(uri)
        return Path(uri).read_bytes()

    slot = ReadAhead(lambda: client, read=read, poll_s=0.05)
    with slot.following(QUEUE) as progress:
        progress(1, 8)
        time.sleep(0.2)
        assert reads == []  # the shard has most of its work ahead: nothing is read yet
        progress(6, 8)
        wait_for(lambda: reads == [tasks[0].input_uri])
        take_one_as_another_worker(client)
        wait_for(lambda: reads[-1:] == [tasks[1].input_uri])
    assert client.llen(QUEUE) == 2  # shard 0 went to the other worker; nothing was taken here
    assert slot.take(tasks[1].input_uri) == b"input of shard 1"
    assert reads.count(tasks[1].input_uri) == 1  # an unchanged head is not read again


def test_take_waits_for_a_download_of_its_shard_still_in_flight(
    client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    zero = stage(tmp_path, 0, redis_url)
    release = threading.Event()

    def slow_read(uri: str) -> bytes:
        release.wait(5)
        return Path(uri).read_bytes()

    slot = ReadAhead(lambda: client, read=slow_read)
    fetch = threading.Thread(target=slot.fetch_head, args=(QUEUE,))
    fetch.start()
    wait_for(lambda: slot._loading is not None)
    threading.Timer(0.2, release.set).start()
    assert slot.take(zero.input_uri) == b"input of shard 0"
    fetch.join(5)


def test_an_input_over_the_size_cap_is_left_for_its_shard_to_read(
    client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    zero = stage(tmp_path, 0, redis_url)
    slot = ReadAhead(lambda: client, max_bytes=len(b"input of shard 0") - 1)
    slot.fetch_head(QUEUE)
    assert slot.take(zero.input_uri) is None
    one = stage(tmp_path, 1, redis_url)
    client.rpop(QUEUE)  # shard 0 went elsewhere; shard 1 (same size) is next
    slot.max_bytes += 1
    slot.fetch_head(QUEUE)
    assert slot.take(one.input_uri) == b"input of shard 1"


def test_broker_or_storage_failures_leave_a_miss(redis_url: str, tmp_path: Path) -> None:
    def broken_broker() -> redis.Redis:
        raise redis.ConnectionError("broker down")

    slot = ReadAhead(broken_broker)
    slot.fetch_head(QUEUE)
    assert slot.take("anything") is None

    client = redis.Redis.from_url(redis_url)
    zero = stage(tmp_path, 0, redis_url)
    attempts: list[str] = []

    def unavailable(uri: str) -> bytes:
        attempts.append(uri)
        raise OSError(16, "Service Unavailable")

    slot = ReadAhead(lambda: client, read=unavailable)
    slot.fetch_head(QUEUE)
    slot.fetch_head(QUEUE)  # the tail polls again: the failing head is not read twice
    assert slot.take(zero.input_uri) is None
    assert attempts == [zero.input_uri]


def wait_for(condition: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)
