"""The native API and the page: `GET /`, `GET /health`, `GET /api/models`, `POST /api/summarize` (JSON, or
Server-Sent Events with the likeliest tokens), `GET /api/examples`, `GET /api/report` and its plots."""
from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

import synthetic
import tldr
from common import UserError, first_line, get_tokenizer
from serving.engine import Engine, Result, RowSpec, run_jobs
from serving.protocol import (Models, RequestError, build_prompt, note_results, read_model_request, stream_events, take,
                              take_post, take_sampling)

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_TOP_PROBS = 20


def native_router(models: Models, cfg, example_posts: list[tldr.Post] | None = None) -> APIRouter:
    """The routes over `models`; cfg is serve.py's Config; the page's example posts are `example_posts`, or
    load_examples of cfg's when None."""
    tok = get_tokenizer()
    if example_posts is None:
        example_posts = load_examples(cfg.examples, cfg.num_examples)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else Path("runs") / Path(cfg.ckpt_dir).name
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html")

    @router.get("/health")
    async def health():
        if not models.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", "models": {name: {**e.stats, "running": e.running, "waiting": e.waiting}
                                           for name, e in models.engines.items()}}

    @router.get("/api/models")
    async def model_cards():
        models.check_ready()
        return {"models": [model_card(name, e, i == 0, cfg.ckpt_dir) for i, (name, e) in enumerate(models.engines.items())]}

    @router.post("/api/summarize")
    async def summarize(request: Request):
        body, engine = await read_model_request(request, models, cfg.max_post_chars)
        text = take_post(body.get("post"), cfg.max_post_chars)
        post = tldr.Post(text, take(body, "title", str, "").strip(),
                         take(body, "subreddit", str, "").strip().removeprefix("r/"))
        sampling = take_sampling(body, engine, 0.0, "max_new_tokens")
        top_probs = take(body, "top_probs", int, 0)
        if not 0 <= top_probs <= MAX_TOP_PROBS:
            raise RequestError(422, f"top_probs must be in [0, {MAX_TOP_PROBS}], got {top_probs}", "top_probs")
        stream = take(body, "stream", bool, False)
        prompt, truncated = build_prompt(engine, post, sampling.max_new_tokens)

        def final(result: Result) -> dict:
            note_results(request, engine, [result])
            return {"summary": result.text, "model": engine.name,
                    "tokens": len(result.tokens), "seconds": round(result.seconds, 4),
                    "tokens_per_s": round(len(result.tokens) / max(result.seconds, 1e-9), 2),
                    "truncated": truncated, "finish_reason": result.finish_reason}

        if not stream:
            return final((await run_jobs(engine, [RowSpec(prompt, sampling)]))[0])

        async def produce(send):
            def on_token(row, event, elapsed):
                if event["id"] is None and not event["text"]:
                    return
                send({"type": "token", "text": event["text"], "id": event["id"], "index": event["n"] - 1,
                      "top": [{"token": tok.decode([i]), "id": i, "prob": round(p, 5)} for i, p in event["top"]],
                      "tokens_per_s": round(event["n"] / max(elapsed, 1e-9), 2)})
            result = (await run_jobs(engine, [RowSpec(prompt, sampling, top_probs=top_probs)], on_token))[0]
            send({"type": "done", **final(result)})

        return StreamingResponse(stream_events(produce), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.get("/api/examples")
    async def examples():
        return {"examples": [{"subreddit": p.subreddit, "title": p.title, "post": p.post} for p in example_posts]}

    # paths are shown relative to the run folder (its name only): a client learns nothing of this machine's layout
    @router.get("/api/report")
    async def report():
        md = run_dir / "report.md"
        return {"run": run_dir.name, "markdown": md.read_text(encoding="utf-8") if md.is_file() else None,
                "plots": [f"/api/report/plots/{p.name}" for p in sorted(run_dir.glob("*.png"))]}

    @router.get("/api/report/plots/{name}")
    async def plot(name: str):
        path = run_dir / name
        if not re.fullmatch(r"[\w.-]+\.png", name) or not path.is_file():
            raise RequestError(404, f"no plot {name!r} in the run {run_dir.name!r}")
        return FileResponse(path, media_type="image/png")

    return router


def load_examples(data: str, num: int) -> list[tldr.Post]:
    """Posts for the page's example list: the test split of a TL;DR source, or posts of the generated world
    (what the demo's models were trained on). A source that cannot be read is one UserError."""
    if data:
        try:
            return [e.post for e in tldr.load_sft(data, "test")[:num]]
        except UserError as e:
            raise UserError(f"--examples {data}: {e}") from None
        except (OSError, ValueError, RecursionError) as e:  # whatever tldr does not name itself
            raise UserError(f"--examples {data}: cannot read its test split ({type(e).__name__}: {first_line(e)})") from None
    world = synthetic.make_world(seed=2024, num_posts=max(10, 10 * num), valid_frac=0.1, test_frac=0.5)
    return [tldr.Post(p.post, p.title, p.subreddit) for p in world["test"][:num]]


def shown_path(path: Path, ckpt_dir: str) -> str:
    """A checkpoint's path as a client sees it: relative to --ckpt-dir when inside it, else its file name."""
    try:
        return path.resolve().relative_to(Path(ckpt_dir).resolve()).as_posix()
    except ValueError:
        return path.name


def model_card(name: str, engine: Engine, default: bool, ckpt_dir: str) -> dict:
    s = engine.summarizer
    return {"name": name, "stage": s.stage, "step": s.step, "metrics": s.metrics, "path": shown_path(engine.path, ckpt_dir),
            "default": default, "params": s.model.num_params(non_embedding=False),
            "max_new_tokens": engine.budget, "max_prompt_tokens": s.info["max_prompt_tokens"],
            "template": s.info["template"]}
