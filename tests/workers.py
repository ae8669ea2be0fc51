"""Test helpers for the job service: a tiny checkpoint, prompt files and real worker processes.

`WorkerGroup` starts real `celery worker` processes through the production launcher
(`cola_batch.worker.launcher.start_workers`), waits until each is consuming, and stops them
(warm, then kill). Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from cola_batch.worker.launcher import start_workers


def make_tiny_model(root: Path) -> Path:
    from cola_batch.model.checkpoint import save_model
    from cola_batch.model.presets import build_preset

    if not (root / "cola_dit" / "config.json").exists():
        save_model(build_preset("tiny", seed=0), root)
    return root


def write_prompts(path: Path, count: int, *, prefix: str = "row", start: int = 0) -> Path:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    with path.open("w", encoding="utf-8") as handle:
        for i in range(start, start + count):
            prompt = " ".join(words[(i + k) % len(words)] for k in range(3 + i % 5))
            handle.write(json.dumps({"id": f"{prefix}-{i:05d}", "prompt": prompt}) + "\n")
    return path


class WorkerGroup:
    def __init__(
        self,
        model: Path,
        redis_url: str,
        log_dir: Path,
        *,
        queues: Iterable[str] = ("cola-interactive", "cola-batch"),
        env: dict[str, str] | None = None,
        count: int = 1,
    ) -> None:
        self.model, self.redis_url, self.queues = model, redis_url, list(queues)
        self.env = {"COLA_BATCH_MAX_ATTEMPTS": "3", **(env or {})}
        self.count = count
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def start(self, timeout_s: float = 90.0) -> WorkerGroup:
        for _ in range(self.count):
            self.start_one()
        self.wait_ready(timeout_s)
        return self

    def start_one(self) -> subprocess.Popen[bytes]:
        log = self.log_dir / f"worker-{len(self.logs)}.log"
        self.logs.append(log)
        with log.open("wb") as handle:
            (proc,) = start_workers(
                model=str(self.model), redis_url=self.redis_url, queues=self.queues,
                loglevel="INFO", extra_env=self.env, stdout=handle.fileno(),
            )  # fmt: skip
        self.procs.append(proc)
        return proc

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        for proc, log in zip(self.procs, self.logs, strict=True):
            while b" ready." not in log.read_bytes():
                if proc.poll() is not None:
                    raise RuntimeError(f"worker exited early:\n{self.log_text()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"worker not ready in {timeout_s} s:\n{self.log_text()}")
                time.sleep(0.2)

    def pool_pids(self, proc: subprocess.Popen[bytes]) -> list[int]:
        """The prefork pool processes (children) of one worker."""
        out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def log_text(self, chars: int = 4000) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in self.logs
        )

    def stop(self, timeout_s: float = 30.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                _kill_tree(proc)
        self.procs.clear()

    def __enter__(self) -> WorkerGroup:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    for pid in out.stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    proc.kill()
    proc.wait()
