"""Job state in Redis: status, counters, shard outcomes, attempts, cancel flag, finaliser lock.

Contract:
* Redis holds O(shards) small values per job, never rows (keys in `cola_batch.keys`).
* Counters change only through `record_shard`, a Lua script that counts a (shard, generation)
  outcome exactly once however often a shard is delivered, run or committed concurrently.
* State changes go through `transition`, which applies `JobStatus.transition`'s rules inside a
  WATCH/MULTI transaction, so two processes cannot both move a job out of the same state.
* Object storage, not Redis, is the source of truth for what is done; `cola_batch.worker.recovery`
  rebuilds this state from storage when Redis lost it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import redis

from cola_batch import keys
from cola_batch.keys import ShardState
from cola_batch.schemas.job import JobSpec, JobState, JobStatus, ShardTask

COUNTER_FIELDS = (
    "rows_completed",
    "rows_failed",
    "shards_completed",
    "shards_failed",
    "prompt_tokens",
    "completion_tokens",
)

# KEYS: committed set, dead set, counters hash.
# ARGV: member ("<shard>:<generation>"), outcome ("committed"|"dead"), rows_ok, rows_failed,
#       prompt_tokens, completion_tokens, shard_failed (0/1).
# Returns 1 if this call counted the outcome, 0 if it had been counted before.
_RECORD_SHARD = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1
   or redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then
  return 0
end
if ARGV[2] == 'dead' then
  redis.call('SADD', KEYS[2], ARGV[1])
else
  redis.call('SADD', KEYS[1], ARGV[1])
end
redis.call('HINCRBY', KEYS[3], 'rows_completed', ARGV[3])
redis.call('HINCRBY', KEYS[3], 'rows_failed', ARGV[4])
redis.call('HINCRBY', KEYS[3], 'prompt_tokens', ARGV[5])
redis.call('HINCRBY', KEYS[3], 'completion_tokens', ARGV[6])
if ARGV[7] == '1' then
  redis.call('HINCRBY', KEYS[3], 'shards_failed', 1)
else
  redis.call('HINCRBY', KEYS[3], 'shards_completed', 1)
end
return 1
"""


def shard_member(shard_id: int, generation: int) -> str:
    return f"{shard_id}:{generation}"


def _commit_shard(record: dict) -> tuple[str, int, int]:
    """(job id, shard id, generation) of a commit record."""
    return record["job_id"], record["shard_id"], record["generation"]


def _commit_counts(record: dict) -> dict[str, int]:
    """The counter deltas a commit record carries (keyword arguments of record/forget_shard)."""
    names = ("rows_ok", "rows_failed", "prompt_tokens", "completion_tokens")
    return {name: record[name] for name in names}


class JobStore:
    """Typed access to one Redis database's job state."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._record = client.register_script(_RECORD_SHARD)

    @classmethod
    def from_url(cls, url: str) -> JobStore:
        return cls(redis.Redis.from_url(url, decode_responses=True, health_check_interval=30))

    # ------------------------------------------------------------------ creation and reads

    def create(self, status: JobStatus, *, job_uri: str, queue: str) -> None:
        """Store a new job's status (state `validating` or later) and index it."""
        created = status.timestamps.get(JobState.VALIDATING) or datetime.now(UTC)
        pipe = self.r.pipeline()
        pipe.delete(*keys.job_keys(status.job_id))
        pipe.hset(keys.job_status_key(status.job_id), mapping=_status_fields(status))
        pipe.hset(keys.job_status_key(status.job_id), mapping={"job_uri": job_uri, "queue": queue})
        pipe.hset(keys.job_counters_key(status.job_id), mapping=dict.fromkeys(COUNTER_FIELDS, 0))
        pipe.zadd(keys.job_index_key(), {status.job_id: created.timestamp()})
        pipe.execute()

    def set_totals(self, job_id: str, *, rows_total: int, shards_total: int) -> None:
        self.r.hset(
            keys.job_status_key(job_id),
            mapping={"rows_total": rows_total, "shards_total": shards_total},
        )

    def exists(self, job_id: str) -> bool:
        return bool(self.r.exists(keys.job_status_key(job_id)))

    def get(self, job_id: str) -> JobStatus | None:
        pipe = self.r.pipeline()
        pipe.hgetall(keys.job_status_key(job_id))
        pipe.hgetall(keys.job_counters_key(job_id))
        raw, counters = pipe.execute()
        if not raw:
            return None
        return _status_from_fields(job_id, raw, counters)

    def field(self, job_id: str, name: str) -> str | None:
        return self.r.hget(keys.job_status_key(job_id), name)

    def recent(self, limit: int = 20) -> list[str]:
        return list(self.r.zrevrange(keys.job_index_key(), 0, max(limit - 1, 0)))

    def expire(self, job_id: str, after_s: int) -> None:
        """Drop the job from the index now and let its keys expire after `after_s` seconds."""
        pipe = self.r.pipeline()
        pipe.zrem(keys.job_index_key(), job_id)
        for key in keys.job_keys(job_id):
            pipe.expire(key, after_s)
        pipe.execute()

    # ------------------------------------------------------------------ state machine

    def transition(
        self,
        job_id: str,
        dst: JobState,
        *,
        error: str | None = None,
        only_from: set[JobState] | None = None,
    ) -> bool:
        """Move the job to `dst` if allowed (and, if given, only from `only_from`).

        Returns False, changing nothing, when the current state does not allow it.
        """
        key = keys.job_status_key(job_id)
        with self.r.pipeline() as pipe:
            for _ in range(50):
                try:
                    pipe.watch(key)
                    raw = pipe.hgetall(key)
                    if not raw:
                        return False
                    current = _status_from_fields(job_id, raw, {})
                    if only_from is not None and current.state not in only_from:
                        return False
                    try:
                        new = current.transition(dst, error=error)
                    except ValueError:
                        return False
                    stale = [
                        name
                        for name in raw
                        if name.startswith("ts_") and JobState(name[3:]) not in new.timestamps
                    ]
                    if new.error is None:
                        stale.append("error")
                    pipe.multi()
                    pipe.hset(key, mapping=_status_fields(new))
                    if stale:
                        pipe.hdel(key, *stale)
                    pipe.publish(keys.job_events_channel(job_id), dst.value)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue
        raise RuntimeError(f"job {job_id}: could not change state after 50 contended tries")

    def mark_running(self, job_id: str) -> None:
        """queued → in_progress, once, when the first shard starts."""
        self.transition(job_id, JobState.IN_PROGRESS, only_from={JobState.QUEUED})

    # ------------------------------------------------------------------ shards

    def begin_attempt(self, job_id: str, shard_id: int, generation: int) -> int:
        """Count one delivery of a shard; returns the attempt number (1 = first)."""
        return int(
            self.r.hincrby(keys.shard_attempts_key(job_id), shard_member(shard_id, generation), 1)
        )

    def is_recorded(self, job_id: str, shard_id: int, generation: int) -> bool:
        member = shard_member(shard_id, generation)
        pipe = self.r.pipeline()
        pipe.sismember(keys.shard_state_key(job_id, ShardState.COMMITTED), member)
        pipe.sismember(keys.shard_state_key(job_id, ShardState.DEAD), member)
        return any(pipe.execute())

    def record_shard(
        self,
        job_id: str,
        shard_id: int,
        generation: int,
        *,
        rows_ok: int,
        rows_failed: int,
        prompt_tokens: int,
        completion_tokens: int,
        dead: bool = False,
    ) -> bool:
        """Count a shard's committed outcome; True only for the first caller."""
        shard_failed = dead or (rows_ok == 0 and rows_failed > 0)
        counted = self._record(
            keys=[
                keys.shard_state_key(job_id, ShardState.COMMITTED),
                keys.shard_state_key(job_id, ShardState.DEAD),
                keys.job_counters_key(job_id),
            ],
            args=[
                shard_member(shard_id, generation),
                "dead" if dead else "committed",
                rows_ok,
                rows_failed,
                prompt_tokens,
                completion_tokens,
                1 if shard_failed else 0,
            ],
        )
        if counted:
            self.r.publish(keys.job_events_channel(job_id), f"shard:{shard_id}")
        return bool(counted)

    def forget_shard(
        self,
        job_id: str,
        shard_id: int,
        generation: int,
        *,
        rows_ok: int,
        rows_failed: int,
        prompt_tokens: int,
        completion_tokens: int,
        shard_failed: bool,
    ) -> None:
        """Undo a recorded outcome before a retry supersedes it with a new generation."""
        member = shard_member(shard_id, generation)
        counters = keys.job_counters_key(job_id)
        pipe = self.r.pipeline()
        pipe.srem(keys.shard_state_key(job_id, ShardState.COMMITTED), member)
        pipe.srem(keys.shard_state_key(job_id, ShardState.DEAD), member)
        pipe.hincrby(counters, "rows_completed", -rows_ok)
        pipe.hincrby(counters, "rows_failed", -rows_failed)
        pipe.hincrby(counters, "prompt_tokens", -prompt_tokens)
        pipe.hincrby(counters, "completion_tokens", -completion_tokens)
        pipe.hincrby(counters, "shards_failed" if shard_failed else "shards_completed", -1)
        pipe.execute()

    def record_commit(self, record: dict) -> bool:
        """`record_shard` for a shard's commit record (the dict stored under commits/)."""
        dead = bool(record.get("dead_lettered"))
        return self.record_shard(*_commit_shard(record), **_commit_counts(record), dead=dead)

    def forget_commit(self, record: dict) -> None:
        """Undo `record_commit(record)` before a retry supersedes it with a new generation."""
        failed = bool(record.get("dead_lettered")) or record["rows_ok"] == 0
        self.forget_shard(*_commit_shard(record), **_commit_counts(record), shard_failed=failed)

    def shards_recorded(self, job_id: str) -> int:
        counters = self.r.hmget(keys.job_counters_key(job_id), "shards_completed", "shards_failed")
        return sum(int(v or 0) for v in counters)

    # ------------------------------------------------------------------ cancel and finalise

    def cancel(self, job_id: str) -> bool:
        """Flag the job so no new shard starts; move it to `cancelled` if not terminal."""
        self.r.set(keys.cancel_flag_key(job_id), "1")
        return self.transition(job_id, JobState.CANCELLED, error="cancelled by user")

    def is_cancelled(self, job_id: str) -> bool:
        return bool(self.r.exists(keys.cancel_flag_key(job_id)))

    def clear_cancel(self, job_id: str) -> None:
        self.r.delete(keys.cancel_flag_key(job_id))

    def acquire_finaliser(self, job_id: str, owner: str, ttl_s: int = 600) -> bool:
        return bool(self.r.set(keys.finaliser_lock_key(job_id), owner, nx=True, ex=ttl_s))

    def release_finaliser(self, job_id: str, owner: str) -> None:
        key = keys.finaliser_lock_key(job_id)
        if self.r.get(key) == owner:
            self.r.delete(key)

    def wait_for_event(self, job_id: str, timeout_s: float) -> None:
        """Block until the job publishes an event or `timeout_s` passes (for --watch/wait)."""
        pubsub = self.r.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(keys.job_events_channel(job_id))
            deadline = time.monotonic() + timeout_s
            while (left := deadline - time.monotonic()) > 0:
                if pubsub.get_message(timeout=min(left, 1.0)):
                    return
        finally:
            pubsub.close()

    def memory_usage(self, job_id: str) -> int:
        """Bytes Redis spends on this job's keys (MEMORY USAGE summed)."""
        total = 0
        for key in keys.job_keys(job_id):
            total += int(self.r.memory_usage(key) or 0)
        return total


# ---------------------------------------------------------------------- (de)serialisation


def _status_fields(status: JobStatus) -> dict[str, str | int]:
    fields: dict[str, str | int] = {
        "state": status.state.value,
        "rows_total": status.rows_total,
        "shards_total": status.shards_total,
    }
    for state, stamp in status.timestamps.items():
        fields[f"ts_{JobState(state).value}"] = stamp.isoformat()
    if status.error:
        fields["error"] = status.error
    return fields


def _status_from_fields(job_id: str, raw: dict[str, str], counters: dict[str, str]) -> JobStatus:
    stamps = {
        JobState(name[3:]): datetime.fromisoformat(value)
        for name, value in raw.items()
        if name.startswith("ts_")
    }
    return JobStatus(
        job_id=job_id,
        state=JobState(raw["state"]),
        rows_total=int(raw.get("rows_total", 0)),
        shards_total=int(raw.get("shards_total", 0)),
        timestamps=stamps,
        error=raw.get("error"),
        **{name: max(int(counters.get(name, 0)), 0) for name in COUNTER_FIELDS},
    )


class RedisJobState:
    """The producer's `JobStateSink` backed by a `JobStore` (validating → queued | failed)."""

    def __init__(self, store: JobStore, job_uri_of: Callable[[JobSpec], str]) -> None:
        self.store = store
        self.job_uri_of = job_uri_of

    def job_validating(self, spec: JobSpec) -> None:
        status = JobStatus.new(spec.job_id)
        self.store.create(status, job_uri=self.job_uri_of(spec), queue=spec.queue)

    def job_created(self, spec: JobSpec, tasks: Sequence[ShardTask]) -> None:
        self.store.set_totals(
            spec.job_id, rows_total=spec.samples_total or 0, shards_total=len(tasks)
        )
        self.store.transition(spec.job_id, JobState.QUEUED)

    def job_invalid(self, spec: JobSpec, error: str) -> None:
        self.store.transition(spec.job_id, JobState.FAILED, error=error)
