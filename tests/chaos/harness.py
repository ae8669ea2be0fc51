"""The chaos lab: one private Redis, real worker processes, jobs, and the exactly-once audit.

Contract:
* `Lab` owns a private `redis-server` (optionally AOF-persistent or password-protected), an
  output directory and a `Control` bound to them; workers are started through the production
  launcher (`tests/workers.WorkerGroup`). Closing the lab stops every process it started.
* Every wait here is bounded (`deadline`), and raises `TimeoutError` with worker logs.
* `audit(job_uri, ids, samples)` compares the committed results with what was submitted and
  returns (lost, duplicated): the two numbers every scenario must keep at zero.
* Used by the pytest scenarios in tests/chaos and by benchmarks/chaos_report.py alike.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services import RedisServer
from workers import WorkerGroup, make_tiny_model, write_prompts

from cola_batch import keys
from cola_batch.jobs import Control, read_results
from cola_batch.schemas.job import JobSpec, JobStatus
from cola_batch.schemas.sampling import SamplingParams
from cola_batch.settings import Settings
from cola_batch.worker.state import JobStore

QUICK_SAMPLING = SamplingParams(max_new_tokens=8, timesteps=2)
SHORT_SAMPLING = SamplingParams(max_new_tokens=16, timesteps=4)
# Slow enough that a shard of a few rows runs for seconds on a CPU, so a fault lands mid-shard.
SLOW_SAMPLING = SamplingParams(max_new_tokens=48, timesteps=8)

# Worker settings every chaos scenario shares: short visibility timeout so a lost host's shard
# comes back within seconds, and quick storage retries.
CHAOS_WORKER_ENV = {
    "COLA_BATCH_VISIBILITY_TIMEOUT_S": "12",
    "COLA_BATCH_MAX_ATTEMPTS": "3",
    "COLA_BATCH_SOFT_SHUTDOWN_S": "20",
    "COLA_BATCH_STORAGE_BACKOFF_INITIAL_S": "0.05",
    "COLA_BATCH_STORAGE_BACKOFF_MAX_S": "0.5",
}


@dataclass
class ScenarioResult:
    """One row of the reliability table."""

    scenario: str
    trials: int = 0
    faults: int = 0
    lost: int = 0
    duplicated: int = 0
    recover_s: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, lost: int, duplicated: int) -> None:
        self.trials += 1
        self.lost += lost
        self.duplicated += duplicated

    @property
    def recover_text(self) -> str:
        if not self.recover_s:
            return "-"
        values = sorted(self.recover_s)
        median = values[len(values) // 2]
        return f"median {median:.1f} s, max {values[-1]:.1f} s"


def deadline(seconds: float) -> Callable[[], float]:
    """A countdown: calling it returns seconds left and raises TimeoutError at zero."""
    end = time.monotonic() + seconds

    def left() -> float:
        remaining = end - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"gave up after {seconds:.0f} s")
        return remaining

    return left


def tiny_model_dir() -> Path:
    """The tiny random checkpoint, built once per machine user under the temp dir."""
    root = Path(tempfile.gettempdir()) / f"cola-chaos-model-{os.getuid()}" / "tiny"
    return make_tiny_model(root)


class PasswordRedis(RedisServer):
    """`RedisServer` with `requirepass`; its URLs carry the password (redis://:pw@host)."""

    def __init__(self, password: str, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.password = password

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> PasswordRedis:
        self._process.spawn(
            [
                self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.workdir), "--save", "", "--appendonly", "no",
                "--requirepass", self.password,
            ]
        )  # fmt: skip
        import redis

        until = deadline(timeout)
        while True:
            try:
                if redis.Redis.from_url(self.url, socket_timeout=1).ping():
                    return self
            except redis.RedisError:
                until()
                time.sleep(0.05)


class Lab:
    """A private Redis + output directory + job control + worker groups, for one scenario."""

    def __init__(
        self,
        root: Path,
        model: Path,
        *,
        redis_server: Any = None,  # RedisServer, PasswordRedis or TlsRedis, started
        aof: bool = False,
        worker_env: dict[str, str] | None = None,
    ) -> None:
        self.root, self.model = root, model
        root.mkdir(parents=True, exist_ok=True)
        if redis_server is None:  # a started server passed in is used as it is
            (root / "redis").mkdir(exist_ok=True)
            redis_server = RedisServer(aof=aof, workdir=root / "redis").start()
        self.redis = redis_server
        self.url = self.redis.url
        self.output = str(root / "runs")
        self.settings = Settings(redis_url=self.url, default_output=self.output)
        self.control = Control(self.settings, JobStore.from_url(self.url))
        self.worker_env = {**CHAOS_WORKER_ENV, **(worker_env or {})}
        self.groups: list[WorkerGroup] = []
        self._prompt_files = 0

    # ------------------------------------------------------------------ workers

    def workers(self, count: int = 1, env: dict[str, str] | None = None) -> WorkerGroup:
        log_dir = self.root / f"workers-{len(self.groups)}"
        log_dir.mkdir()
        group = WorkerGroup(
            self.model, self.url, log_dir, env={**self.worker_env, **(env or {})}, count=count
        )
        self.groups.append(group)
        return group.start()

    def worker_logs(self, chars: int = 4000) -> str:
        return "\n".join(group.log_text(chars) for group in self.groups)

    def close(self) -> None:
        for group in self.groups:
            with contextlib.suppress(Exception):
                group.stop(timeout_s=5)
            for proc in list(group.procs):
                kill_worker(group, proc)
        self.control.store.r.close()
        self.redis.close()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ jobs

    def prompts(self, count: int, **kwargs: object) -> tuple[Path, list[str]]:
        self._prompt_files += 1
        path = write_prompts(self.root / f"prompts-{self._prompt_files}.jsonl", count, **kwargs)  # type: ignore[arg-type]
        return path, [json.loads(line)["id"] for line in path.read_text().splitlines()]

    def submit(
        self,
        rows: int,
        *,
        shard_size: int,
        sampling: SamplingParams = QUICK_SAMPLING,
        **fields: object,
    ) -> tuple[JobSpec, list[str]]:
        path, ids = self.prompts(rows)
        spec = self.control.submit(
            [str(path)], model=str(self.model), sampling=sampling, shard_size=shard_size, **fields
        )
        return spec, ids

    def job_uri(self, spec: JobSpec) -> str:
        return keys.job_uri(spec.output, spec.job_id)

    def wait(self, job_id: str, timeout_s: float = 180.0) -> JobStatus:
        final = self.control.wait(job_id, timeout_s=timeout_s, poll_s=0.5)
        if not final.terminal:
            raise TimeoutError(f"job {job_id} still {final.state.value}:\n{self.worker_logs()}")
        return final

    def attempts(self, job_id: str) -> dict[str, int]:
        raw = self.control.store.r.hgetall(keys.shard_attempts_key(job_id))
        return {k: int(v) for k, v in raw.items()}

    def committed(self, job_id: str) -> set[str]:
        return set(self.control.store.r.smembers(keys.shard_state_key(job_id, "committed")))

    def wait_running(self, job_id: str, timeout_s: float = 60.0) -> tuple[str, int]:
        """Block until some shard of the job has started and is not committed yet."""
        left = deadline(timeout_s)
        while True:
            done = self.committed(job_id)
            running = {m: a for m, a in self.attempts(job_id).items() if m not in done}
            if running:
                member = max(running, key=lambda m: running[m])
                return member, running[member]
            try:
                left()
            except TimeoutError as exc:
                raise TimeoutError(f"no shard started:\n{self.worker_logs()}") from exc
            time.sleep(0.05)

    def wait_redelivered(self, job_id: str, member: str, attempt: int, timeout_s: float) -> None:
        """Block until shard `member` ("<shard>:<generation>") starts attempt `attempt` + 1,
        or is committed (the kill landed after its commit: the redelivery is a no-op)."""
        left = deadline(timeout_s)
        while self.attempts(job_id).get(member, 0) <= attempt:
            if member in self.committed(job_id):
                return
            try:
                left()
            except TimeoutError as exc:
                raise TimeoutError(f"{member} not redelivered:\n{self.worker_logs()}") from exc
            time.sleep(0.05)

    def wait_progress(self, job_id: str, since: dict[str, int], timeout_s: float) -> float:
        """Seconds until another shard delivery starts (or the job ends)."""
        started = time.monotonic()
        left = deadline(timeout_s)
        while True:
            now = self.attempts(job_id)
            if sum(now.values()) > sum(since.values()):
                return time.monotonic() - started
            status = self.control.store.get(job_id)
            if status is not None and status.terminal:
                return time.monotonic() - started
            left()
            time.sleep(0.05)


# ---------------------------------------------------------------------- audit


def audit(job_uri: str, ids: list[str], samples: int = 1) -> tuple[int, int]:
    """(rows lost, rows duplicated) of a job's committed results against its input."""
    table = read_results(job_uri)
    got = collections.Counter(
        zip(table.column("id").to_pylist(), table.column("sample_index").to_pylist(), strict=True)
    )
    want = {(i, s) for i in ids for s in range(samples)}
    lost = len(want - set(got))
    duplicated = sum(n - 1 for n in got.values() if n > 1) + sum(
        n for key, n in got.items() if key not in want
    )
    return lost, duplicated


def error_codes(job_uri: str) -> collections.Counter[str | None]:
    return collections.Counter(read_results(job_uri).column("error_code").to_pylist())


# ---------------------------------------------------------------------- processes


def pool_children(proc: subprocess.Popen[bytes]) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def kill_worker(group: WorkerGroup, proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a Celery parent and its pool children (children first, so none is orphaned)."""
    del group  # the dead process stays in group.procs: its log stays with the group
    for pid in pool_children(proc):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def live(group: WorkerGroup) -> subprocess.Popen[bytes]:
    """The one running worker process of a group (dead ones stay listed for their logs)."""
    (proc,) = [p for p in group.procs if p.poll() is None]
    return proc


def wait_pool_child(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int:
    left = deadline(timeout_s)
    while not (children := pool_children(proc)):
        left()
        time.sleep(0.05)
    return children[0]
