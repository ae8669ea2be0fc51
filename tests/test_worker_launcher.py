"""`cola-batch worker`'s children live only as long as their launcher.

A real launcher process (the CLI) starts a real Celery worker with a tiny checkpoint against a
private redis-server; the launcher is then SIGKILLed, as an OOM killer or `kill -9` would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from workers import make_tiny_model

VENV_BIN = Path(sys.executable).parent


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[-1][:1] != "Z"


def wait_until(condition: object, timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout_s} s\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def test_a_worker_stops_when_its_launcher_is_killed(redis_url: str, tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "model")
    log = tmp_path / "launcher.log"
    env = {**os.environ, "COLA_BATCH_REDIS_URL": redis_url, "COLA_BATCH_SOFT_SHUTDOWN_S": "2"}
    with log.open("wb") as out:
        launcher = subprocess.Popen(
            [str(VENV_BIN / "cola-batch"), "worker", "--model", str(model)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_until(lambda: b" ready." in log.read_bytes(), 90, "worker ready", log)
        (worker,) = children(launcher.pid)
        pool = children(worker)
        assert pool, "the worker has its prefork pool process"

        launcher.send_signal(signal.SIGKILL)
        launcher.wait(10)

        wait_until(lambda: not alive(worker), 30, "orphaned worker exits", log)
        assert not any(alive(p) for p in pool)
    finally:  # the worker shares the launcher's session: one killpg cleans up both
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
