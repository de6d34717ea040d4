"""Decoding and batching, no HTTP: one Engine (a worker thread) per loaded summarizer decodes its requests with
continuous batching (model.BatchDecoder), and run_jobs carries a request's rows from that thread into the event
loop."""
from __future__ import annotations

import asyncio
import codecs
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from common import get_tokenizer
from model import EOS_ID, BatchDecoder, choose_tokens, left_pad
from summaries import Summarizer


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
# running a request: events from the worker thread into the event loop

@dataclass
class Sampling:
    temperature: float
    top_k: int
    top_p: float
    max_new_tokens: int
    seed: int | None


class GenerationError(Exception):
    """A decoding step failed; the message says how (the request gets a 500)."""


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
                raise GenerationError(event["message"])
            if event["kind"] == "done":
                results[row] = Result(event["tokens"], event["ended"], time.perf_counter() - start)
            elif on_token is not None:
                on_token(row, event, time.perf_counter() - start)
    finally:
        for job in jobs:
            job.cancelled.set()
    return results
