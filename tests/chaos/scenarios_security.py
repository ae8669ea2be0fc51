"""Security scenarios: hostile queue messages, password and TLS Redis URLs, secrets in output.

Contract: as in scenarios_workers; every check uses real processes (workers, redis-server,
the `cola-batch` CLI in a subprocess).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from celery import Celery
from harness import QUICK_SAMPLING, Lab, ScenarioResult, audit, live
from scenarios_infra import cli

from cola_batch.schemas.job import JobState
from cola_batch.worker.celery_app import SHARD_TASK_NAME


class _CreatesFile:
    """Unpickling this object creates `path`: proof that a pickle was executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


def hostile_messages(lab: Lab) -> ScenarioResult:
    """A pickled task and a JSON task with a path-traversal job id are pushed onto the shard
    queue: neither is executed, nothing is written, the worker keeps serving real jobs."""
    result = ScenarioResult("hostile queue messages (pickle, path-traversal ids)")
    group = lab.workers()
    marker = lab.root / "pickle-was-executed"
    evil_dir = lab.root / "evil"
    sender = Celery("attacker", broker=lab.url, set_as_current=False)
    sender.conf.update(task_serializer="pickle", accept_content=["pickle", "json"])
    try:
        sender.send_task(
            SHARD_TASK_NAME, args=[_CreatesFile(str(marker))], queue="cola-batch",
            serializer="pickle",
        )  # fmt: skip
        sender.send_task(
            SHARD_TASK_NAME,
            args=[{
                "job_id": "../../../evil", "shard_id": 0, "job_uri": str(evil_dir),
                "input_uri": str(evil_dir / "in.parquet"), "row_start": 0, "row_end": 1,
                "row_count": 1,
            }],
            queue="cola-batch", serializer="json",
        )  # fmt: skip
    finally:
        sender.close()
    result.faults = 2
    time.sleep(5.0)  # both messages are consumed (and refused) within a second or two
    spec, ids = lab.submit(3, shard_size=3, sampling=QUICK_SAMPLING)
    final = lab.wait(spec.job_id, timeout_s=120)
    logs = lab.worker_logs(chars=200_000)
    if marker.exists():
        result.notes.append("the pickled payload was executed")
    if evil_dir.exists():
        result.notes.append("the hostile job_uri was written to")
    if live(group).poll() is not None or final.state is not JobState.COMPLETED:
        result.notes.append(f"worker did not keep serving: job {final.state.value}")
    if "pickle" not in logs:
        result.notes.append("the worker log does not mention the refused pickle message")
    if lab.control.store.r.llen("cola-batch") != 0:
        result.notes.append("a hostile message is still queued")
    result.add(*audit(lab.job_uri(spec), ids))
    return result


def secrets_stay_secret(lab: Lab, password: str) -> ScenarioResult:
    """With a password in the Redis URL (redis://:pw@host), a job runs end to end, and the
    password appears in no worker log and no `status`/`jobs`/`wait` output."""
    result = ScenarioResult("redis://:password@ URL; secrets never printed")
    lab.workers()
    spec, ids = lab.submit(4, shard_size=2, sampling=QUICK_SAMPLING)
    final = lab.wait(spec.job_id, timeout_s=120)
    outputs = [
        cli(lab, "status", spec.job_id), cli(lab, "status", spec.job_id, "--json"),
        cli(lab, "jobs"), cli(lab, "wait", spec.job_id, "--timeout", "5"),
        cli(lab, "status", "job-20000101-000000-000000000000"),
    ]  # fmt: skip
    text = lab.worker_logs(chars=1_000_000) + "".join(o.stdout + o.stderr for o in outputs)
    result.faults = 1
    if password in text:
        result.notes.append("the Redis password was printed")
    if final.state is not JobState.COMPLETED or outputs[0].returncode != 0:
        result.notes.append(f"job {final.state.value}; status exit {outputs[0].returncode}")
    result.add(*audit(lab.job_uri(spec), ids))
    return result


def make_tls_files(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (openssl)."""
    cert, key = directory / "redis.crt", directory / "redis.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


class TlsRedis:
    """A redis-server that listens only on TLS, with a self-signed certificate.

    `url` is `rediss://127.0.0.1:PORT/0?ssl_cert_reqs=required&ssl_ca_certs=CERT` (the
    certificate is checked against itself)."""

    def __init__(self, workdir: Path) -> None:
        from services import find_redis_server, free_port

        self.workdir, self.port, self.binary = workdir, free_port(), find_redis_server()
        self.cert, self.key = make_tls_files(workdir)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0?ssl_cert_reqs=required&ssl_ca_certs={self.cert}"

    def start(self, timeout_s: float = 20.0) -> TlsRedis:
        import redis

        log = (self.workdir / "redis-tls.log").open("wb")
        self.proc = subprocess.Popen(
            [self.binary, "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
             "--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key),
             "--tls-ca-cert-file", str(self.cert), "--tls-auth-clients", "no",
             "--save", "", "--dir", str(self.workdir)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError((self.workdir / "redis-tls.log").read_text()[-2000:])
            try:
                if redis.Redis.from_url(self.url, socket_timeout=1).ping():
                    return self
            except redis.RedisError:
                time.sleep(0.1)
        raise TimeoutError("TLS redis did not answer")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
