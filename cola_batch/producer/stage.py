"""Row validation, de-duplication and sharding: source batches in, staged Parquet shards out.

Contract: `Stager.add(source_batch)` checks every row (id present, string, bounded, no control
characters, unique across the whole job; prompt present, not blank, within
`Settings.max_prompt_chars` after the job's template), sends each bad row to `on_reject`, and
buffers the good ones; every `shard_size` accepted rows become one shard written atomically to
`inputs/shard-NNNNN.parquet` (explicit `INPUT_SHARD_SCHEMA`, provenance metadata), a few
shards in flight at a time. `finish()` writes the last partial shard and returns one
`ShardTask` per shard. Memory: the open shard, the in-flight writes, and 16 bytes (plus set
overhead, ~90 B in all) per accepted id for duplicate detection. Row ids never touch a path.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cola_batch import keys, storage
from cola_batch.producer.errors import SKIP_HINT, Rejection, describe_id
from cola_batch.producer.lines import INT32_MAX
from cola_batch.producer.readers import SourceBatch
from cola_batch.schemas.arrow import INPUT_SHARD_SCHEMA, with_provenance
from cola_batch.schemas.job import MAX_ROW_ID_CHARS, ROW_ID_FORBIDDEN_RE2, JobSpec, ShardTask
from cola_batch.settings import Settings

MAX_WRITES_IN_FLIGHT = 4


def _templated(prompts: pa.Array, template: str | None) -> pa.Array:
    if template is None:
        return prompts
    parts = template.split("{prompt}")
    args: list[object] = [parts[0]]
    for part in parts[1:]:
        args += [prompts, part]
    return pc.binary_join_element_wise(*args, "")


class Stager:
    """Validates rows and writes shards for one job. Not thread-safe; one per submission."""

    def __init__(
        self,
        spec: JobSpec,
        settings: Settings,
        on_reject: Callable[[Rejection], None],
        retry: storage.RetryPolicy | None = None,
    ) -> None:
        self.spec = spec
        self.settings = settings
        self.on_reject = on_reject
        self.retry = retry or storage.RetryPolicy.from_settings(settings)
        self.job_uri = keys.job_uri(spec.output, spec.job_id)
        self.schema = with_provenance(INPUT_SHARD_SCHEMA, spec)
        self.rows_accepted = 0
        self.rows_seen = 0
        self.tasks: list[ShardTask] = []
        self._seen: set[bytes] = set()
        self._buffer: list[pa.RecordBatch] = []
        self._buffered = 0
        self._pool = ThreadPoolExecutor(max_workers=MAX_WRITES_IN_FLIGHT)
        self._writes: list[Future[None]] = []

    # ------------------------------------------------------------ validation

    def _reject(
        self, batch: SourceBatch, index: int, code: str, column: str, reason: str, hint: str
    ) -> None:
        pos = batch.batch.column("pos")[index].as_py()
        row_id = batch.batch.column("id")[index].as_py()
        self.on_reject(
            Rejection(
                batch.file,
                code,
                reason,
                hint,
                line=pos if batch.position_kind == "line" else None,
                row=pos if batch.position_kind == "row" else None,
                column=column,
                row_id=row_id,
            )
        )

    def _checks(self, batch: pa.RecordBatch) -> list[tuple[pa.Array, tuple]]:
        """(mask of failing rows, (code, column, reason, hint)) in priority order."""
        ids, prompts = batch.column("id"), batch.column("prompt")
        id_col = self.spec.id_column or "id"
        limit = self.settings.max_prompt_chars
        hint = f"fix the row, {SKIP_HINT}"
        checks: list[tuple[pa.Array, tuple]] = []
        if self.spec.id_column is not None:
            id_len = pc.utf8_length(ids)
            checks += [
                (pc.is_null(ids), ("null_id", id_col, "id is null", hint)),
                (pc.equal(id_len, 0), ("empty_id", id_col, "id is empty", hint)),
                (
                    pc.greater(id_len, MAX_ROW_ID_CHARS),
                    (
                        "id_too_long",
                        id_col,
                        f"id is longer than {MAX_ROW_ID_CHARS} characters",
                        hint,
                    ),
                ),
                (
                    pc.match_substring_regex(ids, ROW_ID_FORBIDDEN_RE2),
                    ("id_control_chars", id_col, "id contains control characters", hint),
                ),
            ]
        col = self.spec.prompt_column
        checks += [
            (pc.is_null(prompts), ("null_prompt", col, "prompt is null", hint)),
            (
                pc.equal(pc.utf8_trim_whitespace(prompts), ""),
                ("empty_prompt", col, "prompt is empty or only whitespace", hint),
            ),
            (
                pc.greater(pc.utf8_length(_templated(prompts, self.spec.prompt_template)), limit),
                (
                    "prompt_too_long",
                    col,
                    f"prompt is longer than {limit} characters (after the prompt template)",
                    f"shorten it or raise COLA_BATCH_MAX_PROMPT_CHARS, {SKIP_HINT}",
                ),
            ),
        ]
        max_tokens, temperature = batch.column("max_tokens"), batch.column("temperature")
        checks += [
            (
                pc.or_(pc.less_equal(max_tokens, 0), pc.greater(max_tokens, INT32_MAX)),
                (
                    "bad_override",
                    self.spec.max_tokens_column or "body.max_tokens",
                    f"max_tokens must be between 1 and {INT32_MAX} (or null for the job's)",
                    hint,
                ),
            ),
            (
                pc.invert(pc.and_(pc.is_finite(temperature), pc.greater_equal(temperature, 0))),
                (
                    "bad_override",
                    self.spec.temperature_column or "body.temperature",
                    "temperature must be a finite number >= 0 (or null for the job's)",
                    hint,
                ),
            ),
        ]
        return checks

    def add(self, source: SourceBatch) -> None:
        batch = source.batch
        n = batch.num_rows
        if n == 0:
            return
        if self.spec.id_column is None:
            # Positional ids: the row's index among all data rows of all inputs, rejected ones
            # included, so the id of a row does not depend on which other rows were refused.
            start = self.rows_seen
            ids = pc.cast(pa.array(range(start, start + n), pa.int64()), pa.string())
            batch = batch.set_column(0, "id", ids)
            source = SourceBatch(source.file, source.position_kind, batch)
        self.rows_seen += n
        ids, prompts = batch.column("id"), batch.column("prompt")
        bad = pa.array([False] * n)
        found: list[tuple[int, tuple[str, str, str, str]]] = []
        for mask, problem in self._checks(batch):
            mask = pc.and_not(pc.fill_null(mask, False), bad)
            if pc.any(mask).as_py():
                found += [(index, problem) for index in pc.indices_nonzero(mask).to_pylist()]
                bad = pc.or_(bad, mask)
        keep = [not b for b in bad.to_pylist()]
        seen = self._seen
        for index, row_id in enumerate(ids.to_pylist()):
            if not keep[index]:
                continue
            digest = hashlib.blake2b(row_id.encode("utf-8"), digest_size=16).digest()
            if digest in seen:
                keep[index] = False
                found.append(
                    (
                        index,
                        (
                            "duplicate_id",
                            self.spec.id_column or "id",
                            f"duplicate id {describe_id(row_id)}: it already appeared earlier",
                            f"ids must be unique across all inputs; {SKIP_HINT}",
                        ),
                    )
                )
            else:
                seen.add(digest)
        # In file order, so that with on_bad_rows="fail" the error names the first bad row.
        for index, (code, column, reason, hint) in sorted(found, key=lambda item: item[0]):
            self._reject(source, index, code, column, reason, hint)
        good = batch.filter(pa.array(keep)) if not all(keep) else batch
        if good.num_rows:
            prompts = _templated(good.column("prompt"), self.spec.prompt_template)
            self._buffer.append(
                pa.RecordBatch.from_arrays(
                    [
                        good.column("id"),
                        prompts,
                        pc.cast(good.column("max_tokens"), pa.int32()),  # range-checked above
                        good.column("temperature"),
                    ],
                    names=["id", "prompt", "max_tokens", "temperature"],
                )
            )
            self._buffered += good.num_rows
            self.rows_accepted += good.num_rows
        while self._buffered >= self.spec.shard_size:
            self._flush(self.spec.shard_size)

    def skip_row(self) -> None:
        """Count a row the reader rejected before it became part of a batch."""
        self.rows_seen += 1

    # ------------------------------------------------------------ shards

    def _flush(self, count: int) -> None:
        table = pa.Table.from_batches(self._buffer)
        shard, rest = table.slice(0, count), table.slice(count)
        self._buffer = rest.to_batches() if rest.num_rows else []
        self._buffered = rest.num_rows
        shard_id = len(self.tasks)
        row_start = shard_id * self.spec.shard_size
        uri = keys.input_shard_uri(self.job_uri, shard_id)
        self.tasks.append(
            ShardTask(
                job_id=self.spec.job_id,
                shard_id=shard_id,
                job_uri=self.job_uri,
                input_uri=uri,
                row_start=row_start,
                row_end=row_start + count,
                row_count=count,
            )
        )
        self._wait_for_slot()
        self._writes.append(self._pool.submit(self._write, uri, shard, row_start))

    def _write(self, uri: str, shard: pa.Table, row_start: int) -> None:
        n = shard.num_rows
        table = pa.Table.from_arrays(
            [
                shard.column("id"),
                shard.column("prompt"),
                pa.array(range(row_start, row_start + n), pa.int64()),
                shard.column("max_tokens"),
                shard.column("temperature"),
            ],
            schema=self.schema,
        )
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        storage.write_bytes_atomic(uri, buffer.getvalue(), retry=self.retry)

    def _wait_for_slot(self) -> None:
        while len(self._writes) >= MAX_WRITES_IN_FLIGHT:
            self._writes.pop(0).result()

    def finish(self) -> list[ShardTask]:
        """Write the last partial shard, wait for every write, return the shard tasks."""
        if self._buffered:
            self._flush(self._buffered)
        try:
            while self._writes:
                self._writes.pop(0).result()
        finally:
            self._pool.shutdown(wait=True)
        return self.tasks

    def abort(self) -> None:
        """Stop writing (after an error); in-flight writes finish, their results are ignored."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._writes.clear()
