"""The HTTP side both APIs share: the JSON error (RequestError, error_response), request bodies read and parsed,
fields checked with one clear message per problem, the models (loaded or still loading), and Server-Sent Events."""
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
from serving.engine import Engine, GenerationError, Result, Sampling, log, sampling_problem

MAX_COMPLETIONS = 16  # most rows one request may ask for (prompts x n)
MAX_PROMPTS = 64      # most prompts in one /v1/completions batch (lm-evaluation-harness sends batches of prompts)
PENALTY_RANGE = 2.0   # presence_penalty and frequency_penalty are in [-2, 2], as OpenAI's


class RequestError(Exception):
    """A request this server refuses: its status (400, 404, 413, 415, 422; 503 while loading; 500 for a failure
    of ours), one clear message, the field at fault and a short code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 503: "service_unavailable"}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    """The JSON error every endpoint answers with, in OpenAI's shape: {"error": {"message", "type", "param",
    "code"}}."""
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


class Models:
    """The engines served, by name (the first is the default model), once loaded; until then every route that
    needs a model answers 503, and /health says it is loading."""

    def __init__(self, engines: dict[str, Engine] | None = None):
        self.engines: dict[str, Engine] = dict(engines or {})
        self.ready = engines is not None

    def set(self, engines: dict[str, Engine]):
        self.engines, self.ready = dict(engines), True

    def check_ready(self):
        if not self.ready:
            raise RequestError(503, "the models are still loading; try again in a few seconds", code="loading")

    def pick(self, name: Any) -> Engine:
        """The engine a request names (None: the default)."""
        self.check_ready()
        if name is None:
            return next(iter(self.engines.values()))
        if not isinstance(name, str) or name not in self.engines:
            raise RequestError(404, f"unknown model {json.dumps(name)[:60]}; this server has: {', '.join(self.engines)}",
                               "model", "model_not_found")
        return self.engines[name]

    def close(self):
        for engine in self.engines.values():
            engine.close()


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


async def read_model_request(request: Request, models: "Models", max_post_chars: int) -> tuple[dict, Engine]:
    """The request's JSON body and the engine of the model it names (the default one when it names none)."""
    body = await read_body(request, max_post_chars)
    return body, models.pick(body.get("model"))


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


def take_sampling(body: dict, engine: Engine, temperature_default: float, max_tokens_field: str,
                  capped: bool = False) -> Sampling:
    """The sampling settings of a request, each checked against what the sampler computes in (float32). The
    native API refuses a max_new_tokens over the model's summary budget; the OpenAI API (`capped`) takes any
    max_tokens >= 0 and the caller caps it per prompt, as OpenAI does at a model's limit."""
    temperature = take(body, "temperature", float, temperature_default, optional=True)
    temperature = temperature_default if temperature is None else temperature
    top_k = take(body, "top_k", int, 0)
    top_p = take(body, "top_p", float, 1.0, optional=True)
    top_p = 1.0 if top_p is None else top_p
    max_new = take(body, max_tokens_field, int, engine.budget, optional=True)
    max_new = engine.budget if max_new is None else max_new
    seed = take(body, "seed", int, None, optional=True)
    if seed is not None and not 0 <= seed < 2 ** 63 - MAX_COMPLETIONS:
        raise RequestError(422, f"seed must be in [0, 2^63 - {MAX_COMPLETIONS}), got {seed}", "seed")
    penalties = []
    for name in ("presence_penalty", "frequency_penalty"):
        value = take(body, name, float, 0.0, optional=True) or 0.0
        if not -PENALTY_RANGE <= value <= PENALTY_RANGE:
            raise RequestError(422, f"{name} must be in [-{PENALTY_RANGE:g}, {PENALTY_RANGE:g}], got {value:g}", name)
        penalties.append(value)
    top_k = 0 if top_k >= TOKENIZER_VOCAB else top_k  # at least the whole vocabulary: no filter at all
    problem = sampling_problem(temperature, top_k, top_p)
    if problem is not None:
        field, message = problem
        raise RequestError(422, message, field)
    if capped:
        if max_new < 0:
            raise RequestError(422, f"{max_tokens_field} must be >= 0, got {max_new}", max_tokens_field)
    elif not 1 <= max_new <= engine.budget:
        raise RequestError(422, f"{max_tokens_field} must be in [1, {engine.budget}] for model {engine.name}, "
                                f"got {max_new}", max_tokens_field)
    return Sampling(temperature, top_k, top_p, max_new, seed, *penalties)


def take_stop(body: dict) -> tuple[str, ...]:
    """`stop`: a string or a list of up to 4 (OpenAI's limit), none empty."""
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise RequestError(422, "stop must be a non-empty string or a list of up to 4 of them", "stop")
    return tuple(stops)


def take_n(body: dict, prompts: int) -> int:
    n = take(body, "n", int, 1, optional=True)
    n = 1 if n is None else n
    if not 1 <= n or n * prompts > MAX_COMPLETIONS:
        raise RequestError(422, f"n must be >= 1 and n x prompts at most {MAX_COMPLETIONS}, got {n} x {prompts}", "n")
    return n


def take_stream(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage): stream_options {"include_usage": true} adds a last chunk with the usage."""
    stream = take(body, "stream", bool, False, optional=True) or False
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise RequestError(422, "stream_options must be an object", "stream_options")
    if not stream:
        raise RequestError(422, "stream_options is only allowed with stream: true", "stream_options")
    return stream, bool(take(options, "include_usage", bool, False, optional=True))


def refuse_unsupported(body: dict, checks: dict[str, Callable[[Any], bool]]):
    """A field this server knows but does not implement gets a 400 when set to anything but its no-op value
    (never silently ignored); fields it does not know are ignored, as OpenAI's own API ignores them."""
    for name, is_noop in checks.items():
        if name in body and not is_noop(body[name]):
            raise RequestError(422, f"{name} is not supported by this server", name, "unsupported_parameter")


def note_results(request: Request, engine: Engine, results: list[Result]):
    """A request's generated tokens and times to first token, for the access log and /metrics."""
    request.state.tokens = getattr(request.state, "tokens", 0) + sum(r.generated for r in results)
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.rows_done(engine.name, results)


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
