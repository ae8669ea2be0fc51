"""The FastAPI application: routers, auth, size limits, error shapes, models and health.

Contract: `create_app(model, ...)` builds the app around one `Control` (Redis named by
`Settings.redis_url`; `RuntimeError` when unset). Every route except `GET /health` requires
the bearer token when `Settings.api_token` is set. `GET /health` answers 200
`{"status": "ok", "model", "redis": true}` when Redis answers, else 503 with `status`
`"unavailable"`. `GET /v1/models` lists the one served model.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import JSONResponse

from cola_batch import __version__
from cola_batch.api import batches, completions, files
from cola_batch.api.context import ApiContext, ctx
from cola_batch.api.errors import install_error_handlers, not_found
from cola_batch.api.security import BodyLimit, require_token
from cola_batch.jobs import Control
from cola_batch.settings import Settings, get_settings

models_router = APIRouter()


def _model(context: ApiContext) -> dict[str, Any]:
    return {
        "id": context.model_name,
        "object": "model",
        "created": context.created,
        "owned_by": "cola-batch",
    }


@models_router.get("/v1/models")
def list_models(context: ApiContext = Depends(ctx)) -> dict[str, Any]:
    return {"object": "list", "data": [_model(context)]}


@models_router.get("/v1/models/{model_id:path}")
def retrieve_model(model_id: str, context: ApiContext = Depends(ctx)) -> dict[str, Any]:
    if model_id != context.model_name:
        raise not_found("model", model_id)
    return _model(context)


def create_app(
    model: str,
    *,
    settings: Settings | None = None,
    output: str | None = None,
    model_name: str | None = None,
    control: Control | None = None,
) -> FastAPI:
    """The API app serving `model` (a model root workers can load) under `model_name`."""
    settings = settings or get_settings()
    control = control or Control.connect(settings)
    context = ApiContext.build(
        model, settings=settings, control=control, output=output, model_name=model_name
    )
    app = FastAPI(
        title="cola-batch",
        version=__version__,
        description="OpenAI-compatible Files, Batches, Chat and Completions over cola-batch.",
    )
    app.state.ctx = context
    install_error_handlers(app)
    guarded = [Depends(require_token)]
    for router in (files.router, batches.router, completions.router, models_router):
        app.include_router(router, dependencies=guarded)

    @app.get("/health")
    def health() -> JSONResponse:
        try:
            ok = bool(context.redis.ping())
        except Exception:  # noqa: BLE001 - any Redis failure means not ready
            ok = False
        body = {"status": "ok" if ok else "unavailable", "model": context.model_name, "redis": ok}
        return JSONResponse(body, status_code=200 if ok else 503)

    def limit_for(path: str) -> int:
        if path.rstrip("/") == "/v1/files":
            return settings.max_upload_bytes
        return settings.max_request_bytes

    app.add_middleware(BodyLimit, limit_for=limit_for)
    return app
