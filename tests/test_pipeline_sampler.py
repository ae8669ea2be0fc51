"""Token selection, per-row RNG and prompt layout: pure functions of the generation pipeline."""

from __future__ import annotations

import torch

from cola_batch.pipeline import rng
from cola_batch.pipeline.layout import blocks_needed, plan_prompt
from cola_batch.pipeline.sampler import (
    SamplerConfig,
    apply_repetition_penalty,
    history_mask,
    inverse_cdf_draw,
    select_tokens,
    top_k_filter,
    top_p_filter,
)


def test_repetition_penalty_divides_positive_multiplies_negative_once_per_id() -> None:
    logits = torch.tensor([[[2.0, -2.0, 1.0, 0.0]]])
    mask = history_mask([[0, 1, 1, 0]], 4)  # repeated ids are penalised once
    out = apply_repetition_penalty(logits, mask, 2.0)
    assert out.tolist() == [[[1.0, -4.0, 1.0, 0.0]]]


def test_penalty_without_history_or_rho_one_is_identity() -> None:
    logits = torch.randn(2, 3, 5)
    assert torch.equal(apply_repetition_penalty(logits, None, 1.3), logits)
    assert torch.equal(apply_repetition_penalty(logits, history_mask([[1], [2]], 5), 1.0), logits)


def test_greedy_ties_pick_lowest_index_and_penalty_applies_when_greedy() -> None:
    logits = torch.tensor([[[1.0, 3.0, 3.0, 0.5]]])
    cfg = SamplerConfig(temperature=0.0, repetition_penalty=1.1)
    assert select_tokens(logits, None, cfg).tolist() == [[1]]
    assert select_tokens(logits, history_mask([[1]], 4), cfg).tolist() == [[2]]


def test_nan_and_inf_are_sanitised() -> None:
    logits = torch.tensor([[[float("nan"), float("inf"), 3.0, float("-inf")]]])
    assert select_tokens(logits, None, SamplerConfig(repetition_penalty=1.0)).tolist() == [[1]]


def test_top_k_keeps_values_tied_with_the_kth() -> None:
    logits = torch.tensor([[4.0, 2.0, 2.0, 1.0]])
    out = top_k_filter(logits, 2)
    assert torch.isinf(out[0]).tolist() == [False, False, False, True]


def test_top_p_keeps_smallest_prefix_whose_mass_exceeds_p() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None]
    kept = lambda p: (~torch.isinf(top_p_filter(logits, p)[0])).tolist()  # noqa: E731
    assert kept(0.5) == [True, True, False, False]  # mass before token 2 is 0.5, not > 0.5
    assert kept(0.49) == [True, False, False, False]
    assert kept(0.8) == [True, True, True, False]
    assert kept(1.0) == [True, True, True, True]
    assert kept(0.01) == [True, False, False, False]  # the top token always stays


def test_inverse_cdf_draw_follows_each_rows_generator_only() -> None:
    probs = torch.softmax(torch.randn(3, 4, 50, generator=torch.Generator().manual_seed(1)), -1)
    gens = lambda: [rng.generator(s) for s in (11, 12, 13)]  # noqa: E731
    ids = inverse_cdf_draw(gens())(probs)
    again = inverse_cdf_draw(gens()[1:])(probs[1:])
    assert torch.equal(ids[1:], again)
    assert bool((probs.gather(-1, ids[..., None]) > 0).all())


def test_sampling_never_picks_a_filtered_token() -> None:
    logits = torch.tensor([[[5.0, 4.9, -3.0, -3.0, -9.0]]]).repeat(1, 64, 1)
    cfg = SamplerConfig(temperature=1.0, top_k=2, top_p=1.0, repetition_penalty=1.0)
    ids = select_tokens(logits, None, cfg, inverse_cdf_draw([rng.generator(5)]))
    assert set(ids.flatten().tolist()) <= {0, 1} and len(set(ids.flatten().tolist())) == 2


def test_row_seed_is_stable_and_separates_every_field() -> None:
    base = rng.row_seed("noise", 7, "row-1", 0, 0)
    assert base == rng.row_seed("noise", 7, "row-1", 0, 0)
    assert 0 <= base < 2**63
    variants = {
        rng.row_seed("noise", 8, "row-1", 0, 0),
        rng.row_seed("noise", 7, "row-2", 0, 0),
        rng.row_seed("noise", 7, "row-1", 1, 0),
        rng.row_seed("noise", 7, "row-1", 0, 1),
        rng.row_seed("tokens", 7, "row-1", 0, 0),
    }
    assert base not in variants and len(variants) == 5


def test_reference_seed_formula_and_id_conversion() -> None:
    assert rng.reference_noise_seed(66, 0, 0) == 66
    assert rng.reference_noise_seed(66, 0, 1) == 10_000_066
    assert rng.reference_noise_seed(66, "7", 0) == 7066
    assert rng.reference_noise_seed(66, " -1_000 ", 0) == 66 - 1_000_000
    assert rng.reference_sid_int(3.9) == 3 and rng.reference_sid_int(True) == 1
    assert rng.reference_noise_seed(66, "56be4db0acb8001400a502ec", 0) == 3_949_553_719_066


def test_prompt_plan_worked_examples_of_the_spec() -> None:
    # (L, pad, prefix, pinned, trim) for S = 16, P = 1 (spec/inference.md §3.6)
    for n, want in [
        (37, (11, 32, 5, 5)),
        (48, (0, 48, 0, 0)),
        (10, (6, 0, 10, 10)),
        (16, (0, 16, 0, 0)),
    ]:
        p = plan_prompt(n, 16)
        assert (p.pad, p.prefix_latents, p.pinned, p.trim) == want


def test_block_budget_reference_vs_per_sample() -> None:
    assert blocks_needed(32, 16, 5, reference=True) == 2
    assert blocks_needed(0, 16, 5, reference=True) == 1
    assert blocks_needed(32, 16, 5, reference=False) == 3  # 37 tokens decoded, 5 trimmed
    assert blocks_needed(11, 16, 5, reference=False) == 1
