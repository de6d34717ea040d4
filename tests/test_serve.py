"""serve.py: every endpoint in-process (FastAPI's TestClient), streaming and not, and every bad input; greedy
output equal to summarize.py's; a real uvicorn server on a loopback port driven by the official `openai`
client, 16 concurrent streams and a client that goes away mid-stream; a real browser (Debian's chromium)
pressing the page's button."""
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

import serve
import summarize
import tldr
import serving.app as serving_app
import serving.engine as serving_engine
from checkpoints import load_checkpoint, save_checkpoint
from common import UserError, cli_main, compute_init, config_from, get_tokenizer
from conftest import ROOT
from model import EOS_ID, GPT, BatchDecoder, GPTConfig, ScoreModel
from serving.app import create_app
from serving.engine import GENERATION_FAILED, Engine, GenerationError, RowSpec, Sampling, run_jobs
from test_summarize import INFO, POST, _greedy, _lm
from summaries import Summarizer, generate_summaries

LONG_INFO = tldr.template_info(max_prompt_tokens=48, max_summary_tokens=900)  # a generation long enough to interrupt
def _long_lm() -> GPT:
    """Untrained and unscaled: its greedy text depends on the whole prompt (the peaked _lm models settle
    into the same loop for most posts)."""
    torch.manual_seed(3)
    return GPT(GPTConfig(block_size=1024, n_layer=1, n_head=2, n_embd=32)).eval()


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    """ppo_latest.pt and best_sft.pt of two different tiny models, a reward model, and long.pt with a
    900-token summary budget."""
    out = tmp_path_factory.mktemp("serve_ckpts")
    save_checkpoint(out / "ppo_latest.pt", stage="ppo", model=_lm(1), tldr=INFO, step=12, metrics={"score": 0.5})
    save_checkpoint(out / "best_sft.pt", stage="sft", model=_lm(2), tldr=INFO, step=100)
    save_checkpoint(out / "rm.pt", stage="reward_model", model=ScoreModel(_lm(2).config), tldr=INFO)
    save_checkpoint(out / "long.pt", stage="sft", model=_long_lm(), tldr=LONG_INFO)
    return out


@pytest.fixture(scope="module")
def client(ckpt_dir):
    cfg = config_from(serve.Config, None, None, ckpt_dir=str(ckpt_dir), device="cpu", run_dir=str(ckpt_dir / "run"))
    run = ckpt_dir / "run"
    run.mkdir()
    (run / "report.md").write_text("# Report\n\n| metric | value |\n|---|---|\n| gold | 0.4 |\n")
    (run / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    # a loopback Host (TestClient's default, "testserver", is not one the server accepts on 127.0.0.1)
    with TestClient(create_app(serve.load_engines(cfg), cfg), base_url="http://localhost") as c:
        yield c


def _raw_continuation(model: GPT, post: tldr.Post) -> str:
    """Independent reference for a raw completion of the rendered training prompt: the plain KV-cache generate,
    decoded up to EOS without stripping anything."""
    ids = get_tokenizer().encode_ordinary(tldr.render_prompt(post))
    tokens, _, mask = model.generate(torch.tensor([ids]), max_new_tokens=INFO["max_summary_tokens"], temperature=0.0)
    new = tokens[0][mask[0].bool()].tolist()
    return get_tokenizer().decode(new[:new.index(EOS_ID)] if EOS_ID in new else new)


def _cli_summary(ckpt_dir, ckpt: str, **overrides) -> str:
    """summarize.py's own output for POST (its main, as the CLI runs it)."""
    return summarize.main(config_from(summarize.Config, None, None, post=POST.post, title=POST.title,
                                      subreddit=POST.subreddit, ckpt=ckpt, ckpt_dir=str(ckpt_dir), device="cpu",
                                      **overrides))[0]


def _sse(lines) -> list:
    return [json.loads(line[len("data: "):]) if line != "data: [DONE]" else "[DONE]"
            for line in lines if line.startswith("data: ")]


def test_models_health_report_and_page(client, ckpt_dir):
    models = client.get("/api/models").json()["models"]
    assert [(m["name"], m["stage"], m["step"], m["default"]) for m in models] == \
        [("ppo_latest", "ppo", 12, True), ("best_sft", "sft", 100, False)]
    assert models[0]["metrics"] == {"score": 0.5} and models[0]["max_new_tokens"] == INFO["max_summary_tokens"]
    assert models[0]["template"] == INFO["template"]
    assert [m["path"] for m in models] == ["ppo_latest.pt", "best_sft.pt"]  # relative to --ckpt-dir, no absolute path
    health = client.get("/health").json()
    assert health["status"] == "ok" and set(health["models"]) == {"ppo_latest", "best_sft"}
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["ppo_latest", "best_sft"]
    page = client.get("/")
    assert page.status_code == 200 and 'id="summarize"' in page.text
    assert client.get("/static/app.js").status_code == 200
    report = client.get("/api/report").json()
    assert "| gold | 0.4 |" in report["markdown"] and report["plots"] == ["/api/report/plots/loss.png"]
    assert report["run"] == "run"
    assert client.get("/api/report/plots/loss.png").content.startswith(b"\x89PNG")
    missing = client.get("/api/report/plots/..%2Frm.pt")
    assert missing.status_code == 404 and str(ckpt_dir) not in missing.text
    examples = client.get("/api/examples").json()["examples"]
    assert len(examples) == 6 and all(e["post"] and e["title"] for e in examples)


def test_greedy_summary_equals_summarize_cli(client, ckpt_dir):
    """The same post and checkpoint: /api/summarize, its stream, /v1/completions and summarize.py agree, for
    both models; and an independent reference (the plain KV-cache generate on the training prompt) too."""
    for name, model in (("ppo_latest", _lm(1)), ("best_sft", _lm(2))):
        expected = _cli_summary(ckpt_dir, f"{name}.pt")
        assert expected == _greedy(model, POST) and expected
        body = {"post": POST.post, "title": POST.title, "subreddit": "r/" + POST.subreddit, "model": name}
        got = client.post("/api/summarize", json=body).json()
        assert got["summary"] == expected and got["model"] == name and not got["truncated"]
        assert (got["finish_reason"] == "length") == (got["tokens"] == INFO["max_summary_tokens"])
        with client.stream("POST", "/api/summarize", json={**body, "stream": True, "top_probs": 4}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = _sse(r.iter_lines())
        tokens, done = events[:-1], events[-1]
        assert done["type"] == "done" and done["summary"] == expected
        assert "".join(e["text"] for e in tokens) == expected
        for e in tokens:  # greedy: the chosen token is the likeliest, and the four are in order
            assert len(e["top"]) == 4 and e["top"][0]["id"] == e["id"] and e["tokens_per_s"] > 0
            probs = [t["prob"] for t in e["top"]]
            assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
        prompt = tldr.render_prompt(POST)  # the whole training prompt, continued as raw text
        v1 = client.post("/v1/completions", json={"model": name, "prompt": prompt, "temperature": 0}).json()
        assert v1["object"] == "text_completion" and v1["choices"][0]["text"] == _raw_continuation(model, POST)
        assert v1["choices"][0]["text"].strip() == expected and v1["usage"]["completion_tokens"] == got["tokens"]
        # the post with "template": the checkpoint's own prompt, as /api/summarize builds it
        templated = client.post("/v1/completions", json={"model": name, "prompt": POST.post, "title": POST.title,
                                                         "temperature": 0, "template": True}).json()
        assert templated["choices"][0]["text"].strip() == _greedy(model, tldr.Post(POST.post))


def test_seeded_sampling_equals_summarize_cli(client, ckpt_dir):
    """A seeded sampled request draws what summarize.py --seed draws, alone or in a batch with others."""
    expected = _cli_summary(ckpt_dir, "ppo_latest.pt", temperature=0.9, top_k=40, seed=7)
    body = {"post": POST.post, "title": POST.title, "subreddit": POST.subreddit, "temperature": 0.9, "top_k": 40, "seed": 7}
    assert client.post("/api/summarize", json=body).json()["summary"] == expected
    n3 = client.post("/v1/completions", json={"model": "ppo_latest", "prompt": tldr.render_prompt(POST), "temperature": 0.9,
                                              "top_k": 40, "seed": 7, "n": 3}).json()["choices"]
    assert n3[0]["text"].strip() == expected and len(n3) == 3 and [c["index"] for c in n3] == [0, 1, 2]


def test_openai_stream_chunks(client):
    with client.stream("POST", "/v1/completions", json={"model": "best_sft", "prompt": POST.post, "temperature": 0,
                                                         "max_tokens": 5, "stream": True}) as r:
        events = _sse(r.iter_lines())
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(e["choices"][0]["text"] for e in events[:-1])
    whole = client.post("/v1/completions", json={"model": "best_sft", "prompt": POST.post, "temperature": 0,
                                                 "max_tokens": 5}).json()["choices"][0]
    assert text == whole["text"] and whole["finish_reason"] == events[-2]["choices"][0]["finish_reason"]


@pytest.mark.parametrize("body, status, message", [
    ({"post": ""}, 422, "post is empty"),
    ({"post": " \n\t "}, 422, "post is empty"),
    ({"title": "no post"}, 422, "post must be a string"),
    ({"post": "x" * 20_001}, 413, "over this server's limit of 20000"),
    ({"post": "hi", "model": "gpt5"}, 404, "unknown model"),
    ({"post": "hi", "temperature": -0.1}, 422, "temperature must be >= 0"),
    ({"post": "hi", "top_p": 0}, 422, "top_p must be in (0, 1]"),
    ({"post": "hi", "top_p": 1.5}, 422, "top_p must be in (0, 1]"),
    ({"post": "hi", "top_k": -1}, 422, "top_k must be >= 0"),
    ({"post": "hi", "max_new_tokens": 0}, 422, "max_new_tokens must be in [1, 10]"),
    ({"post": "hi", "max_new_tokens": 11}, 422, "max_new_tokens must be in [1, 10]"),
    ({"post": "hi", "top_probs": 21}, 422, "top_probs must be in [0, 20]"),
    ({"post": "hi", "top_probs": -1}, 422, "top_probs must be in [0, 20]"),
    ({"post": "hi", "temperature": "hot"}, 422, "temperature must be a number"),
    ({"post": "hi", "top_k": True}, 422, "top_k must be an integer"),
    ({"post": "hi", "seed": -1}, 422, "seed must be in"),
])
def test_bad_input_gets_a_clear_error(client, body, status, message):
    r = client.post("/api/summarize", json=body)
    assert r.status_code == status and message in r.json()["error"]["message"]
    assert "Traceback" not in r.text


@pytest.mark.parametrize("raw, message", [(b"\xff\xfe{}", "not UTF-8"), (b"{\"post\": ", "not valid JSON"),
                                          (b"[1, 2]", "must be a JSON object")])
def test_body_that_is_not_utf8_json_is_400(client, raw, message):
    for path in ("/api/summarize", "/v1/completions"):
        r = client.post(path, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and message in r.json()["error"]["message"]
    assert client.post("/api/summarize", json={"post": "still serving"}).status_code == 200


def test_non_finite_numbers_and_oversized_bodies(client):
    """json.loads reads NaN and Infinity: they are not numbers a sampler can use. A body far over what the
    longest post needs is refused before it is read."""
    for raw in (b'{"post": "hi", "temperature": NaN}', b'{"post": "hi", "top_p": Infinity}'):
        r = client.post("/api/summarize", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422 and "must be a number" in r.json()["error"]["message"]
    r = client.post("/api/summarize", content=b"{" + b" " * 400_000 + b"}", headers={"content-type": "application/json"})
    assert r.status_code == 413 and "request body" in r.json()["error"]["message"]


def test_openai_endpoint_bad_input(client):
    """OpenAI's conventions: a 400 in its error shape for what the client must fix, 404 for an unknown model,
    and max_tokens over the model's budget capped there with finish_reason "length"."""
    r = client.post("/v1/completions", json={"model": "nope", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    for body, param, message in [({"prompt": ""}, "prompt", "prompt is empty"),
                                 ({"prompt": "hi", "n": 17}, "n", "n must be"),
                                 ({"prompt": "hi", "n": 0}, "n", "n must be"),
                                 ({"prompt": "hi", "max_tokens": 0}, "max_tokens", "0 only with echo"),
                                 ({"prompt": "hi", "logprobs": 21}, "logprobs", "logprobs must be in [0, 20]"),
                                 ({"prompt": "hi", "suffix": "x"}, "suffix", "not supported"),
                                 ({"prompt": "hi", "best_of": 3}, "best_of", "not supported"),
                                 ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4"),
                                 ({"prompt": "hi", "presence_penalty": 2.5}, "presence_penalty", "[-2, 2]"),
                                 ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options", "stream: true"),
                                 ({"prompt": "x " * 70}, "prompt", "context of 64")]:
        r = client.post("/v1/completions", json={"model": "best_sft", **body})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == param and message in error["message"], r.text
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    capped = client.post("/v1/completions", json={"model": "best_sft", "prompt": "hi", "max_tokens": 256,
                                                  "temperature": 0}).json()["choices"][0]
    assert capped["finish_reason"] in ("stop", "length")
    longest = client.post("/v1/completions", json={"model": "best_sft", "prompt": "hi", "max_tokens": 10,
                                                   "temperature": 0}).json()["choices"][0]
    assert capped == longest  # 256 is the budget of 10, as OpenAI caps at a model's limit
    three = client.post("/v1/completions", json={"model": "best_sft", "prompt": "hi", "max_tokens": 3,
                                                 "temperature": 0}).json()
    assert three["usage"]["completion_tokens"] <= 3 and longest["text"].startswith(three["choices"][0]["text"])
    for method, path in (("GET", "/nowhere"), ("DELETE", "/v1/completions")):
        r = client.request(method, path)
        assert r.status_code in (404, 405) and set(r.json()["error"]) == {"message", "type", "param", "code"}


# -----------------------------------------------------------------------------
# hostile requests: each gets its own 4xx with one clear message, never a traceback, and the server goes on

JSON = {"content-type": "application/json"}
_T = "temperature must be 0 (greedy) or in [0.001, 100]"


@pytest.mark.parametrize("path, raw, headers, status, message", [
    # finite in JSON (float64), not in what the sampler computes in (float32)
    ("/api/summarize", b'{"post": "hi", "temperature": 1e308}', JSON, 422, _T),
    ("/api/summarize", b'{"post": "hi", "temperature": 1e39}', JSON, 422, _T),
    ("/api/summarize", b'{"post": "hi", "temperature": 1e-300}', JSON, 422, _T),
    ("/api/summarize", b'{"post": "hi", "temperature": 5e-324}', JSON, 422, _T),
    ("/api/summarize", b'{"post": "hi", "temperature": 101}', JSON, 422, _T),
    ("/v1/completions", b'{"prompt": "hi", "temperature": 1e308}', JSON, 400, _T),
    ("/api/summarize", b'{"post": "hi", "temperature": 1, "top_p": 5e-324}', JSON, 422, "top_p must be in (0, 1] as a float32"),
    ("/api/summarize", b'{"post": "hi", "top_k": 100000000000000000000000000000, "temperature": 1, "seed": 1}', JSON, 200, ""),
    # bodies json cannot take, or takes and would fail on
    ("/api/summarize", b"[" * 100_000, JSON, 400, "nested too deeply"),
    ("/v1/completions", b'{"prompt": ' + b"[" * 100_000, JSON, 400, "nested too deeply"),
    ("/api/summarize", b'{"post": "hi", "seed": ' + b"9" * 5000 + b"}", JSON, 400, "not valid JSON"),
    ("/api/summarize", b'{"post": "hi", "subreddit": "' + b"x" * 400 + b'"}', JSON, 422, "prompt budget"),
    ("/api/summarize", b'{"post": "\\ud800 lone surrogate"}', JSON, 200, ""),
    ("/v1/completions", b'{"prompt": [1.5, 2]}', JSON, 400, "prompt must be a string, a list of token ids"),
    ("/v1/completions", b'{"prompt": [50257]}', JSON, 400, "prompt must be a string, a list of token ids"),
    # what a page of another site can make a browser send without asking: not JSON
    ("/api/summarize", b'{"post": "hi"}', {"content-type": "text/plain"}, 415, "content-type: application/json"),
    ("/api/summarize", b'post=hi', {"content-type": "application/x-www-form-urlencoded"}, 415, "application/json"),
    ("/v1/completions", b'{"prompt": "hi"}', {"content-type": ""}, 415, "no content-type"),
    ("/api/summarize", b'{"post": "hi"}', {"content-type": "application/json; charset=utf-8"}, 200, ""),
    # DNS rebinding: a name other than loopback's on a server bound to 127.0.0.1
    ("/api/summarize", b'{"post": "hi"}', {**JSON, "host": "evil.example"}, 400, "does not serve the host name 'evil.example'"),
    ("/api/summarize", b'{"post": "hi"}', {**JSON, "host": "127.0.0.1:8000"}, 200, ""),
    ("/api/summarize", b'{"post": "hi"}', {**JSON, "host": "[::1]:8000"}, 200, ""),
])
def test_hostile_requests(client, ckpt_dir, path, raw, headers, status, message):
    r = client.post(path, content=raw, headers=headers)
    assert r.status_code == status, r.text
    if status != 200:
        error = r.json()["error"]
        assert message in error["message"] and "\n" not in error["message"]
    assert "Traceback" not in r.text and str(ckpt_dir) not in r.text
    assert client.post("/api/summarize", json={"post": "still serving"}).status_code == 200


def test_host_check_follows_the_bound_address(ckpt_dir):
    for host, allowed, name, ok in [("127.0.0.1", [], "evil.example", False), ("0.0.0.0", [], "evil.example", True),
                                    ("0.0.0.0", ["*.example"], "my.example", True),
                                    ("0.0.0.0", ["summarizer.lan"], "evil.example", False)]:
        cfg = config_from(serve.Config, None, None, host=host, allowed_hosts=allowed)
        patterns = serving_app.allowed_hosts(cfg)
        assert serving_app.host_allowed(name, patterns) == ok, (host, allowed, name)
    with pytest.raises(UserError, match="--allowed-hosts takes"):
        serve.check_config(config_from(serve.Config, None, None, allowed_hosts=["ex*ample.com"]))


# -----------------------------------------------------------------------------
# one request never harms another: a fault while decoding ends its own row only

def _engine_results(engine, jobs) -> list:
    """Run (prompt, Sampling) jobs on the engine at once: each one's tokens, or its GenerationError."""
    async def all_of_them():
        return await asyncio.gather(*(run_jobs(engine, [RowSpec(*job)]) for job in jobs), return_exceptions=True)
    return [r if isinstance(r, Exception) else r[0].tokens for r in asyncio.run(all_of_them())]


@pytest.fixture(scope="module")
def engine_and_posts(ckpt_dir):
    rt = compute_init(0, "cpu", "float32")
    summarizer = Summarizer.load(ckpt_dir / "ppo_latest.pt", "cpu")
    engine = Engine("ppo_latest", summarizer, ckpt_dir / "ppo_latest.pt", rt, max_batch=32, batch_wait_s=0.2)
    posts = [tldr.Post(f"My roommate number {i} keeps eating my food, {i} times a week.", "Food", "roommates")
             for i in range(8)]
    prompts = [summarizer.prompt(p, engine.budget)[0] for p in posts]
    good = [(ids, Sampling(0.0 if i % 2 else 0.8, 0, 1.0, engine.budget, i)) for i, ids in enumerate(prompts)]
    alone = [_engine_results(engine, [job])[0] for job in good]
    yield engine, prompts, good, alone
    engine.close()


def test_a_bad_row_in_a_batch_fails_alone(engine_and_posts, capfd):
    """Eight good rows and one that the sampler cannot use (submitted to the engine directly, past the HTTP
    checks): the eight decode as they do alone, batched; the bad one ends with a message that tells the client
    nothing of the server, and the log has one line of why."""
    engine, prompts, good, alone = engine_and_posts
    for bad in (Sampling(float("inf"), 0, 1.0, engine.budget, 0), Sampling(1e-300, 0, 1.0, engine.budget, 0),
                Sampling(1.0, 0, 5e-324, engine.budget, 0)):
        before = engine.stats["largest_batch"]
        engine.stats["largest_batch"] = 0
        results = _engine_results(engine, good[:4] + [(prompts[0], bad)] + good[4:])
        assert results[:4] + results[5:] == alone and engine.stats["largest_batch"] == 8
        engine.stats["largest_batch"] = max(before, 8)
        assert isinstance(results[4], GenerationError) and str(results[4]) == GENERATION_FAILED
    log = capfd.readouterr().err.splitlines()
    assert len(log) == 3 and all(line.startswith("error: model ppo_latest: a request's generation failed: ")
                                 for line in log)


def test_a_row_whose_sampling_fails_in_the_batch_ends_alone(engine_and_posts, monkeypatch):
    """A fault in sampling one row (here: any batch holding a row at temperature 0.55 fails) makes the batch
    sample row by row: that row ends with its 500, the other eight get their own summaries."""
    engine, prompts, good, alone = engine_and_posts
    real = serving_engine.choose_tokens

    def faulty(logits, temperature, *args, **kwargs):
        marked = temperature == 0.55 if not torch.is_tensor(temperature) else bool((temperature == 0.55).any())
        if marked:
            raise RuntimeError("a fault of this row's sampling")
        return real(logits, temperature, *args, **kwargs)
    monkeypatch.setattr(serving_engine, "choose_tokens", faulty)
    results = _engine_results(engine, good + [(prompts[3], Sampling(0.55, 0, 1.0, engine.budget, 0))])
    assert results[:8] == alone and isinstance(results[8], GenerationError)


def test_a_failed_step_of_the_whole_batch_is_retried_row_by_row(engine_and_posts, monkeypatch):
    """A forward over the batch that fails once (a transient fault): every row is prefilled again with what
    it has so far and goes on where it was, so all nine still get what they get alone; a row whose own
    prefill fails (its prompt too long for the model, past every check) is the only one that ends."""
    engine, prompts, good, alone = engine_and_posts
    real, calls = BatchDecoder.advance, []

    def fails_on_the_third_step(self, tokens):
        calls.append(len(tokens))
        if len(calls) == 3:
            raise RuntimeError("a transient fault of the forward")
        return real(self, tokens)
    monkeypatch.setattr(BatchDecoder, "advance", fails_on_the_third_step)
    results = _engine_results(engine, good)
    assert results == alone and len(calls) > 3
    # a prompt that fits the checks but not the model's context: its prefill fails, in the batch and alone
    real_add = BatchDecoder.add

    def refuses_long_prompts(self, idx, mask, budgets):
        if idx.size(1) > 40:
            raise RuntimeError("this prompt does not fit")
        return real_add(self, idx, mask, budgets)
    monkeypatch.setattr(BatchDecoder, "add", refuses_long_prompts)
    long_prompt = (prompts[0] * 3)[:45]
    results = _engine_results(engine, good + [(long_prompt, good[0][1])])
    assert results[:8] == alone and isinstance(results[8], GenerationError)


def test_mixed_batch_over_http(server):
    """Through the real server: one bad request among eight good ones sent at once. The eight get 200 and
    the summaries they get alone; the bad one its 422."""
    bodies = [{"post": f"My roommate number {i} keeps eating my food.", "model": "demo_sft", "temperature": 0.7,
               "seed": i} for i in range(8)]
    alone = [httpx.post(server + "/api/summarize", json=b, timeout=60).json()["summary"] for b in bodies]

    async def all_of_them():
        async with httpx.AsyncClient(timeout=60) as c:
            bad = {"post": "x", "model": "demo_sft", "temperature": 1e308}
            return await asyncio.gather(*(c.post(server + "/api/summarize", json=b) for b in bodies[:4] + [bad] + bodies[4:]))
    got = asyncio.run(all_of_them())
    assert [r.status_code for r in got] == [200] * 4 + [422] + [200] * 4
    assert [r.json()["summary"] for r in got[:4] + got[5:]] == alone


def test_keep_alive_survives_a_nested_body_and_an_aborted_upload_logs_one_line(server, server_log):
    """A body of 100,000 [ is a 400 on a connection that stays open for the next request; a client that
    goes away mid-upload leaves one warning line in the server's log, no traceback."""
    import http.client
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/api/summarize", body=b"[" * 100_000, headers=JSON)
    r = conn.getresponse()
    assert r.status == 400 and "nested too deeply" in json.loads(r.read())["error"]["message"]
    assert (r.getheader("connection") or "").lower() != "close"
    local = conn.sock.getsockname()
    conn.request("POST", "/api/summarize", body=json.dumps({"post": "hi"}), headers=JSON)
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["summary"] is not None
    assert conn.sock.getsockname() == local  # the same connection served both
    conn.close()

    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /api/summarize HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                  b"content-length: 5000\r\n\r\n{\"post\": \"only part of")
    deadline = time.time() + 20
    while time.time() < deadline and "went away" not in server_log.read_text():
        time.sleep(0.1)
    text = server_log.read_text()
    assert [line for line in text.splitlines() if "went away" in line] == \
        ["warning: POST /api/summarize: the client went away before sending the whole request body"]
    assert "Traceback" not in text
    assert httpx.get(server + "/health").status_code == 200


def test_start_up_errors_exit_2(ckpt_dir, tmp_path, capsys):
    """No usable checkpoint (none in the folder, a missing file, a reward model instead of a summarizer) or a
    port in use, an --examples split that cannot be read: one error line and exit code 2, through the command's
    own entry point."""
    bad = _bad_example_splits(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        for args, message in [(["--ckpt-dir", tmp_path], "nothing to serve"),
                              (["--ckpt", tmp_path / "missing.pt"], "checkpoint not found"),
                              (["--ckpt", ckpt_dir / "best_sft.pt", "--ckpt", ckpt_dir / "rm.pt"], "expected ppo or sft"),
                              (["--ckpt-dir", ckpt_dir, "--port", busy.getsockname()[1]], "cannot listen on"),
                              (["--ckpt-dir", ckpt_dir, "--examples", bad["nested"]], "--examples"),
                              (["--ckpt-dir", ckpt_dir, "--examples", bad["not_json"]], "--examples"),
                              (["--ckpt-dir", ckpt_dir, "--allowed-hosts", "a*b"], "--allowed-hosts takes")]:
            with pytest.raises(SystemExit) as e:
                cli_main(serve.main, serve.Config, argv=["--device", "cpu", "--port", "0", *map(str, args)])
            err = capsys.readouterr().err
            assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err


def _bad_example_splits(folder: Path) -> dict[str, Path]:
    splits = {"nested": "[" * 100_000 + "\n", "not_json": "{not json\n", "not_utf8": b'{"post": "\xff\xfe"}\n'}
    out = {}
    for name, content in splits.items():
        (folder / name).mkdir()
        path = folder / name / "test.jsonl"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        out[name] = folder / name
    return out


def test_unreadable_examples_exit_2_not_abort(ckpt_dir, tmp_path):
    """The exit path itself, in a process of its own: with the decoding threads started, an exit used to
    abort in torch's teardown (SIGABRT, exit 134); now --examples is read before they exist."""
    bad = _bad_example_splits(tmp_path)
    r = subprocess.run([sys.executable, ROOT / "serve.py", "--ckpt-dir", ckpt_dir, "--device", "cpu", "--port", "0",
                        "--examples", bad["not_utf8"]], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: --examples ") and r.stderr.count("\n") == 1, r.stderr


# -----------------------------------------------------------------------------
# a real server on a loopback port

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_log(ckpt_dir):
    return ckpt_dir / "server.log"


@pytest.fixture(scope="module")
def server(ckpt_dir, small_sft_ckpt, server_log):
    """serve.py on a free loopback port with the two tiny models, long.pt and the suite's small SFT model
    (as demo_sft: a trained summarizer, whose summaries differ from post to post)."""
    port = _free_port()
    (ckpt_dir / "demo_sft.pt").symlink_to(small_sft_ckpt)
    proc = subprocess.Popen([sys.executable, ROOT / "serve.py", "--ckpt", ckpt_dir / "ppo_latest.pt", "--ckpt",
                             ckpt_dir / "best_sft.pt", "--ckpt", ckpt_dir / "long.pt", "--ckpt", ckpt_dir / "demo_sft.pt",
                             "--port", str(port), "--device", "cpu"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=server_log.open("w"), text=True)
    url = f"http://127.0.0.1:{port}"
    if not serve.wait_until_serving(url, proc, 90):
        proc.kill()
        pytest.fail(f"serve.py did not come up: {server_log.read_text()[-2000:]}")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_openai_client_against_a_real_server(server, ckpt_dir):
    import openai
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    expected = _raw_continuation(_lm(1), POST)
    prompt = tldr.render_prompt(POST)
    done = client.completions.create(model="ppo_latest", prompt=prompt, temperature=0)
    assert done.choices[0].text == expected and done.usage.completion_tokens > 0
    pieces = [c.choices[0].text for c in client.completions.create(model="ppo_latest", prompt=prompt, temperature=0,
                                                                   stream=True)]
    assert "".join(pieces) == expected and len(pieces) > 2
    assert [m.id for m in client.models.list()] == ["ppo_latest", "best_sft", "long", "demo_sft"]
    with pytest.raises(openai.NotFoundError, match="unknown model"):
        client.completions.create(model="nope", prompt="hi")


def test_openai_client_features_against_a_real_server(server):
    """The official client on what evaluators and chat clients use: echo + logprobs with a token-id prompt and
    max_tokens 0, stop, n, include_usage; chat streamed and not; a seeded sampled request streamed joins to
    the non-streamed text."""
    import openai
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    ids = get_tokenizer().encode_ordinary("My roommate keeps eating my food and never buys any.")
    echo = client.completions.create(model="demo_sft", prompt=ids, max_tokens=0, echo=True, logprobs=1)
    lp = echo.choices[0].logprobs
    assert echo.choices[0].text == get_tokenizer().decode(ids) and lp.token_logprobs[0] is None
    assert len(lp.token_logprobs) == len(ids) and all(x < 0 for x in lp.token_logprobs[1:])
    seeded = dict(model="demo_sft", prompt=tldr.render_prompt(POST), temperature=0.8, seed=3, max_tokens=30)
    whole = client.completions.create(**seeded, n=2)
    assert len(whole.choices) == 2 and whole.choices[0].text != whole.choices[1].text
    chunks = list(client.completions.create(**seeded, n=2, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices
    assert ["".join(c.choices[0].text for c in chunks[:-1] if c.choices[0].index == i) for i in (0, 1)] == \
        [c.text for c in whole.choices]
    stop = whole.choices[0].text[5:8]
    cut = client.completions.create(**seeded, stop=[stop])
    assert cut.choices[0].text == whole.choices[0].text[:whole.choices[0].text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    messages = [{"role": "user", "content": POST.post}]
    chat = client.chat.completions.create(model="demo_sft", messages=messages, temperature=0, max_tokens=256,
                                          extra_body={"title": POST.title, "subreddit": POST.subreddit})
    summary = httpx.post(server + "/api/summarize", json={"post": POST.post, "title": POST.title,
                                                          "subreddit": POST.subreddit, "model": "demo_sft"}).json()
    assert chat.choices[0].message.content == summary["summary"] and chat.choices[0].message.role == "assistant"
    streamed = client.chat.completions.create(model="demo_sft", messages=messages, temperature=0, stream=True,
                                              extra_body={"title": POST.title, "subreddit": POST.subreddit})
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == summary["summary"]
    with pytest.raises(openai.BadRequestError, match="n must be"):
        client.completions.create(model="demo_sft", prompt="hi", n=99)


def test_concurrent_streams_each_get_their_own_summary(server, small_sft_ckpt, synthetic_dir):
    """16 streaming requests at once, each with its own post: every one gets the greedy summary of its own
    post (generate_summaries, one post at a time), and the server did batch them."""
    posts = [e.post for e in tldr.load_sft(str(synthetic_dir / "tldr"), "test")[:16]]
    sft = Summarizer.from_checkpoint(load_checkpoint(small_sft_ckpt), "cpu")
    expected = [generate_summaries(sft.model, [p], batch_size=1, max_new_tokens=sft.info["max_summary_tokens"],
                                        max_prompt_tokens=sft.info["max_prompt_tokens"], template=sft.info["template"])[0]
                for p in posts]
    assert len(set(expected)) >= 12  # the posts get different summaries, so a mix-up would show

    async def one(client, post):
        body = {"post": post.post, "title": post.title, "subreddit": post.subreddit, "model": "demo_sft", "stream": True}
        async with client.stream("POST", server + "/api/summarize", json=body, timeout=60) as r:
            events = _sse([line async for line in r.aiter_lines()])
        return events[-1]["summary"], "".join(e["text"] for e in events[:-1])

    async def all_of_them():
        async with httpx.AsyncClient() as client:
            return await asyncio.gather(*(one(client, p) for p in posts))

    before = httpx.get(server + "/health").json()["models"]["demo_sft"]
    results = asyncio.run(all_of_them())
    assert [r[0] for r in results] == expected and [r[1] for r in results] == expected
    after = httpx.get(server + "/health").json()["models"]["demo_sft"]
    assert after["requests"] - before["requests"] == 16 and after["largest_batch"] > 1
    assert after["prefills"] - before["prefills"] < 16


def test_client_that_goes_away_stops_its_generation(server):
    """long.pt would make 900 tokens; the client reads two events and closes the connection: the server
    stops that row (counted as cancelled) long before the end."""
    body = {"post": POST.post, "model": "long", "stream": True}
    with httpx.stream("POST", server + "/api/summarize", json=body, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen == 2:
                break
    deadline = time.time() + 20
    while time.time() < deadline:
        stats = httpx.get(server + "/health").json()["models"]["long"]
        if stats["cancelled"]:
            break
        time.sleep(0.05)
    assert stats["cancelled"] == 1 and stats["tokens"] < 600
    uninterrupted = httpx.post(server + "/api/summarize", json={**body, "stream": False}, timeout=60).json()
    assert uninterrupted["tokens"] == 900  # so the interrupted one really had far to go


# -----------------------------------------------------------------------------
# a real browser

def _browser_paths():
    return shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"


def test_page_in_a_real_browser(server, synthetic_dir, tmp_path):
    """Headless chromium opens the page, a post is pasted and the button pressed; the streamed text that
    arrives is the API's greedy summary (of the suite's small SFT model). The screenshot is kept in the
    test's folder."""
    post = tldr.load_sft(str(synthetic_dir / "tldr"), "test")[0].post
    chromium, driver_path = _browser_paths()
    if not (Path(chromium).exists() and Path(driver_path).exists()):
        if os.environ.get("REQUIRE_BROWSER"):
            pytest.fail("REQUIRE_BROWSER is set but chromium / chromedriver are not installed")
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        browser.get(server + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: len(Select(b.find_element(By.ID, "model")).options) == 5)  # 4 models + side by side
        Select(browser.find_element(By.ID, "model")).select_by_value("demo_sft")
        browser.find_element(By.ID, "title").send_keys(post.title)
        browser.find_element(By.ID, "subreddit").send_keys(post.subreddit)
        browser.find_element(By.ID, "post").send_keys(post.post)
        browser.find_element(By.ID, "summarize").click()
        card = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, '.card[data-model="demo_sft"][data-state="done"]'))
        shown = card.find_element(By.CLASS_NAME, "summary").text
        bars = card.find_elements(By.CSS_SELECTOR, ".chart .bar")
        browser.save_screenshot(str(tmp_path / "serve.png"))
    finally:
        browser.quit()
    api = httpx.post(server + "/api/summarize", json={"post": post.post, "title": post.title,
                                                      "subreddit": post.subreddit, "model": "demo_sft"}).json()
    assert shown == api["summary"] and len(shown.split()) > 3
    assert len(bars) == 8 and (tmp_path / "serve.png").stat().st_size > 10_000
