"""OpenAI Files: upload, look up and download files (`/v1/files`).

Contract: a file is bytes at `keys.api_file_uri(api_base, file_id)` on object storage plus a
small Redis hash (`keys.api_file_key`) with its OpenAI fields; file ids are `file-<24 hex>`,
checked by `check_file_id` before they reach a key or path (client file names never do).
Uploads accept purpose `batch` only and stream to a local spool first, so memory stays small;
the bytes appear on storage atomically. Batch output and error files are registered through
`register_file` with purpose `batch_output`. `DELETE /v1/files/{id}` removes the metadata first
(the file is gone for every reader at once), then the bytes; a batch that already started keeps
its own staged copy of its input.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from cola_batch import keys, storage
from cola_batch.api.context import ApiContext, ctx
from cola_batch.api.errors import ApiError, not_found

FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
PURPOSES = ("batch",)
router = APIRouter()


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


def check_file_id(file_id: str, param: str | None = None) -> str:
    if not isinstance(file_id, str) or not FILE_ID.fullmatch(file_id):
        raise not_found("file", str(file_id)[:80], param)
    return file_id


def file_object(meta: dict[str, str]) -> dict[str, Any]:
    return {
        "id": meta["id"],
        "object": "file",
        "bytes": int(meta["bytes"]),
        "created_at": int(meta["created_at"]),
        "filename": meta.get("filename", ""),
        "purpose": meta.get("purpose", "batch"),
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def register_file(
    context: ApiContext, file_id: str, *, nbytes: int, filename: str, purpose: str
) -> dict[str, str]:
    """Record metadata of a file whose bytes are already at `api_file_uri(...)`."""
    created = int(time.time())
    meta = {
        "id": check_file_id(file_id),
        "bytes": str(nbytes),
        "created_at": str(created),
        "filename": filename,
        "purpose": purpose,
    }
    pipe = context.redis.pipeline()
    pipe.hset(keys.api_file_key(file_id), mapping=meta)
    pipe.zadd(keys.api_files_index_key(), {file_id: created})
    pipe.execute()
    return meta


def get_file(context: ApiContext, file_id: str, param: str | None = None) -> dict[str, str]:
    meta: dict[str, str] = context.redis.hgetall(keys.api_file_key(check_file_id(file_id, param)))
    if not meta:
        raise not_found("file", file_id, param)
    return meta


def file_uri(context: ApiContext, file_id: str) -> str:
    return keys.api_file_uri(context.api_base, check_file_id(file_id))


def _spool(upload: UploadFile, limit: int) -> tuple[str, int]:
    fd, path = tempfile.mkstemp(prefix="cola-upload-")
    total = 0
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := upload.file.read(1 << 20):
                total += len(chunk)
                if total > limit:
                    raise ApiError(
                        413,
                        f"File is larger than the limit of {limit} bytes.",
                        param="file",
                        code="file_too_large",
                    )
                out.write(chunk)
    except BaseException:
        os.unlink(path)
        raise
    return path, total


@router.post("/v1/files")
def create_file(
    file: UploadFile = File(...),
    purpose: str = Form(...),
    context: ApiContext = Depends(ctx),
) -> dict[str, Any]:
    if purpose not in PURPOSES:
        raise ApiError(
            400,
            f"Purpose '{purpose}' is not supported here; cola-batch accepts: "
            + ", ".join(PURPOSES),
            param="purpose",
            code="invalid_purpose",
        )
    path, nbytes = _spool(file, context.settings.max_upload_bytes)
    try:
        if nbytes == 0:
            raise ApiError(400, "The uploaded file is empty.", param="file", code="empty_file")
        file_id = new_file_id()
        storage.upload_file_atomic(path, file_uri(context, file_id))
    finally:
        os.unlink(path)
    name = os.path.basename(file.filename or "upload.jsonl")[:255]
    return file_object(
        register_file(context, file_id, nbytes=nbytes, filename=name, purpose=purpose)
    )


@router.get("/v1/files")
def list_files(
    limit: int = Query(100, ge=1, le=10_000),
    purpose: str | None = None,
    context: ApiContext = Depends(ctx),
) -> dict[str, Any]:
    ids = context.redis.zrevrange(keys.api_files_index_key(), 0, limit - 1)
    data = []
    for file_id in ids:
        meta = context.redis.hgetall(keys.api_file_key(file_id))
        if meta and (purpose is None or meta.get("purpose") == purpose):
            data.append(file_object(meta))
    return {"object": "list", "data": data, "has_more": False}


@router.get("/v1/files/{file_id}")
def retrieve_file(file_id: str, context: ApiContext = Depends(ctx)) -> dict[str, Any]:
    return file_object(get_file(context, file_id))


@router.delete("/v1/files/{file_id}")
def delete_file(file_id: str, context: ApiContext = Depends(ctx)) -> dict[str, Any]:
    get_file(context, file_id)
    pipe = context.redis.pipeline()
    pipe.delete(keys.api_file_key(file_id))
    pipe.zrem(keys.api_files_index_key(), file_id)
    removed = pipe.execute()[0]
    if not removed:  # a concurrent delete got there first
        raise not_found("file", file_id)
    storage.delete(file_uri(context, file_id))
    return {"id": file_id, "object": "file", "deleted": True}


def _chunks(uri: str) -> Iterator[bytes]:
    with storage.open_input(uri) as handle:
        while chunk := handle.read(1 << 20):
            yield chunk


@router.get("/v1/files/{file_id}/content")
def file_content(file_id: str, context: ApiContext = Depends(ctx)) -> StreamingResponse:
    meta = get_file(context, file_id)
    return StreamingResponse(
        _chunks(file_uri(context, file_id)),
        media_type="application/octet-stream",
        headers={"content-length": meta["bytes"]},
    )
