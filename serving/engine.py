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
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from common import first_line, get_tokenizer
from model import EOS_ID, TOKENIZER_VOCAB, BatchDecoder, choose_tokens, left_pad, row_argmax
from summaries import Summarizer, sampling_problem

GENERATION_FAILED = "generation failed: a fault of this server, whose log has the details"


def log(line: str):
    """One line on the server's log (stderr): a message that spans lines is folded into one."""
    print(" ".join(line.split()), file=sys.stderr, flush=True)


class TextStream:
    """Token ids → the pieces of text a client sees. Bytes are decoded incrementally (a character split across
    tokens arrives whole). A summary (strip=True) drops its leading whitespace and holds trailing whitespace
    back until something follows it, so that the pieces joined equal summaries.decode_summary of the tokens;
    a raw continuation (strip=False) is every character as generated, the leading space included."""

    def __init__(self, tokenizer, strip: bool = True):
        self.tokenizer, self.strip = tokenizer, strip
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.started, self.pending = False, ""

    def feed(self, token: int) -> str:
        return self._piece(self.decoder.decode(self.tokenizer.decode_single_token_bytes(token)))

    def finish(self) -> str:
        return self._piece(self.decoder.decode(b"", final=True))

    def _piece(self, text: str) -> str:
        if not self.strip:
            return text
        text = self.pending + text
        if not self.started:
            text = text.lstrip()
        kept = text.rstrip()
        self.pending = text[len(kept):] if self.started or kept else ""
        self.started = self.started or bool(kept)
        return kept


class StopText:
    """Text pieces → what the client may see, ending just before the first of the stop strings (which is not
    shown). Text that could still be the start of a stop string is held back until it cannot."""

    def __init__(self, stops: tuple[str, ...] | list[str]):
        self.stops = [s for s in stops if s]
        self.held, self.stopped = "", False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return text[:min(hits)]
        hold = max((k for s in self.stops for k in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold]

    def finish(self) -> str:
        out, self.held = ("" if self.stopped else self.held), ""
        return out


@dataclass
class Job:
    """One row to decode. `emit` is called from the worker thread with each event (a dict):
    {"kind": "prompt", "logprobs", "top"} first when prompt_logprobs is set, then
    {"kind": "token", "id", "top", "logprob", "top_logprobs"} per token and {"kind": "done", "ended"}, or
    {"kind": "error", "message"}. "top" holds the sampling distribution's likeliest (id, prob) (top_probs of
    them); "logprob" and "top_logprobs" (logprobs of them) are the model's own log-probabilities, before
    temperature, filtering and penalties, as OpenAI's API reports them."""
    prompt: list[int]
    max_new_tokens: int                   # 0: no generation (prompt log-probs only)
    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator
    top_probs: int
    emit: Callable[[dict], None]
    logprobs: int | None = None           # the model's log-prob of each new token and its top-N (None: none)
    prompt_logprobs: int | None = None    # the same for every prompt token after the first (None: none)
    presence_penalty: float = 0.0         # subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0        # subtracted once per time a token was already generated
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)


@dataclass
class Row:
    """A job being decoded and the tokens it has so far."""
    job: Job
    tokens: list[int] = field(default_factory=list)


class Engine:
    """A loaded summarizer and the thread that decodes its requests with continuous batching
    (model.BatchDecoder): a request that arrives while others are being decoded is prefilled and joins
    them at the next step, up to `max_batch` rows, and a row leaves as soon as it ends. When the engine is
    idle, the first request starts at once with whatever is queued beside it (after waiting up to
    `batch_wait_s` for others, when that is set)."""

    def __init__(self, name: str, summarizer: Summarizer, path: Path, rt, max_batch: int, batch_wait_s: float):
        self.name, self.summarizer, self.path, self.rt = name, summarizer, path, rt
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s
        self.tokenizer = get_tokenizer()
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.stats = {"requests": 0, "prefills": 0, "steps": 0, "largest_batch": 0, "cancelled": 0, "tokens": 0}
        self.running = 0  # rows being decoded
        self.closing = False
        self.thread = threading.Thread(target=self._loop, name=f"decode-{name}", daemon=True)
        self.thread.start()

    @property
    def budget(self) -> int:
        return self.summarizer.info["max_summary_tokens"]

    @property
    def block_size(self) -> int:
        return self.summarizer.model.config.block_size

    @property
    def waiting(self) -> int:
        """Rows submitted and not yet admitted."""
        return self.jobs.qsize()

    def submit(self, job: Job):
        self.jobs.put(job)

    def warm_up(self, prompt: list[int], tokens: int = 4):
        """Decode one short greedy row and wait for it, so that the first request does not pay for the first
        forward's allocations (and the stats do not count it)."""
        done = threading.Event()
        gen = torch.Generator(device=self.rt.device)
        self.submit(Job(prompt, min(tokens, self.block_size - len(prompt)), 0.0, 0, 1.0, gen, 0,
                        lambda e: done.set() if e["kind"] in ("done", "error") else None, logprobs=1))
        done.wait(timeout=120)
        self.stats = {k: 0 for k in self.stats}

    def close(self):
        """Stop the decoding thread (idempotent): the rows being decoded end first."""
        if self.thread.is_alive():
            self.jobs.put(None)
            self.thread.join(timeout=10)

    def _decoder(self) -> BatchDecoder:
        return BatchDecoder(self.summarizer.model, self.max_batch)

    def _admit(self, active: int) -> list[Job]:
        """Jobs to start now: when idle, block for the first and take those queued with it (and those arriving
        within batch_wait_s); when decoding, whatever is waiting (without waiting)."""
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

    @torch.inference_mode()
    def _loop(self):
        # A failure ends the rows it belongs to and no others: a job with settings the sampler cannot use is
        # refused before it is admitted, a row whose step goes wrong (its own sampling, a token outside the
        # vocabulary) ends alone inside _step, and when a step of the whole batch fails (prefill, forward)
        # every row is prefilled again alone (_rebuild), so that only the rows that fail alone fail.
        decoder, rows, just_rebuilt = self._decoder(), [], False
        while not (self.closing and not rows):
            new = [j for j in self._admit(len(rows)) if self._admissible(j)]
            new = [j for j in new if self._scored(j)]
            if not rows and not new:
                continue
            pending: list[Row] = []
            try:
                with self.rt.autocast():
                    if new:
                        pending = [Row(j) for j in new]
                        self.stats["requests"] += len(new)
                        self.stats["prefills"] += 1
                        decoder.add(*left_pad([j.prompt for j in new]), [j.max_new_tokens for j in new])
                        rows, pending = rows + pending, []
                    self.running = len(rows)
                    going_on, tokens = self._step(decoder, rows)
                    order = decoder.retain(going_on)
                    rows = [rows[i] for i in order]
                    decoder.advance(tokens[order])
                just_rebuilt = False
            except Exception as e:
                rows = rows + pending
                if just_rebuilt:  # the same rows fail together again: the fault is not one row's
                    log(f"error: model {self.name}: decoding failed again after a retry, ending its {len(rows)} "
                        f"rows: {type(e).__name__}: {first_line(e)}")
                    for row in rows:
                        row.job.emit({"kind": "error", "message": GENERATION_FAILED})
                    decoder, rows, just_rebuilt = self._decoder(), [], False
                else:
                    log(f"error: model {self.name}: a decoding step of {len(rows)} rows failed, retrying each row "
                        f"alone: {type(e).__name__}: {first_line(e)}")
                    decoder, rows = self._rebuild(rows)
                    just_rebuilt = True
            self.running = len(rows)

    def _admissible(self, job: Job) -> bool:
        """Whether the job can be decoded; one that cannot ends here, with an error of its own."""
        block = self.block_size
        found = sampling_problem(job.temperature, job.top_k, job.top_p)
        problem = found[1] if found else None
        if problem is None and not (job.prompt and all(isinstance(t, int) and 0 <= t < TOKENIZER_VOCAB for t in job.prompt)):
            problem = "the prompt is empty or holds a token outside the vocabulary"
        least = 0 if job.prompt_logprobs is not None else 1
        if problem is None and not (isinstance(job.max_new_tokens, int) and least <= job.max_new_tokens
                                    and len(job.prompt) + job.max_new_tokens <= block):
            problem = f"{len(job.prompt)} prompt and {job.max_new_tokens!r} new tokens do not fit block_size {block}"
        if problem is not None:
            self._fail(job, problem)
        return problem is None

    @torch.no_grad()
    def _scored(self, job: Job) -> bool:
        """The prompt log-probs of a job that asks for them, one forward of its prompt alone (a row of a
        1,024-token prompt is 200 MB of float32 log-probs); a job with no tokens to generate ends here.
        Whether the job goes on to be decoded."""
        if job.prompt_logprobs is None:
            return True
        try:
            model = self.summarizer.model
            with self.rt.autocast():
                idx = torch.tensor([job.prompt], device=self.rt.device)
                logits = model.logits(model.hidden_states(idx)[0, :-1])                    # (P-1, V)
            logp = torch.log_softmax(logits.float(), dim=-1)
            chosen = logp.gather(1, idx[0, 1:, None])[:, 0].tolist()
            top = top_pairs(logp, job.prompt_logprobs)
            job.emit({"kind": "prompt", "logprobs": [None] + chosen, "top": [None] + top})
        except Exception as e:
            self._fail(job, f"{type(e).__name__}: {first_line(e)}")
            return False
        if job.max_new_tokens == 0:
            job.emit({"kind": "done", "ended": False})
            return False
        return True

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
                    prefill(self._decoder(), [row])
                    survivors.append(row)
                except Exception as e:
                    self._fail(row.job, f"{type(e).__name__}: {first_line(e)}")
            decoder = self._decoder()
            try:
                if survivors:
                    prefill(decoder, survivors)
            except Exception as e:
                for row in survivors:
                    self._fail(row.job, f"{type(e).__name__}: {first_line(e)}")
                return self._decoder(), []
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
        logits = decoder.logits()                                                        # (B, V)
        want_logprobs = max((j.logprobs for j in jobs if j.logprobs is not None), default=None)
        model_logp = torch.log_softmax(logits, dim=-1) if want_logprobs is not None else None
        if any(j.penalized for j in jobs):
            logits = penalize(logits, rows)
        top_n = max(j.top_probs for j in jobs)
        if not top_n and all(j.temperature == 0 for j in jobs):  # greedy: the sampling distribution is not needed
            tokens, logp = row_argmax(logits), None
        else:
            tokens, logp = self._choose(logits, jobs)
        if top_n:
            top = torch.topk(logp, top_n, dim=-1)
            top_ids, top_probs = top.indices.tolist(), top.values.exp().tolist()
        if model_logp is not None:
            chosen = model_logp.gather(1, tokens.clamp(min=0)[:, None])[:, 0].tolist()
            model_top = top_pairs(model_logp, want_logprobs)
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
                job.emit({"kind": "done", "ended": True})
                continue
            try:
                row.tokens.append(token)
                self.stats["tokens"] += 1
                job.emit({"kind": "token", "id": token,
                          "top": list(zip(top_ids[i][:job.top_probs], top_probs[i][:job.top_probs])) if top_n else [],
                          "logprob": chosen[i] if job.logprobs is not None else None,
                          "top_logprobs": model_top[i][:job.logprobs] if job.logprobs is not None else None})
            except Exception as e:
                self._fail(job, f"{type(e).__name__}: {first_line(e)}")
                continue
            if len(row.tokens) >= job.max_new_tokens:
                job.emit({"kind": "done", "ended": False})
            else:
                going_on.append(i)
        return going_on, tokens


def top_pairs(logp: torch.Tensor, n: int) -> list[list[tuple[int, float]]]:
    """The n likeliest (token, log-prob) of each row of logp (R, V)."""
    if n <= 0:
        return [[] for _ in range(logp.size(0))]
    top = torch.topk(logp, n, dim=-1)
    return [list(zip(ids, values)) for ids, values in zip(top.indices.tolist(), top.values.tolist())]


def penalize(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """OpenAI's presence and frequency penalties on the logits (B, V) of the rows that set them: each token a
    row has generated loses presence_penalty + frequency_penalty x its count
    (https://platform.openai.com/docs/advanced-usage/frequency-and-presence-penalties)."""
    logits = logits.clone()
    for i, row in enumerate(rows):
        if row.job.penalized and row.tokens:
            ids, counts = torch.unique(torch.tensor(row.tokens, device=logits.device), return_counts=True)
            logits[i, ids] -= row.job.presence_penalty + row.job.frequency_penalty * counts.to(logits.dtype)
    return logits


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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass
class RowSpec:
    """One row of a request: its prompt tokens, sampling, and what the client is shown."""
    prompt: list[int]
    sampling: Sampling
    strip: bool = True                    # a summary (whitespace stripped, as decode_summary) or the raw continuation
    stop: tuple[str, ...] = ()            # the text ends before the first of these (not shown)
    logprobs: int | None = None           # the model's log-prob of each new token and its top-N (None: none)
    prompt_logprobs: int | None = None    # the same for the prompt's tokens (None: none)
    top_probs: int = 0                    # the sampling distribution's likeliest tokens per step (the page's view)


class GenerationError(Exception):
    """A row of the request failed to decode: the request gets a 500 with GENERATION_FAILED (the log has why)."""


@dataclass
class Result:
    """A row's outcome. `tokens` are those the text came from (up to a stop string), `generated` all the model
    made; logprobs and top_logprobs go with `tokens` (None when not asked for), prompt_logprobs and prompt_top
    with the prompt's tokens (the first None)."""
    text: str
    tokens: list[int]
    generated: int
    finish_reason: str                    # stop (EOS or a stop string) | length (the token budget)
    seconds: float
    ttft: float | None = None             # seconds to the first token (None: no token)
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top: list[list[tuple[int, float]] | None] | None = None


class RowOutput:
    """What the client sees of one row as its events arrive: the text pieces (TextStream, then StopText) and
    the tokens with their log-probs."""

    def __init__(self, spec: RowSpec, tokenizer, start: float):
        self.spec, self.tokenizer, self.start = spec, tokenizer, start
        self.stream, self.stop = TextStream(tokenizer, spec.strip), StopText(spec.stop)
        self.text, self.tokens, self.logprobs, self.top = "", [], [], []
        self.prompt_logprobs = self.prompt_top = self.ttft = None

    def token(self, event: dict) -> str:
        """A new token: the text piece it adds (may be empty while held back)."""
        if self.ttft is None:
            self.ttft = time.perf_counter() - self.start
        self.tokens.append(event["id"])
        self.logprobs.append(event["logprob"])
        self.top.append(event["top_logprobs"])
        return self._show(self.stop.feed(self.stream.feed(event["id"])))

    def finish(self) -> str:
        """The row has ended: the text held back."""
        return self._show(self.stop.feed(self.stream.finish()) + self.stop.finish())

    def _show(self, piece: str) -> str:
        self.text += piece
        return piece

    def result(self, finish_reason: str) -> Result:
        kept = self._kept_tokens() if self.stop.stopped else len(self.tokens)
        asked = self.spec.logprobs is not None
        return Result(self.text, self.tokens[:kept], len(self.tokens), finish_reason, time.perf_counter() - self.start,
                      self.ttft, self.logprobs[:kept] if asked else None, self.top[:kept] if asked else None,
                      self.prompt_logprobs, self.prompt_top)

    def _kept_tokens(self) -> int:
        """How many tokens begin before the stop string: those the shown text came from."""
        raw = decode_text(self.tokens, self.tokenizer)
        limit = len(self.text) + (len(raw) - len(raw.lstrip()) if self.spec.strip else 0)
        return sum(1 for offset in token_offsets(self.tokens, self.tokenizer) if offset < limit)


def decode_text(tokens: list[int], tokenizer) -> str:
    return tokenizer.decode_bytes(tokens).decode("utf-8", errors="replace")


def token_offsets(tokens: list[int], tokenizer, start: int = 0) -> list[int]:
    """Where each token's text begins in the decoded text of all of them, plus `start` (OpenAI's text_offset);
    a character split across tokens begins at the token holding its first byte."""
    offsets, data = [], b""
    for token in tokens:
        offsets.append(start + len(data.decode("utf-8", errors="ignore")))
        data += tokenizer.decode_single_token_bytes(token)
    return offsets


class Mailbox:
    """Calls from decoding threads into one event loop, delivered in batches. call_soon_threadsafe wakes the loop
    with a write to its self-pipe (a system call each time), so a step that emits an event for each of its rows
    wakes the loop once, not once per row."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.lock, self.items, self.scheduled = loop, threading.Lock(), [], False

    def post(self, fn: Callable, arg):
        with self.lock:
            self.items.append((fn, arg))
            if self.scheduled:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop has closed: nobody waits for these events
            pass

    def _drain(self):
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for fn, arg in items:
            fn(arg)


_MAILBOXES: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox]" = weakref.WeakKeyDictionary()


def loop_mailbox(loop: asyncio.AbstractEventLoop) -> Mailbox:
    box = _MAILBOXES.get(loop)
    if box is None:
        box = _MAILBOXES[loop] = Mailbox(loop)
    return box


async def run_jobs(engine: Engine, specs: list[RowSpec], on_token: Callable[[int, dict, float], None] | None = None,
                   on_prompt: Callable[[int, list, list], None] | None = None) -> list[Result]:
    """Submit one job per row, await every row's end. on_token(row, event, elapsed) is called in the event
    loop for each token, with the text piece it adds ("text"; at the end, one event with id None for what was
    held back); on_prompt(row, logprobs, top) with a row's prompt log-probs, before its first token. A row with
    nothing to compute (no new tokens, no prompt log-probs) ends at once, without the engine. A row whose text
    reaches a stop string ends there (its job is stopped). If the caller is cancelled (a client that went away),
    its rows are stopped."""
    box = loop_mailbox(asyncio.get_running_loop())
    events: asyncio.Queue = asyncio.Queue()
    jobs, start = [], time.perf_counter()
    outputs = [RowOutput(spec, engine.tokenizer, start) for spec in specs]
    for row, spec in enumerate(specs):
        s = spec.sampling
        gen = torch.Generator(device=engine.rt.device)
        gen.manual_seed(s.seed + row if s.seed is not None else secrets.randbits(62))

        def emit(event, row=row):
            box.post(events.put_nowait, (row, event))
        jobs.append(Job(spec.prompt, s.max_new_tokens, s.temperature, s.top_k, s.top_p, gen, spec.top_probs, emit,
                        spec.logprobs, spec.prompt_logprobs, s.presence_penalty, s.frequency_penalty))
    results: list[Result | None] = [None] * len(jobs)
    for row, (job, spec) in enumerate(zip(jobs, specs)):
        if spec.sampling.max_new_tokens == 0 and spec.prompt_logprobs is None:
            results[row] = outputs[row].result("length")
        else:
            engine.submit(job)

    def finish(row: int, reason: str):
        tail = outputs[row].finish()
        if on_token is not None and tail:
            on_token(row, {"id": None, "text": tail, "top": [], "n": len(outputs[row].tokens), "logprob": None,
                           "top_logprobs": None}, time.perf_counter() - start)
        results[row] = outputs[row].result(reason)

    try:
        while any(r is None for r in results):
            row, event = await events.get()
            out = outputs[row]
            if results[row] is not None:  # events of a row that already ended at a stop string
                continue
            if event["kind"] == "error":
                raise GenerationError(event["message"])
            if event["kind"] == "prompt":
                out.prompt_logprobs, out.prompt_top = event["logprobs"], event["top"]
                if on_prompt is not None:
                    on_prompt(row, event["logprobs"], event["top"])
            elif event["kind"] == "done":
                finish(row, "stop" if event["ended"] else "length")
            else:
                piece = out.token(event)
                if on_token is not None:
                    on_token(row, {**event, "text": piece, "n": len(out.tokens)}, time.perf_counter() - start)
                if out.stop.stopped:
                    jobs[row].cancelled.set()
                    finish(row, "stop")
    finally:
        for job in jobs:
            job.cancelled.set()
    return results
