"""Serve the summarizer: a web page, a JSON + Server-Sent-Events API and an OpenAI-compatible endpoint.

    python serve.py --ckpt-dir checkpoints/small                 # ppo_latest.pt and best_sft.pt of the folder
    python serve.py --ckpt checkpoints/gpt2/ppo_latest.pt --ckpt checkpoints/gpt2/best_sft.pt --port 8080
    python serve.py --ckpt-dir checkpoints/small --max-batch 1   # one request at a time (no batching)

then open http://127.0.0.1:8000/ or call the API:

    curl -s localhost:8000/api/summarize -H 'content-type: application/json' -d '{"post": "My roommate ..."}'
    curl -sN localhost:8000/api/summarize -d '{"post": "...", "stream": true, "top_probs": 5}'
    python -c "import openai; c = openai.OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='none');
               print(c.completions.create(model='ppo_latest', prompt='My roommate ...', temperature=0).choices[0].text)"

Every checkpoint is loaded once, at start-up. A post becomes the prompt exactly as in summarize.py
(`summarize.Summarizer`: the checkpoint's own template and budgets). Generation runs in one worker thread per
model, off the event loop, with continuous batching (`model.BatchDecoder`): a request for a model that is busy
joins the rows being decoded at the next step instead of waiting for them to end, each row with its own
temperature, top-k, top-p and seed, so that a row gives what it would alone; a client that goes away
mid-stream has its row stopped.

Endpoints: `GET /` (the page), `POST /api/summarize`, `GET /api/models`, `GET /health`, `GET /api/report`
(the run's report.md and plots), `POST /v1/completions` and `GET /v1/models` (OpenAI's schema).
Bad input gets a JSON error `{"error": {"message", "type", "param"}}` with status 400 (not UTF-8 JSON),
404 (unknown model), 413 (post over --max-post-chars) or 422 (a value out of range); never a traceback.
"""
from __future__ import annotations

import asyncio
import codecs
import json
import math
import queue
import re
import secrets
import socket
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

import synthetic
import tldr
from checkpoints import resolve_ckpt
from common import ROOT, UserError, cli_main, compute_init, get_tokenizer
from model import EOS_ID, BatchDecoder, choose_tokens, left_pad
from summaries import DEFAULT_CKPT, FALLBACK_CKPT, Summarizer, decode_summary

STATIC_DIR = ROOT / "static"
MAX_TOP_PROBS = 20
MAX_COMPLETIONS = 16  # most summaries one /v1/completions request may ask for (prompts x n)


@dataclass
class Config:
    ckpt_dir: str = "checkpoints"         # where bare checkpoint names resolve, and the default models' folder
    ckpt: list[str] = field(default_factory=list)  # checkpoints to serve (ppo or sft); none: ppo_latest.pt and best_sft.pt of --ckpt-dir
    host: str = "127.0.0.1"               # interface to listen on (0.0.0.0: every interface)
    port: int = 8000                      # TCP port
    device: str = "auto"                  # auto | cuda | cpu | mps
    dtype: str = "auto"                   # auto (bf16 on Ampere+, fp16 on older GPUs, fp32 on CPU) | float32 | bfloat16 | float16
    threads: int = 0                      # torch CPU threads (0: torch's default, one per core; fewer leaves cores to the web server and clients)
    max_post_chars: int = 20_000          # longest post accepted, in characters (longer: 413)
    max_batch: int = 32                   # most requests decoded together in one batch (1: one at a time)
    batch_wait_ms: float = 5.0            # after a request arrives, how long to wait for others to share its batch
    examples: str = ""                    # TL;DR posts the page offers as examples (a --data of sft.py; test split); "": posts of the generated world
    num_examples: int = 6                 # how many example posts
    run_dir: str = ""                     # run folder whose report.md and *.png the page shows ("": runs/<name of --ckpt-dir>)
    log_level: str = "warning"            # uvicorn's log level: critical | error | warning | info | debug


# -----------------------------------------------------------------------------
# decoding: one worker thread per model, requests batched

class TextStream:
    """Token ids → the pieces of text a client sees, so that the pieces joined equal summaries.decode_summary of
    the tokens: bytes are decoded incrementally (a character split across tokens arrives whole), leading
    whitespace is dropped and trailing whitespace held back until something follows it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.started, self.pending = False, ""

    def feed(self, token: int) -> str:
        return self._piece(self.decoder.decode(self.tokenizer.decode_single_token_bytes(token)))

    def finish(self) -> str:
        return self._piece(self.decoder.decode(b"", final=True))

    def _piece(self, text: str) -> str:
        text = self.pending + text
        if not self.started:
            text = text.lstrip()
        kept = text.rstrip()
        self.pending = text[len(kept):] if self.started or kept else ""
        self.started = self.started or bool(kept)
        return kept


@dataclass
class Job:
    """One summary to generate. `emit` is called from the worker thread with each event (a dict):
    {"kind": "token", "id", "text", "top": [(id, prob), ...], "n"}, then {"kind": "done", "tokens", "ended"}
    or {"kind": "error", "message"}."""
    prompt: list[int]
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator
    top_probs: int
    emit: Callable[[dict], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Row:
    """A job being decoded: its text so far and its tokens."""
    job: Job
    stream: TextStream
    tokens: list[int] = field(default_factory=list)


class Engine:
    """A loaded summarizer and the thread that decodes its requests with continuous batching
    (model.BatchDecoder): a request that arrives while others are being decoded is prefilled and joins
    them at the next step, up to `max_batch` rows, and a row leaves as soon as it ends. When the engine is
    idle, the first request waits up to `batch_wait_s` for others that arrive with it."""

    def __init__(self, name: str, summarizer: Summarizer, path: Path, rt, max_batch: int, batch_wait_s: float):
        self.name, self.summarizer, self.path, self.rt = name, summarizer, path, rt
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s
        self.tokenizer = get_tokenizer()
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.stats = {"requests": 0, "prefills": 0, "steps": 0, "largest_batch": 0, "cancelled": 0, "tokens": 0}
        self.closing = False
        self.thread = threading.Thread(target=self._loop, name=f"decode-{name}", daemon=True)
        self.thread.start()

    @property
    def budget(self) -> int:
        return self.summarizer.info["max_summary_tokens"]

    def submit(self, job: Job):
        self.jobs.put(job)

    def close(self):
        self.jobs.put(None)
        self.thread.join(timeout=10)

    def _admit(self, active: int) -> list[Job]:
        """Jobs to start now: when idle, block for the first and gather those arriving within batch_wait_s;
        when decoding, whatever is waiting (without waiting)."""
        room = self.max_batch - active
        if room <= 0:
            return []
        if active == 0:
            first = self.jobs.get()
            if first is None:
                self.closing = True
                return []
            jobs, deadline = [first], time.perf_counter() + self.batch_wait_s
        else:
            jobs, deadline = [], 0.0
        while len(jobs) < room:
            try:
                job = self.jobs.get(timeout=max(0.0, deadline - time.perf_counter())) if deadline \
                    else self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.closing = True
                break
            jobs.append(job)
        return [j for j in jobs if not j.cancelled.is_set()]

    def _loop(self):
        decoder, rows = BatchDecoder(self.summarizer.model), []
        while not (self.closing and not rows):
            new = self._admit(len(rows))
            if not rows and not new:
                continue
            try:
                with self.rt.autocast():
                    if new:
                        decoder.add(*left_pad([j.prompt for j in new]), [j.max_new_tokens for j in new])
                        rows += [Row(j, TextStream(self.tokenizer)) for j in new]
                        self.stats["requests"] += len(new)
                        self.stats["prefills"] += 1
                    rows = self._step(decoder, rows)
            except Exception as e:  # a failed step fails the requests in it, never the server
                for row in rows:
                    row.job.emit({"kind": "error", "message": f"generation failed: {type(e).__name__}: {e}"})
                decoder, rows = BatchDecoder(self.summarizer.model), []

    def _step(self, decoder: BatchDecoder, rows: list[Row]) -> list[Row]:
        """One token for every row; returns the rows that go on (the decoder keeps exactly those)."""
        self.stats["steps"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
        jobs = [r.job for r in rows]
        tokens, logp = choose_tokens(decoder.logits(), row_setting([j.temperature for j in jobs]),
                                     row_setting([j.top_k for j in jobs]), row_setting([j.top_p for j in jobs]),
                                     [j.generator for j in jobs])
        top_n = max(j.top_probs for j in jobs)
        if top_n:
            top = torch.topk(logp, top_n, dim=-1)
            top_ids, top_probs = top.indices.tolist(), top.values.exp().tolist()
        going_on = []
        for i, (row, token) in enumerate(zip(rows, tokens.tolist())):
            job = row.job
            if job.cancelled.is_set():
                self.stats["cancelled"] += 1
                continue
            if token == EOS_ID:
                self._finish(row, ended=True)
                continue
            row.tokens.append(token)
            self.stats["tokens"] += 1
            job.emit({"kind": "token", "id": token, "text": row.stream.feed(token), "n": len(row.tokens),
                      "top": list(zip(top_ids[i][:job.top_probs], top_probs[i][:job.top_probs])) if top_n else []})
            if len(row.tokens) >= job.max_new_tokens:
                self._finish(row, ended=False)
            else:
                going_on.append(i)
        decoder.keep(going_on)
        decoder.advance(tokens[going_on])
        return [rows[i] for i in going_on]

    def _finish(self, row: Row, ended: bool):
        tail = row.stream.finish()
        if tail:
            row.job.emit({"kind": "token", "id": None, "text": tail, "top": [], "n": len(row.tokens)})
        row.job.emit({"kind": "done", "tokens": row.tokens, "ended": ended})


def row_setting(values: list):
    """A sampling setting of the batch's rows: one number when every row has the same (the common case,
    which the sampler handles without per-row tensors or device syncs), else a (B,) tensor."""
    return values[0] if all(v == values[0] for v in values) else torch.tensor(values)


# -----------------------------------------------------------------------------
# loading

def model_names(paths: list[Path]) -> list[str]:
    """A short name per checkpoint: its file stem, or folder/stem where two stems clash."""
    stems = [p.stem for p in paths]
    return [f"{p.parent.name}/{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]


def checkpoint_paths(cfg: Config) -> list[Path]:
    """--ckpt as given (each must exist), or the folder's PPO and SFT checkpoints (those that exist)."""
    if cfg.ckpt:
        return [resolve_ckpt(c, cfg.ckpt_dir) for c in cfg.ckpt]
    found = [resolve_ckpt(n, cfg.ckpt_dir) for n in (DEFAULT_CKPT, FALLBACK_CKPT)]
    found = [p for p in found if p.is_file()]
    if not found:
        raise UserError(f"nothing to serve: neither {resolve_ckpt(DEFAULT_CKPT, cfg.ckpt_dir)} nor "
                        f"{resolve_ckpt(FALLBACK_CKPT, cfg.ckpt_dir)} exists; train one (make demo) or pass --ckpt")
    return found


def load_engines(cfg: Config) -> dict[str, Engine]:
    """Every checkpoint loaded once, each with its decoding thread; the first is the default model."""
    check_config(cfg)
    rt = compute_init(0, cfg.device, cfg.dtype)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    paths = checkpoint_paths(cfg)
    loaded = [(name, Summarizer.load(p, rt.device), p)
              for name, p in zip(model_names(paths), paths)]
    return {name: Engine(name, summarizer, path, rt, cfg.max_batch, cfg.batch_wait_ms / 1000)
            for name, summarizer, path in loaded}


def check_config(cfg: Config):
    if cfg.max_batch < 1 or cfg.batch_wait_ms < 0 or cfg.max_post_chars < 1 or cfg.threads < 0:
        raise UserError(f"--max-batch and --max-post-chars must be >= 1, --batch-wait-ms and --threads >= 0, got "
                        f"{cfg.max_batch}, {cfg.max_post_chars}, {cfg.batch_wait_ms} and {cfg.threads}")
    if not 0 <= cfg.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {cfg.port}")


# -----------------------------------------------------------------------------
# requests: parsing and checking, one clear message per problem

class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


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


@dataclass
class Sampling:
    temperature: float
    top_k: int
    top_p: float
    max_new_tokens: int
    seed: int | None


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
# running a request: events from the worker thread into the event loop

@dataclass
class Result:
    tokens: list[int]
    ended: bool
    seconds: float


async def run_jobs(engine: Engine, prompt_jobs: list[tuple[list[int], Sampling]], top_probs: int,
                   on_token: Callable[[int, dict, float], None] | None = None) -> list[Result]:
    """Submit one job per (prompt, sampling), await every row's end; on_token(row, event, elapsed) is called
    in the event loop for each token. If the caller is cancelled (a client that went away), its rows are
    stopped."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    jobs, start = [], time.perf_counter()
    for row, (prompt, s) in enumerate(prompt_jobs):
        gen = torch.Generator(device=engine.rt.device)
        gen.manual_seed(s.seed + row if s.seed is not None else secrets.randbits(62))

        def emit(event, row=row):
            try:
                loop.call_soon_threadsafe(events.put_nowait, (row, event))
            except RuntimeError:  # the loop has closed: the client is gone
                pass
        jobs.append(Job(prompt, s.max_new_tokens, s.temperature, s.top_k, s.top_p, gen, top_probs, emit))
    for job in jobs:
        engine.submit(job)
    results: list[Result | None] = [None] * len(jobs)
    try:
        while any(r is None for r in results):
            row, event = await events.get()
            if event["kind"] == "error":
                raise RequestError(500, event["message"])
            if event["kind"] == "done":
                results[row] = Result(event["tokens"], event["ended"], time.perf_counter() - start)
            elif on_token is not None:
                on_token(row, event, time.perf_counter() - start)
    finally:
        for job in jobs:
            job.cancelled.set()
    return results


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
            message = e.message if isinstance(e, RequestError) else f"{type(e).__name__}: {e}"
            yield sse({"type": "error", "error": {"message": message, "type": "server_error"}})
    finally:
        if not task.done():
            task.cancel()


# -----------------------------------------------------------------------------
# the app

def create_app(engines: dict[str, Engine], cfg: Config):
    tok = get_tokenizer()
    example_posts = load_examples(cfg.examples, cfg.num_examples)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else Path("runs") / Path(cfg.ckpt_dir).name

    @asynccontextmanager
    async def lifespan(app):
        yield
        for engine in engines.values():
            engine.close()

    app = FastAPI(title="TL;DR summarizer", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.exception_handler(RequestError)
    async def request_error(request, e: RequestError):
        kind = "invalid_request_error" if e.status < 500 else "server_error"
        return JSONResponse({"error": {"message": e.message, "type": kind, "param": e.param}}, status_code=e.status)

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        print(f"error: {request.url.path}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return JSONResponse({"error": {"message": "internal server error", "type": "server_error", "param": None}},
                            status_code=500)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": {name: dict(e.stats) for name, e in engines.items()}}

    @app.get("/api/models")
    async def models():
        return {"models": [model_card(name, e, i == 0) for i, (name, e) in enumerate(engines.items())]}

    @app.post("/api/summarize")
    async def summarize(request: Request):
        body = await read_body(request, cfg.max_post_chars)
        engine = pick_engine(engines, body.get("model"))
        text = take_post(body.get("post"), cfg.max_post_chars)
        post = tldr.Post(text, take(body, "title", str, "").strip(),
                         take(body, "subreddit", str, "").strip().removeprefix("r/"))
        sampling = take_sampling(body, engine, 0.0, "max_new_tokens")
        top_probs = take(body, "top_probs", int, 0)
        if not 0 <= top_probs <= MAX_TOP_PROBS:
            raise RequestError(422, f"top_probs must be in [0, {MAX_TOP_PROBS}], got {top_probs}", "top_probs")
        stream = take(body, "stream", bool, False)
        prompt, truncated = engine.summarizer.prompt(post, sampling.max_new_tokens)

        def final(result: Result) -> dict:
            return {"summary": decode_summary(result.tokens, tok), "model": engine.name,
                    "tokens": len(result.tokens), "seconds": round(result.seconds, 4),
                    "tokens_per_s": round(len(result.tokens) / max(result.seconds, 1e-9), 2),
                    "truncated": truncated, "finish_reason": "stop" if result.ended else "length"}

        if not stream:
            return final((await run_jobs(engine, [(prompt, sampling)], 0))[0])

        async def produce(send):
            def on_token(row, event, elapsed):
                if event["id"] is None and not event["text"]:
                    return
                send({"type": "token", "text": event["text"], "id": event["id"], "index": event["n"] - 1,
                      "top": [{"token": tok.decode([i]), "id": i, "prob": round(p, 5)} for i, p in event["top"]],
                      "tokens_per_s": round(event["n"] / max(elapsed, 1e-9), 2)})
            result = (await run_jobs(engine, [(prompt, sampling)], top_probs, on_token))[0]
            send({"type": "done", **final(result)})

        return StreamingResponse(stream_events(produce), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/api/examples")
    async def examples():
        return {"examples": [{"subreddit": p.subreddit, "title": p.title, "post": p.post} for p in example_posts]}

    @app.get("/api/report")
    async def report():
        md = run_dir / "report.md"
        return {"run": str(run_dir), "markdown": md.read_text(encoding="utf-8") if md.is_file() else None,
                "plots": [f"/api/report/plots/{p.name}" for p in sorted(run_dir.glob("*.png"))]}

    @app.get("/api/report/plots/{name}")
    async def plot(name: str):
        path = run_dir / name
        if not re.fullmatch(r"[\w.-]+\.png", name) or not path.is_file():
            raise RequestError(404, f"no plot {name!r} in {run_dir}")
        return FileResponse(path, media_type="image/png")

    # --- OpenAI-compatible: https://platform.openai.com/docs/api-reference/completions

    @app.get("/v1/models")
    async def v1_models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(e.path.stat().st_mtime),
                                            "owned_by": e.summarizer.stage} for name, e in engines.items()]}

    @app.post("/v1/completions")
    async def v1_completions(request: Request):
        body = await read_body(request, cfg.max_post_chars)
        engine = pick_engine(engines, body.get("model"))
        prompts = body.get("prompt")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, list) or not prompts:
            raise RequestError(422, "prompt must be a string (the post) or a list of strings", "prompt")
        posts = [as_post(take_post(p, cfg.max_post_chars, "prompt")) for p in prompts]
        sampling = take_sampling(body, engine, 1.0, "max_tokens")
        n = take(body, "n", int, 1)
        if not 1 <= n or n * len(posts) > MAX_COMPLETIONS:
            raise RequestError(422, f"n must be >= 1 and n x prompts at most {MAX_COMPLETIONS}, got {n} x {len(posts)}", "n")
        stream = take(body, "stream", bool, False)
        for unsupported in ("echo", "logprobs", "suffix"):
            if body.get(unsupported) not in (None, False):
                raise RequestError(422, f"{unsupported} is not supported by this server", unsupported)
        prompt_ids = [engine.summarizer.prompt(p, sampling.max_new_tokens)[0] for p in posts]
        rows = [(ids, sampling) for ids in prompt_ids for _ in range(n)]
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": engine.name}

        if not stream:
            results = await run_jobs(engine, rows, 0)
            completion = sum(len(r.tokens) for r in results)
            return {**head, "choices": [{"index": i, "text": decode_summary(r.tokens, tok), "logprobs": None,
                                         "finish_reason": "stop" if r.ended else "length"} for i, r in enumerate(results)],
                    "usage": {"prompt_tokens": sum(map(len, prompt_ids)), "completion_tokens": completion,
                              "total_tokens": sum(map(len, prompt_ids)) + completion}}

        async def produce(send):
            def on_token(row, event, elapsed):
                if event["text"]:
                    send({**head, "choices": [{"index": row, "text": event["text"], "logprobs": None,
                                               "finish_reason": None}]})
            results = await run_jobs(engine, rows, 0, on_token)
            for i, r in enumerate(results):
                send({**head, "choices": [{"index": i, "text": "", "logprobs": None,
                                           "finish_reason": "stop" if r.ended else "length"}]})

        async def with_done():
            async for chunk in stream_events(produce):
                yield chunk
            yield sse("[DONE]")

        return StreamingResponse(with_done(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def as_post(text: str) -> tldr.Post:
    """A /v1/completions prompt: the post itself, or a whole prompt in the training template
    (SUBREDDIT / TITLE / POST / TL;DR:, as in CarperAI's and trl-lib's TL;DR sets), taken apart."""
    if text.startswith("SUBREDDIT:") and text.rstrip().endswith("TL;DR:"):
        try:
            return tldr.parse_prompt(text)
        except ValueError:
            pass
    return tldr.Post(text)


def load_examples(data: str, num: int) -> list[tldr.Post]:
    """Posts for the page's example list: the test split of a TL;DR source, or posts of the generated world
    (what the demo's models were trained on)."""
    if data:
        return [e.post for e in tldr.load_sft(data, "test")[:num]]
    world = synthetic.make_world(seed=2024, num_posts=max(10, 10 * num), valid_frac=0.1, test_frac=0.5)
    return [tldr.Post(p.post, p.title, p.subreddit) for p in world["test"][:num]]


def model_card(name: str, engine: Engine, default: bool) -> dict:
    s = engine.summarizer
    return {"name": name, "stage": s.stage, "step": s.step, "metrics": s.metrics, "path": str(engine.path),
            "default": default, "params": s.model.num_params(non_embedding=False),
            "max_new_tokens": engine.budget, "max_prompt_tokens": s.info["max_prompt_tokens"],
            "template": s.info["template"]}


# -----------------------------------------------------------------------------

def check_port_free(host: str, port: int):
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def main(cfg: Config):
    import uvicorn
    check_config(cfg)
    check_port_free(cfg.host, cfg.port)
    engines = load_engines(cfg)
    app = create_app(engines, cfg)
    for name, e in engines.items():
        print(f"serving {name} ({e.summarizer.stage}, step {e.summarizer.step}) from {e.path}", flush=True)
    print(f"open http://{cfg.host}:{cfg.port}/  (API: /api/summarize, /v1/completions; docs: /docs)", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)


if __name__ == "__main__":
    cli_main(main, Config)
