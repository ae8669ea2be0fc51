"""One running batch of rows advancing block by block (spec/inference.md §3.7–§3.9).

Contract:
* Rows are `RowState`s (pipeline/rows.py). `RunningBatch.add` prefills newcomers (prefix
  through the DiT at t = 0 and through the VAE decoder, both appending to fresh caches) and
  merges them into the batch; `RunningBatch.step` runs one block for every
  running row (noise, N Euler steps with cond/uncond passes and CFG, pins in block 0, decode,
  token choice, stop rules, DiT commit) and returns the rows that finished.
* Batch invariance (per-row mode): every model call is built so that a row's numbers do not
  depend on its batch-mates. Measured on this CPU (torch 2.13, oneDNN/MKL, 1 and 2 threads):
  - The model pads each sample's keys to the call's largest key length. PyTorch's CPU SDPA
    changes the last bits whenever that padding changes. The explicit matmul → softmax →
    matmul core (the DiT's `reference_numerics` path) gives identical results for every
    zero-tail width >= 32 but a different result below 32 (bf16 vector width), and only if
    a sample's valid keys sit contiguously at the front. Hence, for batched DiT calls:
    (1) the conditional pass is an `update_cache=True` call (cache then the new rows at
    their true positions, tail padding only) whose length bump is undone with
    `KVCache.advance(-q)` — the rows it leaves past the valid length are masked and are
    overwritten by the next write; (2) every cache-reading call carries a first dummy
    sample with WIDTH_FLOOR cached zero positions and no query rows, so every width is in
    the >= 32 regime, alone or batched; (3) the DiT runs the explicit core (dtype bf16, or
    fp32 with reference numerics). With SDPA (fp32 without reference numerics) DiT calls are
    instead split into groups of rows with identical cache lengths (no padding differences).
  - The VAE always uses SDPA, so decoder calls are grouped by cache length, prefill calls
    by prefix length, and prompts are encoded in groups of equal padded length.
  - GEMMs give row-invariant results for M in {4, 8} or >= 12 rows (fp32, 2 threads) and
    M >= 2 (bf16); rows per call are multiples of S, so S % 4 == 0 keeps every call safe.
    Per-sample timesteps (AdaLN on B rows) are used only when B is such a count.
  - Elementwise ops vectorise identically when rows are 16-element aligned (model widths
    are multiples of 16); noise and token draws come from per-row generators.
  - Bit-identity is verified by tests (tests/test_pipeline_engine.py) on this CPU; other CPUs
    and GPUs (cuBLAS/cuDNN heuristics) may need the same measurements redone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from cola_batch.model.cache import KVCache
from cola_batch.model.checkpoint import ColaModel
from cola_batch.pipeline import rng
from cola_batch.pipeline.rows import WIDTH_FLOOR, Part, RowState, RunConfig
from cola_batch.pipeline.sampler import (
    history_mask,
    inverse_cdf_draw,
    reference_draw,
    select_tokens,
)
from cola_batch.schemas.job import ErrorCode


def _lens(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.long)


class RunningBatch:
    def __init__(
        self,
        model: ColaModel,
        cfg: RunConfig,
        device: torch.device,
        autocast: bool,
        act_dtype: torch.dtype,
        grouped_dit: bool,
        sample_generator: torch.Generator | None = None,
        dit_forward: Callable[..., torch.Tensor] | None = None,
        trace: Callable[[RowState, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> None:
        self.model, self.cfg, self.device = model, cfg, device
        self.trace = trace
        self.autocast, self.grouped_dit, self.act = autocast, grouped_dit, act_dtype
        self.dit_forward = dit_forward or model.dit
        # Cond + uncond in one eager pass; a compiled forward keeps two calls.
        self.fused = dit_forward is None and hasattr(model.dit, "forward_guided")
        self.sample_generator = sample_generator
        self.S = model.dit.config.block_size
        self.P = model.vae.config.patch_size
        self.C = self.S * self.P
        self.d = model.dit.config.txt_in_channels
        self.vocab = model.vae.config.vocab_size
        grid = torch.linspace(cfg.T, 0.0, cfg.steps + 1, dtype=torch.float32)
        self.t_model = grid.to(torch.bfloat16).float().tolist()
        self.dt = [((grid[i] - grid[i + 1]) / max(cfg.T, 1.0)).to(device) for i in range(cfg.steps)]
        self.dit_parts: list[Part] = []
        self.vae_parts: list[Part] = []

    # ------------------------------------------------------------------ helpers
    def ctx(self) -> contextlib.AbstractContextManager:
        if self.autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def rows(self) -> list[RowState]:
        return [r for p in self.dit_parts for r in p.rows]

    def __len__(self) -> int:
        return sum(len(p.rows) for p in self.dit_parts)

    def _num_layers(self, which: str) -> int:
        return (
            self.model.dit.config.num_layers
            if which == "dit"
            else self.model.vae.config.decoder_num_blocks
        )

    @staticmethod
    def _merge(parts: list[Part], new: Part, by_k: bool) -> None:
        if by_k:
            for p in parts:
                if p.rows and p.rows[0].k == new.rows[0].k:
                    p.rows.extend(new.rows)
                    p.cache = p.cache.concat(new.cache)
                    return
        else:
            if not parts:
                dummy = KVCache(new.cache.num_layers, 1)
                dummy.advance(torch.tensor([WIDTH_FLOOR]))
                parts.append(Part([], dummy, 1))
            parts[0].rows.extend(new.rows)
            parts[0].cache = parts[0].cache.concat(new.cache)
            return
        parts.append(new)

    # ------------------------------------------------------------------ prefill
    def add(self, newcomers: Sequence[RowState]) -> None:
        """Prefill newcomers (already encoded) in groups of equal prefix length, then merge."""
        by_p: dict[int, list[RowState]] = {}
        fresh: list[Part] = []
        for r in newcomers:
            by_p.setdefault(r.plan.prefix_latents, []).append(r)
        for p, rows in by_p.items():
            n = len(rows)
            dit_cache = KVCache(self._num_layers("dit"), n)
            vae_cache = KVCache(self._num_layers("vae"), n)
            if p > 0:
                z = torch.cat([r.latents[:p] for r in rows]).to(self.device)
                lens = _lens([p] * n, self.device)
                with torch.no_grad(), self.ctx():
                    self.dit_forward(
                        z.to(torch.bfloat16).to(self.act),
                        lens,
                        lens,
                        self._times(0.0, n, n * p, None),
                        cache=dit_cache,
                        update_cache=True,
                    )
                    self.model.vae.decode(
                        z.to(self.act), lens, lens, cache=vae_cache, update_cache=True
                    )
            for r in rows:
                r.k = p
                r.latents = None
            if self.grouped_dit:
                self._merge(self.dit_parts, Part(list(rows), dit_cache), True)
            else:
                fresh.append(Part(list(rows), dit_cache))
            self._merge(self.vae_parts, Part(list(rows), vae_cache), True)
        if fresh:
            # One concatenation for every newcomer group: caches are copied once, not once
            # per group (which also kept freed, ever larger copies in the heap).
            if not self.dit_parts:
                dummy = KVCache(fresh[0].cache.num_layers, 1)
                dummy.advance(torch.tensor([WIDTH_FLOOR]))
                self.dit_parts.append(Part([], dummy, 1))
            base = self.dit_parts[0]
            base.rows.extend(r for part in fresh for r in part.rows)
            base.cache = KVCache.concat_all([base.cache] + [part.cache for part in fresh])

    def remove(self, gone: set[int]) -> None:
        """Drop rows (by id()) from every part and cache."""
        for parts in (self.dit_parts, self.vae_parts):
            kept_parts = []
            for p in parts:
                keep = [i for i, r in enumerate(p.rows) if id(r) not in gone]
                if len(keep) == len(p.rows):
                    kept_parts.append(p)
                elif keep:
                    idx = list(range(p.dummy)) + [i + p.dummy for i in keep]
                    rows = [p.rows[i] for i in keep]
                    p.cache.keep_(idx)  # no other reference: compact in place, layer by layer
                    kept_parts.append(Part(rows, p.cache, p.dummy))
            parts[:] = kept_parts

    # ------------------------------------------------------------------ one block
    def _noise(self, r: RowState) -> torch.Tensor:
        if self.cfg.reference_noise:
            seed = rng.reference_noise_seed(self.cfg.noise_base, r.row_id, r.block)
        else:
            seed = rng.row_seed(rng.NOISE, self.cfg.noise_base, r.row_id, r.sample_index, r.block)
        return rng.block_noise(seed, self.S, self.d)

    def _denoise(self, part: Part) -> torch.Tensor:
        S, n, cfg = self.S, len(part.rows), self.cfg
        z = torch.cat([self._noise(r) for r in part.rows]).to(self.device)
        pin_mask = torch.zeros(n * S, dtype=torch.bool)
        pin_vals = torch.zeros(n * S, self.d)
        scale = torch.empty(n * S, 1)
        w0 = float(torch.tensor(cfg.guidance).to(torch.bfloat16))  # block-0 vector is bf16
        for i, r in enumerate(part.rows):
            if r.block == 0:
                scale[i * S : (i + 1) * S] = w0 if r.plan.prefix_latents > 0 else 1.0
                if r.pinned is not None:
                    m = r.pinned.shape[0]
                    pin_mask[i * S : i * S + m] = True
                    pin_vals[i * S : i * S + m] = r.pinned
            else:
                scale[i * S : (i + 1) * S] = cfg.guidance
        has_pins = bool(pin_mask.any())
        pin_mask, pin_vals = pin_mask.to(self.device), pin_vals.to(self.device)
        q = _lens([S] * n, self.device)
        kk_c, q_c = self._cached_lens(part)
        scale_dev = scale.to(self.device)
        pins = pin_mask if has_pins else None
        with torch.no_grad():
            for step in range(cfg.steps):
                t = self.t_model[step]
                if has_pins:
                    z = torch.where(pin_mask[:, None], pin_vals, z)
                xin = z.to(torch.bfloat16).to(self.act)
                with self.ctx():
                    # Fused: the unconditional rows are extra rows of the same pass.
                    call = self.model.dit.forward_guided if self.fused else self.dit_forward
                    times = self._times(t, n + part.dummy, n * S, pins)
                    out = call(xin, kk_c, q_c, times, cache=part.cache, update_cache=True)
                    part.cache.advance(-q_c)
                    if self.fused:
                        c, u = out
                    else:
                        c = out
                        u = self.dit_forward(xin, q, q, self._times(t, n, n * S, pins))
                s = scale_dev.to(c.dtype)
                v = s * (c - u) + u
                z = z - (v * self.dt[step]).float()
                if has_pins:
                    z = torch.where(pin_mask[:, None], pin_vals, z)
        return z

    def _cached_lens(self, part: Part) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_lens, q_lens) of a cache-reading call on `part`, width-floor dummy first."""
        S = self.S
        k = [WIDTH_FLOOR] * part.dummy + [r.k + S for r in part.rows]
        q = [0] * part.dummy + [S] * len(part.rows)
        return _lens(k, self.device), _lens(q, self.device)

    def _times(self, t: float, samples: int, rows: int, pins: torch.Tensor | None) -> torch.Tensor:
        """Timesteps of one call: per sample (B,) when uniform, else per token (rows,).

        Per sample, the model runs its AdaLN linears on B rows instead of one per token. That
        is bit-identical to the per-token form only when B is a GEMM-row-invariant count
        ({4, 8} or >= 12, see module docstring), so other counts use per-token times.
        """
        if pins is None and (samples in (4, 8) or samples >= 12):
            return torch.full((samples,), t, device=self.device)
        tau = torch.full((rows,), t, device=self.device)
        return tau.masked_fill_(pins, 0.0) if pins is not None else tau

    def step(self) -> list[RowState]:
        """Advance every row by one block; return the rows that finished (or failed)."""
        S, C = self.S, self.C
        zs: dict[int, torch.Tensor] = {}
        for part in self.dit_parts:
            z = self._denoise(part)
            for i, r in enumerate(part.rows):
                zs[id(r)] = z[i * S : (i + 1) * S]
        failed = [
            r for p in self.dit_parts for r in p.rows if not bool(torch.isfinite(zs[id(r)]).all())
        ]
        for r in failed:
            r.error = (ErrorCode.NUMERIC_ERROR, f"non-finite latents in block {r.block}")
        logits: dict[int, torch.Tensor] = {}
        for part in self.vae_parts:
            n = len(part.rows)
            z = torch.cat([zs[id(r)] for r in part.rows]).to(self.act)
            kk = _lens([r.k + S for r in part.rows], self.device)
            with torch.no_grad(), self.ctx():
                out = self.model.vae.decode(
                    z, kk, _lens([S] * n, self.device), cache=part.cache, update_cache=True
                )
            out = out.reshape(n, C, -1)
            for i, r in enumerate(part.rows):
                logits[id(r)] = out[i]
        ordered = sorted((r for p in self.dit_parts for r in p.rows), key=lambda r: r.seq)
        if self.trace is not None:
            for r in ordered:
                self.trace(r, zs[id(r)], logits[id(r)])
        tokens = self._choose(ordered, torch.stack([logits[id(r)] for r in ordered]))
        finished = self._bookkeep(ordered, tokens, set(map(id, failed)))
        gone = {id(r) for r in finished}
        self.remove(gone)
        self._commit(zs)
        for r in self.rows:
            r.k += S
            r.block += 1
        return finished

    def _choose(self, rows: list[RowState], logits: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        hist = (
            history_mask([r.history for r in rows], logits.shape[-1], logits.device)
            if cfg.sampler.repetition_penalty != 1.0
            else None
        )
        draw = None
        if not cfg.sampler.greedy:
            if cfg.reference_noise:
                assert self.sample_generator is not None
                draw = reference_draw(self.sample_generator)
            else:
                draw = inverse_cdf_draw(
                    [
                        rng.generator(
                            rng.row_seed(
                                rng.TOKENS, cfg.noise_base, r.row_id, r.sample_index, r.block
                            )
                        )
                        for r in rows
                    ]
                )
        with torch.no_grad():
            return select_tokens(logits, hist, cfg.sampler, draw).cpu()

    def _bookkeep(
        self, rows: list[RowState], tokens: torch.Tensor, failed: set[int]
    ) -> list[RowState]:
        cfg, stops = self.cfg, set(self.cfg.specials.stops)
        done: list[RowState] = []
        for i, r in enumerate(rows):
            if id(r) in failed:
                done.append(r)
                continue
            new = tokens[i].tolist()
            r.history.extend(new)
            if cfg.reference_stop:
                r.stop_flag = r.stop_flag or any(t in stops for t in new)
                continue
            gen = r.history[r.plan.trim :]
            fresh_from = max(0, len(gen) - (len(new) - (r.plan.trim if r.block == 0 else 0)))
            cut = next((j for j in range(fresh_from, len(gen)) if gen[j] in stops), None)
            if cut is not None and cut < cfg.max_new_tokens:
                r.result_tokens, r.finish_reason = gen[:cut], "stop"
            elif len(gen) >= cfg.max_new_tokens or r.block + 1 >= r.blocks_total:
                r.result_tokens, r.finish_reason = gen[: cfg.max_new_tokens], "length"
            else:
                continue
            done.append(r)
        if cfg.reference_stop:
            live = [r for r in rows if id(r) not in failed]
            if live and (
                all(r.stop_flag for r in live) or all(r.block + 1 >= r.blocks_total for r in live)
            ):
                for r in live:
                    r.result_tokens = r.history[min(r.plan.trim, len(r.history)) :]
                    r.finish_reason = "stop" if r.stop_flag else "length"
                    done.append(r)
        return done

    def _commit(self, zs: dict[int, torch.Tensor]) -> None:
        S = self.S
        for part in self.dit_parts:
            n = len(part.rows)
            z = torch.cat([zs[id(r)] for r in part.rows])
            kk_c, q_c = self._cached_lens(part)
            with torch.no_grad(), self.ctx():
                self.dit_forward(
                    z.to(torch.bfloat16).to(self.act),
                    kk_c,
                    q_c,
                    self._times(0.0, n + part.dummy, n * S, None),
                    cache=part.cache,
                    update_cache=True,
                )
        # Decoder caches were appended by the decode itself; nothing else to commit.
