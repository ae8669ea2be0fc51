"""The `cola-batch pool` command: a local autoscaler of standard Celery worker processes.

Contract: `register(app)` adds `pool` to a typer app (`python -m cola_batch.pool_cli` runs it
alone). The command supervises `cola_batch.worker.pool.Pool` until SIGTERM/SIGINT, then
warm-stops every worker and exits 0. Decisions and worker transitions are logged on stderr
with timestamps. With `--metrics-port` it serves `cola_batch_pool_desired_workers`,
`cola_batch_pool_workers{phase}` and the queue gauges (depth, in-flight, backlog) of its queues.
Defaults of the tuning flags come from `COLA_BATCH_POOL_*` settings.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from cola_batch.cli_options import fail


def pool(
    model: Annotated[str, typer.Option("--model", help="Model root each worker loads once.")],
    max_workers: Annotated[
        int, typer.Option("--max", min=1, help="Most workers (at most one per GPU listed).")
    ],
    min_workers: Annotated[int, typer.Option("--min", min=0, help="Fewest workers.")] = 0,
    gpus: Annotated[
        str | None, typer.Option("--gpus", help="GPU slots, e.g. 0,1,2,3 or all; none = CPU.")
    ] = None,
    queue: Annotated[
        list[str] | None,
        typer.Option("--queue", "-q", help="Queues to consume and size for (repeatable)."),
    ] = None,
    shards_per_worker: Annotated[
        int | None, typer.Option("--shards-per-worker", min=1, help="Backlog per worker.")
    ] = None,
    scale_up_window: Annotated[
        float | None, typer.Option("--scale-up-window", min=0, help="Seconds.")
    ] = None,
    scale_down_window: Annotated[
        float | None,
        typer.Option("--scale-down-window", min=0, help="Seconds; longer than a shard."),
    ] = None,
    poll: Annotated[float | None, typer.Option("--poll", min=0.05, help="Seconds.")] = None,
    load_timeout: Annotated[
        float | None, typer.Option("--load-timeout", min=1, help="Seconds to come up.")
    ] = None,
    log_dir: Annotated[
        Path | None,
        typer.Option("--log-dir", help="Write worker-<slot>.log here instead of to stderr."),
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option("--metrics-port", min=0, max=65535, help="Serve /metrics.")
    ] = None,
    loglevel: Annotated[str, typer.Option("--loglevel", help="Worker log level.")] = "INFO",
) -> None:
    """Autoscale local workers between --min and --max from backlog + in-flight shards."""
    from cola_batch.settings import get_settings
    from cola_batch.worker.pool import Pool
    from cola_batch.worker.scaling import PoolConfig

    settings = get_settings()
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    url = settings.redis_url_value()
    if not url:
        fail("COLA_BATCH_REDIS_URL is not set: the pool's workers need the Redis jobs go to")
    if not Path(model).exists():
        fail(f"--model {model}: no such directory")
    try:
        config = PoolConfig(
            min_workers=min_workers,
            max_workers=max_workers,
            shards_per_worker=shards_per_worker or settings.pool_shards_per_worker,
            scale_up_window_s=_pick(scale_up_window, settings.pool_scale_up_window_s),
            scale_down_window_s=_pick(scale_down_window, settings.pool_scale_down_window_s),
        )
        supervisor = Pool(
            model=model,
            redis_url=url,
            queues=queue or [settings.queue_interactive, settings.queue_batch],
            config=config,
            gpus=gpus,
            poll_s=_pick(poll, settings.pool_poll_s),
            load_timeout_s=_pick(load_timeout, settings.pool_load_timeout_s),
            # A warm stop may take the whole soft shutdown, then requeues; allow for both.
            stop_timeout_s=settings.soft_shutdown_s + 60.0,
            log_dir=log_dir,
            loglevel=loglevel,
        )
    except ValueError as exc:
        fail(str(exc))

    server = None
    if metrics_port is not None:
        server = _serve_metrics(supervisor, url, metrics_port, settings)

    stop = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        logging.getLogger(__name__).info(
            "pool: %s received; warm-stopping all workers", signal.Signals(signum).name
        )
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        supervisor.run(stop)
    finally:
        if server is not None:
            server.shutdown()
    logging.getLogger(__name__).info("pool: stopped")


def _pick(given: float | None, default: float) -> float:
    return default if given is None else given


def _serve_metrics(supervisor: Any, url: str, port: int, settings: Any) -> Any:
    from prometheus_client import CollectorRegistry, Gauge

    from cola_batch.worker.metrics import register_queue_collector, start_metrics_server

    registry = CollectorRegistry()  # the pool's own: no worker instruments, no double counts
    register_queue_collector(url, supervisor.queues, registry=registry)
    desired = Gauge(
        "cola_batch_pool_desired_workers",
        "Workers the pool's last decision asked for.",
        registry=registry,
    )
    phases = Gauge(
        "cola_batch_pool_workers",
        "Worker processes of the pool, by phase (starting, up, draining, stopping).",
        ["phase"],
        registry=registry,
    )

    def on_decision(decision: Any, _obs: Any) -> None:
        desired.set(decision.target)
        for phase, count in supervisor.counts().items():
            phases.labels(phase=phase).set(count)

    supervisor.on_decision = on_decision
    token = settings.api_token.get_secret_value() if settings.api_token else None
    server = start_metrics_server(port, registry=registry, token=token)
    logging.getLogger(__name__).info("pool: metrics on :%d/metrics", server.port)
    return server


def register(app: typer.Typer) -> None:
    app.command("pool")(pool)


if __name__ == "__main__":  # pragma: no cover - `python -m cola_batch.pool_cli`
    _app = typer.Typer(pretty_exceptions_enable=False)
    register(_app)
    _app()
