"""Explicit Arrow schemas of the files cola-batch writes, and their Parquet provenance metadata.

Contract:
* `INPUT_SHARD_SCHEMA`: a staged input shard, written by the producer, read by workers.
  `row_index` is the row's position across all of the job's inputs (accepted rows only), so
  `(job, row_index)` and `(job, id)` both identify a row. Override columns are null where the
  input line did not set them (then the job's `SamplingParams` apply).
* `OUTPUT_SCHEMA`: one row per input row × sample, exactly the fields of `OutputRow`.
* `provenance_metadata(spec)` returns the Parquet key-value metadata every written file carries
  (key `cola_batch.provenance`, a JSON object); `read_provenance` inverts it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

from cola_batch.schemas.job import JobSpec, OutputRow

PROVENANCE_KEY = b"cola_batch.provenance"
SCHEMA_VERSION = 1

INPUT_SHARD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("row_index", pa.int64(), nullable=False),
        pa.field("max_tokens", pa.int32(), nullable=True),
        pa.field("temperature", pa.float64(), nullable=True),
    ]
)

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("text", pa.string(), nullable=True),
        pa.field("finish_reason", pa.string(), nullable=True),
        pa.field("prompt_tokens", pa.int32(), nullable=True),
        pa.field("completion_tokens", pa.int32(), nullable=True),
        pa.field("seed", pa.uint64(), nullable=False),
        pa.field("error_code", pa.string(), nullable=True),
        pa.field("error_message", pa.string(), nullable=True),
    ]
)


def provenance_record(spec: JobSpec, **extra: Any) -> dict[str, Any]:
    """The provenance JSON object: job id, model identity, sampling params, versions."""
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "job_id": spec.job_id,
        "model": spec.model,
        "cola_batch_version": spec.provenance.cola_batch_version,
        "model_sha256": spec.provenance.model_sha256,
        "model_config": spec.provenance.model_config_data,
        "sampling": spec.sampling.model_dump(mode="json"),
        "prompt_template": spec.prompt_template,
    }
    record.update(extra)
    return record


def provenance_metadata(spec: JobSpec, **extra: Any) -> dict[bytes, bytes]:
    """Parquet key-value metadata carrying `provenance_record(spec, **extra)`."""
    payload = json.dumps(provenance_record(spec, **extra), sort_keys=True, separators=(",", ":"))
    return {PROVENANCE_KEY: payload.encode("utf-8")}


def with_provenance(schema: pa.Schema, spec: JobSpec, **extra: Any) -> pa.Schema:
    """`schema` with the provenance metadata merged into its existing metadata."""
    merged = dict(schema.metadata or {})
    merged.update(provenance_metadata(spec, **extra))
    return schema.with_metadata(merged)


def read_provenance(metadata: Mapping[bytes, bytes] | None) -> dict[str, Any] | None:
    """The provenance object from a Parquet schema's metadata, or None if absent."""
    if not metadata or PROVENANCE_KEY not in metadata:
        return None
    value = json.loads(metadata[PROVENANCE_KEY].decode("utf-8"))
    return value if isinstance(value, dict) else None


def output_table(rows: Iterable[OutputRow], schema: pa.Schema = OUTPUT_SCHEMA) -> pa.Table:
    """Output rows as a table with the explicit output schema (metadata from `schema`)."""
    names = OUTPUT_SCHEMA.names
    columns: dict[str, list[Any]] = {name: [] for name in names}
    for row in rows:
        for name in names:
            columns[name].append(getattr(row, name))
    return pa.Table.from_pydict(columns, schema=schema)
