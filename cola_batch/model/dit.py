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

from cola_batch.model.attention import AttentionPlan, PairPlan, RopeTable, rotate_pairs
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
        self, h: torch.Tensor, plan: AttentionPlan | PairPlan, layer: int, reference_numerics: bool
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


# Per-layer AdaLN terms: (shift_msa, 1 + scale_msa, gate_msa, shift_mlp, 1 + scale_mlp, gate_mlp).
Modulation = tuple[torch.Tensor, ...]


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        d = cfg.txt_dim
        self.eps = cfg.norm_eps
        self.msa = DiTAttention(cfg)
        self.mlp = MLP(cfg)
        self.ada = AdaLN(d, {"msa_in": 2 * d, "msa_out": d, "mlp_in": 2 * d, "mlp_out": d})

    def modulation(self, e_silu: torch.Tensor) -> Modulation:
        """AdaLN terms for embedding rows `e_silu` (one row per distinct timestep)."""
        shift1, scale1 = self.ada.msa_in[1](e_silu).chunk(2, dim=-1)
        gate1 = self.ada.msa_out[1](e_silu)
        shift2, scale2 = self.ada.mlp_in[1](e_silu).chunk(2, dim=-1)
        gate2 = self.ada.mlp_out[1](e_silu)
        return shift1, 1 + scale1, gate1, shift2, 1 + scale2, gate2

    def forward(
        self,
        x: torch.Tensor,
        mod: Modulation,
        plan: AttentionPlan | PairPlan,
        layer: int,
        reference_numerics: bool,
    ) -> torch.Tensor:
        """`mod` terms are per row (ΣQ, ·) or one broadcast row (1, ·)."""
        d = x.shape[-1]
        shift1, scale1, gate1, shift2, scale2, gate2 = mod
        h = F.layer_norm(x, (d,), eps=self.eps) * scale1 + shift1
        x = self.msa(h, plan, layer, reference_numerics) * gate1 + x
        h = F.layer_norm(x, (d,), eps=self.eps) * scale2 + shift2
        return self.mlp(h) * gate2 + x


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

    def _weights_key(self) -> tuple:
        """Identity and version of every tensor the modulation depends on."""
        mods = [self.emb_in, self.txt_out_ada] + [b.ada for b in self.blocks]
        return tuple((p.data_ptr(), p._version, p.dtype) for m in mods for p in m.parameters())

    def _modulations(
        self, values: torch.Tensor, dtype: torch.dtype
    ) -> tuple[list[Modulation], tuple[torch.Tensor, torch.Tensor]]:
        """AdaLN terms of every layer and of the output layer for distinct timesteps `values`.

        The timestep MLP and the AdaLN linears run on a fixed number of rows (the distinct
        values padded by repetition to 4, 8 or >= 12 rows: GEMM row counts whose per-row results
        do not depend on the count, see pipeline/batch.py), so a timestep's terms are the same
        bits however many samples or tokens share it — and they are memoised across calls
        (Euler steps reuse the same few timesteps in every block).
        """
        n = values.numel()
        m = 4 if n <= 4 else 8 if n <= 8 else max(12, n)
        padded = torch.cat([values, values[:1].expand(m - n)])
        dev = values.device
        key = (
            tuple(padded.tolist()),
            dtype,
            dev,
            torch.is_autocast_enabled(dev.type),
            torch.get_autocast_dtype(dev.type),
            self._weights_key(),
        )
        # Memoised only without autograd: inference reuses terms, training must not.
        memo = self.__dict__.setdefault("_mod_memo", {}) if not torch.is_grad_enabled() else {}
        hit = memo.get(key)
        if hit is None:
            e = self.emb_in(timestep_sinusoid(padded).to(dtype))
            e_silu = F.silu(e)
            layers = [block.modulation(e_silu) for block in self.blocks]
            shift, scale = self.txt_out_ada.out_in[1](e_silu).chunk(2, dim=-1)
            if len(memo) > 256:
                memo.clear()
            hit = memo[key] = (layers, (shift, 1 + scale))
        return hit

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
        return self._run(h, plan, plan, timestep, 1)

    def forward_guided(
        self,
        x: torch.Tensor,
        k_lens: torch.Tensor,
        q_lens: torch.Tensor,
        timestep: float | torch.Tensor,
        cache: KVCache,
        update_cache: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditional and unconditional velocities of the same rows in one pass.

        The conditional half is `forward(x, k_lens, q_lens, timestep, cache, update_cache)`;
        the unconditional half is `forward(x, q, q, timestep)` with q the non-zero `q_lens`
        (no history, positions from 0). Both halves share every Linear call (2·ΣQ rows; GEMM
        rows do not depend on the row count) and the timestep terms; attention runs per half.
        """
        cfg = self.config
        if update_cache and cache is None:
            raise ValueError("update_cache=True needs a cache")
        h = self.txt_in.proj(x)
        rows = x.shape[0]
        cond = AttentionPlan.build(
            k_lens, q_lens, rows, cfg.block_size, x.device, cache=cache, update_cache=update_cache
        )
        q_u = cond.q_lens[cond.q_lens > 0]
        uncond = AttentionPlan.build(q_u, q_u, rows, cfg.block_size, x.device)
        out = self._run(torch.cat([h, h]), cond, PairPlan(cond, uncond), timestep, 2)
        return out[:rows], out[rows:]

    def _run(
        self,
        h: torch.Tensor,
        first: AttentionPlan,
        plan: AttentionPlan | PairPlan,
        timestep: float | torch.Tensor,
        copies: int,
    ) -> torch.Tensor:
        """The blocks and output layer on `copies` stacked copies of `first`'s rows."""
        rows = h.shape[0] // copies
        t, per_sample = self._timesteps(timestep, h[:rows], first.batch)
        # AdaLN depends on the timestep only: compute it per distinct value, then broadcast
        # (one value) or gather per row. Per-sample and per-token forms give the same terms.
        values = t.detach().float()
        uniq, inverse = torch.unique(values, return_inverse=True)
        layers, (shift, scale) = self._modulations(uniq, h.dtype)
        if uniq.numel() == 1:
            expand: torch.Tensor | None = None
            pick = slice(0, 1)
        else:
            expand = inverse[first.rows_b] if per_sample else inverse
            expand = expand.repeat(copies)
            pick = slice(None)

        def per_row(term: torch.Tensor) -> torch.Tensor:
            return term[pick] if expand is None else term[expand]

        for i, block in enumerate(self.blocks):
            mod = tuple(per_row(term) for term in layers[i])
            h = block(h, mod, plan, i, self.reference_numerics)
        plan.finish()
        y = self.txt_out_norm(h) * per_row(scale) + per_row(shift)
        return self.txt_out.proj(y)
