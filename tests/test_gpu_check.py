"""gpu_check.py (`make gpu-check`): its CPU dry run at the tiny size measures every part and prints the table
without touching BENCHMARKS.md; on a machine without a CUDA GPU the real check says so and exits 0."""
import json

import pytest
import torch

import gpu_check
import pretrain
from conftest import ROOT, run_script


def test_dry_run_measures_every_part_and_appends_nothing(tmp_path):
    benchmarks, out = tmp_path / "BENCHMARKS.md", tmp_path / "gpu.json"
    r = run_script([ROOT / "gpu_check.py", "--dry-run", "--benchmarks", benchmarks, "--out", out], timeout=300)
    assert r.returncode == 0, r.stderr
    results = json.loads(out.read_text())
    assert {"train", "generate", "hellaswag", "serve", "memory", "pretrain_run"} <= set(results)
    train = results["train"]["variants"]["fp32"]
    assert train["ours"]["per_s"] > 0 and train["hf"]["per_s"] > 0
    assert train["max_loss_diff"] < 1e-3  # same weights and batch: the two models follow one loss trajectory
    assert results["generate"]["batches"]["1"]["agree_hf"] == 1.0  # greedy tokens identical to transformers'
    assert results["serve"]["levels"]["2"]["serve.py"]["errors"] == 0
    assert list(results["memory"]["peak_gb"]) == ["1", "2"]  # every micro-batch ran (no GPU memory on a CPU)
    run = results["pretrain_run"]
    assert run["steps"] == 5 and run["finite"] and run["fell"]
    table = r.stdout
    for row in ("pretraining tokens/s, fp32", "KV-cache generation tokens/s, batch 1", "HellaSwag examples/s",
                "serve.py requests/s at 2 clients", "largest fp16 micro-batch under 16 GB", "pretrain.py 5 steps"):
        assert row in table
    assert not benchmarks.exists()


def test_the_gpu_runs_pretraining_config_is_valid_and_its_data_has_train_shards(tmp_path):
    """What only the GPU run builds, checked on the CPU without training: the 124M pretraining run's Config (as
    pretrain.py checks it) and its generated-world shards."""
    cfg = gpu_check.pretraining_config("gpt2", 200, torch.device("cuda"), True, tmp_path)
    pretrain.check_config(cfg)
    assert (cfg.model, cfg.seq_len, cfg.micro_batch, cfg.total_batch_tokens, cfg.max_steps) == ("gpt2", 1024, 16, 65536, 200)
    assert cfg.compile and cfg.device == "cuda" and cfg.dtype == "auto" and cfg.warmup_steps == 20
    shards = sorted(p.name for p in (tmp_path / "shards").glob("*.npy"))
    assert "val_000000.npy" in shards and len(shards) >= 3  # a validation shard and train shards


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: the real check would run")
def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    benchmarks = tmp_path / "BENCHMARKS.md"
    benchmarks.write_text("# Benchmarks\n")
    assert gpu_check.main(gpu_check.Config(benchmarks=str(benchmarks), out=str(tmp_path / "gpu.json"))) is None
    r = run_script([ROOT / "gpu_check.py", "--benchmarks", benchmarks, "--out", tmp_path / "gpu.json"])
    assert r.returncode == 0 and "no CUDA GPU on this machine, so nothing was measured" in r.stdout
    assert benchmarks.read_text() == "# Benchmarks\n" and not (tmp_path / "gpu.json").exists()
