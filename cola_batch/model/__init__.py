"""Text VAE + block-causal DiT networks, KV caches, checkpoint I/O (contract: docs/model-api.md).

Heavy submodules are imported lazily so `import cola_batch.model` stays cheap for the CLI.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TextVAEConfig": "config",
    "DiTConfig": "config",
    "ConfigError": "config",
    "KVCache": "cache",
    "TextVAE": "vae",
    "DiT": "dit",
    "ColaModel": "checkpoint",
    "CheckpointError": "checkpoint",
    "load_model": "checkpoint",
    "load_vae": "checkpoint",
    "load_dit": "checkpoint",
    "save_model": "checkpoint",
    "save_vae": "checkpoint",
    "save_dit": "checkpoint",
    "build_preset": "presets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"cola_batch.model.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'cola_batch.model' has no attribute {name!r}")
