"""Flatten-concat attention shared by the VAE and the DiT (spec/model.md §1, §2.7, §3.6, §3.8).

Contract:
* Activations are flat `(ΣQ_i, ...)` rows in sample order; `k_lens`/`q_lens` give per-sample key
  and query lengths; queries are the last `q_lens[i]` of sample i's `k_lens[i]` key positions.
* `AttentionPlan` is built once per model call: it validates lengths against the cache, holds
  the scatter/gather index tensors, the RoPE positions of the new rows and a per-sample
  `(B, 1, maxQ, maxK)` boolean mask (block-causal, never across samples). Every layer reuses it.
* `attend` runs one layer: pads queries/keys per sample, reads/appends the `KVCache`, and calls
  `scaled_dot_product_attention` — or, with `reference_numerics`, reproduces the reference's
  CPU bf16 attention core (§3.7).
* With `block_causal=False` (VAE only) the reference applies no mask at all, so samples see each
  other; the plan then attends over all rows of the batch as one sequence, as the reference does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cola_batch.model.cache import KVCache


def as_lengths(lens: torch.Tensor | list[int], name: str) -> torch.Tensor:
    """(B,) or (B,1) lengths -> (B,) int64 CPU tensor."""
    t = torch.as_tensor(lens).detach().to("cpu")
    if t.dim() == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() != 1:
        raise ValueError(f"{name}: expected shape (B,) or (B, 1), got {tuple(t.shape)}")
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"{name}: negative length")
    return t.to(torch.long)


@dataclass
class AttentionPlan:
    """Index tensors and mask shared by every layer of one model call."""

    batch: int
    rows_b: torch.Tensor  # (ΣQ,) sample of each flat row
    rows_j: torch.Tensor  # (ΣQ,) query slot of each flat row
    q_pos: torch.Tensor  # (ΣQ,) absolute position of each flat row
    max_q: int
    cached: torch.Tensor  # (B,) cache length before the call (CPU)
    q_lens: torch.Tensor  # (B,) CPU
    k_lens: torch.Tensor  # (B,) CPU
    mode: str  # "new" | "read" | "update"
    mask: torch.Tensor | None  # (B, 1, maxQ, Nk) bool, None in flat mode
    flat_keys: torch.Tensor | None  # (B, Nk) bool key validity, for flat (unmasked) mode
    cache: KVCache | None
    max_k: int
    _wide: torch.Tensor | None = None

    @staticmethod
    def build(
        k_lens: torch.Tensor | list[int],
        q_lens: torch.Tensor | list[int],
        rows: int,
        block_size: int,
        device: torch.device,
        cache: KVCache | None = None,
        update_cache: bool = False,
        block_causal: bool = True,
    ) -> AttentionPlan:
        k = as_lengths(k_lens, "k_lens")
        q = as_lengths(q_lens, "q_lens")
        if k.shape != q.shape:
            raise ValueError(f"k_lens has {k.numel()} samples, q_lens has {q.numel()}")
        if int(q.sum()) != rows:
            raise ValueError(f"sum(q_lens) = {int(q.sum())} but the input has {rows} rows")
        batch = int(q.numel())
        if cache is not None:
            cache.ensure_batch(batch)
            cached = cache.lengths_tensor()
        else:
            cached = torch.zeros(batch, dtype=torch.long)
        if not torch.equal(k, cached + q):
            raise ValueError(
                f"k_lens {k.tolist()} must equal cached lengths {cached.tolist()} "
                f"+ q_lens {q.tolist()}"
            )
        if cache is None or (cache.is_empty() and not update_cache):
            mode = "new"
        else:
            mode = "update" if update_cache else "read"

        max_q = int(q.max()) if batch else 0
        rows_b = torch.repeat_interleave(torch.arange(batch), q)
        starts = torch.cumsum(q, 0) - q
        rows_j = torch.arange(rows) - starts[rows_b]
        q_pos = cached[rows_b] + rows_j

        slot = torch.arange(max_q)
        q_valid = slot[None, :] < q[:, None]  # (B, maxQ)
        q_slot_pos = cached[:, None] + slot[None, :]
        if mode == "new":
            k_pos, k_valid = q_slot_pos, q_valid
        elif mode == "read":
            width = int(cached.max()) if batch else 0
            cslot = torch.arange(width)
            k_pos = torch.cat([cslot.expand(batch, width), q_slot_pos], 1)
            k_valid = torch.cat([cslot[None, :] < cached[:, None], q_valid], 1)
        else:
            width = int(k.max()) if batch else 0
            kslot = torch.arange(width)
            k_pos = kslot.expand(batch, width)
            k_valid = kslot[None, :] < k[:, None]
        max_k = int(k_pos.shape[1])

        if block_causal:
            allowed = k_valid[:, None, :] & (
                (q_slot_pos // block_size)[:, :, None] >= (k_pos // block_size)[:, None, :]
            )
            # Padded query rows are discarded; letting them see every key avoids NaN rows.
            allowed = allowed | ~q_valid[:, :, None]
            mask, flat_keys = allowed[:, None].to(device), None
        else:
            mask, flat_keys = None, k_valid.to(device)
        return AttentionPlan(
            batch=batch,
            rows_b=rows_b.to(device),
            rows_j=rows_j.to(device),
            q_pos=q_pos.to(device),
            max_q=max_q,
            cached=cached,
            q_lens=q,
            k_lens=k,
            mode=mode,
            mask=mask,
            flat_keys=flat_keys,
            cache=cache,
            max_k=max_k,
        )

    def finish(self) -> None:
        """Advance the cache lengths after every layer has appended its rows."""
        if self.mode == "update" and self.cache is not None:
            self.cache.advance(self.q_lens)

    # ------------------------------------------------------------------ per layer
    @property
    def uniform(self) -> bool:
        """Every sample has `max_q` rows: flat rows are then already the padded layout."""
        return self.batch * self.max_q == self.rows_b.numel()

    def _pad(self, flat: torch.Tensor) -> torch.Tensor:
        if self.uniform:  # the common case (every sample runs one block): a view, no copy
            return flat.view(self.batch, self.max_q, *flat.shape[1:])
        out = flat.new_zeros((self.batch, self.max_q, *flat.shape[1:]))
        out[self.rows_b, self.rows_j] = flat
        return out

    def _unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """(B, maxQ, ...) -> (ΣQ, ...) flat rows in sample order."""
        if self.uniform:
            return padded.reshape(self.batch * self.max_q, *padded.shape[2:])
        return padded[self.rows_b, self.rows_j]

    def keys_values(
        self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, full_capacity: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Head-major padded (B, heads, Nk, Dh) keys/values of this layer.

        Update mode reads the cache storage in place (no copy): `full_capacity` returns the
        whole storage (Nk = capacity, the tail past each length masked by `mask_for`), else
        the first `max_k` positions.
        """
        if self.mode == "new":
            return self._pad(k_new).transpose(1, 2), self._pad(v_new).transpose(1, 2)
        assert self.cache is not None
        if self.mode == "update":
            self.cache.write(layer, k_new, v_new, self.rows_b, self.q_pos, self.max_k)
            k_all, v_all = self.cache.storage(layer)
            if full_capacity:
                return k_all, v_all
            return k_all[:, :, : self.max_k], v_all[:, :, : self.max_k]
        stored = self.cache.storage(layer)
        width = self.max_k - self.max_q
        if stored is None:
            kc = k_new.new_zeros((self.batch, k_new.shape[1], width, k_new.shape[2]))
            vc = v_new.new_zeros((self.batch, v_new.shape[1], width, v_new.shape[2]))
        else:
            kc, vc = stored[0][:, :, :width], stored[1][:, :, :width]
        kc = kc.to(k_new.dtype)
        vc = vc.to(v_new.dtype)
        kp = self._pad(k_new).transpose(1, 2)
        vp = self._pad(v_new).transpose(1, 2)
        return torch.cat([kc, kp], 2), torch.cat([vc, vp], 2)

    def mask_for(self, width: int) -> torch.Tensor | None:
        """The plan's mask widened with masked-out key columns up to `width` (memoised)."""
        if self.mask is None or width == self.mask.shape[-1]:
            return self.mask
        if self._wide is None or self._wide.shape[-1] != width:
            extra = width - self.mask.shape[-1]
            # Padded query rows keep seeing every key, as in `build`; real rows see none.
            padded = torch.arange(self.max_q)[None, :] >= self.q_lens[:, None]
            pad = padded.to(self.mask.device)[:, None, :, None].expand(-1, 1, -1, extra)
            self._wide = torch.cat([self.mask, pad], dim=-1)
        return self._wide

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        reference_numerics: bool = False,
    ) -> torch.Tensor:
        """q (ΣQ, H, Dh), k/v (ΣQ, Hk, Dh) -> (ΣQ, H, Dh) attention output (rows in order).

        With `reference_numerics` new keys/values are rounded to bf16 before they are stored
        (the core rounds them anyway, so the numbers are unchanged) and a cache-updating call
        attends over the cache's whole capacity: the core then multiplies the storage in place,
        with no per-layer copy of the history.
        """
        if reference_numerics:
            k_new = k_new.to(torch.bfloat16)
            v_new = v_new.to(torch.bfloat16)
        wide = reference_numerics and self.mode == "update" and self.flat_keys is None
        keys, values = self.keys_values(layer, k_new, v_new, full_capacity=wide)
        heads = q.shape[1]
        if self.flat_keys is not None:
            qh = q.transpose(0, 1)[None]  # (1, H, ΣQ, Dh)
            kh = keys.transpose(1, 2)[self.flat_keys].transpose(0, 1)[None]
            vh = values.transpose(1, 2)[self.flat_keys].transpose(0, 1)[None]
            out = _core(qh, kh, vh, None, heads, reference_numerics)
            return out[0].transpose(0, 1)
        qh = self._pad(q).transpose(1, 2)  # (B, H, maxQ, Dh)
        mask = self.mask_for(keys.shape[2])
        out = _core(qh, keys, values, mask, heads, reference_numerics)
        return self._unpad(out.transpose(1, 2))


class PairPlan:
    """Two plans over consecutive row ranges of one activation tensor.

    Used to run the conditional and unconditional passes of classifier-free guidance as one
    model call: every Linear sees both halves' rows at once, attention runs per half with its
    own plan (the first may read/update a cache, the second attends its own rows only).
    """

    def __init__(self, first: AttentionPlan, second: AttentionPlan) -> None:
        self.first, self.second = first, second
        self.split = int(first.q_lens.sum())
        self.q_pos = torch.cat([first.q_pos, second.q_pos])

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        reference_numerics: bool = False,
    ) -> torch.Tensor:
        n = self.split
        a = self.first.attend(layer, q[:n], k_new[:n], v_new[:n], reference_numerics)
        b = self.second.attend(layer, q[n:], k_new[n:], v_new[n:], reference_numerics)
        return torch.cat([a, b])

    def finish(self) -> None:
        self.first.finish()
        self.second.finish()


def _core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    heads: int,
    reference_numerics: bool,
) -> torch.Tensor:
    if k.shape[1] != heads:  # MQA: one K/V head broadcast to every query head
        k = k.expand(-1, heads, -1, -1)
        v = v.expand(-1, heads, -1, -1)
    if reference_numerics:
        return reference_bf16_core(q, k, v, mask)
    if not torch.is_autocast_enabled(q.device.type):
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def reference_bf16_core(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """The reference DiT's attention core as it runs on CPU: bf16 matmuls and softmax (§3.7).

    Scores are scaled in the input precision, rounded to bf16, multiplied with fp32
    accumulation and a bf16 result; masked entries become -inf; softmax returns bf16.
    The result is returned in q's dtype.
    """
    scale = q.shape[-1] ** -0.5
    with torch.autocast(q.device.type, enabled=False):
        qs = (q * scale).to(torch.bfloat16)
        scores = torch.matmul(qs, k.to(torch.bfloat16).transpose(-1, -2))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, v.to(torch.bfloat16))
    return out.to(q.dtype)


# ---------------------------------------------------------------------- RoPE helpers
def rotate_half_split(x: torch.Tensor) -> torch.Tensor:
    """[x1 | x2] -> [-x2 | x1] (NeoX half-split convention, used by the VAE)."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) (interleaved convention, the DiT)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


class RopeTable:
    """cos/sin of position × frequency, computed in fp32 and grown on demand.

    Angles are a single fp32 product per entry, so a table lookup gives exactly the values a
    direct computation would.
    """

    def __init__(self) -> None:
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None
        self._key: tuple | None = None

    def lookup(
        self, freqs: torch.Tensor, positions: torch.Tensor, repeat: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, F') cos and sin for `positions`; `repeat` 'cat' -> [φ|φ], 'pairs' -> φ0 φ0 φ1 φ1."""
        needed = int(positions.max()) + 1 if positions.numel() else 1
        key = (id(freqs), freqs._version, freqs.device, repeat)
        if self._cos is None or self._key != key or self._cos.shape[0] < needed:
            size = 1 << max(needed - 1, 63).bit_length()
            f = freqs.detach().float()
            with torch.autocast(freqs.device.type, enabled=False):
                pos = torch.arange(size, device=freqs.device, dtype=torch.float32)
                angles = pos[:, None] * f[None, :]
                if repeat == "cat":
                    angles = torch.cat([angles, angles], dim=-1)
                else:
                    angles = angles.repeat_interleave(2, dim=-1)
                self._cos, self._sin = angles.cos(), angles.sin()
            self._key = key
        assert self._sin is not None
        return self._cos[positions], self._sin[positions]
