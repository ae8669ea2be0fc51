"""Per-layer, per-sample K/V history of one generation batch (spec/model.md §2.7, §3.8).

Contract:
* A `KVCache` belongs to one model instance and one batch; sample i of the cache is sample i of
  every call that reads it. It is an explicit object passed to `decode`/`forward`, never hidden
  module state, so several batches can be in flight on one model.
* Storage per layer is a head-major padded tensor pair `(B, heads, capacity, head_dim)`;
  `lengths[i]` positions of sample i are valid, the rest are finite (zeros or stale rows) and
  must be masked by readers. Head-major storage lets attention read `storage[:, :, :W]` (or the
  whole tensor) as the `(B, H, W, Dh)` operand of its matmuls without a transposing copy.
  Capacity is a multiple of `GROW` positions (>= the longest sample), grown by whole chunks in
  place of doubling, so a cache is never much larger than its live context. A given maximum
  length always yields the same capacity (`capacity_for`), whatever the batch history.
  Keys are stored **after** qk-norm and RoPE: both are per-row functions of the row and its
  absolute position, so this yields the same numbers as the reference, which stores them
  earlier and re-applies the norm/rotation on every read. The storage dtype is that of the
  first write (the DiT writes bf16 when its attention core rounds to bf16 anyway).
* `write`/`advance` (the models with `update_cache=True`) and `keep_` mutate the cache in place.
  `select` and `concat` return new caches and never modify their inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Capacity granularity in positions; >= 32 also keeps a capacity-wide attention read in the
# width regime where the explicit bf16 core is width-invariant (see pipeline/batch.py).
GROW = 64


def capacity_for(length: int) -> int:
    """Storage capacity for a longest sample of `length` positions."""
    return max(GROW, -(-length // GROW) * GROW)


class KVCache:
    """K/V rows of every layer for a batch of B samples."""

    def __init__(self, num_layers: int, batch_size: int = 0) -> None:
        self.num_layers = num_layers
        self._lengths = torch.zeros(batch_size, dtype=torch.long)
        self._k: list[torch.Tensor | None] = [None] * num_layers
        self._v: list[torch.Tensor | None] = [None] * num_layers

    # ------------------------------------------------------------------ inspection
    def lengths(self) -> list[int]:
        return [int(x) for x in self._lengths.tolist()]

    def lengths_tensor(self) -> torch.Tensor:
        return self._lengths.clone()

    def num_samples(self) -> int:
        return int(self._lengths.numel())

    def is_empty(self) -> bool:
        return self._k[0] is None if self.num_layers else True

    def capacity(self) -> int:
        """Allocated positions per sample (0 before the first write)."""
        k = self._k[0] if self.num_layers else None
        return 0 if k is None else int(k.shape[2])

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Padded (B, max_len, heads, head_dim) views of layer `index`, or None if empty."""
        k, v = self._k[index], self._v[index]
        if k is None or v is None:
            return None
        width = int(self._lengths.max()) if self._lengths.numel() else 0
        return k[:, :, :width].transpose(1, 2), v[:, :, :width].transpose(1, 2)

    def storage(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The raw head-major (B, heads, capacity, head_dim) tensors of layer `index`."""
        k, v = self._k[index], self._v[index]
        if k is None or v is None:
            return None
        return k, v

    def sample(self, layer: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(len_i, heads, head_dim) K and V of one sample; for tests and debugging."""
        kv = self.layer(layer)
        n = int(self._lengths[index])
        if kv is None:
            raise IndexError("cache is empty")
        return kv[0][index, :n], kv[1][index, :n]

    # ------------------------------------------------------------------ mutation
    def ensure_batch(self, batch_size: int) -> None:
        """Adopt the batch size of the first call on an empty cache; reject a change later."""
        if self.is_empty() and int(self._lengths.sum()) == 0:
            if self._lengths.numel() != batch_size:
                self._lengths = torch.zeros(batch_size, dtype=torch.long)
        elif self._lengths.numel() != batch_size:
            raise ValueError(f"cache holds {self._lengths.numel()} samples, call has {batch_size}")

    def write(
        self,
        layer: int,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        rows_b: torch.Tensor,
        rows_pos: torch.Tensor,
        new_max: int,
    ) -> None:
        """Store flat rows (N, heads, head_dim) of `layer` at (sample rows_b, position rows_pos).

        `new_max` is the largest length after the write; storage grows to `capacity_for` it
        (existing rows copied, converted if the dtype changes). The caller advances the
        lengths once per call with `advance` after every layer has written.
        """
        k, v = self._k[layer], self._v[layer]
        batch = self._lengths.numel()
        if (
            k is None
            or v is None
            or k.shape[2] < new_max
            or k.dtype != k_new.dtype
            or v.dtype != v_new.dtype
        ):
            old = 0 if k is None else int(k.shape[2])
            capacity = max(old, capacity_for(new_max))
            k2 = k_new.new_zeros((batch, k_new.shape[1], capacity, k_new.shape[2]))
            v2 = v_new.new_zeros((batch, v_new.shape[1], capacity, v_new.shape[2]))
            if k is not None and v is not None:
                k2[:, :, :old] = k
                v2[:, :, :old] = v
            k, v = k2, v2
            self._k[layer], self._v[layer] = k, v
        if rows_b.numel():
            k[rows_b, :, rows_pos] = k_new
            v[rows_b, :, rows_pos] = v_new

    def advance(self, q_lens: torch.Tensor) -> None:
        self._lengths = self._lengths + q_lens.to(self._lengths.device, torch.long).cpu()

    def clear(self) -> None:
        self._lengths = torch.zeros_like(self._lengths)
        self._k = [None] * self.num_layers
        self._v = [None] * self.num_layers

    # ------------------------------------------------------------------ batch surgery
    def select(self, indices: Sequence[int]) -> KVCache:
        """A new cache holding samples `indices` (in that order); self is unchanged."""
        # `keep_` only rebinds the new cache's list entries to fresh gathered tensors, so the
        # storage shared until then is never written.
        out = KVCache(self.num_layers, self.num_samples())
        out._lengths = self._lengths.clone()
        out._k, out._v = list(self._k), list(self._v)
        out.keep_(indices)
        return out

    def keep_(self, indices: Sequence[int]) -> None:
        """In place: keep samples `indices` (in that order), shrinking capacity to fit.

        Same contents as `select`, but layers are replaced one at a time, so the transient
        memory is one layer, not a second copy of the whole cache (a running batch drops
        finished rows every block).
        """
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        lengths = self._lengths[idx].clone()
        cap = capacity_for(int(lengths.max()) if idx.numel() else 0)
        for i in range(self.num_layers):
            k, v = self._k[i], self._v[i]
            if k is not None and v is not None:
                # index_select copies whole per-sample slabs; advanced indexing (k[idx]) is
                # an element-wise gather, several times slower on these sizes.
                dev_idx = idx.to(k.device)
                self._k[i] = _fit(k[:, :, :cap].index_select(0, dev_idx), cap)
                del k
                self._v[i] = _fit(v[:, :, :cap].index_select(0, dev_idx), cap)
                del v
        self._lengths = lengths

    def concat(self, other: KVCache) -> KVCache:
        """A new cache with our samples followed by `other`'s; neither input changes."""
        return KVCache.concat_all([self, other])

    @staticmethod
    def concat_all(caches: Sequence[KVCache]) -> KVCache:
        """A new cache with the samples of `caches` in order; no input changes.

        Each layer is allocated once at its final size and filled in place (no per-part
        padded copies), which keeps the peak memory of admitting many rows at ~1× the result.
        """
        if not caches:
            raise ValueError("nothing to concatenate")
        layers = caches[0].num_layers
        if any(c.num_layers != layers for c in caches):
            raise ValueError("caches of different depth cannot be concatenated")
        out = KVCache(layers, sum(c.num_samples() for c in caches))
        out._lengths = torch.cat([c._lengths for c in caches])
        width = capacity_for(int(out._lengths.max()) if out._lengths.numel() else 0)
        total = out.num_samples()
        for i in range(layers):
            ref = next((c._k[i] for c in caches if c._k[i] is not None), None)
            ref_v = next((c._v[i] for c in caches if c._v[i] is not None), None)
            if ref is None or ref_v is None:
                continue
            ok = ref.new_zeros((total, ref.shape[1], width, ref.shape[3]))
            ov = ref_v.new_zeros((total, ref_v.shape[1], width, ref_v.shape[3]))
            at = 0
            for cache in caches:
                k, v, n = cache._k[i], cache._v[i], cache.num_samples()
                if k is not None and v is not None:
                    w = min(width, k.shape[2])
                    ok[at : at + n, :, :w] = k[:, :, :w]
                    ov[at : at + n, :, :w] = v[:, :, :w]
                at += n
            out._k[i], out._v[i] = ok, ov
        return out

    def to(self, device: torch.device | str) -> KVCache:
        out = KVCache(self.num_layers, self.num_samples())
        out._lengths = self._lengths.clone()
        out._k = [None if k is None else k.to(device) for k in self._k]
        out._v = [None if v is None else v.to(device) for v in self._v]
        return out

    def __repr__(self) -> str:
        return f"KVCache(layers={self.num_layers}, lengths={self.lengths()})"


def _fit(x: torch.Tensor, cap: int) -> torch.Tensor:
    """`x` (B, H, <= cap, Dh), a fresh gather result, zero-extended to `cap` positions."""
    if x.shape[2] == cap:
        return x.contiguous()
    out = x.new_zeros((x.shape[0], x.shape[1], cap, x.shape[3]))
    out[:, :, : x.shape[2]] = x
    return out
