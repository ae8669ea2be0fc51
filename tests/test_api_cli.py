"""`cola-batch serve` as a process: it refuses to start without COLA_BATCH_REDIS_URL, and with
it answers /health openly and everything else only with the configured bearer token.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from services import RedisServer, free_port

# `register` is what the lead wires into cola_batch/cli.py; a callback keeps `serve` a
# subcommand here as it is there.
LAUNCH = (
    "import typer; from cola_batch.api.cli import register; "
    "app = typer.Typer(); app.callback()(lambda: None); register(app); app()"
)


def serve(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCH, "serve", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def get(url: str, token: str | None = None) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_serve_needs_redis_then_serves_with_auth(redis_server: RedisServer, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLA_BATCH_")}
    missing = serve(["--model", str(tmp_path / "m")], env)
    out, _ = missing.communicate(timeout=60)
    assert missing.returncode == 2 and b"COLA_BATCH_REDIS_URL" in out

    port = free_port()
    env |= {"COLA_BATCH_REDIS_URL": redis_server.url_for_db(0), "COLA_BATCH_API_TOKEN": "s3cret"}
    args = [
        "--model",
        str(tmp_path / "my-model"),
        "--port",
        str(port),
        "--output",
        str(tmp_path / "runs"),
    ]
    proc = serve(args, env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, body = get(f"{base}/health")
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, "serve did not start"
                time.sleep(0.2)
        assert (status, body["model"]) == (200, "my-model")
        status, body = get(f"{base}/v1/models")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"  # type: ignore[index]
        status, body = get(f"{base}/v1/models", token="s3cret")
        assert status == 200 and body["data"][0]["id"] == "my-model"  # type: ignore[index]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
