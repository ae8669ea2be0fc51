"""Generation step of `cola-batch eval`: prompt rows in, per-task output records out.

Contract: `run_generation` submits every row as one ordinary batch job — to the Redis named by
COLA_BATCH_REDIS_URL when it is set (so it scales with whatever worker pool serves that Redis),
else through `cola-batch run`'s embedded Redis and local workers — waits for it, and returns the
output records per task. Prompt building and scoring never import this module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cola_batch.schemas.sampling import SamplingParams

# eval.md §5: 16 steps, guidance 7, penalised greedy, 32 new tokens, noise seed base 66.
PUBLISHED_SETTINGS = SamplingParams(
    max_new_tokens=32, timesteps=16, guidance_scale=7.0, temperature=0.0,
    repetition_penalty=1.1, seed=66,
)  # fmt: skip


def _row_id(row: dict) -> str:
    return f"{row['task']}/{row['id']}"  # ids are unique per task, not across tasks


def run_generation(
    rows: list[dict], model: str, output_dir: Path, sampling: SamplingParams = PUBLISHED_SETTINGS
) -> dict[str, list[dict]]:
    """Generate a continuation for every prompt row and group the outputs by task.

    Args:
        rows: generation rows from `cola_batch.eval.tasks.build_prompt_rows`, tasks in the order
            requested, each `{"task": str, "id": int | str, "prompt": str, "ground_truth": str}`
            plus `"choices": list[str]` when the task has options. `prompt` is final (templated,
            no chat wrapping); `id` is the per-sample noise seed key (inference.md §3.9) and is
            unique within a task, not across tasks.
        model: model name or checkpoint location understood by the job queue.
        output_dir: folder the caller owns for this run; the implementation may keep job
            artefacts (job id, logs) there but must not write `<task>.jsonl` files, which the
            caller writes from the return value.

    Returns:
        `{task: [record, ...]}` with one record per input row of that task, in input order, each
        `{"id", "prompt", "generate", "ground_truth"[, "choices"]}` (inference.md §6; the fields
        of `shared/data/published/<task>.jsonl` before scoring). `generate` is the raw detokenised
        continuation, not cut at the first newline; the scorer does that.

    Generation settings default to the published run (eval.md §5): 16 steps, guidance 7.0,
    greedy with repetition penalty 1.1, max_new_tokens 32, EOS and im_end enabled, noise seed
    base 66.
    """
    from cola_batch import keys
    from cola_batch.jobs import read_results

    inputs = output_dir / "eval_inputs.jsonl"
    with inputs.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps({"id": _row_id(row), "prompt": row["prompt"]}) + "\n")
    jobs_dir = str((output_dir / "jobs").resolve())
    if os.environ.get("COLA_BATCH_REDIS_URL"):
        from cola_batch.jobs import Control

        control = Control.connect()
        spec = control.submit([str(inputs)], model=model, output=jobs_dir, sampling=sampling)
        control.wait(spec.job_id)
        job_uri = control.job_uri(spec.job_id)
        job_id = spec.job_id
    else:
        from cola_batch.cli_run import run_job

        job_id, code = run_job([str(inputs)], model=model, output=jobs_dir, sampling=sampling)
        if not job_id:
            raise RuntimeError("the eval job did not start")
        job_uri = keys.job_uri(jobs_dir, job_id)
    (output_dir / "eval_job.json").write_text(json.dumps({"job_id": job_id, "job_uri": job_uri}))
    texts = {
        (row["id"], row["sample_index"]): row["text"] or ""
        for row in read_results(job_uri).to_pylist()
    }
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        record = {
            "id": row["id"],
            "prompt": row["prompt"],
            "generate": texts.get((_row_id(row), 0), ""),
            "ground_truth": row.get("ground_truth", ""),
        }
        if row.get("choices"):
            record["choices"] = row["choices"]
        grouped.setdefault(row["task"], []).append(record)
    return grouped
