"""Submitting a job: build its spec, stage its inputs, record it, enqueue one task per shard.

Contract:
* `new_job_spec(...)` is pure apart from the clock and randomness of the job id: it fills
  defaults from Settings and normalises every URI (local paths become absolute).
* `submit_job(spec, enqueue=..., state=...)` streams every input through validation and
  staging, then in this order: uploads the rejected-rows file (if any), writes `job.json`
  (create-once: an existing job is never overwritten), calls `state.job_created(spec, tasks)`,
  then `enqueue(task)` once per shard. Rows travel only through object storage; `enqueue`
  receives small `ShardTask`s. On an `InputError` nothing is enqueued, `job.json` is not
  written, staged shards are deleted, and `state.job_invalid` is told why.
* Every write goes under `output/job_id/` via `cola_batch.keys`: row ids never form paths.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol

from cola_batch import keys, storage
from cola_batch.producer.errors import InputError, RejectedRows, Rejection
from cola_batch.producer.readers import SourceBatch, read_input
from cola_batch.producer.stage import Stager
from cola_batch.schemas.job import (
    InputFormat,
    JobSpec,
    OnBadRows,
    Provenance,
    ShardTask,
    new_job_id,
    utcnow,
)
from cola_batch.schemas.sampling import SamplingParams
from cola_batch.settings import Settings, get_settings

log = logging.getLogger(__name__)

Enqueue = Callable[[ShardTask], None]


class JobStateSink(Protocol):
    """Where the producer reports a job's life before workers take over (Redis state)."""

    def job_validating(self, spec: JobSpec) -> None:
        """The job exists; its inputs are being read and staged."""

    def job_created(self, spec: JobSpec, tasks: Sequence[ShardTask]) -> None:
        """Staged and recorded (`spec.num_rows`, `num_shards` set); tasks follow at once."""

    def job_invalid(self, spec: JobSpec, error: str) -> None:
        """The inputs were refused; nothing was enqueued."""


class NullJobState:
    """A `JobStateSink` that records nothing (tests, dry runs)."""

    def job_validating(self, spec: JobSpec) -> None:
        pass

    def job_created(self, spec: JobSpec, tasks: Sequence[ShardTask]) -> None:
        pass

    def job_invalid(self, spec: JobSpec, error: str) -> None:
        pass


def _normalise_model(model: str) -> str:
    return storage.normalize_uri(model)


def new_job_spec(
    inputs: Sequence[str],
    *,
    model: str,
    output: str | None = None,
    sampling: SamplingParams | None = None,
    settings: Settings | None = None,
    shard_size: int | None = None,
    queue: str | None = None,
    prompt_column: str = "prompt",
    id_column: str | None = "id",
    max_tokens_column: str | None = None,
    temperature_column: str | None = None,
    prompt_template: str | None = None,
    input_format: InputFormat = "auto",
    on_bad_rows: OnBadRows = "fail",
    provenance: Provenance | None = None,
    job_id: str | None = None,
    now: datetime | None = None,
) -> JobSpec:
    """A validated spec for a new job; defaults come from `settings`."""
    settings = settings or get_settings()
    now = now or utcnow()
    return JobSpec(
        job_id=job_id or new_job_id(now),
        inputs=[storage.normalize_uri(uri) for uri in inputs],
        model=_normalise_model(model),
        output=storage.normalize_uri(output or settings.default_output),
        sampling=sampling or SamplingParams(),
        shard_size=shard_size or settings.shard_size,
        prompt_column=prompt_column,
        id_column=id_column or None,
        max_tokens_column=max_tokens_column or None,
        temperature_column=temperature_column or None,
        prompt_template=prompt_template,
        input_format=input_format,
        queue=queue or settings.queue_batch,
        on_bad_rows=on_bad_rows,
        created_at=now,
        provenance=provenance or Provenance(),
    )


def stage_inputs(
    spec: JobSpec, settings: Settings, retry: storage.RetryPolicy | None = None
) -> tuple[JobSpec, list[ShardTask]]:
    """Validate and stage every input; return the spec with counts, and the shard tasks.

    For a new job only: on failure it deletes the job's `inputs/` prefix.
    """
    job = keys.job_uri(spec.output, spec.job_id)
    rejected = RejectedRows()
    stager: Stager | None = None

    def on_reject(rejection: Rejection) -> None:
        if spec.on_bad_rows == "fail":
            raise rejection.to_error()
        rejected.add(rejection)

    try:
        stager = Stager(spec, settings, on_reject, retry)
        for uri in spec.inputs:
            for item in read_input(uri, spec, settings):
                if isinstance(item, SourceBatch):
                    stager.add(item)
                else:
                    stager.skip_row()
                    on_reject(item)
        tasks = stager.finish()
        if rejected.count:
            storage.upload_file_atomic(rejected.close(), keys.rejected_rows_uri(job), retry=retry)
        if not tasks:
            raise InputError(
                f"no row was accepted ({rejected.count} rejected)",
                file=", ".join(spec.inputs),
                code="no_rows",
                hint=f"see {keys.rejected_rows_uri(job)} for the reasons",
            )
    except BaseException:
        if stager is not None:
            stager.abort()
        storage.delete(keys.inputs_prefix(job), recursive=True, retry=retry)
        raise
    finally:
        rejected.discard()
    staged = spec.model_copy(
        update={
            "num_rows": stager.rows_accepted,
            "num_shards": len(tasks),
            "rejected_rows": rejected.count,
        }
    )
    return staged, tasks


def submit_job(
    spec: JobSpec,
    *,
    enqueue: Enqueue,
    settings: Settings | None = None,
    state: JobStateSink | None = None,
    retry: storage.RetryPolicy | None = None,
) -> JobSpec:
    """Stage `spec`'s inputs, write job.json, record the job, enqueue its shards.

    Returns the spec as written to job.json (with `num_rows`, `num_shards`, `rejected_rows`).
    Raises `InputError` for bad inputs and `FileExistsError` if the job already exists.
    """
    settings = settings or get_settings()
    state = state or NullJobState()
    retry = retry or storage.RetryPolicy.from_settings(settings)
    job = keys.job_uri(spec.output, spec.job_id)
    spec_uri = keys.job_spec_uri(job)
    if storage.exists(spec_uri, retry=retry):
        raise FileExistsError(f"job {spec.job_id} already exists at {storage.redact(job)}")
    state.job_validating(spec)
    try:
        staged, tasks = stage_inputs(spec, settings, retry)
    except InputError as exc:
        state.job_invalid(spec, str(exc))
        raise
    body = staged.model_dump_json(indent=2).encode("utf-8")
    if not storage.write_if_absent(spec_uri, body, retry=retry, settings=settings):
        raise FileExistsError(f"job {spec.job_id} was created concurrently")
    state.job_created(staged, tasks)
    for task in tasks:
        enqueue(task)
    log.info(
        "job %s: %d rows in %d shards enqueued on %s (%d rejected)",
        staged.job_id,
        staged.num_rows,
        staged.num_shards,
        staged.queue,
        staged.rejected_rows,
    )
    return staged


def load_job_spec(job_uri: str, retry: storage.RetryPolicy | None = None) -> JobSpec:
    """The job.json under `job_uri` (for workers, `status`, `resume`)."""
    return JobSpec.model_validate_json(storage.read_bytes(keys.job_spec_uri(job_uri), retry=retry))
