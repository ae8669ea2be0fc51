"""`cola-batch model init | inspect | verify` behave as documented."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cola_batch.model.checkpoint import load_model
from cola_batch.model.cli import app

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GOLDEN = SHARED / "conformance" / "tiny-a"
needs_golden = pytest.mark.skipif(not (GOLDEN / "meta.json").exists(),
                                  reason="shared/conformance/tiny-a not available")
runner = CliRunner()


def _invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_init_tiny_writes_a_loadable_model_root_that_inspect_describes(tmp_path: Path) -> None:
    code, out = _invoke("init", str(tmp_path / "m"), "--preset", "tiny", "--seed", "3")
    assert code == 0, out
    model = load_model(tmp_path / "m")
    assert model.tokenizer is not None
    vocab = model.tokenizer.get_vocab_size()
    assert vocab == model.vae.vocab_size == 1024
    assert [model.tokenizer.token_to_id(t) for t in
            ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")] == [1020, 1021, 1022, 1023]
    assert model.tokenizer.decode(model.tokenizer.encode("Hello there.").ids) == "Hello there."
    # reference init: zero Linear biases, unit LayerNorm gains, Xavier/trunc-normal weights
    assert torch.count_nonzero(model.dit.txt_in.proj.bias) == 0
    assert torch.all(model.vae.decoder["final_norm"].weight == 1)
    assert model.vae.encoder["wte"].weight.abs().max() <= 0.06 + 1e-6

    code, out = _invoke("inspect", str(tmp_path / "m"), "--json")
    assert code == 0, out
    info = json.loads(out)
    vae, dit = info["models"]
    assert (vae["model_type"], dit["model_type"]) == ("cola_text_vae", "cola_dit")
    assert vae["parameters"] == sum(p.numel() for p in model.vae.state_dict().values())
    assert dit["tensors"] == len(model.dit.state_dict())
    weights = tmp_path / "m" / "cola_dit" / "model.safetensors"
    assert dit["sha256"]["model.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert info["tokenizer"]["vocab_size"] == 1024

    code, out = _invoke("inspect", str(tmp_path / "m"))
    assert code == 0 and "cola_dit" in out and "parameters" in out


def test_init_is_deterministic_per_seed_and_honours_dtype(tmp_path: Path) -> None:
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert _invoke("init", str(tmp_path / name), "--preset", "tiny", "--seed", seed)[0] == 0
    blob = {n: (tmp_path / n / "cola_vae" / "model.safetensors").read_bytes() for n in "abc"}
    assert blob["a"] == blob["b"] != blob["c"]
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == \
        (tmp_path / "c" / "tokenizer.json").read_bytes()
    assert _invoke("init", str(tmp_path / "h"), "--preset", "tiny", "--dtype", "bf16")[0] == 0
    state = load_file(str(tmp_path / "h" / "cola_dit" / "model.safetensors"))
    assert state["txt_in.proj.weight"].dtype == torch.bfloat16
    assert state["blocks.0.msa.rope.rope.freqs"].dtype == torch.float32


def test_init_small_preset(tmp_path: Path) -> None:
    code, out = _invoke("init", str(tmp_path / "s"), "--preset", "small")
    assert code == 0, out
    code, out = _invoke("inspect", str(tmp_path / "s"), "--json")
    vae, dit = json.loads(out)["models"]
    assert vae["config"]["dim"] == 512 and dit["config"]["num_layers"] == 8
    assert dit["config"]["rope_dim"] == 48


def test_cola_2b_dry_run_counts_without_writing(tmp_path: Path) -> None:
    code, out = _invoke("init", str(tmp_path / "big"), "--preset", "cola-2b", "--dry-run")
    assert code == 0, out
    assert "501,871,574" in out and "1,829,876,880" in out
    assert not (tmp_path / "big").exists()


def test_unknown_preset_is_rejected(tmp_path: Path) -> None:
    code, _ = _invoke("init", str(tmp_path / "x"), "--preset", "huge")
    assert code != 0 and not (tmp_path / "x").exists()


def test_inspect_of_a_non_checkpoint_fails(tmp_path: Path) -> None:
    assert _invoke("inspect", str(tmp_path))[0] == 1


@needs_golden
def test_verify_passes_on_the_reference_golden_set() -> None:
    code, out = _invoke("verify", str(GOLDEN), "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report["passed"] and len(report["checks"]) >= 28


@needs_golden
def test_verify_fails_when_a_recorded_output_is_off(tmp_path: Path) -> None:
    golden = tmp_path / "g"
    shutil.copytree(GOLDEN, golden, ignore=shutil.ignore_patterns("generate*"))
    for f in golden.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    path = golden / "dit_forward.safetensors"
    data = load_file(str(path))
    data["naive/block1_cond_t500"] = data["naive/block1_cond_t500"] + 1e-4
    save_file(data, str(path))
    code, out = _invoke("verify", str(golden), "--group", "dit_forward")
    assert code == 1
    assert "FAIL" in out and "block1_cond_t500" in out


def test_verify_of_an_empty_directory_fails(tmp_path: Path) -> None:
    assert _invoke("verify", str(tmp_path))[0] == 1
