"""Checkpoint I/O interchangeable with the reference's `save_pretrained` folders (spec §4).

Contract:
* A model root holds `cola_vae/`, `cola_dit/` (each `config.json` + `model.safetensors` or a
  sharded `model.safetensors.index.json`) and `tokenizer.json`; each folder also loads alone.
* Loading is lazy: the module is built on the meta device, every tensor is read from the
  memory-mapped file(s), converted to the requested dtype/device one at a time and assigned, so
  peak host memory stays close to one copy of the weights. The DiT `freqs` buffers stay fp32.
* Saving writes exactly the reference key set (persistent buffers included), the tensors' own
  shapes and dtypes, sorted keys and `{"format": "pt"}` metadata, plus a config.json whose
  `dtype` names the weight dtype.
* Every defect (missing / unexpected / mis-shaped tensor, unreadable or truncated file, invalid
  config) raises `CheckpointError` whose message names the key, file or config field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer
from torch import nn

from cola_batch.model.config import ConfigError, DiTConfig, TextVAEConfig
from cola_batch.model.dit import DiT
from cola_batch.model.vae import TextVAE

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
VAE_DIR, DIT_DIR, TOKENIZER = "cola_vae", "cola_dit", "tokenizer.json"
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names what is wrong."""


@dataclass
class ColaModel:
    vae: TextVAE
    dit: DiT
    tokenizer: Tokenizer | None
    root: Path | None = None


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError as exc:
        raise ValueError(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16") from exc


def keep_fp32(name: str) -> bool:
    """Tensors that stay fp32 whatever the weight dtype (RoPE frequencies, spec §3.7)."""
    return name.endswith("rope.rope.freqs")


def weight_files(folder: Path) -> dict[str, Path]:
    """key -> file holding it, from the index of a sharded folder (empty for single-file)."""
    index = folder / INDEX
    if not index.exists():
        return {}
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: unreadable shard index ({exc})") from exc
    return {key: folder / name for key, name in weight_map.items()}


def _open_all(folder: Path, stack: ExitStack, device: str) -> dict[str, Any]:
    """key -> open safetensors handle, for a single-file or sharded folder."""
    files = weight_files(folder)
    paths = sorted(set(files.values())) if files else [folder / WEIGHTS]
    handles: dict[Path, Any] = {}
    for path in paths:
        if not path.exists():
            raise CheckpointError(f"{path}: weight file missing")
        try:
            handles[path] = stack.enter_context(safe_open(str(path), framework="pt", device=device))
        except Exception as exc:  # noqa: BLE001 - safetensors raises several error types
            raise CheckpointError(
                f"{path}: unreadable or truncated safetensors file ({exc})"
            ) from exc
    out: dict[str, Any] = {}
    for path, handle in handles.items():
        for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
            if files and files.get(key) != path:
                raise CheckpointError(
                    f"{path}: tensor {key!r} is not mapped to this shard in {INDEX}"
                )
            out[key] = (handle, path)
    missing_from_shards = set(files) - set(out)
    if missing_from_shards:
        key = sorted(missing_from_shards)[0]
        raise CheckpointError(f"{INDEX}: tensor {key!r} listed but absent from {files[key]}")
    return out


def _load_into(model: nn.Module, folder: Path, dtype: torch.dtype, device: torch.device) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with ExitStack() as stack:
        sources = _open_all(folder, stack, "cpu" if device.type == "meta" else str(device))
        missing = sorted(set(expected) - set(sources))
        unexpected = sorted(set(sources) - set(expected))
        if missing:
            raise CheckpointError(
                f"{folder}: missing tensor(s) {missing[:5]}"
                + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            )
        if unexpected:
            raise CheckpointError(
                f"{folder}: unexpected tensor(s) {unexpected[:5]}"
                + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
            )
        state: dict[str, torch.Tensor] = {}
        for key, shape in expected.items():
            handle, path = sources[key]
            got = tuple(handle.get_slice(key).get_shape())
            if got != shape:
                raise CheckpointError(f"{path}: tensor {key!r} has shape {got}, expected {shape}")
            try:
                tensor = handle.get_tensor(key)
            except Exception as exc:  # noqa: BLE001
                raise CheckpointError(f"{path}: cannot read tensor {key!r} ({exc})") from exc
            if not tensor.is_floating_point():
                raise CheckpointError(f"{path}: tensor {key!r} has dtype {tensor.dtype}")
            target = torch.float32 if keep_fp32(key) else dtype
            converted = tensor.to(device=device, dtype=target)
            if keep_fp32(key) and target != dtype:
                # a few floats; copying them lets the mapping close when the weights were cast
                converted = converted.clone()
            state[key] = converted
    model.load_state_dict(state, strict=True, assign=True)


def _read_config(cls: type, folder: Path) -> Any:
    path = folder / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path}: config.json missing")
    try:
        return cls.from_json_file(path).validate()
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def _build(
    cls: type, cfg: Any, folder: Path, dtype: str | torch.dtype, device: str | torch.device
) -> Any:
    dev = torch.device(device)
    with torch.device("meta"):
        model = cls(cfg)
    _load_into(model, folder, parse_dtype(dtype), dev)
    model.config.dtype = DTYPE_NAMES[parse_dtype(dtype)]
    return model.eval().requires_grad_(False)


def load_vae(
    folder: str | Path,
    *,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> TextVAE:
    folder = Path(folder)
    return _build(TextVAE, _read_config(TextVAEConfig, folder), folder, dtype, device)


def load_dit(
    folder: str | Path,
    *,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> DiT:
    folder = Path(folder)
    return _build(DiT, _read_config(DiTConfig, folder), folder, dtype, device)


def load_tokenizer(path: str | Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: unreadable tokenizer ({exc})") from exc


def load_model(
    root: str | Path,
    *,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> ColaModel:
    root = Path(root)
    tok_path = root / TOKENIZER
    return ColaModel(
        vae=load_vae(root / VAE_DIR, dtype=dtype, device=device),
        dit=load_dit(root / DIT_DIR, dtype=dtype, device=device),
        tokenizer=load_tokenizer(tok_path) if tok_path.exists() else None,
        root=root,
    )


# ---------------------------------------------------------------------- saving
def _weight_dtype(model: nn.Module) -> torch.dtype:
    for name, tensor in model.state_dict().items():
        if not keep_fp32(name):
            return tensor.dtype
    return torch.float32


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shard and size + nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[key] = state[key]
        size += nbytes
    if shard:
        yield shard


def save_module(
    model: TextVAE | DiT, folder: str | Path, max_shard_bytes: int | None = None
) -> None:
    """config.json + model.safetensors (or shards with an index when over max_shard_bytes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    state = {k: state[k] for k in sorted(state)}
    model.config.dtype = DTYPE_NAMES.get(_weight_dtype(model), "float32")
    model.config.save(folder)
    for stale in [folder / INDEX, *folder.glob("model-*-of-*.safetensors"), folder / WEIGHTS]:
        stale.unlink(missing_ok=True)
    total = sum(t.numel() * t.element_size() for t in state.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
        return
    shards = list(_shards(state, max_shard_bytes))
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def save_vae(model: TextVAE, folder: str | Path, max_shard_bytes: int | None = None) -> None:
    save_module(model, folder, max_shard_bytes)


def save_dit(model: DiT, folder: str | Path, max_shard_bytes: int | None = None) -> None:
    save_module(model, folder, max_shard_bytes)


def save_model(model: ColaModel, root: str | Path, max_shard_bytes: int | None = None) -> None:
    root = Path(root)
    save_vae(model.vae, root / VAE_DIR, max_shard_bytes)
    save_dit(model.dit, root / DIT_DIR, max_shard_bytes)
    if model.tokenizer is not None:
        model.tokenizer.save(str(root / TOKENIZER))
