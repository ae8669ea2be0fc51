"""What every API handler shares: settings, job control, the served model, storage bases.

Contract: one `ApiContext` per app, built by `create_app` and stored on `app.state.ctx`;
handlers get it with the `ctx` dependency. It holds no model weights: the model path is only
passed on to jobs, and `model_name` is the id clients use for it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import redis
from fastapi import Request

from cola_batch import keys, storage
from cola_batch.api.streaming import BlockSplitter
from cola_batch.chat import parse_template_map, template_for_model
from cola_batch.jobs import Control
from cola_batch.settings import Settings


@dataclass
class ApiContext:
    settings: Settings
    control: Control
    model: str  # model directory or URI, as workers load it
    model_name: str  # the id clients send and see
    output: str  # base URI of batch jobs
    api_base: str  # base URI of files and interactive jobs
    templates: dict[str, str] = field(default_factory=dict)
    splitter: BlockSplitter | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def build(
        cls,
        model: str,
        *,
        settings: Settings,
        control: Control,
        output: str | None = None,
        model_name: str | None = None,
    ) -> ApiContext:
        model_uri = storage.normalize_uri(model)
        out = storage.normalize_uri(output or settings.default_output)
        name = model_name or settings.api_model_name or PurePosixPath(model_uri.rstrip("/")).name
        api_base = storage.normalize_uri(settings.api_storage or keys.join(out, "_api"))
        return cls(
            settings=settings,
            control=control,
            model=model_uri,
            model_name=name,
            output=out,
            api_base=api_base,
            templates=parse_template_map(settings.chat_templates),
            splitter=BlockSplitter(model_uri),
        )

    @property
    def redis(self) -> redis.Redis[Any]:
        return self.control.store.r

    @property
    def chat_template(self) -> str:
        return template_for_model(self.model_name, self.templates)


def ctx(request: Request) -> ApiContext:
    """FastAPI dependency: the app's `ApiContext`."""
    context: ApiContext = request.app.state.ctx
    return context
