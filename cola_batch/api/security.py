"""Bearer-token auth and request-size limits.

Contract:
* `require_token` (a dependency on every route but /health) accepts the request when
  `Settings.api_token` is unset, or when the `Authorization` header is exactly `Bearer <token>`
  (constant-time comparison); otherwise 401 with an OpenAI-shaped body.
* `BodyLimit` (ASGI middleware) answers 413 before the app runs when `Content-Length` exceeds
  the limit of the path (`max_upload_bytes` for POST /v1/files, `max_request_bytes` for every
  other path), and stops reading a body without `Content-Length` once it passes the limit.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any

from fastapi import Depends, Request
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cola_batch.api.context import ApiContext, ctx
from cola_batch.api.errors import ApiError, error_body


def require_token(request: Request, context: ApiContext = Depends(ctx)) -> None:
    token = context.settings.api_token
    if token is None or not token.get_secret_value():
        return
    header = request.headers.get("authorization", "")
    expected = f"Bearer {token.get_secret_value()}"
    if not hmac.compare_digest(header.encode("utf-8"), expected.encode("utf-8")):
        raise ApiError(
            401,
            "Invalid or missing bearer token: send the header 'Authorization: Bearer <token>' "
            "with the token cola-batch serve was configured with (COLA_BATCH_API_TOKEN).",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


class BodyLimit:
    """413 for request bodies over the limit `limit_for(path)` returns."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _reject(send, limit)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, _too_large(limit))
            return message

        await self.app(scope, limited, send)


def _too_large(limit: int) -> str:
    return f"Request body is larger than the limit of {limit} bytes."


async def _reject(send: Send, limit: int) -> None:
    body: dict[str, Any] = error_body(
        _too_large(limit), "invalid_request_error", code="request_too_large"
    )
    payload = json.dumps(body).encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
