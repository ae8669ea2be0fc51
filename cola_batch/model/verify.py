"""Replay a golden set (layout of shared/conformance/tiny-a) and compare with our models.

Contract:
* `CHECK_GROUPS` maps a group name to `fn(golden_dir) -> list[CheckResult]`; built-in groups are
  `vae_encode`, `dit_forward` (both the `sdpa/` fp32 path, tol 1e-4, and the `naive/` bf16
  reference-numerics path, tol 1e-5) and `vae_decode`. A group whose file is absent returns [].
* More groups can be added with `register_check_group`; optional groups living in other packages
  (`cola_batch.pipeline.verify_generate:checks`) are imported lazily by `all_check_groups` and
  silently skipped when not importable.
* Nothing about a particular golden set is hard-coded: lengths, call lists, timesteps,
  scaling/shifting factors and shapes come from the set's files (meta.json call lists).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from cola_batch.model.checkpoint import ColaModel, load_model

SDPA_TOL = 1e-4
NAIVE_TOL = 1e-5
VAE_TOL = 1e-4
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclass
class CheckResult:
    name: str
    max_abs_diff: float
    tolerance: float
    passed: bool
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


CheckFn = Callable[[Path], list[CheckResult]]
CHECK_GROUPS: dict[str, CheckFn] = {}
OPTIONAL_GROUPS: dict[str, str] = {"generate": "cola_batch.pipeline.verify_generate:checks"}


def register_check_group(name: str, fn: CheckFn) -> CheckFn:
    CHECK_GROUPS[name] = fn
    return fn


def all_check_groups() -> dict[str, CheckFn]:
    groups = dict(CHECK_GROUPS)
    for name, target in OPTIONAL_GROUPS.items():
        if name in groups:
            continue
        module_name, attr = target.split(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            continue
        groups[name] = fn
    return groups


def compare(
    name: str, got: torch.Tensor, want: torch.Tensor, tol: float, detail: str = ""
) -> CheckResult:
    got = got.detach().float().cpu()
    want = want.detach().float().cpu()
    if got.shape != want.shape:
        return CheckResult(
            name,
            float("inf"),
            tol,
            False,
            f"shape {tuple(got.shape)} != expected {tuple(want.shape)}",
        )
    diff = float((got - want).abs().max()) if got.numel() else 0.0
    ok = diff <= tol  # NaN compares false, so NaN fails
    return CheckResult(name, diff, tol, ok, detail)


@lru_cache(maxsize=4)
def golden_models(golden_dir: str) -> ColaModel:
    """fp32 CPU models of a golden set, loaded once per process."""
    return load_model(golden_dir)


def _meta(golden_dir: Path) -> dict[str, Any]:
    path = golden_dir / "meta.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _lengths(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


@torch.no_grad()
def check_vae_encode(golden_dir: Path) -> list[CheckResult]:
    path = golden_dir / "vae_encode.safetensors"
    if not path.exists():
        return []
    data = load_file(str(path))
    vae = golden_models(str(golden_dir)).vae
    count = len([k for k in data if k.startswith("input_ids.")])
    ids = [data[f"input_ids.{i}"] for i in range(count)]
    params = vae.encode_params(ids)
    z = vae.latent_dim
    meta = _read_header_metadata(path)
    scale = float(meta.get("scaling_factor", vae.scaling_factor))
    shift = float(meta.get("shifting_factor", vae.shifting_factor))
    derived: dict[str, list[torch.Tensor]] = {
        "params": params,
        "mean": [],
        "logvar": [],
        "std": [],
        "scaled": [],
    }
    for p in params:
        mean = p[:, :z]
        derived["mean"].append(mean)
        derived["scaled"].append((mean - shift) * scale)
        if p.shape[1] == 2 * z:
            logvar = p[:, z:].clamp(LOGVAR_MIN, LOGVAR_MAX)
            derived["logvar"].append(logvar)
            derived["std"].append(torch.exp(0.5 * logvar))
    results = []
    for quantity, tensors in derived.items():
        keys = [f"{quantity}.{i}" for i in range(count)]
        if not all(k in data for k in keys) or len(tensors) != count:
            continue
        results.append(
            compare(
                f"vae_encode/{quantity}",
                torch.cat(tensors),
                torch.cat([data[k] for k in keys]),
                VAE_TOL,
                f"{count} samples, lengths {[len(t) for t in ids]}",
            )
        )
    return results


def _read_header_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def _timestep(spec: Any, data: dict[str, torch.Tensor], rows: int) -> float | torch.Tensor:
    if isinstance(spec, int | float):
        return float(spec)
    if spec == "zeros":
        return torch.zeros(rows, dtype=torch.float32)
    return data[f"inputs/{spec}"]


@torch.no_grad()
def check_dit_forward(golden_dir: Path) -> list[CheckResult]:
    path = golden_dir / "dit_forward.safetensors"
    calls = _meta(golden_dir).get("dit_forward", {}).get("calls")
    if not path.exists() or not calls:
        return []
    data = load_file(str(path))
    dit = golden_models(str(golden_dir)).dit
    results = []
    backends = [("sdpa", False, SDPA_TOL), ("naive", True, NAIVE_TOL)]
    saved = dit.reference_numerics
    try:
        for backend, reference_numerics, tol in backends:
            if not any(k.startswith(f"{backend}/") for k in data):
                continue
            dit.reference_numerics = reference_numerics
            cache = dit.new_cache()
            for call in calls:
                if call.get("reset_cache_before"):
                    cache = dit.new_cache()
                x = data[f"inputs/{call['txt']}"]
                use = bool(call.get("use_kv_cache") or call.get("update_kv"))
                out = dit(
                    x,
                    _lengths(call["txt_shape"]),
                    _lengths(call["txt_q_shape"]),
                    _timestep(call["timestep"], data, x.shape[0]),
                    cache=cache if use else None,
                    update_cache=bool(call["update_kv"]),
                )
                key = f"{backend}/{call['name']}"
                if key in data:
                    results.append(
                        compare(
                            f"dit_forward/{key}",
                            out,
                            data[key],
                            tol,
                            f"K={call['txt_shape']} Q={call['txt_q_shape']}",
                        )
                    )
    finally:
        dit.reference_numerics = saved
    return results


@torch.no_grad()
def check_vae_decode(golden_dir: Path) -> list[CheckResult]:
    path = golden_dir / "vae_decode.safetensors"
    calls = _meta(golden_dir).get("vae_decode", {}).get("calls")
    if not path.exists() or not calls:
        return []
    data = load_file(str(path))
    vae = golden_models(str(golden_dir)).vae
    cache = vae.new_cache()
    results = []
    for call in calls:
        if call.get("reset_cache_before"):
            cache = vae.new_cache()
        update = bool(call["update_kv"])
        out = vae.decode(
            data[f"inputs/{call['z']}"],
            _lengths(call["txt_shape"]),
            _lengths(call["txt_q_shape"]),
            cache=cache,
            update_cache=update,
        )
        key = f"logits/{call['name']}"
        if key in data:
            want = data[key]
            results.append(
                compare(
                    f"vae_decode/{call['name']}",
                    out,
                    want.reshape(-1, want.shape[-1]),
                    VAE_TOL,
                    f"K={call['txt_shape']} Q={call['txt_q_shape']}",
                )
            )
    return results


register_check_group("vae_encode", check_vae_encode)
register_check_group("dit_forward", check_dit_forward)
register_check_group("vae_decode", check_vae_decode)


def run_checks(golden_dir: str | Path, groups: list[str] | None = None) -> list[CheckResult]:
    """Run the named groups (default: all available) against one golden directory."""
    golden_dir = Path(golden_dir)
    available = all_check_groups()
    names = groups or list(available)
    results: list[CheckResult] = []
    for name in names:
        if name not in available:
            results.append(CheckResult(name, float("nan"), 0.0, False, "unknown check group"))
            continue
        try:
            results.extend(available[name](golden_dir))
        except Exception as exc:  # noqa: BLE001 - report a crashing group as a failed check
            results.append(
                CheckResult(name, float("nan"), 0.0, False, f"{type(exc).__name__}: {exc}")
            )
    return results
