"""The OpenAI-compatible API (https://platform.openai.com/docs/api-reference/completions): `GET /v1/models` and
`POST /v1/completions`, a prompt being the post itself or a whole prompt in the training template."""
from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

import tldr
from common import get_tokenizer
from serving.engine import Engine, run_jobs
from serving.protocol import (MAX_COMPLETIONS, RequestError, build_prompt, pick_engine, read_body, sse, stream_events,
                              take, take_post, take_sampling)
from summaries import decode_summary


def openai_router(engines: dict[str, Engine], cfg) -> APIRouter:
    """The routes over `engines` (the first is the default model); cfg is serve.py's Config."""
    tok = get_tokenizer()
    router = APIRouter()

    @router.get("/v1/models")
    async def v1_models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(e.path.stat().st_mtime),
                                            "owned_by": e.summarizer.stage} for name, e in engines.items()]}

    @router.post("/v1/completions")
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
        prompt_ids = [build_prompt(engine, p, sampling.max_new_tokens)[0] for p in posts]
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

    return router


def as_post(text: str) -> tldr.Post:
    """A /v1/completions prompt: the post itself, or a whole prompt in the training template
    (SUBREDDIT / TITLE / POST / TL;DR:, as in CarperAI's and trl-lib's TL;DR sets), taken apart."""
    if text.startswith("SUBREDDIT:") and text.rstrip().endswith("TL;DR:"):
        try:
            return tldr.parse_prompt(text)
        except ValueError:
            pass
    return tldr.Post(text)
