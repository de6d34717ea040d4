"""serving/openai_api.py and the server's plumbing in-process (FastAPI's TestClient): echo and prompt log-probs
against hellaswag.py's scoring, lm-evaluation-harness's batch of token-id prompts, stop strings, penalties
against a naive loop, n, include_usage, chat completions, /tokenize and /detokenize, /metrics parsed by
prometheus_client, /health while loading, request ids and the access log."""
import json
import math
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

import hellaswag as hs
import serve
import tldr
from checkpoints import save_checkpoint
from common import config_from, get_tokenizer
from model import EOS_ID, GPT
from serving.app import create_app
from serving.protocol import Models
from test_serve import _long_lm
from test_summarize import INFO, POST, _greedy, _lm

HELLASWAG_ROWS = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "hellaswag" / "hellaswag_val_first10.jsonl"
TOK = get_tokenizer()


_scorer = _long_lm  # untrained, with a context long enough for HellaSwag rows


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """A client of the app serving ppo_latest (the peaked tiny model of test_summarize) and scorer (a 1,024-token
    context)."""
    out = tmp_path_factory.mktemp("openai_ckpts")
    save_checkpoint(out / "ppo_latest.pt", stage="ppo", model=_lm(1), tldr=INFO, step=3)
    save_checkpoint(out / "scorer.pt", stage="sft", model=_scorer(),
                    tldr=tldr.template_info(max_prompt_tokens=128, max_summary_tokens=24))
    cfg = config_from(serve.Config, None, None, ckpt=[str(out / "ppo_latest.pt"), str(out / "scorer.pt")], device="cpu")
    with TestClient(create_app(serve.load_engines(cfg), cfg), base_url="http://localhost") as c:
        yield c


def _sse(response) -> list:
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
            for line in response.iter_lines() if line.startswith("data: ")]


def _stream(api, path: str, body: dict) -> list:
    with api.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return _sse(r)


# -----------------------------------------------------------------------------
# echo and log-probs: what lm-evaluation-harness's local-completions model reads

def _hellaswag_rows() -> list[dict]:
    if not HELLASWAG_ROWS.is_file():
        pytest.skip(f"{HELLASWAG_ROWS} is absent (../shared/realdata)")
    return hs.load_rows(HELLASWAG_ROWS)


@pytest.mark.parametrize("style", ["completion", "harness"])
def test_echo_logprobs_equal_hellaswag_scoring(api, style):
    """The 10 real HellaSwag rows as lm-eval sends them: one request per row, a batch of 4 token-id prompts
    (context + ending), max_tokens 1, echo, logprobs 1; each ending's summed token_logprobs[ctxlen:-1] equals
    hellaswag.py's score_endings to 1e-4, so the API gives hellaswag.py's accuracy."""
    rows = _hellaswag_rows()
    examples = [hs.encode_row(r, style, TOK) for r in rows]
    sums, counts = hs.score_endings(_scorer(), examples)
    api_sums = torch.zeros_like(sums)
    for e, ex in enumerate(examples):
        prompts = [ex.context + ending for ending in ex.endings]
        r = api.post("/v1/completions", json={"model": "scorer", "prompt": prompts, "max_tokens": 1, "echo": True,
                                              "logprobs": 1, "temperature": 0, "seed": 1234})
        assert r.status_code == 200, r.text
        choices = sorted(r.json()["choices"], key=lambda c: c["index"])
        assert [c["index"] for c in choices] == [0, 1, 2, 3]
        for k, (choice, prompt) in enumerate(zip(choices, prompts)):
            lp = choice["logprobs"]
            assert len(lp["tokens"]) == len(prompt) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            assert choice["text"].startswith(TOK.decode(prompt))
            scored = lp["token_logprobs"][len(ex.context):-1]
            assert len(scored) == counts[e, k]
            api_sums[e, k] = sum(scored)
            # is_greedy as lm-eval computes it: the top entry is the token's own log-prob when it is the argmax
            assert all(max(top.values()) >= tlp - 1e-6 for tlp, top in
                       zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]))
    assert torch.allclose(api_sums, sums, atol=1e-4, rtol=0)
    norms = None if examples[0].norms is None else torch.tensor([ex.norms for ex in examples])
    assert [p.tolist() for p in hs.predictions(api_sums, counts, norms)] == \
        [p.tolist() for p in hs.predictions(sums, counts, norms)]


def test_echo_alone_and_text_offsets(api):
    """max_tokens 0 with echo: the prompt's log-probs only (a forward of the model, checked here against one
    done by hand); text_offset is where each token's text begins."""
    text = "The quick brown fox jumps over the lazy dog. Caf\u00e9 \u2603!"
    ids = TOK.encode_ordinary(text)
    choice = api.post("/v1/completions", json={"model": "scorer", "prompt": text, "max_tokens": 0, "echo": True,
                                               "logprobs": 3}).json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == text and choice["finish_reason"] == "length"
    with torch.no_grad():
        logits, _ = _scorer()(torch.tensor([ids]))
    ref = torch.log_softmax(logits[0, :-1].float(), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(lp["token_logprobs"][1:]), ref, atol=1e-5)
    assert all(len(top) == 3 for top in lp["top_logprobs"][1:])
    # a whole token starts where its text does; " \xe2\x98" + "\x83" split the snowman: the second (no whole
    # character of its own) starts where the snowman does
    pieces = [TOK.decode_single_token_bytes(t) for t in ids]
    assert pieces[11:13] == [b" \xe2\x98", b"\x83"]
    offsets = lp["text_offset"]
    assert all(text[offsets[i]:].startswith(pieces[i].decode()) for i in range(11))
    assert offsets[11:] == [text.index(" \u2603"), text.index("\u2603"), text.index("!")]
    assert lp["tokens"][11:13] == [" \ufffd", "\ufffd"]


def test_streamed_echo_equals_the_whole_response(api):
    """Streamed, an echoed prompt comes first (with its log-probs), then the completion's tokens: the chunks join
    to the non-streamed choice, text and log-probs alike; echo without log-probs and max_tokens 0 need no model."""
    body = {"model": "scorer", "prompt": "The quick brown fox", "max_tokens": 6, "echo": True, "logprobs": 2,
            "temperature": 0}
    whole = api.post("/v1/completions", json=body).json()["choices"][0]
    events = _stream(api, "/v1/completions", body)
    chunks = [e["choices"][0] for e in events[:-1]]
    assert chunks[0]["text"] == "The quick brown fox" and chunks[0]["logprobs"]["token_logprobs"][0] is None
    assert "".join(c["text"] for c in chunks) == whole["text"] and chunks[-1]["finish_reason"] == whole["finish_reason"]
    joined = [x for c in chunks if c["logprobs"] for x in c["logprobs"]["token_logprobs"]]
    assert joined == whole["logprobs"]["token_logprobs"]
    assert [x for c in chunks if c["logprobs"] for x in c["logprobs"]["text_offset"]] == whole["logprobs"]["text_offset"]
    bare = _stream(api, "/v1/completions", {**body, "max_tokens": 0, "logprobs": None})
    assert [e["choices"][0]["text"] for e in bare[:-1]] == ["The quick brown fox", ""]


def test_generated_logprobs_and_leading_space(api):
    """Without echo: the completion's own tokens with the model's log-probs; greedy, each chosen token is its
    step's likeliest; text_offset counts from the end of the prompt; the text keeps its leading space."""
    prompt = tldr.render_prompt(POST)
    choice = api.post("/v1/completions", json={"model": "ppo_latest", "prompt": prompt, "temperature": 0,
                                               "logprobs": 2}).json()["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"] and choice["text"].strip() == _greedy(_lm(1), POST)
    for token, tlp, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) == 2 and max(top, key=top.get) == token and math.isclose(top[token], tlp, abs_tol=1e-6)
    assert lp["text_offset"][0] == len(prompt)
    first = TOK.decode([TOK.encode_ordinary(prompt + choice["text"])[len(TOK.encode_ordinary(prompt))]])
    assert choice["text"].startswith(first) and (first[0] == " ") == choice["text"].startswith(" ")


# -----------------------------------------------------------------------------
# stop, n, seed, penalties, include_usage

def _naive_greedy(model: GPT, ids: list[int], steps: int, presence: float = 0.0, frequency: float = 0.0) -> list[int]:
    """One full forward per token, penalties applied by hand: the reference for the server's decoding."""
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits, _ = model(torch.tensor([ids + out]))
            logits = logits[0, -1].clone()
            for t in set(out):
                logits[t] -= presence + frequency * out.count(t)
            token = int(logits.argmax())
            if token == EOS_ID:
                break
            out.append(token)
    return out


def test_stop_strings_streamed_and_not(api):
    prompt = tldr.render_prompt(POST)
    whole = api.post("/v1/completions", json={"model": "ppo_latest", "prompt": prompt, "temperature": 0}).json()
    text = whole["choices"][0]["text"]
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip() and text.find(stop) > 0
    body = {"model": "ppo_latest", "prompt": prompt, "temperature": 0, "stop": ["\u2603 never", stop]}
    cut = api.post("/v1/completions", json=body).json()["choices"][0]
    assert cut["text"] == text[:text.find(stop)] and cut["finish_reason"] == "stop"
    events = _stream(api, "/v1/completions", body)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == cut["text"]
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_penalties_equal_a_naive_loop(api):
    """The peaked tiny model repeats itself greedily; with the penalties it decodes what a naive loop that
    applies them by hand decodes."""
    ids = TOK.encode_ordinary(tldr.render_prompt(POST))
    plain = _naive_greedy(_lm(1), ids, INFO["max_summary_tokens"])
    penalized = _naive_greedy(_lm(1), ids, INFO["max_summary_tokens"], presence=0.5, frequency=1.5)
    assert plain != penalized  # the penalties matter for this model and prompt
    got = api.post("/v1/completions", json={"model": "ppo_latest", "prompt": ids, "temperature": 0,
                                            "presence_penalty": 0.5, "frequency_penalty": 1.5}).json()
    assert got["choices"][0]["text"] == TOK.decode(penalized)


def test_n_seed_and_include_usage(api):
    """n seeded samples are distinct and the same again; streamed with include_usage, every chunk carries
    usage null, the last one has no choices and the usage of the non-streamed request, and each choice's text
    joins to the non-streamed one."""
    body = {"model": "scorer", "prompt": "Once upon a time", "temperature": 1.0, "n": 3, "seed": 11, "max_tokens": 12}
    first = api.post("/v1/completions", json=body).json()
    texts = [c["text"] for c in first["choices"]]
    assert len(set(texts)) == 3 and texts == [c["text"] for c in api.post("/v1/completions", json=body).json()["choices"]]
    events = _stream(api, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and events[-2]["usage"] == first["usage"]
    assert all("usage" in e and e["usage"] is None for e in events[:-2])
    streamed = ["".join(e["choices"][0]["text"] for e in events[:-2] if e["choices"][0]["index"] == i) for i in range(3)]
    assert streamed == texts
    assert first["usage"]["prompt_tokens"] == len(TOK.encode_ordinary("Once upon a time"))


# -----------------------------------------------------------------------------
# chat completions

def test_chat_completion_is_the_summary(api):
    """The last user message is the post (title and subreddit as extra fields): the reply is /api/summarize's
    summary; streamed, OpenAI's chunk schema joins to the same text; logprobs per token."""
    summary = api.post("/api/summarize", json={"post": POST.post, "title": POST.title, "subreddit": POST.subreddit}).json()
    body = {"model": "ppo_latest", "messages": [{"role": "system", "content": "Summarize."},
                                                {"role": "user", "content": "an earlier post"},
                                                {"role": "user", "content": [{"type": "text", "text": POST.post}]}],
            "title": POST.title, "subreddit": POST.subreddit, "temperature": 0, "max_completion_tokens": 256,
            "logprobs": True, "top_logprobs": 2}
    done = api.post("/v1/chat/completions", json=body).json()
    choice = done["choices"][0]
    assert done["object"] == "chat.completion" and done["id"].startswith("chatcmpl-")
    assert choice["message"] == {"role": "assistant", "content": summary["summary"]}
    assert choice["finish_reason"] == summary["finish_reason"] and done["usage"]["completion_tokens"] == summary["tokens"]
    content = choice["logprobs"]["content"]
    assert len(content) == summary["tokens"] and all(len(c["top_logprobs"]) == 2 for c in content)
    assert "".join(c["token"] for c in content).strip() == summary["summary"]
    events = _stream(api, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2]) == summary["summary"]
    assert events[-3]["choices"][0]["finish_reason"] == summary["finish_reason"] and events[-2]["usage"] == done["usage"]


def test_chat_bad_input(api):
    for body, param in [({"messages": []}, "messages"), ({"messages": [{"role": "system", "content": "x"}]}, "messages"),
                        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
                        ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
                        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
                        ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
                         "response_format")]:
        r = api.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    ok = api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "user": "someone",
                                                "response_format": {"type": "text"}, "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")


# -----------------------------------------------------------------------------
# tokenizer routes, models, metrics, health, request ids

def test_tokenize_and_detokenize(api):
    text = "Hello world, caf\u00e9!"
    got = api.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert got["tokens"] == TOK.encode_ordinary(text) and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == 64 and "".join(got["token_strs"]) == text
    assert api.post("/detokenize", json={"tokens": got["tokens"]}).json() == {"prompt": text}
    chat = api.post("/tokenize", json={"messages": [{"role": "user", "content": POST.post}], "title": POST.title,
                                       "subreddit": POST.subreddit}).json()
    assert TOK.decode(chat["tokens"]) == tldr.render_prompt(POST)
    r = api.post("/detokenize", json={"tokens": [1, -1]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    models = api.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["ppo_latest", "scorer"] and models["data"][1]["max_model_len"] == 1024
    assert api.get("/v1/models/scorer").json()["id"] == "scorer"
    assert api.get("/v1/models/nope").status_code == 404


def test_metrics_parse_and_count(api):
    api.post("/v1/completions", json={"model": "ppo_latest", "prompt": "hi", "max_tokens": 3, "temperature": 0})
    api.post("/v1/completions", json={"model": "ppo_latest", "prompt": ""})
    families = {f.name: f for f in text_string_to_metric_families(api.get("/metrics").text)}
    requests = {(s.labels["route"], s.labels["status"]): s.value for s in families["serve_requests"].samples
                if s.name == "serve_requests_total"}
    assert requests[("/v1/completions", "200")] >= 1 and requests[("/v1/completions", "400")] >= 1
    ttft = [s for s in families["serve_time_to_first_token_seconds"].samples
            if s.name.endswith("_count") and s.labels["model"] == "ppo_latest"]
    assert ttft and ttft[0].value >= 1
    tokens = [s.value for s in families["serve_generated_tokens"].samples if s.labels.get("model") == "ppo_latest"]
    assert tokens and tokens[0] >= 3
    assert {s.labels["model"] for s in families["serve_running_rows"].samples} == {"ppo_latest", "scorer"}
    assert "serve_waiting_rows" in families and "serve_request_seconds" in families


def test_health_is_503_until_the_models_are_loaded(tmp_path):
    save_checkpoint(tmp_path / "ppo_latest.pt", stage="ppo", model=_lm(1), tldr=INFO)
    cfg = config_from(serve.Config, None, None, ckpt_dir=str(tmp_path), device="cpu")
    models = Models()
    with TestClient(create_app(models, cfg), base_url="http://localhost") as c:
        assert c.get("/health").status_code == 503 and c.get("/health").json() == {"status": "loading"}
        for r in (c.get("/v1/models"), c.post("/v1/completions", json={"prompt": "hi"}),
                  c.post("/api/summarize", json={"post": "hi"})):
            assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        models.set(serve.load_engines(cfg, warm_up=True))
        health = c.get("/health").json()
        assert health["status"] == "ok" and health["models"]["ppo_latest"]["requests"] == 0  # the warm-up is not counted
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_request_ids_and_one_access_line_per_request(api, capfd):
    capfd.readouterr()
    secret = "do not log this post"
    r = api.post("/v1/completions", json={"model": "ppo_latest", "prompt": secret, "max_tokens": 4, "temperature": 0},
                 headers={"x-request-id": "client-id-7"})
    assert r.headers["x-request-id"] == "client-id-7" and r.json()["id"] == "cmpl-client-id-7"
    made = api.get("/health", headers={"x-request-id": "bad id with spaces"}).headers["x-request-id"]
    assert made != "bad id with spaces" and len(made) == 24
    r404 = api.get("/nowhere")
    lines = capfd.readouterr().err.splitlines()
    tokens = r.json()["usage"]["completion_tokens"]
    assert lines[0].startswith(f"access: client-id-7 POST /v1/completions 200 tokens={tokens} ")
    assert lines[1].startswith(f"access: {made} GET /health 200 tokens=0 ")
    assert lines[2].startswith(f"access: {r404.headers['x-request-id']} GET /nowhere 404 ") and len(lines) == 3
    assert secret not in "".join(lines)


def test_stop_text_holds_back_what_could_start_a_stop_string():
    from serving.engine import StopText
    s = StopText(["ab", "xyz"])
    assert [s.feed(p) for p in ("12a", "c", "x", "y")] == ["12", "ac", "", ""] and not s.stopped
    assert s.feed("zQ") == "" and s.stopped and s.feed("more") == "" and s.finish() == ""
    t = StopText(["ab"])
    assert t.feed("xa") == "x" and t.finish() == "a"  # the end of the text releases what was held back
