"""Token selection from decoder logits (spec/inference.md §4), in the reference's order.

Contract:
* `select_tokens(logits, history, cfg, draw)` takes logits `(R, C, V)` (R rows of C positions),
  a boolean `(R, V)` mask of ids already chosen by each row in earlier blocks, and returns
  `(R, C)` int64 token ids. Steps: sanitise NaN/±inf, repetition penalty (ℓ·ρ if ℓ < 0 else
  ℓ/ρ, once per distinct id, in the logits' dtype), greedy arg-max (lowest index wins ties) when
  τ < 1e-5, else temperature, top-k (ties with the k-th value survive), top-p (drop a token when
  the mass strictly before it already exceeds p; the top token always stays), softmax (NaN →
  1/V) and one draw per position.
* Randomness is injected: `draw(probs (R, C, V) float) -> (R, C)` ids. `reference_draw`
  reproduces the reference's single `torch.multinomial` over all R·C positions from one
  generator; `inverse_cdf_draw` uses one generator per row (uniforms → inverse CDF), so a row's
  tokens depend only on its own generator and probabilities.
* Pure tensor functions, no global RNG, no per-row Python work except drawing uniforms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

GREEDY_EPS = 1e-5

Draw = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SamplerConfig:
    temperature: float = 0.0
    top_k: int = 50
    top_p: float = 0.9
    repetition_penalty: float = 1.1

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS


def sanitize(logits: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(logits, nan=0.0, posinf=1e4, neginf=-1e4)


def history_mask(
    histories: Sequence[Sequence[int]], vocab: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(R, V) bool: True where the id occurs in that row's history."""
    mask = torch.zeros(len(histories), vocab, dtype=torch.bool)
    for i, ids in enumerate(histories):
        if len(ids):
            mask[i, torch.as_tensor(list(ids), dtype=torch.long)] = True
    return mask.to(device)


def apply_repetition_penalty(
    logits: torch.Tensor, mask: torch.Tensor | None, penalty: float
) -> torch.Tensor:
    """logits (R, C, V); mask (R, V). Penalised once per distinct id, in the logits' dtype."""
    if mask is None or penalty == 1.0 or not bool(mask.any()):
        return logits
    m = mask[:, None, :].expand_as(logits)
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(m, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0:
        return logits
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    if not 0.0 < p < 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    remove = torch.zeros_like(cum, dtype=torch.bool)
    remove[..., 1:] = cum[..., :-1] > p  # mass strictly before the token already exceeds p
    remove_orig = torch.zeros_like(remove).scatter(-1, order, remove)
    return logits.masked_fill(remove_orig, float("-inf"))


def final_probs(logits: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(logits, dim=-1)
    if bool(torch.isnan(probs).any()):
        probs = torch.nan_to_num(probs, nan=1.0 / logits.shape[-1])
    return probs


def select_tokens(
    logits: torch.Tensor, history: torch.Tensor | None, cfg: SamplerConfig, draw: Draw | None = None
) -> torch.Tensor:
    """(R, C, V) logits -> (R, C) ids. `draw` is required unless greedy."""
    x = sanitize(logits)
    x = apply_repetition_penalty(x, history, cfg.repetition_penalty)
    if cfg.greedy:
        return torch.argmax(x, dim=-1)
    if cfg.temperature != 1.0:
        x = x / cfg.temperature
    x = top_k_filter(x, cfg.top_k)
    x = top_p_filter(x, cfg.top_p)
    if draw is None:
        raise ValueError("sampling (temperature > 0) needs a draw function")
    return draw(final_probs(x))


def reference_draw(generator: torch.Generator) -> Draw:
    """One multinomial over all R·C positions from one generator (the reference's global RNG)."""

    def draw(probs: torch.Tensor) -> torch.Tensor:
        r, c, v = probs.shape
        flat = probs.reshape(r * c, v)
        ids = torch.multinomial(flat.to(generator.device), 1, generator=generator)
        return ids.reshape(r, c).to(probs.device)

    return draw


def inverse_cdf_draw(generators: Sequence[torch.Generator]) -> Draw:
    """Row i draws its C uniforms from generators[i]; ids by inverse CDF in fp32."""

    def draw(probs: torch.Tensor) -> torch.Tensor:
        r, c, _ = probs.shape
        if len(generators) != r:
            raise ValueError(f"{len(generators)} generators for {r} rows")
        u = torch.stack([torch.rand(c, generator=g, dtype=torch.float64) for g in generators])
        cdf = probs.double().cumsum(dim=-1)
        target = (u.to(probs.device) * cdf[..., -1]).unsqueeze(-1)
        ids = torch.searchsorted(cdf, target, right=True).squeeze(-1)
        return ids.clamp_(max=probs.shape[-1] - 1)

    return draw
