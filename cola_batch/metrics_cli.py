"""The `cola-batch exporter` command: queue gauges for autoscalers, with no model and no GPU.

Contract: `register(app)` adds `exporter` to a typer app. The command serves
`cola_batch_queue_depth`, `cola_batch_inflight_shards`, `cola_batch_backlog_shards` (per
`--queue`) and `cola_batch_redis_up` on `GET /metrics` until SIGTERM/SIGINT, reading the broker
Redis (`COLA_BATCH_REDIS_URL`) at each scrape. It is the signal source KEDA needs while the
worker pool is at zero; it exports no worker counters, so it never double-counts a worker's.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import typer

DEFAULT_PORT = 9300


def exporter(
    queue: list[str] = typer.Option(
        None, "--queue", "-q", help="Celery queue to export (repeatable); default: the batch queue."
    ),
    port: int | None = typer.Option(
        None,
        "--port",
        min=0,
        max=65535,
        help=f"Port of /metrics; default COLA_BATCH_METRICS_PORT, else {DEFAULT_PORT}.",
    ),
    host: str = typer.Option("0.0.0.0", "--host", help="Address to bind."),
) -> None:
    """Serve queue depth, in-flight and backlog shards from Redis for Prometheus/KEDA."""
    from prometheus_client import CollectorRegistry

    from cola_batch.settings import get_settings
    from cola_batch.worker.metrics import register_queue_collector, start_metrics_server

    settings = get_settings()
    url = settings.redis_url_value()
    if not url:
        typer.echo("exporter: COLA_BATCH_REDIS_URL is not set", err=True)
        raise typer.Exit(2)
    queues = list(queue or [settings.queue_batch])
    chosen = port if port is not None else (settings.metrics_port or DEFAULT_PORT)
    # A registry of its own: only the queue gauges, none of the (zero) worker counters.
    registry = CollectorRegistry()
    collector = register_queue_collector(url, queues, registry=registry)
    token = settings.api_token.get_secret_value() if settings.api_token else None
    server = start_metrics_server(chosen, registry=registry, token=token, addr=host)
    typer.echo(f"exporter: serving {', '.join(queues)} on :{server.port}/metrics", err=True)

    stop = threading.Event()

    def _stop(*_: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while not stop.wait(3600):
            pass
    finally:
        server.shutdown()
        collector.close()


def register(app: typer.Typer) -> None:
    app.command("exporter")(exporter)
