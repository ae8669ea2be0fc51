"""Chat messages -> one prompt string, as the reference's OpenAI adapter builds it.

Contract (spec/inference.md §12.4): content to text — null -> "", a string as is, a list ->
its string items plus the `text` of dict items (typed `text`, or any dict with a `text` key),
empty parts dropped, joined with newlines; anything else -> its string form. Exactly one
message whose role is exactly `user` -> its text verbatim. Otherwise each message's text is
stripped, empty ones skipped, and emitted as `System: …`, `Assistant: …`, `User: …` (role
compared case-insensitively) or `<role>: …`; if the last message's role is not exactly
`assistant`, a final `Assistant:` line is added. Lines are joined with newlines.
No message, or nothing emitted -> `ChatTemplateError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

_ROLE_LABELS = {"system": "System", "assistant": "Assistant", "user": "User"}


class ChatTemplateError(ValueError):
    """The messages cannot be turned into a prompt."""


def content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for item in content:
            if isinstance(item, str):
                part = item
            elif isinstance(item, Mapping) and (item.get("type") == "text" or "text" in item):
                part = str(item.get("text", ""))
            else:
                continue
            if part:
                parts.append(part)
        return "\n".join(parts)
    return str(content)


def messages_to_prompt(messages: Sequence[Mapping[str, Any]]) -> str:
    """The prompt for `messages` (OpenAI chat format)."""
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        raise ChatTemplateError("messages must be a list of {role, content} objects")
    if not messages:
        raise ChatTemplateError("messages is empty")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"messages[{index}] is not an object with a string role")
    if len(messages) == 1 and messages[0]["role"] == "user":
        return content_text(messages[0].get("content", ""))
    lines: list[str] = []
    for message in messages:
        text = content_text(message.get("content", "")).strip()
        if not text:
            continue
        role: str = message["role"]
        label = _ROLE_LABELS.get(role.lower(), role)
        lines.append(f"{label}: {text}")
    if not lines:
        raise ChatTemplateError("every message's content is empty")
    if messages[-1]["role"] != "assistant":
        lines.append("Assistant:")
    return "\n".join(lines)
