"""Publishing shard tasks onto the Celery queues.

Contract: a published message carries only a `ShardTask` as JSON (a few hundred bytes); rows
stay on object storage. `celery_app_for` reuses one Celery app and broker connection pool per Redis
URL, so a producer staging thousands of shards does not reconnect per shard.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from cola_batch.schemas.job import ShardTask
from cola_batch.settings import Settings, get_settings
from cola_batch.worker.celery_app import SHARD_TASK_NAME, make_app


@lru_cache(maxsize=8)
def celery_app_for(settings: Settings) -> Celery:
    """One Celery app (and broker connection pool) per settings value."""
    return make_app(settings)


def enqueue_shard(
    task: ShardTask,
    *,
    queue: str,
    countdown: float | None = None,
    settings: Settings | None = None,
) -> None:
    app = celery_app_for(settings or get_settings())
    app.send_task(
        SHARD_TASK_NAME,
        args=[task.model_dump(mode="json")],
        # Celery would repeat the whole task as its printable form; a short tag keeps each
        # queued message small (Redis holds one per pending shard).
        argsrepr=f"{task.job_id}:{task.shard_id}:g{task.generation}",
        queue=queue,
        countdown=countdown,
    )
