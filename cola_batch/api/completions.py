"""`/v1/chat/completions` and `/v1/completions`, each request a one-row job on the
interactive queue.

Contract: a request is checked (model id, `n` 1, one prompt, sampling fields through
`SamplingParams`), its prompt built (chat: the served model's chat template,
`cola_batch.chat.apply_chat_template`), written as a one-row JSONL to a scratch path, submitted with
`Control.submit` on `Settings.queue_interactive` (which workers poll before the batch queue),
and waited for up to `api_request_timeout_s` (then cancelled: 504). Answered, the job is
forgotten (`Control.forget`): its files go at once, its Redis state after
`api_interactive_retention_s`, and it never shows in `cola-batch jobs`. The row id is fixed, so the
same prompt, sampling fields and `seed` give the same output. `stop` strings (and the stop text
of the `text`/`chatml` templates) cut the completion. Streaming (`stream: true`) answers after
the generation finished, as SSE chunks of one generated block each (`BlockSplitter`), then
`data: [DONE]`; with `stream_options.include_usage` a usage chunk precedes `[DONE]`.
Besides OpenAI's fields, a request may set `top_k`, `timesteps`, `guidance_scale` and
`repetition_penalty` (cola-batch extensions; `extra_body` in the openai client).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from cola_batch import keys, storage
from cola_batch.api.context import ApiContext, ctx
from cola_batch.api.errors import ApiError
from cola_batch.api.responses import (
    chunk,
    completion_body,
    row_error,
    truncate_at_stop,
    usage_chunk,
)
from cola_batch.api.streaming import sse
from cola_batch.chat import TEXT_STOP, ChatTemplateError, apply_chat_template
from cola_batch.jobs import Control
from cola_batch.producer.errors import InputError
from cola_batch.schemas.job import JobStatus
from cola_batch.schemas.sampling import SamplingParams

router = APIRouter()
_TEMPLATE_STOPS = {"text": [TEXT_STOP], "chatml": ["<|im_end|>"]}


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    # cola-batch extensions (OpenAI clients send them through `extra_body`)
    timesteps: int | None = None
    guidance_scale: float | None = None
    repetition_penalty: float | None = None


class ChatRequest(_Common):
    messages: list[dict[str, Any]]


class CompletionRequest(_Common):
    prompt: str | list[str]


def _sampling(context: ApiContext, request: _Common) -> SamplingParams:
    settings = context.settings
    wanted = request.max_completion_tokens or request.max_tokens
    if wanted is not None and wanted < 0:
        raise ApiError(400, "max_tokens must be positive", param="max_tokens", code="invalid_value")
    budget = min(wanted or settings.api_default_max_tokens, settings.api_max_tokens_limit)
    fields: dict[str, Any] = {"max_new_tokens": budget, "temperature": request.temperature or 0.0}
    for name in ("top_p", "top_k", "seed", "timesteps", "guidance_scale", "repetition_penalty"):
        value = getattr(request, name)
        if value is not None:
            fields[name] = value
    try:
        return SamplingParams(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        raise ApiError(
            400, f"Invalid {param}: {first.get('msg')}", param=param, code="invalid_value"
        ) from exc


def _check(context: ApiContext, request: _Common) -> None:
    if request.model and request.model != context.model_name:
        raise ApiError(
            404,
            f"The model '{request.model}' does not exist here; this server serves "
            f"'{context.model_name}'.",
            param="model",
            code="model_not_found",
        )
    if request.n not in (None, 1):
        raise ApiError(400, "Only n=1 is supported.", param="n", code="unsupported_parameter")


def generate(context: ApiContext, prompt: str, sampling: SamplingParams) -> dict[str, Any]:
    """Run one prompt through the interactive queue; the finished output row."""
    control, settings = context.control, context.settings
    scratch = keys.api_request_uri(context.api_base, secrets.token_hex(16))
    storage.write_text_atomic(scratch, json.dumps({"id": "0", "prompt": prompt}) + "\n")
    try:
        spec = control.submit(
            [scratch],
            model=context.model,
            sampling=sampling,
            shard_size=1,
            output=keys.api_interactive_output(context.api_base),
            id_column="id",
            input_format="jsonl",
            queue=settings.queue_interactive,
        )
    except InputError as exc:
        raise ApiError(400, f"Invalid prompt: {exc.reason}", param="prompt", code=exc.code) from exc
    finally:
        storage.delete(scratch)
    status = control.wait(spec.job_id, timeout_s=settings.api_request_timeout_s, poll_s=0.5)
    try:
        return _result(control, spec.job_id, status)
    finally:
        control.forget(
            spec.job_id,
            keys.job_uri(spec.output, spec.job_id),
            after_s=settings.api_interactive_retention_s,
            files=status.terminal,
        )


def _result(control: Control, job_id: str, status: JobStatus) -> dict[str, Any]:
    if not status.terminal:
        control.cancel(job_id)
        raise ApiError(
            504,
            f"No worker finished the request within "
            f"{control.settings.api_request_timeout_s:g} s (are workers running?).",
            code="timeout",
        )
    rows = control.results_table(job_id).to_pylist()
    if not rows:
        raise ApiError(
            500,
            f"The request's job ended {status.state.value} without a result"
            + (f": {status.error}" if status.error else ""),
            code="no_result",
        )
    row = rows[0]
    if row["error_code"] is not None:
        code, error = row_error(row["error_code"], row["error_message"])
        raise ApiError(code, error["message"], code=error["code"], type=error["type"])
    return row


def _answer(
    context: ApiContext, request: _Common, endpoint: str, prompt: str
) -> dict[str, Any] | StreamingResponse:
    row = generate(context, prompt, _sampling(context, request))
    stops = (
        list(_TEMPLATE_STOPS.get(context.chat_template, []))
        if endpoint.startswith("/v1/chat")
        else []
    )
    stops += [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    text, stopped = truncate_at_stop(row["text"] or "", stops)
    finish = "stop" if stopped else row["finish_reason"]
    prefix = "chatcmpl" if endpoint == "/v1/chat/completions" else "cmpl"
    ident, created = f"{prefix}-{secrets.token_hex(16)}", int(time.time())
    if not request.stream:
        return completion_body(
            endpoint,
            ident=ident,
            created=created,
            model=context.model_name,
            text=text,
            finish_reason=finish,
            prompt_tokens=row["prompt_tokens"],
            completion_tokens=row["completion_tokens"],
        )
    splitter = context.splitter
    pieces = splitter.split(text, row["prompt_tokens"]) if splitter else [text]
    include_usage = bool((request.stream_options or {}).get("include_usage"))
    common = {"ident": ident, "created": created, "model": context.model_name}

    def events() -> Iterator[bytes]:
        if endpoint == "/v1/chat/completions":
            yield sse(chunk(endpoint, text="", role=True, **common))
        for piece in pieces:
            yield sse(chunk(endpoint, text=piece, **common))
        yield sse(chunk(endpoint, text=None, finish_reason=finish or "stop", **common))
        if include_usage:
            yield sse(
                usage_chunk(
                    endpoint,
                    prompt=row["prompt_tokens"] or 0,
                    completion=row["completion_tokens"] or 0,
                    **common,
                )
            )
        yield sse("[DONE]")

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"cache-control": "no-cache"}
    )


@router.post("/v1/chat/completions", response_model=None)
def chat_completions(
    request: ChatRequest, context: ApiContext = Depends(ctx)
) -> dict[str, Any] | StreamingResponse:
    _check(context, request)
    try:
        prompt = apply_chat_template(request.messages, template=context.chat_template)
    except ChatTemplateError as exc:
        raise ApiError(
            400, f"Invalid messages: {exc}", param="messages", code="invalid_messages"
        ) from exc
    return _answer(context, request, "/v1/chat/completions", prompt)


@router.post("/v1/completions", response_model=None)
def completions(
    request: CompletionRequest, context: ApiContext = Depends(ctx)
) -> dict[str, Any] | StreamingResponse:
    _check(context, request)
    prompt = request.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(
                400,
                "Exactly one prompt per request is supported.",
                param="prompt",
                code="unsupported_parameter",
            )
        prompt = prompt[0]
    if not prompt:
        raise ApiError(400, "The prompt is empty.", param="prompt", code="empty_prompt")
    return _answer(context, request, "/v1/completions", prompt)
