"""`cola-batch model ...`: create, inspect and verify checkpoints.

Contract:
* `init DIR --preset tiny|small|cola-2b [--seed N] [--dtype fp32|bf16|fp16] [--dry-run]` writes a
  random reference-initialised model root (cola_vae/, cola_dit/, tokenizer.json); `--dry-run`
  only prints parameter counts computed on the meta device.
* `inspect DIR [--json]` summarises a model root or a single model folder from config.json and
  the safetensors headers (no tensor is read), with sha256 of every weight file.
* `verify GOLDEN_DIR [--json] [--group NAME]` replays a golden set; exit code 0 only if every
  check passes (and at least one ran).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Create, inspect and verify Cola DLM checkpoints.",
)
console = Console()

_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@app.command()
def init(
    directory: Path = typer.Argument(..., help="Model root to create."),
    preset: str = typer.Option("tiny", help="tiny | small | cola-2b"),
    seed: int = typer.Option(0, help="Seed of the torch.Generator used for the init."),
    dtype: str = typer.Option("fp32", help="fp32 | bf16 | fp16"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only print parameter counts."),
) -> None:
    """Write a randomly initialised checkpoint of a preset shape."""
    from cola_batch.model.presets import PRESETS, count_parameters, meta_models

    if preset not in PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; choose {', '.join(PRESETS)}")
    if dtype not in _DTYPE_BYTES:
        raise typer.BadParameter(f"unknown dtype {dtype!r}; choose fp32, bf16 or fp16")
    if dry_run:
        vae, dit = meta_models(preset)
        counts = {"vae": count_parameters(vae), "dit": count_parameters(dit)}
        table = Table(title=f"preset {preset} ({dtype}, dry run)")
        for col in ("model", "tensors", "parameters", "bytes"):
            table.add_column(col, justify="right" if col != "model" else "left")
        for name, model in (("vae", vae), ("dit", dit)):
            table.add_row(
                name,
                str(len(model.state_dict())),
                f"{counts[name]:,}",
                f"{counts[name] * _DTYPE_BYTES[dtype]:,}",
            )
        total = counts["vae"] + counts["dit"]
        table.add_row("total", "", f"{total:,}", f"{total * _DTYPE_BYTES[dtype]:,}")
        console.print(table)
        return
    from cola_batch.model.checkpoint import save_model
    from cola_batch.model.presets import build_preset

    model = build_preset(preset, seed=seed, dtype=dtype)
    save_model(model, directory)
    console.print(f"wrote preset {preset} (seed {seed}, {dtype}) to {directory}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _describe_folder(folder: Path) -> dict[str, Any]:
    from safetensors import safe_open

    from cola_batch.model.checkpoint import INDEX, WEIGHTS, CheckpointError, weight_files

    config = json.loads((folder / "config.json").read_text())
    files = sorted(set(weight_files(folder).values())) or [folder / WEIGHTS]
    params = 0
    tensors = 0
    dtypes: dict[str, int] = {}
    hashes = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    sl = handle.get_slice(key)
                    n = 1
                    for dim in sl.get_shape():
                        n *= dim
                    params += n
                    tensors += 1
                    dtypes[sl.get_dtype()] = dtypes.get(sl.get_dtype(), 0) + n
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from exc
        hashes[str(path.relative_to(folder))] = _sha256(path)
    if (folder / INDEX).exists():
        hashes[INDEX] = _sha256(folder / INDEX)
    return {
        "folder": str(folder),
        "model_type": config.get("model_type"),
        "config": config,
        "tensors": tensors,
        "parameters": params,
        "dtypes": dtypes,
        "sha256": hashes,
    }


@app.command()
def inspect(
    directory: Path = typer.Argument(..., help="Model root or a single cola_vae/cola_dit folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Summarise a checkpoint: config, parameter counts, dtypes, file hashes."""
    from cola_batch.model.checkpoint import DIT_DIR, TOKENIZER, VAE_DIR, CheckpointError

    folders = [directory / VAE_DIR, directory / DIT_DIR]
    folders = [f for f in folders if f.is_dir()] or [directory]
    try:
        info = [_describe_folder(f) for f in folders]
    except (OSError, json.JSONDecodeError, CheckpointError) as exc:
        console.print(f"[red]cannot inspect {directory}: {exc}")
        raise typer.Exit(1) from exc
    tok = directory / TOKENIZER
    tokenizer = None
    if tok.exists():
        from tokenizers import Tokenizer

        tokenizer = {
            "path": str(tok),
            "vocab_size": Tokenizer.from_file(str(tok)).get_vocab_size(),
            "sha256": _sha256(tok),
        }
    if as_json:
        typer.echo(json.dumps({"models": info, "tokenizer": tokenizer}, indent=2))
        return
    for item in info:
        table = Table(title=f"{item['model_type']}  ({item['folder']})")
        table.add_column("field")
        table.add_column("value")
        for key, value in item["config"].items():
            table.add_row(key, json.dumps(value))
        table.add_row("[bold]tensors", str(item["tensors"]))
        table.add_row("[bold]parameters", f"{item['parameters']:,}")
        table.add_row("[bold]dtypes", ", ".join(f"{k}: {v:,}" for k, v in item["dtypes"].items()))
        for name, digest in item["sha256"].items():
            table.add_row(f"[bold]sha256 {name}", digest)
        console.print(table)
    if tokenizer:
        console.print(f"tokenizer: vocab {tokenizer['vocab_size']}, sha256 {tokenizer['sha256']}")


@app.command()
def verify(
    golden_dir: Path = typer.Argument(..., help="Golden set directory (tiny-a layout)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    group: list[str] = typer.Option(None, "--group", help="Only these check groups."),
) -> None:
    """Replay a golden set and compare every recorded output."""
    from cola_batch.model.verify import run_checks

    results = run_checks(golden_dir, group or None)
    ok = bool(results) and all(r.passed for r in results)
    if as_json:
        typer.echo(json.dumps({"passed": ok, "checks": [r.to_dict() for r in results]}, indent=2))
    else:
        table = Table(title=f"verify {golden_dir}")
        for col in ("check", "max abs diff", "tolerance", "result"):
            table.add_column(col)
        for r in results:
            table.add_row(
                r.name,
                f"{r.max_abs_diff:.3e}",
                f"{r.tolerance:.0e}",
                "[green]pass" if r.passed else f"[red]FAIL[/red] {r.detail}",
            )
        console.print(table)
        for r in results:
            if not r.passed:
                typer.echo(
                    f"FAIL {r.name}: max abs diff {r.max_abs_diff:.3e} > "
                    f"{r.tolerance:.0e} {r.detail}"
                )
        console.print("[green]all checks passed" if ok else "[red]verification failed")
    raise typer.Exit(0 if ok else 1)
