"""Text VAE (`ColaTextVAEModel` of the reference), spec/model.md §2.

Contract (docs/model-api.md):
* Module attribute names reproduce the reference state-dict keys exactly (§2.3); the model has
  no buffers.
* `encode(ids)` -> per-sample posterior means (after the no-affine mean LN); `encode_params`
  -> per-sample `[mean | raw logvar]` (or the LN'd deterministic head).
* `decode(z, k_lens, q_lens, cache, update_cache)` -> logits `(ΣQ·p, vocab_size)`; a given
  cache is always read (the reference VAE has no read flag) and appended to when
  `update_cache`. The model never applies `scaling_factor`/`shifting_factor`.
* Numerics follow the caller: fp32 on CPU (attention included), bf16 under autocast, and the
  dtype flows of §2.9 (qk-norm outputs cast back, RoPE in fp32 when `rope_full_precision`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cola_batch.model.attention import AttentionPlan, RopeTable, rotate_half_split
from cola_batch.model.cache import KVCache
from cola_batch.model.config import TextVAEConfig


class TextVAEBlock(nn.Module):
    """One transformer block; `post_norm=True` uses the reference's LN_attn(x) + Attn(x) form."""

    def __init__(self, cfg: TextVAEConfig) -> None:
        super().__init__()
        d, eps = cfg.dim, cfg.layer_norm_eps
        self.cfg = cfg
        self.norm_attn = nn.LayerNorm(d, eps=eps, elementwise_affine=cfg.layer_norm_affine)
        self.qkv_proj = nn.Linear(d, d + 2 * cfg.kv_dim, bias=cfg.qk_bias)
        if cfg.qk_norm:
            self.q_norm = nn.LayerNorm(d, eps=eps, elementwise_affine=cfg.qk_norm_affine)
            self.k_norm = nn.LayerNorm(cfg.kv_dim, eps=eps, elementwise_affine=cfg.qk_norm_affine)
        self.attn_out_proj = nn.Linear(d, d, bias=cfg.bias)
        self.norm_ffn = nn.LayerNorm(d, eps=eps)
        self.ffn_proj = nn.Linear(d, cfg.ffn_dim, bias=cfg.bias)
        ffn_out_in = cfg.ffn_dim // 2 if cfg.act == "swiglu" else cfg.ffn_dim
        self.ffn_out = nn.Linear(ffn_out_in, d, bias=cfg.bias)

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.act == "swiglu":
            value, gate = x.chunk(2, dim=-1)
            return value * F.silu(gate)
        if self.cfg.act == "silu":
            return F.silu(x)
        return F.gelu(x)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.cfg.rope_full_precision:
            with torch.autocast(x.device.type, enabled=False):
                xf = x.float()
                return (xf * cos + rotate_half_split(xf) * sin).to(x.dtype)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        return x * cos + rotate_half_split(x) * sin

    def forward(
        self, x: torch.Tensor, plan: AttentionPlan, layer: int, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        cfg = self.cfg
        rows, d = x.shape
        h_in = x if cfg.post_norm else self.norm_attn(x)
        u = self.qkv_proj(h_in)
        if cfg.clip_qkv is not None:
            u = u.clamp(-cfg.clip_qkv, cfg.clip_qkv)
        q, k, v = u.split([d, cfg.kv_dim, cfg.kv_dim], dim=-1)
        if cfg.qk_norm:
            q = self.q_norm(q).to(q.dtype)
            k = self.k_norm(k).to(k.dtype)
        c = cfg.head_dim
        q = self._rope(q.reshape(rows, -1, c), cos, sin)
        k = self._rope(k.reshape(rows, -1, c), cos, sin)
        v = v.reshape(rows, -1, c)
        o = plan.attend(layer, q, k, v).reshape(rows, d)
        a = self.attn_out_proj(o)
        x1 = self.norm_attn(x) + a if cfg.post_norm else x + a
        if cfg.post_norm:
            return x1 + self.norm_ffn(self.ffn_out(self._act(self.ffn_proj(x1))))
        return x1 + self.ffn_out(self._act(self.ffn_proj(self.norm_ffn(x1))))


class TextVAE(nn.Module):
    """Encoder (tokens -> latents) and block-causal decoder (latents -> logits)."""

    def __init__(self, config: TextVAEConfig) -> None:
        super().__init__()
        cfg = config.validate()
        self.config = cfg
        d, z = cfg.dim, cfg.latent_dim
        head = 2 * z if cfg.use_variation else z
        self.encoder = nn.ModuleDict(
            {
                "wte": nn.Embedding(cfg.vocab_size + 1, d),
                "patch_embedder": nn.Conv1d(
                    d, d, kernel_size=cfg.patch_size, stride=cfg.patch_size
                ),
                "blocks": nn.ModuleList(TextVAEBlock(cfg) for _ in range(cfg.encoder_num_blocks)),
                "final_layer": nn.Linear(d, head, bias=cfg.bias),
            }
        )
        self.decoder = nn.ModuleDict(
            {
                "in_layer": nn.Linear(z, d, bias=cfg.bias),
                "blocks": nn.ModuleList(TextVAEBlock(cfg) for _ in range(cfg.decoder_num_blocks)),
                "unpatch_layer": nn.Linear(d, cfg.patch_size * d),
                "final_norm": nn.LayerNorm(d, eps=cfg.layer_norm_eps),
                "final_layer": nn.Linear(d, cfg.vocab_size, bias=cfg.bias),
            }
        )
        self._rope_table = RopeTable()
        self._inv_freq: torch.Tensor | None = None

    # ------------------------------------------------------------------ conveniences
    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def scaling_factor(self) -> float:
        return float(self.config.scaling_factor)

    @property
    def shifting_factor(self) -> float:
        return float(self.config.shifting_factor)

    def new_cache(self) -> KVCache:
        return KVCache(self.config.decoder_num_blocks)

    # ------------------------------------------------------------------ internals
    def _rope_for(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = positions.device
        if self._inv_freq is None or self._inv_freq.device != device:
            c = self.config.head_dim
            exponent = torch.arange(0, c, 2, dtype=torch.float32, device=device) / c
            self._inv_freq = 1.0 / (float(self.config.rope_theta) ** exponent)
        cos, sin = self._rope_table.lookup(self._inv_freq, positions, "cat")
        return cos[:, None, :], sin[:, None, :]

    def _run_blocks(
        self, blocks: nn.ModuleList, x: torch.Tensor, plan: AttentionPlan
    ) -> torch.Tensor:
        cos, sin = self._rope_for(plan.q_pos)
        for i, block in enumerate(blocks):
            x = block(x, plan, i, cos, sin)
        plan.finish()
        return x

    # ------------------------------------------------------------------ encoder
    def encode_params(self, input_ids: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per sample (L_i/p, 2z): [mean after the no-affine LN | raw logvar]."""
        cfg = self.config
        p = cfg.patch_size
        device = self.encoder["wte"].weight.device
        ids = [torch.as_tensor(t, dtype=torch.long).reshape(-1).to(device) for t in input_ids]
        lens = torch.tensor([t.numel() for t in ids], dtype=torch.long)
        n = lens // p
        if not ids:
            return []
        padded = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True)
        emb = self.encoder["wte"](padded)  # (B, Lmax, d)
        patches = self.encoder["patch_embedder"](emb.transpose(1, 2)).transpose(1, 2)
        plan = AttentionPlan.build(
            n, n, int(n.sum()), cfg.block_size, device, block_causal=cfg.block_causal
        )
        x = patches[plan.rows_b, plan.rows_j]
        x = self._run_blocks(self.encoder["blocks"], x, plan)
        y = self.encoder["final_layer"](x)
        z = cfg.latent_dim
        eps = cfg.layer_norm_eps
        if cfg.use_variation and cfg.encoder_last_ln:
            mean = F.layer_norm(y[..., :z], (z,), eps=eps)
            y = torch.cat([mean, y[..., z:]], dim=-1)
        elif not cfg.use_variation:
            y = F.layer_norm(y, (z,), eps=eps)
        return list(y.split(n.tolist()))

    def encode(self, input_ids: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per sample (L_i/p, z): the posterior mean (the reference's latent, no sampling)."""
        z = self.config.latent_dim
        return [p[..., :z] for p in self.encode_params(input_ids)]

    # ------------------------------------------------------------------ decoder
    def decode(
        self,
        z: torch.Tensor,
        k_lens: torch.Tensor,
        q_lens: torch.Tensor,
        cache: KVCache | None = None,
        update_cache: bool = False,
    ) -> torch.Tensor:
        """z (ΣQ, latent_dim) -> logits (ΣQ·p, vocab_size)."""
        cfg = self.config
        if update_cache and cache is None:
            raise ValueError("update_cache=True needs a cache")
        x = self.decoder["in_layer"](z)
        plan = AttentionPlan.build(
            k_lens,
            q_lens,
            z.shape[0],
            cfg.block_size,
            z.device,
            cache=cache,
            update_cache=update_cache,
            block_causal=cfg.block_causal,
        )
        x = self._run_blocks(self.decoder["blocks"], x, plan)
        w = self.decoder["unpatch_layer"](x)
        # Channel-major un-patch: token j of a latent takes element ch·p + j (§2.8).
        rows = w.shape[0]
        w = w.reshape(rows, cfg.dim, cfg.patch_size).transpose(1, 2).reshape(-1, cfg.dim)
        return self.decoder["final_layer"](self.decoder["final_norm"](w))

    def forward(self, input_ids: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Encode then decode the means without a cache (the reference's HF forward)."""
        latents = self.encode(input_ids)
        n = torch.tensor([t.shape[0] for t in latents], dtype=torch.long)
        return latents, self.decode(torch.cat(latents), n, n)
