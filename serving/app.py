"""create_app: the FastAPI app over loaded engines, with the page's static files, one JSON error for every
failure (never a traceback) and the native and OpenAI-compatible routers."""
from __future__ import annotations

import sys
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from serving.engine import Engine, GenerationError
from serving.native import STATIC_DIR, native_router
from serving.openai_api import openai_router
from serving.protocol import RequestError, error_response


def create_app(engines: dict[str, Engine], cfg) -> FastAPI:
    """The app serving `engines` (the first is the default model), configured by serve.py's Config; leaving
    its lifespan closes the engines' threads."""
    @asynccontextmanager
    async def lifespan(app):
        yield
        for engine in engines.values():
            engine.close()

    app = FastAPI(title="TL;DR summarizer", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.exception_handler(RequestError)
    async def request_error(request, e: RequestError):
        return error_response(e.status, e.message, e.param)

    @app.exception_handler(GenerationError)
    async def generation_error(request, e: GenerationError):
        return error_response(500, str(e))

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        print(f"error: {request.url.path}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return error_response(500, "internal server error")

    app.include_router(native_router(engines, cfg))
    app.include_router(openai_router(engines, cfg))
    return app
