"""Batch input checks and batch output/error files in OpenAI's line formats.

Contract:
* `check_batch_input(context, file_id, endpoint)` reads the uploaded JSONL once (bounded
  memory) and checks what is specific to the OpenAI format before the producer stages it:
  every non-blank line is an object with a string `custom_id`, `method` POST and `url` equal to
  the batch's endpoint (when given), an object `body` with `messages` (chat) or `prompt`
  (completions), no other `model` than the served one, `n` 1 and no `stream`. The first
  problem raises `ApiError(400)` naming the 1-based line (also in the error's `line` field).
  When the served model's chat template is not `openai`, it writes a converted copy (one line
  per input line, so line numbers hold) whose chat bodies carry the rendered `prompt`, and
  returns its local path; otherwise None. Duplicate ids and the remaining row checks are the
  producer's (`Control.submit`), whose `InputError`s name the line too.
* `build_result_files(...)` turns a finished job's rows into an output file (successful rows)
  and an error file (failed rows, and for a cancelled or expired batch the rows that never
  ran), in input order, keyed by `custom_id`. File ids, line ids and request ids derive from
  the batch id and custom_id, so building twice (two servers racing) writes the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from typing import IO, Any

import pyarrow.parquet as pq

from cola_batch import keys, storage
from cola_batch.api.context import ApiContext
from cola_batch.api.errors import ApiError
from cola_batch.api.files import file_uri, register_file
from cola_batch.api.responses import completion_body, row_error
from cola_batch.chat import ChatTemplateError, apply_chat_template
from cola_batch.producer.readers import iter_lines

_BOM = b"\xef\xbb\xbf"


def _line_error(line: int, message: str, code: str) -> ApiError:
    return ApiError(
        400, f"Line {line}: {message}", param="input_file_id", code=code, extra={"line": line}
    )


def _check_body(line: int, obj: Any, endpoint: str, model_name: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise _line_error(line, "each line must be a JSON object", "invalid_line")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise _line_error(line, "custom_id must be a non-empty string", "invalid_custom_id")
    if obj.get("method", "POST") != "POST":
        raise _line_error(line, "method must be POST", "invalid_method")
    if obj.get("url", endpoint) != endpoint:
        raise _line_error(
            line,
            f"url is {obj.get('url')!r} but the batch's endpoint is {endpoint}",
            "mismatched_url",
        )
    body = obj.get("body")
    if not isinstance(body, dict):
        raise _line_error(line, "body must be a JSON object", "invalid_body")
    field = "messages" if endpoint == "/v1/chat/completions" else "prompt"
    if body.get(field) is None:
        raise _line_error(line, f"body.{field} is required for {endpoint}", "missing_field")
    model = body.get("model")
    if model and model != model_name:
        raise _line_error(
            line,
            f"model {model!r} is not served here (this server serves {model_name!r})",
            "model_not_found",
        )
    if body.get("n", 1) not in (1, None):
        raise _line_error(line, "n must be 1", "unsupported_parameter")
    if body.get("stream"):
        raise _line_error(line, "stream is not supported in a batch", "unsupported_parameter")
    return obj


def _lines(handle: IO[bytes], max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, the line without BOM and CR, or None if over-long)."""
    for number, raw, _length in iter_lines(handle, max_bytes):
        if raw is None:
            yield number, None
            continue
        if number == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM) :]
        yield number, raw.rstrip(b"\r")


def check_batch_input(context: ApiContext, file_id: str, endpoint: str) -> str | None:
    template = context.chat_template
    convert = endpoint == "/v1/chat/completions" and template != "openai"
    out: IO[bytes] | None = None
    path = None
    if convert:
        fd, path = tempfile.mkstemp(prefix="cola-batch-input-", suffix=".jsonl")
        out = os.fdopen(fd, "wb")
    limit = context.settings.max_line_bytes
    try:
        with storage.open_input(file_uri(context, file_id)) as handle:
            for number, content in _lines(handle, limit):
                if content is None:
                    raise _line_error(number, f"line is longer than {limit} bytes", "line_too_long")
                if not content.strip():
                    if out is not None:
                        out.write(b"\n")
                    continue
                try:
                    obj = json.loads(content.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    raise _line_error(number, f"not valid JSON ({exc})", "invalid_json") from exc
                obj = _check_body(number, obj, endpoint, context.model_name)
                if out is not None:
                    obj["body"] = _render(number, obj["body"], template)
                    out.write(json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n")
    except BaseException:
        if out is not None:
            out.close()
            assert path is not None
            os.unlink(path)
        raise
    if out is not None:
        out.close()
    return path


def _render(line: int, body: dict[str, Any], template: str) -> dict[str, Any]:
    try:
        prompt = apply_chat_template(body["messages"], template=template)
    except (ChatTemplateError, TypeError) as exc:
        raise _line_error(line, f"body.messages: {exc}", "invalid_messages") from exc
    rendered = {k: v for k, v in body.items() if k != "messages"}
    rendered["prompt"] = prompt
    return rendered


# ---------------------------------------------------------------------- results


def _hash(*parts: str, n: int = 24) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:n]


def result_file_id(batch_id: str, kind: str) -> str:
    return f"file-{_hash(batch_id, kind)}"


def _never_ran(job_uri: str, done: set[str]) -> Iterator[str]:
    """Ids of staged rows that have no output row, in input order."""
    for uri in sorted(storage.list_files(keys.inputs_prefix(job_uri))):
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=["id"])
        for row_id in table.column("id").to_pylist():
            if row_id not in done:
                yield row_id


def build_result_files(
    context: ApiContext,
    *,
    batch_id: str,
    job_id: str,
    endpoint: str,
    created: int,
    unrun_code: str | None,
) -> tuple[str | None, str | None]:
    """Write and register the batch's output and error files; returns their ids (or None).

    `unrun_code` (`batch_cancelled`, `batch_expired`) adds error lines for rows that never ran.
    """
    table = context.control.results_table(job_id)
    # Closed (and removed) in the `finally` below; both stay open while rows stream in.
    spool = {
        kind: tempfile.NamedTemporaryFile("wb", delete=False, suffix=".jsonl")  # noqa: SIM115
        for kind in ("output", "error")
    }
    counts = {"output": 0, "error": 0}
    done: set[str] = set()
    try:
        for batch in table.to_batches(max_chunksize=4096):
            for row in batch.to_pylist():
                custom_id = row["id"]
                done.add(custom_id)
                line_id = f"batch_req_{_hash(batch_id, custom_id)}"
                request_id = f"req_{_hash(batch_id, custom_id, 'request', n=32)}"
                if row["error_code"] is None:
                    prefix = "chatcmpl" if endpoint == "/v1/chat/completions" else "cmpl"
                    body = completion_body(
                        endpoint,
                        ident=f"{prefix}-{_hash(batch_id, custom_id, 'body', n=32)}",
                        created=created,
                        model=context.model_name,
                        text=row["text"] or "",
                        finish_reason=row["finish_reason"],
                        prompt_tokens=row["prompt_tokens"],
                        completion_tokens=row["completion_tokens"],
                    )
                    kind, status = "output", 200
                else:
                    status, error = row_error(row["error_code"], row["error_message"])
                    body, kind = {"error": error}, "error"
                response = {"status_code": status, "request_id": request_id, "body": body}
                _write(
                    spool[kind],
                    {"id": line_id, "custom_id": custom_id, "response": response, "error": None},
                )
                counts[kind] += 1
        if unrun_code is not None:
            message = {
                "batch_cancelled": "The batch was cancelled before this request ran.",
                "batch_expired": "The batch expired before this request ran.",
            }.get(unrun_code, unrun_code)
            for custom_id in _never_ran(context.control.job_uri(job_id), done):
                line = {
                    "id": f"batch_req_{_hash(batch_id, custom_id)}",
                    "custom_id": custom_id,
                    "response": None,
                    "error": {"code": unrun_code, "message": message},
                }
                _write(spool["error"], line)
                counts["error"] += 1
        ids: dict[str, str | None] = {}
        for kind, handle in spool.items():
            handle.close()
            if not counts[kind]:
                ids[kind] = None
                continue
            file_id = result_file_id(batch_id, kind)
            storage.upload_file_atomic(handle.name, file_uri(context, file_id))
            register_file(
                context,
                file_id,
                nbytes=os.path.getsize(handle.name),
                filename=f"{batch_id}_{kind}.jsonl",
                purpose="batch_output",
            )
            ids[kind] = file_id
    finally:
        for handle in spool.values():
            handle.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(handle.name)
    return ids["output"], ids["error"]


def _write(handle: IO[bytes], obj: dict[str, Any]) -> None:
    handle.write(json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n")
