"""Decoding and batching, no HTTP: one Engine (a worker thread) per loaded summarizer decodes its requests with
continuous batching (model.BatchDecoder), and run_jobs carries a request's rows from that thread into the event
loop."""
from __future__ import annotations

import asyncio
import codecs
import queue
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from common import first_line, get_tokenizer
from model import EOS_ID, TOKENIZER_VOCAB, BatchDecoder, choose_tokens, left_pad
from summaries import Summarizer, sampling_problem

GENERATION_FAILED = "generation failed: a fault of this server, whose log has the details"


def log(line: str):
    """One line on the server's log (stderr): a message that spans lines is folded into one."""
    print(" ".join(line.split()), file=sys.stderr, flush=True)


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
        """Stop the decoding thread (idempotent): the rows being decoded end first."""
        if self.thread.is_alive():
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
        # A failure ends the rows it belongs to and no others: a job with settings the sampler cannot use is
        # refused before it is admitted, a row whose step goes wrong (its own sampling, a token outside the
        # vocabulary) ends alone inside _step, and when a step of the whole batch fails (prefill, forward)
        # every row is prefilled again alone (_rebuild), so that only the rows that fail alone fail.
        decoder, rows, just_rebuilt = BatchDecoder(self.summarizer.model), [], False
        while not (self.closing and not rows):
            new = [j for j in self._admit(len(rows)) if self._admissible(j)]
            if not rows and not new:
                continue
            pending: list[Row] = []
            try:
                with self.rt.autocast():
                    if new:
                        pending = [Row(j, TextStream(self.tokenizer)) for j in new]
                        self.stats["requests"] += len(new)
                        self.stats["prefills"] += 1
                        decoder.add(*left_pad([j.prompt for j in new]), [j.max_new_tokens for j in new])
                        rows, pending = rows + pending, []
                    going_on, tokens = self._step(decoder, rows)
                    rows = [rows[i] for i in going_on]
                    decoder.keep(going_on)
                    decoder.advance(tokens[going_on])
                just_rebuilt = False
            except Exception as e:
                rows = rows + pending
                if just_rebuilt:  # the same rows fail together again: the fault is not one row's
                    log(f"error: model {self.name}: decoding failed again after a retry, ending its {len(rows)} "
                        f"rows: {type(e).__name__}: {first_line(e)}")
                    for row in rows:
                        row.job.emit({"kind": "error", "message": GENERATION_FAILED})
                    decoder, rows, just_rebuilt = BatchDecoder(self.summarizer.model), [], False
                else:
                    log(f"error: model {self.name}: a decoding step of {len(rows)} rows failed, retrying each row "
                        f"alone: {type(e).__name__}: {first_line(e)}")
                    decoder, rows = self._rebuild(rows)
                    just_rebuilt = True

    def _admissible(self, job: Job) -> bool:
        """Whether the job can be decoded; one that cannot ends here, with an error of its own."""
        block = self.summarizer.model.config.block_size
        found = sampling_problem(job.temperature, job.top_k, job.top_p)
        problem = found[1] if found else None
        if problem is None and not (job.prompt and all(isinstance(t, int) and 0 <= t < TOKENIZER_VOCAB for t in job.prompt)):
            problem = "the prompt is empty or holds a token outside the vocabulary"
        if problem is None and not (isinstance(job.max_new_tokens, int) and 1 <= job.max_new_tokens
                                    and len(job.prompt) + job.max_new_tokens <= block):
            problem = f"{len(job.prompt)} prompt and {job.max_new_tokens!r} new tokens do not fit block_size {block}"
        if problem is not None:
            self._fail(job, problem)
        return problem is None

    def _fail(self, job: Job, detail: str):
        """End one job with an error: the client is told generation failed, the log says why."""
        log(f"error: model {self.name}: a request's generation failed: {detail}")
        job.emit({"kind": "error", "message": GENERATION_FAILED})

    def _rebuild(self, rows: list[Row]) -> tuple[BatchDecoder, list[Row]]:
        """A new decoder for the rows of a failed step: each row is first prefilled alone (its prompt and the
        tokens it has so far, so that it goes on where it was; a row that fails alone ends), then the others
        together, into a new cache."""
        def prefill(decoder: BatchDecoder, group: list[Row]):
            decoder.add(*left_pad([r.job.prompt + r.tokens for r in group]),
                        [r.job.max_new_tokens - len(r.tokens) for r in group])

        survivors = []
        with self.rt.autocast():
            for row in rows:
                if row.job.cancelled.is_set():
                    self.stats["cancelled"] += 1
                    continue
                try:
                    prefill(BatchDecoder(self.summarizer.model), [row])
                    survivors.append(row)
                except Exception as e:
                    self._fail(row.job, f"{type(e).__name__}: {first_line(e)}")
            decoder = BatchDecoder(self.summarizer.model)
            try:
                if survivors:
                    prefill(decoder, survivors)
            except Exception as e:
                for row in survivors:
                    self._fail(row.job, f"{type(e).__name__}: {first_line(e)}")
                return BatchDecoder(self.summarizer.model), []
        return decoder, survivors

    def _choose(self, logits: torch.Tensor, jobs: list[Job]) -> tuple[torch.Tensor, torch.Tensor]:
        """The next token and the sampling log-probs of every row; when the batch cannot be sampled together,
        each row alone (a row that cannot be sampled gets token -1, which ends it in _step)."""
        try:
            return choose_tokens(logits, row_setting([j.temperature for j in jobs]), row_setting([j.top_k for j in jobs]),
                                 row_setting([j.top_p for j in jobs]), [j.generator for j in jobs])
        except Exception as e:
            log(f"error: model {self.name}: sampling a batch of {len(jobs)} rows failed, sampling each row alone: "
                f"{type(e).__name__}: {first_line(e)}")
        tokens, logps = [], []
        for i, j in enumerate(jobs):
            try:
                token, logp = choose_tokens(logits[i:i + 1], j.temperature, j.top_k, j.top_p, [j.generator])
            except Exception:
                token, logp = torch.full((1,), -1, dtype=torch.long), torch.full_like(logits[i:i + 1], float("-inf"))
            tokens.append(token.to(logits.device))
            logps.append(logp)
        return torch.cat(tokens), torch.cat(logps)

    def _step(self, decoder: BatchDecoder, rows: list[Row]) -> tuple[list[int], torch.Tensor]:
        """One token for every row: (the indices of the rows that go on, every row's token). A row that ends,
        is cancelled or fails leaves; the caller keeps the others in the decoder and feeds them their token."""
        self.stats["steps"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
        jobs = [r.job for r in rows]
        tokens, logp = self._choose(decoder.logits(), jobs)
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
            if not 0 <= token < TOKENIZER_VOCAB:  # NaN logits, or a row the sampler refused alone
                self._fail(job, f"sampled token {token} is outside the vocabulary (the row's logits are not finite "
                                f"or its settings could not be sampled)")
                continue
            if token == EOS_ID:
                self._finish(row, ended=True)
                continue
            try:
                row.tokens.append(token)
                self.stats["tokens"] += 1
                job.emit({"kind": "token", "id": token, "text": row.stream.feed(token), "n": len(row.tokens),
                          "top": list(zip(top_ids[i][:job.top_probs], top_probs[i][:job.top_probs])) if top_n else []})
            except Exception as e:
                self._fail(job, f"{type(e).__name__}: {first_line(e)}")
                continue
            if len(row.tokens) >= job.max_new_tokens:
                self._finish(row, ended=False)
            else:
                going_on.append(i)
        return going_on, tokens

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
    """A row of the request failed to decode: the request gets a 500 with GENERATION_FAILED (the log has why)."""


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
