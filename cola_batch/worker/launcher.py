"""`cola-batch worker`: start one Celery worker process per GPU (or one on CPU) and supervise them.

Contract:
* The launcher never imports torch or touches CUDA: it counts GPUs from `--gpus` and pins each
  child with `CUDA_VISIBLE_DEVICES`, so every child sees exactly one device as `cuda:0`.
* Each child is a real `celery worker` with a prefork pool of one process: the model is loaded
  in that pool process after fork (`worker_process_init`), and if the pool process dies mid-shard
  the Celery parent requeues the shard at once.
* A child dies with its launcher: it gets SIGTERM when the launcher exits, even SIGKILLed
  (`celery_app`'s parent-death link), so no orphan consumes shards unsupervised.
* SIGTERM/SIGINT are forwarded to every child; a child lets its running shard finish for
  `Settings.soft_shutdown_s`, then requeues it if still running (REMAP_SIGTERM=SIGQUIT: soft, then
  cold shutdown); the launcher exits when they all have, with the worst exit status.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSlot:
    name: str
    device: str  # "cpu" or "cuda"
    visible: str | None  # CUDA_VISIBLE_DEVICES for this child


def parse_gpus(gpus: str | None) -> list[WorkerSlot]:
    """`None`/"" → one CPU slot; "0,1" → one slot per GPU id; "all" → every visible GPU."""
    if not gpus:
        return [WorkerSlot("cpu", "cpu", "")]
    if gpus == "all":
        ids = _visible_gpu_ids()
        if not ids:
            raise ValueError("--gpus all: no GPU found (nvidia-smi lists none)")
    else:
        ids = [part.strip() for part in gpus.split(",") if part.strip()]
        bad = [i for i in ids if not i.isdigit()]
        if bad or not ids:
            raise ValueError(f"--gpus expects comma-separated GPU indices like 0,1,2; got {gpus!r}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"--gpus lists a GPU twice: {gpus!r}")
    return [WorkerSlot(f"gpu{i}", "cuda", i) for i in ids]


def _visible_gpu_ids() -> list[str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def node_name(slot: WorkerSlot, launcher_pid: int | None = None) -> str:
    """The Celery node name of `slot`'s worker started by `launcher_pid` (default: this process)."""
    from celery.utils.nodenames import host_format

    pid = os.getpid() if launcher_pid is None else launcher_pid
    return host_format(f"cola-{slot.name}-{pid}@%h")


def child_command(
    slot: WorkerSlot, queues: Sequence[str], *, loglevel: str, pool: str
) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "cola_batch.worker.celery_app", "worker",
        "-Q", ",".join(queues),
        "-c", "1",
        "-P", pool,
        "-n", node_name(slot),
        "--without-gossip", "--without-mingle",
        "-l", loglevel,
    ]  # fmt: skip


def child_env(
    slot: WorkerSlot, *, model: str, redis_url: str, extra: dict[str, str] | None = None
) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "COLA_BATCH_WORKER_MODEL": model,
            "COLA_BATCH_WORKER_DEVICE": slot.device,
            "COLA_BATCH_REDIS_URL": redis_url,
            # Celery treats a plain SIGTERM as a warm shutdown that waits for the running shard
            # without limit, ignoring worker_soft_shutdown_timeout; the orchestrator's SIGKILL
            # then strands the shard until the visibility timeout. Remapped, SIGTERM starts the
            # soft shutdown (grace = Settings.soft_shutdown_s) and then a cold shutdown, which
            # puts the unfinished shard back on the queue at once.
            "REMAP_SIGTERM": "SIGQUIT",
            "COLA_BATCH_WORKER_PARENT_PID": str(os.getpid()),
            "COLA_BATCH_WORKER_NODE": node_name(slot),
        }
    )
    if slot.visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot.visible
    env.update(extra or {})
    return env


def start_workers(
    *,
    model: str,
    redis_url: str,
    queues: Sequence[str],
    gpus: str | None = None,
    loglevel: str = "INFO",
    pool: str = "prefork",
    extra_env: dict[str, str] | None = None,
    stdout: int | None = None,
) -> list[subprocess.Popen[bytes]]:
    slots = parse_gpus(gpus)
    procs = []
    for slot in slots:
        env = child_env(slot, model=model, redis_url=redis_url, extra=extra_env)
        cmd = child_command(slot, queues, loglevel=loglevel, pool=pool)
        procs.append(subprocess.Popen(cmd, env=env, stdout=stdout, stderr=stdout))
        log.info("started worker %s (pid %d) on %s", slot.name, procs[-1].pid, slot.device)
    return procs


def stop_workers(procs: Sequence[subprocess.Popen[bytes]], timeout_s: float = 120.0) -> int:
    """Warm-stop every child (SIGTERM), wait, kill stragglers; the worst exit status."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    worst = 0
    for proc in procs:
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        worst = max(worst, abs(code or 0))
    return worst


def run_forever(procs: list[subprocess.Popen[bytes]]) -> int:
    """Forward SIGTERM/SIGINT to the children and wait for all of them."""
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    worst = 0
    for proc in procs:
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:  # pragma: no cover - handled by the signal handler
                continue
        worst = max(worst, abs(code or 0))
    return 0 if stopping and worst in (0, signal.SIGTERM) else worst
