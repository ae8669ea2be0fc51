"""Benchmark prompt templates (spec/eval.md §4): task name + input record -> prompt string.

Contract: `build_prompt(task, record)` is a pure function that reads only `question`, `context`
(squad) and `choices` from the record, exactly like the reference generation CLI; the answer
field is never shown to the model and a record's own `few_shot_prefix` is ignored (the head is
fixed per task). Unknown task names get `question` verbatim. For every row of
`shared/data/tasks/<task>.jsonl`, `build_prompt(task, row) == row.get("few_shot_prefix", "") +
row["prompt"]` (tested).

The few-shot heads below are benchmark *data* (the worked examples of the published run, also
stored in the task files' `few_shot_prefix` field), not code; their lengths and SHA-256 prefixes
are pinned by eval.md §4 and checked in tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

FEW_SHOT_HEADS: dict[str, str] = {
    "mmlu": (
        "Question: Which gas do plants absorb from the air during photosynthesis?\n"
        "(A) Oxygen\n"
        "(B) Carbon dioxide\n"
        "(C) Nitrogen\n"
        "(D) Hydrogen\n"
        "Answer: Carbon dioxide\n"
        "\n"
        "Question: A triangle has angles 50 degrees and 60 degrees. What is the third angle?\n"
        "(A) 60 degrees\n"
        "(B) 70 degrees\n"
        "(C) 80 degrees\n"
        "(D) 90 degrees\n"
        "Answer: 70 degrees\n"
        "\n"
        "Question: "
    ),
    "obqa": (
        "Question: Which tool is best for tightening a screw?\n"
        "(A) spoon\n"
        "(B) hammer\n"
        "(C) screwdriver\n"
        "(D) paintbrush\n"
        "Answer: screwdriver\n"
        "\n"
        "Question: What do plants absorb from the air during photosynthesis?\n"
        "(A) carbon dioxide\n"
        "(B) oxygen\n"
        "(C) helium\n"
        "(D) salt\n"
        "Answer: carbon dioxide\n"
        "\n"
        "Question: "
    ),
    "hellaswag": (
        "Context: The girl puts the bread into the toaster and pushes the lever down. "
        "The bread\n"
        "(A) becomes a slice of pizza.\n"
        "(B) starts to toast and turn brown.\n"
        "(C) disappears immediately.\n"
        "(D) turns into a glass of water.\n"
        "Answer: starts to toast and turn brown.\n"
        "\n"
        "Context: The goalkeeper sees the ball coming towards the net. He dives and\n"
        "(A) catches the ball with his hands.\n"
        "(B) starts dancing in the field.\n"
        "(C) opens a laptop to check email.\n"
        "(D) runs away from the stadium.\n"
        "Answer: catches the ball with his hands.\n"
        "\n"
        "Context: "
    ),
    "race": (
        "Read the following article and answer the question.\n"
        "\n"
        "Article: Mary went to the store to buy some fruits. She bought five apples and "
        "two oranges. She paid 5 dollars in total. What did Mary buy?\n"
        "Options:\n"
        "(A) Bananas\n"
        "(B) Apples and oranges\n"
        "(C) Grapes\n"
        "(D) Watermelon\n"
        "Answer: Apples and oranges\n"
        "\n"
        "Article: "
    ),
    "siqa": (
        "Question: Jordan wanted to tell a joke to his friends. What does Jordan need to "
        "do before this?\n"
        "(A) ignore his friends\n"
        "(B) think of a funny story\n"
        "(C) leave the room\n"
        "Answer: think of a funny story\n"
        "\n"
        "Question: Kai helped his neighbor carry heavy groceries inside. How would the "
        "neighbor feel?\n"
        "(A) angry\n"
        "(B) grateful\n"
        "(C) scared\n"
        "Answer: grateful\n"
        "\n"
        "Question: "
    ),
    "squad": (
        "Context: The Normans (Norman: Nourmands; French: Normands; Latin: Normanni) "
        "were the people who in the 10th and 11th centuries gave their name to Normandy, "
        "a region in France. They were descended from Norse raiders and pirates from "
        "Denmark, Iceland and Norway.\n"
        "Question: In what country is Normandy located?\n"
        "Answer: France\n"
        "\n"
        "Context: "
    ),
    "story_cloze": (
        "Story: I wanted to make an omelet. I cracked two eggs into a bowl and whisked "
        "them. Then I poured them into a hot pan.\n"
        "(A) I ate a delicious omelet for breakfast.\n"
        "(B) I decided to order a pizza instead.\n"
        "End: I ate a delicious omelet for breakfast.\n"
        "\n"
        "Story: The runner tied his shoes tight. He sprinted as fast as he could during "
        "the race. He crossed the finish line first.\n"
        "(A) He was sad that he lost the race.\n"
        "(B) He won the gold medal.\n"
        "End: He won the gold medal.\n"
        "\n"
        "Story: "
    ),
}

MULTIPLE_CHOICE_TASKS = frozenset({"mmlu", "obqa", "siqa", "hellaswag", "race", "story_cloze"})


def few_shot_head(task: str) -> str:
    """The fixed few-shot head of a task ("" for lambada and unknown tasks)."""
    return FEW_SHOT_HEADS.get(task, "")


def _text(record: Mapping[str, Any], key: str) -> str:
    value = record.get(key)
    return "" if value is None else str(value)


def _choices(record: Mapping[str, Any]) -> list[str]:
    value = record.get("choices")
    return [str(c) for c in value] if value else []


def format_options(choices: Sequence[Any]) -> str:
    """`(A) text` lines joined by newlines, no trailing newline ("" for no options)."""
    return "\n".join(f"({chr(ord('A') + i)}) {choice}" for i, choice in enumerate(choices))


def build_prompt(task: str, record: Mapping[str, Any]) -> str:
    """The prompt string the reference fed to the tokenizer for this task and input record.

    Missing `question`/`context` count as "", missing `choices` as no options (the option block
    is then empty, giving `question⏎⏎Answer:`); story_cloze always shows exactly two endings,
    padding absent ones with "".
    """
    question = _text(record, "question")
    head = few_shot_head(task)
    if task == "squad":
        return f"{head}{_text(record, 'context')}\nQuestion: {question}\nAnswer:"
    if task in ("mmlu", "obqa", "siqa", "hellaswag"):
        return f"{head}{question}\n{format_options(_choices(record))}\nAnswer:"
    if task == "race":
        return f"{head}{question}\nOptions:\n{format_options(_choices(record))}\nAnswer:"
    if task == "story_cloze":
        endings = (_choices(record) + ["", ""])[:2]
        return f"{head}{question}\n(A) {endings[0]}\n(B) {endings[1]}\nEnd:"
    return question  # lambada and any other task: the passage verbatim
