"""Chat messages -> prompt (spec/inference.md §12.4 adapter rule, §11 text and ChatML formats)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from cola_batch.chat import (
    ChatTemplateError,
    apply_chat_template,
    content_text,
    parse_template_map,
    render_chatml,
    render_openai,
    render_text,
    template_for_model,
)


def user(text: object) -> dict:
    return {"role": "user", "content": text}


def test_a_lone_user_message_is_the_prompt_verbatim() -> None:
    assert render_openai([user("  The capital of France is\n")]) == "  The capital of France is\n"
    assert render_openai([user("")]) == ""  # generation, not templating, rejects it (HTTP 500)


def test_a_lone_user_message_with_another_spelling_gets_labels() -> None:
    assert render_openai([{"role": "User", "content": " Hi "}]) == "User: Hi\nAssistant:"


def test_conversation_lines_are_stripped_labelled_and_end_with_assistant() -> None:
    messages = [
        {"role": "system", "content": " Be brief. "},
        user("What is 2+2?"),
        {"role": "assistant", "content": "4"},
        {"role": "SYSTEM", "content": "   "},  # empty after stripping: skipped
        user("And 3+3?"),
    ]
    assert render_openai(messages) == (
        "System: Be brief.\nUser: What is 2+2?\nAssistant: 4\nUser: And 3+3?\nAssistant:"
    )


def test_no_assistant_line_when_the_last_role_is_exactly_assistant() -> None:
    assert render_openai([user("Hi"), {"role": "assistant", "content": "Hel"}]) == (
        "User: Hi\nAssistant: Hel"
    )
    # the role check for the final line is case-sensitive, the label mapping is not
    assert render_openai([user("Hi"), {"role": "Assistant", "content": "Hel"}]) == (
        "User: Hi\nAssistant: Hel\nAssistant:"
    )
    # the last message decides even when it was skipped for being empty
    assert render_openai([user("Hi"), {"role": "assistant", "content": ""}]) == "User: Hi"


def test_other_roles_keep_their_original_spelling() -> None:
    messages = [user("Weather?"), {"role": "Tool", "content": "sunny"}]
    assert render_openai(messages) == "User: Weather?\nTool: sunny\nAssistant:"


def test_content_parts() -> None:
    parts = [
        {"type": "text", "text": "first"},
        "second",
        {"type": "image_url", "image_url": {"url": "x"}},
        {"text": 3},
        {"type": "text", "text": ""},
        7,
    ]
    assert content_text(parts) == "first\nsecond\n3"
    assert content_text(None) == ""
    assert content_text(42) == "42"
    assert render_openai([user(parts)]) == "first\nsecond\n3"


def test_empty_inputs_are_rejected() -> None:
    with pytest.raises(ChatTemplateError):
        render_openai([])
    with pytest.raises(ChatTemplateError):
        render_openai([user("  "), {"role": "assistant", "content": None}])
    with pytest.raises(ChatTemplateError):
        render_openai([{"content": "no role"}])


def test_attribute_style_messages() -> None:
    @dataclass
    class Message:
        role: str
        content: object = ""

    assert render_openai([Message("system", "S"), Message("user", "U")]) == (
        "System: S\nUser: U\nAssistant:"
    )


CONVERSATION = [
    {"role": "system", "content": "Be kind."},
    user("Hi"),
    {"role": "assistant", "content": "Hello!"},
    user("Bye"),
]


def test_text_format_of_the_chat_cli() -> None:
    assert render_text(CONVERSATION) == (
        "System: Be kind.\nUser: Hi\nAssistant: Hello!■\nUser: Bye\nAssistant: "
    )
    assert render_text([{"role": "system", "content": ""}, user("Hi")]) == ("User: Hi\nAssistant: ")


def test_chatml_format_of_the_chat_cli() -> None:
    assert render_chatml(CONVERSATION) == (
        "<|im_start|>system\nBe kind.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with pytest.raises(ChatTemplateError):
        render_chatml([{"role": "tool", "content": "x"}])


def test_template_is_selected_per_model_name() -> None:
    mapping = parse_template_map(" cola-sft = chatml, cola-text=text ,")
    assert mapping == {"cola-sft": "chatml", "cola-text": "text"}
    assert template_for_model("cola-sft", mapping) == "chatml"
    assert template_for_model("cola-dlm", mapping) == "openai"
    assert apply_chat_template([user("Hi")], model="cola-sft", mapping=mapping) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert apply_chat_template([user("Hi")], model="cola-dlm", mapping=mapping) == "Hi"
    assert apply_chat_template([user("Hi")], template="text") == "User: Hi\nAssistant: "
    with pytest.raises(ChatTemplateError):
        apply_chat_template([user("Hi")], template="llama")
    with pytest.raises(ChatTemplateError):
        parse_template_map("cola=jinja")
