"""Option-letter extraction for the multiple-choice tasks (spec/eval.md §6.5–§6.7).

Contract: pure functions. `predict_letter` resolves a model generation to an option letter,
`ground_truth_letter` resolves a reference answer string; both return a `LetterMatch` whose
`letter` is "" when nothing resolves and whose `method` records which rule fired ("letter",
"exact", "substring", "fuzzy"), so resolution statistics can be checked against eval.md §7.

Reference quirks kept on purpose (they move the published numbers): the article "a" after
"answer is" reads as letter A, a bracketed letter anywhere in a short text counts, substring
matching is character-level, and the leading-phrase removal is anchored at the very start of the
*unstripped* candidate, so a leading space defeats it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cola_batch.eval.primitives import normalize, similarity

MAX_LETTERS = 26
FUZZY_THRESHOLD = 0.9
SHORT_TEXT_CHARS = 40

# "answer"/"final answer", one optional separator, then the rest of the line (at least one char).
_ANSWER_SEGMENT = re.compile(r"\b(?:final\s+answer|answer)\b\s*(?:is|=|:|：)?\s*(.+)", re.I)
_SINGLE_LETTER = re.compile(r"^[(\[]?\s*([A-Za-z])\s*[)\]]?\.?$")
_KEYWORD_LETTER = re.compile(
    r"\b(?:final\s+answer|answer|option|choice)\b\s*(?:is|=|:|：)?\s*[(\[]?([A-Za-z])[)\]]?"
    r"(?=\s|$|[.,;:!?])",
    re.I,
)
_BRACKETED_LETTER = re.compile(r"\(\s*([A-Za-z])\s*\)|\[\s*([A-Za-z])\s*\]")
_LEADING_PHRASE = re.compile(
    r"^(?:the\s+)?(?:correct\s+)?(?:final\s+)?(?:answer|option|choice)\s*(?:is|=|:|：)?", re.I
)


@dataclass(frozen=True)
class LetterMatch:
    """A resolved option letter ("" if none) and the rule that produced it (None if none)."""

    letter: str = ""
    method: str | None = None


NO_MATCH = LetterMatch()


def letter_of(index: int) -> str:
    """Option label for a 0-based position: A, B, C, ..."""
    return chr(ord("A") + index)


def option_count(choices: Sequence[Any] | None) -> int:
    """K = min(number of options, 26); 0 when there are no options."""
    return min(len(choices), MAX_LETTERS) if choices else 0


def _in_range(letter: str, k: int) -> str:
    up = letter.upper()
    return up if ord(up) - ord("A") < k else ""


def answer_segment(generation: str) -> str:
    """Text after the last line's "answer[:| is| =]" marker, or the whole stripped generation."""
    stripped = generation.strip()
    if not stripped:
        return ""
    lines = [line.strip() for line in stripped.splitlines()]
    for line in reversed([line for line in lines if line]):
        found = _ANSWER_SEGMENT.search(line)
        if found:
            return found.group(1).strip()
    return stripped


def letter_rules(candidate: str, k: int) -> str:
    """Rules (a): lone letter, keyword + letter (last occurrence), short-text bracketed letter."""
    text = candidate.strip()
    lone = _SINGLE_LETTER.match(text)
    if lone:
        got = _in_range(lone.group(1), k)
        if got:
            return got
    keyed = _KEYWORD_LETTER.findall(text)
    if keyed:
        got = _in_range(keyed[-1], k)
        if got:
            return got
    if len(text) <= SHORT_TEXT_CHARS:
        bracketed = _BRACKETED_LETTER.findall(text)
        if bracketed:
            paren, square = bracketed[-1]
            return _in_range(paren or square, k)
    return ""


def text_match(candidate: str, choices: Sequence[Any], k: int) -> LetterMatch:
    """Rules (b): match the candidate against option texts (exact, substring, fuzzy >= 0.9)."""
    norm = normalize(candidate)
    if not norm:
        return NO_MATCH
    options = [normalize(c) for c in choices[:k]]
    for i, opt in enumerate(options):
        if opt == norm:
            return LetterMatch(letter_of(i), "exact")
    cleaned = normalize(_LEADING_PHRASE.sub("", candidate, count=1).strip())
    if not cleaned:
        return NO_MATCH
    for i, opt in enumerate(options):
        if opt == cleaned:
            return LetterMatch(letter_of(i), "exact")
    contained = [i for i, opt in enumerate(options) if opt and opt in cleaned]
    if len(contained) == 1:
        return LetterMatch(letter_of(contained[0]), "substring")
    best_i, best = -1, -1.0
    for i, opt in enumerate(options):
        score = similarity(cleaned, opt)
        if score > best:
            best_i, best = i, score
    if best_i >= 0 and best >= FUZZY_THRESHOLD:
        return LetterMatch(letter_of(best_i), "fuzzy")
    return NO_MATCH


def _resolve(candidate: str, choices: Sequence[Any], k: int) -> LetterMatch:
    got = letter_rules(candidate, k)
    if got:
        return LetterMatch(got, "letter")
    return text_match(candidate, choices, k)


def predict_letter(generation: Any, choices: Sequence[Any] | None) -> LetterMatch:
    """Letter the model chose: try the answer segment, then the full (unstripped) generation."""
    k = option_count(choices)
    text = "" if generation is None else str(generation)
    if k == 0 or not text.strip():
        return NO_MATCH
    assert choices is not None
    for candidate in (answer_segment(text), text):
        found = _resolve(candidate, choices, k)
        if found.letter:
            return found
    return NO_MATCH


def ground_truth_letter(ground_truth: Any, choices: Sequence[Any] | None) -> LetterMatch:
    """Letter of the reference answer: letter rules first, then text matching.

    Options that normalise identically resolve to the first of them (the reference quirk that
    mis-resolves five published mmlu ground truths; kept for parity).
    """
    k = option_count(choices)
    if k == 0:
        return NO_MATCH
    assert choices is not None
    return _resolve("" if ground_truth is None else str(ground_truth), choices, k)
