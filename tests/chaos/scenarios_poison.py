"""Chaos scenarios with poison: rows that fail generation, a shard that kills its worker on
every delivery, and simulated CUDA out-of-memory.

Contract: as in scenarios_workers; the worker-side switches are the env-gated fault hooks
COLA_BATCH_FAULT_KILL_SHARDS (cola_batch/worker/shard.py) and COLA_BATCH_FAULT_OOM_OVER_ROWS
(cola_batch/worker/holder.py).
"""

from __future__ import annotations

import json

from harness import QUICK_SAMPLING, Lab, ScenarioResult, audit, error_codes

from cola_batch.jobs import read_results
from cola_batch.schemas.job import JobState


def poison_rows(lab: Lab) -> ScenarioResult:
    """Rows whose prompt exceeds the worker's context get error_code prompt_too_long; every
    other row of the same shard completes."""
    result = ScenarioResult("poison rows (prompt longer than the context)")
    path = lab.root / "poison.jsonl"
    rows = [{"id": f"r{i}", "prompt": "short prompt"} for i in range(6)]
    for i in (1, 4):
        rows[i]["prompt"] = " ".join(["a very long prompt"] * 60)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = lab.control.submit(
        [str(path)], model=str(lab.model), sampling=QUICK_SAMPLING, shard_size=6
    )
    lab.workers(env={"COLA_BATCH_MAX_CONTEXT": "48"})
    final = lab.wait(spec.job_id)
    table = read_results(lab.job_uri(spec))
    codes = dict(
        zip(table.column("id").to_pylist(), table.column("error_code").to_pylist(), strict=True)
    )
    result.faults = 2
    if final.state is not JobState.COMPLETED or (final.rows_completed, final.rows_failed) != (4, 2):
        result.notes.append(
            f"job {final.state.value}, {final.rows_completed} ok {final.rows_failed} failed"
        )
    if codes != {f"r{i}": ("prompt_too_long" if i in (1, 4) else None) for i in range(6)}:
        result.notes.append(f"unexpected error codes {codes}")
    result.add(*audit(lab.job_uri(spec), [r["id"] for r in rows]))
    return result


def poison_shard(lab: Lab, max_attempts: int = 3) -> ScenarioResult:
    """A shard that kills its worker process on every delivery is dead-lettered after the
    attempt limit (its rows carry shard_dead_lettered); the other shards complete."""
    result = ScenarioResult("poison shard (kills its worker every time)")
    spec, ids = lab.submit(6, shard_size=2)
    env = {
        "COLA_BATCH_FAULT_KILL_SHARDS": f"{spec.job_id}:1",
        "COLA_BATCH_MAX_ATTEMPTS": str(max_attempts),
    }
    lab.workers(env=env)
    final = lab.wait(spec.job_id, timeout_s=240)
    attempts = lab.attempts(spec.job_id)
    result.faults = attempts.get("1:0", 0) - 1  # every delivery but the last one killed it
    codes = error_codes(lab.job_uri(spec))
    if attempts.get("1:0") != max_attempts + 1:
        result.notes.append(f"shard 1 was delivered {attempts.get('1:0')} times")
    if codes != {None: 4, "shard_dead_lettered": 2} or final.state is not JobState.COMPLETED:
        result.notes.append(f"job {final.state.value}, error codes {dict(codes)}")
    result.notes.append(f"dead-lettered after {attempts.get('1:0', 0) - 1} killed deliveries")
    result.add(*audit(lab.job_uri(spec), ids))
    return result


def oom_split(lab: Lab) -> ScenarioResult:
    """Simulated out-of-memory on every micro-batch of more than one row: the engine splits
    the batch and retries, and the outputs equal those of a run without OOM (per-row seeds).
    With OOM even for a single row, the rows fail with error_code out_of_memory."""
    result = ScenarioResult("CUDA OOM (simulated): split micro-batch and retry")
    clean, ids = lab.submit(6, shard_size=6)
    group = lab.workers()
    lab.wait(clean.job_id)
    group.stop()
    oom, _ = lab.submit(6, shard_size=6)
    group = lab.workers(env={"COLA_BATCH_FAULT_OOM_OVER_ROWS": "1"})
    final = lab.wait(oom.job_id)
    group.stop()
    result.faults += 1
    texts = [read_results(lab.job_uri(s)).column("text").to_pylist() for s in (clean, oom)]
    if final.state is not JobState.COMPLETED or texts[0] != texts[1] or None in texts[1]:
        result.notes.append(
            f"split run: job {final.state.value}, outputs equal: {texts[0] == texts[1]}"
        )
    result.add(*audit(lab.job_uri(oom), ids))
    hopeless, ids2 = lab.submit(3, shard_size=3)
    lab.workers(env={"COLA_BATCH_FAULT_OOM_OVER_ROWS": "0"})
    final = lab.wait(hopeless.job_id)
    result.faults += 1
    codes = error_codes(lab.job_uri(hopeless))
    if final.state is not JobState.FAILED or codes != {"out_of_memory": 3}:
        result.notes.append(f"OOM alone: job {final.state.value}, codes {dict(codes)}")
    result.add(*audit(lab.job_uri(hopeless), ids2))
    result.notes.append(
        "batches over 1 row OOM: outputs identical to the clean run; "
        "OOM at 1 row: rows fail with out_of_memory"
    )
    return result
