"""Run the chaos scenarios (tests/chaos) and write the reliability table in docs/reliability.md.

Usage:
    .venv/bin/python benchmarks/chaos_report.py            # full profile (>= 20 kill trials)
    .venv/bin/python benchmarks/chaos_report.py --quick    # the CI profile
    .venv/bin/python benchmarks/chaos_report.py --only kill9,sigterm --no-write

Contract: every scenario runs against its own private Redis (and one SeaweedFS S3 server for
the storage scenarios) with real worker processes; the table has one row per scenario:
trials, faults injected, rows lost, rows duplicated, time to recover, and notes. The table
replaces the block between the `chaos-table` markers of docs/reliability.md. Exit status 1 if
any scenario lost or duplicated a row or reported a problem.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "chaos")]

from harness import Lab, PasswordRedis, ScenarioResult, tiny_model_dir  # noqa: E402
from scenarios_infra import (  # noqa: E402
    redis_restart_aof,
    redis_restart_lost,
    storage_faults,
    storage_permanent,
)
from scenarios_poison import oom_split, poison_rows, poison_shard  # noqa: E402
from scenarios_security import hostile_messages, secrets_stay_secret  # noqa: E402
from scenarios_workers import kill9_mid_shard, sigterm_mid_shard  # noqa: E402
from services import S3Server  # noqa: E402

PROFILES = {"quick": {"kill": 3, "aof": 1, "s3": 1}, "full": {"kill": 20, "aof": 3, "s3": 3}}
DOC = ROOT / "docs" / "reliability.md"
TITLES = {
    "kill9": "kill -9 worker mid-shard",
    "sigterm": "SIGTERM worker mid-shard",
    "s3_permanent": "S3 permanent failure of one shard, then retry",
}
START, END = "<!-- chaos-table:start -->", "<!-- chaos-table:end -->"
# Notes that describe what happened rather than a problem.
INFO_PREFIXES = ("grace ", "status exit", "after ", "dead-lettered after", "batches over")
INFO_WORDS = ("worker requests, faults", "landed mid-shard", "finished within 1 s")


def problems(result: ScenarioResult) -> list[str]:
    return [
        n
        for n in result.notes
        if not n.startswith(INFO_PREFIXES) and not any(w in n for w in INFO_WORDS)
    ]


def scenarios(profile: dict[str, int], s3: Callable[[], S3Server]) -> dict[str, Callable]:
    def with_lab(fn: Callable[[Lab], ScenarioResult], **lab_kwargs: object) -> Callable:
        def run(root: Path) -> ScenarioResult:
            with Lab(root, tiny_model_dir(), **lab_kwargs) as lab:  # type: ignore[arg-type]
                return fn(lab)

        return run

    def password(root: Path) -> ScenarioResult:
        (root / "redis").mkdir(parents=True)
        server = PasswordRedis("report-Secret-Pw-77", workdir=root / "redis").start()
        with Lab(root / "lab", tiny_model_dir(), redis_server=server) as lab:
            return secrets_stay_secret(lab, server.password)

    return {
        "kill9": with_lab(lambda lab: kill9_mid_shard(lab, profile["kill"], whole_every=4)),
        "sigterm": with_lab(sigterm_mid_shard),
        "redis_aof": with_lab(lambda lab: redis_restart_aof(lab, profile["aof"]), aof=True),
        "redis_lost": with_lab(redis_restart_lost),
        "s3_faults": with_lab(lambda lab: storage_faults(lab, s3(), profile["s3"])),
        "s3_permanent": with_lab(lambda lab: storage_permanent(lab, s3())),
        "poison_rows": with_lab(poison_rows),
        "poison_shard": with_lab(poison_shard),
        "oom": with_lab(oom_split),
        "hostile_messages": with_lab(hostile_messages),
        "password": password,
    }


def table(results: list[ScenarioResult], profile: str, seconds: float) -> str:
    lines = [
        f"Profile `{profile}`, run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.node()} "
        f"({platform.machine()}, CPU only, tiny random checkpoint), {seconds / 60:.1f} min.",
        "",
        "| scenario | trials | faults injected | rows lost | rows duplicated "
        "| time to recover | notes |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in results:
        notes = "; ".join(r.notes).replace("|", "/") or "-"
        lines.append(
            f"| {r.scenario} | {r.trials} | {r.faults} | {r.lost} | {r.duplicated} "
            f"| {r.recover_text} | {notes} |"
        )
    return "\n".join(lines)


def write_doc(block: str, *, merge: bool = False) -> None:
    """Replace the table; with `merge`, replace only the rows of the scenarios just run."""
    text = DOC.read_text() if DOC.exists() else f"# Reliability\n\n{START}\n{END}\n"
    head, _, rest = text.partition(START)
    old, _, tail = rest.partition(END)
    if merge and "| --- |" in old:

        def split(lines: list[str]) -> tuple[list[str], list[str], list[str]]:
            at = next(k for k, line in enumerate(lines) if line.startswith("| scenario"))
            return (
                lines[:at],
                lines[at : at + 2],
                [ln for ln in lines[at + 2 :] if ln.startswith("|")],
            )

        old_intro, _, old_rows = split(old.strip().splitlines())
        new_intro, header, new_rows = split(block.splitlines())
        fresh = {line.split("|")[1].strip(): line for line in new_rows}
        rows = [fresh.pop(line.split("|")[1].strip(), line) for line in old_rows]
        rows.extend(fresh.values())
        rerun = f"Rows rerun since: {new_intro[0]}"
        intro = [line for line in old_intro if line.strip() and not line.startswith("Rows rerun")]
        block = "\n".join([*intro, rerun, "", *header, *rows])
    DOC.write_text(f"{head}{START}\n{block}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the CI profile (fewer trials)")
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--no-write", action="store_true", help="print, do not edit the doc")
    args = parser.parse_args(argv)
    profile = "quick" if args.quick else "full"
    servers: list[S3Server] = []

    def s3() -> S3Server:
        if not servers:
            servers.append(S3Server().start())
        return servers[0]

    chosen = scenarios(PROFILES[profile], s3)
    names = [n for n in args.only.split(",") if n] or list(chosen)
    results: list[ScenarioResult] = []
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="cola-chaos-report-") as tmp:
            for name in names:
                t0 = time.monotonic()
                print(f"== {name} ...", flush=True)
                try:
                    result = chosen[name](Path(tmp) / name)
                except Exception as exc:  # noqa: BLE001 - a crashed scenario is a table row too
                    traceback.print_exc()
                    result = ScenarioResult(name, notes=[f"scenario crashed: {exc!r}"[:300]])
                    result.scenario = TITLES.get(name, name)
                print(f"   {result} ({time.monotonic() - t0:.0f} s)", flush=True)
                results.append(result)
    finally:
        for server in servers:
            server.close()
    block = table(results, profile, time.monotonic() - started)
    print(block)
    if not args.no_write:
        write_doc(block, merge=bool(args.only))
    bad = [r for r in results if r.lost or r.duplicated or problems(r)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
