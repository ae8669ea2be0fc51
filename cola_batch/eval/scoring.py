"""Benchmark scoring: preprocessing, per-task decision rule, accuracy (spec/eval.md §6.2–§6.9).

Contract: pure functions over lists of record dicts; nothing here reads or writes files.

Difference from the reference scorer (deliberate, numbers unaffected): the reference rewrites
each generation file in place during preprocessing (split `generate`, strip the common prompt
prefix, reorder keys). Here `preprocess_records` returns *new* dicts and never mutates its input,
so scoring the same folder twice, or scoring read-only published files, gives the same result.

Task identity is the file stem (the caller passes it); a record's own fields never name its task.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cola_batch.eval.letters import ground_truth_letter, predict_letter
from cola_batch.eval.primitives import common_prefix, first_word, similarity, split_generation

TASKS: tuple[str, ...] = (
    "lambada",
    "mmlu",
    "obqa",
    "hellaswag",
    "race",
    "siqa",
    "squad",
    "story_cloze",
)
LETTER_TASKS = frozenset({"mmlu", "obqa", "race", "siqa"})
SIMILARITY_TASKS = frozenset({"hellaswag", "story_cloze", "squad"})
THRESHOLD = 1.0
MOD_FIELD = "prompt_len_mod_patch_size"
_LEADING_KEYS = ("id", "prompt", "generate", "ground_truth")


class RecordError(ValueError):
    """A record the scorer cannot score; it is reported and excluded from all counts."""


def preprocess_records(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """§6.2 on copies: split `generate` into `generate` + `others`, move the common prompt
    prefix into `few_shot_prefix`, put id/prompt/generate/ground_truth first."""
    out: list[dict[str, Any]] = []
    for rec in records:
        new = dict(rec)
        gen = new.get("generate")
        if isinstance(gen, str):
            kept, rest = split_generation(gen)
            if rest is not None:
                new["generate"], new["others"] = kept, rest
        out.append(new)
    prompts = [r["prompt"] for r in out if isinstance(r.get("prompt"), str)]
    # a missing or non-string prompt shares no characters with anything: no common prefix
    prefix = common_prefix(prompts) if len(prompts) == len(out) else ""
    if prefix:
        for r in out:
            if r["prompt"].startswith(prefix):
                r["prompt"] = r["prompt"][len(prefix) :]
                r["few_shot_prefix"] = prefix
    return [_reorder(r) for r in out]


def _reorder(rec: dict[str, Any]) -> dict[str, Any]:
    head = {k: rec[k] for k in _LEADING_KEYS if k in rec}
    head.update((k, v) for k, v in rec.items() if k not in head)
    return head


def _text_field(rec: Mapping[str, Any], key: str) -> str:
    value = rec.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RecordError(f"field {key!r} is {type(value).__name__}, expected a string")
    return value


def _ground_truth(rec: Mapping[str, Any]) -> str:
    if rec.get("ground_truth") is not None:
        return _text_field(rec, "ground_truth")
    return _text_field(rec, "answer")


def _choices(rec: Mapping[str, Any]) -> list[Any]:
    value = rec.get("choices")
    if value is None:
        return []
    if not isinstance(value, list):
        raise RecordError(f"field 'choices' is {type(value).__name__}, expected a list")
    return value


def score_record(task: str, rec: Mapping[str, Any]) -> dict[str, Any]:
    """Score one preprocessed record; returns a copy with the §6.8 fields and `correct` added.

    Also records `resolved_by` (which rule resolved the predicted letter) for multiple-choice
    tasks; that field is ours, not the reference's.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    gen, gt = _text_field(rec, "generate"), _ground_truth(rec)
    out = dict(rec)
    if task == "lambada":
        gen_word, gt_word = first_word(gen), first_word(gt)
        score = 1.0 if gen_word == gt_word else 0.0
        out["extracted_gen_word"], out["extracted_gt_word"] = gen_word, gt_word
    elif task in LETTER_TASKS:
        choices = _choices(rec)
        pred, truth = predict_letter(gen, choices), ground_truth_letter(gt, choices)
        score = 1.0 if pred.letter and pred.letter == truth.letter else similarity(gen, gt)
        out["extracted_gen_choice"], out["extracted_gt_choice"] = pred.letter, truth.letter
        out["resolved_by"] = pred.method
    else:
        score = similarity(gen, gt)
    out["similarity_score"] = round(score, 4)
    out["correct"] = score >= THRESHOLD
    return out


@dataclass
class TaskScore:
    """Scored records of one task file plus per-remainder buckets and rejected lines."""

    task: str
    correct: list[dict[str, Any]] = field(default_factory=list)
    wrong: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # remainder r -> scored records in that bucket (own field or borrowed by id)
    bucket_records: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.correct) + len(self.wrong)

    @property
    def accuracy(self) -> float | None:
        """100 * correct / scored rows, or None when no row was scored."""
        return 100.0 * len(self.correct) / self.total if self.total else None

    @property
    def buckets(self) -> dict[int, tuple[int, int]]:
        """remainder -> (correct, total), ascending by remainder."""
        return {
            r: (sum(1 for x in recs if x["correct"]), len(recs))
            for r, recs in sorted(self.bucket_records.items())
        }

    def bucket_accuracy(self) -> dict[int, float]:
        return {r: 100.0 * c / n for r, (c, n) in self.buckets.items() if n}


def score_task(
    task: str,
    records: Sequence[Mapping[str, Any]],
    *,
    bucket_of: Mapping[Any, int] | None = None,
) -> TaskScore:
    """Preprocess then score every record of one task file.

    `bucket_of` maps sample id -> prompt-length remainder for records that lack the
    `prompt_len_mod_patch_size` field (the reference borrows it from another column by id).
    """
    result = TaskScore(task)
    for i, rec in enumerate(preprocess_records(records)):
        try:
            scored = score_record(task, rec)
        except RecordError as exc:
            result.errors.append(f"{task} record {i} (id {rec.get('id')!r}): {exc}")
            continue
        (result.correct if scored["correct"] else result.wrong).append(scored)
        remainder = _remainder(scored, bucket_of)
        if remainder is not None:
            result.bucket_records.setdefault(remainder, []).append(scored)
    return result


def _remainder(rec: Mapping[str, Any], bucket_of: Mapping[Any, int] | None) -> int | None:
    value = rec.get(MOD_FIELD)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if bucket_of is not None:
        return bucket_of.get(_id_key(rec.get("id")))
    return None


def _id_key(value: Any) -> Any:
    return value if isinstance(value, int | str) else repr(value)


def remainder_map(records: Iterable[Mapping[str, Any]]) -> dict[Any, int]:
    """id -> prompt_len_mod_patch_size for the records that carry the field."""
    return {
        _id_key(r.get("id")): r[MOD_FIELD]
        for r in records
        if isinstance(r.get(MOD_FIELD), int) and not isinstance(r.get(MOD_FIELD), bool)
    }


def average_accuracy(scores: Iterable[TaskScore | None]) -> float | None:
    """Arithmetic mean of the available (unrounded) task accuracies."""
    values = [s.accuracy for s in scores if s is not None and s.accuracy is not None]
    return sum(values) / len(values) if values else None
