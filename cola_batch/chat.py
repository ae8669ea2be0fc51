"""Chat messages -> prompt string, with the template selectable per model name.

Contract: pure functions, no tokenizer. Three templates:

* `openai` (default) — the reference OpenAI adapter's rendering (spec/inference.md §12.4): a lone
  `user` message is the prompt verbatim; otherwise stripped, non-empty messages become
  `System: …` / `User: …` / `Assistant: …` / `<role>: …` lines, and a final `Assistant:` line
  is added unless the last message's role is exactly `assistant`.
* `text` — the reference chat CLI's text format (inference.md §11): `System: …⏎`,
  `User: …⏎`, `Assistant: …■⏎`, then `Assistant: ` (trailing space); stop text `■`.
* `chatml` — the chat CLI's ChatML format: `<|im_start|>role⏎…<|im_end|>⏎` per message, then
  `<|im_start|>assistant⏎`; stop token `<|im_end|>`.

`template_for_model(model, mapping)` picks the template for a served model name (default
`openai`); `parse_template_map("a=chatml,b=text")` reads such a mapping from a setting string.
Invalid input raises `ChatTemplateError` (a ValueError; an HTTP layer maps it to 400).
Shared by the producer (OpenAI batch lines), the HTTP API and the benchmark.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

TEXT_STOP = "■"
DEFAULT_TEMPLATE = "openai"
_ROLE_LABELS = {"system": "System", "assistant": "Assistant", "user": "User"}


class ChatTemplateError(ValueError):
    """Messages that cannot be rendered into a prompt."""


def content_text(content: Any) -> str:
    """Message content as text: None -> "", str as is, list of parts -> text parts joined.

    List items count when they are strings, or dicts with `type` "text" or a `text` key (their
    `text`, stringified; a missing or null `text` counts as ""); empty parts are dropped and the
    rest joined with newlines. Anything else is stringified.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for item in content:
            if isinstance(item, str):
                part = item
            elif isinstance(item, dict) and (item.get("type") == "text" or "text" in item):
                value = item.get("text")
                part = "" if value is None else str(value)
            else:
                continue
            if part:
                parts.append(part)
        return "\n".join(parts)
    return str(content)


def _role_and_text(message: Any) -> tuple[str, str]:
    if isinstance(message, Mapping):
        role, content = message.get("role"), message.get("content", "")
    else:  # pydantic models and other attribute-style message objects
        role, content = getattr(message, "role", None), getattr(message, "content", "")
    if not isinstance(role, str):
        raise ChatTemplateError("every message needs a string 'role'")
    return role, content_text(content)


def render_openai(messages: Sequence[Any]) -> str:
    """inference.md §12.4: the reference adapter's messages -> prompt rule."""
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        raise ChatTemplateError("messages must be a list of {role, content} objects")
    if not messages:
        raise ChatTemplateError("messages is empty")
    turns = [_role_and_text(m) for m in messages]
    if len(turns) == 1 and turns[0][0] == "user":
        return turns[0][1]
    lines: list[str] = []
    for role, text in turns:
        text = text.strip()
        if not text:
            continue
        lines.append(f"{_ROLE_LABELS.get(role.lower(), role)}: {text}")
    if not lines:
        raise ChatTemplateError("every message's content is empty")
    if turns[-1][0] != "assistant":
        lines.append("Assistant:")
    return "\n".join(lines)


def _cli_turns(messages: Sequence[Any]) -> list[tuple[str, str]]:
    if not messages:
        raise ChatTemplateError("messages is empty")
    turns: list[tuple[str, str]] = []
    for message in messages:
        role, text = _role_and_text(message)
        role = role.lower()
        if role not in _ROLE_LABELS:
            raise ChatTemplateError(f"role {role!r} is not one of system, user, assistant")
        if role == "system" and not text:
            continue  # the chat CLI emits the system line only for a non-empty system prompt
        turns.append((role, text))
    return turns


def render_text(messages: Sequence[Any]) -> str:
    """inference.md §11 text format; the model's turn ends with the stop text `■`."""
    out: list[str] = []
    for role, text in _cli_turns(messages):
        stop = TEXT_STOP if role == "assistant" else ""
        out.append(f"{_ROLE_LABELS[role]}: {text}{stop}\n")
    return "".join(out) + "Assistant: "


def render_chatml(messages: Sequence[Any]) -> str:
    """inference.md §11 ChatML format, ending with an open assistant turn."""
    out = [f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in _cli_turns(messages)]
    return "".join(out) + "<|im_start|>assistant\n"


CHAT_TEMPLATES: dict[str, Callable[[Sequence[Any]], str]] = {
    "openai": render_openai,
    "text": render_text,
    "chatml": render_chatml,
}


def parse_template_map(spec: str) -> dict[str, str]:
    """`"model-a=chatml, model-b=text"` -> {"model-a": "chatml", "model-b": "text"}."""
    mapping: dict[str, str] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        model, sep, template = item.partition("=")
        model, template = model.strip(), template.strip()
        if not sep or not model or template not in CHAT_TEMPLATES:
            raise ChatTemplateError(
                f"bad chat template mapping {item!r}; "
                f"expected MODEL=TEMPLATE with TEMPLATE one of {sorted(CHAT_TEMPLATES)}"
            )
        mapping[model] = template
    return mapping


def template_for_model(model: str | None, mapping: Mapping[str, str] | None = None) -> str:
    """Template name for a model: its entry in `mapping`, else the default (`openai`)."""
    if mapping and model is not None and model in mapping:
        return mapping[model]
    return DEFAULT_TEMPLATE


def apply_chat_template(
    messages: Sequence[Any],
    *,
    template: str | None = None,
    model: str | None = None,
    mapping: Mapping[str, str] | None = None,
) -> str:
    """Render `messages` with `template`, or with the template chosen for `model`."""
    name = template or template_for_model(model, mapping)
    if name not in CHAT_TEMPLATES:
        raise ChatTemplateError(f"unknown chat template {name!r}; known: {sorted(CHAT_TEMPLATES)}")
    return CHAT_TEMPLATES[name](messages)


# The producer's name for the default rendering of OpenAI batch lines.
messages_to_prompt = render_openai
