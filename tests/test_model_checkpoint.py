"""Checkpoint folders are interchangeable with the reference's, and defects are named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cola_batch.model.checkpoint import (
    CheckpointError,
    load_dit,
    load_model,
    load_vae,
    save_dit,
    save_model,
)
from cola_batch.model.config import ConfigError, DiTConfig, TextVAEConfig

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GOLDEN = SHARED / "conformance" / "tiny-a"
needs_golden = pytest.mark.skipif(not (GOLDEN / "meta.json").exists(),
                                  reason="shared/conformance/tiny-a not available")

pytestmark = needs_golden


def _table(path: Path) -> list[tuple[str, tuple[int, ...], str]]:
    with safe_open(str(path), framework="pt") as f:
        return [(k, tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                for k in f.keys()]  # noqa: SIM118


def _metadata(path: Path) -> dict[str, str] | None:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def _copy_golden(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    for sub in ("cola_vae", "cola_dit"):
        shutil.copytree(GOLDEN / sub, root / sub)
    shutil.copy(GOLDEN / "tokenizer.json", root / "tokenizer.json")
    for f in root.rglob("*"):
        f.chmod(0o644)
    return root


def test_load_save_round_trip_is_byte_identical_to_the_reference_folder(tmp_path: Path) -> None:
    model = load_model(GOLDEN)
    save_model(model, tmp_path / "out")
    for sub in ("cola_vae", "cola_dit"):
        ours, ref = tmp_path / "out" / sub, GOLDEN / sub
        assert _table(ours / "model.safetensors") == _table(ref / "model.safetensors")
        assert _metadata(ours / "model.safetensors") == {"format": "pt"}
        assert (ours / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
        assert json.loads((ours / "config.json").read_text()) == \
            json.loads((ref / "config.json").read_text())
    again = load_model(tmp_path / "out")
    for a, b in ((model.vae, again.vae), (model.dit, again.dit)):
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert again.tokenizer is not None and again.tokenizer.get_vocab_size() == 1024


def test_saved_file_loads_with_plain_safetensors_and_keeps_rope_freqs(tmp_path: Path) -> None:
    save_dit(load_dit(GOLDEN / "cola_dit"), tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    freqs = state["blocks.0.msa.rope.rope.freqs"]
    rope_dim = json.loads((tmp_path / "config.json").read_text())["rope_dim"]
    expected = 1.0 / (10000.0 ** (torch.arange(0, rope_dim, 2).float() / rope_dim))
    assert torch.equal(freqs, expected)
    assert list(state) == sorted(state)


def test_bf16_load_keeps_freqs_fp32_and_saves_a_bf16_checkpoint(tmp_path: Path) -> None:
    dit = load_dit(GOLDEN / "cola_dit", dtype="bf16")
    assert dit.txt_in.proj.weight.dtype == torch.bfloat16
    assert dit.blocks[0].msa.rope.rope.freqs.dtype == torch.float32
    save_dit(dit, tmp_path)
    dtypes = {k: d for k, _, d in _table(tmp_path / "model.safetensors")}
    freqs = {d for k, d in dtypes.items() if k.endswith("rope.rope.freqs")}
    others = {d for k, d in dtypes.items() if not k.endswith("rope.rope.freqs")}
    assert freqs == {"F32"} and others == {"BF16"}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    vae = load_vae(GOLDEN / "cola_vae", dtype=torch.float16)
    assert {p.dtype for p in vae.parameters()} == {torch.float16}


def test_sharded_checkpoint_round_trip(tmp_path: Path) -> None:
    model = load_model(GOLDEN)
    save_model(model, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "cola_vae" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (tmp_path / "cola_vae" / "model.safetensors").exists()
    again = load_model(tmp_path)
    sa, sb = model.vae.state_dict(), again.vae.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_loaded_parameters_are_frozen_and_on_the_requested_device() -> None:
    vae = load_vae(GOLDEN / "cola_vae", device="cpu")
    assert not any(p.requires_grad for p in vae.parameters())
    assert {p.device.type for p in vae.parameters()} == {"cpu"}
    assert not vae.training


def _rewrite(path: Path, edit) -> None:  # noqa: ANN001 - small test helper
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("blocks.1.mlp.proj_in.bias"),
         "missing tensor(s) ['blocks.1.mlp.proj_in.bias']"),
        (lambda s: s.pop("blocks.0.msa.rope.rope.freqs"), "blocks.0.msa.rope.rope.freqs"),
        (lambda s: s.__setitem__("blocks.0.extra.weight", torch.zeros(2)),
         "unexpected tensor(s) ['blocks.0.extra.weight']"),
        (lambda s: s.__setitem__("txt_in.proj.bias", torch.zeros(3)),
         "'txt_in.proj.bias' has shape (3,)"),
    ],
    ids=["missing", "missing-freqs", "unexpected", "wrong-shape"],
)
def test_tensor_defects_are_named(tmp_path: Path, edit, message: str) -> None:  # noqa: ANN001
    root = _copy_golden(tmp_path)
    _rewrite(root / "cola_dit" / "model.safetensors", edit)
    with pytest.raises(CheckpointError) as info:
        load_model(root)
    assert message in str(info.value)


def test_truncated_file_is_reported(tmp_path: Path) -> None:
    root = _copy_golden(tmp_path)
    path = root / "cola_vae" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_vae(root / "cola_vae")


@pytest.mark.parametrize(
    ("folder", "patch", "field"),
    [
        ("cola_dit", {"emb_dim": 32}, "emb_dim"),
        ("cola_dit", {"patch_size": 2}, "patch_size"),
        ("cola_vae", {"num_heads": 5}, "num_heads"),
        ("cola_vae", {"shared_heads_kv": 2}, "shared_heads_kv"),
        ("cola_vae", {"act": "relu"}, "act"),
        ("cola_vae", {"layer_norm_type": "rms_norm"}, "layer_norm_type"),
        ("cola_vae", {"dim": "64"}, "dim"),
        ("cola_dit", {"model_type": "cola_text_vae"}, "model_type"),
    ],
)
def test_bad_config_fields_are_named(tmp_path: Path, folder: str, patch: dict, field: str) -> None:
    root = _copy_golden(tmp_path)
    cfg_path = root / folder / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **patch}))
    with pytest.raises(CheckpointError) as info:
        load_model(root)
    assert f"{field}:" in str(info.value)
    assert "config.json" in str(info.value)


def test_config_round_trip_keeps_unknown_keys_and_writes_reference_fields() -> None:
    raw = json.loads((GOLDEN / "cola_vae" / "config.json").read_text())
    cfg = TextVAEConfig.from_dict({**raw, "future_field": [1, 2]})
    out = cfg.to_dict()
    assert out["future_field"] == [1, 2]
    assert {k: v for k, v in out.items() if k != "future_field"} == raw
    assert DiTConfig().to_dict()["architectures"] == ["ColaDiTModel"]
    assert TextVAEConfig().to_dict()["clip_qkv"] is None
    with pytest.raises(ConfigError, match="emb_dim"):
        DiTConfig(emb_dim=1024).validate()
    with pytest.raises(ConfigError, match="shared_heads_kv"):
        TextVAEConfig(shared_heads_kv=3).validate()
