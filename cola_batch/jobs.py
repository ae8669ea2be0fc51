"""Job control: submit, look up, wait, cancel, retry, resume and collect results.

Contract: these functions compose the producer, the Redis job store and object storage; the
CLI and the HTTP API call them and nothing below them. A job is named by its id; its storage
prefix is found in Redis, or given explicitly (`job_uri`) when Redis lost the job, in which case
`resume` rebuilds the Redis state from what object storage holds (design.md invariant 5).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cola_batch import keys, storage
from cola_batch.producer.submit import load_job_spec, new_job_spec, submit_job
from cola_batch.schemas.job import TERMINAL_STATES, JobSpec, JobState, JobStatus, ShardTask
from cola_batch.settings import Settings, load_settings
from cola_batch.worker.finalize import latest_commit_records, maybe_finalize
from cola_batch.worker.queue import enqueue_shard
from cola_batch.worker.state import JobStore, RedisJobState


class JobNotFound(LookupError):
    pass


@dataclass
class Control:
    settings: Settings
    store: JobStore

    @classmethod
    def connect(cls, settings: Settings | None = None) -> Control:
        settings = settings or load_settings()  # commands read the environment as it is now
        url = settings.redis_url_value()
        if not url:
            raise RuntimeError(
                "COLA_BATCH_REDIS_URL is not set: point it at the Redis your workers use "
                "(or use `cola-batch run`, which starts a private one)"
            )
        return cls(settings, JobStore.from_url(url))

    # ------------------------------------------------------------------ submit

    def submit(self, inputs: Sequence[str], **spec_fields: Any) -> JobSpec:
        spec = new_job_spec(inputs, settings=self.settings, **spec_fields)
        sink = RedisJobState(self.store, lambda s: keys.job_uri(s.output, s.job_id))
        return submit_job(
            spec,
            enqueue=lambda task: enqueue_shard(task, queue=spec.queue, settings=self.settings),
            settings=self.settings,
            state=sink,
        )

    # ------------------------------------------------------------------ lookups

    def job_uri(self, job_id: str, job_uri: str | None = None) -> str:
        if job_uri:
            return job_uri
        found = self.store.field(job_id, "job_uri")
        if not found:
            raise JobNotFound(
                f"job {job_id} is not known to this Redis; if Redis lost its state, run "
                f"`cola-batch resume {job_id} --output OUTPUT` to rebuild it from storage"
            )
        return found

    def status(self, job_id: str) -> JobStatus:
        status = self.store.get(job_id)
        if status is None:
            raise JobNotFound(
                f"job {job_id} is not known to this Redis (wrong COLA_BATCH_REDIS_URL, or the "
                f"state was lost: `cola-batch resume {job_id} --output OUTPUT` rebuilds it)"
            )
        # A finaliser that died is redone by whoever looks next.
        finalised = (
            not status.terminal
            and status.shards_total > 0
            and maybe_finalize(self.store, job_id, self.job_uri(job_id))
        )
        if finalised:
            status = self.store.get(job_id) or status
        return status

    def wait(self, job_id: str, timeout_s: float | None = None, poll_s: float = 2.0) -> JobStatus:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            status = self.status(job_id)
            if status.terminal:
                return status
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return status
            self.store.wait_for_event(job_id, poll_s if left is None else min(poll_s, left))

    def cancel(self, job_id: str) -> JobStatus:
        self.status(job_id)
        self.store.cancel(job_id)
        return self.status(job_id)

    def forget(self, job_id: str, job_uri: str, *, after_s: int, files: bool) -> None:
        """Forget a job nobody will look up again (the API's one-row interactive jobs).

        It leaves `jobs` at once; its Redis state lives on for `after_s` seconds, so a late
        duplicate delivery of its shard still finds it finished and does nothing. With
        `files`, its storage prefix is deleted now (only once the job is terminal: a running
        shard would commit into it).
        """
        self.store.expire(job_id, after_s)
        if files:
            storage.delete(job_uri, recursive=True)

    # ------------------------------------------------------------------ retry / resume

    def retry(self, job_id: str, job_uri: str | None = None) -> int:
        """Re-run failed rows and never-run shards; returns the number of shard tasks sent."""
        return self._requeue(job_id, self.job_uri(job_id, job_uri), rerun_failed=True)

    def resume(self, job_id: str, job_uri: str) -> int:
        """Rebuild the job's Redis state from storage and run what is not committed."""
        return self._requeue(job_id, job_uri, rerun_failed=False, rebuild=True)

    def _requeue(
        self, job_id: str, job_uri: str, *, rerun_failed: bool, rebuild: bool = False
    ) -> int:
        spec = load_job_spec(job_uri)
        tasks = staged_tasks(spec, job_uri)
        records = latest_commit_records(job_uri)
        if rebuild or not self.store.exists(job_id):
            sink = RedisJobState(self.store, lambda _s: job_uri)
            sink.job_validating(spec)
            sink.job_created(spec, tasks)
            for record in records.values():
                self.store.record_commit(record)
        to_send: list[ShardTask] = []
        for task in tasks:
            record = records.get(task.shard_id)
            if record is None:
                self.store.r.hdel(keys.shard_attempts_key(job_id), f"{task.shard_id}:0")
                to_send.append(task)
            elif rerun_failed and record["rows_failed"] > 0:
                generation = record["generation"]
                self.store.forget_commit(record)
                to_send.append(task.model_copy(update={"generation": generation + 1}))
        status = self.store.get(job_id)
        if to_send:
            self.store.clear_cancel(job_id)
            if status is not None and status.state in TERMINAL_STATES:
                self.store.transition(job_id, JobState.QUEUED)
            for task in to_send:
                enqueue_shard(task, queue=spec.queue, settings=self.settings)
        else:
            maybe_finalize(self.store, job_id, job_uri)
        return len(to_send)

    # ------------------------------------------------------------------ results

    def results_table(self, job_id: str, job_uri: str | None = None) -> pa.Table:
        return read_results(self.job_uri(job_id, job_uri))


def staged_tasks(spec: JobSpec, job_uri: str) -> list[ShardTask]:
    """The shard tasks of a job, rebuilt from its staged input files."""
    tasks = []
    for uri in sorted(storage.list_files(keys.inputs_prefix(job_uri))):
        shard = keys.parse_shard_name(uri)
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=["row_index"])
        first = int(table.column("row_index")[0].as_py())
        tasks.append(
            ShardTask(
                job_id=spec.job_id,
                shard_id=shard,
                job_uri=job_uri,
                input_uri=uri,
                row_start=first,
                row_end=first + table.num_rows,
                row_count=table.num_rows,
            )
        )
    return tasks


def read_results(job_uri: str) -> pa.Table:
    """Every committed output row of the job, in input order (latest generation per shard)."""
    records = latest_commit_records(job_uri)
    tables = [
        pq.read_table(io.BytesIO(storage.read_bytes(records[shard]["output"])))
        for shard in sorted(records)
        if records[shard]["output"] is not None  # a shard dead-lettered whole has no rows
    ]
    if not tables:
        from cola_batch.schemas.arrow import OUTPUT_SCHEMA

        return OUTPUT_SCHEMA.empty_table()
    return pa.concat_tables([t.replace_schema_metadata(None) for t in tables])


def write_results(table: pa.Table, path: str, fmt: str) -> None:
    if fmt == "parquet":
        sink = io.BytesIO()
        pq.write_table(table, sink)
        storage.write_bytes_atomic(path, sink.getvalue())
    elif fmt == "jsonl":
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in table.to_pylist())
        storage.write_text_atomic(path, lines)
    else:
        raise ValueError(f"unknown results format {fmt!r}: use parquet or jsonl")
