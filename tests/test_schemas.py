"""Data contracts: job ids, row ids, job spec, shard task, output row, job state machine,
Arrow schemas with provenance, the key/path registry and settings."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from cola_batch import keys
from cola_batch.schemas import (
    ALLOWED_TRANSITIONS,
    INPUT_SHARD_SCHEMA,
    OUTPUT_SCHEMA,
    IllegalTransition,
    JobSpec,
    JobState,
    JobStatus,
    OutputRow,
    Provenance,
    SamplingParams,
    ShardTask,
    new_job_id,
    output_table,
    read_provenance,
    row_id_problem,
    validate_job_id,
    with_provenance,
)
from cola_batch.settings import Settings

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def make_spec(**overrides: object) -> JobSpec:
    fields: dict[str, object] = {
        "job_id": new_job_id(T0),
        "inputs": ["/data/in.parquet"],
        "model": "/models/m",
        "output": "s3://bucket/runs",
    }
    fields.update(overrides)
    return JobSpec(**fields)  # type: ignore[arg-type]


# ---------------------------------------------------------------- ids


def test_generated_job_ids_carry_the_date_are_unique_and_valid() -> None:
    ids = {new_job_id(T0) for _ in range(200)}
    assert len(ids) == 200
    for job_id in ids:
        assert job_id.startswith("job-20260102-030405-")
        assert validate_job_id(job_id) == job_id


@pytest.mark.parametrize(
    "bad",
    ["", "job", "../../etc/x", "job-20260102-030405-ABCDEF012345", "job-20260102-030405-abc",
     "job-20260102-030405-0123456789ab/..", "job-20260102-030405-0123456789ab\n", " job"],
)  # fmt: skip
def test_job_ids_outside_the_strict_pattern_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid job id"):
        validate_job_id(bad)
    with pytest.raises(ValidationError):
        make_spec(job_id=bad)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("../../etc/x", None),  # allowed as an id: ids never become paths
        ("plain-id", None),
        ("ünïcødé 你好", None),
        ("", "id is empty"),
        ("a" * 513, "limit is 512"),
        ("a\x00b", "control characters"),
        ("a\nb", "control characters"),
        ("a\x85b", "control characters"),
        ("a\u2028b", "control characters"),
        (17, "must be a string"),
    ],
)
def test_row_id_rules(value: object, problem: str | None) -> None:
    found = row_id_problem(value)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


# ---------------------------------------------------------------- job spec and shard task


def test_job_spec_round_trips_through_json_with_nested_sampling_params() -> None:
    spec = make_spec(
        sampling=SamplingParams(temperature=0.7, samples_per_prompt=3, seed=42),
        prompt_template="Q: {prompt}\nA:",
        provenance=Provenance(model_sha256="ab" * 32, model_config_data={"hidden": 64}),
        num_rows=10,
    )
    again = JobSpec.model_validate_json(spec.model_dump_json())
    assert again == spec
    assert again.sampling.samples_per_prompt == 3 and again.sampling.seed == 42
    assert again.samples_total == 30
    assert again.apply_template("2+2?") == "Q: 2+2?\nA:"


def test_job_spec_refuses_a_template_without_placeholder_and_unknown_fields() -> None:
    with pytest.raises(ValidationError, match="placeholder"):
        make_spec(prompt_template="no placeholder here")
    with pytest.raises(ValidationError):
        make_spec(shard_size=0)
    with pytest.raises(ValidationError):
        make_spec(on_bad_rows="ignore")
    with pytest.raises(ValidationError):
        JobSpec.model_validate({**make_spec().model_dump(), "surprise": 1})


def test_shard_task_is_small_and_consistent() -> None:
    job = keys.job_uri("s3://bucket/some/long/prefix/for/runs", new_job_id(T0))
    task = ShardTask(
        job_id=job.rsplit("/", 1)[1], shard_id=12345, job_uri=job,
        input_uri=keys.input_shard_uri(job, 12345), row_start=12_345_000, row_end=12_346_000,
        row_count=1000,
    )  # fmt: skip
    assert len(task.model_dump_json()) < 512
    assert ShardTask.model_validate_json(task.model_dump_json()) == task
    with pytest.raises(ValidationError, match="row_count"):
        ShardTask(**{**task.model_dump(), "row_count": 999})


# ---------------------------------------------------------------- output rows


def test_output_row_has_text_or_an_error_never_both() -> None:
    ok = OutputRow(id="r1", sample_index=0, text=" hi", finish_reason="stop", seed=7,
                   prompt_tokens=3, completion_tokens=1)  # fmt: skip
    failed = OutputRow(id="r2", sample_index=1, seed=7, error_code="prompt_too_long",
                       error_message="prompt has 9000 tokens", finish_reason="error")  # fmt: skip
    assert ok.ok and not failed.ok
    with pytest.raises(ValidationError, match="must carry text"):
        OutputRow(id="r3", sample_index=0, seed=1)
    with pytest.raises(ValidationError, match="no text"):
        OutputRow(id="r3", sample_index=0, seed=1, text="x", error_code="internal_error")
    with pytest.raises(ValidationError):
        OutputRow(id="bad\x00id", sample_index=0, seed=1, text="x")


def test_output_table_uses_the_explicit_schema() -> None:
    rows = [
        OutputRow(id="r1", sample_index=0, text="a", finish_reason="length", seed=2**64 - 1),
        OutputRow(id="r2", sample_index=0, seed=5, error_code="numeric_error", error_message="NaN"),
    ]
    table = output_table(rows)
    assert table.schema == OUTPUT_SCHEMA
    assert table.column("seed").to_pylist() == [2**64 - 1, 5]
    assert [OutputRow(**r) for r in table.to_pylist()] == rows


# ---------------------------------------------------------------- job state machine


def test_a_job_walks_the_happy_path_with_one_timestamp_per_state() -> None:
    status = JobStatus.new(new_job_id(T0), now=T0)
    path = [JobState.QUEUED, JobState.IN_PROGRESS, JobState.FINALIZING, JobState.COMPLETED]
    for minutes, state in enumerate(path, start=1):
        status = status.transition(state, now=T0 + timedelta(minutes=minutes))
    assert status.state is JobState.COMPLETED and status.terminal
    assert list(status.timestamps) == [JobState.VALIDATING, *path]
    assert status.timestamps[JobState.FINALIZING] == T0 + timedelta(minutes=3)
    again = JobStatus.model_validate_json(status.model_dump_json())
    assert again == status


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (JobState.VALIDATING, JobState.IN_PROGRESS),
        (JobState.VALIDATING, JobState.COMPLETED),
        (JobState.QUEUED, JobState.COMPLETED),
        (JobState.IN_PROGRESS, JobState.COMPLETED),
        (JobState.IN_PROGRESS, JobState.QUEUED),
        (JobState.FINALIZING, JobState.CANCELLED),
        (JobState.COMPLETED, JobState.FAILED),
        (JobState.CANCELLED, JobState.IN_PROGRESS),
        (JobState.QUEUED, JobState.QUEUED),
    ],
)
def test_illegal_transitions_are_refused(src: JobState, dst: JobState) -> None:
    status = JobStatus(job_id=new_job_id(T0), state=src)
    with pytest.raises(IllegalTransition, match=f"{src} -> {dst}"):
        status.transition(dst)
    assert dst not in ALLOWED_TRANSITIONS[src]


def test_every_state_can_reach_a_terminal_state() -> None:
    terminal = {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED}
    for state in JobState:
        assert (
            state in terminal
            or ALLOWED_TRANSITIONS[state] & terminal
            or (JobState.FINALIZING in ALLOWED_TRANSITIONS[state])
        )


def test_retry_of_a_failed_job_requeues_it_and_forgets_the_old_run() -> None:
    status = JobStatus.new(new_job_id(T0), now=T0)
    for state in (JobState.QUEUED, JobState.IN_PROGRESS, JobState.FINALIZING):
        status = status.transition(state, now=T0)
    failed = status.transition(JobState.FAILED, now=T0, error="all 10 rows failed")
    assert failed.error == "all 10 rows failed"
    retried = failed.transition(JobState.QUEUED, now=T0 + timedelta(hours=1))
    assert retried.state is JobState.QUEUED and retried.error is None
    assert set(retried.timestamps) == {JobState.VALIDATING, JobState.QUEUED}


def test_throughput_and_eta_come_from_counts_and_the_in_progress_stamp() -> None:
    status = JobStatus(
        job_id=new_job_id(T0), state=JobState.IN_PROGRESS, rows_total=1000, rows_completed=180,
        rows_failed=20, completion_tokens=6400, timestamps={JobState.IN_PROGRESS: T0},
    )  # fmt: skip
    now = T0 + timedelta(seconds=100)
    assert status.rows_per_second(now) == pytest.approx(2.0)
    assert status.tokens_per_second(now) == pytest.approx(64.0)
    assert status.eta_seconds(now) == pytest.approx(400.0)
    assert JobStatus(job_id=status.job_id).eta_seconds(now) is None


# ---------------------------------------------------------------- Arrow and provenance


def test_staged_and_output_files_carry_provenance_in_parquet_metadata() -> None:
    spec = make_spec(provenance=Provenance(model_sha256="0f" * 32, model_config_data={"d": 8}))
    schema = with_provenance(INPUT_SHARD_SCHEMA, spec, shard_id=3)
    table = pa.table(
        {"id": ["a"], "prompt": ["p"], "row_index": [0], "max_tokens": [None],
         "temperature": [None]},
        schema=schema,
    )  # fmt: skip
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    read_back = pq.read_schema(io.BytesIO(buffer.getvalue()))
    provenance = read_provenance(read_back.metadata)
    assert provenance is not None
    assert provenance["job_id"] == spec.job_id
    assert provenance["model_sha256"] == "0f" * 32
    assert provenance["model_config"] == {"d": 8}
    assert provenance["sampling"] == json.loads(spec.sampling.model_dump_json())
    assert provenance["shard_id"] == 3
    assert read_provenance(None) is None


# ---------------------------------------------------------------- keys


def test_every_storage_path_of_a_job_lies_under_its_prefix() -> None:
    job_id = new_job_id(T0)
    job = keys.job_uri("s3://bucket/runs/", job_id)
    assert job == f"s3://bucket/runs/{job_id}"
    paths = [
        keys.job_spec_uri(job), keys.rejected_rows_uri(job), keys.input_shard_uri(job, 0),
        keys.output_shard_uri(job, 7), keys.error_shard_uri(job, 7),
        keys.commit_record_uri(job, 7), keys.manifest_uri(job), keys.success_marker_uri(job),
    ]  # fmt: skip
    assert all(p.startswith(job + "/") for p in paths)
    assert len(set(paths)) == len(paths)
    assert keys.input_shard_uri(job, 42).endswith("/inputs/shard-00042.parquet")
    assert keys.parse_shard_name(keys.output_shard_uri(job, 123456)) == 123456
    with pytest.raises(ValueError):
        keys.job_uri("s3://bucket/runs", "../../etc")


def test_redis_keys_are_namespaced_per_job_and_refuse_bad_ids() -> None:
    job_id = new_job_id(T0)
    owned = keys.job_keys(job_id)
    assert len(set(owned)) == len(owned)
    assert all(k.startswith(f"cola-batch:job:{job_id}:") for k in owned)
    assert keys.job_index_key() not in owned
    with pytest.raises(ValueError):
        keys.job_status_key("job-x:*")


# ---------------------------------------------------------------- settings


def test_settings_come_from_prefixed_environment_and_hide_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLA_BATCH_SHARD_SIZE", "250")
    monkeypatch.setenv("COLA_BATCH_REDIS_URL", "redis://:hunter2@redis:6379/0")
    monkeypatch.setenv("COLA_BATCH_API_TOKEN", "tok-secret")
    settings = Settings()
    assert settings.shard_size == 250
    assert settings.redis_url_value() == "redis://:hunter2@redis:6379/0"
    shown = repr(settings) + str(settings.model_dump())
    assert "hunter2" not in shown and "tok-secret" not in shown
    assert all(field.description for field in Settings.model_fields.values())
    with pytest.raises(ValidationError):
        Settings(queue_batch="q", queue_interactive="q")
