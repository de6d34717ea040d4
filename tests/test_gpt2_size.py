"""The real `gpt2` size (124M parameters, vocabulary 50,304, context 1,024) through every stage on the CPU, each
as its command with micro-batch 1 and one or two steps: the shape, memory and budget errors only the real size
has. Real data where ../shared/realdata has it (tinyshakespeare, HellaSwag rows, TL;DR posts), the generated
world's comparisons for the preference stages. Each stage's seconds and peak memory (RSS) are printed and
written to stage_costs.json in the test's folder (`make test-slow` prints them; docs/testing.md records them)."""
import json
import os
import subprocess
import sys
import tempfile
import time

import httpx
import pytest
import torch

import bench
import synthetic
from checkpoints import load_lm
from common import get_tokenizer
from conftest import ROOT

REAL = ROOT.parent / "shared" / "realdata"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} is absent (CI puts ../shared beside the clone)")]
POST = ("I (24F) need advice about my roommate (25M), who keeps eating my food. It's been like this for two months "
        "now. I've already tried leaving a polite note on the fridge, but nothing changed. Should I confront him?")


def run_stage(costs: dict, name: str, args: list, timeout: float = 1200) -> str:
    """Run a project command to its end as a user would; record its seconds and its peak RSS (the child's own,
    from wait4) under `name`; return its stdout. A failure shows the command's stderr."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, stdout=out, stderr=err,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"{name} ran past {timeout} s")
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t0
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    assert proc.returncode == 0, f"{name} failed:\n{stderr[-3000:]}"
    costs[name] = {"seconds": round(seconds, 1), "peak_rss_gb": round(usage.ru_maxrss / 1e6, 2)}  # KiB on Linux
    print(f"{name}: {seconds:.1f} s, peak RSS {usage.ru_maxrss / 1e6:.2f} GB", flush=True)
    return stdout


def test_every_stage_at_the_gpt2_size_on_the_cpu(tmp_path):
    costs = {}
    ck = tmp_path / "checkpoints"
    common = ["--device", "cpu", "--ckpt-dir", ck]
    world = tmp_path / "world"
    synthetic.write_all(world, seed=0, **synthetic.PRESETS["tiny"])  # comparisons for the RM and DPO stages

    # --- data: tinyshakespeare into shards (the first 100k tokens are the validation shard)
    shards = tmp_path / "shards"
    run_stage(costs, "fineweb", [ROOT / "fineweb.py", "--input", REAL / "tinyshakespeare" / "input.txt",
                                 "--out-dir", shards, "--shard-tokens", "100000", "--workers", "1"])

    # --- pretrain: step 1, stop; resume for step 2 (the real 1,024-token context, micro-batch 1)
    pre = ["--preset", "gpt2", "--data-dir", shards, "--micro-batch", "1", "--total-batch-tokens", "1024",
           "--max-steps", "2", "--warmup-steps", "1", "--eval-every", "0", "--val-tokens", "2048",
           "--hellaswag-path", "", "--num-samples", "0", "--ckpt", "pretrain.pt", "--run-name", tmp_path / "runs/pretrain",
           *common]
    run_stage(costs, "pretrain (step 1)", [ROOT / "pretrain.py", *pre, "--stop-at", "1"])
    run_stage(costs, "pretrain (resume, step 2)", [ROOT / "pretrain.py", *pre, "--resume"])
    ckpt = torch.load(ck / "pretrain.pt", map_location="cpu", weights_only=True)
    config = ckpt["model_config"]
    assert (config["n_layer"], config["n_embd"], config["vocab_size"], config["block_size"]) == (12, 768, 50304, 1024)
    assert ckpt["step"] == 2

    # --- HellaSwag: the 10 full real rows, both styles
    hs_dir = tmp_path / "hellaswag"
    hs_dir.mkdir()
    (hs_dir / "hellaswag_val.jsonl").symlink_to(REAL / "hellaswag" / "hellaswag_val_first10.jsonl")
    run_stage(costs, "hellaswag (10 rows)", [ROOT / "hellaswag.py", "--preset", "gpt2", "--ckpt", "pretrain.pt",
                                            "--data-dir", hs_dir, "--batch-size", "2", "--out", tmp_path / "hs.json",
                                            *common])
    assert json.loads((tmp_path / "hs.json").read_text())["results"]["harness"]["n"] == 10

    # --- SFT on the real TL;DR posts (512-token prompts, 53-token summaries)
    run_stage(costs, "sft", [ROOT / "sft.py", "--preset", "gpt2", "--init", "pretrain.pt", "--data", REAL / "tldr",
                             "--batch-size", "1", "--micro-batch", "1", "--max-steps", "2", "--warmup-steps", "1",
                             "--eval-every", "0", "--val-examples", "2", "--eval-batch", "2", "--num-samples", "1",
                             "--run-name", tmp_path / "runs/sft", *common])

    # --- reward model and DPO on the generated comparisons
    run_stage(costs, "reward_model", [ROOT / "reward_model.py", "--preset", "gpt2", "--init", "best_sft.pt",
                                      "--data", world / "comparisons", "--sft-data", world / "tldr", "--norm-rows", "4",
                                      "--batch-size", "1", "--micro-batch", "1", "--max-steps", "1", "--warmup-steps", "1",
                                      "--eval-every", "0", "--val-pairs", "4", "--run-name", tmp_path / "runs/rm", *common])
    run_stage(costs, "dpo", [ROOT / "dpo.py", "--preset", "gpt2", "--sft", "best_sft.pt", "--comparisons",
                             world / "comparisons", "--batch-size", "1", "--micro-batch", "1", "--max-steps", "1",
                             "--warmup-steps", "1", "--eval-every", "0", "--val-pairs", "2", "--kl-prompts", "1",
                             "--eval-batch", "2", "--gold", "off", "--run-name", tmp_path / "runs/dpo", *common])

    # --- PPO: one rollout of 2 real posts (policy, reference, value model and reward model: four 124M models)
    run_stage(costs, "ppo", [ROOT / "ppo.py", "--preset", "gpt2", "--sft", "best_sft.pt", "--rm", "reward_model.pt",
                             "--data", REAL / "tldr", "--rollout-batch", "2", "--num-minibatches", "1",
                             "--micro-batch", "1", "--ppo-epochs", "1", "--max-steps", "1", "--eval-every", "0",
                             "--eval-prompts", "2", "--sample-every", "0", "--gold", "off",
                             "--run-name", tmp_path / "runs/ppo", *common])

    # --- summarize, serve (one request), export (and transformers loads it back)
    summary = run_stage(costs, "summarize", [ROOT / "summarize.py", "--ckpt", ck / "ppo_latest.pt", "--device", "cpu",
                                             "--max-new-tokens", "8", POST])
    assert summary.count("\n") == 1  # one summary line (what it says is noise after two steps)
    t0 = time.perf_counter()
    server, url, _ = bench.start_servers(ck / "ppo_latest.pt", None, ["serve.py"], 32, "cpu")["serve.py"]
    try:
        reply = httpx.post(url + "/v1/completions", json={"model": "ppo_latest", "prompt": POST, "max_tokens": 8,
                                                          "temperature": 0}, timeout=120)
        assert reply.status_code == 200, reply.text
    finally:
        server.terminate()
        _, _, usage = os.wait4(server.pid, 0)
    costs["serve (start + 1 request)"] = {"seconds": round(time.perf_counter() - t0, 1),
                                          "peak_rss_gb": round(usage.ru_maxrss / 1e6, 2)}
    print(f"serve: {costs['serve (start + 1 request)']}", flush=True)
    run_stage(costs, "export", [ROOT / "export.py", "--ckpt", ck / "ppo_latest.pt", "--out", tmp_path / "hf"])
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.n_positions == 1024 and hf.config.n_layer == 12
    ours, _ = load_lm(str(ck / "ppo_latest.pt"), dropout=0.0)
    ids = torch.tensor([get_tokenizer().encode_ordinary(POST)])
    with torch.no_grad():
        theirs = hf(ids).logits[0, :, :50257]
        mine = ours.eval()(ids)[0][0, :, :50257]
    assert torch.allclose(theirs, mine, atol=1e-3), (theirs - mine).abs().max()

    (tmp_path / "stage_costs.json").write_text(json.dumps(costs, indent=1))
    print(json.dumps(costs, indent=1))
