"""OpenAI response objects built from cola-batch output rows (pure functions, no I/O).

Contract: `completion_body(endpoint, ...)` is a `chat.completion` object for
`/v1/chat/completions` and a `text_completion` object for `/v1/completions`, with `usage` from
the row's token counts; `chunk(...)` is one streaming chunk of either kind. `row_error(...)`
maps a failed row's `error_code` to an HTTP status and an OpenAI error object. Ids passed in
are used as they are, so callers choose random or deterministic ones.
"""

from __future__ import annotations

from typing import Any, Literal

Endpoint = Literal["/v1/chat/completions", "/v1/completions"]
ENDPOINTS: tuple[Endpoint, ...] = ("/v1/chat/completions", "/v1/completions")

# Row error codes that are the request's fault (4xx); everything else is the server's (500).
_CLIENT_ERRORS = {
    "prompt_too_long": "context_length_exceeded",
    "empty_prompt": "empty_prompt",
    "tokenizer_error": "invalid_prompt",
}


def usage(prompt_tokens: int | None, completion_tokens: int | None) -> dict[str, int]:
    p, c = int(prompt_tokens or 0), int(completion_tokens or 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def completion_body(
    endpoint: str,
    *,
    ident: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str | None,
    prompt_tokens: int | None,
    completion_tokens: int | None,
) -> dict[str, Any]:
    finish = finish_reason if finish_reason in ("stop", "length") else "stop"
    if endpoint == "/v1/chat/completions":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": finish,
        }
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        kind = "text_completion"
    return {
        "id": ident,
        "object": kind,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(
    endpoint: str,
    *,
    ident: str,
    created: int,
    model: str,
    text: str | None,
    finish_reason: str | None = None,
    role: bool = False,
) -> dict[str, Any]:
    """One SSE chunk: `text` None with a finish_reason is the closing chunk."""
    if endpoint == "/v1/chat/completions":
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {
            "index": 0,
            "delta": delta,
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        kind = "text_completion"
    return {"id": ident, "object": kind, "created": created, "model": model, "choices": [choice]}


def usage_chunk(
    endpoint: str, *, ident: str, created: int, model: str, prompt: int, completion: int
) -> dict[str, Any]:
    kind = "chat.completion.chunk" if endpoint == "/v1/chat/completions" else "text_completion"
    return {
        "id": ident,
        "object": kind,
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(prompt, completion),
    }


def row_error(error_code: str | None, message: str | None) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI error object) for a failed output row."""
    code = error_code or "internal_error"
    if code in _CLIENT_ERRORS:
        status, kind, public = 400, "invalid_request_error", _CLIENT_ERRORS[code]
    else:
        status, kind, public = 500, "server_error", code
    text = message or code.replace("_", " ")
    return status, {"message": text, "type": kind, "param": None, "code": public}


def truncate_at_stop(text: str, stop: str | list[str] | None) -> tuple[str, bool]:
    """`text` cut before the first stop string, and whether a stop string was found."""
    if not stop:
        return text, False
    stops = [stop] if isinstance(stop, str) else [s for s in stop if s]
    cut = min((i for s in stops if (i := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
