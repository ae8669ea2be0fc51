"""Chaos scenarios that attack the infrastructure: Redis restarts and object-store faults.

Contract: as in scenarios_workers, each function drives one `Lab` through bounded trials and
returns a `ScenarioResult`; CLI checks run the real `cola-batch` command in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from chaos_proxy import ChaosProxy
from harness import SHORT_SAMPLING, Lab, ScenarioResult, audit, deadline
from services import S3Server

from cola_batch import keys, storage
from cola_batch.schemas.job import JobState


def cli(lab: Lab, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run `cola-batch ARGS` against the lab's Redis; output captured as text."""
    env = {**os.environ, "COLA_BATCH_REDIS_URL": lab.url}
    return subprocess.run(
        [sys.executable, "-m", "cola_batch.cli", *args],
        capture_output=True, text=True, env=env, timeout=timeout_s, check=False,
    )  # fmt: skip


def wait_committed(lab: Lab, job_id: str, count: int, timeout_s: float = 120.0) -> None:
    left = deadline(timeout_s)
    while len(lab.committed(job_id)) < count:
        try:
            left()
        except TimeoutError as exc:
            raise TimeoutError(
                f"fewer than {count} shards committed:\n{lab.worker_logs()}"
            ) from exc
        time.sleep(0.1)


def commit_records(job_uri: str) -> dict[str, bytes]:
    return {
        uri: storage.read_bytes(uri) for uri in storage.list_files(keys.commits_prefix(job_uri))
    }


def redis_restart_aof(lab: Lab, trials: int = 1) -> ScenarioResult:
    """Redis (append-only file, fsync always) is killed -9 and restarted mid-job; the job must
    complete on its own, every row exactly once."""
    result = ScenarioResult("Redis crash + restart (AOF)")
    lab.workers()
    for _ in range(trials):
        spec, ids = lab.submit(12, shard_size=2, sampling=SHORT_SAMPLING)
        wait_committed(lab, spec.job_id, 1)
        lab.redis.kill()
        restarted = time.monotonic()
        lab.redis.start()
        result.faults += 1
        before = lab.attempts(spec.job_id)
        lab.wait_progress(spec.job_id, before, 120)
        result.recover_s.append(time.monotonic() - restarted)
        final = lab.wait(spec.job_id)
        if final.state is not JobState.COMPLETED:
            result.notes.append(f"job ended {final.state.value}")
        result.add(*audit(lab.job_uri(spec), ids))
    return result


def redis_restart_lost(lab: Lab) -> ScenarioResult:
    """Redis without persistence is killed and restarted empty mid-job: `status` must say the
    state was lost (non-zero exit), and `resume` must rebuild the job from object storage and
    finish it without redoing the shards committed before."""
    result = ScenarioResult("Redis crash + restart (no persistence) + resume")
    lab.workers()
    spec, ids = lab.submit(12, shard_size=2, sampling=SHORT_SAMPLING)
    wait_committed(lab, spec.job_id, 2)
    lab.redis.kill()
    lab.redis.start()
    restarted = time.monotonic()
    result.faults += 1
    status = cli(lab, "status", spec.job_id)
    if status.returncode == 0 or "state was lost" not in status.stderr + status.stdout:
        result.notes.append(f"status after loss: exit {status.returncode}: {status.stderr!r}")
    job_uri = lab.job_uri(spec)
    time.sleep(1.0)  # let a shard that was running when Redis died commit first
    before = commit_records(job_uri)
    resumed = cli(lab, "resume", spec.job_id, "--output", spec.output)
    if resumed.returncode != 0:
        result.notes.append(f"resume failed: {resumed.stderr}")
    final = lab.wait(spec.job_id)
    result.recover_s.append(time.monotonic() - restarted)
    if final.state is not JobState.COMPLETED:
        result.notes.append(f"job ended {final.state.value}")
    after = commit_records(job_uri)
    redone = [uri for uri, data in before.items() if after.get(uri) != data]
    if redone:
        result.notes.append(f"committed shards were redone: {redone}")
    result.notes.append(
        f"status exit {status.returncode}; {len(before)} shards committed before resume kept, "
        f"{len(after) - len(before)} run after it"
    )
    result.add(*audit(job_uri, ids))
    return result


# ---------------------------------------------------------------------- object storage


@contextmanager
def s3_through_proxy(lab: Lab, s3: S3Server, proxy: ChaosProxy) -> Iterator[str]:
    """Workers see S3 only through `proxy`; this process (producer, audit) talks to S3 directly.
    Yields a fresh bucket URI."""
    saved = {k: os.environ.get(k) for k in s3.env()}
    os.environ.update(s3.env())
    lab.worker_env.update({**s3.env(), "AWS_ENDPOINT_URL": proxy.endpoint_url})
    try:
        yield s3.create_bucket(f"chaos-{os.getpid()}-{int(time.time() * 1000) % 10**9}")
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def storage_faults(lab: Lab, s3: S3Server, trials: int = 1, *, rate: float = 0.1) -> ScenarioResult:
    """~10 % of the workers' S3 requests fail (503, 1.5 s delay, or reset); jobs complete
    through retries with every row exactly once."""
    result = ScenarioResult("S3 faults: 503 / slow / reset on 10 % of requests")
    with (
        ChaosProxy(s3.s3_port, rate=rate, seed=7) as proxy,
        s3_through_proxy(lab, s3, proxy) as bucket,
    ):
        lab.workers()
        for _ in range(trials):
            spec, ids = lab.submit(
                8, shard_size=2, sampling=SHORT_SAMPLING, output=f"{bucket}/runs"
            )
            final = lab.wait(spec.job_id, timeout_s=240)
            if final.state is not JobState.COMPLETED:
                result.notes.append(f"job ended {final.state.value}")
            result.add(*audit(lab.job_uri(spec), ids))
        result.faults = proxy.faults
        result.notes.append(f"{proxy.requests} worker requests, faults {dict(proxy.injected)}")
    return result


def storage_permanent(lab: Lab, s3: S3Server) -> ScenarioResult:
    """One shard's staged input answers 503 on every request: that shard is dead-lettered after
    the attempt limit with a clear error, the other shards complete, and once storage heals
    `retry` finishes the job with every row exactly once."""
    result = ScenarioResult("S3 permanent failure of one shard, then retry")
    with ChaosProxy(s3.s3_port, rate=0.0) as proxy, s3_through_proxy(lab, s3, proxy) as bucket:
        lab.workers()
        spec, ids = lab.submit(6, shard_size=2, sampling=SHORT_SAMPLING, output=f"{bucket}/runs")
        bad = keys.input_shard_uri(lab.job_uri(spec), 1).split("://", 1)[1]
        proxy.permanent.add("/" + bad.split("/", 1)[1])  # the object key, in the request path
        final = lab.wait(spec.job_id, timeout_s=240)
        result.faults = proxy.faults
        status = lab.control.status(spec.job_id)
        records = commit_records(lab.job_uri(spec))
        error = json.loads(records[keys.commit_record_uri(lab.job_uri(spec), 1)]).get("error", "")
        result.notes.append(
            f"after {proxy.faults} failed reads: job {final.state.value}, "
            f"shards {status.shards_completed} ok / {status.shards_failed} failed; "
            f"error: {error.split('; input unreadable')[0][:160]}"
        )
        ok_before = (final.state, status.shards_completed, status.shards_failed)
        if ok_before != (JobState.FAILED, 2, 1) or "attempts" not in error:
            result.notes.append(f"unexpected outcome before retry: {ok_before}")
        proxy.permanent.clear()
        healed = time.monotonic()
        retried = cli(lab, "retry", spec.job_id)
        if retried.returncode != 0:
            result.notes.append(f"retry failed: {retried.stderr}")
        final = lab.wait(spec.job_id, timeout_s=120)
        result.recover_s.append(time.monotonic() - healed)
        if final.state is not JobState.COMPLETED:
            result.notes.append(f"after retry the job ended {final.state.value}")
        result.add(*audit(lab.job_uri(spec), ids))
    return result
