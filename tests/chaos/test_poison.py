"""Poison rows, a poison shard and out-of-memory (issue 6, item 5)."""

from __future__ import annotations

from harness import Lab
from scenarios_poison import oom_split, poison_rows, poison_shard


def test_a_poison_row_gets_an_error_record_and_its_shard_completes(lab: Lab) -> None:
    result = poison_rows(lab)
    assert (result.lost, result.duplicated, result.notes) == (0, 0, []), lab.worker_logs()


def test_a_shard_that_kills_its_worker_is_dead_lettered_not_looped(lab: Lab) -> None:
    result = poison_shard(lab)
    problems = [n for n in result.notes if not n.startswith("dead-lettered after")]
    assert not problems, lab.worker_logs()
    assert result.faults == 3
    assert (result.lost, result.duplicated) == (0, 0)


def test_out_of_memory_splits_the_batch_then_gives_up_per_row(lab: Lab) -> None:
    result = oom_split(lab)
    problems = [n for n in result.notes if not n.startswith("batches over")]
    assert not problems, problems
    assert (result.lost, result.duplicated) == (0, 0)
