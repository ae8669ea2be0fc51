"""Generation throughput benchmark: `small` preset, first 32 lambada prompts, greedy.

Each configuration runs in a fresh subprocess (so peak RSS is per configuration) and reports
generated tokens/s (model build excluded), peak RSS, and model-FLOPs utilisation against a bf16
matmul measured in the same process. Model FLOPs are counted from the calls actually made:
2·rows·(weights of every per-row Linear) plus 4·heads·head_dim·q·k per attention layer. The
DiT's timestep MLP and AdaLN linears are not per row: they run once per distinct timestep and
are memoised across calls, so they are left out (counting them per row overstated MFU by ~1.5×).

    .venv/bin/python benchmarks/bench_generate.py [--batches 8 32] [--dtype bf16] [--threads N]

On a shared machine run with `--threads 1` too: a single-threaded process's CPU time is not
inflated by OpenMP threads spinning while a foreign process holds the other core, so its
tokens per CPU-second compare across versions even under load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAMBADA = ROOT.parent / "shared" / "data" / "tasks" / "lambada.jsonl"


def _linear_weights(module, skip: tuple[str, ...] = ()) -> int:
    import torch

    return sum(
        m.weight.numel()
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.Linear) and not any(part in skip for part in name.split("."))
    )


def matmul_peak(seconds: float = 1.0) -> float:
    import torch

    a = torch.randn(1024, 1024, dtype=torch.bfloat16)
    b = torch.randn(1024, 1024, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 1024**3 * n / (time.perf_counter() - t0)


def child(batch: int, dtype: str, n_prompts: int, threads: int | None = None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)

    from cola_batch.model.presets import build_preset
    from cola_batch.pipeline.engine import Engine, RowRequest
    from cola_batch.schemas.sampling import SamplingParams

    model = build_preset("small", dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    rows = [json.loads(x) for x in LAMBADA.read_text().splitlines() if x.strip()][:n_prompts]
    reqs = [RowRequest(str(r.get("id", i)), r["question"]) for i, r in enumerate(rows)]
    dit, vae = model.dit, model.vae
    dcfg, vcfg = dit.config, vae.config
    dit_w = _linear_weights(dit, skip=("ada", "txt_out_ada", "emb_in"))
    dec_w = _linear_weights(vae.decoder)
    flops = [0.0]
    dit_call, dec_call = dit.forward, vae.decode

    def attn(k_lens, q_lens, heads: int, hd: int, layers: int) -> float:
        k = torch.as_tensor(k_lens).reshape(-1).float()
        q = torch.as_tensor(q_lens).reshape(-1).float()
        return float(4 * heads * hd * layers * (q * k).sum())

    def dit_counted(x, k_lens, q_lens, *a, **kw):
        flops[0] += 2 * x.shape[0] * dit_w + attn(
            k_lens, q_lens, dcfg.heads, dcfg.head_dim, dcfg.num_layers
        )
        return dit_call(x, k_lens, q_lens, *a, **kw)

    def dec_counted(z, k_lens, q_lens, *a, **kw):
        flops[0] += 2 * z.shape[0] * dec_w + attn(
            k_lens, q_lens, vcfg.num_heads, vcfg.dim // vcfg.num_heads, vcfg.decoder_num_blocks
        )
        return dec_call(z, k_lens, q_lens, *a, **kw)

    def guided_counted(x, k_lens, q_lens, *a, **kw):
        # Conditional rows read the cache; the unconditional copy attends its own rows only.
        q = torch.as_tensor(q_lens).reshape(-1)
        q = q[q > 0]
        flops[0] += 4 * x.shape[0] * dit_w + attn(
            k_lens, q_lens, dcfg.heads, dcfg.head_dim, dcfg.num_layers
        ) + attn(q, q, dcfg.heads, dcfg.head_dim, dcfg.num_layers)
        return guided_call(x, k_lens, q_lens, *a, **kw)

    guided_call = getattr(dit, "forward_guided", None)
    dit.forward = dit_counted
    if guided_call is not None:
        dit.forward_guided = guided_counted
    vae.decode = dec_counted
    engine = Engine(model, dtype=dtype, batch_tokens=1 << 30, max_rows=batch)
    params = SamplingParams(max_new_tokens=32, timesteps=16, guidance_scale=7.0, temperature=0.0)
    t0, c0 = time.perf_counter(), time.process_time()
    results = list(engine.generate(reqs, params))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = sum(r.completion_tokens for r in results)
    peak = matmul_peak()
    return {
        "batch": batch,
        "dtype": dtype,
        "rows": len(results),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "cpu_seconds": cpu,
        # Throughput if this process had had every core to itself (robust to other load).
        "tokens_per_cpu_s_x_threads": tokens / cpu * torch.get_num_threads(),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "model_gflops": flops[0] / 1e9,
        "bf16_matmul_gflops": peak / 1e9,
        "mfu": flops[0] / seconds / peak,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--child", type=int, default=None)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.dtype, args.prompts, args.threads)))
        return
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    print(f"load average before: {' '.join(load)}")
    print(
        f"{'batch':>5} {'tokens':>6} {'sec':>7} {'tok/s':>7} {'cpu-s':>7} {'tok/cpu-s*T':>11} "
        f"{'RSS GiB':>8} {'GFLOP':>7} {'mm GF/s':>8} {'MFU':>6} {'T':>2} {'load':>5}"
    )
    for b in args.batches:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(b),
                "--dtype",
                args.dtype,
                "--prompts",
                str(args.prompts),
                *(["--threads", str(args.threads)] if args.threads else []),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{r['batch']:>5} {r['tokens']:>6} {r['seconds']:>7.1f} {r['tokens_per_s']:>7.1f} "
            f"{r['cpu_seconds']:>7.1f} {r['tokens_per_cpu_s_x_threads']:>11.1f} "
            f"{r['peak_rss_gib']:>8.2f} {r['model_gflops']:>7.0f} "
            f"{r['bf16_matmul_gflops']:>8.0f} {r['mfu']:>6.1%} {r['threads']:>2} "
            f"{os.getloadavg()[0]:>5.1f}"
        )
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    print(f"load average after: {' '.join(load)}")


if __name__ == "__main__":
    main()
