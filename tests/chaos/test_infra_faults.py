"""Redis restarts and object-store faults mid-job (issue 6, items 3-4)."""

from __future__ import annotations

from harness import Lab
from scenarios_infra import redis_restart_aof, redis_restart_lost, storage_faults, storage_permanent
from services import S3Server


def test_redis_crash_with_aof_the_job_completes(aof_lab: Lab, profile: dict[str, int]) -> None:
    result = redis_restart_aof(aof_lab, profile["aof_trials"])
    assert (result.lost, result.duplicated, result.notes) == (0, 0, []), aof_lab.worker_logs()


def test_redis_crash_without_persistence_status_says_lost_and_resume_finishes(lab: Lab) -> None:
    result = redis_restart_lost(lab)
    problems = [n for n in result.notes if not n.startswith("status exit")]
    assert not problems, problems
    assert (result.lost, result.duplicated) == (0, 0)


def test_s3_transient_faults_are_retried(
    lab: Lab, chaos_s3: S3Server, profile: dict[str, int]
) -> None:
    result = storage_faults(lab, chaos_s3, profile["s3_trials"])
    assert result.faults > 0, result.notes
    assert (result.lost, result.duplicated) == (0, 0), result.notes
    assert not [n for n in result.notes if "ended" in n], result.notes


def test_s3_permanent_failure_dead_letters_one_shard_and_retry_finishes(
    lab: Lab, chaos_s3: S3Server
) -> None:
    result = storage_permanent(lab, chaos_s3)
    problems = [n for n in result.notes if not n.startswith("after ")]
    assert not problems, result.notes
    assert (result.lost, result.duplicated) == (0, 0)
