"""The job service end to end: submit → Redis queue → real Celery workers → object storage.

Each test runs real worker processes (the production launcher) with a tiny random checkpoint,
against a private redis-server and, where named, a SeaweedFS S3 server.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import pytest
from workers import WorkerGroup, make_tiny_model, write_prompts

from cola_batch import keys, storage
from cola_batch.jobs import Control, read_results
from cola_batch.schemas.job import JobState
from cola_batch.schemas.sampling import SamplingParams
from cola_batch.settings import Settings
from cola_batch.worker.queue import enqueue_shard

FAST = SamplingParams(max_new_tokens=8, timesteps=2)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def control(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Control:
    monkeypatch.setenv("COLA_BATCH_REDIS_URL", redis_url)
    return Control.connect(Settings(redis_url=redis_url, default_output=str(tmp_path / "runs")))


def assert_exactly_once(job_uri: str, ids: list[str], samples: int = 1) -> None:
    table = read_results(job_uri)
    got = sorted(
        zip(table.column("id").to_pylist(), table.column("sample_index").to_pylist(), strict=True)
    )
    want = sorted((i, s) for i in ids for s in range(samples))
    assert got == want


def input_ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def test_submit_wait_results_on_local_storage(
    control: Control, tiny_model: Path, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 10)
    spec = control.submit(
        [str(prompts)],
        model=str(tiny_model),
        sampling=FAST.model_copy(update={"samples_per_prompt": 2}),
        shard_size=4,
    )
    assert (spec.num_rows, spec.num_shards) == (10, 3)
    assert control.status(spec.job_id).state is JobState.QUEUED

    with WorkerGroup(tiny_model, control.settings.redis_url_value(), tmp_path) as group:
        final = control.wait(spec.job_id, timeout_s=120)
        assert final.state is JobState.COMPLETED, group.log_text()
    # One worker, three queued shards: while shard n generated it read shard n+1's input.
    assert "input was read ahead" in group.logs[0].read_text(), group.log_text()

    job = control.job_uri(spec.job_id)
    assert_exactly_once(job, input_ids(prompts), samples=2)
    assert (final.rows_completed, final.rows_failed, final.rows_total) == (20, 0, 20)
    assert (final.shards_completed, final.shards_total) == (3, 3)
    assert final.completion_tokens > 0
    manifest = json.loads(storage.read_text(keys.manifest_uri(job)))
    assert manifest["state"] == "completed" and manifest["rows_ok"] == 20
    assert manifest["provenance"]["job_id"] == spec.job_id
    assert len(manifest["provenance"]["sampling"]) > 3
    assert storage.exists(keys.success_marker_uri(job))
    table = read_results(job)
    assert set(table.column("finish_reason").to_pylist()) <= {"stop", "length"}


def test_a_max_tokens_column_caps_each_rows_generation(
    control: Control, tiny_model: Path, tmp_path: Path
) -> None:
    path = tmp_path / "p.jsonl"
    rows = [{"id": "capped", "prompt": "alpha beta gamma", "budget": 2},
            {"id": "default", "prompt": "alpha beta gamma", "budget": None}]  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    sampling = SamplingParams(max_new_tokens=12, timesteps=2)
    spec = control.submit([str(path)], model=str(tiny_model), sampling=sampling,
                          max_tokens_column="budget")  # fmt: skip
    with WorkerGroup(tiny_model, control.settings.redis_url_value(), tmp_path) as group:
        assert control.wait(spec.job_id, timeout_s=120).state is JobState.COMPLETED, (
            group.log_text()
        )
    out = {r["id"]: r for r in read_results(control.job_uri(spec.job_id)).to_pylist()}
    assert out["capped"]["completion_tokens"] == 2 and out["capped"]["finish_reason"] == "length"
    assert out["default"]["completion_tokens"] == 12  # the same prompt, the job's own budget


def test_submit_wait_results_on_s3(
    control: Control, tiny_model: Path, tmp_path: Path, s3_bucket: str
) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 6)
    spec = control.submit([str(prompts)], model=str(tiny_model), output=f"{s3_bucket}/runs",
                          sampling=FAST, shard_size=3)  # fmt: skip
    with WorkerGroup(tiny_model, control.settings.redis_url_value(), tmp_path) as group:
        final = control.wait(spec.job_id, timeout_s=120)
        assert final.state is JobState.COMPLETED, group.log_text()
    job = control.job_uri(spec.job_id)
    assert job.startswith("s3://")
    assert_exactly_once(job, input_ids(prompts))
    assert storage.exists(keys.success_marker_uri(job))


def test_two_workers_share_a_job_and_duplicate_deliveries_are_harmless(
    control: Control, tiny_model: Path, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 16)
    with WorkerGroup(tiny_model, control.settings.redis_url_value(), tmp_path, count=2) as group:
        spec = control.submit([str(prompts)], model=str(tiny_model), sampling=FAST, shard_size=2)
        job = control.job_uri(spec.job_id)
        # Every shard is delivered a second time, so the two workers run copies concurrently.
        from cola_batch.jobs import staged_tasks

        for task in staged_tasks(spec, job):
            enqueue_shard(task, queue=spec.queue, settings=control.settings)
        final = control.wait(spec.job_id, timeout_s=180)
        assert final.state is JobState.COMPLETED, group.log_text()
        time.sleep(1.0)  # let the duplicate copies finish before counting
    assert_exactly_once(job, input_ids(prompts))
    status = control.status(spec.job_id)
    assert (status.rows_completed, status.shards_completed) == (16, 8)
    pids = {
        json.loads(storage.read_text(uri))["pid"]
        for uri in storage.list_files(keys.commits_prefix(job))
    }
    assert len(pids) == 2, "both workers should have committed shards"


def test_a_job_whose_rows_all_fail_is_failed_not_completed(
    control: Control, tiny_model: Path, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 5)
    spec = control.submit([str(prompts)], model=str(tiny_model), sampling=FAST, shard_size=5)
    env = {"COLA_BATCH_MAX_CONTEXT": "4"}  # every prompt is now too long
    with WorkerGroup(tiny_model, control.settings.redis_url_value(), tmp_path, env=env) as group:
        final = control.wait(spec.job_id, timeout_s=120)
        assert final.state is JobState.FAILED, group.log_text()
    assert (final.rows_completed, final.rows_failed) == (0, 5)
    job = control.job_uri(spec.job_id)
    assert not storage.exists(keys.success_marker_uri(job))
    table = read_results(job)
    assert set(table.column("error_code").to_pylist()) == {"prompt_too_long"}
    assert storage.exists(keys.error_shard_uri(job, 0))


def test_cancel_stops_new_shards_and_keeps_committed_results(
    control: Control, tiny_model: Path, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 40)
    slow = SamplingParams(max_new_tokens=32, timesteps=8)
    spec = control.submit([str(prompts)], model=str(tiny_model), sampling=slow, shard_size=2)
    with WorkerGroup(tiny_model, control.settings.redis_url_value(), tmp_path) as group:
        deadline = time.monotonic() + 120
        while control.status(spec.job_id).shards_completed < 1:
            assert time.monotonic() < deadline, group.log_text()
            time.sleep(0.2)
        assert control.cancel(spec.job_id).state is JobState.CANCELLED
        # The shard running at cancel time may still commit; wait until no shard is in flight
        # (kombu's `unacked` hash empties when the worker acknowledges it), however slow.
        deadline = time.monotonic() + 120
        while control.store.r.hlen("unacked"):
            assert time.monotonic() < deadline, group.log_text()
            time.sleep(0.2)
        done_after_cancel = control.status(spec.job_id).shards_completed
        time.sleep(3.0)
        assert control.status(spec.job_id).shards_completed == done_after_cancel
    assert done_after_cancel < 20
    table = read_results(control.job_uri(spec.job_id))
    assert table.num_rows == 2 * done_after_cancel
    assert control.status(spec.job_id).state is JobState.CANCELLED


def test_retry_reruns_only_failed_shards_until_the_job_completes(
    control: Control, tiny_model: Path, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 6)
    spec = control.submit([str(prompts)], model=str(tiny_model), sampling=FAST, shard_size=3)
    job = control.job_uri(spec.job_id)
    broken = {"COLA_BATCH_MAX_CONTEXT": "4"}
    with WorkerGroup(tiny_model, control.settings.redis_url_value(), tmp_path, env=broken):
        assert control.wait(spec.job_id, timeout_s=120).state is JobState.FAILED
    first = {uri: storage.read_bytes(uri) for uri in storage.list_files(keys.commits_prefix(job))}

    assert control.retry(spec.job_id) == 2
    assert control.status(spec.job_id).state is JobState.QUEUED
    with WorkerGroup(tiny_model, control.settings.redis_url_value(), tmp_path) as group:
        final = control.wait(spec.job_id, timeout_s=120)
        assert final.state is JobState.COMPLETED, group.log_text()
    assert (final.rows_completed, final.rows_failed) == (6, 0)
    assert_exactly_once(job, input_ids(prompts))
    for uri, data in first.items():  # generation 0 records are history, never rewritten
        assert storage.read_bytes(uri) == data
    assert control.retry(spec.job_id) == 0  # nothing left to retry


def test_resume_rebuilds_lost_redis_state_from_storage(
    control: Control, tiny_model: Path, tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 8)
    spec = control.submit([str(prompts)], model=str(tiny_model), sampling=FAST, shard_size=2)
    job = control.job_uri(spec.job_id)
    with WorkerGroup(tiny_model, control.settings.redis_url_value(), tmp_path) as group:
        assert control.wait(spec.job_id, timeout_s=120).state is JobState.COMPLETED, (
            group.log_text()
        )
        commits_before = sorted(storage.list_files(keys.commits_prefix(job)))
        storage.delete(keys.manifest_uri(job))
        storage.delete(keys.success_marker_uri(job))
        # Redis loses everything (no persistence), including the queue.
        control.store.r.flushdb()
        with pytest.raises(LookupError):
            control.status(spec.job_id)
        assert control.resume(spec.job_id, job) == 0  # every shard is committed on storage
        final = control.wait(spec.job_id, timeout_s=60)
    assert final.state is JobState.COMPLETED
    assert (final.rows_completed, final.shards_completed) == (8, 4)
    assert sorted(storage.list_files(keys.commits_prefix(job))) == commits_before
    assert storage.exists(keys.success_marker_uri(job))


def test_outputs_are_readable_by_duckdb_directly(
    control: Control, tiny_model: Path, tmp_path: Path
) -> None:
    import duckdb

    prompts = write_prompts(tmp_path / "p.jsonl", 5)
    spec = control.submit([str(prompts)], model=str(tiny_model), sampling=FAST, shard_size=2)
    with WorkerGroup(tiny_model, control.settings.redis_url_value(), tmp_path) as group:
        assert control.wait(spec.job_id, timeout_s=120).state is JobState.COMPLETED, (
            group.log_text()
        )
    job = control.job_uri(spec.job_id)
    # The README's one-liner: every output file of a job as one table, joinable on id.
    rows = duckdb.sql(
        f"SELECT id, text FROM read_parquet('{job}/outputs/*.parquet') ORDER BY id"
    ).fetchall()
    assert [r[0] for r in rows] == input_ids(prompts)
    assert all(isinstance(r[1], str) for r in rows)


def test_status_lists_each_worker_and_the_shard_it_runs(
    control: Control, tiny_model: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from cola_batch.cli import app
    from cola_batch.cli_jobs import worker_activity

    prompts = write_prompts(tmp_path / "p.jsonl", 12)
    # Shards of several seconds even on an idle machine, so one is seen running.
    slow = SamplingParams(max_new_tokens=128, timesteps=16)
    spec = control.submit([str(prompts)], model=str(tiny_model), sampling=slow, shard_size=6)
    with WorkerGroup(tiny_model, control.settings.redis_url_value(), tmp_path) as group:
        deadline = time.monotonic() + 90
        running: dict[str, list[dict]] = {}
        while not any(running.values()):
            assert time.monotonic() < deadline, group.log_text()
            running = worker_activity(control.settings, timeout_s=1.0)
        ((node, shards),) = running.items()
        assert node.startswith("cola-cpu-") and shards[0]["job_id"] == spec.job_id
        result = CliRunner().invoke(app, ["status", spec.job_id, "--workers"])
        assert result.exit_code == 0, result.output
        assert "cola-cpu-" in result.output and "workers" in result.output
        control.cancel(spec.job_id)


def _scrape(port: int) -> dict[str, float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}"] = sample.value
    return values


def test_worker_metrics_move_while_a_job_runs(
    control: Control, tiny_model: Path, tmp_path: Path
) -> None:
    from services import free_port

    port = free_port()
    prompts = write_prompts(tmp_path / "p.jsonl", 8)
    spec = control.submit([str(prompts)], model=str(tiny_model), sampling=FAST, shard_size=2)
    env = {"COLA_BATCH_METRICS_PORT": str(port)}
    with WorkerGroup(tiny_model, control.settings.redis_url_value(), tmp_path, env=env) as group:
        deadline = time.monotonic() + 90
        seen: list[dict[str, float]] = []
        while True:
            assert time.monotonic() < deadline, group.log_text()
            with contextlib.suppress(OSError):  # the endpoint starts once the model has loaded
                seen.append(_scrape(port))
            if control.status(spec.job_id).terminal and seen:
                break
            time.sleep(0.3)
        final = _scrape(port)
    ok_key = "cola_batch_rows_total{queue=cola-batch,status=ok}"
    assert final[ok_key] == 8
    assert final["cola_batch_tokens_total{queue=cola-batch}"] > 0
    assert final["cola_batch_shard_seconds_count{queue=cola-batch}"] == 4
    assert final["cola_batch_model_load_seconds{}"] > 0
    # Scraped during the job: the row counter was seen below its final value and then rising.
    assert any(s.get(ok_key, 0) < 8 for s in seen)
