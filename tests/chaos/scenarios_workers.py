"""Chaos scenarios that attack worker processes: kill -9 mid-shard and SIGTERM mid-shard.

Contract: each function runs `trials` bounded trials inside one `Lab`, asserts nothing itself
beyond what it needs to proceed, and returns a `ScenarioResult` (trials, faults injected, rows
lost, rows duplicated, recovery times) that the pytest tests assert on and the report prints.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time

from harness import (
    SHORT_SAMPLING,
    SLOW_SAMPLING,
    Lab,
    ScenarioResult,
    audit,
    deadline,
    kill_worker,
    live,
    wait_pool_child,
)

from cola_batch import keys, storage
from cola_batch.schemas.job import JobState
from cola_batch.schemas.sampling import SamplingParams


def kill9_mid_shard(
    lab: Lab, trials: int, *, whole_every: int = 4, seed: int = 0
) -> ScenarioResult:
    """kill -9 the pool child running a shard (every `whole_every`-th trial: the Celery parent
    too, then start a replacement) at a random moment of the shard; the job must complete with
    every row exactly once, and the shard must be picked up again within the recovery bound."""
    rng = random.Random(seed)
    result = ScenarioResult("kill -9 worker mid-shard")
    visibility = int(lab.worker_env["COLA_BATCH_VISIBILITY_TIMEOUT_S"])
    group = lab.workers()
    for trial in range(trials):
        whole = whole_every > 0 and trial % whole_every == whole_every - 1
        spec, ids = lab.submit(6, shard_size=3, sampling=SLOW_SAMPLING)
        member, _ = lab.wait_running(spec.job_id)
        time.sleep(rng.uniform(0.0, 0.5))
        before = lab.attempts(spec.job_id)
        proc = live(group)
        if whole:
            kill_worker(group, proc)
        else:
            os.kill(wait_pool_child(proc), signal.SIGKILL)
        killed_at = time.monotonic()
        if member not in lab.committed(spec.job_id):
            result.faults += 1  # the shard was still running when its process died
        if whole:
            group.start_one()
            group.wait_ready()
            bound = visibility + 10 + 60  # timeout + restore scan + worker start on 2 cores
        else:
            bound = 60.0  # the parent requeues at once; a new pool child loads the model
        # Recovery = from the kill until the killed shard is delivered again.
        lab.wait_redelivered(spec.job_id, member, before.get(member, 0), bound)
        result.recover_s.append(time.monotonic() - killed_at)
        final = lab.wait(spec.job_id)
        if final.state is not JobState.COMPLETED:
            result.notes.append(f"trial {trial}: job ended {final.state.value}")
        result.add(*audit(lab.job_uri(spec), ids))
    result.notes.append(
        f"{result.faults} of {trials} kills landed mid-shard (the rest just after a commit)"
    )
    return result


LONG_SAMPLING = SamplingParams(max_new_tokens=128, timesteps=16)


def sigterm_mid_shard(lab: Lab, *, seed: int = 0) -> ScenarioResult:
    """SIGTERM a worker mid-shard, twice: with a grace period longer than the shard (the shard
    finishes and commits before the worker exits), and with a grace period shorter than the
    shard (the worker exits after the grace period and the shard is back on the queue at once,
    not after the visibility timeout)."""
    rng = random.Random(seed)
    result = ScenarioResult("SIGTERM worker mid-shard")

    # 1. Grace period long enough: the running shard finishes, then the worker exits.
    grace = 15
    group = lab.workers(env={"COLA_BATCH_SOFT_SHUTDOWN_S": str(grace)})
    spec, ids = lab.submit(2, shard_size=2, sampling=SHORT_SAMPLING)
    member, _ = lab.wait_running(spec.job_id)
    proc = live(group)
    pid = wait_pool_child(proc)
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    result.faults += 1
    proc.wait(timeout=grace + 30)
    exited = time.monotonic() - signalled
    record = json.loads(
        storage.read_text(keys.commit_record_uri(lab.job_uri(spec), int(member.split(":")[0])))
    )
    if record["pid"] != pid or record["attempt"] != 1:
        result.notes.append(f"grace: shard committed by pid {record['pid']}, not {pid}")
    result.notes.append(
        f"grace {grace} s: shard committed by the stopping worker; it exited after {exited:.1f} s"
    )
    final = lab.wait(spec.job_id, timeout_s=10)
    if final.state is not JobState.COMPLETED:
        result.notes.append(f"grace: job ended {final.state.value}")
    result.add(*audit(lab.job_uri(spec), ids))

    # 2. Grace period too short: cold shutdown requeues the running shard at once.
    env = {"COLA_BATCH_SOFT_SHUTDOWN_S": "1", "COLA_BATCH_VISIBILITY_TIMEOUT_S": "600"}
    group = lab.workers(env=env)
    # A shard of several seconds even on an idle machine, so it outlives the 1 s grace.
    spec, ids = lab.submit(16, shard_size=16, sampling=LONG_SAMPLING)
    member, _ = lab.wait_running(spec.job_id)
    time.sleep(rng.uniform(0.2, 1.0))
    proc = live(group)
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    result.faults += 1
    proc.wait(timeout=60)
    exited = time.monotonic() - signalled
    left = deadline(30)
    r = lab.control.store.r
    while not (r.llen(spec.queue) > 0 and r.hlen("unacked") == 0):
        if member in lab.committed(spec.job_id):
            result.notes.append("short grace: the shard finished within 1 s; nothing to requeue")
            break
        left()
        time.sleep(0.05)
    else:
        requeued = time.monotonic() - signalled
        result.recover_s.append(requeued)
        result.notes.append(
            f"grace 1 s: worker exited after {exited:.1f} s, shard back on the queue "
            f"after {requeued:.1f} s"
        )
    before = lab.attempts(spec.job_id)
    lab.workers()
    lab.wait_progress(spec.job_id, before, 60)
    final = lab.wait(spec.job_id)
    if final.state is not JobState.COMPLETED:
        result.notes.append(f"short grace: job ended {final.state.value}")
    result.add(*audit(lab.job_uri(spec), ids))
    return result
