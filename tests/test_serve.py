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
from checkpoints import load_checkpoint, save_checkpoint
from common import cli_main, config_from
from conftest import ROOT
from model import GPT, GPTConfig, ScoreModel
from serving.app import create_app
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
    with TestClient(create_app(serve.load_engines(cfg), cfg)) as c:
        yield c


def _cli_summary(ckpt_dir, ckpt: str, **overrides) -> str:
    """summarize.py's own output for POST (its main, as the CLI runs it)."""
    return summarize.main(config_from(summarize.Config, None, None, post=POST.post, title=POST.title,
                                      subreddit=POST.subreddit, ckpt=ckpt, ckpt_dir=str(ckpt_dir), device="cpu",
                                      **overrides))[0]


def _sse(lines) -> list:
    return [json.loads(line[len("data: "):]) if line != "data: [DONE]" else "[DONE]"
            for line in lines if line.startswith("data: ")]


def test_models_health_report_and_page(client):
    models = client.get("/api/models").json()["models"]
    assert [(m["name"], m["stage"], m["step"], m["default"]) for m in models] == \
        [("ppo_latest", "ppo", 12, True), ("best_sft", "sft", 100, False)]
    assert models[0]["metrics"] == {"score": 0.5} and models[0]["max_new_tokens"] == INFO["max_summary_tokens"]
    assert models[0]["template"] == INFO["template"]
    health = client.get("/health").json()
    assert health["status"] == "ok" and set(health["models"]) == {"ppo_latest", "best_sft"}
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["ppo_latest", "best_sft"]
    page = client.get("/")
    assert page.status_code == 200 and 'id="summarize"' in page.text
    assert client.get("/static/app.js").status_code == 200
    report = client.get("/api/report").json()
    assert "| gold | 0.4 |" in report["markdown"] and report["plots"] == ["/api/report/plots/loss.png"]
    assert client.get("/api/report/plots/loss.png").content.startswith(b"\x89PNG")
    assert client.get("/api/report/plots/..%2Frm.pt").status_code == 404
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
        prompt = tldr.render_prompt(POST)  # the whole training prompt is taken apart into the post's fields
        v1 = client.post("/v1/completions", json={"model": name, "prompt": prompt, "temperature": 0}).json()
        assert v1["object"] == "text_completion" and v1["choices"][0]["text"] == expected
        assert v1["usage"]["completion_tokens"] == got["tokens"]


def test_seeded_sampling_equals_summarize_cli(client, ckpt_dir):
    """A seeded sampled request draws what summarize.py --seed draws, alone or in a batch with others."""
    expected = _cli_summary(ckpt_dir, "ppo_latest.pt", temperature=0.9, top_k=40, seed=7)
    body = {"post": POST.post, "title": POST.title, "subreddit": POST.subreddit, "temperature": 0.9, "top_k": 40, "seed": 7}
    assert client.post("/api/summarize", json=body).json()["summary"] == expected
    n3 = client.post("/v1/completions", json={"model": "ppo_latest", "prompt": tldr.render_prompt(POST), "temperature": 0.9,
                                              "top_k": 40, "seed": 7, "n": 3}).json()["choices"]
    assert n3[0]["text"] == expected and len(n3) == 3 and [c["index"] for c in n3] == [0, 1, 2]


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
    assert client.post("/v1/completions", json={"model": "nope", "prompt": "hi"}).status_code == 404
    assert client.post("/v1/completions", json={"model": "best_sft", "prompt": ""}).status_code == 422
    assert client.post("/v1/completions", json={"model": "best_sft", "prompt": "hi", "max_tokens": 99}).status_code == 422
    r = client.post("/v1/completions", json={"model": "best_sft", "prompt": "hi", "n": 17})
    assert r.status_code == 422 and "n must be" in r.json()["error"]["message"]
    assert client.post("/v1/completions", json={"model": "best_sft", "prompt": "hi", "echo": True}).status_code == 422


def test_start_up_errors_exit_2(ckpt_dir, tmp_path, capsys):
    """No usable checkpoint (none in the folder, a missing file, a reward model instead of a summarizer) or a
    port in use: one error line and exit code 2, through the command's own entry point."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        for args, message in [(["--ckpt-dir", tmp_path], "nothing to serve"),
                              (["--ckpt", tmp_path / "missing.pt"], "checkpoint not found"),
                              (["--ckpt", ckpt_dir / "best_sft.pt", "--ckpt", ckpt_dir / "rm.pt"], "expected ppo or sft"),
                              (["--ckpt-dir", ckpt_dir, "--port", busy.getsockname()[1]], "cannot listen on")]:
            with pytest.raises(SystemExit) as e:
                cli_main(serve.main, serve.Config, argv=["--device", "cpu", "--port", "0", *map(str, args)])
            err = capsys.readouterr().err
            assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err


# -----------------------------------------------------------------------------
# a real server on a loopback port

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ckpt_dir, small_sft_ckpt):
    """serve.py on a free loopback port with the two tiny models, long.pt and the suite's small SFT model
    (as demo_sft: a trained summarizer, whose summaries differ from post to post)."""
    port = _free_port()
    (ckpt_dir / "demo_sft.pt").symlink_to(small_sft_ckpt)
    proc = subprocess.Popen([sys.executable, ROOT / "serve.py", "--ckpt", ckpt_dir / "ppo_latest.pt", "--ckpt",
                             ckpt_dir / "best_sft.pt", "--ckpt", ckpt_dir / "long.pt", "--ckpt", ckpt_dir / "demo_sft.pt",
                             "--port", str(port), "--device", "cpu"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("serve.py did not come up")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_openai_client_against_a_real_server(server, ckpt_dir):
    import openai
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    expected = _greedy(_lm(1), POST)
    prompt = tldr.render_prompt(POST)
    done = client.completions.create(model="ppo_latest", prompt=prompt, temperature=0)
    assert done.choices[0].text == expected and done.usage.completion_tokens > 0
    pieces = [c.choices[0].text for c in client.completions.create(model="ppo_latest", prompt=prompt, temperature=0,
                                                                   stream=True)]
    assert "".join(pieces) == expected and len(pieces) > 2
    assert [m.id for m in client.models.list()] == ["ppo_latest", "best_sft", "long", "demo_sft"]
    with pytest.raises(openai.NotFoundError, match="unknown model"):
        client.completions.create(model="nope", prompt="hi")


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
