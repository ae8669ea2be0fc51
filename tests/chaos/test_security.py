"""Security (issue 6, item 7): hostile queue messages are refused, password and TLS Redis URLs
work, credentials never appear in logs or CLI output, ids are validated before use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import Lab, PasswordRedis
from scenarios_infra import cli
from scenarios_security import TlsRedis, hostile_messages, secrets_stay_secret

from cola_batch import keys
from cola_batch.jobs import Control
from cola_batch.settings import Settings
from cola_batch.worker.celery_app import make_app
from cola_batch.worker.state import JobStore


def test_pickled_and_path_traversal_messages_are_refused(lab: Lab) -> None:
    result = hostile_messages(lab)
    assert (result.lost, result.duplicated, result.notes) == (0, 0, []), lab.worker_logs()


def test_password_url_works_and_the_password_is_never_printed(
    tmp_path: Path, chaos_model: Path
) -> None:
    password = "s3cret-Chaos-Pw-4242"
    server = PasswordRedis(password, workdir=tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    with Lab(tmp_path / "lab", chaos_model, redis_server=server.start()) as lab:
        assert lab.url.startswith(f"redis://:{password}@")
        result = secrets_stay_secret(lab, password)
    assert (result.lost, result.duplicated, result.notes) == (0, 0, [])


def test_rediss_url_connects_over_tls(tmp_path: Path) -> None:
    try:
        server = TlsRedis(tmp_path).start()
    except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no TLS-capable redis-server/openssl here: {exc}")
    try:
        control = Control(Settings(redis_url=server.url), JobStore.from_url(server.url))
        assert control.store.r.ping()
        control.store.r.set("cola-batch:tls-probe", "1")
        assert control.store.r.connection_pool.connection_class.__name__ == "SSLConnection"
        # The CLI (a fresh process) reaches it too: an unknown job is reported, not a TLS error.
        out = subprocess.run(
            [sys.executable, "-m", "cola_batch.cli", "status", "job-20000101-000000-000000000000"],
            env={**os.environ, "COLA_BATCH_REDIS_URL": server.url},
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert out.returncode == 2 and "is not known to this Redis" in out.stderr, out.stderr
        # The Celery broker connection (kombu) takes the same URL: a task lands on the queue.
        app = make_app(Settings(redis_url=server.url))
        try:
            app.send_task("cola_batch.tls_probe", args=[], queue="tls-probe")
        finally:
            app.close()
        assert control.store.r.llen("tls-probe") == 1
    finally:
        server.close()


@pytest.mark.parametrize(
    "job_id", ["../../etc/passwd", "job-20000101-000000-00000000000g", "job-x/../../y", "a\nb", ""]
)
def test_hostile_job_ids_never_become_keys_or_paths(job_id: str) -> None:
    for make in (keys.job_status_key, keys.shard_attempts_key, lambda j: keys.job_uri("/tmp", j)):
        with pytest.raises(ValueError, match="invalid job id"):
            make(job_id)


def test_cli_refuses_hostile_job_ids_before_touching_storage(lab: Lab, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for args in (["status", "../../etc"], ["resume", "../escape", "--output", str(out)],
                 ["retry", "job-1/../../x"]):  # fmt: skip
        done = cli(lab, *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert "invalid job id" in done.stderr, done.stderr
    assert list(out.iterdir()) == [] and not (tmp_path / "escape").exists()
    assert lab.control.store.r.dbsize() == 0
