"""Benchmark prompt templates reproduce the published prompts (spec/eval.md §4)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cola_batch.eval.scoring import TASKS
from cola_batch.eval.tasks import build_prompt_rows, read_task_file
from cola_batch.eval.templates import build_prompt, few_shot_head, format_options

TASKS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tasks"


def _rows(task: str) -> list[dict]:
    with (TASKS_DIR / f"{task}.jsonl").open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_squad_row_hand_checked() -> None:
    record = {
        "question": "What did Lady Gaga sing?",
        "context": "Six-time Grammy winner and Academy Award nominee Lady Gaga performed the "
        "national anthem, while Academy Award winner Marlee Matlin provided American Sign "
        "Language (ASL) translation.",
        "ground_truth": "the national anthem",
    }
    assert build_prompt("squad", record) == (
        few_shot_head("squad") + record["context"] + "\nQuestion: What did Lady Gaga sing?\nAnswer:"
    )


def test_siqa_row_hand_checked() -> None:
    record = {"question": "What will happen to Riley?", "choices": ["lazy", "passive", "proud"]}
    assert build_prompt("siqa", record) == (
        few_shot_head("siqa")
        + "What will happen to Riley?\n(A) lazy\n(B) passive\n(C) proud\nAnswer:"
    )


def test_race_puts_an_options_label_before_the_option_lines() -> None:
    record = {"question": "Q?", "choices": ["x", "y", "z", "w"]}
    assert build_prompt("race", record) == (
        few_shot_head("race") + "Q?\nOptions:\n(A) x\n(B) y\n(C) z\n(D) w\nAnswer:"
    )


def test_story_cloze_shows_two_endings_and_ends_with_end_label() -> None:
    record = {
        "question": "Tyler went to a baseball game. He saw his favorite team! His team played "
        "hard. His team won!",
        "choices": ["Tyler got depressed.", "Tyler was elated!", "ignored third"],
    }
    assert build_prompt("story_cloze", record) == (
        few_shot_head("story_cloze")
        + record["question"]
        + "\n(A) Tyler got depressed.\n(B) Tyler was elated!\nEnd:"
    )
    assert build_prompt("story_cloze", {"question": "S"}).endswith("S\n(A) \n(B) \nEnd:")


def test_lambada_and_unknown_tasks_use_the_question_verbatim() -> None:
    passage = "“we have to go to the"
    assert build_prompt("lambada", {"question": passage, "choices": ["a"]}) == passage
    assert build_prompt("openai", {"question": "  hi  ", "context": "c"}) == "  hi  "


def test_missing_choices_give_an_empty_option_block() -> None:
    assert build_prompt("mmlu", {"question": "Q"}) == few_shot_head("mmlu") + "Q\n\nAnswer:"


def test_the_answer_and_a_record_prefix_are_never_shown() -> None:
    record = {
        "question": "Q",
        "choices": ["a", "b"],
        "answer": "SECRET",
        "few_shot_prefix": "IGNORED ",
    }
    prompt = build_prompt("obqa", record)
    assert "SECRET" not in prompt and "IGNORED" not in prompt


def test_format_options() -> None:
    assert format_options(["x", "y"]) == "(A) x\n(B) y"
    assert format_options([]) == ""


@pytest.mark.parametrize(
    ("task", "length", "sha16"),
    [
        ("mmlu", 327, "785046b7f53ca5a1"),
        ("obqa", 278, "28193427920bf03e"),
        ("hellaswag", 518, "4ea0b850c7454069"),
        ("race", 300, "b0c3e7220045940b"),
        ("siqa", 352, "0303c9e4f317dac7"),
        ("squad", 333, "fd98bc42ece43c0f"),
        ("story_cloze", 473, "6bd19a959617f304"),
    ],
)
def test_heads_match_the_spec_fingerprints(task: str, length: int, sha16: str) -> None:
    head = few_shot_head(task)
    assert len(head) == length
    assert hashlib.sha256(head.encode()).hexdigest()[:16] == sha16
    assert head.endswith(": ")
    assert few_shot_head("lambada") == ""


@pytest.mark.parametrize("task", TASKS)
def test_every_task_file_row_is_reproduced(task: str) -> None:
    rows = _rows(task)
    mismatched = [
        r["id"] for r in rows if build_prompt(task, r) != r.get("few_shot_prefix", "") + r["prompt"]
    ]
    assert mismatched == []


def test_prompt_rows_carry_what_the_output_record_copies() -> None:
    rows = build_prompt_rows("mmlu", read_task_file(TASKS_DIR / "mmlu.jsonl", max_samples=2))
    assert [r["id"] for r in rows] == [0, 1]
    assert rows[0]["task"] == "mmlu" and rows[0]["ground_truth"] == "4"
    assert rows[0]["choices"] == ["0", "4", "2", "6"]
    assert rows[0]["prompt"].endswith("(D) 6\nAnswer:")
    squad = build_prompt_rows(
        "squad", [{"id": "x", "question": "q", "answer": "A", "ground_truth": "G", "choices": []}]
    )
    assert squad[0]["ground_truth"] == "A"  # `answer` wins, as in the generation CLI
    assert "choices" not in squad[0]


def test_max_samples_keeps_the_first_rows_and_zero_keeps_all() -> None:
    assert len(read_task_file(TASKS_DIR / "obqa.jsonl", max_samples=3)) == 3
    assert len(read_task_file(TASKS_DIR / "obqa.jsonl", max_samples=0)) == 500
