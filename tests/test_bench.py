"""bench.py: the tiny run writes every field, the two sides really compute the same thing, and the
timing helpers alternate and summarise as documented. No timing assertions: speed is what bench.py
reports, not what a shared CI machine can promise."""
import json

import pytest
import torch

import bench
import tldr
from common import UserError, config_from
from conftest import run_script

RATE_FIELDS = {"unit", "work_per_run", "runs", "seconds", "median_s", "min_s", "max_s", "per_s", "per_s_min",
               "per_s_max"}
RATIO_FIELDS = {"median", "min", "max"}


def test_tiny_run_writes_every_field(tmp_path):
    out = tmp_path / "bench.json"
    # one thread: tests share the machine, and oversubscribed OpenMP threads wait on each other
    proc = run_script(["bench.py", "--preset", "tiny", "--threads", "1", "--out", out], timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for heading in ("**Training step**", "**Generation**", "**HellaSwag**", "**PPO step**"):
        assert heading in proc.stdout
    r = json.loads(out.read_text())
    assert {"device", "cpu", "cpu_cores", "torch", "transformers", "load_average_at_start",
            "load_average_at_end"} <= set(r["machine"]) and r["machine"]["torch_threads"] == 1
    assert r["config"]["preset"] == "tiny" and r["model"]["n_layer"] == 2 and r["model"]["params"] > 0

    train = r["train"]
    assert set(train["variants"]) == {"fp32"}  # CPU: fp32 only
    row = train["variants"]["fp32"]
    for side in ("ours", "hf"):
        assert RATE_FIELDS | {"step_ms", "mfu"} <= set(row[side]) and row[side]["runs"] == 1
        assert row[side]["mfu"] is None  # no MFU without a GPU peak
    assert set(row["ratio"]) == RATIO_FIELDS
    # same weights, batch and optimizer: the two implementations follow the same loss trajectory
    assert len(row["losses_ours"]) == len(row["losses_hf"]) == 2  # warm-up + one timed step
    assert row["max_loss_diff"] < 1e-4 and row["losses_ours"][1] < row["losses_ours"][0]

    gen = r["generate"]
    assert set(gen["batches"]) == {"1", "8"} and gen["new_tokens"] == 16
    for row in gen["batches"].values():
        for side in ("ours", "hf", "no_cache"):
            assert RATE_FIELDS <= set(row[side])
        assert set(row["ratio_vs_hf"]) == set(row["ratio_vs_no_cache"]) == RATIO_FIELDS
        # greedy decoding of the same weights: all three make the same tokens
        assert row["agree_hf"] == 1.0 and row["agree_no_cache"] == 1.0

    hs = r["hellaswag"]
    assert hs["rows"] == 8 and RATE_FIELDS <= set(hs["batched"]) and RATE_FIELDS <= set(hs["one_by_one"])
    assert set(hs["ratio"]) == RATIO_FIELDS
    assert hs["acc_batched"] == hs["acc_one_by_one"]  # batching changes speed, never the scores

    ppo = r["ppo"]
    assert ppo["steps"] == 1 and ppo["rollouts"] == 4 and ppo["response_tokens"] == 8
    for part in ("rollout", "scoring", "update"):
        assert len(ppo[part]["seconds"]) == 1 and ppo[part]["median_s"] > 0
    assert ppo["total_median_s"] == pytest.approx(sum(ppo[p]["median_s"] for p in ("rollout", "scoring", "update")))
    assert 0 < ppo["rollout_share"] < 1 and ppo["gen_tok_per_s"] > 0
    assert [t["key"] for t in r["targets"]] == [".".join(path) for path, _, _ in bench.TARGETS]
    assert "serve" not in r  # not in the default sections: its target is listed as not run
    for t in r["targets"]:
        if t["key"].startswith("serve."):
            assert t["value"] is None and t["met"] is None
        else:
            assert t["value"] is not None and t["met"] == (t["value"] >= t["target"])


def test_race_alternates_sides_and_excludes_warmup(monkeypatch):
    clock = {"t": 0.0}
    calls = []

    def side(name, seconds):
        def run():
            calls.append(name)
            clock["t"] += seconds
        return run

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock["t"])
    seconds = bench.race({"a": side("a", 1.0), "b": side("b", 3.0)}, repeats=3, warmup=2)
    assert calls == ["a", "a", "b", "b"] + ["a", "b", "b", "a", "a", "b"]
    assert seconds == {"a": [1.0, 1.0, 1.0], "b": [3.0, 3.0, 3.0]}


def test_rate_stats_and_paired_ratio_by_hand():
    st = bench.rate_stats([2.0, 1.0, 4.0], work=8, unit="tokens")
    assert (st["median_s"], st["per_s"], st["per_s_min"], st["per_s_max"], st["runs"]) == (2.0, 4.0, 2.0, 8.0, 3)
    # per-round ratios slow/fast: 3, 1, 2 -> median 2; a slow round of both sides cancels out
    assert bench.paired_ratio([1.0, 2.0, 10.0], [3.0, 2.0, 20.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}


def test_check_targets_reads_medians_and_marks_missing_parts():
    results = {"train": {"variants": {"fp32": {"ratio": {"median": 1.2, "min": 0.9, "max": 1.3}}}},
               "generate": {"batches": {"8": {"ratio_vs_hf": {"median": 1.4}, "ratio_vs_no_cache": {"median": 9.0}}}},
               "serve": {"levels": {"8": {"ratio": {"one_at_a_time": {"median": 3.2}, "transformers": {"median": 1.9}}},
                                    "1": {"ratio": {"transformers": {"median": 1.0}}}}}}
    got = {t["key"]: (t["value"], t["met"]) for t in bench.check_targets(results)}
    assert got == {"train.variants.fp32.ratio": (1.2, True), "generate.batches.8.ratio_vs_hf": (1.4, False),
                   "generate.batches.8.ratio_vs_no_cache": (9.0, True),
                   "generate.batches.1.ratio_vs_no_cache": (None, None), "hellaswag.ratio": (None, None),
                   "serve.levels.1.ratio.transformers": (1.0, True), "serve.levels.8.ratio.transformers": (1.9, False),
                   "serve.levels.32.ratio.transformers": (None, None), "serve.levels.8.ratio.one_at_a_time": (3.2, True)}


@pytest.mark.parametrize("overrides, message", [
    ({"sections": ["rlhf"]}, "unknown section"),
    ({"variants": ["fp8"]}, "unknown variant"),
    ({"seq_len": 4096}, "--seq-len"),
    ({"repeats": 0}, "positive"),
])
def test_user_errors_before_any_work(overrides, message):
    cfg = config_from(bench.Config, bench.PRESETS, "tiny", **overrides)
    with pytest.raises(UserError, match=message):
        bench.main(cfg)


# --- the speed changes bench.py motivated in model.py keep the maths -----------------------------

def test_lean_cross_entropy_matches_torch_value_and_gradient():
    import torch
    import torch.nn.functional as F
    from model import cross_entropy
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 103, generator=g)
    logits[:, 100:] = float("-inf")  # padded vocabulary slots, as the model's
    targets = torch.randint(0, 100, (37,), generator=g)
    targets[::5] = -1
    for dtype in (torch.float32, torch.bfloat16):
        ours = logits.to(dtype).clone().requires_grad_()
        ref = logits.to(dtype).clone().requires_grad_()
        loss = cross_entropy(ours, targets)
        ref_loss = F.cross_entropy(ref.float(), targets, ignore_index=-1)
        (2.5 * loss).backward()
        (2.5 * ref_loss).backward()
        torch.testing.assert_close(loss, ref_loss)
        assert ours.grad.dtype == dtype and (ours.grad[::5] == 0).all()
        torch.testing.assert_close(ours.grad, ref.grad)
    # its backward reuses the saved buffer: a second backward must fail loudly, never be wrong
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_logits_with_and_without_autograd_agree(tiny_config):
    import torch
    from model import GPT, TOKENIZER_VOCAB
    torch.manual_seed(0)
    model = GPT(tiny_config)
    x = torch.randn(3, 5, tiny_config.n_embd)
    train_path = model.logits(x)                      # addmm with the -inf bias
    with torch.no_grad():
        eval_path = model.logits(x)                   # matmul, padded columns overwritten
    assert train_path.requires_grad and not eval_path.requires_grad
    torch.testing.assert_close(train_path.detach(), eval_path)
    assert torch.isinf(eval_path[..., TOKENIZER_VOCAB:]).all() and torch.isfinite(eval_path[..., :TOKENIZER_VOCAB]).all()


def test_tiny_serve_section(tmp_path, capsys):
    """bench.py --sections serve (in-process; the servers are real processes): serve.py batching and one at a
    time answer every streamed request without an error and with the same text, the figures are consistent
    (percentiles ordered, a request's first token before its end) and the target is read from them."""
    out, threads = tmp_path / "serve.json", torch.get_num_threads()
    try:  # --threads 1 sets this process's torch threads too: the rest of the suite keeps its own
        r = bench.main(config_from(bench.Config, bench.PRESETS, "tiny", sections=["serve"], threads=1, out=str(out)))
    finally:
        torch.set_num_threads(threads)
    assert "**Serving**" in capsys.readouterr().out and json.loads(out.read_text())["serve"] == r["serve"]
    sv = r["serve"]
    assert set(sv["levels"]) == {"1", "4"} and sv["tokens"] == 8 and sv["texts_agree"] == {"one_at_a_time": 1.0}
    for level in sv["levels"].values():
        for side in ("serve.py", "one_at_a_time"):
            st = level[side]
            assert st["errors"] == 0 and st["requests"] == 8 and st["tokens_per_s"] > 0
            assert 0 < st["ttft_p50_s"] <= st["ttft_p95_s"] and st["ttft_p50_s"] <= st["latency_p50_s"]
            assert st["latency_p50_s"] <= st["latency_p95_s"]
        assert set(level["ratio"]) == {"one_at_a_time"} and set(level["ratio"]["one_at_a_time"]) == RATIO_FIELDS
    assert [t["value"] for t in r["targets"] if t["key"].startswith("serve.")] == [None] * 4  # 8 and 32 clients not run
    with pytest.raises(UserError, match="must start with serve.py"):
        bench.bench_serve(config_from(bench.Config, bench.PRESETS, "tiny", serve_sides=["transformers"]), None, None)


def test_a_server_keeps_answering_after_its_log_outgrows_a_pipe(tmp_path, tiny_config):
    """start_servers' processes log to a file, not to a pipe nobody reads: 400 requests write over 100 KB of
    access-log lines (a pipe holds 64 KB, and a server writing to a full one stops), and the server still answers."""
    import httpx
    from checkpoints import save_checkpoint
    from model import GPT
    ckpt = tmp_path / "s.pt"
    save_checkpoint(ckpt, stage="sft", model=GPT(tiny_config), tldr=tldr.template_info(max_prompt_tokens=40,
                                                                                        max_summary_tokens=4))
    servers = bench.start_servers(ckpt, None, ["serve.py"], 4, "cpu", threads=1)
    try:
        _, url, _ = servers["serve.py"]
        with httpx.Client(base_url=url, timeout=30) as client:
            for _ in range(400):  # each logged with its path, up to 200 characters
                assert client.get("/" + "x" * 300).status_code == 404
            reply = client.post("/v1/completions", json={"prompt": "a post", "max_tokens": 2, "temperature": 0})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
    finally:
        bench.stop_servers(servers)
    assert servers["serve.py"][0].returncode is not None


def test_streaming_connection_parses_events_across_reads_and_keeps_the_connection():
    """The load generator's client against a hand-written HTTP/1.1 server: a chunked response whose events end
    in CRLF pairs and are cut mid-event and between a CR and its LF comes back as the events' data, in order, each
    as soon as it is whole (the server sends nothing more until the client has the first one); the next request
    goes over the same connection; a 404 raises."""
    import asyncio

    body = b'data: {"a": 1}\r\n\r\ndata: {"b": "x y"}\r\n\r\ndata: [DONE]\r\n\r\n'
    # mid-event, between the first event's last CR and its LF, mid-event
    cut = [body[:9], body[9:17], body[17:18], body[18:30], body[30:]]
    connections, requests, late = [], [], []

    async def handle(reader, writer):
        connections.append(writer)
        while not reader.at_eof():
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:  # the client closed the connection
                return
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            requests.append(json.loads(await reader.readexactly(length)))
            if requests[-1].get("missing"):
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno")
                await writer.drain()
                continue
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i, piece in enumerate(cut):  # a chunk per piece, its size line and data in separate writes
                writer.write(b"%x\r\n" % len(piece))
                await writer.drain()
                await asyncio.sleep(0.01)
                writer.write(piece + b"\r\n")
                await writer.drain()
                if i == 2:  # the first event is whole: the client must have it before anything else comes
                    try:
                        await asyncio.wait_for(first_seen.wait(), 2)
                    except asyncio.TimeoutError:
                        late.append(requests[-1])
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    first_seen = asyncio.Event()

    async def collect(connection, body):
        first_seen.clear()
        events = []
        async for event in connection.events("/v1/x", body):
            events.append(event)
            first_seen.set()
        return events

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        connection = bench.StreamingConnection(f"http://127.0.0.1:{port}")
        first = await collect(connection, {"n": 1})
        second = await collect(connection, {"n": 2})
        with pytest.raises(RuntimeError, match="status 404"):
            async for _ in connection.events("/v1/x", {"missing": True}):
                pass
        await connection.close()
        server.close()
        return first, second

    first, second = asyncio.run(main())
    assert first == second == ['{"a": 1}', '{"b": "x y"}', "[DONE]"]
    assert requests == [{"n": 1}, {"n": 2}, {"missing": True}] and len(connections) == 1 and late == []


@pytest.mark.slow
def test_serve_section_against_transformers_serve(tmp_path):
    """The peer side: `transformers serve --continuous-batching` on export.py's folder of the same random
    checkpoint answers the same streamed greedy requests without an error and with serve.py's text."""
    r = bench.main(config_from(bench.Config, bench.PRESETS, "tiny", sections=["serve"], serve_clients=[2],
                               serve_sides=["serve.py", "transformers"], out=str(tmp_path / "serve.json")))
    sv = r["serve"]
    assert sv["texts_agree"] == {"transformers": 1.0}
    for side in ("serve.py", "transformers"):
        st = sv["levels"]["2"][side]
        assert st["errors"] == 0 and st["requests"] == 8 and st["tokens_per_s"] > 0


def test_to_target_counts_tokens_and_training_seconds_by_hand():
    run = {"curve": [(0, 10.0, 0.0), (20, 6.0, 4.0), (40, 5.0, 8.5), (60, 4.8, 12.0)]}
    assert bench.to_target(run, 5.0, 512) == {"tokens": 40 * 512, "seconds": 8.5}
    assert bench.to_target(run, 5.5, 512) == {"tokens": 40 * 512, "seconds": 8.5}
    assert bench.to_target(run, 4.8, 512) == {"tokens": 60 * 512, "seconds": 12.0}


def test_tiny_optimizer_section(tmp_path, capsys):
    """bench.py --sections optimizer on a slice of real text, a few steps: the sweep, the seeds at the best
    rates, a target every best run reaches, and ratios that are what the runs say."""
    from pathlib import Path
    text = tmp_path / "shakespeare.txt"
    real = Path(bench.__file__).resolve().parents[1] / "shared" / "realdata" / "tinyshakespeare" / "input.txt"
    if not real.is_file():
        pytest.skip(f"{real} not here")
    text.write_text(real.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    r = bench.main(config_from(bench.Config, bench.PRESETS, "tiny", sections=["optimizer"], threads=1, opt_text=str(text),
                               opt_corpora=["text"], opt_model="tiny", opt_steps=4, opt_eval_every=2,
                               opt_adamw_lrs=[1e-3, 4e-3], opt_muon_lrs=[0.02], opt_seeds=2, out=str(tmp_path / "b.json")))
    o = r["optimizer"]
    row = o["corpora"]["text"]
    assert [run["lr"] for run in row["sweep"]["adamw"]] == [1e-3, 4e-3] and len(row["sweep"]["muon"]) == 1
    best_adamw = min(row["sweep"]["adamw"], key=lambda run: run["final_val_loss"])["lr"]
    assert all(run["adamw_lr"] == best_adamw for run in row["sweep"]["muon"])  # Muon's AdamW part at AdamW's best rate
    for opt in ("adamw", "muon"):
        best = row["best"][opt]
        assert [run["seed"] for run in best["runs"]] == [0, 1] and len({run["lr"] for run in best["runs"]}) == 1
        assert [step for step, _, _ in best["runs"][0]["curve"]] == [0, 2, 4]
        for run, tokens in zip(best["runs"], best["tokens"]):
            assert min(v for _, v, _ in run["curve"]) <= row["target_val_loss"] and tokens % 512 == 0
    assert row["tokens_ratio"] == pytest.approx(sum(row["best"]["adamw"]["tokens"]) / sum(row["best"]["muon"]["tokens"]))
    assert o["newton_schulz"]["max_abs_difference"] < 0.05  # bfloat16 and float32 iterations agree
    assert "**Optimizers**" in capsys.readouterr().out
