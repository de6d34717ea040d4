"""create_app: the FastAPI app over loaded engines, with the page's static files, one JSON error for every
failure (never a traceback) and the native and OpenAI-compatible routers, behind a guard that serves only the
allowed Host names."""
from __future__ import annotations

import ipaddress
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers

from serving.engine import Engine, GenerationError, log
from serving.native import STATIC_DIR, native_router
from serving.openai_api import openai_router
from serving.protocol import RequestError, error_response

LOOPBACK_NAMES = ["localhost", "127.0.0.1", "[::1]"]


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(cfg) -> list[str]:
    """The Host names served: --allowed-hosts when given; else, bound to a loopback address, only loopback
    names - a page of another site can point a name of its own at 127.0.0.1 (DNS rebinding) and so reach a
    local server from the user's browser, but its requests carry that name; bound elsewhere, any name."""
    if cfg.allowed_hosts:
        return [h.lower() for h in cfg.allowed_hosts]
    return LOOPBACK_NAMES if is_loopback(cfg.host) else ["*"]


def host_name(header: str | None) -> str | None:
    """The name of a Host header without its port ("[::1]:8000" → "[::1]"), lower-cased; None when malformed."""
    if not header:
        return None
    if header.startswith("["):
        end = header.find("]")
        rest = header[end + 1:]
        return header[:end + 1].lower() if end > 0 and (not rest or (rest[0] == ":" and rest[1:].isdigit())) else None
    name, _, port = header.partition(":")
    return name.lower() if name and ":" not in port and (not port or port.isdigit()) else None


def host_allowed(host: str, allowed: list[str]) -> bool:
    return any(p == "*" or host == p or (p.startswith("*.") and host.endswith(p[1:])) for p in allowed)


class Guard:
    """The outermost layer of the app (pure ASGI): a request for a Host name that is not allowed gets a 400,
    and an exception no handler took becomes a JSON 500 and one line in the log. Starlette's own last handler
    re-raises such an exception after answering, so the server logs a traceback and drops the connection
    (keep-alive with it); here it ends with the answer."""

    def __init__(self, app, allowed: list[str]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.allowed != ["*"]:
            host = host_name(Headers(scope=scope).get("host"))
            if host is None or not host_allowed(host, self.allowed):
                shown = "none" if host is None else repr(host[:100])
                return await error_response(400, f"this server does not serve the host name {shown} (allowed: "
                                                 f"{', '.join(self.allowed)}; serve.py --allowed-hosts)")(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as e:
            log(f"error: {scope.get('method')} {scope.get('path')}: {type(e).__name__}: {e}")
            if not started:
                await error_response(500, "internal server error")(scope, receive, send)


def create_app(engines: dict[str, Engine], cfg, example_posts=None) -> FastAPI:
    """The app serving `engines` (the first is the default model), configured by serve.py's Config, with the
    page's example posts (None: loaded from cfg.examples); leaving its lifespan closes the engines' threads."""
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

    app.include_router(native_router(engines, cfg, example_posts))
    app.include_router(openai_router(engines, cfg))
    app.add_middleware(Guard, allowed=allowed_hosts(cfg))
    return app
