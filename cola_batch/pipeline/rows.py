"""What the generation loop knows about rows: `RowState` (one row's progress), `Part` (rows
sharing one KV cache) and `RunConfig` (a run's fixed parameters).

Contract: plain data, no model calls; `pipeline/batch.py` owns every mutation during a run and
`RowState.reset` returns a row to its admitted state (used when an out-of-memory batch is split
and its rows rerun).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cola_batch.model.cache import KVCache
from cola_batch.pipeline.layout import PromptPlan, SpecialIds
from cola_batch.pipeline.sampler import SamplerConfig


@dataclass
class RowState:
    row_id: str
    sample_index: int
    seq: int  # admission order; the reference's batch order
    ids: list[int]
    plan: PromptPlan
    blocks_total: int
    seed: int
    latents: torch.Tensor | None = None  # (n_latents, d) scaled, fp32 — until prefilled
    pinned: torch.Tensor | None = None  # (r, d) scaled prompt latents of block 0
    k: int = 0  # cached latent positions before the next block
    block: int = 0
    history: list[int] = field(default_factory=list)
    stop_flag: bool = False
    result_tokens: list[int] | None = None
    finish_reason: str | None = None
    error: tuple[str, str] | None = None

    def reset(self) -> None:
        self.latents = self.pinned = None
        self.k = self.block = 0
        self.history = []
        self.stop_flag = False
        self.result_tokens = self.finish_reason = self.error = None


@dataclass
class Part:
    rows: list[RowState]
    cache: KVCache
    # 1 when cache sample 0 is the width-floor dummy (batched DiT part), else 0.
    dummy: int = 0


# Batched DiT calls carry a first "dummy" sample with this many cached (zero) positions and no
# query rows, so every padded key width is >= WIDTH_FLOOR. The explicit attention core gives
# identical results for every zero-tail width >= 32 (bf16 vector width) but a different result
# below it; the floor keeps a short row in the same regime alone and in any batch.
WIDTH_FLOOR = 64


@dataclass(frozen=True)
class RunConfig:
    steps: int
    guidance: float
    sampler: SamplerConfig
    max_new_tokens: int
    reference_noise: bool
    reference_stop: bool
    noise_base: int  # job seed (per-row) or the reference's env-var base
    specials: SpecialIds
    T: float = 1000.0
