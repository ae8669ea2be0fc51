"""The one list of every Redis key and every object-storage path cola-batch uses.

Contract: no other module spells a key or a path template. Every function that takes a job id
validates it (strict regex, `validate_job_id`) before it becomes part of a key or path, so a
hostile id can never reach Redis or storage. Row ids never appear in any key or path.

Storage layout of one job (`job_uri = join(output, job_id)`):

    job.json                     spec + provenance, written at submit
    rejected_rows.jsonl          input rows refused under --on-bad-rows skip, with reasons
    inputs/shard-00000.parquet   staged input rows
    outputs/shard-00000.parquet  generated rows (committed atomically)
    errors/shard-00000.jsonl     per-row failures of that shard
    commits/shard-00000.json     commit record: attempt, row counts, checksum
    manifest.json                written once by the finaliser
    _SUCCESS                     written last, after the manifest

Redis (prefix `cola-batch:`): a job status hash, a counters hash, a per-job hash of shard
attempt counts, one set per shard state, a finaliser lock, a cancel flag, a per-job event
channel and one sorted set indexing all jobs by creation time. All per-job structures are
O(shards), never O(rows).
"""

from __future__ import annotations

import re
from enum import StrEnum

from cola_batch.schemas.job import validate_job_id

REDIS_PREFIX = "cola-batch"
SHARD_DIGITS = 5
_SHARD_NAME = re.compile(r"^shard-([0-9]{5,})$")


class ShardState(StrEnum):
    """States a shard's id can be a member of (one Redis set per state)."""

    PENDING = "pending"
    RUNNING = "running"
    COMMITTED = "committed"
    FAILED = "failed"
    DEAD = "dead"  # dead-lettered after max_attempts


# ---------------------------------------------------------------- object storage paths


def join(base: str, *parts: str) -> str:
    """Join URI/path segments with single slashes (no normalisation of `..`)."""
    out = base.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def shard_name(shard_id: int) -> str:
    if shard_id < 0:
        raise ValueError(f"shard id must be >= 0, got {shard_id}")
    return f"shard-{shard_id:0{SHARD_DIGITS}d}"


def parse_shard_name(name: str) -> int:
    """Inverse of `shard_name`; accepts a file name with any extension."""
    stem = name.rsplit("/", 1)[-1].split(".", 1)[0]
    match = _SHARD_NAME.fullmatch(stem)
    if not match:
        raise ValueError(f"not a shard file name: {name!r}")
    return int(match.group(1))


def job_uri(output: str, job_id: str) -> str:
    return join(output, validate_job_id(job_id))


def job_spec_uri(job: str) -> str:
    return join(job, "job.json")


def rejected_rows_uri(job: str) -> str:
    return join(job, "rejected_rows.jsonl")


def inputs_prefix(job: str) -> str:
    return join(job, "inputs")


def input_shard_uri(job: str, shard_id: int) -> str:
    return join(job, "inputs", f"{shard_name(shard_id)}.parquet")


def outputs_prefix(job: str) -> str:
    return join(job, "outputs")


def output_shard_uri(job: str, shard_id: int) -> str:
    return join(job, "outputs", f"{shard_name(shard_id)}.parquet")


def errors_prefix(job: str) -> str:
    return join(job, "errors")


def error_shard_uri(job: str, shard_id: int) -> str:
    return join(job, "errors", f"{shard_name(shard_id)}.jsonl")


def commits_prefix(job: str) -> str:
    return join(job, "commits")


def commit_record_uri(job: str, shard_id: int, generation: int = 0) -> str:
    """Generation 0 is the first run; each `retry` of a shard's failed rows adds one."""
    suffix = f".g{generation}" if generation else ""
    return join(job, "commits", f"{shard_name(shard_id)}{suffix}.json")


def manifest_uri(job: str) -> str:
    return join(job, "manifest.json")


def success_marker_uri(job: str) -> str:
    return join(job, "_SUCCESS")


# ---------------------------------------------------------------- Redis keys


def _job_key(job_id: str, *parts: str) -> str:
    return ":".join((REDIS_PREFIX, "job", validate_job_id(job_id), *parts))


def job_status_key(job_id: str) -> str:
    """Hash: state, timestamps, totals, spec location (`JobStatus` fields)."""
    return _job_key(job_id, "status")


def job_counters_key(job_id: str) -> str:
    """Hash of monotonic counters updated with HINCRBY (rows/shards done, tokens)."""
    return _job_key(job_id, "counters")


def shard_attempts_key(job_id: str) -> str:
    """Hash shard_id -> deliveries so far; compared against max_attempts."""
    return _job_key(job_id, "attempts")


def shard_state_key(job_id: str, state: ShardState | str) -> str:
    """Set of shard ids currently in `state`."""
    return _job_key(job_id, "shards", ShardState(state).value)


def finaliser_lock_key(job_id: str) -> str:
    """SET NX lock: the one process that writes manifest.json and _SUCCESS."""
    return _job_key(job_id, "finaliser")


def cancel_flag_key(job_id: str) -> str:
    """Present once `cancel` ran: workers start no new shard of this job."""
    return _job_key(job_id, "cancelled")


def job_events_channel(job_id: str) -> str:
    """Pub/sub channel announcing status changes (for `status --watch`)."""
    return _job_key(job_id, "events")


def job_index_key() -> str:
    """Sorted set: job id scored by creation time (unix seconds), for `jobs`."""
    return f"{REDIS_PREFIX}:jobs"


def job_keys(job_id: str) -> list[str]:
    """Every Redis key one job owns (for deletion and memory accounting)."""
    return [
        job_status_key(job_id),
        job_counters_key(job_id),
        shard_attempts_key(job_id),
        *(shard_state_key(job_id, state) for state in ShardState),
        finaliser_lock_key(job_id),
        cancel_flag_key(job_id),
    ]


_NODE = re.compile(r"^[A-Za-z0-9@._-]{1,255}$")


def worker_loaded_key(node: str) -> str:
    """String: set by a worker's pool process once its model has loaded (the pool's `up`)."""
    if not _NODE.fullmatch(node):
        raise ValueError(f"not a worker node name: {node!r}")
    return f"{REDIS_PREFIX}:worker:{node}:loaded"


# ---------------------------------------------------------------- kombu's Redis transport
# Celery's queues are kombu's keys, not ours; they are listed here because metrics (queue depth,
# in-flight shards) and the worker's read-ahead read them directly.

SHARD_TASK_NAME = "cola_batch.run_shard"  # the Celery task every shard message names
KOMBU_SEP = "\x06\x16"
KOMBU_PRIORITY_STEPS = (3, 6, 9)
KOMBU_UNACKED_KEY = "unacked"
KOMBU_BINDING_PREFIX = "_kombu.binding."


def kombu_queue_lists(queue: str) -> list[str]:
    """The Redis lists kombu keeps one queue in, in the order it serves them: the plain name
    (priority 0) and then its priority lists "<queue><sep><step>". Messages are LPUSHed and
    BRPOPed, so the next message of a list is at index -1."""
    return [queue, *(f"{queue}{KOMBU_SEP}{step}" for step in KOMBU_PRIORITY_STEPS)]


# ---------------------------------------------------------------- OpenAI-compatible HTTP API
#
# The API (`cola_batch.api`) keeps uploaded and generated files under its own storage base
# (`api_base`), and a little metadata per file and per batch in Redis. File and batch ids are
# validated by the API (strict regexes) before they reach these functions.


def api_file_uri(api_base: str, file_id: str) -> str:
    """Bytes of one API file (an upload, or a batch's output/error file)."""
    return join(api_base, "files", file_id)


def api_request_uri(api_base: str, request_id: str) -> str:
    """Scratch JSONL holding the one row of an interactive request until it is staged."""
    return join(api_base, "requests", f"{request_id}.jsonl")


def api_interactive_output(api_base: str) -> str:
    """Output base of the one-row jobs behind /v1/chat/completions and /v1/completions."""
    return join(api_base, "interactive")


def api_file_key(file_id: str) -> str:
    """Hash: an API file's metadata (bytes, filename, purpose, created_at, uri)."""
    return f"{REDIS_PREFIX}:api:file:{file_id}"


def api_files_index_key() -> str:
    """Sorted set: API file ids scored by creation time."""
    return f"{REDIS_PREFIX}:api:files"


def api_batch_key(batch_id: str) -> str:
    """Hash: an OpenAI batch's own fields (input file, endpoint, metadata, output files)."""
    return f"{REDIS_PREFIX}:api:batch:{batch_id}"


def api_batches_index_key() -> str:
    """Sorted set: batch ids scored by creation time (for GET /v1/batches pagination)."""
    return f"{REDIS_PREFIX}:api:batches"
