"""The Celery application: broker settings that make shard delivery safe, and the shard task.

Contract:
* JSON is the only accepted content type: a pickled message is refused, never executed.
* Shards are acknowledged late (after their outputs are committed) with one message in flight
  per worker process, so a crashed or killed process never loses a shard: a lost child process
  requeues its shard at once (`task_reject_on_worker_lost`), a lost host after the Redis
  transport's visibility timeout. Redelivery is bounded by the attempt counter in
  `cola_batch.worker.shard`, which dead-letters a shard that keeps killing its worker.
* The broker URL is `Settings.redis_url`; the app is built at import time from the environment
  because Celery's worker command imports it by name (`-A cola_batch.worker.celery_app`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from typing import Any

from celery import Celery, signals

from cola_batch.keys import SHARD_TASK_NAME, worker_loaded_key
from cola_batch.settings import Settings, get_settings

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # linux/prctl.h
LOADED_TTL_S = 7 * 24 * 3600  # read only while a new worker starts; the pool clears it first


def make_app(settings: Settings) -> Celery:
    url = settings.redis_url_value() or "redis://127.0.0.1:6379/0"
    app = Celery("cola_batch", broker=url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=settings.worker_prefetch,
        task_default_queue=settings.queue_batch,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            # How often live workers look for shards of dead hosts whose visibility timeout
            # ran out (kombu's default scans at most every 10 s).
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
            # Workers list the interactive queue first; poll queues in that order.
            "queue_order_strategy": "priority",
        },
        # SIGTERM: stop taking shards, give the running one time to finish; what is still
        # running after that is requeued by the cold shutdown that follows.
        # (Celery honours this only for a cold shutdown: the launcher remaps SIGTERM to it.)
        worker_soft_shutdown_timeout=float(settings.soft_shutdown_s),
        # Celery sleeps the whole timeout once soft shutdown starts; an idle worker has nothing
        # to wait for (countdown retries it holds are restored to the queue when it closes).
        worker_enable_soft_shutdown_on_idle=False,
        # The pool process loads the model in worker_process_init; Celery's default (4 s)
        # would kill a replacement process whose model takes longer to load.
        worker_proc_alive_timeout=float(settings.pool_load_timeout_s),
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )

    @app.task(name=SHARD_TASK_NAME, bind=True)
    def run_shard(self: Any, task: dict[str, Any]) -> dict[str, Any]:  # noqa: ARG001
        from cola_batch.worker.shard import run_shard_task

        return run_shard_task(task)

    return app


app = make_app(get_settings())


@signals.worker_process_init.connect
def _load_model_in_child(**_: Any) -> None:
    """Load the model in the pool process, after fork, before it takes its first shard."""
    from cola_batch.worker.holder import preload_from_env

    preload_from_env()
    _announce_loaded()
    _serve_metrics()


def _announce_loaded() -> None:
    """Tell the pool this worker can take shards: Celery answers pings before the model loads."""
    settings = get_settings()
    url = settings.redis_url_value()
    if not (settings.worker_node and url and settings.worker_model):
        return
    import redis

    try:
        with redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10) as client:
            client.set(worker_loaded_key(settings.worker_node), os.getpid(), ex=LOADED_TTL_S)
    except redis.RedisError as exc:
        log.warning("cannot announce the loaded model in Redis: %s", exc)


def _serve_metrics() -> None:
    """Metrics are served by the process that runs shards, after its model has loaded."""
    from cola_batch.worker.metrics import serve_worker_metrics

    settings = get_settings()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    offset = int(visible) if visible.isdigit() else 0  # one port per GPU on a shared host
    serve_worker_metrics(
        settings, queues=[settings.queue_interactive, settings.queue_batch], port_offset=offset
    )


@signals.worker_init.connect
def _die_with_parent(**_: Any) -> None:
    """Stop (SIGTERM: soft, then cold shutdown) when the launcher that started us dies.

    Without this, a SIGKILLed `cola-batch worker`/`pool`/`run` leaves its workers consuming
    shards with nobody to stop them, and a restarted pool would add more on top.
    """
    parent = get_settings().worker_parent_pid
    if parent is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        log.warning("cannot link this worker's life to its launcher (prctl failed)")
        return
    if os.getppid() != parent:  # the launcher died before the link was made
        log.warning("launcher %d is gone; stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)


@signals.worker_init.connect
def _load_model_in_solo(sender: Any = None, **_: Any) -> None:
    """With the solo pool the main process runs shards, so it loads the model itself."""
    pool = getattr(getattr(sender, "pool_cls", None), "__module__", "") or ""
    if pool.endswith("solo"):
        from cola_batch.worker.holder import preload_from_env

        preload_from_env()
        _announce_loaded()
        _serve_metrics()
