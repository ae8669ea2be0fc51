"""KV-cache semantics, batch independence and dtype behaviour of the networks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cola_batch.model.cache import KVCache
from cola_batch.model.checkpoint import ColaModel, load_model
from cola_batch.model.config import TextVAEConfig
from cola_batch.model.dit import DiT
from cola_batch.model.presets import init_vae_
from cola_batch.model.vae import TextVAE

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GOLDEN = SHARED / "conformance" / "tiny-a"
needs_golden = pytest.mark.skipif(not (GOLDEN / "meta.json").exists(),
                                  reason="shared/conformance/tiny-a not available")


def lens(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


pytestmark = needs_golden
TOL = 2e-5


@pytest.fixture(scope="module")
def model() -> ColaModel:
    return load_model(GOLDEN)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _split(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(x.split(sizes))


def _interleave(parts: list[list[torch.Tensor]]) -> torch.Tensor:
    """Per-sample concatenation of several flat chunks: [s0 chunk0, s0 chunk1, s1 chunk0, ...]."""
    return torch.cat([torch.cat(p) for p in zip(*parts, strict=True)])


@torch.no_grad()
def test_dit_block_by_block_with_cache_equals_one_cache_free_pass(model: ColaModel) -> None:
    dit, bs = model.dit, model.dit.block_size
    c = dit.config.txt_in_channels
    prefix = [8, 0, 4]
    g = _gen(1)
    x_prefix = torch.randn(sum(prefix), c, generator=g)
    blocks = [torch.randn(3 * bs, c, generator=g) for _ in range(3)]
    cache = dit.new_cache()
    dit(x_prefix, lens(*prefix), lens(*prefix), 0.0, cache=cache, update_cache=True)
    assert cache.lengths() == prefix
    outs = []
    k = torch.tensor(prefix)
    for block in blocks:
        k = k + bs
        outs.append(dit(block, k, lens(bs, bs, bs), 0.0, cache=cache, update_cache=True))
    assert cache.lengths() == (k).tolist()
    full_x = _interleave([_split(x_prefix, prefix)] + [_split(b, [bs] * 3) for b in blocks])
    full = dit(full_x, k, k, 0.0)
    tail = [full_split[-3 * bs:] for full_split in _split(full, k.tolist())]
    cached = _interleave([_split(o, [bs] * 3) for o in outs])
    assert (torch.cat(tail) - cached).abs().max() < TOL


@torch.no_grad()
def test_dit_read_only_cache_does_not_grow_and_update_reads_too(model: ColaModel) -> None:
    dit, bs = model.dit, model.dit.block_size
    c = dit.config.txt_in_channels
    g = _gen(2)
    prefix = torch.randn(2 * bs, c, generator=g)
    block = torch.randn(2 * bs, c, generator=g)
    cache = dit.new_cache()
    dit(prefix, lens(bs, bs), lens(bs, bs), 0.0, cache=cache, update_cache=True)
    read = dit(block, lens(2 * bs, 2 * bs), lens(bs, bs), 500.0, cache=cache)
    assert cache.lengths() == [bs, bs]
    commit = dit(block, lens(2 * bs, 2 * bs), lens(bs, bs), 500.0, cache=cache,
                 update_cache=True)
    assert cache.lengths() == [2 * bs, 2 * bs]
    assert torch.equal(read, commit)
    no_cache = dit(block, lens(bs, bs), lens(bs, bs), 500.0)
    assert (no_cache - read).abs().max() > 1e-3  # the history is really attended to


@torch.no_grad()
def test_vae_cached_decode_equals_cache_free_decode(model: ColaModel) -> None:
    vae, bs = model.vae, model.vae.block_size
    z = vae.latent_dim
    g = _gen(3)
    prefix = [4, 12]
    zp = torch.randn(sum(prefix), z, generator=g)
    zb = [torch.randn(2 * bs, z, generator=g) for _ in range(2)]
    cache = vae.new_cache()
    outs = [vae.decode(zp, lens(*prefix), lens(*prefix), cache=cache, update_cache=True)]
    k = torch.tensor(prefix)
    for block in zb:
        k = k + bs
        outs.append(vae.decode(block, k, lens(bs, bs), cache=cache, update_cache=True))
    full = vae.decode(_interleave([_split(zp, prefix)] + [_split(b, [bs, bs]) for b in zb]), k, k)
    cached = _interleave([_split(o, s) for o, s in zip(outs, [prefix, [bs, bs], [bs, bs]],
                                                        strict=True)])
    assert full.shape == (int(k.sum()), vae.vocab_size)
    assert (full - cached).abs().max() < TOL


def _prefill(dit: DiT, x: torch.Tensor, sizes: list[int]) -> KVCache:
    cache = dit.new_cache()
    dit(x, torch.tensor(sizes), torch.tensor(sizes), 0.0, cache=cache, update_cache=True)
    return cache


@torch.no_grad()
def test_cache_select_and_concat_match_running_those_samples_alone(model: ColaModel) -> None:
    dit, bs = model.dit, model.dit.block_size
    c = dit.config.txt_in_channels
    sizes = [8, 4, 12]
    g = _gen(4)
    parts = [torch.randn(n, c, generator=g) for n in sizes]
    block = torch.randn(2 * bs, c, generator=g)
    full = _prefill(dit, torch.cat(parts), sizes)

    picked = full.select([2, 0])
    assert picked.lengths() == [12, 8] and full.lengths() == sizes
    alone = _prefill(dit, torch.cat([parts[2], parts[0]]), [12, 8])
    k = lens(12 + bs, 8 + bs)
    a = dit(block, k, lens(bs, bs), 300.0, cache=picked)
    b = dit(block, k, lens(bs, bs), 300.0, cache=alone)
    assert (a - b).abs().max() < TOL

    kept = _prefill(dit, torch.cat(parts), sizes)
    kept.keep_([2, 0])  # in place, same contents as select
    assert kept.lengths() == [12, 8] and kept.capacity() == picked.capacity()
    for layer in range(dit.config.num_layers):
        assert all(torch.equal(x, y) for x, y in
                   zip(kept.storage(layer), picked.storage(layer), strict=True))  # fmt: skip

    joined = _prefill(dit, parts[0], [8]).concat(_prefill(dit, torch.cat(parts[1:]), [4, 12]))
    assert joined.lengths() == sizes and joined.num_samples() == 3
    block3 = torch.randn(3 * bs, c, generator=g)
    k3 = lens(8 + bs, 4 + bs, 12 + bs)
    a = dit(block3, k3, lens(bs, bs, bs), 700.0, cache=joined)
    b = dit(block3, k3, lens(bs, bs, bs), 700.0, cache=full)
    assert (a - b).abs().max() < TOL


@torch.no_grad()
def test_batched_results_equal_single_sample_results(model: ColaModel) -> None:
    dit, vae = model.dit, model.vae
    g = _gen(5)
    sizes = [4, 12, 8]
    x = torch.randn(sum(sizes), dit.config.txt_in_channels, generator=g)
    batched = dit(x, torch.tensor(sizes), torch.tensor(sizes), 250.0)
    single = torch.cat([dit(p, lens(n), lens(n), 250.0)
                        for p, n in zip(_split(x, sizes), sizes, strict=True)])
    assert (batched - single).abs().max() < TOL
    ids = [torch.randint(0, vae.vocab_size, (n,), generator=g) for n in sizes]
    enc = vae.encode(ids)
    assert [t.shape for t in enc] == [(n, vae.latent_dim) for n in sizes]
    for i, t in enumerate(ids):
        assert (vae.encode([t])[0] - enc[i]).abs().max() < TOL


@torch.no_grad()
def test_timestep_forms_agree(model: ColaModel) -> None:
    dit = model.dit
    g = _gen(6)
    sizes = [4, 8]
    x = torch.randn(12, dit.config.txt_in_channels, generator=g)
    k = torch.tensor(sizes)
    scalar = dit(x, k, k, 400.0)
    assert torch.equal(scalar, dit(x, k, k, torch.tensor(400.0)))
    per_token = dit(x, k, k, torch.full((12,), 400.0))
    assert (scalar - per_token).abs().max() < TOL
    per_sample = dit(x, k, k, torch.tensor([400.0, 900.0]))
    mixed = dit(x, k, k, torch.tensor([400.0] * 4 + [900.0] * 8))
    assert (per_sample - mixed).abs().max() < TOL
    assert (per_sample[4:] - scalar[4:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="timestep"):
        dit(x, k, k, torch.zeros(5))


@torch.no_grad()
def test_lengths_inconsistent_with_the_cache_are_rejected(model: ColaModel) -> None:
    dit = model.dit
    cache = _prefill(dit, torch.zeros(8, dit.config.txt_in_channels), [4, 4])
    x = torch.zeros(8, dit.config.txt_in_channels)
    with pytest.raises(ValueError, match="cached lengths"):
        dit(x, lens(4, 4), lens(4, 4), 0.0, cache=cache)
    with pytest.raises(ValueError, match="k_lens"):
        dit(x, lens(8, 8), lens(4, 4), 0.0)  # no cache: keys must be the query rows
    with pytest.raises(ValueError, match="rows"):
        dit(x, lens(4, 3), lens(4, 3), 0.0)


@torch.no_grad()
def test_bf16_weights_and_autocast_run_close_to_fp32(model: ColaModel) -> None:
    bf = load_model(GOLDEN, dtype=torch.bfloat16)
    g = _gen(7)
    sizes = [8, 4]
    x = torch.randn(12, model.dit.config.txt_in_channels, generator=g)
    k = torch.tensor(sizes)
    ref = model.dit(x, k, k, 500.0)
    low = bf.dit(x.bfloat16(), k, k, 500.0)
    assert low.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = model.dit(x, k, k, 500.0)
        cache = model.vae.new_cache()
        logits = model.vae.decode(x, k, k, cache=cache, update_cache=True)
    scale = ref.abs().max()
    assert (low.float() - ref).abs().max() < 0.1 * scale
    assert (auto.float() - ref).abs().max() < 0.1 * scale
    fp32_logits = model.vae.decode(x, k, k)
    assert (logits.float() - fp32_logits).abs().max() < 0.1 * fp32_logits.abs().max()


def _random_vae(**overrides: object) -> TextVAE:
    cfg = TextVAEConfig(vocab_size=64, encoder_num_blocks=1, decoder_num_blocks=2, dim=32,
                        ffn_dim=64, latent_dim=4, num_heads=4, block_size=2, **overrides)
    vae = TextVAE(cfg).eval()
    init_vae_(vae, _gen(8))
    return vae


@torch.no_grad()
def test_mqa_and_pre_norm_variants_keep_cache_equivalence() -> None:
    for overrides in ({"shared_heads_kv": 4}, {"post_norm": False, "act": "gelu",
                                               "clip_qkv": 0.05, "qk_norm": False}):
        vae = _random_vae(**overrides)
        g = _gen(9)
        z = torch.randn(12, 4, generator=g)
        full = vae.decode(z, lens(6, 6), lens(6, 6))
        cache = vae.new_cache()
        first = vae.decode(torch.cat([z[:4], z[6:10]]), lens(4, 4), lens(4, 4), cache=cache,
                           update_cache=True)
        second = vae.decode(torch.cat([z[4:6], z[10:]]), lens(6, 6), lens(2, 2), cache=cache)
        got = torch.cat([first[:4], second[:2], first[4:], second[2:]])
        assert (got - full).abs().max() < TOL, overrides


@torch.no_grad()
def test_vae_without_block_causal_lets_samples_see_each_other_like_the_reference() -> None:
    g = _gen(10)
    z = torch.randn(8, 4, generator=g)
    z2 = z.clone()
    z2[4:] = torch.randn(4, 4, generator=g)
    for block_causal, coupled in ((True, False), (False, True)):
        vae = _random_vae(block_causal=block_causal)
        a = vae.decode(z, lens(4, 4), lens(4, 4))[:4]
        b = vae.decode(z2, lens(4, 4), lens(4, 4))[:4]
        assert (not torch.equal(a, b)) is coupled
