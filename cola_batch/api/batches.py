"""OpenAI Batches over cola-batch jobs (`/v1/batches`).

Contract:
* A batch is one cola-batch job on `Settings.queue_batch`: batch id `batch_<S>` ⇔ job id
  `job-<S>` (derived both ways, no lookup). A Redis hash per batch (`keys.api_batch_key`)
  keeps what the job does not know: endpoint, input file, window, metadata, result file ids,
  expiry; a sorted set orders batches for `GET /v1/batches` (newest first, `after` cursor).
* `POST /v1/batches` accepts, besides OpenAI's fields, `sampling` (an object of job-level
  `SamplingParams` fields; `extra_body` in the openai client). It validates synchronously
  (`check_batch_input`, then the producer through `Control.submit` with
  `id_column="custom_id"`): a bad line or a duplicate `custom_id` is a 400 naming the line,
  and no batch is created.
* Status mapping (job → OpenAI): validating → validating; queued, in_progress → in_progress;
  finalizing → finalizing; completed → completed; failed after every shard ran (all requests
  failed individually) → completed; failed otherwise → failed; cancelled → cancelled, or
  expired when the completion window ran out first (the job is cancelled then).
* Output and error files are built once, on the first look at a finished batch, from
  `Control.results_table` (`build_result_files`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cola_batch import keys, storage
from cola_batch.api.batch_files import build_result_files, check_batch_input
from cola_batch.api.context import ApiContext, ctx
from cola_batch.api.errors import ApiError, not_found
from cola_batch.api.files import file_uri, get_file
from cola_batch.api.responses import ENDPOINTS
from cola_batch.jobs import JobNotFound
from cola_batch.producer.errors import InputError
from cola_batch.schemas.job import JobState, JobStatus, new_job_id
from cola_batch.schemas.sampling import SamplingParams

BATCH_ID = re.compile(r"^batch_[0-9]{8}-[0-9]{6}-[0-9a-f]{12}$")
_WINDOW = re.compile(r"^([1-9][0-9]{0,3})h$")
router = APIRouter()


def batch_id_for(job_id: str) -> str:
    return "batch_" + job_id.removeprefix("job-")


def job_id_for(batch_id: str) -> str:
    if not isinstance(batch_id, str) or not BATCH_ID.fullmatch(batch_id):
        raise not_found("batch", str(batch_id)[:80])
    return "job-" + batch_id.removeprefix("batch_")


class CreateBatch(BaseModel):
    model_config = ConfigDict(extra="allow")

    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = Field(None, max_length=16)
    # cola-batch extension: job-level `SamplingParams` fields (timesteps, seed, top_k, ...)
    sampling: dict[str, Any] | None = None


def _batch_sampling(context: ApiContext, request: CreateBatch) -> SamplingParams:
    fields = {"max_new_tokens": context.settings.api_default_max_tokens, **(request.sampling or {})}
    try:
        return SamplingParams(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(["sampling", *(str(p) for p in first.get("loc", ()))])
        raise ApiError(
            400, f"Invalid {param}: {first.get('msg')}", param=param, code="invalid_value"
        ) from exc


def _ts(status: JobStatus, state: JobState) -> int | None:
    stamp: datetime | None = status.timestamps.get(state)
    return int(stamp.timestamp()) if stamp else None


def _all_shards_ran(status: JobStatus) -> bool:
    return status.shards_total > 0 and (
        status.shards_completed + status.shards_failed >= status.shards_total
    )


def openai_status(status: JobStatus, *, expired: bool) -> str:
    """The OpenAI batch status of a job (see the module contract)."""
    state = status.state
    if state is JobState.VALIDATING:
        return "validating"
    if state in (JobState.QUEUED, JobState.IN_PROGRESS):
        return "in_progress"
    if state is JobState.FINALIZING:
        return "finalizing"
    if state is JobState.COMPLETED:
        return "completed"
    if state is JobState.FAILED:
        return "completed" if _all_shards_ran(status) else "failed"
    return "expired" if expired else "cancelled"


def batch_object(record: dict[str, str], status: JobStatus | None) -> dict[str, Any]:
    """The OpenAI batch object of a stored batch and its job's status (None: job lost)."""
    expired_at = int(record["expired_at"]) if record.get("expired_at") else None
    created = int(record["created_at"])
    window = _WINDOW.fullmatch(record["completion_window"])
    obj: dict[str, Any] = {
        "id": record["id"],
        "object": "batch",
        "endpoint": record["endpoint"],
        "model": record.get("model"),
        "errors": None,
        "input_file_id": record["input_file_id"],
        "completion_window": record["completion_window"],
        "status": "failed",
        "output_file_id": record.get("output_file_id") or None,
        "error_file_id": record.get("error_file_id") or None,
        "created_at": created,
        "in_progress_at": None,
        "expires_at": created + int(window.group(1)) * 3600 if window else None,
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": expired_at,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": json.loads(record.get("metadata") or "null"),
        "usage": None,
    }
    if status is None:
        obj["errors"] = _errors("job_lost", "the batch's job state was lost from Redis")
        return obj
    state = openai_status(status, expired=expired_at is not None)
    if state == "completed" and record.get("files_built") != "1":
        state = "finalizing"  # the result files are not registered yet
    obj["status"] = state
    obj["in_progress_at"] = _ts(status, JobState.IN_PROGRESS) or _ts(status, JobState.QUEUED)
    obj["finalizing_at"] = _ts(status, JobState.FINALIZING)
    if state == "completed":
        obj["completed_at"] = _ts(status, JobState.COMPLETED) or _ts(status, JobState.FAILED)
    elif state == "failed":
        obj["failed_at"] = _ts(status, JobState.FAILED)
        obj["errors"] = _errors("job_failed", status.error or "the batch's job failed")
    elif state in ("cancelled", "expired"):
        obj["cancelling_at"] = obj["cancelled_at"] = _ts(status, JobState.CANCELLED)
    obj["request_counts"] = {
        "total": status.rows_total,
        "completed": status.rows_completed,
        "failed": status.rows_failed,
    }
    obj["usage"] = {
        "input_tokens": status.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": status.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": status.prompt_tokens + status.completion_tokens,
    }
    return obj


def _errors(code: str, message: str) -> dict[str, Any]:
    item = {"code": code, "message": message, "param": None, "line": None}
    return {"object": "list", "data": [item]}


def _record(context: ApiContext, batch_id: str) -> dict[str, str]:
    job_id_for(batch_id)
    record: dict[str, str] = context.redis.hgetall(keys.api_batch_key(batch_id))
    if not record:
        raise not_found("batch", batch_id)
    return record


def _refresh(context: ApiContext, record: dict[str, str]) -> dict[str, Any]:
    """Look at the batch's job: expire it, build its result files when it has finished."""
    batch_id, job_id = record["id"], job_id_for(record["id"])
    control = context.control
    try:
        status = control.status(job_id)
    except JobNotFound:
        return batch_object(record, None)
    obj = batch_object(record, status)
    expires_at = obj["expires_at"]
    if not status.terminal and expires_at is not None and time.time() > expires_at:
        context.redis.hset(keys.api_batch_key(batch_id), "expired_at", int(time.time()))
        status = control.cancel(job_id)
        record = _record(context, batch_id)
    if status.terminal and status.shards_total > 0 and record.get("files_built") != "1":
        unrun = None
        if status.state is JobState.CANCELLED:
            unrun = "batch_expired" if record.get("expired_at") else "batch_cancelled"
        created = _ts(status, JobState.COMPLETED) or int(time.time())
        output_id, error_id = build_result_files(
            context,
            batch_id=batch_id,
            job_id=job_id,
            endpoint=record["endpoint"],
            created=created,
            unrun_code=unrun,
        )
        fields = {
            "output_file_id": output_id or "",
            "error_file_id": error_id or "",
            "files_built": "1",
        }
        context.redis.hset(keys.api_batch_key(batch_id), mapping=fields)
        record = {**record, **fields}
    return batch_object(record, status)


@router.post("/v1/batches")
def create_batch(request: CreateBatch, context: ApiContext = Depends(ctx)) -> dict[str, Any]:
    if request.endpoint not in ENDPOINTS:
        raise ApiError(
            400,
            f"Endpoint {request.endpoint!r} is not supported; use one of " + ", ".join(ENDPOINTS),
            param="endpoint",
            code="unsupported_endpoint",
        )
    if not _WINDOW.fullmatch(request.completion_window):
        raise ApiError(
            400,
            "completion_window must look like '24h'",
            param="completion_window",
            code="invalid_completion_window",
        )
    meta = get_file(context, request.input_file_id, param="input_file_id")
    if meta.get("purpose") != "batch":
        raise ApiError(
            400,
            "The input file's purpose must be 'batch'.",
            param="input_file_id",
            code="invalid_file_purpose",
        )
    sampling = _batch_sampling(context, request)
    job_id = new_job_id()
    batch_id = batch_id_for(job_id)
    converted = check_batch_input(context, request.input_file_id, request.endpoint)
    source = file_uri(context, request.input_file_id)
    if converted is not None:
        source = keys.api_request_uri(context.api_base, f"{batch_id}-input")
        storage.upload_file_atomic(converted, source)
        os.unlink(converted)
    settings = context.settings
    try:
        spec = context.control.submit(
            [source],
            job_id=job_id,
            model=context.model,
            output=context.output,
            sampling=sampling,
            id_column="custom_id",
            input_format="jsonl",
            queue=settings.queue_batch,
        )
    except InputError as exc:
        where = f"Line {exc.line}: " if exc.line is not None else ""
        raise ApiError(
            400,
            f"{where}{exc.reason}",
            param="input_file_id",
            code=exc.code,
            extra={"line": exc.line},
        ) from exc
    finally:
        if converted is not None:
            storage.delete(source)
    created = int(spec.created_at.timestamp())
    record = {
        "id": batch_id,
        "endpoint": request.endpoint,
        "input_file_id": request.input_file_id,
        "completion_window": request.completion_window,
        "metadata": json.dumps(request.metadata) if request.metadata is not None else "",
        "created_at": str(created),
        "model": context.model_name,
    }
    pipe = context.redis.pipeline()
    pipe.hset(keys.api_batch_key(batch_id), mapping=record)
    pipe.zadd(keys.api_batches_index_key(), {batch_id: spec.created_at.timestamp()})
    pipe.execute()
    return _refresh(context, record)


@router.get("/v1/batches/{batch_id}")
def retrieve_batch(batch_id: str, context: ApiContext = Depends(ctx)) -> dict[str, Any]:
    return _refresh(context, _record(context, batch_id))


@router.post("/v1/batches/{batch_id}/cancel")
def cancel_batch(batch_id: str, context: ApiContext = Depends(ctx)) -> dict[str, Any]:
    record = _record(context, batch_id)
    with contextlib.suppress(JobNotFound):
        context.control.cancel(job_id_for(batch_id))
    return _refresh(context, record)


@router.get("/v1/batches")
def list_batches(
    limit: int = Query(20, ge=1, le=100),
    after: str | None = None,
    context: ApiContext = Depends(ctx),
) -> dict[str, Any]:
    index = keys.api_batches_index_key()
    start = 0
    if after is not None:
        job_id_for(after)
        rank = context.redis.zrevrank(index, after)
        if rank is None:
            raise not_found("batch", after, param="after")
        start = int(rank) + 1
    ids = context.redis.zrevrange(index, start, start + limit - 1)
    data = []
    for batch_id in ids:
        record = context.redis.hgetall(keys.api_batch_key(batch_id))
        if record:
            data.append(_refresh(context, record))
    total = int(context.redis.zcard(index))
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": start + len(ids) < total,
    }
