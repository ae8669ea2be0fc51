"""Fixtures of the chaos suite: the profile (quick for CI, full for the report), a per-test
`Lab` with its own Redis, and one SeaweedFS S3 server for the session.

`pytest tests/chaos` runs the quick profile; `--chaos-profile full` (or COLA_CHAOS_PROFILE=full)
runs the trial counts of the reliability report. Tests that only make sense in the full
profile are marked `chaos_full` and skipped in the quick one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Lab, tiny_model_dir
from services import S3Server

PROFILES = {
    "quick": {"kill_trials": 3, "aof_trials": 1, "s3_trials": 1},
    "full": {"kill_trials": 20, "aof_trials": 3, "s3_trials": 3},
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--chaos-profile",
        choices=sorted(PROFILES),
        default=os.environ.get("COLA_CHAOS_PROFILE", "quick"),
        help="chaos suite trial counts: quick (CI) or full (the reliability report)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos_full: runs only with --chaos-profile full")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--chaos-profile") == "full":
        return
    skip = pytest.mark.skip(reason="full chaos profile only (--chaos-profile full)")
    for item in items:
        if "chaos_full" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def profile(request: pytest.FixtureRequest) -> dict[str, int]:
    return PROFILES[request.config.getoption("--chaos-profile")]


@pytest.fixture(scope="session")
def chaos_model() -> Path:
    return tiny_model_dir()


@pytest.fixture
def lab(tmp_path: Path, chaos_model: Path) -> Iterator[Lab]:
    with Lab(tmp_path / "lab", chaos_model) as the_lab:
        yield the_lab


@pytest.fixture
def aof_lab(tmp_path: Path, chaos_model: Path) -> Iterator[Lab]:
    with Lab(tmp_path / "lab", chaos_model, aof=True) as the_lab:
        yield the_lab


@pytest.fixture(scope="session")
def chaos_s3() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server
