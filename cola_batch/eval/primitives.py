"""Text primitives of the benchmark scorer (spec/eval.md §6.2 step 2 and §6.3).

Contract: pure functions on strings, no I/O. They reproduce the reference scorer's behaviour
exactly, quirks included (punctuation and signs vanish in `normalize`, `similarity` keeps
difflib's automatic junk heuristic), because the published accuracies depend on them.
"""

from __future__ import annotations

import re
from difflib import SequenceMatcher
from typing import Any

_NOT_WORD_OR_SPACE = re.compile(r"[^\w\s]")
_SPACE_RUN = re.compile(r"\s+")
_WORD_CHAR = re.compile(r"\w")


def normalize(text: Any) -> str:
    """Lower-case, strip, drop every non-word non-space character, collapse whitespace runs.

    Collapsing also trims the ends, so whitespace uncovered by the deletion goes too ("- x" ->
    "x", "reproduction ?" -> "reproduction"). eval.md §6.3 leaves this open; only the trimming
    reading reproduces the resolution table of eval.md §7 (obqa: 411 exact matches, not 410).
    """
    if text is None:
        return ""
    s = str(text).lower().strip()
    s = _NOT_WORD_OR_SPACE.sub("", s)
    return _SPACE_RUN.sub(" ", s).strip()


def similarity(a: Any, b: Any) -> float:
    """difflib ratio of the normalised strings; 1.0 when both normalise to empty."""
    na, nb = normalize(a), normalize(b)
    if not na and not nb:
        return 1.0
    return SequenceMatcher(None, na, nb).ratio()


def first_word(text: Any) -> str:
    """First whitespace-separated token of `normalize(text)`, or ""."""
    parts = normalize(text).split()
    return parts[0] if parts else ""


def split_generation(generate: str) -> tuple[str, str | None]:
    """Cut a generation at its first newline that follows at least one word character.

    Returns (kept text, remainder after that newline), or (generate, None) when no such newline
    exists. Blank or punctuation-only lines before the first word stay in the kept text.
    """
    first = _WORD_CHAR.search(generate)
    if first is None:
        return generate, None
    cut = generate.find("\n", first.start())
    if cut == -1:
        return generate, None
    return generate[:cut], generate[cut + 1 :]


def common_prefix(strings: list[str]) -> str:
    """Longest common character prefix of `strings` ("" for an empty list)."""
    if not strings:
        return ""
    lo, hi = min(strings), max(strings)
    n = 0
    for x, y in zip(lo, hi, strict=False):
        if x != y:
            break
        n += 1
    return lo[:n]
