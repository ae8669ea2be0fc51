"""Public generation API: `Engine.generate(requests, params) -> Iterator[RowResult]`.

Contract:
* Each `RowRequest` (row id, prompt, sample index) yields exactly one `RowResult`, in the
  order rows finish. A bad row (empty prompt, prompt too long, tokenizer failure, non-finite
  latents, out of memory even alone) yields finish_reason "error" with an `ErrorCode` string; it
  never aborts other rows. Bad parameters raise `ValueError` before any work.
* Scheduling: rows wait in a queue (per-row noise: sorted by prompt length, i.e. length
  bucketing; reference noise: input order). A running batch admits rows while
  Σ(padded prompt + budgeted generation tokens) ≤ `batch_tokens` and rows ≤ `max_rows`.
  stop_mode "per-sample": a row leaves as soon as it is done and waiting rows are prefilled
  and join at the next block boundary (continuous refill). stop_mode "reference": static
  batches that run until every row has emitted EOS/im_end or the block budget is spent; text
  is not cut at EOS (the reference's behaviour).
* noise_mode "per-row" makes a row's output independent of batch composition, order, size,
  shard and retry (see `batch.py` for how the numerics are kept invariant); "reference"
  reproduces the reference's per-sample noise seeding and its single sampling generator.
* Out of memory during a batch: its rows are re-queued from scratch with half the row cap
  (results are unchanged in per-row mode); a row that fails alone gets error_code "out_of_memory".
* Numerics: dtype "bf16" (default) stores bf16 weights (a bf16 copy of fp32 weights is made if
  needed) and runs under bf16 autocast, so norms, softmax and RoPE stay fp32 inside the model
  and no weight is re-cast per call; "bf16-autocast" keeps fp32 weights under autocast (the
  reference's GPU recipe; same numbers, slower on CPU because autocast re-casts every weight
  on every call); both use the explicit bf16 DiT attention core. "fp32" runs fp32 (DiT
  attention SDPA, or the reference's bf16 core with `reference_numerics=True`). DiT inputs
  and timesteps are bf16-rounded as in the reference.
"""

from __future__ import annotations

import collections
import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from cola_batch.model.checkpoint import ColaModel, keep_fp32
from cola_batch.pipeline import rng
from cola_batch.pipeline.batch import RunningBatch
from cola_batch.pipeline.layout import blocks_needed, plan_prompt, special_ids, tokenize
from cola_batch.pipeline.rows import RowState, RunConfig
from cola_batch.pipeline.sampler import SamplerConfig
from cola_batch.schemas.job import ErrorCode
from cola_batch.schemas.sampling import SamplingParams


@dataclass(frozen=True)
class RowRequest:
    row_id: str
    prompt: str
    sample_index: int = 0


@dataclass
class RowResult:
    row_id: str
    sample_index: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "error"
    prompt_tokens: int
    completion_tokens: int
    seed: int
    error_code: str | None = None
    error_message: str | None = None


DTYPES = ("bf16", "bf16-autocast", "fp32")


def _cast_module(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`module` itself if its weights already have `dtype`, else a converted copy."""
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    floating = [(n, t) for n, t in tensors if t.is_floating_point() and not keep_fp32(n)]
    if all(t.dtype == dtype for _, t in floating):
        return module
    out = copy.deepcopy(module)
    for name, t in list(out.named_parameters()) + list(out.named_buffers()):
        if t.is_floating_point() and not keep_fp32(name):
            t.data = t.data.to(dtype)
    return out


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use cpu or cuda[:N]")
    return dev


class Engine:
    def __init__(
        self,
        model: ColaModel,
        *,
        device: str = "cpu",
        dtype: str = "bf16",
        reference_numerics: bool = False,
        batch_tokens: int = 4096,
        compile: bool = False,
        max_rows: int = 256,
        max_context: int = 8192,
    ) -> None:
        self.device = _check_device(device)
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {DTYPES}")
        if batch_tokens <= 0 or max_rows <= 0 or max_context <= 0:
            raise ValueError("batch_tokens, max_rows and max_context must be positive")
        if model.tokenizer is None:
            raise ValueError("the model has no tokenizer")
        self.dtype = dtype
        weights = torch.bfloat16 if dtype == "bf16" else torch.float32
        model = ColaModel(
            vae=_cast_module(model.vae, weights).to(self.device),
            dit=_cast_module(model.dit, weights).to(self.device),
            tokenizer=model.tokenizer,
            root=model.root,
        )
        self.model = model
        self.reference_numerics = reference_numerics
        self.batch_tokens, self.max_rows, self.max_context = batch_tokens, max_rows, max_context
        self.specials = special_ids(model.tokenizer)
        self._dit_forward: Callable[..., torch.Tensor] | None = None
        if compile:
            self._dit_forward = torch.compile(model.dit, dynamic=True)
        # Test seam: pretend a batch of more than this many rows runs out of memory.
        self.fail_batches_over: int | None = None
        # Observer of every finished block: (row state, latents (S, d), logits (C, V)).
        self.trace: Callable[[RowState, torch.Tensor, torch.Tensor], None] | None = None

    # ------------------------------------------------------------------ rows
    def _error(
        self, req: RowRequest, code: str, msg: str, seed: int, prompt_tokens: int = 0
    ) -> RowResult:
        return RowResult(
            req.row_id, req.sample_index, "", [], "error", prompt_tokens, 0, seed, str(code), msg
        )

    def _seed(self, req: RowRequest, params: SamplingParams) -> int:
        if params.noise_mode == "reference":
            try:
                return rng.reference_noise_seed(params.seed, req.row_id, 0)
            except Exception:  # noqa: BLE001
                return params.seed
        return rng.row_base_seed(params.seed, req.row_id, req.sample_index)

    def _prepare(self, req: RowRequest, seq: int, params: SamplingParams) -> RowState | RowResult:
        seed = self._seed(req, params)
        if not isinstance(req.prompt, str) or req.prompt == "":
            return self._error(req, ErrorCode.EMPTY_PROMPT, "the prompt is empty", seed)
        try:
            ids = tokenize(self.model.tokenizer, req.prompt)
        except Exception as exc:  # noqa: BLE001
            return self._error(req, ErrorCode.TOKENIZER_ERROR, f"tokenizer failed: {exc}", seed)
        if not ids:
            return self._error(req, ErrorCode.EMPTY_PROMPT, "the prompt encodes to no tokens", seed)
        S, P = self.model.dit.config.block_size, self.model.vae.config.patch_size
        plan = plan_prompt(len(ids), S, P)
        blocks = blocks_needed(
            params.max_new_tokens, S * P, plan.trim, params.stop_mode == "reference"
        )
        if plan.padded_tokens + blocks * S * P > self.max_context:
            return self._error(
                req,
                ErrorCode.PROMPT_TOO_LONG,
                f"{len(ids)} prompt tokens + {blocks * S * P} generated exceed "
                f"the context limit of {self.max_context}",
                seed,
                len(ids),
            )
        return RowState(req.row_id, req.sample_index, seq, ids, plan, blocks, seed)

    def _cost(self, r: RowState) -> int:
        return (
            r.plan.padded_tokens
            + r.blocks_total * self.model.dit.config.block_size * self.model.vae.config.patch_size
        )

    def _encode(self, rows: list[RowState], autocast: bool) -> None:
        """Scaled prompt latents, encoded in groups of equal padded length (no padding)."""
        vae = self.model.vae
        shift, scale = float(vae.config.shifting_factor), float(vae.config.scaling_factor)
        by_len: dict[int, list[RowState]] = collections.defaultdict(list)
        for r in rows:
            by_len[r.plan.padded_tokens].append(r)
        for group in by_len.values():
            ids = [
                torch.tensor(
                    r.ids + [self.specials.pad] * r.plan.pad, dtype=torch.long, device=self.device
                )
                for r in group
            ]
            with (
                torch.no_grad(),
                torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast),
            ):
                means = vae.encode(ids)
            for r, m in zip(group, means, strict=True):
                z = (m.float() - shift) * scale
                r.latents = z
                p, pin = r.plan.prefix_latents, r.plan.pinned
                r.pinned = z[p : p + pin].clone() if pin else None

    def _result(self, r: RowState) -> RowResult:
        if r.error is not None:
            return RowResult(
                r.row_id,
                r.sample_index,
                "",
                [],
                "error",
                r.plan.n_tokens,
                0,
                r.seed,
                str(r.error[0]),
                r.error[1],
            )
        toks = list(r.result_tokens or [])
        text = self.model.tokenizer.decode(toks, skip_special_tokens=False)
        return RowResult(
            r.row_id,
            r.sample_index,
            text,
            toks,
            r.finish_reason or "length",
            r.plan.n_tokens,
            len(toks),
            r.seed,
        )

    # ------------------------------------------------------------------ main loop
    def generate(
        self,
        requests: Iterable[RowRequest],
        params: SamplingParams,
        *,
        progress: Callable[[RowResult], None] | None = None,
    ) -> Iterator[RowResult]:
        if not isinstance(params, SamplingParams):
            raise TypeError("params must be a SamplingParams")
        # bf16 weights still run under autocast, so norms, softmax and RoPE stay fp32. The
        # explicit DiT core stores its cache in bf16, head-major, and multiplies the whole
        # capacity in place (positions past a row's length masked); its results do not depend
        # on that width (>= 64, see batch.py), so no per-layer copy of the history is needed.
        autocast = self.dtype != "fp32"
        dit = self.model.dit
        explicit_core = self.reference_numerics or self.dtype != "fp32"
        act = torch.float32
        cfg = RunConfig(
            steps=params.timesteps,
            guidance=params.guidance_scale,
            sampler=SamplerConfig(
                params.temperature, params.top_k, params.top_p, params.repetition_penalty
            ),
            max_new_tokens=params.max_new_tokens,
            reference_noise=params.noise_mode == "reference",
            reference_stop=params.stop_mode == "reference",
            noise_base=params.seed,
            specials=self.specials,
        )
        gen = (
            torch.Generator(device=self.device).manual_seed(params.global_seed)
            if cfg.reference_noise
            else None
        )

        def emit(res: RowResult) -> RowResult:
            if progress is not None:
                progress(res)
            return res

        waiting: collections.deque[RowState] = collections.deque()
        for seq, req in enumerate(requests):
            prepared = self._prepare(req, seq, params)
            if isinstance(prepared, RowResult):
                yield emit(prepared)
            else:
                waiting.append(prepared)
        if not cfg.reference_noise:
            waiting = collections.deque(sorted(waiting, key=lambda r: r.plan.padded_tokens))

        saved = dit.reference_numerics
        dit.reference_numerics = explicit_core
        try:
            cap = self.max_rows
            while waiting:
                batch = RunningBatch(
                    self.model,
                    cfg,
                    self.device,
                    autocast,
                    act,
                    grouped_dit=not explicit_core,
                    sample_generator=gen,
                    dit_forward=self._dit_forward,
                    trace=self.trace,
                )
                admitted: list[RowState] = []
                try:
                    while waiting or len(batch):
                        if not cfg.reference_stop or not len(batch):
                            new = self._admit(waiting, batch, cap)
                            if new:
                                admitted.extend(new)
                                self._check_oom(len(batch) + len(new))
                                self._encode(new, autocast)
                                batch.add(new)
                        if not len(batch):
                            break
                        self._check_oom(len(batch))
                        for r in batch.step():
                            admitted.remove(r)
                            yield emit(self._result(r))
                        if cfg.reference_stop and not len(batch):
                            break
                except torch.OutOfMemoryError:
                    live = [r for r in admitted if r.result_tokens is None and r.error is None]
                    if len(live) <= 1:
                        for r in live:
                            r.error = (
                                ErrorCode.OUT_OF_MEMORY,
                                "out of memory even with a batch of one row",
                            )
                            yield emit(self._result(r))
                    else:
                        for r in sorted(live, key=lambda r: r.seq, reverse=True):
                            r.reset()
                            waiting.appendleft(r)
                        cap = max(1, len(live) // 2)
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
        finally:
            dit.reference_numerics = saved

    def _check_oom(self, rows: int) -> None:
        if self.fail_batches_over is not None and rows > self.fail_batches_over:
            raise torch.OutOfMemoryError(f"simulated out of memory with {rows} rows")

    def _admit(
        self, waiting: collections.deque[RowState], batch: RunningBatch, cap: int
    ) -> list[RowState]:
        running = batch.rows
        used = sum(self._cost(r) for r in running)
        new: list[RowState] = []
        while waiting and len(running) + len(new) < cap:
            cost = self._cost(waiting[0])
            if (running or new) and used + cost > self.batch_tokens:
                break
            used += cost
            new.append(waiting.popleft())
        return new
