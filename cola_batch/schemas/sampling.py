"""Sampling parameters of one generation request (one job, or one in-process run).

Contract: a `SamplingParams` value is immutable, validated on construction, JSON-serialisable,
and fully determines (together with the model weights, the row id and the sample index) what a
row generates. Defaults are the reference's generation defaults (spec/inference.md §3.1).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

NoiseMode = Literal["per-row", "reference"]
StopMode = Literal["per-sample", "reference"]


class SamplingParams(BaseModel):
    """How to generate. Validation errors name the offending field."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_new_tokens: int = Field(32, gt=0, description="generated tokens per sample (upper bound)")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy; > 0 samples")
    top_k: int = Field(50, ge=0, description="0 disables top-k")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="nucleus mass, in (0, 1]")
    repetition_penalty: float = Field(1.1, gt=0.0, description="1.0 disables the penalty")
    guidance_scale: float = Field(7.0, description="classifier-free guidance scale s")
    timesteps: int = Field(16, gt=0, description="Euler steps per block")
    samples_per_prompt: int = Field(1, gt=0, le=1024)
    seed: int = Field(0, ge=0, lt=2**63, description="job seed; per-row seeds derive from it")
    noise_mode: NoiseMode = Field(
        "per-row",
        description="per-row: every draw of a row comes from a generator keyed by "
        "(seed, row id, sample, block); reference: the reference's seeding formula",
    )
    global_seed: int = Field(
        4321,
        ge=0,
        lt=2**63,
        description="reference noise mode only: seed of the single generator that token "
        "sampling draws from (the reference's torch.manual_seed before the call)",
    )
    stop_mode: StopMode = Field(
        "per-sample",
        description="per-sample: a row stops at EOS/im_end and leaves the batch; "
        "reference: every row runs to the end as the reference does",
    )

    @field_validator("temperature", "top_p", "repetition_penalty", "guidance_scale")
    @classmethod
    def _finite(cls, value: float) -> float:
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("must be a finite number")
        return value
