"""The model holder: one loaded model and generation engine per worker process.

Contract: `get_engine()` returns the process's engine, loading the checkpoint named by
`Settings.worker_model` on first use; `preload_from_env()` does that eagerly and is called after
fork (Celery's worker_process_init), so a parent process never touches CUDA and each pool process
loads the model exactly once before it consumes. Model load seconds and the model's identity
(sha256 of its weight files) are kept for metrics and provenance.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cola_batch.settings import get_settings

log = logging.getLogger(__name__)

_lock = threading.Lock()
_loaded: LoadedModel | None = None


@dataclass
class LoadedModel:
    root: str
    engine: Any  # cola_batch.pipeline.Engine (imported lazily: torch is heavy)
    device: str
    load_seconds: float
    sha256: str


def resolve_device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_sha256(root: str | Path) -> str:
    """sha256 over the model's weight files, in sorted path order (the model's identity)."""
    digest = hashlib.sha256()
    base = Path(root)
    for path in sorted(base.rglob("*.safetensors")):
        digest.update(str(path.relative_to(base)).encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def load(
    root: str,
    *,
    device: str = "auto",
    dtype: str = "bf16",
    batch_tokens: int = 4096,
    max_context: int = 8192,
) -> LoadedModel:
    from cola_batch.model.checkpoint import load_model
    from cola_batch.pipeline.engine import Engine

    device = resolve_device(device)
    started = time.perf_counter()
    model = load_model(root, device=device)
    engine = Engine(
        model, device=device, dtype=dtype, batch_tokens=batch_tokens, max_context=max_context
    )
    seconds = time.perf_counter() - started
    from cola_batch.worker.metrics import set_model_load_seconds

    set_model_load_seconds(seconds)
    log.info("model %s loaded on %s in %.1f s", root, device, seconds)
    return LoadedModel(root, engine, device, seconds, model_sha256(root))


def get_loaded() -> LoadedModel:
    global _loaded
    with _lock:
        if _loaded is None:
            settings = get_settings()
            if not settings.worker_model:
                raise RuntimeError(
                    "this worker has no model: start it with `cola-batch worker --model DIR` "
                    "or set COLA_BATCH_WORKER_MODEL"
                )
            _maybe_delay_load()
            _loaded = load(
                settings.worker_model,
                device=settings.worker_device,
                dtype=settings.worker_dtype,
                batch_tokens=settings.batch_tokens,
                max_context=settings.max_context,
            )
            _maybe_inject_oom(_loaded.engine)
        return _loaded


def _maybe_delay_load() -> None:
    """Fault injection for the tests: COLA_BATCH_FAULT_LOAD_DELAY_S=S makes the model load take
    S seconds longer, as a multi-GB checkpoint would. Unset in production."""
    import os

    delay = os.environ.get("COLA_BATCH_FAULT_LOAD_DELAY_S")
    if delay:
        time.sleep(float(delay))


def _maybe_inject_oom(engine: Any) -> None:
    """Fault injection for the chaos tests (tests/chaos): COLA_BATCH_FAULT_OOM_OVER_ROWS=N makes
    every micro-batch of more than N rows raise torch.OutOfMemoryError (the Engine's
    `fail_batches_over` seam), so CPU runs exercise the split-and-retry path.
    Unset in production."""
    import os

    over = os.environ.get("COLA_BATCH_FAULT_OOM_OVER_ROWS")
    if over:
        engine.fail_batches_over = int(over)
        log.warning("COLA_BATCH_FAULT_OOM_OVER_ROWS=%s: simulating out of memory", over)


def preload_from_env() -> None:
    if get_settings().worker_model:
        get_loaded()
