"""Workers die or are stopped mid-shard; no row is lost or duplicated (issue 6, items 1-2)."""

from __future__ import annotations

import pytest
from harness import Lab
from scenarios_workers import kill9_mid_shard, sigterm_mid_shard


def test_kill9_mid_shard_loses_and_duplicates_nothing(lab: Lab, profile: dict[str, int]) -> None:
    trials = profile["kill_trials"]
    result = kill9_mid_shard(lab, trials, whole_every=3 if trials < 10 else 4)
    assert result.trials == trials
    assert (result.lost, result.duplicated) == (0, 0), lab.worker_logs()
    assert [n for n in result.notes if "landed mid-shard" not in n] == [], result.notes
    assert result.faults >= 1, "no kill landed while a shard was running"
    assert len(result.recover_s) == trials


def test_sigterm_mid_shard_finishes_in_grace_or_requeues_at_once(lab: Lab) -> None:
    result = sigterm_mid_shard(lab)
    assert (result.lost, result.duplicated) == (0, 0), lab.worker_logs()
    problems = [n for n in result.notes if not n.startswith("grace ")]
    assert not problems, problems
    # Requeued at once on exit: far below the 600 s visibility timeout of that worker.
    assert result.recover_s, f"the shard finished within the 1 s grace: {result.notes}"
    assert result.recover_s[0] < 20, result.notes


@pytest.mark.chaos_full
def test_kill9_whole_workers_repeatedly(lab: Lab) -> None:
    """Only whole-worker kills (Celery parent and pool child): redelivery after the
    visibility timeout, every time."""
    result = kill9_mid_shard(lab, 4, whole_every=1, seed=1)
    assert (result.lost, result.duplicated) == (0, 0)
    assert [n for n in result.notes if "landed mid-shard" not in n] == [], result.notes
