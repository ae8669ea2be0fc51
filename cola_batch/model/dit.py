"""Block-causal DiT prior (`ColaDiTModel` of the reference), spec/model.md §3.

Contract (docs/model-api.md):
* Module attribute names reproduce the reference state-dict keys exactly (§3.3), including the
  persistent `blocks.{i}.msa.rope.rope.freqs` buffer, which is the source of the RoPE
  frequencies (read from the checkpoint, kept fp32 whatever the weight dtype).
* `forward(x, k_lens, q_lens, timestep, cache, update_cache)` -> velocity `(ΣQ, C_out)`.
  cache None: attend over the current rows only; cache given: read it, and append this call's
  k/v when `update_cache` (the reference's `update_kv=True` always reads too).
* `reference_numerics=True` reproduces the reference's bf16 attention core on CPU (§3.7);
  the default computes attention with SDPA in the activation dtype.
* Timesteps: Python number / 0-d / 1-element (broadcast per row, cast to x's dtype), (ΣQ,) per
  token (not cast), (B,) per sample (cast; AdaLN linears on B rows, then repeated) — §3.4.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cola_batch.model.attention import AttentionPlan, RopeTable, rotate_pairs
from cola_batch.model.cache import KVCache
from cola_batch.model.config import DiTConfig

TIMESTEP_WIDTH = 256
ROPE_THETA = 10000.0


def default_rope_freqs(rope_dim: int) -> torch.Tensor:
    """1 / 10000^(2j/R) for j < R//2, in fp32 — the value the reference initialises."""
    exponent = torch.arange(0, rope_dim, 2)[: rope_dim // 2].float() / rope_dim
    return 1.0 / (ROPE_THETA**exponent)


def timestep_sinusoid(t: torch.Tensor) -> torch.Tensor:
    """(N,) raw timesteps (0..1000) -> (N, 256) [sin | cos] features in fp32."""
    half = TIMESTEP_WIDTH // 2
    with torch.autocast(t.device.type, enabled=False):
        exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(exponent / half)
        angles = t.float()[:, None] * freqs[None, :]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class _Freqs(nn.Module):
    def __init__(self, rope_dim: int) -> None:
        super().__init__()
        self.register_buffer("freqs", default_rope_freqs(rope_dim), persistent=True)


class _Rope(nn.Module):
    """Holder whose nesting gives the reference key `msa.rope.rope.freqs`."""

    def __init__(self, rope_dim: int) -> None:
        super().__init__()
        self.rope = _Freqs(rope_dim)


class DiTAttention(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        inner = cfg.inner_dim
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.proj_qkv = nn.Linear(cfg.txt_dim, 3 * inner, bias=cfg.qk_bias)
        self.proj_out = nn.Linear(inner, cfg.txt_dim, bias=cfg.qk_bias)
        self.norm_q = nn.LayerNorm(cfg.head_dim, eps=cfg.norm_eps)
        self.norm_k = nn.LayerNorm(cfg.head_dim, eps=cfg.norm_eps)
        self.rope = _Rope(cfg.rope_dim)
        self._table = RopeTable()

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        width = cos.shape[-1]
        with torch.autocast(x.device.type, enabled=False):
            xf = x.float()
            rot = xf[..., :width]
            rot = rot * cos + rotate_pairs(rot) * sin
            return torch.cat([rot, xf[..., width:]], dim=-1).to(x.dtype)

    def forward(
        self, h: torch.Tensor, plan: AttentionPlan, layer: int, reference_numerics: bool
    ) -> torch.Tensor:
        rows = h.shape[0]
        q, k, v = self.proj_qkv(h).reshape(rows, 3, self.heads, self.head_dim).unbind(1)
        q = self.norm_q(q)
        k = self.norm_k(k)
        cos, sin = self._table.lookup(self.rope.rope.freqs, plan.q_pos, "pairs")
        q = self._rotate(q, cos[:, None], sin[:, None])
        k = self._rotate(k, cos[:, None], sin[:, None])
        o = plan.attend(layer, q, k, v, reference_numerics=reference_numerics)
        return self.proj_out(o.to(q.dtype).reshape(rows, -1))


class MLP(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.proj_in = nn.Linear(cfg.txt_dim, cfg.expand_ratio * cfg.txt_dim)
        self.proj_out = nn.Linear(cfg.expand_ratio * cfg.txt_dim, cfg.txt_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(F.gelu(self.proj_in(x), approximate="tanh"))


def _ada(dim: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, out))


class AdaLN(nn.Module):
    def __init__(self, dim: int, names: dict[str, int]) -> None:
        super().__init__()
        for name, width in names.items():
            self.add_module(name, _ada(dim, width))


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        d = cfg.txt_dim
        self.eps = cfg.norm_eps
        self.msa = DiTAttention(cfg)
        self.mlp = MLP(cfg)
        self.ada = AdaLN(d, {"msa_in": 2 * d, "msa_out": d, "mlp_in": 2 * d, "mlp_out": d})

    def forward(
        self,
        x: torch.Tensor,
        e_silu: torch.Tensor,
        expand: torch.Tensor | None,
        plan: AttentionPlan,
        layer: int,
        reference_numerics: bool,
    ) -> torch.Tensor:
        d = x.shape[-1]

        def mod(name: str) -> torch.Tensor:
            # Linear on the embedding rows first, then repeat per token (bit-parity, §3.4).
            y = getattr(self.ada, name)[1](e_silu)
            return y if expand is None else y[expand]

        shift, scale = mod("msa_in").chunk(2, dim=-1)
        h = F.layer_norm(x, (d,), eps=self.eps) * (1 + scale) + shift
        x = self.msa(h, plan, layer, reference_numerics) * mod("msa_out") + x
        shift, scale = mod("mlp_in").chunk(2, dim=-1)
        h = F.layer_norm(x, (d,), eps=self.eps) * (1 + scale) + shift
        return self.mlp(h) * mod("mlp_out") + x


class _Proj(nn.Module):
    def __init__(self, fan_in: int, fan_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(fan_in, fan_out)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, emb_dim: int) -> None:
        super().__init__()
        self.proj_in = nn.Linear(TIMESTEP_WIDTH, dim)
        self.proj_hid = nn.Linear(dim, dim)
        self.proj_out = nn.Linear(dim, emb_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj_out(F.silu(self.proj_hid(F.silu(self.proj_in(features)))))


class DiT(nn.Module):
    """Velocity prediction over flatten-concat latent rows with block-causal attention."""

    def __init__(self, config: DiTConfig, reference_numerics: bool = False) -> None:
        super().__init__()
        cfg = config.validate()
        self.config = cfg
        self.reference_numerics = reference_numerics
        d = cfg.txt_dim
        self.txt_in = _Proj(cfg.txt_in_channels * cfg.patch_size, d)
        self.emb_in = TimestepEmbedding(d, cfg.emb_dim)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.num_layers))
        self.txt_out_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.txt_out_ada = AdaLN(d, {"out_in": 2 * d})
        self.txt_out = _Proj(d, cfg.txt_out_channels * cfg.patch_size)

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_layers)

    def _timesteps(
        self, timestep: float | torch.Tensor, x: torch.Tensor, batch: int
    ) -> tuple[torch.Tensor, bool]:
        """-> (t rows, per_sample flag), following the reference's normalisation (§3.4)."""
        rows = x.shape[0]
        if not isinstance(timestep, torch.Tensor):
            t = torch.tensor([float(timestep)], dtype=x.dtype, device=x.device)
        else:
            t = timestep.to(x.device).reshape(-1)
        if t.numel() == 1 and rows > 1:
            return t.expand(rows), False
        if t.numel() == rows:
            return t, False
        if t.numel() != batch:
            raise ValueError(
                f"timestep has {t.numel()} values; expected 1, {rows} (per token) "
                f"or {batch} (per sample)"
            )
        return t.to(x.dtype), True

    def forward(
        self,
        x: torch.Tensor,
        k_lens: torch.Tensor,
        q_lens: torch.Tensor,
        timestep: float | torch.Tensor,
        cache: KVCache | None = None,
        update_cache: bool = False,
    ) -> torch.Tensor:
        """x (ΣQ, C_in) -> predicted velocity (ΣQ, C_out)."""
        cfg = self.config
        if update_cache and cache is None:
            raise ValueError("update_cache=True needs a cache")
        h = self.txt_in.proj(x)
        plan = AttentionPlan.build(
            k_lens,
            q_lens,
            x.shape[0],
            cfg.block_size,
            x.device,
            cache=cache,
            update_cache=update_cache,
        )
        t, per_sample = self._timesteps(timestep, h, plan.batch)
        e = self.emb_in(timestep_sinusoid(t).to(h.dtype))
        e_silu = F.silu(e)
        expand = plan.rows_b if per_sample else None
        for i, block in enumerate(self.blocks):
            h = block(h, e_silu, expand, plan, i, self.reference_numerics)
        plan.finish()
        mod = self.txt_out_ada.out_in[1](e_silu)
        shift, scale = (mod if expand is None else mod[expand]).chunk(2, dim=-1)
        y = self.txt_out_norm(h) * (1 + scale) + shift
        return self.txt_out.proj(y)
