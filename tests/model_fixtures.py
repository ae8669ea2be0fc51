"""Shared helpers for the model-core tests (imported by tests/test_model_*.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GOLDEN = SHARED / "conformance" / "tiny-a"

needs_golden = pytest.mark.skipif(not (GOLDEN / "meta.json").exists(),
                                  reason="shared/conformance/tiny-a not available")


def lens(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator)
