"""One JSONL line → (row id, prompt, max_tokens, temperature): plain rows and OpenAI batch lines.

Contract: `parse_line(raw, spec)` decodes one line (UTF-8, one JSON object) or raises `BadLine`
with a code, a reason, the column and a hint, which the reader turns into a rejection naming the
file and line. A line with `custom_id` and `body` is an OpenAI batch request: the prompt is
`body.messages` through `chat.messages_to_prompt`, else `body.prompt`; `body.max_tokens` (or
`max_completion_tokens`) and `body.temperature` become per-row overrides. A plain line takes
its prompt, id and overrides from the fields `JobSpec` names (an absent or null override field
= no override). Types are checked here; override ranges at staging, for every format.
"""

from __future__ import annotations

import json
import math
from typing import Any

from cola_batch.chat import ChatTemplateError, messages_to_prompt
from cola_batch.schemas.job import JobSpec

INT32_MAX = 2**31 - 1  # staged max_tokens is int32
_INT64_MAX = 2**63 - 1


def _int_override(value: Any) -> int | None:
    if value is None or value == 0 and not isinstance(value, bool):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= INT32_MAX:
        raise ValueError("max_tokens must be a positive integer or null")
    return value


def _float_override(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("temperature must be a finite number or null")
    if value < 0:
        raise ValueError("temperature must be >= 0")
    return float(value)


class BadLine(Exception):
    """A line that cannot become a row: (code, reason, column, hint)."""

    def __init__(self, code: str, reason: str, column: str | None = None, hint: str = "") -> None:
        super().__init__(reason)
        self.code, self.reason, self.column, self.hint = code, reason, column, hint


def _row_from_openai(obj: dict[str, Any]) -> tuple[Any, str, int | None, float | None]:
    body = obj["body"]
    if not isinstance(body, dict):
        raise BadLine(
            "wrong_type", "body must be a JSON object", "body", "send the request as an object"
        )
    if "messages" in body and body["messages"] is not None:
        try:
            prompt = messages_to_prompt(body["messages"])
        except ChatTemplateError as exc:
            raise BadLine(
                "bad_messages",
                str(exc),
                "body.messages",
                "give a non-empty list of {role, content} messages",
            ) from exc
    elif "prompt" in body:
        prompt = body["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadLine(
                "wrong_type",
                f"prompt must be a string, got {type(prompt).__name__}",
                "body.prompt",
                "make body.prompt a string",
            )
    else:
        raise BadLine(
            "missing_field",
            "body has neither messages nor prompt",
            "body.messages",
            "every request body needs messages (chat) or prompt",
        )
    try:
        max_tokens = _int_override(body.get("max_completion_tokens", body.get("max_tokens")))
        temperature = _float_override(body.get("temperature"))
    except ValueError as exc:
        raise BadLine("bad_override", str(exc), "body", "fix or remove the field") from exc
    return obj["custom_id"], prompt, max_tokens, temperature


def _row_from_plain(
    obj: dict[str, Any], spec: JobSpec
) -> tuple[Any, Any, int | None, float | None]:
    column = spec.prompt_column
    if column not in obj:
        raise BadLine(
            "missing_field",
            f"no field {column!r}",
            column,
            "name the prompt field with --prompt-column",
        )
    prompt = obj[column]
    if prompt is not None and not isinstance(prompt, str):
        raise BadLine(
            "wrong_type",
            f"prompt must be a string, got {type(prompt).__name__}",
            column,
            "make the prompt a JSON string",
        )
    row_id = None
    if spec.id_column is not None:
        if spec.id_column not in obj:
            raise BadLine(
                "missing_field",
                f"no field {spec.id_column!r}",
                spec.id_column,
                "name the id field with --id-column",
            )
        row_id = obj[spec.id_column]
    max_tokens = _column_override(obj, spec.max_tokens_column, int)
    temperature = _column_override(obj, spec.temperature_column, float)
    return row_id, prompt, max_tokens, temperature


def _column_override(obj: dict[str, Any], column: str | None, kind: type) -> Any:
    """A per-row override field of a plain line: None when unnamed, absent or null.

    Types are checked here; ranges (max_tokens > 0, temperature finite and >= 0) at staging,
    for every format (`stage.py`).
    """
    if column is None or obj.get(column) is None:
        return None
    value = obj[column]
    allowed = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed):
        wanted = "an integer" if kind is int else "a number"
        raise BadLine(
            "wrong_type",
            f"{column} must be {wanted} or null, got {type(value).__name__}",
            column,
            f"make it {wanted} or null",
        )
    if kind is int:
        return max(min(value, _INT64_MAX), -1)  # beyond int64: out of range either way
    return float(value)


def _normalise_id(value: Any, column: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise BadLine(
        "wrong_type",
        f"id must be a string or integer, got {type(value).__name__}",
        column,
        "make every id a JSON string or integer",
    )


def parse_line(raw: bytes, spec: JobSpec) -> tuple[str | None, Any, int | None, float | None]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadLine(
            "invalid_utf8",
            f"invalid UTF-8 at byte {exc.start} of the line",
            hint="re-encode the file as UTF-8",
        ) from exc
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadLine(
            "malformed_json",
            f"malformed JSON ({exc.msg} at column {exc.colno})",
            hint="each line must be one complete JSON object",
        ) from exc
    if not isinstance(obj, dict):
        raise BadLine(
            "not_an_object",
            f"line is a JSON {type(obj).__name__}, not an object",
            hint="each line must be one JSON object",
        )
    if "custom_id" in obj and "body" in obj:
        row_id, prompt, max_tokens, temperature = _row_from_openai(obj)
        return _normalise_id(row_id, "custom_id"), prompt, max_tokens, temperature
    row_id, prompt, max_tokens, temperature = _row_from_plain(obj, spec)
    return _normalise_id(row_id, spec.id_column or "id"), prompt, max_tokens, temperature
