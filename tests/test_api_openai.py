"""`cola-batch serve` through the official `openai` client: a live uvicorn server, a real Celery
worker and a tiny random checkpoint, against a private redis-server and local storage.

One server and one worker serve the whole module (started once), so each test reads as what
an OpenAI user does: upload, create a batch, poll, download; chat and text completions,
streamed and not; and the errors they get back (401, 404, 413, 422, 400 with line numbers).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
import uvicorn
from services import RedisServer, free_port
from tokenizers import Tokenizer
from workers import WorkerGroup, make_tiny_model

from cola_batch import keys
from cola_batch.api import create_app
from cola_batch.pipeline.layout import plan_prompt
from cola_batch.settings import Settings

TOKEN = "test-token-7f3a"
MAX_REQUEST_BYTES = 64 * 1024
BLOCK_TOKENS = 4  # the tiny preset: DiT block_size 4 × VAE patch_size 1
FAST = {"timesteps": 2}  # cola-batch's sampling extension: keeps the tiny model quick


@dataclass
class Service:
    base_url: str
    model: Path
    client: openai.OpenAI
    workers: WorkerGroup


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("api")
    model = make_tiny_model(root / "tiny")
    redis = RedisServer().start()
    url = redis.url_for_db(0)
    settings = Settings(
        redis_url=url,
        default_output=str(root / "runs"),
        api_token=TOKEN,
        max_request_bytes=MAX_REQUEST_BYTES,
        api_request_timeout_s=60,
        storage_retries=2,
        storage_backoff_initial_s=0.01,
    )
    workers = WorkerGroup(model, url, root).start()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(str(model), settings=settings),
            host="127.0.0.1",
            port=free_port(),
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    base_url = f"http://127.0.0.1:{server.config.port}/v1"
    client = openai.OpenAI(api_key=TOKEN, base_url=base_url, max_retries=0, timeout=60)
    try:
        yield Service(base_url, model, client, workers)
    finally:
        server.should_exit = True
        thread.join(15)
        workers.stop()
        redis.close()


def chat_line(custom_id: str, content: str, max_tokens: int = 8, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "tiny",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            **body,
        },
    }


def upload(client: openai.OpenAI, lines: list[Any], name: str = "requests.jsonl") -> str:
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    return client.files.create(file=(name, text.encode("utf-8")), purpose="batch").id


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


# ---------------------------------------------------------------------- interactive


def test_chat_completion_reports_usage(service: Service) -> None:
    client = service.client
    messages = [{"role": "user", "content": "alpha beta gamma"}]
    first = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, extra_body=FAST
    )
    assert first.object == "chat.completion" and first.id.startswith("chatcmpl-")
    assert first.model == "tiny" and first.choices[0].message.role == "assistant"
    assert first.choices[0].finish_reason in ("stop", "length")
    assert first.usage is not None and 0 < first.usage.completion_tokens <= 12
    assert first.usage.prompt_tokens > 0


def test_answered_requests_leave_no_jobs_or_files_behind(service: Service) -> None:
    r = redis.Redis.from_url(service.workers.redis_url, decode_responses=True)
    client = service.client
    for content in ("one", "two"):
        messages = [{"role": "user", "content": content}]
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=4,
                                       extra_body=FAST)  # fmt: skip
    listed = set(r.zrange(keys.job_index_key(), 0, -1))
    statuses = list(r.scan_iter(f"{keys.REDIS_PREFIX}:job:*:status"))
    assert statuses, "the requests ran as jobs"
    forgotten = [k for k in statuses if k.split(":")[-2] not in listed]
    assert forgotten and all(0 < r.ttl(k) <= 3600 for k in forgotten)
    assert list(service.model.parent.rglob("interactive/job-*")) == []


def test_chat_streaming_sends_one_chunk_per_block(service: Service) -> None:
    """Streaming answers the same text as the plain call (same prompt and seed: same output)."""
    client = service.client
    messages = [{"role": "user", "content": "delta epsilon zeta"}]
    whole = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=16, extra_body=FAST
    )
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=16,
        stream=True,
        extra_body=FAST,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert "".join(pieces) == whole.choices[0].message.content
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    # Piece k ends where block k ends: the first block holds what the prompt left of it.
    tokenizer = Tokenizer.from_file(str(service.model / "tokenizer.json"))
    ids = tokenizer.encode("".join(pieces), add_special_tokens=False).ids
    prompt_tokens = whole.usage.prompt_tokens  # type: ignore[union-attr]
    first = BLOCK_TOKENS - plan_prompt(prompt_tokens, BLOCK_TOKENS).trim
    cuts, done = [], ""
    for end in range(first, len(ids), BLOCK_TOKENS):
        prefix = tokenizer.decode(ids[:end], skip_special_tokens=False)
        if len(prefix) > len(done):  # a block ending inside a character joins the next one
            cuts.append(prefix)
            done = prefix
    text = "".join(pieces)
    assert ["".join(pieces[: k + 1]) for k in range(len(pieces) - 1)] == [
        c for c in cuts if c != text
    ]


def test_text_completions_streamed_and_not(service: Service) -> None:
    client = service.client
    whole = client.completions.create(
        model="tiny", prompt="theta eta", max_tokens=8, extra_body=FAST
    )
    assert whole.object == "text_completion" and whole.choices[0].finish_reason in (
        "stop",
        "length",
    )
    streamed = list(
        client.completions.create(
            model="tiny", prompt="theta eta", max_tokens=8, extra_body=FAST, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


def test_request_errors_are_openai_shaped(service: Service) -> None:
    client = service.client
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as many:
        client.chat.completions.create(
            model="tiny", n=2, messages=[{"role": "user", "content": "x"}]
        )
    assert many.value.body["param"] == "n"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.UnprocessableEntityError) as schema:
        client.post("/chat/completions", body={"model": "tiny"}, cast_to=object)
    assert schema.value.body["param"] == "messages"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as steps:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], extra_body={"timesteps": 0}
        )
    assert steps.value.body["param"] == "timesteps"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as batch_steps:
        client.batches.create(
            input_file_id=upload(client, [chat_line("a", "b")]),
            endpoint="/v1/chat/completions",
            completion_window="24h",
            extra_body={"sampling": {"top_p": 2}},
        )
    assert batch_steps.value.body["param"] == "sampling.top_p"  # type: ignore[index]
    huge = "x" * (MAX_REQUEST_BYTES + 1)
    with pytest.raises(openai.APIStatusError) as large:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": huge}])
    assert large.value.status_code == 413
    assert large.value.body["code"] == "request_too_large"  # type: ignore[index]


def test_auth_models_and_health(service: Service) -> None:
    assert [m.id for m in service.client.models.list()] == ["tiny"]
    for key in ("wrong-token", ""):
        anonymous = openai.OpenAI(api_key=key or "unset", base_url=service.base_url, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            anonymous.models.list()
        assert info.value.status_code == 401
        assert info.value.body["code"] == "invalid_api_key"  # type: ignore[index]
        with pytest.raises(openai.AuthenticationError):
            anonymous.batches.retrieve("batch_20250101-000000-000000000000")
    import urllib.request

    with urllib.request.urlopen(service.base_url.removesuffix("/v1") + "/health") as response:
        health = json.loads(response.read())
    assert health == {"status": "ok", "model": "tiny", "redis": True}


def _raw_post(
    service: Service, path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, bytes]:
    import http.client

    port = int(service.base_url.rsplit(":", 1)[1].split("/")[0])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.putrequest("POST", path)
        for name, value in {"Authorization": f"Bearer {TOKEN}", **headers}.items():
            conn.putheader(name, value)
        conn.endheaders()
        if headers.get("Transfer-Encoding") == "chunked":
            for start in range(0, len(body), 8192):
                piece = body[start : start + 8192]
                conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            conn.send(b"0\r\n\r\n")
        else:
            conn.send(body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_streams_are_server_sent_events_ending_with_done(service: Service) -> None:
    request = {"model": "tiny", "prompt": "iota kappa", "max_tokens": 6, "stream": True, **FAST}
    body = json.dumps(request).encode()
    status, raw = _raw_post(
        service,
        "/v1/completions",
        body,
        {"Content-Type": "application/json", "Content-Length": str(len(body))},
    )
    assert status == 200
    events = raw.decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        assert json.loads(event.removeprefix("data: "))["object"] == "text_completion"


def test_a_chunked_body_over_the_limit_is_refused(service: Service) -> None:
    content = "y" * (MAX_REQUEST_BYTES + 10)
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": content}]})
    status, raw = _raw_post(
        service,
        "/v1/chat/completions",
        body.encode(),
        {"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
    )
    assert status == 413
    assert json.loads(raw)["error"]["code"] == "request_too_large"
