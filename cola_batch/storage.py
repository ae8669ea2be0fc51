"""Object-storage access through fsspec: local paths, file:// and s3:// (s3fs).

Contract:
* Whole files appear atomically (design invariant 3). Local: a temporary file in the same
  directory, fsync, then `os.replace`. S3: one PUT, or a multipart upload that is completed
  only after every part succeeded (aborted otherwise). Readers never see half a file.
* `write_if_absent` creates a file only if nothing is there. Local: `os.link` of a complete
  temporary file (atomic, exactly one concurrent winner). S3: a conditional PUT with
  `If-None-Match: *` (AWS S3, SeaweedFS, MinIO support it: exactly one winner). When the
  server answers NotImplemented, or `Settings.s3_conditional_put` is off, it falls back to
  check-then-put, which has a race window: best effort only. False means "already there";
  it can also mean an earlier, seemingly failed attempt of the same call created it.
* Every call retries transient errors (connection failures, timeouts, 5xx, throttling) with
  exponential backoff and jitter (`RetryPolicy`, from Settings by default); permanent errors
  (not found, access denied, bad request) raise at once. The classification lives in
  `cola_batch.retries` (re-exported here).
* S3 endpoint, region and credentials come from the standard AWS variables
  (AWS_ENDPOINT_URL[_S3], AWS_REGION/AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID,
  AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, or botocore's other sources). Credentials are never
  logged; URIs are logged through `redact`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from cola_batch.retries import (
    RetryPolicy,
    error_chain,
    is_transient,
    redact,
    s3_error_code,
    with_retries,
)
from cola_batch.settings import Settings, get_settings

log = logging.getLogger(__name__)
__all__ = ["RetryPolicy", "is_transient", "redact", "with_retries"]  # re-exported

# ---------------------------------------------------------------- URIs


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def normalize_uri(uri: str) -> str:
    """Canonical form: absolute local path (no scheme), or `scheme://bucket/key` without a
    trailing slash. Relative local paths resolve against the current directory, because
    workers run elsewhere."""
    if not uri:
        raise ValueError("empty URI")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" not in uri:
        return os.path.abspath(os.path.expanduser(uri))
    scheme, rest = uri.split("://", 1)
    scheme = {"s3a": "s3", "s3n": "s3"}.get(scheme.lower(), scheme.lower())
    return f"{scheme}://{rest.rstrip('/')}"


def _s3_settings_from_env() -> tuple[tuple[str, ...], dict[str, Any]]:
    env = os.environ
    client_kwargs: dict[str, Any] = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        client_kwargs["region_name"] = region
    options: dict[str, Any] = {
        "client_kwargs": client_kwargs,
        # Our RetryPolicy is the one retry layer that callers configure; botocore's own
        # retries would multiply it.
        "config_kwargs": {
            "retries": {"max_attempts": 1, "mode": "standard"},
            "connect_timeout": 10,
            "read_timeout": 60,
        },
    }
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    token = env.get("AWS_SESSION_TOKEN")
    if key and secret:
        options.update(key=key, secret=secret, token=token)
    # The cache identity holds a digest of the secret, never the secret itself.
    secret_digest = hashlib.sha256((secret or "").encode()).hexdigest()[:16]
    identity = (endpoint or "", region or "", key or "", secret_digest, token and "t" or "")
    return identity, options


_S3_CACHE: dict[tuple[Any, ...], Any] = {}


def _s3_filesystem() -> Any:
    identity, options = _s3_settings_from_env()
    cache_key = (os.getpid(), *identity)  # s3fs clients must not cross a fork
    fs = _S3_CACHE.get(cache_key)
    if fs is None:
        import s3fs  # noqa: PLC0415 - only needed for s3:// URIs

        fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
        fs.retries = 3  # s3fs's inner retry of dropped connections during one request
        _S3_CACHE[cache_key] = fs
    return fs


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem serving `uri` and the path inside it."""
    uri = normalize_uri(uri)
    if "://" not in uri:
        return LocalFileSystem(), uri
    scheme, path = uri.split("://", 1)
    if scheme == "s3":
        return _s3_filesystem(), path
    fs, fs_path = fsspec.core.url_to_fs(uri)
    return fs, fs_path


def _full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    if isinstance(fs, LocalFileSystem):
        return path
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    return f"{protocol}://{path}"


# ---------------------------------------------------------------- reads


def exists(uri: str, *, retry: RetryPolicy | None = None) -> bool:
    fs, path = filesystem(uri)
    return with_retries("exists", uri, lambda: bool(fs.exists(path)), retry)


def read_bytes(uri: str, *, retry: RetryPolicy | None = None) -> bytes:
    fs, path = filesystem(uri)
    return with_retries("read", uri, lambda: bytes(fs.cat_file(path)), retry)


def read_text(uri: str, *, retry: RetryPolicy | None = None) -> str:
    return read_bytes(uri, retry=retry).decode("utf-8")


def size(uri: str, *, retry: RetryPolicy | None = None) -> int:
    fs, path = filesystem(uri)
    return with_retries("size", uri, lambda: int(fs.size(path)), retry)


def list_files(prefix: str, *, retry: RetryPolicy | None = None) -> list[str]:
    """Full URIs of the files directly under `prefix`, sorted; [] if there is none."""
    fs, path = filesystem(prefix)

    def run() -> list[str]:
        try:
            entries = fs.ls(path.rstrip("/"), detail=True, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(_full_uri(fs, e["name"]) for e in entries if e.get("type") == "file")

    if not isinstance(fs, LocalFileSystem):
        fs.invalidate_cache(path)
    return with_retries("list", prefix, run, retry)


@contextlib.contextmanager
def open_input(uri: str, *, retry: RetryPolicy | None = None) -> Iterator[IO[bytes]]:
    """A streaming, seekable binary reader. Opening is retried; s3fs retries dropped reads."""
    fs, path = filesystem(uri)
    handle = with_retries("open", uri, lambda: fs.open(path, "rb"), retry)
    try:
        yield handle
    finally:
        handle.close()


# ---------------------------------------------------------------- writes


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _local_temp(path: str, write: Callable[[IO[bytes]], None]) -> str:
    """Write a complete, fsynced temporary sibling of `path`; return its name."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def _local_replace(path: str, write: Callable[[IO[bytes]], None]) -> None:
    tmp = _local_temp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(os.path.dirname(path) or ".")


def write_bytes_atomic(uri: str, data: bytes, *, retry: RetryPolicy | None = None) -> None:
    """Create or replace `uri` with `data`; readers see the old file or the new, never half."""
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        with_retries("write", uri, lambda: _local_replace(path, lambda h: h.write(data)), retry)
        return
    # s3fs: a single PUT below 100 MB, else a multipart upload completed at the end.
    with_retries("write", uri, lambda: fs.pipe_file(path, data), retry)


def write_text_atomic(uri: str, text: str, *, retry: RetryPolicy | None = None) -> None:
    write_bytes_atomic(uri, text.encode("utf-8"), retry=retry)


def upload_file_atomic(local_path: str, uri: str, *, retry: RetryPolicy | None = None) -> None:
    """Copy a local file to `uri` atomically without loading it into memory."""
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):

        def copy(handle: IO[bytes]) -> None:
            with open(local_path, "rb") as src:
                shutil.copyfileobj(src, handle, 1 << 20)

        with_retries("upload", uri, lambda: _local_replace(path, copy), retry)
        return
    with_retries("upload", uri, lambda: fs.put_file(local_path, path), retry)


def _local_create_once(path: str, data: bytes) -> bool:
    tmp = _local_temp(path, lambda h: h.write(data))
    try:
        os.link(tmp, path)  # fails with FileExistsError if anything is already there
        _fsync_dir(os.path.dirname(path) or ".")
        return True
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


class _NoConditionalPut(Exception):
    """The S3 server does not implement If-None-Match on PUT."""


def _s3_create_once(fs: Any, path: str, data: bytes) -> bool:
    bucket, key, _ = fs.split_path(path)
    try:
        fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except Exception as exc:
        for err in error_chain(exc):
            s3 = s3_error_code(err)
            if s3 is None:
                continue
            code, status = s3
            if code == "PreconditionFailed" or status == 412:
                return False
            if code == "NotImplemented" or status == 501:
                raise _NoConditionalPut() from exc
        raise
    fs.invalidate_cache(path)
    return True


def write_if_absent(
    uri: str,
    data: bytes,
    *,
    retry: RetryPolicy | None = None,
    settings: Settings | None = None,
) -> bool:
    """Create `uri` with `data` unless it exists. True if this call created it."""
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        return with_retries("create", uri, lambda: _local_create_once(path, data), retry)
    conditional = (settings or get_settings()).s3_conditional_put
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if conditional and "s3" in protocols:
        try:
            return with_retries("create", uri, lambda: _s3_create_once(fs, path, data), retry)
        except _NoConditionalPut:
            log.warning(
                "storage: %s does not support conditional PUT; falling back to "
                "check-then-put (not race-free)",
                redact(uri),
            )

    def check_then_put() -> bool:
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
        return True

    return with_retries("create", uri, check_then_put, retry)


def delete(uri: str, *, recursive: bool = False, retry: RetryPolicy | None = None) -> None:
    """Remove a file (or a prefix with recursive=True); missing targets are not an error."""
    fs, path = filesystem(uri)

    def run() -> None:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path, recursive=recursive)

    with_retries("delete", uri, run, retry)
