"""`cola-batch serve`'s Batch and Files APIs through the official `openai` client (one live
server and worker per module, `api_service.py`): upload, create a batch, poll, download, delete;
and the errors an OpenAI user gets back (404, 400 with line numbers).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from api_service import (
    FAST,
    Service,
    chat_line,
    running_service,
    upload,
)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running_service(tmp_path_factory.mktemp("api")) as running:
        yield running


def wait_batch(client: openai.OpenAI, batch_id: str, timeout_s: float = 45.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        time.sleep(0.3)


def jsonl(client: openai.OpenAI, file_id: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


# ---------------------------------------------------------------------- batches


def test_batch_round_trip_with_output_and_error_files(service: Service) -> None:
    client = service.client
    too_long = " ".join(["alpha beta gamma delta"] * 4000)  # far over max_context (8192 tokens)
    lines = [chat_line(f"req-{i}", f"tell me about item {i}") for i in range(4)]
    lines.append(chat_line("req-long", too_long))
    lines.append(
        {
            "custom_id": "req-system",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "hello"},
                ],
                "max_tokens": 6,
            },
        }
    )
    file_id = upload(client, lines)
    assert client.files.retrieve(file_id).bytes > 0

    created = client.batches.create(
        input_file_id=file_id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_body={"sampling": FAST},
        metadata={"owner": "tests"},
    )
    assert created.id.startswith("batch_")
    assert created.status in ("validating", "in_progress")
    assert created.metadata == {"owner": "tests"}

    batch = wait_batch(client, created.id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed) == (6, 5)
    assert batch.request_counts.failed == 1
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
    assert batch.usage is not None and batch.usage.output_tokens > 0
    assert batch.usage.total_tokens == batch.usage.input_tokens + batch.usage.output_tokens

    outputs = jsonl(client, batch.output_file_id)
    assert [o["custom_id"] for o in outputs] == ["req-0", "req-1", "req-2", "req-3", "req-system"]
    for line in outputs:
        assert line["error"] is None and line["id"].startswith("batch_req_")
        assert line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == "tiny"
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert isinstance(body["choices"][0]["message"]["content"], str)
        assert body["usage"]["completion_tokens"] <= 8

    (error,) = jsonl(client, batch.error_file_id)
    assert error["custom_id"] == "req-long"
    assert error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["code"] == "context_length_exceeded"
    # Looking again changes nothing: the result files are built once.
    again = client.batches.retrieve(batch.id)
    assert (again.output_file_id, again.error_file_id) == (
        batch.output_file_id,
        batch.error_file_id,
    )


def test_an_invalid_line_is_rejected_with_its_line_number(service: Service) -> None:
    client = service.client
    lines = [chat_line("a", "one"), "", chat_line("b", "two"), '{"custom_id": "c", "body": {']
    file_id = upload(client, lines)
    with pytest.raises(openai.BadRequestError) as info:
        client.batches.create(
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            extra_body={"sampling": FAST},
        )
    error = info.value.body
    assert isinstance(error, dict)
    assert error["line"] == 4 and "Line 4" in error["message"]
    assert error["param"] == "input_file_id" and error["code"] == "invalid_json"

    wrong_url = chat_line("x", "hi") | {"url": "/v1/completions"}
    file_id = upload(client, [chat_line("w", "hi"), wrong_url])
    with pytest.raises(openai.BadRequestError, match="Line 2"):
        client.batches.create(
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            extra_body={"sampling": FAST},
        )


def test_a_duplicate_custom_id_is_rejected_up_front(service: Service) -> None:
    client = service.client
    lines = [chat_line("same", "first"), chat_line("other", "x"), chat_line("same", "again")]
    file_id = upload(client, lines)
    before = client.batches.list(limit=100).data
    with pytest.raises(openai.BadRequestError) as info:
        client.batches.create(
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            extra_body={"sampling": FAST},
        )
    error = info.value.body
    assert isinstance(error, dict)
    assert error["code"] == "duplicate_id" and error["line"] == 3
    assert "'same'" in error["message"]
    assert len(client.batches.list(limit=100).data) == len(before)  # no batch was created


def test_completions_batches_pagination_and_cancel(service: Service) -> None:
    client = service.client
    ids = []
    for n in range(3):
        lines = [
            {
                "custom_id": f"p{n}-{k}",
                "method": "POST",
                "url": "/v1/completions",
                "body": {"model": "tiny", "prompt": f"count {n} {k}", "max_tokens": 4},
            }
            for k in range(2)
        ]
        ids.append(
            client.batches.create(
                input_file_id=upload(client, lines),
                endpoint="/v1/completions",
                completion_window="24h",
                extra_body={"sampling": FAST},
            ).id
        )
    # The two newest are cancelled while the first still holds the worker.
    for n, batch_id in enumerate(ids[1:], start=1):
        cancelled = client.batches.cancel(batch_id)
        assert cancelled.status == "cancelled" and cancelled.cancelled_at is not None
        seen: list[str] = []
        for file_id in (cancelled.output_file_id, cancelled.error_file_id):
            seen += [line["custom_id"] for line in jsonl(client, file_id)] if file_id else []
        assert sorted(seen) == [f"p{n}-0", f"p{n}-1"]  # every request is accounted for
        if cancelled.error_file_id:
            codes = {line["error"]["code"] for line in jsonl(client, cancelled.error_file_id)}
            assert codes == {"batch_cancelled"}

    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == ids[::-1][:2]  # newest first
    assert first.has_more
    rest = client.batches.list(limit=2, after=first.data[-1].id)
    assert rest.data[0].id == ids[0]
    listed = [b.id for b in client.batches.list(limit=2)]  # auto-pagination follows `after`
    assert listed[:3] == ids[::-1] and len(listed) == len(set(listed))

    batch = wait_batch(client, ids[0])
    assert batch.status == "completed"
    lines = jsonl(client, batch.output_file_id)
    assert [line["custom_id"] for line in lines] == ["p0-0", "p0-1"]
    assert lines[0]["response"]["body"]["object"] == "text_completion"
    assert isinstance(lines[0]["response"]["body"]["choices"][0]["text"], str)


def test_unknown_batch_and_file_are_openai_shaped_404s(service: Service) -> None:
    client = service.client
    for batch_id in ("batch_20250101-000000-000000000000", "not-a-batch"):
        with pytest.raises(openai.NotFoundError) as info:
            client.batches.retrieve(batch_id)
        assert info.value.status_code == 404
        error = info.value.body
        assert isinstance(error, dict)
        assert error["type"] == "not_found_error" and batch_id in error["message"]
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-000000000000000000000000")


def test_files_round_trip_and_purpose_check(service: Service) -> None:
    client = service.client
    payload = "".join(json.dumps(chat_line(f"r{i}", "é ✓")) + "\n" for i in range(3)).encode()
    uploaded = client.files.create(file=("mine.jsonl", payload), purpose="batch")
    assert (uploaded.bytes, uploaded.filename, uploaded.purpose) == (
        len(payload),
        "mine.jsonl",
        "batch",
    )
    assert client.files.content(uploaded.id).content == payload
    with pytest.raises(openai.BadRequestError, match="fine-tune"):
        client.files.create(file=("x.jsonl", payload), purpose="fine-tune")

    stored = list(service.model.parent.rglob(f"*{uploaded.id}*"))
    assert len(stored) == 1 and stored[0].read_bytes() == payload
    deleted = client.files.delete(uploaded.id)
    assert (deleted.id, deleted.deleted) == (uploaded.id, True)
    assert not stored[0].exists()
    assert uploaded.id not in [f.id for f in client.files.list()]
    for gone in (client.files.retrieve, client.files.content, client.files.delete):
        with pytest.raises(openai.NotFoundError):
            gone(uploaded.id)
