"""Prompt → token ids → block-aligned latent layout (spec/inference.md §3.3–§3.6, §3.11).

Contract:
* `special_ids(tokenizer)` looks EOS / im_end / PAD up by their text and falls back to the
  reference ids (100257, 100265, 100277).
* `tokenize(tokenizer, text)` is the tokenizer library's default `encode` (no BOS added).
* `plan_prompt(n_tokens, S, P)` gives the per-sample geometry: right padding to whole blocks
  of C = S·P tokens, prefix latents (complete prompt blocks only), pinned first-block positions
  and the trim count of re-predicted prompt tokens. Pure integer arithmetic.
* `blocks_needed(...)` is the block budget: reference accounting `max(1, ⌈mnt/C⌉)` (pinned
  prompt positions count against the budget), or per-sample accounting `⌈(trim + mnt)/C⌉`
  (exactly `max_new_tokens` new tokens are produced before trimming to the budget).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tokenizers import Tokenizer

REFERENCE_EOS, REFERENCE_IM_END, REFERENCE_PAD = 100257, 100265, 100277


@dataclass(frozen=True)
class SpecialIds:
    eos: int | None
    im_end: int | None
    pad: int

    @property
    def stops(self) -> tuple[int, ...]:
        return tuple(t for t in (self.eos, self.im_end) if t is not None)


def special_ids(tokenizer: Tokenizer | None) -> SpecialIds:
    def look(text: str, fallback: int) -> int:
        tid = tokenizer.token_to_id(text) if tokenizer is not None else None
        return fallback if tid is None else int(tid)

    return SpecialIds(
        eos=look("<|endoftext|>", REFERENCE_EOS),
        im_end=look("<|im_end|>", REFERENCE_IM_END),
        pad=look("<|pad|>", REFERENCE_PAD),
    )


def tokenize(tokenizer: Tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text).ids)


@dataclass(frozen=True)
class PromptPlan:
    n_tokens: int  # L: real prompt tokens
    pad: int  # right padding to a multiple of C
    prefix_latents: int  # p: complete prompt blocks, a multiple of S
    pinned: int  # r: prompt latents pinned at the head of block 0
    trim: int  # prompt tokens re-predicted inside block 0

    @property
    def padded_tokens(self) -> int:
        return self.n_tokens + self.pad


def plan_prompt(n_tokens: int, block_size: int, patch_size: int = 1) -> PromptPlan:
    if n_tokens <= 0:
        raise ValueError("empty prompt")
    c = block_size * patch_size
    pad = (c - n_tokens % c) % c
    n_prompt_latents = math.ceil(n_tokens / patch_size)
    r = n_prompt_latents % block_size
    if r:
        start = (n_prompt_latents // block_size) * block_size
        return PromptPlan(n_tokens, pad, start, r, n_tokens - start * patch_size)
    return PromptPlan(n_tokens, pad, n_prompt_latents, 0, 0)


def blocks_needed(max_new_tokens: int, block_tokens: int, trim: int, reference: bool) -> int:
    if reference:
        return max(1, math.ceil(max_new_tokens / block_tokens))
    return max(1, math.ceil((trim + max_new_tokens) / block_tokens))
