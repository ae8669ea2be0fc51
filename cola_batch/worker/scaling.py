"""The autoscaler's decision rule: how many workers should run, and why. Pure functions only.

Contract: `decide(now, state, observation, config)` has no side effects and returns the next
`PoolState` inside its `Decision`. desired = clamp(ceil((queued + in-flight) / shards_per_worker),
min, max). The pool grows to the LOWEST recommendation of the last `scale_up_window_s` (a blip
does not start a worker) and shrinks to the HIGHEST recommendation of the last
`scale_down_window_s` (the backlog must stay low that long). Workers still starting (model
loading) count as capacity, so one backlog never starts two workers. Every decision carries a
human-readable reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class PoolConfig:
    min_workers: int
    max_workers: int
    shards_per_worker: int = 2
    scale_up_window_s: float = 10.0
    scale_down_window_s: float = 600.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_workers <= self.max_workers:
            raise ValueError(
                f"need 0 <= --min <= --max, got min {self.min_workers}, max {self.max_workers}"
            )
        if self.shards_per_worker < 1:
            raise ValueError("shards_per_worker must be >= 1")
        if self.scale_up_window_s < 0 or self.scale_down_window_s < 0:
            raise ValueError("stabilisation windows must be >= 0 seconds")


@dataclass(frozen=True)
class Observation:
    depth: int  # shards queued in Redis over the pool's queues
    inflight: int  # shards delivered to a worker and not yet acknowledged
    workers: int  # capacity: workers starting or up (not those draining or stopping)
    loading: int = 0  # of `workers`, those not up yet (process start + model load)

    @property
    def backlog(self) -> int:
        return self.depth + self.inflight


@dataclass(frozen=True)
class PoolState:
    """Recommendation history, oldest first: (time, desired) samples that cover the windows."""

    history: tuple[tuple[float, int], ...] = ()


Action = Literal["up", "down", "hold"]


@dataclass(frozen=True)
class Decision:
    target: int  # workers that should be starting or up
    reason: str
    action: Action = "hold"
    desired: int = 0  # this observation's recommendation, before stabilisation
    state: PoolState = field(default_factory=PoolState)  # feed to the next decide()


def desired_workers(backlog: int, config: PoolConfig) -> int:
    need = math.ceil(max(backlog, 0) / config.shards_per_worker)
    return min(max(need, config.min_workers), config.max_workers)


def _window(history: Sequence[tuple[float, int]], now: float, window: float) -> list[int] | None:
    """Values the recommendation took during [now - window, now]; None if history is shorter."""
    start = now - window
    before = [v for t, v in history if t <= start]
    if not before:
        return None
    return [before[-1], *(v for t, v in history if t > start)]


def _prune(history: Sequence[tuple[float, int]], now: float, keep_s: float) -> tuple:
    start = now - keep_s
    older = [s for s in history if s[0] <= start]
    return tuple(older[-1:] + [s for s in history if s[0] > start])


def _since(history: Sequence[tuple[float, int]], now: float, pred: Callable[[int], bool]) -> float:
    """Seconds the recommendation has satisfied `pred` without a break (0 if it does not now)."""
    start = now
    for t, v in reversed(history):
        if not pred(v):
            break
        start = t
    return now - start


def decide(now: float, state: PoolState, obs: Observation, config: PoolConfig) -> Decision:
    """The number of workers to run, and why. Pure: same inputs, same decision."""
    desired = desired_workers(obs.backlog, config)
    history = _prune(
        (*state.history, (now, desired)),
        now,
        max(config.scale_up_window_s, config.scale_down_window_s),
    )
    nxt = PoolState(history)
    current = obs.workers
    loading = f", {obs.loading} loading" if obs.loading else ""
    need = (
        f"backlog {obs.backlog} shards ({obs.depth} queued + {obs.inflight} in flight) "
        f"needs {desired} at {config.shards_per_worker}/worker"
    )

    def out(target: int, action: Action, why: str) -> Decision:
        return Decision(target, why, action, desired, nxt)

    if current < config.min_workers:
        return out(config.min_workers, "up", f"scale up {current}->{config.min_workers}: "
                   f"below --min {config.min_workers}; {need}")  # fmt: skip
    if current > config.max_workers:
        return out(config.max_workers, "down", f"scale down {current}->{config.max_workers}: "
                   f"above --max {config.max_workers}")  # fmt: skip
    up = _window(history, now, config.scale_up_window_s)
    if up is not None and min(up) > current:
        target = min(up)
        return out(target, "up", f"scale up {current}->{target}{loading}: {need}, "
                   f"for {config.scale_up_window_s:g}s")  # fmt: skip
    down = _window(history, now, config.scale_down_window_s)
    if down is not None and max(down) < current:
        target = max(down)
        return out(target, "down", f"scale down {current}->{target}: {need}, at most {target} "
                   f"for {config.scale_down_window_s:g}s")  # fmt: skip
    if desired > current:
        high = _since(history, now, lambda v: v > current)
        return out(current, "hold", f"hold at {current}{loading}: {need}; scale up once it "
                   f"lasts {config.scale_up_window_s:g}s (so far {high:.0f}s)")  # fmt: skip
    if desired < current:
        low = _since(history, now, lambda v: v < current)
        return out(current, "hold", f"hold at {current}{loading}: {need}; scale down once it "
                   f"lasts {config.scale_down_window_s:g}s (so far {low:.0f}s)")  # fmt: skip
    return out(current, "hold", f"hold at {current}{loading}: {need}")


# ---------------------------------------------------------------------- supervisor
