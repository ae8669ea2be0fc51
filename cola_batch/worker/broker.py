"""What Celery's Redis broker holds, read directly: queue depth, in-flight shards, next message.

Contract:
* Read-only: nothing here takes, acknowledges or alters a message; Celery alone delivers.
* The layout is kombu's Redis transport (key names in `cola_batch.keys`): a queue is a list
  per priority step, LPUSHed and BRPOPed (the next message is at index -1); delivered but
  unacknowledged messages sit in the `unacked` hash as `[message, exchange, routing_key]`.
  A message is JSON with a base64 body holding Celery protocol 2's `[args, kwargs, embed]`.
* Anything that does not parse is reported as unknown (None), never raised: these readers serve
  metrics, autoscaling and read-ahead, which must survive foreign or future message formats.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

from cola_batch.keys import (
    KOMBU_BINDING_PREFIX,
    KOMBU_PRIORITY_STEPS,
    KOMBU_SEP,
    KOMBU_UNACKED_KEY,
    SHARD_TASK_NAME,
    kombu_queue_lists,
)
from cola_batch.schemas.job import ShardTask


def unacked_queue(
    entry: bytes | str, bindings: Callable[[str], list[tuple[str, str]]]
) -> str | None:
    """The queue an entry of kombu's `unacked` hash was delivered from, if it can be told.

    An entry is JSON `[message, exchange, routing_key]`. The default exchange ("") routes by
    queue name; any other exchange is resolved through its kombu binding table, given by
    `bindings(exchange)` as (routing_key, queue) pairs.
    """
    try:
        _, exchange, routing_key = json.loads(entry)
    except (ValueError, TypeError):
        return None
    if not isinstance(routing_key, str) or not isinstance(exchange, str):
        return None
    if exchange == "":
        return routing_key
    for key, queue in bindings(exchange):
        if key == routing_key:
            return queue
    return None


def read_queue_stats(client: Any, queues: list[str]) -> dict[str, tuple[int, int]]:
    """{queue: (depth, in_flight)} from one Redis database, read now."""
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        for name in kombu_queue_lists(queue):
            pipe.llen(name)
    lengths = pipe.execute()
    per_queue = len(KOMBU_PRIORITY_STEPS) + 1
    depth = {q: sum(lengths[i * per_queue : (i + 1) * per_queue]) for i, q in enumerate(queues)}

    cache: dict[str, list[tuple[str, str]]] = {}

    def bindings(exchange: str) -> list[tuple[str, str]]:
        if exchange not in cache:
            pairs = []
            for member in client.smembers(KOMBU_BINDING_PREFIX + exchange):
                text = member.decode() if isinstance(member, bytes) else member
                parts = text.split(KOMBU_SEP)
                if len(parts) == 3:
                    pairs.append((parts[0], parts[2]))
            cache[exchange] = pairs
        return cache[exchange]

    inflight = dict.fromkeys(queues, 0)
    for _, entry in client.hscan_iter(KOMBU_UNACKED_KEY, count=500):
        queue = unacked_queue(entry, bindings)
        if queue in inflight:
            inflight[queue] += 1
    return {q: (int(depth[q]), inflight[q]) for q in queues}


def decode_shard_message(raw: str | bytes) -> ShardTask | None:
    """The `ShardTask` inside one kombu Redis message (Celery protocol 2, JSON), else None."""
    try:
        message = json.loads(raw)
        if message.get("headers", {}).get("task") != SHARD_TASK_NAME:
            return None
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return ShardTask.model_validate(args[0])
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


def peek_next_shard(client: Any, queue: str) -> ShardTask | None:
    """The shard the queue would hand out next, without taking it (None if empty/unknown)."""
    pipe = client.pipeline(transaction=False)
    for name in kombu_queue_lists(queue):
        pipe.lindex(name, -1)
    for raw in pipe.execute():
        if raw is not None:
            return decode_shard_message(raw)
    return None
