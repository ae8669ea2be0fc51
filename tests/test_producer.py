"""Submitting jobs: inputs are streamed, validated, staged as Parquet shards under the job's
prefix, job.json is written, and exactly one small task per shard is enqueued; on local disk and
on S3, from Parquet, JSONL, .jsonl.gz and OpenAI batch files."""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cola_batch import keys, storage
from cola_batch.producer import (
    ChatTemplateError,
    InputError,
    load_job_spec,
    messages_to_prompt,
    new_job_spec,
    submit_job,
)
from cola_batch.schemas import INPUT_SHARD_SCHEMA, JobSpec, SamplingParams, ShardTask
from cola_batch.schemas.arrow import read_provenance
from cola_batch.settings import Settings


class RecordingState:
    """A JobStateSink that remembers the calls (the Redis side is the worker package's)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def job_validating(self, spec: JobSpec) -> None:
        self.calls.append(("validating", spec.job_id))

    def job_created(self, spec: JobSpec, tasks: Sequence[ShardTask]) -> None:
        self.calls.append(("created", (spec.num_rows, spec.num_shards, len(tasks))))

    def job_invalid(self, spec: JobSpec, error: str) -> None:
        self.calls.append(("invalid", error))


def write_parquet(path: Path, n: int, row_group_size: int = 100, start: int = 0) -> str:
    ids = [f"row-{i}" for i in range(start, start + n)]
    prompts = [f"prompt number {i}" for i in range(start, start + n)]
    pq.write_table(pa.table({"id": ids, "prompt": prompts}), path, row_group_size=row_group_size)
    return str(path)


def read_staged(tasks: Sequence[ShardTask]) -> pa.Table:
    tables = []
    for task in tasks:
        with storage.open_input(task.input_uri) as handle:
            tables.append(pq.read_table(handle))
    return pa.concat_tables(tables)


def submit(
    inputs: Sequence[str], settings: Settings, **options: object
) -> tuple[JobSpec, list[ShardTask], RecordingState]:
    tasks: list[ShardTask] = []
    state = RecordingState()
    spec = new_job_spec(inputs, model="./model", settings=settings, **options)  # type: ignore[arg-type]
    staged = submit_job(spec, enqueue=tasks.append, settings=settings, state=state)
    return staged, tasks, state


def test_parquet_is_staged_in_shards_and_one_small_task_per_shard_is_enqueued(
    tmp_path: Path, settings: Settings
) -> None:
    source = write_parquet(tmp_path / "in.parquet", 2_345, row_group_size=300)
    spec, tasks, state = submit([source], settings, shard_size=1000)
    assert (spec.num_rows, spec.num_shards, spec.rejected_rows) == (2345, 3, 0)
    assert [(t.shard_id, t.row_start, t.row_end, t.row_count) for t in tasks] == [
        (0, 0, 1000, 1000), (1, 1000, 2000, 1000), (2, 2000, 2345, 345),
    ]  # fmt: skip
    assert all(len(t.model_dump_json()) < 512 for t in tasks)  # rows never ride in the task
    job = keys.job_uri(settings.default_output, spec.job_id)
    assert [t.input_uri for t in tasks] == [keys.input_shard_uri(job, i) for i in range(3)]
    staged = read_staged(tasks)
    assert staged.schema.remove_metadata() == INPUT_SHARD_SCHEMA
    assert staged.column("id").to_pylist() == [f"row-{i}" for i in range(2345)]
    assert staged.column("row_index").to_pylist() == list(range(2345))
    assert staged.column("prompt")[7].as_py() == "prompt number 7"
    provenance = read_provenance(pq.read_schema(tasks[0].input_uri).metadata)
    assert provenance is not None and provenance["job_id"] == spec.job_id
    assert load_job_spec(job) == spec
    assert state.calls == [("validating", spec.job_id), ("created", (2345, 3, 3))]


def test_several_inputs_of_different_formats_form_one_job(
    tmp_path: Path, settings: Settings
) -> None:
    parquet = write_parquet(tmp_path / "a.parquet", 5)
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"id": f"j{i}", "prompt": f"jp{i}"}) + "\n" for i in range(3))
    )
    gz = tmp_path / "c.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"id": "g1", "prompt": "gp1"}\n{"id": 7, "prompt": "gp2"}'))
    spec, tasks, _ = submit([parquet, str(jsonl), str(gz)], settings, shard_size=4)
    staged = read_staged(tasks)
    assert staged.column("id").to_pylist() == [
        "row-0", "row-1", "row-2", "row-3", "row-4", "j0", "j1", "j2", "g1", "7",
    ]  # fmt: skip
    assert spec.num_shards == 3 and [t.row_count for t in tasks] == [4, 4, 2]


def test_openai_batch_lines_become_prompts_with_per_row_overrides(
    tmp_path: Path, settings: Settings
) -> None:
    lines = [
        {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "cola", "messages": [{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Hi?"}],
                  "max_tokens": 64, "temperature": 0.5}},
        {"custom_id": "single", "body": {"messages": [{"role": "user", "content": " verbatim "}],
                                         "max_completion_tokens": 8}},
        {"custom_id": "completion", "body": {"prompt": "Once upon", "max_tokens": None}},
    ]  # fmt: skip
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    _, tasks, _ = submit([str(path)], settings)
    rows = read_staged(tasks).to_pylist()
    assert [r["id"] for r in rows] == ["chat", "single", "completion"]
    assert rows[0]["prompt"] == "System: Be brief.\nUser: Hi?\nAssistant:"
    assert rows[1]["prompt"] == " verbatim "
    assert rows[2]["prompt"] == "Once upon"
    assert [(r["max_tokens"], r["temperature"]) for r in rows] == [
        (64, 0.5), (8, None), (None, None),
    ]  # fmt: skip


def test_named_columns_of_plain_files_become_per_row_overrides(
    tmp_path: Path, settings: Settings
) -> None:
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({
        "id": ["p1", "p2"], "prompt": ["a", "b"],
        "budget": pa.array([16, None], pa.int64()), "temp": pa.array([None, 2], pa.int8()),
    }), parquet)  # fmt: skip
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(
        '{"id": "j1", "prompt": "c", "budget": 3, "temp": 0.25}\n'
        '{"id": "j2", "prompt": "d", "temp": null}\n'
    )
    options = {"max_tokens_column": "budget", "temperature_column": "temp"}
    _, tasks, _ = submit([str(parquet), str(jsonl)], settings, **options)
    rows = read_staged(tasks).to_pylist()
    assert [(r["id"], r["max_tokens"], r["temperature"]) for r in rows] == [
        ("p1", 16, None), ("p2", None, 2.0), ("j1", 3, 0.25), ("j2", None, None),
    ]  # fmt: skip

    # Unnamed, the same columns are ordinary data: no overrides.
    _, tasks, _ = submit([str(parquet), str(jsonl)], settings)
    assert {(r["max_tokens"], r["temperature"]) for r in read_staged(tasks).to_pylist()} == {
        (None, None)
    }


def test_bad_override_values_name_the_row_and_column(tmp_path: Path, settings: Settings) -> None:
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "prompt": ["x", "y", "z"],
                             "budget": [8, 0, 2**40]}), parquet)  # fmt: skip
    with pytest.raises(InputError, match=r"rows.parquet, row 1, column 'budget': max_tokens must"):
        submit([str(parquet)], settings, max_tokens_column="budget")

    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(
        '{"id": "a", "prompt": "x", "t": 0.5}\n{"id": "b", "prompt": "y", "t": "hot"}\n'
        '{"id": "c", "prompt": "z", "t": -1}\n'
    )
    spec, tasks, _ = submit([str(jsonl)], settings, temperature_column="t", on_bad_rows="skip")
    assert read_staged(tasks).column("id").to_pylist() == ["a"]
    job = keys.job_uri(settings.default_output, spec.job_id)
    records = [json.loads(x) for x in storage.read_text(keys.rejected_rows_uri(job)).splitlines()]
    assert sorted((r["line"], r["code"], r["column"]) for r in records) == [
        (2, "wrong_type", "t"), (3, "bad_override", "t"),
    ]  # fmt: skip


def test_a_named_override_column_must_exist_and_be_numeric(
    tmp_path: Path, settings: Settings
) -> None:
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"id": ["a"], "prompt": ["x"], "budget": ["8"]}), parquet)
    with pytest.raises(InputError, match=r"missing max_tokens column 'tokens'.*--max-tokens-col"):
        submit([str(parquet)], settings, max_tokens_column="tokens")
    with pytest.raises(InputError, match=r"max_tokens column has type string, expected integer"):
        submit([str(parquet)], settings, max_tokens_column="budget")


@pytest.mark.parametrize(
    ("messages", "prompt"),
    [
        ([{"role": "user", "content": "  keep me  "}], "  keep me  "),
        ([{"role": "User", "content": "x"}], "User: x\nAssistant:"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": " a "}],
         "User: q\nAssistant: a"),
        ([{"role": "tool", "content": [{"type": "text", "text": "t1"}, "t2", {"image": 1}]},
          {"role": "user", "content": None}, {"role": "user", "content": "u"}],
         "tool: t1\nt2\nUser: u\nAssistant:"),
        ([{"role": "SYSTEM", "content": "s"}, {"role": "ASSISTANT", "content": "a"}],
         "System: s\nAssistant: a\nAssistant:"),
        ([{"role": "user", "content": 42}], "42"),
    ],
)  # fmt: skip
def test_chat_template_follows_the_reference_adapter(messages: list, prompt: str) -> None:
    assert messages_to_prompt(messages) == prompt


def test_chat_template_refuses_empty_conversations() -> None:
    with pytest.raises(ChatTemplateError, match="empty"):
        messages_to_prompt([])
    with pytest.raises(ChatTemplateError, match="empty"):
        messages_to_prompt([{"role": "system", "content": " "}, {"role": "user", "content": ""}])


def test_prompt_template_and_positional_ids(tmp_path: Path, settings: Settings) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"text": "2+2?"}\n{"text": ""}\n{"text": "3+3?"}\n')
    spec, tasks, _ = submit(
        [str(path)], settings, prompt_column="text", id_column=None,
        prompt_template="Question: {prompt}\nAnswer:", on_bad_rows="skip",
    )  # fmt: skip
    rows = read_staged(tasks).to_pylist()
    # Ids are positions among all rows, so the rejected row 1 does not shift row 2's id.
    assert [(r["id"], r["prompt"]) for r in rows] == [
        ("0", "Question: 2+2?\nAnswer:"), ("2", "Question: 3+3?\nAnswer:"),
    ]  # fmt: skip
    assert spec.rejected_rows == 1


def test_skip_mode_writes_rejected_rows_with_reasons(tmp_path: Path, settings: Settings) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(
        b'{"id": "a", "prompt": "ok"}\n{"id": "b", "prompt": null}\nnot json\n'
        b'{"id": "a", "prompt": "again"}\n{"id": "c", "prompt": "fine"}\n'
    )
    spec, tasks, _ = submit([str(path)], settings, on_bad_rows="skip")
    assert (spec.num_rows, spec.rejected_rows) == (2, 3)
    assert read_staged(tasks).column("id").to_pylist() == ["a", "c"]
    job = keys.job_uri(settings.default_output, spec.job_id)
    records = [
        json.loads(line) for line in storage.read_text(keys.rejected_rows_uri(job)).splitlines()
    ]
    assert sorted((r["line"], r["code"]) for r in records) == [
        (2, "null_prompt"), (3, "malformed_json"), (4, "duplicate_id"),
    ]  # fmt: skip
    assert all(r["file"] == str(path) and r["message"] for r in records)


def test_a_bad_row_in_fail_mode_stages_nothing_and_enqueues_nothing(
    tmp_path: Path, settings: Settings
) -> None:
    good = write_parquet(tmp_path / "good.parquet", 3000)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "prompt": "ok"}\n{"id": "y", "prompt": "   "}\n')
    tasks: list[ShardTask] = []
    state = RecordingState()
    spec = new_job_spec([good, str(bad)], model="m", settings=settings, shard_size=1000)
    with pytest.raises(InputError, match=r"bad.jsonl, line 2, column 'prompt': prompt is empty"):
        submit_job(spec, enqueue=tasks.append, settings=settings, state=state)
    assert tasks == []
    job = Path(keys.job_uri(settings.default_output, spec.job_id))
    assert not (job / "job.json").exists()
    assert not (job / "inputs").exists() or not any((job / "inputs").iterdir())
    assert state.calls[0] == ("validating", spec.job_id) and state.calls[1][0] == "invalid"


def test_duplicate_ids_are_found_across_files(tmp_path: Path, settings: Settings) -> None:
    first = write_parquet(tmp_path / "a.parquet", 50)
    second = write_parquet(tmp_path / "b.parquet", 50, start=49)
    with pytest.raises(InputError, match=r"b.parquet, row 0, column 'id': duplicate id 'row-49'"):
        submit([first, second], settings)


def test_an_existing_job_is_never_overwritten(tmp_path: Path, settings: Settings) -> None:
    source = write_parquet(tmp_path / "in.parquet", 10)
    spec = new_job_spec([source], model="m", settings=settings)
    submit_job(spec, enqueue=lambda task: None, settings=settings)
    with pytest.raises(FileExistsError):
        submit_job(spec, enqueue=lambda task: None, settings=settings)


def test_path_like_ids_never_become_paths(tmp_path: Path, settings: Settings) -> None:
    hostile = ["../../etc/x", "/etc/passwd", "..\\..\\w", "a/../../b", "~root", "%2e%2e%2f"]
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": hostile, "prompt": ["p"] * len(hostile)}), path)
    before = {p for p in tmp_path.rglob("*")}
    spec, tasks, _ = submit([str(path)], settings)
    job = Path(keys.job_uri(settings.default_output, spec.job_id))
    created = {p for p in tmp_path.rglob("*")} - before
    assert created and all(p == job or job in p.parents or p in job.parents for p in created)
    assert read_staged(tasks).column("id").to_pylist() == hostile


def test_a_line_longer_than_the_limit_is_rejected_without_being_loaded(
    tmp_path: Path, settings: Settings
) -> None:
    """A 100 MB JSONL line (generated here, never committed) is streamed past, not held."""
    import tracemalloc

    path = tmp_path / "huge_line.jsonl"
    with path.open("wb") as out:
        out.write(b'{"id": "a", "prompt": "ok"}\n{"id": "huge", "prompt": "')
        block = b"x" * 2**20
        for _ in range(100):
            out.write(block)
        out.write(b'"}\n{"id": "c", "prompt": "ok"}\n')
    tracemalloc.start()
    try:
        spec, tasks, _ = submit([str(path)], settings, on_bad_rows="skip")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 40 * 2**20  # the 100 MB line was never in memory
    assert (spec.num_rows, spec.rejected_rows) == (2, 1)
    with pytest.raises(InputError, match=r"line 2: line is 104857\d+ bytes, the limit is 16777216"):
        submit([str(path)], settings)


def test_sampling_params_and_defaults_land_in_job_json(tmp_path: Path, settings: Settings) -> None:
    source = write_parquet(tmp_path / "in.parquet", 3)
    sampling = SamplingParams(samples_per_prompt=4, seed=1234, temperature=0.8)
    spec, _, _ = submit([source], settings, sampling=sampling, queue="cola-interactive")
    job = keys.job_uri(settings.default_output, spec.job_id)
    saved = json.loads(storage.read_text(keys.job_spec_uri(job)))
    assert saved["sampling"]["samples_per_prompt"] == 4 and saved["sampling"]["seed"] == 1234
    assert saved["queue"] == "cola-interactive" and saved["shard_size"] == settings.shard_size
    assert saved["inputs"] == [source] and Path(saved["model"]).is_absolute()


def test_inputs_and_job_on_s3(s3_bucket: str, tmp_path: Path, settings: Settings) -> None:
    local = write_parquet(tmp_path / "in.parquet", 250, row_group_size=64)
    storage.upload_file_atomic(local, f"{s3_bucket}/inputs/in.parquet")
    storage.write_bytes_atomic(
        f"{s3_bucket}/inputs/more.jsonl.gz",
        gzip.compress(b'{"custom_id": "o1", "body": {"prompt": "from s3"}}\n'),
    )
    inputs = [f"{s3_bucket}/inputs/in.parquet", f"{s3_bucket}/inputs/more.jsonl.gz"]
    spec, tasks, _ = submit(inputs, settings, output=f"{s3_bucket}/runs/", shard_size=100)
    job = f"{s3_bucket}/runs/{spec.job_id}"
    assert (spec.num_rows, spec.num_shards) == (251, 3)
    assert all(t.input_uri.startswith(f"{job}/inputs/") for t in tasks)
    assert storage.list_files(f"{job}/inputs") == [t.input_uri for t in tasks]
    staged = read_staged(tasks)
    assert staged.column("id").to_pylist()[-2:] == ["row-249", "o1"]
    assert load_job_spec(job).num_rows == 251
