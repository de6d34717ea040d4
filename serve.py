"""Serve the summarizer: a web page, a JSON + Server-Sent-Events API and an OpenAI-compatible API.

    python serve.py --ckpt-dir checkpoints/small                 # ppo_latest.pt, dpo_latest.pt and best_sft.pt of the folder
    python serve.py --ckpt checkpoints/gpt2/ppo_latest.pt --ckpt checkpoints/gpt2/best_sft.pt --port 8080
    python serve.py --ckpt-dir checkpoints/small --max-batch 1   # one request at a time (no batching)

then open http://127.0.0.1:8000/ or call the API:

    curl -s localhost:8000/api/summarize -H 'content-type: application/json' -d '{"post": "My roommate ..."}'
    curl -sN localhost:8000/api/summarize -H 'content-type: application/json' -d '{"post": "...", "stream": true}'
    python -c "import openai; c = openai.OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='none');
               print(c.chat.completions.create(model='ppo_latest', messages=[{'role': 'user', 'content': 'My roommate ...'}]).choices[0].message.content)"

The server answers at once and loads every checkpoint beside it (`/health` is 503 until they are loaded and
warmed up). A post becomes the prompt exactly as in summarize.py (`summaries.Summarizer`: the checkpoint's own
template and budgets). Generation runs in one worker thread per model, off the event loop, with continuous
batching (`model.BatchDecoder`): a request for a model that is busy joins the rows being decoded at the next
step instead of waiting for them to end, each row with its own sampling settings and seed, so that a row gives
what it would alone; a client that goes away mid-stream has its row stopped.

Endpoints (docs/serving.md): `GET /` (the page), `POST /api/summarize`, `GET /api/models`, `GET /health`,
`GET /api/report`; OpenAI's `GET /v1/models`, `POST /v1/completions` (raw text, token ids and batches, echo and
log-probs; `"template": true` for a post), `POST /v1/chat/completions`; vLLM's `POST /tokenize` and
`POST /detokenize`; `GET /metrics` (Prometheus). Every response carries an X-Request-Id and every request leaves
one access line in the log. Bad input gets a JSON error `{"error": {"message", "type", "param", "code"}}`:
400 (what a client must fix on the OpenAI routes; on the native API, a body that is not UTF-8 JSON or a Host name
not allowed), 404, 413, 415, 422 (the native API's values out of range), 503 while loading; never a traceback.
A request that fails while being decoded ends alone (500), the requests batched with it go on.
"""
from __future__ import annotations

import dataclasses
import gc
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import tldr
from checkpoints import load_checkpoint, resolve_ckpt
from common import UserError, cli_main, compute_init, first_line
from serving.app import create_app
from serving.engine import Engine
from serving.native import load_examples
from serving.protocol import Models
from summaries import DEFAULT_CKPT, DPO_CKPT, FALLBACK_CKPT, SUMMARIZER_STAGES, Summarizer, summarizer_dir


@dataclass
class Config:
    ckpt_dir: str = "checkpoints"         # where bare checkpoint names resolve, and the default models' folder
    ckpt: list[str] = field(default_factory=list)  # checkpoints to serve (ppo, dpo or sft); none: ppo_latest.pt, dpo_latest.pt and best_sft.pt of --ckpt-dir
    host: str = "127.0.0.1"               # interface to listen on (0.0.0.0: every interface)
    allowed_hosts: list[str] = field(default_factory=list)  # Host names served (*: any, *.example.com: its subdomains); none: loopback names when --host is loopback, else any
    port: int = 8000                      # TCP port
    device: str = "auto"                  # auto | cuda | cpu | mps
    dtype: str = "auto"                   # auto (bf16 on Ampere+, fp16 on older GPUs, fp32 on CPU) | float32 | bfloat16 | float16
    threads: int = 0                      # torch CPU threads (0: torch's default, one per core; fewer leaves cores to the web server and clients)
    max_post_chars: int = 20_000          # longest post accepted, in characters (longer: 413)
    max_batch: int = 32                   # most requests decoded together in one batch (1: one at a time)
    batch_wait_ms: float = 0.0            # when idle, how long a request waits for others to share its first step (0: it starts at once; later ones join the next step)
    examples: str = ""                    # TL;DR posts the page offers as examples (a --data of sft.py; test split); "": posts of the generated world
    num_examples: int = 6                 # how many example posts
    run_dir: str = ""                     # run folder whose report.md and *.png the page shows ("": runs/<name of --ckpt-dir>)
    log_level: str = "warning"            # uvicorn's log level: critical | error | warning | info | debug


# -----------------------------------------------------------------------------
# loading

def model_names(paths: list[Path]) -> list[str]:
    """A short name per checkpoint: its file stem, or folder/stem where two stems clash."""
    stems = [p.stem for p in paths]
    return [f"{p.parent.name}/{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]


def checkpoint_paths(cfg: Config) -> list[Path]:
    """--ckpt as given (each must exist), or the folder's PPO, DPO and SFT checkpoints (those that exist)."""
    if cfg.ckpt:
        return [resolve_ckpt(c, cfg.ckpt_dir) for c in cfg.ckpt]
    found = [resolve_ckpt(n, cfg.ckpt_dir) for n in (DEFAULT_CKPT, DPO_CKPT, FALLBACK_CKPT)]
    found = [p for p in found if p.is_file()]
    if not found:
        raise UserError(f"nothing to serve: neither {resolve_ckpt(DEFAULT_CKPT, cfg.ckpt_dir)} nor "
                        f"{resolve_ckpt(FALLBACK_CKPT, cfg.ckpt_dir)} exists; train one (make demo) or pass --ckpt")
    return found


def load_engines(cfg: Config, warm_up: bool = False) -> dict[str, Engine]:
    """Every checkpoint loaded once, each with its decoding thread; the first is the default model. With
    warm_up, each decodes a few tokens before it is returned, so that no client waits for first-call costs."""
    check_config(cfg)
    rt = compute_init(0, cfg.device, cfg.dtype)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    paths = checkpoint_paths(cfg)
    loaded = [(name, Summarizer.load(p, rt.device), p)
              for name, p in zip(model_names(paths), paths)]
    engines = {name: Engine(name, summarizer, path, rt, cfg.max_batch, cfg.batch_wait_ms / 1000)
               for name, summarizer, path in loaded}
    if warm_up:
        for engine in engines.values():
            engine.warm_up(engine.summarizer.prompt(WARM_UP_POST, engine.budget)[0])
    return engines


WARM_UP_POST = tldr.Post("A short post that warms the model up before the first request.", "warm-up", "test")


def check_config(cfg: Config):
    if cfg.max_batch < 1 or cfg.batch_wait_ms < 0 or cfg.max_post_chars < 1 or cfg.threads < 0:
        raise UserError(f"--max-batch and --max-post-chars must be >= 1, --batch-wait-ms and --threads >= 0, got "
                        f"{cfg.max_batch}, {cfg.max_post_chars}, {cfg.batch_wait_ms} and {cfg.threads}")
    if not 0 <= cfg.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {cfg.port}")
    for pattern in cfg.allowed_hosts:
        if not pattern or ("*" in pattern and pattern != "*" and not (pattern.startswith("*.") and "*" not in pattern[1:])):
            raise UserError(f"--allowed-hosts takes host names, * or *.domain, not {pattern!r}")


def check_port_free(host: str, port: int):
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def wait_until_serving(url: str, proc, seconds: float) -> bool:
    """Whether the server started as the process `proc` (serve.py, or another OpenAI-compatible server) answers
    `url`/health with 200 within `seconds`: False when the process ends first or the time runs out. For whoever
    starts one in a process of its own (bench.py, the tests); it polls every 0.2 s (503 while loading)."""
    import httpx
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def main(cfg: Config):
    import uvicorn
    check_config(cfg)
    check_port_free(cfg.host, cfg.port)
    # everything that can fail on the user's input without loading a model comes before the server starts
    examples = load_examples(cfg.examples, cfg.num_examples)
    if not cfg.ckpt:  # after `make demo` the models are in checkpoints/small/, not checkpoints/
        cfg = dataclasses.replace(cfg, ckpt_dir=summarizer_dir(cfg.ckpt_dir, lambda text: print(text, file=sys.stderr, flush=True)))
    for path in checkpoint_paths(cfg):  # a file that is not a summarizer checkpoint: found here, not once serving
        load_checkpoint(path, SUMMARIZER_STAGES, mmap=True)
    # the server answers at once (/health: 503) and the models load beside it; a checkpoint that cannot be
    # served stops the server and the command exits 2 with its one line
    models, failure = Models(), []
    server = uvicorn.Server(uvicorn.Config(create_app(models, cfg, examples), host=cfg.host, port=cfg.port,
                                           log_level=cfg.log_level))

    def load():
        try:
            models.set(load_engines(cfg, warm_up=True))
        except Exception as e:
            failure.append(e)
            server.should_exit = True
            return
        # what start-up made (modules, weights, the app) lives as long as the server: out of the collector's
        # sight, a full collection - triggered by the many small objects of streamed chunks - stays short
        gc.freeze()
        for name, e in models.engines.items():
            print(f"serving {name} ({e.summarizer.stage}, step {e.summarizer.step}) from {e.path}", flush=True)
        print(f"open http://{cfg.host}:{cfg.port}/  (API: /api/summarize, /v1/completions, /v1/chat/completions; "
              f"docs: /docs)", flush=True)

    loader = threading.Thread(target=load, name="load-models", daemon=True)
    loader.start()
    try:
        server.run()
    finally:
        loader.join()
        models.close()
    if failure:
        e = failure[0]
        raise e if isinstance(e, UserError) else UserError(f"cannot load the models: {type(e).__name__}: {first_line(e)}")


if __name__ == "__main__":
    cli_main(main, Config)
