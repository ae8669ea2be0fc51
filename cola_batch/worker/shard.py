"""Run one shard task: read its staged rows, generate, commit the output exactly once.

Contract (design.md invariants 2-7):
* A shard's output is a pure function of the job spec and its rows (per-row seeds), so running
  it twice — redelivery, a duplicate message, two workers at once — writes the same bytes to
  the same deterministic key. Output files appear atomically.
* The commit record is created once (`storage.write_if_absent`); whoever loses that race adopts
  the winner's record. Counters move once per (shard, generation) through `JobStore.record_shard`.
* Every delivery is counted. Past `Settings.max_attempts` the shard is dead-lettered: each of its
  rows is committed as an error row, so a shard that kills its worker does not loop forever.
* A cancelled job's shards are acknowledged without running. A task that fails on a transient
  error is republished with backoff until its attempts run out.
* Generation n > 0 (from `retry`) re-runs only the rows that failed in generation n-1 and commits
  the merged output under the same output key.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cola_batch import keys, storage
from cola_batch.schemas.arrow import OUTPUT_SCHEMA, output_table, with_provenance
from cola_batch.schemas.job import ErrorCode, JobSpec, OutputRow, ShardTask
from cola_batch.schemas.sampling import SamplingParams
from cola_batch.settings import get_settings
from cola_batch.worker import metrics
from cola_batch.worker.finalize import maybe_finalize
from cola_batch.worker.readahead import ReadAhead
from cola_batch.worker.state import JobStore

log = logging.getLogger(__name__)

_specs: OrderedDict[str, JobSpec] = OrderedDict()
_store: JobStore | None = None
_read_ahead: ReadAhead | None = None


def job_store() -> JobStore:
    global _store
    if _store is None:
        url = get_settings().redis_url_value()
        if not url:
            raise RuntimeError("COLA_BATCH_REDIS_URL is not set for this worker")
        _store = JobStore.from_url(url)
    return _store


def load_spec(job_uri: str, job_id: str) -> JobSpec:
    spec = _specs.get(job_id)
    if spec is None:
        spec = JobSpec.model_validate_json(storage.read_text(keys.job_spec_uri(job_uri)))
        _specs[job_id] = spec
        while len(_specs) > 64:
            _specs.popitem(last=False)
    return spec


def run_shard_task(payload: dict[str, Any]) -> dict[str, Any]:
    task = ShardTask.model_validate(payload)
    store = job_store()
    job_id, shard = task.job_id, task.shard_id
    if store.is_cancelled(job_id):
        log.info("job %s shard %d: job cancelled, not running", job_id, shard)
        return {"outcome": "cancelled"}
    if store.is_recorded(job_id, shard, task.generation):
        maybe_finalize(store, job_id, task.job_uri)
        return {"outcome": "duplicate"}
    attempt = store.begin_attempt(job_id, shard, task.generation)
    settings = get_settings()
    spec = load_spec(task.job_uri, job_id)
    if attempt > settings.max_attempts:
        reason = f"shard was delivered {attempt - 1} times without committing (worker lost)"
        return _dead_letter(store, spec, task, reason)
    _maybe_inject_kill(job_id, shard)
    store.mark_running(job_id)
    started = time.monotonic()
    metrics.shard_started(spec.queue)
    try:
        rows = _generate(spec, task)
        commit_shard(store, spec, task, rows, attempt=attempt)
        ok = [r for r in rows if r.ok]
        metrics.observe_shard(
            spec.queue,
            time.monotonic() - started,
            len(ok),
            len(rows) - len(ok),
            sum(r.completion_tokens or 0 for r in ok),
        )
    except Exception as exc:  # noqa: BLE001 - any failure is retried, then dead-lettered
        if attempt >= settings.max_attempts:
            log.exception(
                "job %s shard %d: attempt %d failed, dead-lettering", job_id, shard, attempt
            )
            return _dead_letter(store, spec, task, f"{type(exc).__name__}: {exc}")
        delay = min(2.0**attempt, 60.0)
        log.warning(
            "job %s shard %d: attempt %d failed (%s: %s); retrying in %.0f s",
            job_id,
            shard,
            attempt,
            type(exc).__name__,
            exc,
            delay,
        )
        from cola_batch.worker.queue import enqueue_shard

        enqueue_shard(
            task.model_copy(update={"attempt": attempt}), queue=spec.queue, countdown=delay
        )
        return {"outcome": "retrying"}
    finally:
        metrics.shard_finished(spec.queue)
    maybe_finalize(store, job_id, task.job_uri)
    return {"outcome": "committed", "rows": len(rows)}


def _maybe_inject_kill(job_id: str, shard_id: int) -> None:
    """Fault injection for the chaos tests (tests/chaos): a shard listed in
    COLA_BATCH_FAULT_KILL_SHARDS ("<job_id>:<shard_id>,...") kills its worker process on every
    delivery, after the delivery was counted, the way a shard that crashes the process would.
    Unset in production; read on each call so only processes started with it are affected."""
    listed = os.environ.get("COLA_BATCH_FAULT_KILL_SHARDS")
    if listed and f"{job_id}:{shard_id}" in {item.strip() for item in listed.split(",")}:
        log.error("job %s shard %d: COLA_BATCH_FAULT_KILL_SHARDS kills me", job_id, shard_id)
        logging.shutdown()
        os._exit(137)


# ---------------------------------------------------------------------- generation


def read_ahead() -> ReadAhead | None:
    """This process's read-ahead slot, or None when `worker_read_ahead` is off."""
    global _read_ahead
    if _read_ahead is None and get_settings().worker_read_ahead:
        _read_ahead = ReadAhead(lambda: job_store().r)
    return _read_ahead


def read_input(task: ShardTask) -> pa.Table:
    slot = read_ahead()
    data = slot.take(task.input_uri) if slot is not None else None
    if slot is not None:
        metrics.READ_AHEAD.labels("hit" if data is not None else "miss").inc()
    if data is None:
        data = storage.read_bytes(task.input_uri)
    else:
        log.info("job %s shard %d: input was read ahead", task.job_id, task.shard_id)
    return pq.read_table(io.BytesIO(data))


def _generate(spec: JobSpec, task: ShardTask) -> list[OutputRow]:
    from cola_batch.pipeline.engine import RowRequest
    from cola_batch.worker.holder import get_loaded

    table = read_input(task)
    samples = spec.sampling.samples_per_prompt
    wanted: set[tuple[str, int]] | None = None
    previous: dict[tuple[str, int], OutputRow] = {}
    if task.generation > 0:
        try:
            earlier = read_output_rows(task.job_uri, task.shard_id)
        except FileNotFoundError:
            earlier = None  # dead-lettered whole (input was unreadable): re-run every row
        if earlier is not None:
            previous = {(r.id, r.sample_index): r for r in earlier}
            wanted = {key for key, row in previous.items() if not row.ok}

    groups: dict[tuple[Any, Any], list[Any]] = {}
    order: dict[tuple[str, int], int] = {}
    for position, row in enumerate(table.to_pylist()):
        for sample in range(samples):
            key = (row["id"], sample)
            order[key] = position * samples + sample
            if wanted is not None and key not in wanted:
                continue
            override = (row.get("max_tokens"), row.get("temperature"))
            groups.setdefault(override, []).append(
                RowRequest(row_id=row["id"], prompt=row["prompt"], sample_index=sample)
            )

    engine = get_loaded().engine
    results: dict[tuple[str, int], OutputRow] = dict(previous)
    total = sum(len(requests) for requests in groups.values())
    slot = read_ahead()
    done = 0
    with slot.following(spec.queue) if slot else contextlib.nullcontext(None) as progress:
        for params, requests in _with_overrides(spec, groups):
            for result in engine.generate(requests, params):
                results[(result.row_id, result.sample_index)] = to_output_row(result)
                done += 1
                if progress is not None:
                    progress(done, total)
    missing = set(order) - set(results)
    for row_id, sample in missing:  # the engine must answer every request; never drop a row
        results[(row_id, sample)] = error_row(
            row_id, sample, ErrorCode.INTERNAL, "the generation engine returned no result"
        )
    return sorted(results.values(), key=lambda r: order[(r.id, r.sample_index)])


def _with_overrides(
    spec: JobSpec, groups: dict[tuple[Any, Any], list[Any]]
) -> Iterator[tuple[SamplingParams, list[Any]]]:
    """Each group of requests with the job's sampling params, plus its per-row overrides."""
    for (max_tokens, temperature), requests in groups.items():
        update: dict[str, Any] = {}
        if max_tokens is not None:
            update["max_new_tokens"] = int(max_tokens)
        if temperature is not None:
            update["temperature"] = float(temperature)
        yield (spec.sampling.model_copy(update=update) if update else spec.sampling), requests


def to_output_row(result: Any) -> OutputRow:
    failed = result.error_code is not None
    return OutputRow(
        id=result.row_id,
        sample_index=result.sample_index,
        text=None if failed else result.text,
        finish_reason="error" if failed else result.finish_reason,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=None if failed else result.completion_tokens,
        seed=result.seed % 2**64,
        error_code=result.error_code,
        error_message=result.error_message,
    )


def error_row(row_id: str, sample: int, code: ErrorCode, message: str) -> OutputRow:
    return OutputRow(
        id=row_id,
        sample_index=sample,
        finish_reason="error",
        seed=0,
        error_code=code.value,
        error_message=message,
    )


# ---------------------------------------------------------------------- commit


def read_output_rows(job_uri: str, shard_id: int) -> list[OutputRow]:
    data = storage.read_bytes(keys.output_shard_uri(job_uri, shard_id))
    table = pq.read_table(io.BytesIO(data))
    return [OutputRow.model_validate(row) for row in table.to_pylist()]


def _parquet_bytes(spec: JobSpec, task: ShardTask, rows: list[OutputRow]) -> bytes:
    schema = with_provenance(OUTPUT_SCHEMA, spec, shard_id=task.shard_id)
    sink = io.BytesIO()
    pq.write_table(output_table(rows, schema), sink, compression="zstd")
    return sink.getvalue()


def commit_shard(
    store: JobStore,
    spec: JobSpec,
    task: ShardTask,
    rows: list[OutputRow],
    *,
    attempt: int,
    dead: bool = False,
) -> dict[str, Any]:
    """Write the shard's files, create its commit record once, count it once."""
    import hashlib

    job = task.job_uri
    data = _parquet_bytes(spec, task, rows)
    output_uri = keys.output_shard_uri(job, task.shard_id)
    storage.write_bytes_atomic(output_uri, data)
    failed = [r for r in rows if not r.ok]
    errors_uri = keys.error_shard_uri(job, task.shard_id)
    if failed:
        lines = "".join(
            json.dumps(r.model_dump(mode="json"), ensure_ascii=False) + "\n" for r in failed
        )
        storage.write_text_atomic(errors_uri, lines)
    record = {
        "job_id": task.job_id,
        "shard_id": task.shard_id,
        "generation": task.generation,
        "attempt": attempt,
        "dead_lettered": dead,
        "rows": len(rows),
        "rows_ok": len(rows) - len(failed),
        "rows_failed": len(failed),
        "prompt_tokens": sum(r.prompt_tokens or 0 for r in rows),
        "completion_tokens": sum(r.completion_tokens or 0 for r in rows),
        "output": output_uri,
        "output_sha256": hashlib.sha256(data).hexdigest(),
        "output_bytes": len(data),
        "errors": errors_uri if failed else None,
        "committed_at": datetime.now(UTC).isoformat(),
        "worker": socket.gethostname(),
        "pid": os.getpid(),
    }
    record = _create_commit_record(task, record)
    store.record_commit(record)
    return record


def _create_commit_record(task: ShardTask, record: dict[str, Any]) -> dict[str, Any]:
    """Create the shard's commit record once; a concurrent run that won the race is adopted."""
    record_uri = keys.commit_record_uri(task.job_uri, task.shard_id, task.generation)
    body = json.dumps(record, sort_keys=True, indent=1).encode()
    if storage.write_if_absent(record_uri, body):
        return record
    return json.loads(storage.read_text(record_uri))


def _dead_letter(store: JobStore, spec: JobSpec, task: ShardTask, reason: str) -> dict[str, Any]:
    started = time.monotonic()
    message = f"shard dead-lettered after {get_settings().max_attempts} attempts: {reason}"
    try:
        table = read_input(task)
        ids = [str(v) for v in table.column("id").to_pylist()]
    except Exception as exc:  # noqa: BLE001 - the input itself may be what is broken
        # Raising here would ack the message with nothing recorded: the job would never end.
        # Without its input the rows cannot be named, so the shard is recorded failed as a
        # whole (no output file); `retry` re-runs all of it once the input is readable.
        return _dead_letter_unreadable(store, spec, task, f"{message}; input unreadable: {exc}")
    rows = [
        error_row(row_id, sample, ErrorCode.SHARD_DEAD_LETTERED, message)
        for row_id in ids
        for sample in range(spec.sampling.samples_per_prompt)
    ]
    commit_shard(store, spec, task, rows, attempt=0, dead=True)
    metrics.observe_shard(spec.queue, time.monotonic() - started, 0, len(rows), 0)
    log.error("job %s shard %d dead-lettered (%s)", task.job_id, task.shard_id, reason)
    maybe_finalize(store, task.job_id, task.job_uri)
    return {"outcome": "dead", "seconds": time.monotonic() - started}


def _dead_letter_unreadable(
    store: JobStore, spec: JobSpec, task: ShardTask, message: str
) -> dict[str, Any]:
    rows = task.row_count * spec.sampling.samples_per_prompt
    record = {
        "job_id": task.job_id,
        "shard_id": task.shard_id,
        "generation": task.generation,
        "attempt": 0,
        "dead_lettered": True,
        "rows": rows,
        "rows_ok": 0,
        "rows_failed": rows,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "output": None,  # no row can be named without the input: results lack these rows
        "output_sha256": None,
        "output_bytes": 0,
        "errors": None,
        "error": message,
        "committed_at": datetime.now(UTC).isoformat(),
        "worker": socket.gethostname(),
        "pid": os.getpid(),
    }
    store.record_commit(_create_commit_record(task, record))
    log.error("job %s shard %d dead-lettered: %s", task.job_id, task.shard_id, message)
    maybe_finalize(store, task.job_id, task.job_uri)
    return {"outcome": "dead"}
