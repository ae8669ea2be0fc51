"""Where every random number of a row comes from (spec/inference.md §3.9(b)).

Contract:
* per-row mode: `row_seed(purpose, job_seed, row_id, sample_index, block)` is a stable 63-bit
  integer (blake2b of the fields), so a row's latent noise for block b and its token draws for
  block b depend only on (job seed, row id, sample index, block) — never on batch-mates, order,
  batch size, shard or retry. Generators are CPU `torch.Generator`s (device-independent
  streams); noise is drawn on CPU and moved to the model device.
* reference mode: `reference_noise_seed(base, sid, block) = base + 1000·sid_int + 10⁷·block`
  with the reference's id conversion (`reference_sid_int`), and an (S, d) standard normal from
  a fresh CPU generator — bit-identical to the reference's CPU draws.
"""

from __future__ import annotations

import hashlib
import zlib

import torch

NOISE = "noise"
TOKENS = "tokens"
_MASK63 = (1 << 63) - 1


def row_seed(purpose: str, job_seed: int, row_id: str, sample_index: int, block: int) -> int:
    key = f"cola-batch/v1\x1f{purpose}\x1f{job_seed}\x1f{row_id}\x1f{sample_index}\x1f{block}"
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def row_base_seed(job_seed: int, row_id: str, sample_index: int) -> int:
    """The seed reported for a row (RowResult.seed): its block-independent identity."""
    return row_seed("row", job_seed, row_id, sample_index, 0)


def reference_sid_int(sid: object) -> int:
    """Python-style int conversion of a prompt id; CRC-32 of str(sid) when that fails."""
    if isinstance(sid, bool):
        return int(sid)
    if isinstance(sid, int):
        return sid
    if isinstance(sid, float) and sid == sid and sid not in (float("inf"), float("-inf")):
        return int(sid)
    if isinstance(sid, str | bytes):
        try:
            return int(sid)
        except ValueError:
            pass
    return zlib.crc32(str(sid).encode("utf-8")) & 0xFFFFFFFF


def reference_noise_seed(base: int, sid: object, block: int) -> int:
    return base + 1000 * reference_sid_int(sid) + 10_000_000 * block


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def block_noise(seed: int, rows: int, dim: int) -> torch.Tensor:
    """(rows, dim) float32 standard normal from a fresh CPU generator seeded `seed`."""
    return torch.randn(rows, dim, generator=generator(seed), dtype=torch.float32)
