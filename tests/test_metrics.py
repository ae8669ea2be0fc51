"""Prometheus metrics: worker counters on an HTTP scrape, and queue gauges read from a real Redis.

The queue gauges are what KEDA scales on, so they are checked against real Celery messages:
published tasks (depth), a message taken by a consumer and not acked (in-flight), and a real
Celery worker running a late-acked task (the shard runner's situation).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import celery
import kombu
import pytest
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from services import free_port

from cola_batch import keys
from cola_batch.settings import Settings
from cola_batch.worker import broker, metrics

REPO_ROOT = Path(__file__).resolve().parents[1]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str, headers: dict[str, str] | None = None) -> Samples:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def queue_server(redis_url: str) -> Iterator[tuple[str, Callable[[], Samples]]]:
    """A metrics server on a free port with a QueueCollector for queues q, other, idle."""
    registry = CollectorRegistry()
    collector = metrics.register_queue_collector(
        redis_url, ["q", "other", "idle"], registry=registry
    )
    server = metrics.start_metrics_server(0, registry=registry, addr="127.0.0.1")
    try:
        yield redis_url, lambda: scrape(server.url)
    finally:
        server.shutdown()
        collector.close()


def producer(url: str) -> celery.Celery:
    return celery.Celery(broker=url, set_as_current=False)


# ---------------------------------------------------------------------- pure parts


def test_ewma_starts_at_the_first_sample_and_moves_by_alpha() -> None:
    assert metrics.ewma(None, 100.0, 0.3) == 100.0
    assert metrics.ewma(100.0, 200.0, 0.3) == pytest.approx(130.0)
    with pytest.raises(ValueError):
        metrics.ewma(1.0, 2.0, 0.0)


def test_unacked_entries_resolve_to_their_queue() -> None:
    def bindings(exchange: str) -> list[tuple[str, str]]:
        return [("rk", "routed")] if exchange == "ex" else []

    default_exchange = json.dumps([{"body": "..."}, "", "q"])
    bound = json.dumps([{}, "ex", "rk"])
    unbound = json.dumps([{}, "ex", "nope"])
    assert broker.unacked_queue(default_exchange, bindings) == "q"
    assert broker.unacked_queue(bound.encode(), bindings) == "routed"
    assert broker.unacked_queue(unbound, bindings) is None
    assert broker.unacked_queue(b"not json", bindings) is None


def test_queue_lists_include_kombu_priority_lists() -> None:
    assert keys.kombu_queue_lists("q") == ["q", "q\x06\x163", "q\x06\x166", "q\x06\x169"]


# ---------------------------------------------------------------------- worker instruments


def test_worker_counters_move_on_scrape_after_shards() -> None:
    server = metrics.start_metrics_server(0, addr="127.0.0.1")
    try:
        before = scrape(server.url)
        metrics.shard_started("wq")
        busy = scrape(server.url)
        metrics.observe_shard("wq", 12.0, rows_ok=8, rows_failed=2, completion_tokens=600)
        metrics.shard_finished("wq")
        metrics.observe_shard("wq", 4000.0, rows_ok=1, rows_failed=0, completion_tokens=0)
        metrics.set_model_load_seconds(42.5)
        after = scrape(server.url)
    finally:
        server.shutdown()

    def delta(name: str, **labels: str) -> float:
        return (value(after, name, **labels) or 0.0) - (value(before, name, **labels) or 0.0)

    assert value(busy, "cola_batch_worker_busy", queue="wq") == 1.0
    assert value(after, "cola_batch_worker_busy", queue="wq") == 0.0
    assert delta("cola_batch_rows_total", queue="wq", status="ok") == 9
    assert delta("cola_batch_rows_total", queue="wq", status="failed") == 2
    assert delta("cola_batch_tokens_total", queue="wq") == 600
    assert delta("cola_batch_shard_seconds_count", queue="wq") == 2
    assert delta("cola_batch_shard_seconds_sum", queue="wq") == pytest.approx(4012.0)
    # 12 s lands in the 20 s bucket, 4000 s between 3600 and 5400.
    assert delta("cola_batch_shard_seconds_bucket", queue="wq", le="10.0") == 0
    assert delta("cola_batch_shard_seconds_bucket", queue="wq", le="20.0") == 1
    assert delta("cola_batch_shard_seconds_bucket", queue="wq", le="3600.0") == 1
    assert delta("cola_batch_shard_seconds_bucket", queue="wq", le="5400.0") == 2
    assert value(after, "cola_batch_model_load_seconds") == 42.5
    # A shard without tokens leaves the rate alone; 600 tokens / 12 s moved it to or toward 50.
    rate = value(after, "cola_batch_tokens_per_second")
    previous = value(before, "cola_batch_tokens_per_second") or None
    expected = metrics.ewma(previous, 50.0, metrics.TOKENS_PER_SECOND_ALPHA)
    assert rate == pytest.approx(expected)


def test_worker_endpoint_serves_its_counters_and_the_queue_gauges(redis_url: str) -> None:
    settings = Settings(redis_url=redis_url, metrics_port=free_port())
    producer(redis_url).send_task("x", args=[1], queue="wq")
    server = metrics.serve_worker_metrics(settings, queues=["wq"])
    try:
        assert server is not None
        assert metrics.serve_worker_metrics(settings, queues=["wq"]) is server  # once only
        metrics.observe_shard("wq", 1.0, rows_ok=1, rows_failed=0, completion_tokens=1)
        samples = scrape(f"http://127.0.0.1:{settings.metrics_port}/metrics")
    finally:
        metrics.stop_worker_metrics()
    assert value(samples, "cola_batch_backlog_shards", queue="wq") == 1
    assert (value(samples, "cola_batch_rows_total", queue="wq", status="ok") or 0) >= 1
    assert metrics.serve_worker_metrics(Settings(redis_url=redis_url), queues=["wq"]) is None


def test_gpu_memory_is_silent_without_an_initialised_cuda_context() -> None:
    families = list(metrics.GpuMemoryCollector().collect())
    if torch.cuda.is_initialized():
        assert {f.name for f in families} >= {"cola_batch_gpu_memory_allocated_bytes"}
    else:
        assert families == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_memory_reports_allocated_bytes_on_cuda() -> None:
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
    by_name = {f.name: f for f in metrics.GpuMemoryCollector().collect()}
    allocated = by_name["cola_batch_gpu_memory_allocated_bytes"].samples[0].value
    assert allocated >= block.numel()
    del block


def test_metrics_path_is_open_and_other_paths_need_the_token() -> None:
    server = metrics.start_metrics_server(0, addr="127.0.0.1", token="s3cret")
    base = server.url.removesuffix("/metrics")
    try:
        assert scrape(server.url)  # no Authorization header needed
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"{base}/other", timeout=5)
        assert denied.value.code == 401
        request = urllib.request.Request(
            f"{base}/other", headers={"Authorization": "Bearer s3cret"}
        )
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(request, timeout=5)
        assert missing.value.code == 404
    finally:
        server.shutdown()


# ---------------------------------------------------------------------- queue gauges


def test_depth_counts_published_celery_tasks_per_queue_and_priority(queue_server) -> None:
    url, read = queue_server
    app = producer(url)
    for i in range(3):
        app.send_task("x", args=[i], queue="q")
    app.send_task("x", args=[9], queue="q", priority=5)  # kombu puts this in "q\x06\x163"
    app.send_task("x", args=[0], queue="other")

    samples = read()
    assert value(samples, "cola_batch_queue_depth", queue="q") == 4
    assert value(samples, "cola_batch_queue_depth", queue="other") == 1
    assert value(samples, "cola_batch_queue_depth", queue="idle") == 0
    assert value(samples, "cola_batch_inflight_shards", queue="q") == 0
    assert value(samples, "cola_batch_backlog_shards", queue="q") == 4
    assert value(samples, "cola_batch_redis_up") == 1


def test_a_delivered_unacked_message_moves_from_depth_to_inflight(queue_server) -> None:
    url, read = queue_server
    app = producer(url)
    app.send_task("x", args=[1], queue="q")
    app.send_task("x", args=[2], queue="q")
    app.send_task("x", args=[3], queue="other")

    with kombu.Connection(url) as connection:
        channel = connection.channel()
        message = channel.basic_get("q", no_ack=False)
        assert message is not None
        held = read()
    assert value(held, "cola_batch_queue_depth", queue="q") == 1
    assert value(held, "cola_batch_inflight_shards", queue="q") == 1
    assert value(held, "cola_batch_backlog_shards", queue="q") == 2  # the KEDA signal
    assert value(held, "cola_batch_inflight_shards", queue="other") == 0
    assert value(held, "cola_batch_backlog_shards", queue="other") == 1

    # Closing the consumer without an ack restores the message: in-flight -> queued again.
    released = read()
    assert value(released, "cola_batch_inflight_shards", queue="q") == 0
    assert value(released, "cola_batch_queue_depth", queue="q") == 2
    assert value(released, "cola_batch_backlog_shards", queue="q") == 2


WORKER_MODULE = """
import time
from celery import Celery

app = Celery("sleepy", broker={url!r}, set_as_current=False)
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    accept_content=["json"],
    task_ignore_result=True,
    worker_hijack_root_logger=False,
)


@app.task(name="sleepy")
def sleepy(seconds):
    time.sleep(seconds)
"""


def test_a_running_late_acked_task_counts_as_inflight(queue_server, tmp_path: Path) -> None:
    url, read = queue_server
    (tmp_path / "sleepy_app.py").write_text(textwrap.dedent(WORKER_MODULE.format(url=url)))
    app = producer(url)
    for _ in range(3):
        app.send_task("sleepy", args=[60], queue="q")
    assert value(read(), "cola_batch_inflight_shards", queue="q") == 0
    worker = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "celery", "-A", "sleepy_app", "worker", "--pool", "solo",
         "-Q", "q", "--without-heartbeat", "--without-mingle", "--without-gossip",
         "--loglevel", "WARNING"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(
            lambda: value(read(), "cola_batch_inflight_shards", queue="q") == 1,
            timeout=15,
            what="the worker to take a task",
        )
        samples = read()
        assert value(samples, "cola_batch_queue_depth", queue="q") == 2
        assert value(samples, "cola_batch_backlog_shards", queue="q") == 3
    finally:
        # The task sleeps; a warm shutdown would wait for it. Kill our own process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)


def test_redis_outage_drops_the_queue_gauges_instead_of_reading_zero() -> None:
    registry = CollectorRegistry()
    dead_url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    collector = metrics.QueueCollector(dead_url, ["q"], timeout_s=0.5)
    registry.register(collector)
    server = metrics.start_metrics_server(0, registry=registry, addr="127.0.0.1")
    try:
        samples = scrape(server.url)  # still HTTP 200: probes keep passing
    finally:
        server.shutdown()
    assert value(samples, "cola_batch_redis_up") == 0
    assert not any(name.startswith("cola_batch_backlog") for name, _ in samples)
    assert not any(name.startswith("cola_batch_queue_depth") for name, _ in samples)


# ---------------------------------------------------------------------- exporter command

EXPORTER_MAIN = """
import typer
from cola_batch.metrics_cli import register

app = typer.Typer()


@app.callback()
def main() -> None:
    pass


register(app)
app()
"""


def test_exporter_command_serves_queue_gauges_until_terminated(redis_url: str) -> None:
    producer(redis_url).send_task("x", args=[1], queue="cola-batch")
    port = free_port()
    env = {
        **os.environ,
        "COLA_BATCH_REDIS_URL": redis_url,
        "PYTHONPATH": str(REPO_ROOT),
    }
    env.pop("COLA_BATCH_API_TOKEN", None)
    proc = subprocess.Popen(  # noqa: S603
        [sys.executable, "-c", EXPORTER_MAIN, "exporter", "--queue", "cola-batch",
         "--queue", "q2", "--port", str(port), "--host", "127.0.0.1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        samples: Samples = {}

        def up() -> bool:
            nonlocal samples
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                samples = scrape(url)
            except (urllib.error.URLError, ConnectionError):
                return False
            return True

        wait_for(up, timeout=15, what="the exporter to serve /metrics")
        assert value(samples, "cola_batch_backlog_shards", queue="cola-batch") == 1
        assert value(samples, "cola_batch_backlog_shards", queue="q2") == 0
        # The exporter carries queue gauges only, never (zero) worker counters.
        assert not any(name.startswith("cola_batch_rows") for name, _ in samples)

        producer(redis_url).send_task("x", args=[2], queue="cola-batch")
        assert value(scrape(url), "cola_batch_queue_depth", queue="cola-batch") == 2

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
