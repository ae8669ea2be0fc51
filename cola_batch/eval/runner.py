"""Generation step of `cola-batch eval`: prompt rows in, per-task output records out.

Contract (to be implemented on top of the job queue by the worker owner): `run_generation`
submits every row as one ordinary batch job, waits for it, and returns the output records per
task. Prompt building and scoring never import this module, so they work without it.
"""

from __future__ import annotations

from pathlib import Path


def run_generation(rows: list[dict], model: str, output_dir: Path) -> dict[str, list[dict]]:
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
    raise NotImplementedError("eval through the batch queue lands with the worker")
