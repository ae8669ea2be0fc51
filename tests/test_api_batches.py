"""Batch bookkeeping of the API without workers: OpenAI status mapping, expiry of a batch whose
completion window ran out, per-model chat templates in batch files, and block-sized streaming
pieces. Real Redis and local storage; no worker runs, so jobs stay queued.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from workers import make_tiny_model

from cola_batch import keys, storage
from cola_batch.api.batch_files import check_batch_input
from cola_batch.api.batches import _refresh, batch_id_for, job_id_for, openai_status
from cola_batch.api.context import ApiContext
from cola_batch.api.errors import ApiError
from cola_batch.api.files import new_file_id, register_file
from cola_batch.api.responses import truncate_at_stop
from cola_batch.api.streaming import BlockSplitter
from cola_batch.jobs import Control
from cola_batch.schemas.job import JobState, JobStatus, new_job_id
from cola_batch.settings import Settings

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def context_for(redis_url: str, tmp_path: Path, model: Path, **settings: object) -> ApiContext:
    config = Settings(redis_url=redis_url, default_output=str(tmp_path / "runs"), **settings)
    return ApiContext.build(str(model), settings=config, control=Control.connect(config))


def put_file(context: ApiContext, lines: list[object]) -> str:
    file_id = new_file_id()
    text = "".join(json.dumps(line) + "\n" for line in lines)
    storage.write_text_atomic(keys.api_file_uri(context.api_base, file_id), text)
    register_file(context, file_id, nbytes=len(text), filename="in.jsonl", purpose="batch")
    return file_id


def status(state: JobState, **fields: int) -> JobStatus:
    stamps = {JobState.VALIDATING: T0, state: T0 + timedelta(seconds=5)}
    return JobStatus(job_id=new_job_id(T0), state=state, timestamps=stamps, **fields)


def test_job_states_map_to_openai_batch_statuses() -> None:
    assert openai_status(status(JobState.VALIDATING), expired=False) == "validating"
    assert openai_status(status(JobState.QUEUED), expired=False) == "in_progress"
    assert openai_status(status(JobState.IN_PROGRESS), expired=False) == "in_progress"
    assert openai_status(status(JobState.FINALIZING), expired=False) == "finalizing"
    assert openai_status(status(JobState.COMPLETED), expired=False) == "completed"
    assert openai_status(status(JobState.CANCELLED), expired=False) == "cancelled"
    assert openai_status(status(JobState.CANCELLED), expired=True) == "expired"
    # Every request ran and failed on its own: OpenAI calls that a completed batch.
    ran = status(JobState.FAILED, shards_total=2, shards_failed=2, rows_failed=4)
    assert openai_status(ran, expired=False) == "completed"
    assert openai_status(status(JobState.FAILED, shards_total=2), expired=False) == "failed"


def test_batch_ids_and_job_ids_derive_from_each_other() -> None:
    job_id = new_job_id(T0)
    assert job_id_for(batch_id_for(job_id)) == job_id
    for bad in ("batch_x", "batch_../../etc", f"{batch_id_for(job_id)}\n"):
        with pytest.raises(ApiError) as info:
            job_id_for(bad)
        assert info.value.status == 404


def test_a_batch_past_its_window_expires_and_reports_every_request(
    redis_url: str, tmp_path: Path, tiny: Path
) -> None:
    context = context_for(redis_url, tmp_path, tiny)
    lines = [
        {"custom_id": f"r{i}", "body": {"messages": [{"role": "user", "content": "hi"}]}}
        for i in range(3)
    ]
    file_id = put_file(context, lines)
    spec = context.control.submit(
        [keys.api_file_uri(context.api_base, file_id)],
        model=context.model,
        output=context.output,
        id_column="custom_id",
        input_format="jsonl",
    )
    batch_id = batch_id_for(spec.job_id)
    record = {
        "id": batch_id,
        "endpoint": "/v1/chat/completions",
        "input_file_id": file_id,
        "completion_window": "1h",
        "metadata": "",
        "model": context.model_name,
        "created_at": str(int(time.time()) - 2 * 3600),
    }
    context.redis.hset(keys.api_batch_key(batch_id), mapping=record)

    batch = _refresh(context, record)

    assert batch["status"] == "expired" and batch["expired_at"] is not None
    assert batch["expires_at"] == int(record["created_at"]) + 3600
    assert context.control.status(spec.job_id).state is JobState.CANCELLED
    assert batch["output_file_id"] is None
    errors = storage.read_text(keys.api_file_uri(context.api_base, batch["error_file_id"]))
    rows = [json.loads(line) for line in errors.splitlines()]
    assert [r["custom_id"] for r in rows] == ["r0", "r1", "r2"]
    assert {r["error"]["code"] for r in rows} == {"batch_expired"}
    assert all(r["response"] is None for r in rows)


def test_chat_batches_use_the_served_models_chat_template(
    redis_url: str, tmp_path: Path, tiny: Path
) -> None:
    context = context_for(redis_url, tmp_path, tiny, chat_templates="tiny=chatml")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    line = {"custom_id": "a", "body": {"messages": messages, "max_tokens": 5}}
    converted = check_batch_input(context, put_file(context, [line]), "/v1/chat/completions")
    assert converted is not None
    (row,) = [json.loads(x) for x in Path(converted).read_text().splitlines()]
    assert row["custom_id"] == "a" and row["body"]["max_tokens"] == 5
    assert "messages" not in row["body"]
    assert row["body"]["prompt"] == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # The default template leaves the file as it is: the producer renders it.
    plain = context_for(redis_url, tmp_path, tiny)
    assert check_batch_input(plain, put_file(plain, [line]), "/v1/chat/completions") is None


def test_stream_pieces_follow_block_boundaries(tiny: Path) -> None:
    splitter = BlockSplitter(str(tiny))
    tokenizer = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    text = " alpha beta gamma delta epsilon zeta eta theta"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids) > 8
    # A 6-token prompt leaves 2 of block 0's 4 positions for generated tokens.
    pieces = splitter.split(text, prompt_tokens=6)
    assert "".join(pieces) == text
    assert pieces[0] == tokenizer.decode(ids[:2])
    assert pieces[1] == tokenizer.decode(ids[:6])[len(pieces[0]) :]
    assert len(pieces) == 1 + -(-(len(ids) - 2) // 4)
    assert BlockSplitter(str(tiny / "missing")).split(text, 6) == [text]


def test_stop_strings_cut_the_completion() -> None:
    assert truncate_at_stop("one two. three", ".") == ("one two", True)
    assert truncate_at_stop("a■b<|im_end|>", ["<|im_end|>", "■"]) == ("a", True)
    assert truncate_at_stop("nothing here", ["zzz"]) == ("nothing here", False)
    assert truncate_at_stop("kept", None) == ("kept", False)
