"""Replay the end-to-end generation runs of a golden set (layout of conformance/tiny-a (d)).

Contract: `checks(golden_dir) -> list[CheckResult]`. For every run in `generate.json`:
* fp32 modes (`fp32_naive` = fp32 with the reference's bf16 DiT attention core, `fp32_sdpa`
  = plain fp32) are replayed with noise_mode/stop_mode "reference", the recorded noise base
  (`env`) and sampling seed; the check fails when a token id differs at a position whose
  recorded top-1/top-2 margin exceeds 10× the observed logit error, or (fp32_sdpa) when block
  latents differ by more than 1e-3. Latents/logits are compared where the set stores them.
* other modes (e.g. `cpu_autocast_bf16`) are replayed with dtype bf16 and reported as
  informational: always `passed=True`, the detail says how many ids matched.
Nothing about a particular set is hard-coded; parameters, prompts and shapes come from files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from cola_batch.model.checkpoint import load_model
from cola_batch.model.verify import CheckResult
from cola_batch.pipeline.engine import Engine, RowRequest
from cola_batch.pipeline.rows import RowState
from cola_batch.schemas.sampling import SamplingParams

LATENT_TOL = 1e-3
MARGIN_FACTOR = 10.0


def _params(run: dict[str, Any], golden: dict[str, Any]) -> SamplingParams:
    p = run["params"]
    base = str(golden.get("env", {}).get("COLA_INFER_PER_SAMPLE_NOISE_SEED", "0")).strip()
    return SamplingParams(
        max_new_tokens=p["max_new_tokens"],
        temperature=p["temperature"],
        top_k=p["top_k"],
        top_p=p["top_p"],
        repetition_penalty=p.get("repetition_penalty", 1.1),
        guidance_scale=p["guidance_scale"],
        timesteps=p["timestep_num"],
        seed=int(base or 0),
        global_seed=int(golden.get("torch_manual_seed_before_each_call", 0)),
        noise_mode="reference",
        stop_mode="reference",
    )


def replay(
    engine: Engine, golden: dict[str, Any], run: dict[str, Any]
) -> tuple[dict[str, list[int]], dict[tuple[int, int], tuple[torch.Tensor, ...]]]:
    """-> (generated ids per prompt id, {(prompt index, block): (latents, logits)})."""
    seqs = {str(q["id"]): i for i, q in enumerate(golden["prompts"])}
    seen: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}

    def trace(r: RowState, z: torch.Tensor, logits: torch.Tensor) -> None:
        seen[(seqs[r.row_id], r.block)] = (z.detach().float().cpu(), logits.detach().float().cpu())

    engine.trace = trace
    try:
        reqs = [RowRequest(str(q["id"]), q.get("question", "")) for q in golden["prompts"]]
        out = {r.row_id: r.token_ids for r in engine.generate(reqs, _params(run, golden))}
    finally:
        engine.trace = None
    return out, seen


def _check_run(
    engine: Engine,
    golden: dict[str, Any],
    run: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    informational: bool,
) -> list[CheckResult]:
    name = f"generate/{run['mode']}/{run['name']}"
    ids, seen = replay(engine, golden, run)
    prefix = f"{run['mode']}/{run['name']}"
    lat_err, logit_err = 0.0, 0.0
    n_prompts = len(golden["prompts"])
    for b in range(run["num_blocks"]):
        lat = tensors.get(f"{prefix}/latents.block{b}")
        lg = tensors.get(f"{prefix}/logits.block{b}")
        if (lat is None and lg is None) or any((i, b) not in seen for i in range(n_prompts)):
            continue
        if lat is not None:
            got = torch.cat([seen[(i, b)][0] for i in range(n_prompts)])
            lat_err = max(lat_err, float((got - lat.reshape(got.shape)).abs().max()))
        if lg is not None:
            got = torch.stack([seen[(i, b)][1] for i in range(n_prompts)])
            logit_err = max(logit_err, float((got - lg.reshape(got.shape)).abs().max()))
    margins = run.get("min_top1_top2_margin_per_block_after_penalty")
    C = len(run["block_token_ids"][0]) // max(run["num_blocks"], 1)
    bad, compared, matched, total = [], 0, 0, 0
    for i, q in enumerate(golden["prompts"]):
        want, got = run["generated_token_ids"][i], ids.get(str(q["id"]), [])
        trim = run["first_block_trimmed_counts"][i]
        for j, w in enumerate(want):
            total += 1
            same = j < len(got) and got[j] == w
            matched += same
            block = (j + trim) // C
            margin = margins[block] if margins and block < len(margins) else None
            decisive = margin is None or margin > MARGIN_FACTOR * max(logit_err, 1e-6)
            if decisive:
                compared += 1
                if not same:
                    bad.append((q["id"], j))
        if len(got) != len(want):
            bad.append((q["id"], "length"))
    detail = (
        f"ids {matched}/{total} equal ({compared} decisive), latents max diff "
        f"{lat_err:.2e}, logits max diff {logit_err:.2e}"
    )
    if informational:
        return [CheckResult(name, float(matched != total), 0.0, True, "informational: " + detail)]
    sdpa = run["mode"] == "fp32_sdpa"
    passed = not bad and (not sdpa or lat_err <= LATENT_TOL)
    if bad:
        detail += f"; mismatches at {bad[:5]}"
    return [CheckResult(name, lat_err, LATENT_TOL if sdpa else float("inf"), passed, detail)]


def checks(golden_dir: Path) -> list[CheckResult]:
    golden_dir = Path(golden_dir)
    path = golden_dir / "generate.json"
    if not path.exists():
        return []
    golden = json.loads(path.read_text())
    tpath = golden_dir / "generate.safetensors"
    tensors = load_file(str(tpath)) if tpath.exists() else {}
    model = load_model(golden_dir)
    engines = {
        "fp32_naive": Engine(model, dtype="fp32", reference_numerics=True),
        "fp32_sdpa": Engine(model, dtype="fp32"),
    }
    results: list[CheckResult] = []
    for run in golden["runs"]:
        engine = engines.get(run["mode"])
        informational = engine is None
        if engine is None:
            engine = Engine(model, dtype="bf16")
        try:
            results.extend(_check_run(engine, golden, run, tensors, informational))
        except Exception as exc:  # noqa: BLE001 - a crashing run is a failed check
            results.append(
                CheckResult(
                    f"generate/{run['mode']}/{run['name']}",
                    float("nan"),
                    0.0,
                    informational,
                    f"{type(exc).__name__}: {exc}",
                )
            )
    return results
