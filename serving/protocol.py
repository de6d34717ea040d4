"""The HTTP side both APIs share: the JSON error (RequestError, error_response), request bodies read and parsed,
fields checked with one clear message per problem, and Server-Sent Events."""
from __future__ import annotations

import asyncio
import json
import math
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

import tldr
from common import UserError
from model import TOKENIZER_VOCAB
from serving.engine import Engine, GenerationError, Sampling, log, sampling_problem

MAX_COMPLETIONS = 16  # most summaries one /v1/completions request may ask for (prompts x n)


class RequestError(Exception):
    """A request this server refuses: its status (400, 404, 413, 415, 422; 500 for a failure of ours), one
    clear message, and the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    """The JSON error every endpoint answers with: {"error": {"message", "type", "param"}}."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param}}, status_code=status)


def is_json(content_type: str) -> bool:
    """Whether a content-type header names JSON (application/json, or a +json type such as
    application/merge-patch+json), whatever its parameters (charset)."""
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_body(request: Request, max_post_chars: int) -> dict:
    """The request's JSON object. It must be sent as application/json: a page of another site can make a
    browser POST text/plain (or a form) here without asking first, never application/json, so the type keeps
    those out. A body far over what a post of max_post_chars can need (4 bytes a character in UTF-8, 4 x for
    JSON escapes, plus room for the other fields) is refused unread."""
    content_type = request.headers.get("content-type", "")
    if not is_json(content_type):
        raise RequestError(415, f"the request body must be JSON sent with content-type: application/json, not "
                                f"{json.dumps(content_type[:60]) if content_type else 'no content-type'}")
    limit = 16 * max_post_chars + 65_536
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the request body is {int(declared)} bytes, over this server's limit of {limit}")
    try:
        raw = await request.body()
    except ClientDisconnect:
        # the client closed the connection mid-upload: nobody will read an answer, the log gets one line
        log(f"warning: {request.method} {request.url.path}: the client went away before sending the whole request body")
        raise RequestError(400, "the request body is incomplete: the client went away") from None
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
    except RecursionError:  # json's parser recurses once per [ or {: 100,000 of them exhaust the stack
        raise RequestError(400, "the request body is not valid JSON: nested too deeply") from None
    except ValueError as e:  # an integer of over 4,300 digits (Python's int_max_str_digits)
        raise RequestError(400, f"the request body is not valid JSON: {str(e)[:80]}") from None
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
    """The sampling settings of a request, each checked against what the sampler computes in (float32)."""
    temperature = take(body, "temperature", float, temperature_default)
    top_k = take(body, "top_k", int, 0)
    top_p = take(body, "top_p", float, 1.0)
    max_new = take(body, max_tokens_field, int, engine.budget, optional=True)
    max_new = engine.budget if max_new is None else max_new
    seed = take(body, "seed", int, None, optional=True)
    if seed is not None and not 0 <= seed < 2 ** 63 - MAX_COMPLETIONS:
        raise RequestError(422, f"seed must be in [0, 2^63 - {MAX_COMPLETIONS}), got {seed}", "seed")
    top_k = 0 if top_k >= TOKENIZER_VOCAB else top_k  # at least the whole vocabulary: no filter at all
    problem = sampling_problem(temperature, top_k, top_p)
    if problem is not None:
        field, message = problem
        raise RequestError(422, message, field)
    if not 1 <= max_new <= engine.budget:
        raise RequestError(422, f"{max_tokens_field} must be in [1, {engine.budget}] for model {engine.name}, "
                                f"got {max_new}", max_tokens_field)
    return Sampling(temperature, top_k, top_p, max_new, seed)


def build_prompt(engine: Engine, post: tldr.Post, max_new_tokens: int) -> tuple[list[int], bool]:
    """The model's prompt for a post (Summarizer.prompt); a subreddit so long that it leaves no room for the
    post in the prompt budget is the client's to fix (422)."""
    try:
        return engine.summarizer.prompt(post, max_new_tokens)
    except UserError as e:
        raise RequestError(422, str(e), "subreddit") from None


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
            if isinstance(e, (RequestError, GenerationError)):
                message = str(e)
            else:  # a fault of ours: its details go to the log, never to the client
                log(f"error: a streamed response failed: {type(e).__name__}: {e}")
                message = "internal server error"
            yield sse({"type": "error", "error": {"message": message, "type": "server_error"}})
    finally:
        if not task.done():
            task.cancel()
