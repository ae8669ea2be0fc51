"""Retries of object-storage calls: which errors are transient, and how patiently to retry.

Contract:
* `is_transient(exc)` is True for connection failures, timeouts, HTTP 5xx / 429 and S3
  throttling codes anywhere in the exception's cause chain, and False for permanent errors
  (not found, access denied, bad request) — those must raise at once.
* `with_retries(op, uri, fn, retry)` runs `fn` with exponential backoff and jitter under a
  `RetryPolicy` (from Settings by default), logging each retry with the URI redacted, and
  re-raises the last error. tenacity does the retrying; this module only classifies.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from cola_batch.settings import Settings, get_settings

log = logging.getLogger("cola_batch.storage")
T = TypeVar("T")


def redact(uri: str) -> str:
    """`uri` without any user:password part, safe to log."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


_PERMANENT = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
_TRANSIENT_ERRNOS = {
    errno.EIO,
    errno.EAGAIN,
    errno.EINTR,
    errno.ECONNRESET,
    errno.ETIMEDOUT,
    errno.ECONNREFUSED,
    errno.EPIPE,
    errno.ESTALE,
    errno.EBUSY,
}
_TRANSIENT_S3_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "ConditionalRequestConflict",
    "OperationAborted",
}


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently one storage call is retried."""

    retries: int = 5
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            settings.storage_retries,
            settings.storage_backoff_initial_s,
            settings.storage_backoff_max_s,
        )


def _policy(retry: RetryPolicy | None) -> RetryPolicy:
    return retry if retry is not None else RetryPolicy.from_settings(get_settings())


# ---------------------------------------------------------------- retries


def error_chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then its causes and contexts (each once): wrappers hide the botocore error."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def s3_error_code(exc: BaseException) -> tuple[str, int] | None:
    """(S3 error code, HTTP status) of a botocore ClientError, else None."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def is_transient(exc: BaseException) -> bool:
    """Whether retrying `exc` can help: connection trouble, timeouts, 5xx, throttling."""
    for err in error_chain(exc):
        s3 = s3_error_code(err)
        if s3 is not None:
            code, status = s3
            return status >= 500 or status == 429 or code in _TRANSIENT_S3_CODES
        if isinstance(err, _PERMANENT):
            return False
        if isinstance(err, TimeoutError | ConnectionError):
            return True
        module = type(err).__module__
        if module.startswith(("botocore", "aiobotocore", "aiohttp", "urllib3")):
            name = type(err).__name__
            if any(
                word in name
                for word in (
                    "Connection",
                    "Timeout",
                    "HTTPClient",
                    "ResponseParser",
                    "IncompleteRead",
                    "Streaming",
                    "Payload",
                    "ServerDisconnected",
                )
            ):
                return True
        if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
            return True
    return False


def _log_retry(op: str, uri: str) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "storage %s %s: attempt %d failed (%s: %s); retrying",
            op,
            redact(uri),
            state.attempt_number,
            type(exc).__name__,
            str(exc)[:200],
        )

    return before_sleep


def with_retries(op: str, uri: str, fn: Callable[[], T], retry: RetryPolicy | None = None) -> T:
    """Run `fn`, retrying transient failures under `retry` (Settings-derived by default)."""
    policy = _policy(retry)
    retrying = Retrying(
        stop=stop_after_attempt(policy.retries + 1),
        wait=wait_exponential_jitter(
            multiplier=policy.backoff_initial_s,
            max=policy.backoff_max_s,
            jitter=policy.backoff_initial_s,
        ),
        retry=retry_if_exception(is_transient),
        before_sleep=_log_retry(op, uri),
        reraise=True,
    )
    return retrying(fn)
