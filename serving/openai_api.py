"""The OpenAI-compatible API (https://platform.openai.com/docs/api-reference): `GET /v1/models`,
`POST /v1/completions` (the legacy completions: raw text by default, echo and log-probs as
lm-evaluation-harness's `local-completions` model reads them), `POST /v1/chat/completions` (the last user message
is the post, the reply its summary), and vLLM's `POST /tokenize` and `POST /detokenize`.

A /v1/completions prompt is continued as it is (raw text, a list of token ids, or a batch of either), as OpenAI
clients expect; `"template": true` makes each prompt a post, put in the checkpoint's TL;DR template and cut to
its prompt budget, as /api/summarize and the chat route do. Refusals on these routes are 400s in OpenAI's error
shape (the native API keeps its 422s).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

import tldr
from common import get_tokenizer
from model import TOKENIZER_VOCAB
from serving.engine import Engine, Result, RowSpec, decode_text, run_jobs, token_offsets
from serving.protocol import (MAX_PROMPTS, Models, RequestError, build_prompt, note_results, read_model_request,
                              refuse_unsupported, sse, stream_events, take, take_n, take_post, take_sampling, take_stop,
                              take_stream)

OPENAI_ROUTES = ("/v1/", "/tokenize", "/detokenize")  # paths whose refusals are 400s (OpenAI's convention)
MAX_LOGPROBS = 20  # most top log-probs per token (OpenAI's chat API allows 20, its legacy completions 5)

# fields of OpenAI's API this server knows and does not implement: a 400 unless set to their no-op value
_unset = lambda v: v is None or v in ({}, [], "")  # noqa: E731
COMPLETION_UNSUPPORTED = {"suffix": _unset, "logit_bias": _unset, "best_of": lambda v: v in (None, 1)}
CHAT_UNSUPPORTED = {"logit_bias": _unset, "tools": _unset, "functions": _unset, "audio": _unset,
                    "tool_choice": lambda v: v in (None, "none"), "function_call": lambda v: v in (None, "none"),
                    "response_format": lambda v: v is None or v == {"type": "text"},
                    "modalities": lambda v: v in (None, ["text"]), "prediction": _unset}


def is_openai_route(path: str) -> bool:
    return path.startswith(OPENAI_ROUTES)


def openai_router(models: Models, cfg) -> APIRouter:
    """The routes over `models`; cfg is serve.py's Config."""
    tok = get_tokenizer()
    router = APIRouter()

    def model_object(name: str, engine: Engine) -> dict:
        return {"id": name, "object": "model", "created": int(engine.path.stat().st_mtime),
                "owned_by": engine.summarizer.stage, "max_model_len": engine.block_size}

    @router.get("/v1/models")
    async def v1_models():
        models.check_ready()
        return {"object": "list", "data": [model_object(name, e) for name, e in models.engines.items()]}

    @router.get("/v1/models/{name:path}")
    async def v1_model(name: str):
        return model_object(name, models.pick(name))

    # --- /v1/completions ----------------------------------------------------------------------------------

    @router.post("/v1/completions")
    async def v1_completions(request: Request):
        body, engine = await read_model_request(request, models, cfg.max_post_chars)
        refuse_unsupported(body, COMPLETION_UNSUPPORTED)
        template = take(body, "template", bool, False, optional=True) or False
        echo = take(body, "echo", bool, False, optional=True) or False
        logprobs = take(body, "logprobs", int, None, optional=True)
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise RequestError(422, f"logprobs must be in [0, {MAX_LOGPROBS}], got {logprobs}", "logprobs")
        sampling = take_sampling(body, engine, 1.0, "max_tokens", capped=True)
        if sampling.max_new_tokens == 0 and not echo:
            raise RequestError(422, "max_tokens must be >= 1 (0 only with echo: the prompt's log-probs alone)",
                               "max_tokens")
        prompts = [completion_prompt(engine, p, template, sampling.max_new_tokens, cfg.max_post_chars, tok)
                   for p in take_prompts(body.get("prompt"))]
        n, stop = take_n(body, len(prompts)), take_stop(body)
        stream, include_usage = take_stream(body)
        specs = []
        for ids in prompts:
            budget = min(sampling.max_new_tokens, engine.budget, engine.block_size - len(ids))
            specs += [RowSpec(ids, dataclasses.replace(sampling, max_new_tokens=budget), strip=False, stop=stop,
                              logprobs=logprobs, prompt_logprobs=logprobs if echo else None)] * n
        head = {"id": f"cmpl-{request.state.request_id}", "object": "text_completion", "created": int(time.time()),
                "model": engine.name}

        def echoed(i: int) -> list[int]:
            return specs[i].prompt if echo else []

        if not stream:
            results = await run_jobs(engine, specs)
            note_results(request, engine, results)
            choices = []
            for i, r in enumerate(results):
                prompt_text = decode_text(specs[i].prompt, tok)
                lp = None
                if logprobs is not None:
                    ids = echoed(i) + r.tokens
                    lp = legacy_logprobs(ids, (r.prompt_logprobs if echo else []) + r.logprobs,
                                         (r.prompt_top if echo else []) + r.top_logprobs, tok,
                                         0 if echo else len(prompt_text))
                choices.append({"index": i, "text": (prompt_text if echo else "") + r.text, "logprobs": lp,
                                "finish_reason": r.finish_reason})
            return {**head, "choices": choices, "usage": usage(specs, results, n)}

        async def produce(send):
            extra = {"usage": None} if include_usage else {}
            offsets = [len(decode_text(s.prompt, tok)) if not echo else 0 for s in specs]

            def on_prompt(i: int, prompt_lp: list | None, prompt_top: list | None):
                text = decode_text(specs[i].prompt, tok)
                lp = legacy_logprobs(specs[i].prompt, prompt_lp, prompt_top, tok) if prompt_lp is not None else None
                send({**head, "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": None}], **extra})
                offsets[i] = len(text)

            def on_token(i, event, elapsed):
                if event["id"] is None and not event["text"]:
                    return
                lp = None
                if logprobs is not None and event["id"] is not None:
                    lp = legacy_logprobs([event["id"]], [event["logprob"]], [event["top_logprobs"]], tok, offsets[i])
                offsets[i] += len(event["text"])
                send({**head, "choices": [{"index": i, "text": event["text"], "logprobs": lp, "finish_reason": None}],
                      **extra})

            # the echoed prompt goes first: its text at once, or with its log-probs when the engine has them
            if echo and logprobs is None:
                for i in range(len(specs)):
                    on_prompt(i, None, None)
            results = await run_jobs(engine, specs, on_token, on_prompt if echo and logprobs is not None else None)
            end_stream(send, request, engine, {**head, **extra}, specs, results, n, include_usage, {"text": ""})

        return streaming(produce)

    # --- /v1/chat/completions -----------------------------------------------------------------------------

    @router.post("/v1/chat/completions")
    async def v1_chat_completions(request: Request):
        body, engine = await read_model_request(request, models, cfg.max_post_chars)
        refuse_unsupported(body, CHAT_UNSUPPORTED)
        post = chat_post(body, cfg.max_post_chars)
        tokens_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        sampling = take_sampling(body, engine, 1.0, tokens_field, capped=True)
        if sampling.max_new_tokens == 0:
            raise RequestError(422, f"{tokens_field} must be >= 1", tokens_field)
        sampling = dataclasses.replace(sampling, max_new_tokens=min(sampling.max_new_tokens, engine.budget))
        want_logprobs = take(body, "logprobs", bool, False, optional=True) or False
        top = take(body, "top_logprobs", int, None, optional=True)
        if top is not None and not (want_logprobs and 0 <= top <= MAX_LOGPROBS):
            raise RequestError(422, f"top_logprobs must be in [0, {MAX_LOGPROBS}] and needs logprobs: true", "top_logprobs")
        n, stop = take_n(body, 1), take_stop(body)
        stream, include_usage = take_stream(body)
        prompt, _ = build_prompt(engine, post, sampling.max_new_tokens)
        specs = [RowSpec(prompt, sampling, strip=True, stop=stop, logprobs=(top or 0) if want_logprobs else None)] * n
        head = {"id": f"chatcmpl-{request.state.request_id}", "created": int(time.time()), "model": engine.name}

        if not stream:
            results = await run_jobs(engine, specs)
            note_results(request, engine, results)
            return {**head, "object": "chat.completion",
                    "choices": [{"index": i, "message": {"role": "assistant", "content": r.text},
                                 "logprobs": chat_logprobs(r.tokens, r.logprobs, r.top_logprobs, tok) if want_logprobs else None,
                                 "finish_reason": r.finish_reason} for i, r in enumerate(results)],
                    "usage": usage(specs, results, n)}

        chunk = {**head, "object": "chat.completion.chunk", **({"usage": None} if include_usage else {})}

        async def produce(send):
            for i in range(n):
                send({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                            "finish_reason": None}]})

            def on_token(i, event, elapsed):
                if not event["text"] and not (want_logprobs and event["id"] is not None):
                    return
                lp = None
                if want_logprobs and event["id"] is not None:
                    lp = chat_logprobs([event["id"]], [event["logprob"]], [event["top_logprobs"]], tok)
                send({**chunk, "choices": [{"index": i, "delta": {"content": event["text"]}, "logprobs": lp,
                                            "finish_reason": None}]})

            results = await run_jobs(engine, specs, on_token)
            end_stream(send, request, engine, chunk, specs, results, n, include_usage, {"delta": {}})

        return streaming(produce)

    # --- tokenizer routes (vLLM's) ------------------------------------------------------------------------

    @router.post("/tokenize")
    async def tokenize(request: Request):
        body, engine = await read_model_request(request, models, cfg.max_post_chars)
        if "messages" in body:  # the prompt a chat request becomes
            ids, _ = build_prompt(engine, chat_post(body, cfg.max_post_chars), engine.budget)
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise RequestError(422, "prompt must be a string (or give messages, as to /v1/chat/completions)", "prompt")
            ids = tok.encode_ordinary(prompt)
        return {"count": len(ids), "max_model_len": engine.block_size, "tokens": ids,
                **({"token_strs": [token_text(t, tok) for t in ids]} if body.get("return_token_strs") else {})}

    @router.post("/detokenize")
    async def detokenize(request: Request):
        body, _ = await read_model_request(request, models, cfg.max_post_chars)
        ids = body.get("tokens")
        if not (isinstance(ids, list) and all(is_token(t) for t in ids)):
            raise RequestError(422, f"tokens must be a list of token ids in [0, {TOKENIZER_VOCAB})", "tokens")
        return {"prompt": decode_text(ids, tok)}

    return router


# -----------------------------------------------------------------------------
# requests

def is_token(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and 0 <= t < TOKENIZER_VOCAB


def take_prompts(prompt: Any) -> list[str | list[int]]:
    """OpenAI's legacy `prompt`: a string, a list of token ids, or a batch (a list of strings or of token-id
    lists), as a list of prompts."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(is_token(t) for t in prompt)):
        return [prompt]
    if isinstance(prompt, list) and 0 < len(prompt) <= MAX_PROMPTS and all(
            isinstance(p, str) or (isinstance(p, list) and p and all(is_token(t) for t in p)) for p in prompt):
        return prompt
    raise RequestError(422, f"prompt must be a string, a list of token ids in [0, {TOKENIZER_VOCAB}), or a list of up "
                            f"to {MAX_PROMPTS} of either", "prompt")


def completion_prompt(engine: Engine, prompt: str | list[int], template: bool, max_tokens: int, max_chars: int,
                      tok) -> list[int]:
    """The tokens a /v1/completions prompt is continued from: raw (its text's tokens, or the ids as given), or
    with `template`, the post in the checkpoint's template (a prompt already in the template is taken apart)."""
    if template:
        text = prompt if isinstance(prompt, str) else decode_text(prompt, tok)
        return build_prompt(engine, as_post(take_post(text, max_chars, "prompt")), min(max(max_tokens, 1), engine.budget))[0]
    if isinstance(prompt, str):
        if len(prompt) > max_chars:
            raise RequestError(413, f"prompt is {len(prompt)} characters, over this server's limit of {max_chars}", "prompt")
        prompt = tok.encode_ordinary(prompt)
    if not prompt:
        raise RequestError(422, "prompt is empty: give the text to continue", "prompt")
    if len(prompt) + (1 if max_tokens else 0) > engine.block_size:
        raise RequestError(422, f"prompt is {len(prompt)} tokens: with at least {1 if max_tokens else 0} new token(s) "
                                f"it does not fit model {engine.name}'s context of {engine.block_size}", "prompt",
                           "context_length_exceeded")
    return list(prompt)


def as_post(text: str) -> tldr.Post:
    """A post given to the template: the post itself, or a whole prompt in the training template
    (SUBREDDIT / TITLE / POST / TL;DR:, as in CarperAI's and trl-lib's TL;DR sets), taken apart."""
    if text.startswith("SUBREDDIT:") and text.rstrip().endswith("TL;DR:"):
        try:
            return tldr.parse_prompt(text)
        except ValueError:
            pass
    return tldr.Post(text)


def message_text(content: Any) -> str | None:
    """A chat message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        parts = [p.get("text") for p in content if p.get("type") == "text"]
        if all(isinstance(p, str) for p in parts) and len(parts) == len(content):
            return "\n".join(parts)
    return None


def chat_post(body: dict, max_chars: int) -> tldr.Post:
    """The post of a chat request: its last user message, with `title` and `subreddit` from the request's extra
    fields (or a whole prompt in the template, taken apart)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise RequestError(422, "messages must be a non-empty list of {role, content} objects", "messages")
    users = [m for m in messages if m.get("role") == "user"]
    if not users:
        raise RequestError(422, "messages must hold a user message: the post to summarize", "messages")
    text = message_text(users[-1].get("content"))
    if text is None:
        raise RequestError(422, "the user message's content must be a string or a list of text parts", "messages")
    post = as_post(take_post(text, max_chars, "messages"))
    title = take(body, "title", str, "", optional=True) or ""
    subreddit = take(body, "subreddit", str, "", optional=True) or ""
    if title or subreddit:
        post = tldr.Post(post.post, title.strip() or post.title, subreddit.strip().removeprefix("r/") or post.subreddit)
    return post


# -----------------------------------------------------------------------------
# responses

def streaming(produce) -> StreamingResponse:
    async def with_done():
        async for chunk in stream_events(produce):
            yield chunk
        yield sse("[DONE]")

    return StreamingResponse(with_done(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def end_stream(send, request: Request, engine: Engine, chunk: dict, specs: list[RowSpec], results: list[Result],
               n: int, include_usage: bool, empty: dict):
    """A stream's last chunks: each choice's finish_reason (with an `empty` text or delta), then the usage when
    asked for."""
    note_results(request, engine, results)
    for i, r in enumerate(results):
        send({**chunk, "choices": [{"index": i, **empty, "logprobs": None, "finish_reason": r.finish_reason}]})
    if include_usage:
        send({**chunk, "choices": [], "usage": usage(specs, results, n)})


def usage(specs: list[RowSpec], results: list[Result], n: int) -> dict:
    """Prompt tokens counted once per prompt (not per choice), as OpenAI counts them."""
    prompt = sum(len(s.prompt) for s in specs[::n])
    completion = sum(r.generated for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def token_text(token: int, tok) -> str:
    return tok.decode_single_token_bytes(token).decode("utf-8", errors="replace")


def legacy_logprobs(ids: list[int], logprobs: list, tops: list, tok, start: int = 0) -> dict:
    """The legacy completions' logprobs object: tokens, token_logprobs, top_logprobs ({token: logprob}, None for
    a prompt's first token) and text_offset (each token's first character in the choice's text, offset by the
    prompt's length when it is not echoed, as OpenAI reports it)."""
    return {"tokens": [token_text(t, tok) for t in ids], "token_logprobs": list(logprobs),
            "top_logprobs": [None if top is None else {token_text(t, tok): lp for t, lp in top} for top in tops],
            "text_offset": token_offsets(ids, tok, start)}


def chat_logprobs(ids: list[int], logprobs: list[float], tops: list, tok) -> dict:
    """The chat API's logprobs object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def entry(t: int, lp: float) -> dict:
        return {"token": token_text(t, tok), "logprob": lp, "bytes": list(tok.decode_single_token_bytes(t))}
    return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]}
                        for t, lp, top in zip(ids, logprobs, tops)]}
