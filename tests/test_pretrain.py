"""pretrain.py: the tiny preset learns the generated shards, N steps == k + resume + (N-k) exactly, a real
2-process torchrun (gloo) matches one process with the same global batch (AdamW and Muon), --optimizer muon
learns, logs both learning rates and resumes exactly, the fp16 + GradScaler path, a NaN loss stops naming the
step, the loader's disjoint/resumable reads, and user errors."""
import json
import math

import numpy as np
import pytest
import torch

import pretrain
from checkpoints import load_checkpoint, save_checkpoint
from common import Runtime, UserError, config_from, mfu
from training import lr_at, optimizer_step
from conftest import ROOT, run_script, run_torchrun, skip_without_cpu_fp16
from model import GPT, GPTConfig, build_model


def tiny_cfg(shards, tmp_path, name="run", **overrides):
    paths = dict(data_dir=str(shards), hellaswag_path="", ckpt=str(tmp_path / f"{name}.pt"), run_name=str(tmp_path / name))
    return config_from(pretrain.Config, pretrain.PRESETS, "tiny", **{**paths, **overrides})


def records(run_dir, kind="train"):
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in records(run_dir)}


# -----------------------------------------------------------------------------
# learning and exact resume, in this process

def test_tiny_loss_falls_within_a_few_dozen_steps(pretrain_shards, tmp_path, capsys):
    cfg = tiny_cfg(pretrain_shards, tmp_path, eval_every=0)
    metrics = pretrain.main(cfg)
    train = records(tmp_path / "run")
    assert [r["step"] for r in train] == list(range(cfg.max_steps))
    first, last = train[0]["loss"], np.mean([r["loss"] for r in train[-5:]])
    assert first > 10.0  # ~ln(50257): a fresh model knows nothing
    assert last < first - 3.0, (first, last)
    for r in train:  # the logged schedule is the recipe's warmup + cosine
        assert r["lr"] == pytest.approx(lr_at(r["step"], cfg.max_lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps))
        assert r["grad_norm"] > 0 and r["tok_per_s"] > 0 and r["dt_ms"] > 0
    evals = records(tmp_path / "run", "eval")
    assert [r["step"] for r in evals] == [0, cfg.max_steps]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 3.0
    out = capsys.readouterr().out
    assert "sample 0: " in out and "hellaswag: (no path) not found, skipped" in out
    assert records(tmp_path / "run", "sample")[-1]["samples"][0].startswith(cfg.sample_prompt)
    ckpt = load_checkpoint(cfg.ckpt, "pretrain")
    assert ckpt["step"] == cfg.max_steps and ckpt["metrics"]["val_loss"] == evals[-1]["val_loss"] == metrics["val_loss"]
    assert {"optimizer", "data_state", "rng"} <= set(ckpt) and "scaler" not in ckpt  # fp32 on CPU: no scaler
    build_model(ckpt, GPT)


def test_resume_is_exact(pretrain_shards, tmp_path):
    kw = dict(max_steps=8, warmup_steps=3, eval_every=4, num_samples=1)
    straight = pretrain.main(tiny_cfg(pretrain_shards, tmp_path, "straight", **kw))
    pretrain.main(tiny_cfg(pretrain_shards, tmp_path, "split", stop_at=5, **kw))
    assert load_checkpoint(tmp_path / "split.pt")["step"] == 5
    resumed = pretrain.main(tiny_cfg(pretrain_shards, tmp_path, "split", resume=True, **kw))
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert list(b) == list(range(8)) and a == b  # exactly equal on CPU
    assert straight["val_loss"] == resumed["val_loss"]
    sa, sb = load_checkpoint(tmp_path / "straight.pt"), load_checkpoint(tmp_path / "split.pt")
    assert sa["data_state"] == sb["data_state"] and sa["step"] == sb["step"] == 8
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])


# -----------------------------------------------------------------------------
# torchrun: 2 gloo processes == 1 process with the same global batch

@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_torchrun_two_processes_match_one(pretrain_shards, tmp_path, optimizer):
    kw = dict(max_steps=4, warmup_steps=2, eval_every=0, num_samples=0, micro_batch=4, total_batch_tokens=256,
              optimizer=optimizer, muon_momentum_warmup=4)
    single = pretrain.main(tiny_cfg(pretrain_shards, tmp_path, "single", **kw))  # 2 accumulation steps
    flags = ["--preset", "tiny", "--data-dir", pretrain_shards, "--hellaswag-path", "", "--ckpt", tmp_path / "ddp.pt",
             "--run-name", tmp_path / "ddp", "--max-steps", 4, "--warmup-steps", 2, "--eval-every", 0,
             "--num-samples", 0, "--micro-batch", 4, "--total-batch-tokens", 256, "--optimizer", optimizer,
             "--muon-momentum-warmup", 4]
    r = run_torchrun("pretrain.py", flags, cwd=tmp_path)
    assert "2 process(es) on cpu" in r.stdout and "x 2 rank(s) x 1 accumulation step(s)" in r.stdout
    one, two = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert list(two) == [0, 1, 2, 3]
    # Same data, same math; only the order of float sums differs (all-reduce vs accumulation), which
    # moves losses by ~1e-6. If both ranks read the same data, losses would differ by far more than 1e-4.
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4, abs=1e-4), (step, one, two)
    assert records(tmp_path / "ddp", "eval")[-1]["val_loss"] == pytest.approx(single["val_loss"], rel=1e-4)
    assert load_checkpoint(tmp_path / "ddp.pt")["data_state"] == load_checkpoint(tmp_path / "single.pt")["data_state"]
    if optimizer == "muon":  # the losses after step 0 follow Muon's updates: each rank made the same one
        # Newton-Schulz runs in bfloat16, whose rounding turns the float-sum-order differences into weight
        # differences of ~1e-3 after 4 steps; a rank stepping on its own gradient would be off by a whole update
        a, b = load_checkpoint(tmp_path / "ddp.pt"), load_checkpoint(tmp_path / "single.pt")
        worst = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
        assert worst < 5e-3, worst


# -----------------------------------------------------------------------------
# --optimizer muon: learns, logs both learning rates, resumes exactly (two ranks: the torchrun test above)

MUON = dict(optimizer="muon", muon_lr=0.02, muon_momentum_warmup=4)


def test_muon_learns_logs_both_rates_and_resumes_exactly(pretrain_shards, tmp_path):
    kw = dict(max_steps=8, warmup_steps=3, eval_every=4, num_samples=0, **MUON)
    straight = pretrain.main(tiny_cfg(pretrain_shards, tmp_path, "straight", **kw))
    pretrain.main(tiny_cfg(pretrain_shards, tmp_path, "split", stop_at=5, **kw))
    resumed = pretrain.main(tiny_cfg(pretrain_shards, tmp_path, "split", resume=True, **kw))
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert list(b) == list(range(8)) and a == b  # exactly equal on CPU: both optimizers' states were restored
    assert straight["val_loss"] == resumed["val_loss"]
    sa, sb = load_checkpoint(tmp_path / "straight.pt"), load_checkpoint(tmp_path / "split.pt")
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    assert set(sa["optimizer"]) == {"muon", "adamw"}
    train = records(tmp_path / "straight")
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    for r in train:
        assert r["muon_lr"] == pytest.approx(r["lr"] * 0.02 / kw.get("max_lr", pretrain.PRESETS["tiny"]["max_lr"]))
        assert r["muon_momentum"] == pytest.approx(0.85 + 0.1 * min(r["step"], 4) / 4)


def test_resuming_with_the_other_optimizer_is_refused(pretrain_shards, tmp_path):
    kw = dict(max_steps=4, warmup_steps=1, eval_every=0, num_samples=0, stop_at=1)
    pretrain.main(tiny_cfg(pretrain_shards, tmp_path, "adam", **kw))
    pretrain.main(tiny_cfg(pretrain_shards, tmp_path, "muon", **kw, **MUON))
    with pytest.raises(UserError, match="trained with --optimizer adamw: resume it with the same optimizer"):
        pretrain.main(tiny_cfg(pretrain_shards, tmp_path, "adam", resume=True, **{**kw, **MUON}))
    with pytest.raises(UserError, match="trained with --optimizer muon"):
        pretrain.main(tiny_cfg(pretrain_shards, tmp_path, "muon", resume=True, **kw))
    pretrain.main(tiny_cfg(pretrain_shards, tmp_path, "adam", resume=True, **kw, ))  # an AdamW checkpoint still resumes
    with pytest.raises(UserError, match="unknown --optimizer 'sgd'"):
        pretrain.main(tiny_cfg(pretrain_shards, tmp_path, optimizer="sgd"))
    with pytest.raises(UserError, match="--muon-momentum must be in"):
        pretrain.main(tiny_cfg(pretrain_shards, tmp_path, muon_momentum=1.0))


# -----------------------------------------------------------------------------
# fp16 + GradScaler and non-finite losses

def test_fp16_gradscaler_runs_and_resumes_on_cpu(pretrain_shards, tmp_path):
    skip_without_cpu_fp16()
    # CPU float16 matmuls are emulated (~10x slower than float32): few tokens, no val loss
    kw = dict(max_steps=3, warmup_steps=1, eval_every=0, num_samples=0, dtype="float16", seq_len=16, micro_batch=2,
              total_batch_tokens=32, val_tokens=0)
    pretrain.main(tiny_cfg(pretrain_shards, tmp_path, "straight", **kw))
    pretrain.main(tiny_cfg(pretrain_shards, tmp_path, "split", stop_at=2, **kw))
    assert load_checkpoint(tmp_path / "split.pt")["scaler"]["scale"] > 1  # the scaler's state is saved...
    pretrain.main(tiny_cfg(pretrain_shards, tmp_path, "split", resume=True, **kw))
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")  # ...and restored exactly
    train = records(tmp_path / "straight")
    assert all(math.isfinite(r["loss"]) and "skipped_steps" in r for r in train)
    assert load_checkpoint(tmp_path / "straight.pt")["scaler"] == load_checkpoint(tmp_path / "split.pt")["scaler"]


def test_overflowing_step_is_skipped_and_counted_not_fatal(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    opt = model.configure_optimizers(0.1, 1e-3)
    x = torch.randint(0, 50257, (2, 16))
    for init_scale, expect_skip in ((2.0**126, True), (2.0**10, False)):  # 10.8 * 2^126 overflows float32
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        scaler.scale(model(x, x)[1]).backward()
        norm, skipped = optimizer_step(model, opt, scaler, lr=1e-3, grad_clip=1.0, loss=1.0, step=0)
        changed = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        assert skipped is expect_skip and changed is not expect_skip
        assert math.isfinite(norm) is not expect_skip
        assert scaler.get_scale() == (init_scale / 2 if expect_skip else init_scale)


def test_nan_loss_stops_the_run_naming_the_step(pretrain_shards, tmp_path):
    kw = dict(max_steps=4, warmup_steps=1, eval_every=0, num_samples=0)
    pretrain.main(tiny_cfg(pretrain_shards, tmp_path, "run", stop_at=2, **kw))
    ckpt = torch.load(tmp_path / "run.pt", weights_only=True)
    ckpt["model"]["transformer.ln_f.weight"][0] = float("nan")
    torch.save(ckpt, tmp_path / "run.pt")
    with pytest.raises(UserError, match=r"loss is nan at step 2: training diverged"):
        pretrain.main(tiny_cfg(pretrain_shards, tmp_path, "run", resume=True, **kw))
    assert load_checkpoint(tmp_path / "run.pt")["step"] == 2  # the last checkpoint is untouched


# -----------------------------------------------------------------------------
# the data loader

@pytest.fixture
def numbered_shards(tmp_path):
    """Shards whose token at global position i is i, so every read can be traced back."""
    sizes, paths, start = (700, 1000, 450), [], 0
    for i, n in enumerate(sizes):
        paths.append(tmp_path / f"train_{i + 1:06d}.npy")
        np.save(paths[-1], np.arange(start, start + n, dtype=np.uint16))
        start += n
    return paths


def test_loader_ranks_read_disjoint_data_and_resume_exactly(numbered_shards):
    B, T = 2, 16
    ranks = [pretrain.ShardLoader(numbered_shards, B, T, rank=r, world_size=2, seed=3) for r in (0, 1)]
    single = pretrain.ShardLoader(numbered_shards, B, T, seed=3, accum=2)  # the same global batch in one process
    assert all(isinstance(s, np.memmap) for s in ranks[0].shards)  # memory-mapped, never copied whole
    for _ in range(100):  # 32 steps per epoch over 3 shards of odd sizes
        (x0, y0), (x1, y1) = (ld.next_batch() for ld in ranks)
        assert torch.equal(y0, x0 + 1) and torch.equal(y1, x1 + 1)  # targets are the next tokens
        assert not set(x0.flatten().tolist()) & set(x1.flatten().tolist())  # ranks never share a token
        # together the two ranks read exactly what one process reads in its two micro-steps
        assert torch.equal(torch.cat([x0, x1]), torch.cat([single.next_batch()[0], single.next_batch()[0]]))
        assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()
    assert ranks[0].state_dict()["epoch"] >= 3
    orders = {tuple(ranks[0].shard_order(e)) for e in range(6)}
    assert len(orders) > 1 and ranks[0].shard_order(4) == pretrain.ShardLoader(numbered_shards, B, T, seed=3).shard_order(4)

    state = ranks[0].state_dict()
    expected = [ranks[0].next_batch()[0] for _ in range(7)]
    again = pretrain.ShardLoader(numbered_shards, B, T, rank=0, world_size=2, seed=3)
    again.load_state_dict(state)
    assert all(torch.equal(a, again.next_batch()[0]) for a in expected)


def test_loader_and_val_set_errors(numbered_shards):
    with pytest.raises(UserError, match="shorter than one optimizer step"):
        pretrain.ShardLoader(numbered_shards, 8, 64, world_size=2)
    loader = pretrain.ShardLoader(numbered_shards, 2, 16)
    with pytest.raises(UserError, match="resume with the same --data-dir"):
        loader.load_state_dict({**loader.state_dict(), "num_shards": 5})
    shards = [np.load(p, mmap_mode="r") for p in numbered_shards]
    seqs = pretrain.val_sequences(shards, 100, 1000)
    assert len(seqs) == 10 and seqs[:3] == [(0, 0), (0, 100), (0, 200)] and (1, 0) in seqs


def test_val_loss_is_the_same_for_any_number_of_ranks(numbered_shards, tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    shards = [np.load(p, mmap_mode="r") for p in numbered_shards]
    seqs = pretrain.val_sequences(shards, 16, 16 * 11)
    rt = lambda rank, world: Runtime(torch.device("cpu"), "cpu", torch.float32, False, rank, rank, world)  # noqa: E731
    whole = pretrain.val_loss(model, shards, seqs, 16, 4, rt(0, 1))
    # without a process group each rank returns its own share's mean: weight them back by sequence count
    parts = [(pretrain.val_loss(model, shards, seqs, 16, 3, rt(r, 3)), len(seqs[r::3])) for r in range(3)]
    assert sum(v * n for v, n in parts) / len(seqs) == pytest.approx(whole, rel=1e-6)


# -----------------------------------------------------------------------------
# starting points and user errors

def test_init_from_a_local_gpt2_directory(pretrain_shards, tmp_path):
    torch.manual_seed(1)
    source = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64))
    source.export_hf(str(tmp_path / "hf"))
    cfg = tiny_cfg(pretrain_shards, tmp_path, init_from=str(tmp_path / "hf"), max_steps=1, num_samples=0)
    pretrain.main(cfg)
    shards = [np.load(p, mmap_mode="r") for p in pretrain.shard_paths(pretrain_shards, "val")]
    seqs = pretrain.val_sequences(shards, cfg.seq_len, cfg.val_tokens)
    rt = Runtime(torch.device("cpu"), "cpu", torch.float32, False, 0, 0, 1)
    expected = pretrain.val_loss(source, shards, seqs, cfg.seq_len, cfg.micro_batch, rt)
    assert records(tmp_path / "run", "eval")[0]["val_loss"] == pytest.approx(expected, rel=1e-5)


def test_user_errors(pretrain_shards, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_script([ROOT / "pretrain.py", "--preset", "tiny", "--data-dir", empty], cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: no train shards (train_NNNNNN.npy) in {empty}; "
                                             f"write them with fineweb.py"]
    with pytest.raises(UserError, match="checkpoint not found"):
        pretrain.main(tiny_cfg(pretrain_shards, tmp_path, resume=True))
    save_checkpoint(tmp_path / "sft.pt", stage="sft", model=GPT(GPTConfig(block_size=64, n_layer=1, n_head=1, n_embd=8)))
    with pytest.raises(UserError, match="is a 'sft' checkpoint; expected pretrain"):
        pretrain.main(tiny_cfg(pretrain_shards, tmp_path, resume=True, ckpt=str(tmp_path / "sft.pt")))
    with pytest.raises(UserError, match="not a positive multiple"):
        pretrain.main(tiny_cfg(pretrain_shards, tmp_path, total_batch_tokens=100))
    with pytest.raises(UserError, match="exceeds the model's block size"):
        pretrain.main(tiny_cfg(pretrain_shards, tmp_path, seq_len=128, total_batch_tokens=512))
    assert mfu(1e9, 6.5e3, 65.0) == pytest.approx(0.1) and mfu(1e9, 1e5, None) is None  # 6.5 of 65 TFLOP/s


# -----------------------------------------------------------------------------
# the small preset on the generated world (the session checkpoint other stages build on)

def test_small_pretrained_model_knows_the_generated_world(small_pretrain_ckpt, pretrain_shards):
    ckpt = load_checkpoint(small_pretrain_ckpt, "pretrain")
    cfg = ckpt["config"]
    # independent reference: the cross-entropy of a unigram model fit on the train shards (what a model
    # learns first); a model below it has learned context, not just token frequencies
    counts = sum(np.bincount(np.load(p), minlength=50304) for p in pretrain.shard_paths(pretrain_shards, "train"))
    probs = (counts + 1) / (counts + 1).sum()
    val = np.load(pretrain.shard_paths(pretrain_shards, "val")[0])[: cfg["val_tokens"]]
    unigram = -np.log(probs[val[1:]]).mean()
    assert ckpt["metrics"]["val_loss"] < unigram - 2.0, (ckpt["metrics"]["val_loss"], unigram)
