"""create_app: the FastAPI app over the models (loaded, or loading in the background), with the page's static
files, one JSON error for every failure (never a traceback), the native and OpenAI-compatible routers and
/metrics, behind a guard that serves only the allowed Host names and an access log that gives every request an
id and one line."""
from __future__ import annotations

import ipaddress
import re
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException

from serving.engine import Engine, GenerationError, log
from serving.metrics import Metrics
from serving.native import STATIC_DIR, native_router
from serving.openai_api import is_openai_route, openai_router
from serving.protocol import Models, RequestError, error_response

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


REQUEST_ID = re.compile(r"[\w.:-]{1,64}")  # a client's X-Request-Id that is kept (else the server makes one)


class Guard:
    """The outermost layer of the app (pure ASGI).
    - A request for a Host name that is not allowed gets a 400.
    - Every request gets an id (the client's X-Request-Id when it is a short plain token, else a new one), sent back
      as X-Request-Id and used in the OpenAI responses' `id`; when its response has ended, one line in the log - id,
      method, path, status, tokens generated, seconds; never a body - and its count and latency in /metrics.
    - An exception no handler took becomes a JSON 500 and one line in the log. Starlette's own last handler
      re-raises such an exception after answering, so the server logs a traceback and drops the connection
      (keep-alive with it); here it ends with the answer."""

    def __init__(self, app, allowed: list[str], metrics: Metrics):
        self.app, self.allowed, self.metrics = app, allowed, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        given = headers.get("x-request-id", "")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:24]
        state = scope.setdefault("state", {})
        state.update(request_id=request_id, tokens=0)
        status, start = None, time.perf_counter()

        async def tagged(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append("x-request-id", request_id)
            await send(message)

        try:
            host = host_name(headers.get("host"))
            if self.allowed != ["*"] and (host is None or not host_allowed(host, self.allowed)):
                shown = "none" if host is None else repr(host[:100])
                return await error_response(400, f"this server does not serve the host name {shown} (allowed: "
                                                 f"{', '.join(self.allowed)}; serve.py --allowed-hosts)")(scope, receive, tagged)
            await self.app(scope, receive, tagged)
        except Exception as e:
            log(f"error: {scope.get('method')} {scope.get('path')}: {type(e).__name__}: {e}")
            if status is None:
                await error_response(500, "internal server error")(scope, receive, tagged)
        finally:
            seconds = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.request_done(route, scope["method"], status or 500, seconds)
            log(f"access: {request_id} {scope['method']} {scope['path'][:200]} {status or 500} "
                f"tokens={state.get('tokens', 0)} {seconds:.3f}s")


def create_app(models: Models | dict[str, Engine], cfg, example_posts=None) -> FastAPI:
    """The app serving `models` (a dict of loaded engines, the first the default model, or a Models that a
    loader fills while the app already answers 503), configured by serve.py's Config, with the page's example
    posts (None: loaded from cfg.examples); leaving its lifespan closes the engines' threads."""
    if not isinstance(models, Models):
        models = Models(models)

    @asynccontextmanager
    async def lifespan(app):
        yield
        models.close()

    app = FastAPI(title="TL;DR summarizer", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.state.metrics = metrics = Metrics(models)

    @app.exception_handler(RequestError)
    async def request_error(request, e: RequestError):
        # OpenAI's clients expect a 400 for a request they must fix; the native API keeps its 422s
        status = 400 if e.status == 422 and is_openai_route(request.url.path) else e.status
        return error_response(status, e.message, e.param, e.code)

    @app.exception_handler(GenerationError)
    async def generation_error(request, e: GenerationError):
        return error_response(500, str(e))

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # FastAPI's own 404 and 405, in the same shape
        return error_response(e.status_code, f"{request.method} {request.url.path[:100]}: {e.detail}",
                              headers=getattr(e, "headers", None))

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    app.include_router(native_router(models, cfg, example_posts))
    app.include_router(openai_router(models, cfg))
    app.add_middleware(Guard, allowed=allowed_hosts(cfg), metrics=metrics)
    return app
