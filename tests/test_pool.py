"""`cola-batch pool`: the autoscaling rule, and the pool driving real Celery workers.

The rule (`decide`) is pure and tested on its own: workers = clamp(ceil(backlog / per-worker)),
grown to the lowest recommendation of the scale-up window, shrunk to the highest of the
scale-down window, with starting workers counted as capacity. The integration tests run real
worker processes with a tiny checkpoint against a private Redis.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import typer
from services import free_port
from workers import make_tiny_model, write_prompts

from cola_batch import keys, storage
from cola_batch.jobs import Control, read_results
from cola_batch.schemas.job import JobState
from cola_batch.schemas.sampling import SamplingParams
from cola_batch.settings import Settings
from cola_batch.worker.pool import Pool, pool_slots
from cola_batch.worker.scaling import (
    Observation,
    PoolConfig,
    PoolState,
    decide,
    desired_workers,
)

QUEUES = ["cola-interactive", "cola-batch"]
CONFIG = PoolConfig(
    min_workers=0, max_workers=4, shards_per_worker=2, scale_up_window_s=10, scale_down_window_s=60
)


def run(
    samples: list[tuple[float, int, int]], config: PoolConfig = CONFIG, *, loading: int = 0
) -> list:
    """Feed (time, backlog, workers) observations through decide(); return the decisions."""
    state, out = PoolState(), []
    for now, backlog, workers in samples:
        decision = decide(now, state, Observation(backlog, 0, workers, loading), config)
        state = decision.state
        out.append(decision)
    return out


# ---------------------------------------------------------------------- the rule


def test_desired_workers_is_the_clamped_ceiling_of_backlog_per_worker() -> None:
    assert [desired_workers(b, CONFIG) for b in (0, 1, 2, 3, 7, 8, 9, 1000)] == [
        0, 1, 1, 2, 4, 4, 4, 4,
    ]  # fmt: skip
    floor = PoolConfig(min_workers=1, max_workers=2)
    assert [desired_workers(b, floor) for b in (0, 2, 100)] == [1, 1, 2]


def test_backlog_counts_in_flight_shards_not_only_the_queue() -> None:
    # Every shard is being generated, so the list is empty: the workers are still needed.
    busy = Observation(depth=0, inflight=4, workers=2)
    state = PoolState(((0.0, 2),))
    decision = decide(100.0, state, busy, CONFIG)
    assert (decision.desired, decision.target, decision.action) == (2, 2, "hold")
    assert "0 queued + 4 in flight" in decision.reason


def test_scales_up_from_zero_once_the_backlog_lasts_the_up_window() -> None:
    decisions = run([(0, 5, 0), (4, 5, 0), (9.9, 5, 0), (10, 5, 0)])
    assert [d.target for d in decisions] == [0, 0, 0, 3]
    assert decisions[0].reason.startswith("hold at 0: backlog 5 shards")
    assert "scale up once it lasts 10s (so far 4s)" in decisions[1].reason
    assert decisions[3].action == "up"
    assert decisions[3].reason.startswith("scale up 0->3: backlog 5 shards")


def test_a_blip_of_backlog_starts_nothing() -> None:
    decisions = run([(0, 6, 0), (3, 6, 0), (5, 0, 0), (10, 6, 0), (14, 6, 0), (20, 6, 0)])
    assert [d.target for d in decisions] == [0, 0, 0, 0, 0, 3]


def test_grows_to_the_lowest_recommendation_of_the_window() -> None:
    decisions = run([(0, 8, 1), (5, 3, 1), (10, 8, 1), (15, 8, 2), (20, 8, 2)])
    # At 10 s and 15 s the window still holds the 2 wanted from 5 s to 10 s: grow to 2, not 4;
    # at 20 s 4 were wanted for the whole window.
    assert [d.target for d in decisions] == [1, 1, 2, 2, 4]


def test_a_loading_worker_counts_as_capacity_so_one_backlog_never_starts_two() -> None:
    # Scaled 0 -> 1 for 2 shards; the model takes a minute to load and the backlog stays.
    samples = [(float(t), 2, 1) for t in range(0, 61, 5)]
    decisions = run(samples, loading=1)
    assert {d.target for d in decisions} == {1}
    assert decisions[-1].reason == (
        "hold at 1, 1 loading: backlog 2 shards (2 queued + 0 in flight) needs 1 at 2/worker"
    )
    # More backlog while it loads does start a second one, for that new backlog only.
    more = run([*samples, (65.0, 4, 1), (75.0, 4, 1)], loading=1)
    assert more[-1].target == 2 and more[-1].reason.startswith("scale up 1->2, 1 loading")


def test_holds_during_the_down_window_then_scales_down() -> None:
    busy = [(float(t), 8, 4) for t in range(0, 31, 10)]
    idle = [(float(t), 0, 4) for t in range(40, 101, 10)]
    decisions = run(busy + idle)
    targets = [d.target for d in decisions]
    assert targets == [4] * 10 + [0]  # low since 40 s; 40 + 60 = 100 s: the step down
    assert "scale down once it lasts 60s (so far 50s)" in decisions[9].reason
    assert decisions[10].action == "down"
    assert decisions[10].reason.startswith("scale down 4->0: backlog 0 shards")


def test_shrinks_only_to_the_highest_recommendation_of_the_window() -> None:
    # The backlog fell from 8 to 2 at 40 s and to 0 at 70 s: at 100 s the window [40, 100]
    # still saw 1 worker wanted, so the pool goes 4 -> 1, and to 0 only at 130 s.
    samples = [(0.0, 8, 4), (40.0, 2, 4), (70.0, 0, 4), (100.0, 0, 4), (130.0, 0, 1)]
    assert [d.target for d in run(samples)] == [4, 4, 4, 1, 0]


def test_backlog_returning_during_the_down_window_resets_it() -> None:
    samples = [(0.0, 8, 4), (10.0, 0, 4), (50.0, 8, 4), (60.0, 0, 4), (100.0, 0, 4)]
    assert [d.target for d in run(samples)] == [4] * 5
    assert run([*samples, (120.0, 0, 4)])[-1].target == 0


def test_min_and_max_bound_every_target() -> None:
    bounded = PoolConfig(min_workers=1, max_workers=3, scale_up_window_s=0, scale_down_window_s=0)
    assert run([(0, 1000, 1)], bounded)[0].target == 3
    assert run([(0, 0, 3), (1, 0, 3)], bounded)[-1].target == 1
    below = run([(0, 0, 0)], bounded)[0]  # below --min: no window to wait for
    assert (below.target, below.action) == (1, "up")
    assert below.reason.startswith("scale up 0->1: below --min 1")
    above = run([(0, 1000, 5)], bounded)[0]
    assert (above.target, above.action) == (3, "down")
    assert above.reason == "scale down 5->3: above --max 3"


def test_zero_windows_follow_the_backlog_at_once() -> None:
    eager = PoolConfig(min_workers=0, max_workers=4, scale_up_window_s=0, scale_down_window_s=0)
    assert [d.target for d in run([(0, 3, 0), (1, 0, 2)], eager)] == [2, 0]


def test_config_rejects_impossible_bounds() -> None:
    with pytest.raises(ValueError, match="min"):
        PoolConfig(min_workers=3, max_workers=2)
    with pytest.raises(ValueError, match="shards_per_worker"):
        PoolConfig(min_workers=0, max_workers=2, shards_per_worker=0)


def test_slots_one_per_gpu_or_max_cpu_workers() -> None:
    gpu = pool_slots("0,2", 2)
    assert [(s.name, s.device, s.visible) for s in gpu] == [
        ("gpu0", "cuda", "0"), ("gpu2", "cuda", "2"),
    ]  # fmt: skip
    assert [s.name for s in pool_slots(None, 3)] == ["cpu0", "cpu1", "cpu2"]
    assert {s.visible for s in pool_slots(None, 2)} == {""}  # CPU workers see no GPU
    with pytest.raises(ValueError, match="exceeds the 2 GPU"):
        pool_slots("0,1", 3)


# ---------------------------------------------------------------------- real workers

FAST = SamplingParams(max_new_tokens=8, timesteps=2)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def control(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Control:
    monkeypatch.setenv("COLA_BATCH_REDIS_URL", redis_url)
    return Control.connect(Settings(redis_url=redis_url, default_output=str(tmp_path / "runs")))


def commit_records(job: str) -> list[dict]:
    return [json.loads(storage.read_text(u)) for u in storage.list_files(keys.commits_prefix(job))]


def assert_each_row_once_and_each_shard_run_once(job: str, prompts: Path, shards: int) -> None:
    ids = [json.loads(line)["id"] for line in prompts.read_text().splitlines()]
    assert sorted(read_results(job).column("id").to_pylist()) == sorted(ids)
    records = commit_records(job)
    assert sorted(r["shard_id"] for r in records) == list(range(shards))
    # attempt 1 everywhere: no shard was interrupted by a scale-down and delivered again.
    assert {r["attempt"] for r in records} == {1}


def children(pid: int) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def wait_for(predicate, timeout_s: float, what: str, log: Path | None = None) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
            raise AssertionError(f"timed out waiting for {what}\n{tail}")
        time.sleep(0.2)


def test_pool_command_scales_from_zero_to_max_and_back_without_losing_a_shard(
    control: Control, tiny_model: Path, tmp_path: Path, redis_url: str
) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 16)
    log = tmp_path / "pool.log"
    port = free_port()
    cmd = [
        sys.executable, "-m", "cola_batch.pool_cli", "--model", str(tiny_model),
        "--min", "0", "--max", "2", "--shards-per-worker", "1", "--poll", "0.5",
        "--scale-up-window", "1", "--scale-down-window", "4", "--log-dir", str(tmp_path),
        "--metrics-port", str(port),
    ]  # fmt: skip
    env = {**os.environ, "COLA_BATCH_REDIS_URL": redis_url, "COLA_BATCH_MAX_ATTEMPTS": "3"}
    with log.open("wb") as out:
        pool = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    seen: list[int] = []  # worker process counts over time, deduplicated runs
    workers_ever: set[int] = set()

    def count() -> int:
        now = children(pool.pid)
        workers_ever.update(now)
        if not seen or seen[-1] != len(now):
            seen.append(len(now))
        return len(now)

    try:
        wait_for(lambda: "pool decision" in log.read_text(), 30, "a first decision", log)
        time.sleep(1.5)  # three polls with nothing queued
        assert count() == 0, "an empty queue must start no worker at --min 0"

        spec = control.submit([str(prompts)], model=str(tiny_model), sampling=FAST, shard_size=2)
        wait_for(lambda: count() >= 1, 30, "a first worker", log)
        wait_for(lambda: count() == 2, 60, "two workers", log)
        wait_for(lambda: 'cola_batch_pool_workers{phase="up"} 2.0' in scrape(port), 60,
                 "both workers up in the pool's metrics", log)  # fmt: skip
        assert "cola_batch_pool_desired_workers 2.0" in scrape(port)
        assert 'cola_batch_backlog_shards{queue="cola-batch"}' in scrape(port)
        deadline = time.monotonic() + 120
        while not control.status(spec.job_id).terminal:
            count()
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        wait_for(lambda: count() == 0, 60, "scale-down to zero after the backlog drained", log)
    finally:
        pool.send_signal(signal.SIGTERM)
        try:
            code = pool.wait(timeout=60)
        finally:
            for pid in workers_ever:  # a failed test must not leave workers behind
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
    assert code == 0, log.read_text()[-4000:]
    assert seen[0] == 0 and 2 in seen and seen[-1] == 0, seen

    final = control.status(spec.job_id)
    assert final.state is JobState.COMPLETED
    assert (final.rows_completed, final.shards_completed) == (16, 8)
    assert_each_row_once_and_each_shard_run_once(control.job_uri(spec.job_id), prompts, 8)

    text = log.read_text()
    assert "pool decision: target 0: hold at 0: backlog 0 shards" in text
    assert "scale up 0->" in text
    assert re.search(r"scale down [12]->0: backlog 0 shards .* at most 0 for 4s", text)
    assert "in flight) needs 2 at 1/worker" in text
    assert "holds no shard; warm stop (SIGTERM)" in text
    assert "exited unexpectedly" not in text


def test_a_worker_counts_as_up_only_once_its_model_has_loaded(
    tiny_model: Path, tmp_path: Path, redis_url: str
) -> None:
    """Celery answers pings before the pool process has loaded the model; `up` must wait."""
    config = PoolConfig(min_workers=1, max_workers=1, scale_up_window_s=0, scale_down_window_s=0)
    delay = 6.0
    pool = Pool(model=str(tiny_model), redis_url=redis_url, queues=QUEUES, config=config,
                poll_s=0.3, log_dir=tmp_path,
                extra_env={"COLA_BATCH_FAULT_LOAD_DELAY_S": str(delay)})  # fmt: skip
    try:
        started = time.monotonic()
        wait_for(lambda: pool.step() is not None and pool.counts()["up"] == 1, 90, "worker up")
        assert time.monotonic() - started >= delay
        (log,) = tmp_path.glob("worker-*.log")
        assert "loaded on cpu" in log.read_text()
    finally:
        pool.shutdown()


def test_a_worker_running_a_shard_is_drained_only_after_its_shard_commits(
    control: Control, tiny_model: Path, tmp_path: Path, redis_url: str
) -> None:
    config = PoolConfig(min_workers=1, max_workers=1, scale_up_window_s=0, scale_down_window_s=0)
    env = {"COLA_BATCH_MAX_ATTEMPTS": "3"}
    pool = Pool(model=str(tiny_model), redis_url=redis_url, queues=QUEUES, config=config,
                poll_s=0.3, log_dir=tmp_path, extra_env=env)  # fmt: skip
    try:
        wait_for(lambda: pool.step() is not None and pool.counts()["up"] == 1, 60, "worker up")
        (worker,) = pool.workers
        prompts = write_prompts(tmp_path / "p.jsonl", 6)
        slow = SamplingParams(max_new_tokens=32, timesteps=8)
        spec = control.submit([str(prompts)], model=str(tiny_model), sampling=slow, shard_size=6)
        job = control.job_uri(spec.job_id)
        wait_for(lambda: pool.holding([worker.node]) == {worker.node: 1}, 60, "shard running")

        # Asked for zero workers while the only one runs a shard: it keeps running.
        phases = []
        while worker.proc.poll() is None:
            pool.reap()
            pool.reconcile(0)
            phases.append((worker.phase, bool(storage.list_files(keys.commits_prefix(job)))))
            time.sleep(0.3)
        pool.reap()
    finally:
        pool.shutdown()
    assert phases[0] == ("up", False), phases
    stopped = [committed for phase, committed in phases if phase in ("draining", "stopping")]
    assert stopped and all(stopped), f"stopped before its shard committed: {phases}"
    assert worker.proc.returncode == 0
    assert pool.workers == []
    assert control.wait(spec.job_id, timeout_s=30).state is JobState.COMPLETED
    assert_each_row_once_and_each_shard_run_once(job, prompts, 1)


def test_pool_command_refuses_more_workers_than_gpus(
    redis_url: str, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from cola_batch.pool_cli import register
    from cola_batch.settings import get_settings

    app = typer.Typer()
    register(app)
    args = ["--model", str(tiny_model), "--max", "3", "--gpus", "0,1"]
    monkeypatch.delenv("COLA_BATCH_REDIS_URL", raising=False)
    get_settings.cache_clear()  # the command reads the process-wide settings
    try:
        result = CliRunner().invoke(app, args)
        assert (result.exit_code, result.output) == (
            2, "error: COLA_BATCH_REDIS_URL is not set: the pool's workers need the Redis "
            "jobs go to\n",
        )  # fmt: skip
        monkeypatch.setenv("COLA_BATCH_REDIS_URL", redis_url)
        get_settings.cache_clear()
        result = CliRunner().invoke(app, args)
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2
    assert "error: --max 3 exceeds the 2 GPU(s) in --gpus 0,1" in result.output
