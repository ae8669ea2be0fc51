"""End-to-end behaviour of the generation Engine on the tiny-a golden models."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pydantic
import pytest
import torch
from safetensors.torch import load_file

from cola_batch.model.checkpoint import load_model
from cola_batch.pipeline.engine import Engine, RowRequest
from cola_batch.pipeline.verify_generate import _check_run
from cola_batch.schemas.sampling import SamplingParams

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "conformance" / "tiny-a"
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "judge",
    "boxing",
    "matches",
    "in",
    "the",
    "morning",
]


@pytest.fixture(scope="module")
def model():
    return load_model(GOLDEN)


@pytest.fixture(scope="module")
def golden():
    return json.loads((GOLDEN / "generate.json").read_text()), load_file(
        str(GOLDEN / "generate.safetensors")
    )


def _requests(n: int, seed: int = 0) -> list[RowRequest]:
    rnd = random.Random(seed)
    return [
        RowRequest(f"row-{i}", " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(1, 25))))
        for i in range(n)
    ]


def _run(engine: Engine, reqs, params, trace=None):
    if trace is not None:
        engine.trace = lambda r, z, lg: trace.setdefault((r.row_id, r.block), z.clone())
    try:
        return {r.row_id: r for r in engine.generate(reqs, params)}
    finally:
        engine.trace = None


@pytest.mark.parametrize(
    ("mode", "name"),
    [
        ("fp32_sdpa", "greedy_ts4_mnt16"),
        ("fp32_naive", "greedy_ts4_mnt24"),
        ("fp32_naive", "sampled_ts16_mnt24_T0.8_k20_p0.9"),
    ],
)
def test_reproduces_recorded_reference_runs(model, golden, mode, name) -> None:
    data, tensors = golden
    run = next(r for r in data["runs"] if r["mode"] == mode and r["name"] == name)
    engine = Engine(model, dtype="fp32", reference_numerics=mode == "fp32_naive")
    [res] = _check_run(engine, data, run, tensors, informational=False)
    assert res.passed, res.detail
    assert "ids 0/" not in res.detail and res.max_abs_diff < 1e-3


def test_rows_are_bit_identical_in_any_batch_composition(model) -> None:
    reqs = _requests(9)
    for dtype, temperature in [("bf16", 0.8), ("fp32", 0.0)]:
        engine = Engine(model, dtype=dtype)
        params = SamplingParams(max_new_tokens=10, timesteps=3, temperature=temperature)
        z_all: dict = {}
        base = _run(engine, reqs, params, z_all)
        layouts = [(list(reversed(reqs)), 256), (reqs[2:7], 2), (reqs[::2], 3)]
        for subset, max_rows in layouts:
            engine.max_rows = max_rows
            z_sub: dict = {}
            out = _run(engine, subset, params, z_sub)
            for rid, res in out.items():
                assert res.token_ids == base[rid].token_ids and res.text == base[rid].text
            for key, z in z_sub.items():
                assert torch.equal(z, z_all[key]), key  # latents bit-identical, every block
        engine.max_rows = 256
        solo = _run(engine, [reqs[4]], params)
        assert solo[reqs[4].row_id].token_ids == base[reqs[4].row_id].token_ids


def test_a_row_that_emits_eos_stops_and_a_waiting_row_takes_its_place(model) -> None:
    reqs = _requests(6, seed=3)
    engine = Engine(model, dtype="bf16")
    params = SamplingParams(max_new_tokens=14, timesteps=3)
    base = _run(engine, reqs, params)
    # Declare a token that row 0 really produces to be EOS: the run is deterministic.
    stop_tok = base["row-0"].token_ids[5]
    cut = base["row-0"].token_ids.index(stop_tok)
    engine.specials = replace(engine.specials, eos=stop_tok, im_end=None)
    engine.max_rows = 2
    steps: list[list[tuple[str, int]]] = []

    def trace(r, z, lg):
        if not steps or r.seq <= steps[-1][-1][2]:
            steps.append([])
        steps[-1].append((r.row_id, r.block, r.seq))

    engine.trace = trace
    out = {r.row_id: r for r in engine.generate(reqs, params)}
    engine.trace = None
    r0 = out["row-0"]
    assert r0.finish_reason == "stop" and r0.token_ids == base["row-0"].token_ids[:cut]
    assert stop_tok not in r0.token_ids and r0.completion_tokens == cut
    for rid, res in out.items():
        full = base[rid].token_ids
        if stop_tok in full:
            assert res.finish_reason == "stop" and res.token_ids == full[: full.index(stop_tok)]
        else:
            assert res.finish_reason == "length" and res.token_ids == full
    assert max(len(s) for s in steps) <= 2
    assert any(len({b == 0 for _, b, _ in s}) == 2 for s in steps), "no mid-flight refill"


def test_max_new_tokens_accounting(model) -> None:
    reqs = [RowRequest("a", "the quick brown fox jumps"), RowRequest("b", "dog")]
    engine = Engine(model, dtype="bf16")
    per_sample = _run(engine, reqs, SamplingParams(max_new_tokens=7, timesteps=2))
    for res in per_sample.values():
        assert res.finish_reason in ("length", "stop")
        if res.finish_reason == "length":
            assert res.completion_tokens == len(res.token_ids) == 7
    ref = _run(engine, reqs, SamplingParams(max_new_tokens=7, timesteps=2, stop_mode="reference"))
    S = model.dit.config.block_size
    for r in reqs:
        n = ref[r.row_id].prompt_tokens
        trim = n - (n // S) * S
        assert ref[r.row_id].completion_tokens == 2 * S - trim  # blocks · C − trim


def test_bad_rows_yield_errors_without_aborting_others(model) -> None:
    engine = Engine(model, dtype="bf16", max_context=64)
    reqs = [
        RowRequest("ok", "the quick brown fox"),
        RowRequest("empty", ""),
        RowRequest("long", "the quick brown fox " * 40),
    ]
    out = _run(engine, reqs, SamplingParams(max_new_tokens=4, timesteps=2))
    assert out["ok"].finish_reason == "length" and out["ok"].token_ids
    assert (out["empty"].finish_reason, out["empty"].error_code) == ("error", "empty_prompt")
    assert (out["long"].finish_reason, out["long"].error_code) == ("error", "prompt_too_long")


def test_out_of_memory_halves_the_batch_and_keeps_results(model) -> None:
    reqs = _requests(5, seed=9)
    params = SamplingParams(max_new_tokens=6, timesteps=2)
    engine = Engine(model, dtype="bf16")
    base = _run(engine, reqs, params)
    engine.fail_batches_over = 2
    retried = _run(engine, reqs, params)
    assert {k: v.token_ids for k, v in retried.items()} == {k: v.token_ids for k, v in base.items()}
    engine.fail_batches_over = 0
    failed = _run(engine, reqs[:2], params)
    assert {r.error_code for r in failed.values()} == {"out_of_memory"}


def test_bad_parameters_are_rejected_with_the_field_named(model) -> None:
    for bad in [{"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"max_new_tokens": 0}]:
        with pytest.raises(pydantic.ValidationError, match=next(iter(bad))):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="device"):
        Engine(model, device="tpu")
    with pytest.raises(ValueError, match="dtype"):
        Engine(model, dtype="fp8")


def test_non_finite_latents_become_error_rows(model) -> None:
    import copy

    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.dit.txt_out.proj.bias.fill_(float("nan"))
    engine = Engine(broken, dtype="fp32")
    out = _run(engine, _requests(2), SamplingParams(max_new_tokens=4, timesteps=2))
    assert {(r.finish_reason, r.error_code) for r in out.values()} == {("error", "numeric_error")}
