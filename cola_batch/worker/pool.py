"""`cola-batch pool`: a local autoscaler that decides how many standard worker processes run.

Contract:
* Scheduling stays with Redis + Celery. The pool only starts and stops ordinary `celery worker`
  processes (built by `cola_batch.worker.launcher`), one per slot: one per listed GPU (pinned
  with CUDA_VISIBLE_DEVICES), or up to `max_workers` CPU slots.
* How many should run is decided by the pure rule in `cola_batch.worker.scaling`; this module
  only carries decisions out.
* Scale-down never interrupts a shard. A worker is chosen only if Celery remote control
  (`inspect().active()` / `.reserved()`) shows it holding no task; the pool then cancels its
  consumers (it takes no new shard), checks again that it holds nothing, and only then sends
  SIGTERM: a warm stop, whose soft shutdown finishes or requeues anything that slipped in.
  A worker that does not answer is never treated as idle.
* A started worker counts as capacity while it loads; it is `up` (a candidate for scale-down)
  only once Celery answers its ping *and* its pool process has announced the loaded model in
  Redis (`keys.worker_loaded_key`), since Celery answers pings before the model has loaded.
* Every decision is logged with its reason (INFO when the action or reason changes, DEBUG for
  unchanged holds). SIGTERM/SIGINT of the pool warm-stops every worker and exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cola_batch import keys
from cola_batch.worker.launcher import (
    WorkerSlot,
    child_command,
    child_env,
    node_name,
    parse_gpus,
)
from cola_batch.worker.scaling import (
    Decision,
    Observation,
    PoolConfig,
    PoolState,
    decide,
)

log = logging.getLogger(__name__)

Phase = Literal["starting", "up", "draining", "stopping"]


@dataclass
class PoolWorker:
    slot: WorkerSlot
    proc: subprocess.Popen[bytes]
    node: str  # Celery node name, e.g. cola-cpu0-<pool pid>@host
    started_at: float
    phase: Phase = "starting"
    changed_at: float = 0.0


def pool_slots(gpus: str | None, max_workers: int) -> list[WorkerSlot]:
    """One slot per listed GPU, else `max_workers` CPU slots with distinct node names."""
    if not gpus:
        return [WorkerSlot(f"cpu{i}", "cpu", "") for i in range(max_workers)]
    slots = parse_gpus(gpus)
    if max_workers > len(slots):
        raise ValueError(f"--max {max_workers} exceeds the {len(slots)} GPU(s) in --gpus {gpus}")
    return slots


class Pool:
    """Runs `decide` every `poll_s` and reconciles worker processes with its target."""

    def __init__(
        self,
        *,
        model: str,
        redis_url: str,
        queues: Sequence[str],
        config: PoolConfig,
        gpus: str | None = None,
        poll_s: float = 2.0,
        load_timeout_s: float = 900.0,
        stop_timeout_s: float = 120.0,
        log_dir: Path | None = None,
        loglevel: str = "INFO",
        extra_env: dict[str, str] | None = None,
        control_timeout_s: float = 2.0,
        on_decision: Callable[[Decision, Observation], None] | None = None,
    ) -> None:
        import redis

        from cola_batch.settings import Settings
        from cola_batch.worker.celery_app import make_app

        self.model, self.redis_url, self.queues = model, redis_url, list(queues)
        self.config = config
        self.slots = pool_slots(gpus, config.max_workers)
        self.poll_s, self.load_timeout_s = poll_s, load_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.log_dir, self.loglevel, self.extra_env = log_dir, loglevel, dict(extra_env or {})
        self.control_timeout_s = control_timeout_s
        self.on_decision = on_decision
        self.app = make_app(Settings(redis_url=redis_url))
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=10, socket_connect_timeout=10)
        self.workers: list[PoolWorker] = []
        self.state = PoolState()
        self.last: Decision | None = None
        self._said: dict[str, str] = {}  # topic -> last INFO line, to log changes only
        self._failures = 0  # consecutive workers that died before coming up
        self._no_start_until = 0.0

    # ------------------------------------------------------------------ observation

    def capacity(self) -> list[PoolWorker]:
        return [w for w in self.workers if w.phase in ("starting", "up")]

    def observe(self) -> Observation:
        from cola_batch.worker.broker import read_queue_stats

        stats = read_queue_stats(self.redis, self.queues)
        cap = self.capacity()
        return Observation(
            depth=sum(d for d, _ in stats.values()),
            inflight=sum(i for _, i in stats.values()),
            workers=len(cap),
            loading=sum(w.phase == "starting" for w in cap),
        )

    def holding(self, nodes: list[str]) -> dict[str, int]:
        """{node: tasks it holds (active + reserved)} for the nodes that answered both."""
        if not nodes:
            return {}
        inspect = self.app.control.inspect(destination=nodes, timeout=self.control_timeout_s)
        active = inspect.active() or {}
        reserved = inspect.reserved() or {}
        return {
            n: len(active[n]) + len(reserved[n]) for n in nodes if n in active and n in reserved
        }

    # ------------------------------------------------------------------ one tick

    def step(self, now: float | None = None) -> Decision | None:
        """Reap, observe, decide, reconcile. None when the backlog could not be read."""
        now = time.monotonic() if now is None else now
        self.reap(now)
        self._check_started(now)
        try:
            obs = self.observe()
        except Exception as exc:  # noqa: BLE001 - never scale on a missing signal
            log.warning("pool: backlog not readable (%s: %s); holding", type(exc).__name__, exc)
            return None
        decision = decide(now, self.state, obs, self.config)
        self.state, self.last = decision.state, decision
        self._log(decision)
        self.reconcile(decision.target, now)
        if self.on_decision is not None:
            self.on_decision(decision, obs)
        return decision

    def _log(self, decision: Decision) -> None:
        # Timers in reasons change every tick: the gist decides whether this is news.
        gist = decision.reason.split(" (so far")[0]
        self._say("decision", gist, "pool decision: target %d: %s", decision.target,
                  decision.reason)  # fmt: skip

    def _say(self, topic: str, gist: str, msg: str, *args: object) -> None:
        """INFO when `gist` differs from the last one of `topic`, else DEBUG (one line a tick)."""
        level = logging.INFO if self._said.get(topic) != gist else logging.DEBUG
        self._said[topic] = gist
        log.log(level, msg, *args)

    def reconcile(self, target: int, now: float | None = None) -> None:
        """Move towards `target` workers starting/up; drain only idle ones."""
        now = time.monotonic() if now is None else now
        cap = self.capacity()
        if target > len(cap):
            self._grow(target - len(cap), now)
        elif target < len(cap):
            self._shrink(len(cap) - target, now)
        self._finish_draining(now)

    def _grow(self, count: int, now: float) -> None:
        for worker in [w for w in self.workers if w.phase == "draining"][:count]:
            if self._consume(worker, add=True):
                self._set(worker, "up", now, "re-enabled (draining, backlog is back)")
                count -= 1
        if count and now < self._no_start_until:
            self._say("grow", "backoff", "pool: %d worker(s) died before coming up; next "
                      "start in %.0f s", self._failures, self._no_start_until - now)  # fmt: skip
            return
        used = {w.slot.name for w in self.workers}
        free = [s for s in self.slots if s.name not in used]
        if count > len(free):
            line = f"pool: {count} more worker(s) wanted, {len(free)} slot(s) free"
            self._say("grow", line, line)
        for slot in free[:count]:
            self._start(slot, now)

    def _shrink(self, count: int, now: float) -> None:
        up = [w for w in self.workers if w.phase == "up"]
        held = self.holding([w.node for w in up])
        idle = [w for w in up if held.get(w.node) == 0]
        busy = len(up) - len(idle)
        # Newest first: its slot is the last that was needed.
        chosen = sorted(idle, key=lambda w: w.started_at, reverse=True)[:count]
        if len(chosen) < count:
            starting = sum(w.phase == "starting" for w in self.workers)
            line = (f"pool: {count - len(chosen)} fewer worker(s) wanted; {busy} busy or not "
                    f"answering, {starting} starting: waiting for them to go idle")  # fmt: skip
            self._say("shrink", line, line)
        for worker in chosen:
            if self._consume(worker, add=False):
                self._set(worker, "draining", now, "idle; consumers cancelled")

    def _finish_draining(self, now: float) -> None:
        draining = [w for w in self.workers if w.phase == "draining"]
        held = self.holding([w.node for w in draining])
        for worker in draining:
            if held.get(worker.node) == 0:
                worker.proc.send_signal(signal.SIGTERM)
                self._set(worker, "stopping", now, "holds no shard; warm stop (SIGTERM)")
            elif worker.node in held:
                line = (
                    f"pool: {worker.node} still holds {held[worker.node]} task(s); stop once idle"
                )
                self._say(f"drain {worker.node}", line, line)

    # ------------------------------------------------------------------ processes

    def _start(self, slot: WorkerSlot, now: float) -> None:
        node = node_name(slot)  # the name child_command gives it: we are its launcher
        self.redis.delete(keys.worker_loaded_key(node))  # an earlier worker's, same slot
        env = child_env(slot, model=self.model, redis_url=self.redis_url, extra=self.extra_env)
        cmd = child_command(slot, self.queues, loglevel=self.loglevel, pool="prefork")
        out: Any = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = (self.log_dir / f"worker-{slot.name}.log").open("ab")
        try:
            # Own process group: a terminal's Ctrl-C reaches only the pool, which then stops
            # each worker exactly once (a second signal would turn a warm stop cold).
            proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                process_group=0,
            )  # fmt: skip
        finally:
            if out is not None:
                out.close()
        worker = PoolWorker(slot, proc, node, now, changed_at=now)
        self.workers.append(worker)
        log.info("pool: started %s (pid %d) on %s", worker.node, proc.pid, slot.device)

    def _check_started(self, now: float) -> None:
        starting = [w for w in self.workers if w.phase == "starting"]
        if not starting:
            return
        replies = self.app.control.ping(
            destination=[w.node for w in starting], timeout=self.control_timeout_s
        )
        pinged = {node for reply in replies or [] for node in reply}
        answered = [w.node for w in starting if w.node in pinged]
        flags = self.redis.mget([keys.worker_loaded_key(n) for n in answered]) if answered else []
        loaded = {node for node, flag in zip(answered, flags, strict=True) if flag is not None}
        for worker in starting:
            if worker.node in loaded:
                self._set(worker, "up", now, f"up after {now - worker.started_at:.1f}s")
                self._failures = 0
            elif now - worker.started_at > self.load_timeout_s:
                worker.proc.send_signal(signal.SIGTERM)
                self._set(worker, "stopping", now,
                          f"not up after {self.load_timeout_s:g}s; stopping it")  # fmt: skip

    def reap(self, now: float | None = None) -> None:
        """Forget workers that exited; kill those stopping for longer than stop_timeout_s."""
        now = time.monotonic() if now is None else now
        for worker in list(self.workers):
            code = worker.proc.poll()
            if code is None:
                if worker.phase == "stopping" and now - worker.changed_at > self.stop_timeout_s:
                    log.warning("pool: %s did not stop in %g s; killing it",
                                worker.node, self.stop_timeout_s)  # fmt: skip
                    _kill_tree(worker.proc)
                continue
            self.workers.remove(worker)
            if worker.phase == "stopping":
                log.info("pool: %s exited (%s); slot %s free", worker.node, code, worker.slot.name)
            else:
                log.warning("pool: %s exited unexpectedly (%s) while %s; slot %s free",
                            worker.node, code, worker.phase, worker.slot.name)  # fmt: skip
                if worker.phase == "starting":  # a crash loop must not spin at the poll rate
                    self._failures += 1
                    self._no_start_until = now + min(5.0 * 2 ** (self._failures - 1), 300.0)

    def _consume(self, worker: PoolWorker, *, add: bool) -> bool:
        control = self.app.control
        call = control.add_consumer if add else control.cancel_consumer
        for queue in self.queues:
            replies = call(queue, destination=[worker.node], reply=True,
                           timeout=self.control_timeout_s)  # fmt: skip
            if not any(worker.node in r for r in replies or []):
                log.info("pool: %s did not answer %s; will retry", worker.node, call.__name__)
                if not add:  # keep it whole: re-enable any queue already cancelled
                    for q in self.queues:
                        control.add_consumer(q, destination=[worker.node], reply=False)
                return False
        return True

    def _set(self, worker: PoolWorker, phase: Phase, now: float, why: str) -> None:
        log.info("pool: %s %s -> %s: %s", worker.node, worker.phase, phase, why)
        worker.phase, worker.changed_at = phase, now

    # ------------------------------------------------------------------ lifecycle

    def run(self, stop: threading.Event) -> None:
        """Decide every `poll_s` until `stop` is set; then warm-stop every worker."""
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    self.step()
                except Exception:  # noqa: BLE001 - one failed tick must not kill the pool
                    log.exception("pool: tick failed; retrying")
                stop.wait(max(self.poll_s - (time.monotonic() - started), 0.05))
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """SIGTERM every worker (warm stop: finish or requeue), wait, kill stragglers."""
        for worker in self.workers:
            if worker.proc.poll() is None and worker.phase != "stopping":
                worker.proc.send_signal(signal.SIGTERM)
                self._set(worker, "stopping", time.monotonic(), "pool shutting down")
        deadline = time.monotonic() + self.stop_timeout_s
        for worker in self.workers:
            try:
                worker.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.warning("pool: %s did not stop in time; killing it", worker.node)
                _kill_tree(worker.proc)
        self.workers.clear()
        self.redis.close()
        self.app.close()

    def counts(self) -> dict[str, int]:
        phases: dict[str, int] = dict.fromkeys(("starting", "up", "draining", "stopping"), 0)
        for worker in self.workers:
            phases[worker.phase] += 1
        return phases


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a worker and its pool processes (its own process group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait()
