"""Command-line options shared by `submit`, `run` and `generate`, and the error-to-exit mapping.

Contract: sampling flags are declared once here as `Annotated` types; `sampling_from_flags`
turns them into a validated `SamplingParams`, and `fail` prints a specific message on stderr and
exits non-zero. Every command reports bad input through `user_errors`, never a traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated, NoReturn

import typer
from pydantic import ValidationError

from cola_batch.schemas.sampling import SamplingParams

MaxNewTokens = Annotated[int, typer.Option("--max-new-tokens", help="Tokens per sample.")]
Temperature = Annotated[float, typer.Option("--temperature", help="0 = greedy.")]
TopK = Annotated[int, typer.Option("--top-k", help="0 disables top-k.")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus mass in (0, 1].")]
RepetitionPenalty = Annotated[float, typer.Option("--repetition-penalty")]
GuidanceScale = Annotated[float, typer.Option("--guidance-scale", help="CFG scale.")]
Timesteps = Annotated[int, typer.Option("--timesteps", help="Euler steps per block.")]
SamplesPerPrompt = Annotated[int, typer.Option("--samples-per-prompt")]
Seed = Annotated[int, typer.Option("--seed", help="Job seed; per-row seeds derive from it.")]
MaxTokensColumn = Annotated[
    str | None,
    typer.Option("--max-tokens-column", help="Per-row max new tokens (null = the flag's)."),
]
TemperatureColumn = Annotated[
    str | None,
    typer.Option("--temperature-column", help="Per-row temperature (null = the flag's)."),
]

_DEFAULTS = SamplingParams()


def sampling_from_flags(
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    guidance_scale: float,
    timesteps: int,
    samples_per_prompt: int,
    seed: int,
) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        guidance_scale=guidance_scale,
        timesteps=timesteps,
        samples_per_prompt=samples_per_prompt,
        seed=seed,
    )


def fail(message: str, code: int = 2) -> NoReturn:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def describe_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "value"
        parts.append(f"--{field.replace('_', '-')}: {err['msg']}")
    return "; ".join(parts)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can fix into one clear line and exit status 2."""
    from cola_batch.jobs import JobNotFound
    from cola_batch.producer.errors import InputError

    try:
        yield
    except ValidationError as exc:
        fail(describe_validation(exc))
    except InputError as exc:
        fail(str(exc))
    except JobNotFound as exc:
        fail(str(exc.args[0] if exc.args else exc))
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
