"""One live `cola-batch serve` for a test module: a uvicorn server in a thread, a real Celery
worker and a tiny random checkpoint, against a private redis-server and local storage.

Modules start it once (`running_service` in a module-scoped fixture) and talk to it through the
official `openai` client, as an OpenAI user would.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import uvicorn
from services import RedisServer, free_port
from workers import WorkerGroup, make_tiny_model

from cola_batch.api import create_app
from cola_batch.settings import Settings

TOKEN = "test-token-7f3a"
MAX_REQUEST_BYTES = 64 * 1024
BLOCK_TOKENS = 4  # the tiny preset: DiT block_size 4 × VAE patch_size 1
FAST = {"timesteps": 2}  # cola-batch's sampling extension: keeps the tiny model quick


@dataclass
class Service:
    base_url: str
    model: Path
    client: openai.OpenAI
    workers: WorkerGroup


@contextlib.contextmanager
def running_service(root: Path) -> Iterator[Service]:
    """A tiny model, a private redis-server, one real worker and a live uvicorn server."""
    model = make_tiny_model(root / "tiny")
    redis = RedisServer().start()
    url = redis.url_for_db(0)
    settings = Settings(
        redis_url=url,
        default_output=str(root / "runs"),
        api_token=TOKEN,
        max_request_bytes=MAX_REQUEST_BYTES,
        api_request_timeout_s=60,
        storage_retries=2,
        storage_backoff_initial_s=0.01,
    )
    workers = WorkerGroup(model, url, root).start()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(str(model), settings=settings),
            host="127.0.0.1",
            port=free_port(),
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    base_url = f"http://127.0.0.1:{server.config.port}/v1"
    client = openai.OpenAI(api_key=TOKEN, base_url=base_url, max_retries=0, timeout=60)
    try:
        yield Service(base_url, model, client, workers)
    finally:
        server.should_exit = True
        thread.join(15)
        workers.stop()
        redis.close()


def chat_line(custom_id: str, content: str, max_tokens: int = 8, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "tiny",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            **body,
        },
    }


def upload(client: openai.OpenAI, lines: list[Any], name: str = "requests.jsonl") -> str:
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    return client.files.create(file=(name, text.encode("utf-8")), purpose="batch").id
