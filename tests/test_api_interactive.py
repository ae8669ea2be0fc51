"""`cola-batch serve`'s interactive endpoints through the official `openai` client (one live
server and worker per module, `api_service.py`): chat and text completions, streamed and not,
models and health, and the errors (401, 413, 422, 400) an OpenAI user gets back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest
import redis
from api_service import (
    BLOCK_TOKENS,
    FAST,
    MAX_REQUEST_BYTES,
    TOKEN,
    Service,
    chat_line,
    running_service,
    upload,
)
from tokenizers import Tokenizer

from cola_batch import keys
from cola_batch.pipeline.layout import plan_prompt


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running_service(tmp_path_factory.mktemp("api")) as running:
        yield running


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
