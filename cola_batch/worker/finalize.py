"""The finaliser: when every shard of a job is committed or dead-lettered, exactly one process
writes `manifest.json`, then `_SUCCESS`, and moves the job to its terminal state.

Contract (design.md invariant 6):
* Idempotent and safe to call from anywhere (every shard commit calls it; so do `status`,
  `wait` and `resume`): it does nothing until all shards are recorded, and a Redis lock with a
  TTL lets one caller at a time write. A finaliser that died mid-way is redone by the next call
  after the lock expires; the manifest it writes is the same.
* A job with no successful row ends `failed`, never `completed`, and gets no `_SUCCESS`; so
  does a job with a shard dead-lettered whole (input unreadable: its rows are not in results).
* The manifest lists, per shard, the commit record of its latest generation: output file,
  row counts, sha256 (recomputed from the file) and the job's provenance.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

from cola_batch import keys, storage
from cola_batch.schemas.job import JobSpec, JobState
from cola_batch.worker.state import JobStore

log = logging.getLogger(__name__)


def latest_commit_records(job_uri: str) -> dict[int, dict[str, Any]]:
    """Per shard id, the commit record of its highest generation."""
    latest: dict[int, dict[str, Any]] = {}
    if not storage.exists(keys.commits_prefix(job_uri)):
        return latest
    for uri in storage.list_files(keys.commits_prefix(job_uri)):
        if not uri.endswith(".json"):
            continue
        record = json.loads(storage.read_text(uri))
        shard = int(record["shard_id"])
        if shard not in latest or record["generation"] > latest[shard]["generation"]:
            latest[shard] = record
    return latest


def build_manifest(job_uri: str, spec: JobSpec, state: JobState) -> dict[str, Any]:
    from cola_batch.schemas.arrow import provenance_record

    records = latest_commit_records(job_uri)
    files = []
    for shard in sorted(records):
        record = records[shard]
        if record["output"] is None:  # dead-lettered whole: its rows could not be named
            files.append(
                {
                    "shard_id": shard, "generation": record["generation"], "path": None,
                    "rows": record["rows"], "rows_ok": 0, "rows_failed": record["rows_failed"],
                    "bytes": 0, "sha256": None, "errors": None, "dead_lettered": True,
                    "error": record.get("error"),
                }
            )  # fmt: skip
            continue
        data = storage.read_bytes(record["output"])
        files.append(
            {
                "shard_id": shard,
                "generation": record["generation"],
                "path": record["output"],
                "rows": record["rows"],
                "rows_ok": record["rows_ok"],
                "rows_failed": record["rows_failed"],
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "errors": record.get("errors"),
                "dead_lettered": record.get("dead_lettered", False),
            }
        )
    return {
        "job_id": spec.job_id,
        "state": state.value,
        "finalized_at": datetime.now(UTC).isoformat(),
        "rows_input": spec.num_rows,
        "rows_rejected": spec.rejected_rows,
        "rows_total": sum(f["rows"] for f in files),
        "rows_ok": sum(f["rows_ok"] for f in files),
        "rows_failed": sum(f["rows_failed"] for f in files),
        "shards": len(files),
        "files": files,
        "provenance": provenance_record(spec),
    }


def maybe_finalize(store: JobStore, job_id: str, job_uri: str) -> bool:
    """Finalise the job if every shard is recorded; True if this call finalised it."""
    status = store.get(job_id)
    if status is None or status.terminal:
        return False
    if status.shards_total == 0 or store.shards_recorded(job_id) < status.shards_total:
        return False
    owner = uuid.uuid4().hex
    if not store.acquire_finaliser(job_id, owner):
        return False
    try:
        store.mark_running(job_id)  # a job rebuilt by `resume` may still say queued
        store.transition(job_id, JobState.FINALIZING, only_from={JobState.IN_PROGRESS})
        status = store.get(job_id)
        if status is None or status.state is not JobState.FINALIZING:
            return False
        spec = JobSpec.model_validate_json(storage.read_text(keys.job_spec_uri(job_uri)))
        final = JobState.COMPLETED if status.rows_completed > 0 else JobState.FAILED
        unnamed = [s for s, r in latest_commit_records(job_uri).items() if r["output"] is None]
        if unnamed:  # rows missing from the results: the job must not claim completion
            final = JobState.FAILED
        manifest = build_manifest(job_uri, spec, final)
        storage.write_text_atomic(keys.manifest_uri(job_uri), json.dumps(manifest, indent=1))
        if final is JobState.COMPLETED:
            storage.write_bytes_atomic(keys.success_marker_uri(job_uri), b"")
            store.transition(job_id, JobState.COMPLETED)
        else:
            error = (
                f"shards {unnamed} dead-lettered with unreadable input; `retry` re-runs them"
                if unnamed
                else f"all {status.rows_failed} rows failed; see errors/"
            )
            store.transition(job_id, JobState.FAILED, error=error)
        log.info("job %s finalised: %s", job_id, final.value)
        return True
    finally:
        store.release_finaliser(job_id, owner)
