"""The HTTP side both APIs share: the JSON error (RequestError, error_response), request bodies read and parsed,
fields checked with one clear message per problem, and Server-Sent Events."""
from __future__ import annotations

import asyncio
import json
import math
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse

from serving.engine import Engine, GenerationError, Sampling

MAX_COMPLETIONS = 16  # most summaries one /v1/completions request may ask for (prompts x n)


class RequestError(Exception):
    """A request this server refuses: its status (400, 404, 413, 422; 500 for a failure of ours), one clear
    message, and the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    """The JSON error every endpoint answers with: {"error": {"message", "type", "param"}}."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param}}, status_code=status)


async def read_body(request: Request, max_post_chars: int) -> dict:
    """The request's JSON object; a body far over what a post of max_post_chars can need (4 bytes a
    character in UTF-8, 4 x for JSON escapes, plus room for the other fields) is refused unread."""
    limit = 16 * max_post_chars + 65_536
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the request body is {int(declared)} bytes, over this server's limit of {limit}")
    raw = await request.body()
    if len(raw) > limit:
        raise RequestError(413, f"the request body is {len(raw)} bytes, over this server's limit of {limit}")
    return parse_body(raw)


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RequestError(400, f"the request body is not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise RequestError(400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return body


_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def take(body: dict, name: str, kind: type, default: Any, optional: bool = False) -> Any:
    """body[name] checked to be of `kind` (an int passes as a float; a bool never passes as a number)."""
    value = body.get(name, default)
    if value is None and (optional or default is None):
        return None
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if kind is float and ok and not math.isfinite(value):  # json.loads reads NaN and Infinity
        ok = False
    if not ok:
        raise RequestError(422, f"{name} must be {_KINDS[kind]}, got {json.dumps(value)[:40]}", name)
    return value


def take_sampling(body: dict, engine: Engine, temperature_default: float, max_tokens_field: str) -> Sampling:
    temperature = take(body, "temperature", float, temperature_default)
    top_k = take(body, "top_k", int, 0)
    top_p = take(body, "top_p", float, 1.0)
    max_new = take(body, max_tokens_field, int, engine.budget, optional=True)
    max_new = engine.budget if max_new is None else max_new
    seed = take(body, "seed", int, None, optional=True)
    if seed is not None and not 0 <= seed < 2 ** 63 - MAX_COMPLETIONS:
        raise RequestError(422, f"seed must be in [0, 2^63 - {MAX_COMPLETIONS}), got {seed}", "seed")
    if temperature < 0:
        raise RequestError(422, f"temperature must be >= 0, got {temperature}", "temperature")
    if top_k < 0:
        raise RequestError(422, f"top_k must be >= 0 (0: off), got {top_k}", "top_k")
    if not 0 < top_p <= 1:
        raise RequestError(422, f"top_p must be in (0, 1], got {top_p}", "top_p")
    if not 1 <= max_new <= engine.budget:
        raise RequestError(422, f"{max_tokens_field} must be in [1, {engine.budget}] for model {engine.name}, "
                                f"got {max_new}", max_tokens_field)
    return Sampling(temperature, top_k, top_p, max_new, seed)


def take_post(text: Any, max_chars: int, name: str = "post") -> str:
    if not isinstance(text, str):
        raise RequestError(422, f"{name} must be a string", name)
    text = text.replace("\r\n", "\n").strip()
    if not text:
        raise RequestError(422, f"{name} is empty: give the text of the post to summarize", name)
    if len(text) > max_chars:
        raise RequestError(413, f"{name} is {len(text)} characters, over this server's limit of {max_chars}", name)
    return text


def pick_engine(engines: dict[str, Engine], name: Any) -> Engine:
    if name is None:
        return next(iter(engines.values()))
    if not isinstance(name, str) or name not in engines:
        raise RequestError(404, f"unknown model {json.dumps(name)[:60]}; this server has: {', '.join(engines)}", "model")
    return engines[name]


# -----------------------------------------------------------------------------
# streaming: Server-Sent Events

def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def stream_events(producer: Callable[[Callable[[dict], None]], Any]) -> AsyncIterator[str]:
    """Run producer(send) as a task and yield what it sends as Server-Sent Events. When the client goes
    away the response is cancelled, which cancels the task and so stops its generation."""
    out: asyncio.Queue = asyncio.Queue()
    task = asyncio.ensure_future(producer(out.put_nowait))
    task.add_done_callback(lambda _: out.put_nowait(None))
    try:
        while True:
            item = await out.get()
            if item is None:
                break
            yield sse(item)
        if not task.cancelled() and task.exception() is not None:
            e = task.exception()
            message = str(e) if isinstance(e, (RequestError, GenerationError)) else f"{type(e).__name__}: {e}"
            yield sse({"type": "error", "error": {"message": message, "type": "server_error"}})
    finally:
        if not task.done():
            task.cancel()
