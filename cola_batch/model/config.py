"""Configs of the Text VAE and the DiT prior, readable/writable as reference `config.json`.

Contract:
* every field of spec/model.md §2.1 (`TextVAEConfig`) and §3.1 (`DiTConfig`) with the released
  model's defaults;
* `from_dict` keeps unknown keys in `.extra` and `to_dict` writes them back, so a folder written
  by a newer reference round-trips; `to_dict` also writes `model_type`, `architectures`, `dtype`
  and `transformers_version` so the reference's own loader accepts our folders;
* `validate()` raises `ConfigError` naming the first field the reference cannot run with.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

TRANSFORMERS_VERSION = "5.25.0"
_META_KEYS = ("model_type", "architectures", "dtype", "torch_dtype", "transformers_version")


class ConfigError(ValueError):
    """A config value the reference cannot run; the message names the field."""


def _check_int(cfg: Any, name: str, minimum: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}: expected an integer >= {minimum}, got {value!r}")


def _check_bool(cfg: Any, name: str) -> None:
    if not isinstance(getattr(cfg, name), bool):
        raise ConfigError(f"{name}: expected a boolean, got {getattr(cfg, name)!r}")


def _check_positive(cfg: Any, name: str) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{name}: expected a positive number, got {value!r}")


class _ConfigIO:
    """Shared JSON plumbing; subclasses are dataclasses with an `extra` dict field."""

    model_type: ClassVar[str]
    architecture: ClassVar[str]
    extra: dict[str, Any]
    dtype: str

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name not in ("extra", "dtype")]  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):  # noqa: ANN206 - returns the subclass
        data = dict(data)
        model_type = data.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ConfigError(f"model_type: expected {cls.model_type!r}, got {model_type!r}")
        names = set(cls.field_names())
        known = {k: data.pop(k) for k in list(data) if k in names}
        dtype = data.pop("dtype", None) or data.pop("torch_dtype", None) or "float32"
        for key in ("model_type", "architectures", "transformers_version"):
            data.pop(key, None)
        try:
            cfg = cls(**known, dtype=str(dtype), extra=data)  # type: ignore[call-arg]
        except TypeError as exc:  # pragma: no cover - dataclass guards
            raise ConfigError(str(exc)) from exc
        return cfg

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        for name in self.field_names():
            out[name] = getattr(self, name)
        out["model_type"] = self.model_type
        out["architectures"] = [self.architecture]
        out["dtype"] = self.dtype
        out["transformers_version"] = TRANSFORMERS_VERSION
        return dict(sorted(out.items()))

    @classmethod
    def from_json_file(cls, path: str | Path):  # noqa: ANN206
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"config.json: cannot read {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config.json: expected a JSON object in {path}")
        return cls.from_dict(data)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


@dataclass
class TextVAEConfig(_ConfigIO):
    """spec/model.md §2.1; `causal`, `use_emb`, `init_*`, dropouts are stored only."""

    model_type: ClassVar[str] = "cola_text_vae"
    architecture: ClassVar[str] = "ColaTextVAEModel"

    vocab_size: int = 100278
    encoder_num_blocks: int = 4
    decoder_num_blocks: int = 4
    dim: int = 1536
    ffn_dim: int = 6144
    latent_dim: int = 16
    patch_size: int = 1
    num_heads: int = 12
    shared_heads_kv: int = 1
    encoder_last_ln: bool = True
    layer_norm_type: str = "layer_norm"
    layer_norm_eps: float = 1e-6
    layer_norm_affine: bool = True
    post_norm: bool = True
    qk_bias: bool = False
    qk_norm: bool = True
    qk_norm_affine: bool = True
    clip_qkv: float | None = None
    rope_theta: float = 500000
    rope_full_precision: bool = True
    bias: bool = True
    dropout: float = 0.0
    attn_dropout: float = 0.0
    act: str = "swiglu"
    causal: bool = False
    block_causal: bool = True
    block_size: int = 4
    init_fn: str = "normal"
    init_std: float = 0.02
    init_cutoff_factor: float = 3
    use_variation: bool = True
    use_emb: bool = True
    scaling_factor: float = 1.0
    shifting_factor: float = 0.0
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.dim // self.shared_heads_kv

    def validate(self) -> TextVAEConfig:
        for name in (
            "vocab_size",
            "encoder_num_blocks",
            "decoder_num_blocks",
            "dim",
            "ffn_dim",
            "latent_dim",
            "patch_size",
            "num_heads",
            "shared_heads_kv",
            "block_size",
        ):
            _check_int(self, name, 0 if name.endswith("num_blocks") else 1)
        for name in (
            "encoder_last_ln",
            "layer_norm_affine",
            "post_norm",
            "qk_bias",
            "qk_norm",
            "qk_norm_affine",
            "rope_full_precision",
            "bias",
            "block_causal",
            "use_variation",
        ):
            _check_bool(self, name)
        _check_positive(self, "layer_norm_eps")
        _check_positive(self, "rope_theta")
        if self.dim % self.num_heads:
            raise ConfigError(f"num_heads: {self.num_heads} does not divide dim {self.dim}")
        if self.head_dim % 2:
            raise ConfigError(f"num_heads: head width {self.head_dim} must be even for RoPE")
        if self.shared_heads_kv not in (1, self.num_heads):
            raise ConfigError(
                f"shared_heads_kv: must be 1 or num_heads ({self.num_heads}); the reference "
                f"crashes for {self.shared_heads_kv}"
            )
        if self.layer_norm_type != "layer_norm":
            raise ConfigError(
                f"layer_norm_type: only 'layer_norm' is supported, got {self.layer_norm_type!r}"
            )
        if self.act not in ("swiglu", "silu", "gelu"):
            raise ConfigError(f"act: expected swiglu, silu or gelu, got {self.act!r}")
        if self.act == "swiglu" and self.ffn_dim % 2:
            raise ConfigError(f"ffn_dim: must be even for swiglu, got {self.ffn_dim}")
        if self.clip_qkv is not None:
            _check_positive(self, "clip_qkv")
        for name in ("scaling_factor", "shifting_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{name}: expected a number, got {value!r}")
        return self


@dataclass
class DiTConfig(_ConfigIO):
    """spec/model.md §3.1."""

    model_type: ClassVar[str] = "cola_dit"
    architecture: ClassVar[str] = "ColaDiTModel"

    txt_in_channels: int = 16
    txt_out_channels: int = 16
    txt_dim: int = 2048
    emb_dim: int = 2048
    heads: int = 16
    head_dim: int = 128
    expand_ratio: int = 4
    num_layers: int = 24
    norm_eps: float = 1e-5
    qk_bias: bool = False
    patch_size: int = 1
    rope_dim: int = 96
    block_size: int = 4
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def inner_dim(self) -> int:
        return self.heads * self.head_dim

    def validate(self) -> DiTConfig:
        for name in (
            "txt_in_channels",
            "txt_out_channels",
            "txt_dim",
            "emb_dim",
            "heads",
            "head_dim",
            "expand_ratio",
            "num_layers",
            "patch_size",
            "block_size",
        ):
            _check_int(self, name, 0 if name == "num_layers" else 1)
        _check_int(self, "rope_dim", 0)
        _check_bool(self, "qk_bias")
        _check_positive(self, "norm_eps")
        if self.emb_dim != self.txt_dim:
            raise ConfigError(f"emb_dim: must equal txt_dim ({self.txt_dim}), got {self.emb_dim}")
        if self.patch_size != 1:
            raise ConfigError(
                f"patch_size: only 1 is coherent in the reference, got {self.patch_size}"
            )
        if self.rope_dim > self.head_dim:
            raise ConfigError(f"rope_dim: {self.rope_dim} exceeds head_dim {self.head_dim}")
        return self
