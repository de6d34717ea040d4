"""Speed benchmarks, side by side in one run: our GPT against Hugging Face `transformers` GPT-2 with the
same weights, on the same batch, on the same machine.

Sections (`--sections`, each a pure function returning a dict; main prints one markdown table and
writes everything to JSON):
  train      training step tokens/s (forward + backward + AdamW step) of GPT vs GPT2LMHeadModel;
             fp32 on CPU; fp32 / bf16 / fp16 autocast, each with and without torch.compile, and MFU on CUDA
  generate   greedy generation tokens/s at batch 1 and 8: our KV-cache generate vs transformers
             generate(use_cache=True) vs a no-cache loop, and whether their tokens agree
  hellaswag  HellaSwag examples/s: hellaswag.evaluate batched vs one example at a time
  ppo        seconds of one step of ppo.py's own loop: rollout (generation), scoring, update, and the
             rollout's share
  serve      servers under N concurrent streaming clients on loopback (--serve-clients, e.g. 1 8 32), each in its
             own process, the same greedy raw /v1/completions requests to each: serve.py against Hugging
             Face's `transformers serve --continuous-batching` on export.py's folder of the same checkpoint
             (the peer; it needs `accelerate`) and serve.py taking one request at a time (--max-batch 1):
             requests/s, tokens/s, p50/p95 time to first token and latency, errors, and whether their texts
             agree. Not in the default sections.
  optimizer  pretrain.py --optimizer adamw vs muon on real text (--opt-text) and the generated world's
             documents: a learning-rate sweep each, more seeds at the best rate, the tokens and training
             seconds each needs to reach a validation loss both reach, the final loss at a fixed token
             budget; and the Newton-Schulz step in bfloat16 (torch.optim.Muon's) vs float32 on --device.
             Not in the default sections (about 15 minutes on 2 CPU cores).

Every comparison excludes warm-up runs, repeats, reports the median and the range, and alternates the
order of the sides from one round to the next, so that a machine that speeds up or slows down (other
jobs, clocks) favours neither. Ratios are the median of per-round ratios: on a shared machine they hold
where absolute times do not.

    python bench.py --preset tiny                      # tiny CPU run: a smoke test, seconds
    python bench.py --preset small                     # the CPU table of BENCHMARKS.md (a few minutes)
    python bench.py --preset gpt2                      # 124M on CPU at batch 4 x 128 tokens
    python bench.py --preset gpt2 --device cuda --batch-size 16 --seq-len 1024   # one GPU: fp32/bf16/fp16, compile
    python bench.py --preset gpt2 --device cuda --variants fp16 fp16+compile     # a T4
    python bench.py --preset small --sections serve                              # the serving table (about 6 minutes)
    python bench.py --sections optimizer --opt-text ../shared/realdata/tinyshakespeare/input.txt   # AdamW vs Muon

One process on one device by design: there is no torchrun command, because a benchmark of a multi-GPU
run measures the interconnect; run it on each kind of GPU instead.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import export
import fineweb
import hellaswag
import ppo
import pretrain
import serve
import summaries
import synthetic
import tldr
from checkpoints import save_checkpoint
from common import (Runtime, UserError, cli_main, compute_init, config_from, get_tokenizer, print0, select_dtype,
                    write_json)
from model import EOS_ID, GPT, MODEL_PRESETS, TOKENIZER_VOCAB, ScoreModel, model_config
from training import read_log


@dataclass
class Config:
    preset: str = "small"           # tiny | small | gpt2: model size, batch and repeats together
    model: str = "small"            # model size from model.MODEL_PRESETS (random init: speed does not depend on weights)
    batch_size: int = 8             # training batch in sequences
    seq_len: int = 256              # training sequence length in tokens
    train_steps: int = 1            # optimizer steps per timed training run
    variants: list[str] = field(default_factory=lambda: ["auto"])  # training precisions: fp32 bf16 fp16, each optionally +compile; auto: fp32 on CPU, all on CUDA
    gen_batch_sizes: list[int] = field(default_factory=lambda: [1, 8])  # generation batch sizes
    gen_tokens: int = 128           # new tokens per generation run (EOS never stops a run, so every run makes all of them)
    prompt_len: int = 32            # prompt tokens per generation row
    no_cache_max_batch: int = 8     # largest generation batch that also times the no-cache loop (its cost grows with the square of the length)
    gen_dtype: str = "auto"         # generation precision: auto (fp32 on CPU, bf16/fp16 on CUDA) | float32 | bfloat16 | float16
    hellaswag_rows: int = 64        # HellaSwag rows timed (generated by synthetic.py unless --hellaswag-file)
    hellaswag_file: str = ""        # a hellaswag_{split}.jsonl to time instead of generated rows
    hellaswag_batch: int = 16       # examples per forward in the batched side
    hellaswag_style: str = "completion"  # completion | harness | both (as hellaswag.py)
    ppo_rollouts: int = 16          # PPO section: prompts per step
    ppo_prompt_tokens: int = 200    # PPO section: prompt budget (the small TL;DR preset's)
    ppo_response_tokens: int = 53   # PPO section: response tokens at most (TL;DR's 53)
    serve_clients: list[int] = field(default_factory=lambda: [1, 8, 32])  # serve section: concurrent streaming clients, one level each
    serve_requests: int = 64        # serve section: requests per level, side and round (at least 2 per client)
    serve_seconds: float = 60.0     # serve section: a level's round stops after this long even if requests remain
    serve_rounds: int = 2           # serve section: rounds per level; sides alternate order from round to round
    serve_tokens: int = 53          # serve section: summary tokens per request (TL;DR's budget; random weights rarely stop early)
    serve_max_batch: int = 32       # serve section: the batching side's --max-batch
    serve_sides: list[str] = field(default_factory=lambda: ["serve.py", "transformers", "one_at_a_time"])  # serve section: serve.py first, then what it is compared with: transformers (`transformers serve --continuous-batching`), one_at_a_time (serve.py --max-batch 1)
    serve_ckpt: str = ""            # serve section: serve this summarizer checkpoint instead of random `--model` weights
    opt_corpora: list[str] = field(default_factory=lambda: ["text", "generated"])  # optimizer section: text (--opt-text) and/or generated (synthetic.py's pretraining documents)
    opt_text: str = "data/tinyshakespeare/input.txt"  # optimizer section: a UTF-8 text file (tinyshakespeare); its first 10% of tokens are the validation set
    opt_model: str = "small"        # optimizer section: model size trained (pretrain.py's small preset otherwise: 512-token steps)
    opt_steps: int = 200            # optimizer section: steps per run (the schedule's length)
    opt_adamw_lrs: list[float] = field(default_factory=lambda: [1e-3, 2e-3, 4e-3])  # optimizer section: AdamW peak learning rates swept
    opt_muon_lrs: list[float] = field(default_factory=lambda: [0.005, 0.01, 0.02, 0.04])  # optimizer section: Muon peak learning rates swept (AdamW on the rest at the best AdamW rate)
    opt_seeds: int = 2              # optimizer section: seeds at each optimizer's best rate (init and data order)
    opt_eval_every: int = 20        # optimizer section: steps between validation losses (of 4,096 tokens)
    sections: list[str] = field(default_factory=lambda: ["train", "generate", "hellaswag", "ppo"])  # what to run: train generate hellaswag ppo serve optimizer
    repeats: int = 5                # timed runs per side (median and range over these)
    warmup: int = 1                 # untimed runs per side first (allocator, caches, torch.compile)
    device: str = "auto"            # auto | cpu | cuda | mps
    threads: int = 0                # torch CPU threads (0: torch's default, one per core; 1 on a machine busy with other jobs)
    seed: int = 0                   # weights, batches and prompts
    out: str = ""                   # JSON path ('' = runs/bench/<preset>-<device>.json)


PRESETS = {
    "tiny": dict(model="tiny", batch_size=2, seq_len=32, gen_tokens=16, prompt_len=8, hellaswag_rows=8,
                 hellaswag_batch=4, repeats=1, warmup=1, ppo_rollouts=4, ppo_prompt_tokens=40, ppo_response_tokens=8,
                 serve_clients=[1, 4], serve_requests=8, serve_seconds=20.0, serve_rounds=1, serve_tokens=8,
                 serve_sides=["serve.py", "one_at_a_time"]),
    "small": dict(model="small", batch_size=8, seq_len=256, gen_tokens=128, prompt_len=32, hellaswag_rows=64,
                  repeats=7, warmup=1),
    "gpt2": dict(model="gpt2", batch_size=4, seq_len=128, gen_tokens=128, prompt_len=32, no_cache_max_batch=1,
                 hellaswag_rows=32, hellaswag_batch=8, repeats=5, warmup=1),
}

# Speed targets on a CPU: (where the paired ratio is in the results, minimum, what it compares)
TARGETS = [
    (("train", "variants", "fp32", "ratio"), 1.0, "training step: ours / transformers tokens/s"),
    (("generate", "batches", "8", "ratio_vs_hf"), 1.5, "generation at batch 8: ours / transformers generate"),
    (("generate", "batches", "8", "ratio_vs_no_cache"), 5.0, "generation at batch 8: ours / no-cache loop"),
    (("generate", "batches", "1", "ratio_vs_no_cache"), 5.0, "generation at batch 1: ours / no-cache loop"),
    (("hellaswag", "ratio"), 3.0, "HellaSwag: batched / one-by-one examples/s"),
    (("serve", "levels", "1", "ratio", "transformers"), 1.0, "serving 1 streaming client: serve.py / transformers serve requests/s"),
    (("serve", "levels", "8", "ratio", "transformers"), 2.0, "serving 8 streaming clients: serve.py / transformers serve requests/s"),
    (("serve", "levels", "32", "ratio", "transformers"), 2.0, "serving 32 streaming clients: serve.py / transformers serve requests/s"),
    (("serve", "levels", "8", "ratio", "one_at_a_time"), 3.0, "serving 8 streaming clients: serve.py batched / one at a time requests/s"),
]

DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# -----------------------------------------------------------------------------
# timing: alternating sides, warm-up excluded, median and range

def race(sides: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
         sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds of `repeats` runs of every side. Round r runs the sides in order, round r+1 in reverse,
    so that drift in machine speed hits each side equally; `warmup` runs per side come first, untimed."""
    names = list(sides)
    for name in names:
        for _ in range(warmup):
            sides[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync()
            t0 = time.perf_counter()
            sides[name]()
            sync()
            seconds[name].append(time.perf_counter() - t0)
    return seconds


def rate_stats(seconds: list[float], work: float, unit: str) -> dict:
    """Median and range of a rate (`work` units per run) over runs of the given durations."""
    med = statistics.median(seconds)
    return {"unit": unit, "work_per_run": work, "runs": len(seconds), "seconds": seconds,
            "median_s": med, "min_s": min(seconds), "max_s": max(seconds),
            "per_s": work / med, "per_s_min": work / max(seconds), "per_s_max": work / min(seconds)}


def paired_ratio(fast: list[float], slow: list[float]) -> dict:
    """How many times faster `fast` is than `slow`: the median of per-round ratios slow/fast (the two
    runs of a round are adjacent in time, so their ratio cancels drift) and their range."""
    ratios = [s / f for f, s in zip(fast, slow)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def make_sync(device: torch.device) -> Callable[[], None]:
    """What a timer waits on: the GPU's queue (CUDA runs asynchronously), nothing on a CPU."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


# -----------------------------------------------------------------------------
# the two models with the same weights

def twin_models(cfg: Config, device: torch.device, with_hf: bool = True) -> tuple[GPT, torch.nn.Module | None]:
    """Our GPT at random init and the same weights in transformers' GPT2LMHeadModel, through the
    project's own exporter (export_hf) and transformers' own loader (None when no section compares)."""
    from transformers import GPT2LMHeadModel
    torch.manual_seed(cfg.seed)
    ours = GPT(model_config(cfg.model))
    if not with_hf:
        return ours.to(device), None
    with tempfile.TemporaryDirectory() as tmp:
        ours.export_hf(tmp)
        hf = GPT2LMHeadModel.from_pretrained(tmp)
    # greedy runs of a fixed length: EOS must not end a transformers run early
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = EOS_ID
    return ours.to(device), hf.to(device)


def resolve_variants(variants: list[str], device: torch.device) -> list[str]:
    """`auto` → fp32 on CPU/MPS; on CUDA fp32 and the 16-bit autocasts the GPU runs natively
    (bf16 needs capability >= 8.0: a T4 emulates it), each with and without torch.compile."""
    if variants != ["auto"]:
        for v in variants:
            precision, _, extra = v.partition("+")
            if precision not in DTYPE_NAMES or extra not in ("", "compile"):
                raise UserError(f"unknown variant {v!r}; use fp32, bf16 or fp16, optionally with +compile")
        return variants
    if device.type != "cuda":
        return ["fp32"]
    halves = ["bf16", "fp16"] if torch.cuda.get_device_capability(device) >= (8, 0) else ["fp16"]
    return ["fp32", "fp32+compile"] + [v for h in halves for v in (h, h + "+compile")]


# -----------------------------------------------------------------------------
# section 1: training step

def train_step(loss_fn: Callable[[], torch.Tensor], optimizer, rt: Runtime, losses: list[float]):
    """One optimizer step as every stage runs it (zero grads, forward + loss under autocast, scaled
    backward, step); the loss is recorded so that the two sides' trajectories can be compared."""
    scaler = rt.grad_scaler()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with rt.autocast():
            loss = loss_fn()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    return step


def bench_train(cfg: Config, ours: GPT, hf: torch.nn.Module, rt: Runtime) -> dict:
    """tokens/s of a training step, ours vs transformers, for each precision variant."""
    T, B, device = cfg.seq_len, cfg.batch_size, rt.device
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randint(0, TOKENIZER_VOCAB, (B, T + 1), generator=g).to(device)
    idx = x[:, :T]
    # the same T-1 predictions on both sides: transformers shifts its labels inside, ours are shifted here
    targets = x[:, 1:T + 1].clone()
    targets[:, -1] = -1
    flops_per_token = ours.flops_per_token(T)
    peak = rt.peak_tflops()
    tokens = B * T * cfg.train_steps
    results = {"batch_size": B, "seq_len": T, "train_steps": cfg.train_steps, "tokens_per_run": tokens,
               "flops_per_token": flops_per_token, "peak_tflops": peak, "variants": {}}
    initial = {"ours": {k: v.clone() for k, v in ours.state_dict().items()},
               "hf": {k: v.clone() for k, v in hf.state_dict().items()}}
    for variant in resolve_variants(cfg.variants, device):
        vrt = dataclasses.replace(rt, dtype=DTYPE_NAMES[variant.partition("+")[0]])
        ours.load_state_dict(initial["ours"])  # every variant starts from the same weights
        hf.load_state_dict(initial["hf"])
        ours.train()
        hf.train()
        m_ours, m_hf = (torch.compile(ours), torch.compile(hf)) if variant.endswith("+compile") else (ours, hf)
        losses = {"ours": [], "hf": []}
        sides = {}
        for name, model, loss_fn in (("ours", ours, lambda: m_ours(idx, targets=targets)[1]),
                                     ("hf", hf, lambda: m_hf(input_ids=idx, labels=idx).loss)):
            # one AdamW for both: configure_optimizers reads nothing but .parameters() (decay on 2-D
            # weights, fused on CUDA), so transformers' model gets exactly our optimizer
            opt = GPT.configure_optimizers(model, weight_decay=0.1, learning_rate=6e-4, device_type=device.type)
            step = train_step(loss_fn, opt, vrt, losses[name])
            sides[name] = lambda step=step: [step() for _ in range(cfg.train_steps)]
        seconds = race(sides, cfg.repeats, cfg.warmup, make_sync(device))
        row = {side: rate_stats(s, tokens, "tokens") for side, s in seconds.items()}
        for side in ("ours", "hf"):
            row[side]["step_ms"] = 1000 * row[side]["median_s"] / cfg.train_steps
            row[side]["mfu"] = flops_per_token * row[side]["per_s"] / (peak * 1e12) if peak else None
        row["ratio"] = paired_ratio(seconds["ours"], seconds["hf"])
        # same weights, batch and optimizer: both sides must follow the same loss trajectory
        row["losses_ours"], row["losses_hf"] = losses["ours"], losses["hf"]
        row["max_loss_diff"] = max(abs(a - b) for a, b in zip(losses["ours"], losses["hf"]))
        results["variants"][variant] = row
    ours.load_state_dict(initial["ours"])
    hf.load_state_dict(initial["hf"])
    return results


# -----------------------------------------------------------------------------
# section 2: generation

@torch.no_grad()
def no_cache_greedy(model: GPT, idx: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding without a cache: every token re-runs the whole sequence (the projection only
    at the last position, as anyone would). The baseline the KV cache exists to beat."""
    for _ in range(new_tokens):
        logits, _ = model(idx, logits_at=slice(-1, None))
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx[:, -new_tokens:]


def bench_generate(cfg: Config, ours: GPT, hf: torch.nn.Module, rt: Runtime) -> dict:
    """Greedy tokens/s of ours (KV cache) vs transformers generate(use_cache=True) vs a no-cache loop."""
    device = rt.device
    grt = dataclasses.replace(rt, dtype=select_dtype(cfg.gen_dtype, device.type))
    ours.eval()
    hf.eval()
    results = {"prompt_len": cfg.prompt_len, "new_tokens": cfg.gen_tokens,
               "dtype": str(grt.dtype).removeprefix("torch."), "batches": {}}
    for B in cfg.gen_batch_sizes:
        g = torch.Generator().manual_seed(cfg.seed + B)
        prompt = torch.randint(0, TOKENIZER_VOCAB, (B, cfg.prompt_len), generator=g).to(device)
        ones = torch.ones_like(prompt)
        n = cfg.gen_tokens

        def run_ours():
            with grt.autocast():
                return ours.generate(prompt, ones, max_new_tokens=n, temperature=0, eos_id=None)[0]

        def run_hf():
            with grt.autocast(), torch.no_grad():
                out = hf.generate(input_ids=prompt, attention_mask=ones, max_new_tokens=n,
                                  do_sample=False, use_cache=True)
            return out[:, cfg.prompt_len:]

        def run_no_cache():
            with grt.autocast():
                return no_cache_greedy(ours, prompt, n)

        sides = {"ours": run_ours, "hf": run_hf}
        if B <= cfg.no_cache_max_batch:
            sides["no_cache"] = run_no_cache
        outputs = {name: fn() for name, fn in sides.items()}  # the agreement check doubles as a warm-up
        seconds = race(sides, cfg.repeats, max(0, cfg.warmup - 1), make_sync(device))
        row = {side: rate_stats(s, B * n, "tokens") for side, s in seconds.items()}
        for other in [name for name in sides if name != "ours"]:
            row[f"ratio_vs_{other}"] = paired_ratio(seconds["ours"], seconds[other])
            # share of generated tokens equal to ours (1.0: identical greedy continuations)
            row[f"agree_{other}"] = (outputs[other].cpu() == outputs["ours"].cpu()).float().mean().item()
        results["batches"][str(B)] = row
    return results


# -----------------------------------------------------------------------------
# section 3: HellaSwag

def hellaswag_rows(cfg: Config) -> tuple[list[dict], str]:
    """Rows to time and where they came from: a real file, or the generated world (synthetic.py)."""
    if cfg.hellaswag_file:
        return hellaswag.load_rows(cfg.hellaswag_file, limit=cfg.hellaswag_rows), cfg.hellaswag_file
    return synthetic.make_hellaswag(seed=cfg.seed, num=cfg.hellaswag_rows, split="val"), "synthetic.make_hellaswag"


def bench_hellaswag(cfg: Config, ours: GPT, rt: Runtime) -> dict:
    """Examples/s of hellaswag.evaluate batched vs one example per forward; both must score alike."""
    rows, source = hellaswag_rows(cfg)
    if not rows:
        raise UserError(f"no HellaSwag rows in {source}")
    hrt = dataclasses.replace(rt, dtype=select_dtype("auto", rt.device_type))  # as hellaswag.py runs it
    results_of = {}

    def side(batch_size):
        def run():
            results_of[batch_size] = hellaswag.evaluate(ours, rows, rt=hrt, style=cfg.hellaswag_style,
                                              batch_size=batch_size, progress=False)
        return run

    seconds = race({"batched": side(cfg.hellaswag_batch), "one_by_one": side(1)}, cfg.repeats, cfg.warmup,
                   make_sync(rt.device))
    res = {"rows": len(rows), "source": source, "style": cfg.hellaswag_style, "batch_size": cfg.hellaswag_batch,
           "dtype": str(hrt.dtype).removeprefix("torch.")}
    res.update({side: rate_stats(s, len(rows), "examples") for side, s in seconds.items()})
    res["ratio"] = paired_ratio(seconds["batched"], seconds["one_by_one"])
    batched, single = results_of[cfg.hellaswag_batch], results_of[1]
    res["acc_batched"] = {s: r["acc"] for s, r in batched.items()}
    res["acc_one_by_one"] = {s: r["acc"] for s, r in single.items()}
    return res


def bench_ppo(cfg: Config, ours: GPT, rt: Runtime) -> dict:
    """Seconds of ppo.py's own loop per step, split into rollout (KV-cache generation), scoring
    (policy/reference log-probs, values, reward in one forward each) and update (--ppo-epochs x
    minibatches), read from its per-step log. The policy, reference, reward and value models are `ours`
    (the reward model is its trunk with a fresh head), prompts are generated TL;DR posts."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthetic.write_all(tmp / "data", seed=cfg.seed, **synthetic.PRESETS["tiny"])
        info = tldr.template_info(max_prompt_tokens=cfg.ppo_prompt_tokens, max_summary_tokens=cfg.ppo_response_tokens)
        save_checkpoint(tmp / "sft.pt", stage="sft", model=ours, tldr=info)
        rm = ScoreModel.from_lm_state(ours.config, ours.state_dict())
        save_checkpoint(tmp / "rm.pt", stage="reward_model", model=rm, tldr=info,
                        reward_norm={"bias_shift": 0.0, "std": 1.0})
        run = ppo.Config(sft=str(tmp / "sft.pt"), rm=str(tmp / "rm.pt"), data=str(tmp / "data" / "tldr"),
                         response_length=cfg.ppo_response_tokens, rollout_batch=cfg.ppo_rollouts,
                         num_minibatches=2, micro_batch=max(1, cfg.ppo_rollouts // 2), ppo_epochs=4,
                         max_steps=cfg.warmup + cfg.repeats, eval_every=0, eval_prompts=1, sample_every=0,
                         save_every=0, gold="off", max_approx_kl=0.0, ckpt_dir=str(tmp), run_name=str(tmp / "run"),
                         device=str(rt.device.type), dtype="float32", compile=False, seed=cfg.seed)
        ppo.main(run)
        steps = read_log(tmp / "run" / "log.jsonl")
    steps = [r for r in steps if r["kind"] == "train"][cfg.warmup:]
    parts = {"rollout": "t_gen", "scoring": "t_score", "update": "t_update"}
    res = {"rollouts": cfg.ppo_rollouts, "prompt_tokens": cfg.ppo_prompt_tokens,
           "response_tokens": cfg.ppo_response_tokens, "steps": len(steps)}
    for name, key in parts.items():
        seconds = [r[key] for r in steps]
        res[name] = {"seconds": seconds, "median_s": statistics.median(seconds)}
    total = [sum(r[key] for key in parts.values()) for r in steps]
    res["total_median_s"] = statistics.median(total)
    res["rollout_share"] = statistics.median(r["t_gen"] / t for r, t in zip(steps, total))
    res["gen_tok_per_s"] = statistics.median(r["gen_tok_per_s"] for r in steps)
    return res


# -----------------------------------------------------------------------------
# serving: serve.py under concurrent streaming clients

def _percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by linear interpolation between order statistics; None for no values."""
    if not values:
        return None
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(pos)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (pos - lo)


SERVE_SIDES = ("serve.py", "transformers", "one_at_a_time")


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_servers(ckpt: Path, export_dir: Path | None, sides: list[str], max_batch: int, device: str,
                  threads: int = 0) -> dict:
    """Each side's server in its own process on a free loopback port, all starting at once: {side: (process,
    base URL, model name)} once every /health answers 200. serve.py sides get --threads; every side gets
    OMP_NUM_THREADS=threads (when set), so that the peer's torch uses as many threads."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    servers, logs = {}, {}
    for side in sides:
        port = _free_port()
        if side == "transformers":
            cli = shutil.which("transformers") or str(Path(sys.executable).with_name("transformers"))
            cmd = [cli, "serve", str(export_dir), "--continuous-batching", "--device", device, "--host", "127.0.0.1",
                   "--port", str(port)]
            model = str(export_dir)
        else:
            cmd = [sys.executable, str(Path(__file__).with_name("serve.py")), "--ckpt", str(ckpt), "--port", str(port),
                   "--max-batch", str(1 if side == "one_at_a_time" else max_batch), "--device", device,
                   "--threads", str(threads)]
            model = ckpt.stem
        # the log goes to a file: a pipe nobody reads fills up (64 KB of access-log lines) and blocks the server
        logs[side] = tempfile.TemporaryFile("w+")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=logs[side], text=True, env=env)
        servers[side] = (proc, f"http://127.0.0.1:{port}", model)
    deadline = time.time() + 180
    try:
        for side, (proc, url, _) in servers.items():
            if not serve.wait_until_serving(url, proc, deadline - time.time()):
                stop_servers(servers)
                logs[side].seek(0)
                raise UserError(f"the {side} server did not start: {logs[side].read().strip()[-300:]}"
                                if proc.poll() is not None
                                else f"the {side} server did not answer /health within 180 s")
    finally:
        for log in logs.values():  # each server writes on through its own descriptor
            log.close()
    return servers


def stop_servers(servers: dict):
    """Stop start_servers' processes: each is asked to end (SIGTERM), and killed if it has not within 30 s."""
    for proc, _, _ in servers.values():
        proc.terminate()
    for proc, _, _ in servers.values():
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _Response:
    """One HTTP response as httptools parses it (the parser calls these methods): the body received and not yet
    read, whether the headers and the whole message are in, and whether the connection stays open after it."""

    def __init__(self):
        import httptools
        self.parser = httptools.HttpResponseParser(self)
        self.body, self.headers_done, self.done, self.keep_alive = bytearray(), False, False, False

    def on_headers_complete(self):
        self.headers_done = True

    def on_body(self, piece: bytes):
        self.body += piece

    def on_message_complete(self):  # the parser forgets keep-alive once this returns
        self.done, self.keep_alive = True, self.parser.should_keep_alive()


class StreamingConnection:
    """One keep-alive HTTP/1.1 connection of a load-generating client: POST a JSON body, get the Server-Sent
    Events of the response as they arrive. The client shares the machine's cores with the servers it measures,
    so it is kept lean: httptools' C parser instead of httpx's pure-Python one, which spent 8-9 ms of CPU per
    53-chunk stream on a 2-core EPYC (this: 2-3 ms), a fifth of a core at 32 clients (docs/benchmarks.md)."""

    def __init__(self, url: str):
        host_port = url.split("://", 1)[-1].rstrip("/")
        self.host, _, port = host_port.partition(":")
        self.port = int(port or 80)
        self.reader = self.writer = None

    async def close(self):
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def events(self, path: str, body: dict):
        """Yield the data of each event of the response (str); a status other than 200 raises RuntimeError."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode()
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (path.encode(), self.host.encode(), self.port, len(data), data))
        response = _Response()
        parser, pending = response.parser, b""
        try:
            while not response.done:
                received = await self.reader.read(1 << 16)
                if not received:
                    raise ConnectionError("the server closed the connection")
                parser.feed_data(received)
                if response.headers_done and parser.get_status_code() != 200:
                    raise RuntimeError(f"status {parser.get_status_code()}")
                if response.body:  # a CRLF may arrive split between two reads: normalized once whole
                    pending = (pending + bytes(response.body)).replace(b"\r\n", b"\n")
                    response.body.clear()
                    *ready, pending = pending.split(b"\n\n")
                    for event in ready:
                        for line in event.decode().split("\n"):
                            if line.startswith("data:"):
                                yield line[5:].strip()
            if not response.keep_alive:
                await self.close()
        except BaseException:
            await self.close()  # a response read halfway leaves the connection unusable
            raise


async def _load(url: str, model: str, prompts: list[str], clients: int, requests: int, seconds: float,
                tokens: int) -> dict:
    """`clients` closed-loop clients, each streaming one greedy raw completion after another (OpenAI's
    /v1/completions, the usage in a last chunk) over its own keep-alive connection, until `requests` have been
    sent or `seconds` have passed: per request the time to its first text and to its end."""
    import httptools
    sent, ttft, latency, errors, made = 0, [], [], 0, 0
    start = time.perf_counter()

    async def one(connection: StreamingConnection, body: dict) -> tuple[float | None, int]:
        t0, first, count = time.perf_counter(), None, None
        async with contextlib.aclosing(connection.events("/v1/completions", body)) as events:
            async for data in events:
                if data == "[DONE]":
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(chunk["error"])
                if first is None and any(c.get("text") for c in chunk.get("choices", [])):
                    first = time.perf_counter() - t0
                if chunk.get("usage"):
                    count = chunk["usage"]["completion_tokens"]
        if count is None:
            raise RuntimeError("no usage chunk")
        return first, count

    async def client():
        nonlocal sent, errors, made
        connection = StreamingConnection(url)
        try:
            while sent < requests and time.perf_counter() - start < seconds:
                body = {"model": model, "prompt": prompts[sent % len(prompts)], "max_tokens": tokens,
                        "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
                sent += 1
                t0 = time.perf_counter()
                try:
                    first, count = await asyncio.wait_for(one(connection, body), max(60.0, seconds))
                except (OSError, asyncio.TimeoutError, httptools.HttpParserError, RuntimeError, KeyError,
                        ValueError):
                    errors += 1
                    continue
                made += count
                ttft.append(first if first is not None else time.perf_counter() - t0)
                latency.append(time.perf_counter() - t0)
        finally:
            await connection.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return {"requests": len(latency), "errors": errors, "seconds": time.perf_counter() - start,
            "tokens": made, "ttft": ttft, "latency": latency}


def _texts(url: str, model: str, prompts: list[str], tokens: int) -> list[str | None]:
    """Each prompt's greedy completion, not streamed (None where the server failed)."""
    import httpx
    out = []
    for prompt in prompts:
        r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": tokens,
                                                      "temperature": 0}, timeout=120)
        out.append(r.json()["choices"][0]["text"] if r.status_code == 200 else None)
    return out


def _merge_rounds(rounds: list[dict]) -> dict:
    total_s = sum(r["seconds"] for r in rounds)
    ttft = [t for r in rounds for t in r["ttft"]]
    latency = [t for r in rounds for t in r["latency"]]
    done = sum(r["requests"] for r in rounds)
    return {"requests": done, "errors": sum(r["errors"] for r in rounds), "seconds": total_s,
            "requests_per_s": done / total_s, "tokens_per_s": sum(r["tokens"] for r in rounds) / total_s,
            "ttft_p50_s": _percentile(ttft, 0.5), "ttft_p95_s": _percentile(ttft, 0.95),
            "latency_p50_s": _percentile(latency, 0.5), "latency_p95_s": _percentile(latency, 0.95),
            "rounds_requests_per_s": [r["requests"] / r["seconds"] for r in rounds]}


def bench_serve(cfg: Config, ours: GPT, rt: Runtime) -> dict:
    """The --serve-sides servers on one summarizer (--serve-ckpt, or `ours` saved with a summary budget of
    --serve-tokens), each in its own process with --threads torch threads; the peer serves export.py's folder of
    that checkpoint. Prompts: generated TL;DR posts in the checkpoint's template, sent as raw text. For each
    client count, rounds that alternate the sides' order, each a closed loop of streaming requests."""
    sides = list(dict.fromkeys(cfg.serve_sides))
    if not sides or sides[0] != "serve.py" or any(s not in SERVE_SIDES for s in sides):
        raise UserError(f"--serve-sides must start with serve.py and name only {', '.join(SERVE_SIDES)}, got {sides}")
    if "transformers" in sides and importlib.util.find_spec("accelerate") is None:
        # `transformers serve --continuous-batching` needs it
        raise UserError("the transformers side needs accelerate (pip install accelerate), or leave it out: "
                        "--serve-sides serve.py one_at_a_time")
    world = synthetic.make_world(seed=cfg.seed, num_posts=400)["train"]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(cfg.serve_ckpt) if cfg.serve_ckpt else Path(tmp) / "bench_summarizer.pt"
        if not cfg.serve_ckpt:
            save_checkpoint(ckpt, stage="sft", model=ours, tldr=tldr.template_info(
                max_prompt_tokens=cfg.ppo_prompt_tokens, max_summary_tokens=cfg.serve_tokens))
        summarizer = summaries.Summarizer.load(ckpt)
        tok = get_tokenizer()
        prompts = [tok.decode(summarizer.prompt(tldr.Post(p.post, p.title, p.subreddit), cfg.serve_tokens)[0])
                   for p in world]
        export_dir = None
        if "transformers" in sides:
            export_dir = Path(tmp) / "export"
            export.main(config_from(export.Config, None, None, ckpt=str(ckpt), out=str(export_dir)))
        servers = start_servers(ckpt, export_dir, sides, cfg.serve_max_batch, str(rt.device), cfg.threads)
        try:
            texts = {side: _texts(url, model, prompts[:4], cfg.serve_tokens) for side, (_, url, model) in servers.items()}
            for side, (_, url, model) in servers.items():  # warm-up: first-call allocations and thread start
                asyncio.run(_load(url, model, prompts, 2, 2, 60.0, cfg.serve_tokens))
            levels = {}
            for clients in cfg.serve_clients:
                requests = max(cfg.serve_requests, 2 * clients)
                rounds = {side: [] for side in sides}
                for r in range(cfg.serve_rounds):
                    for side in (sides if r % 2 == 0 else sides[::-1]):
                        _, url, model = servers[side]
                        rounds[side].append(asyncio.run(_load(url, model, prompts, clients, requests,
                                                              cfg.serve_seconds, cfg.serve_tokens)))
                level = {side: _merge_rounds(rs) for side, rs in rounds.items()}
                level["ratio"] = {other: paired_ratio([1 / x for x in level["serve.py"]["rounds_requests_per_s"]],
                                                      [1 / x for x in level[other]["rounds_requests_per_s"]])
                                  for other in sides[1:]}
                levels[str(clients)] = level
                print0(f"bench: serve {clients} clients: " + ", ".join(
                    f"{side} {level[side]['requests_per_s']:.2f}" for side in sides) + " requests/s")
        finally:
            stop_servers(servers)
    agree = {side: sum(a == b for a, b in zip(texts["serve.py"], texts[side])) / len(texts["serve.py"])
             for side in sides[1:]}
    return {"model": cfg.serve_ckpt or f"random {cfg.model}", "tokens": cfg.serve_tokens, "sides": sides,
            "max_batch": cfg.serve_max_batch, "rounds": cfg.serve_rounds, "levels": levels, "texts_agree": agree}


# -----------------------------------------------------------------------------
# section 6: optimizers - pretrain.py --optimizer adamw vs muon, tokens and seconds to a validation loss

def optimizer_corpus(cfg: Config, name: str, work: Path) -> Path:
    """A folder of fineweb.py shards: `text` (--opt-text as one document; shards of a tenth of its tokens,
    so the first - the validation set - is its first 10%) or `generated` (synthetic.py's pretraining
    documents, the small preset's 100k-token shards)."""
    out = work / name
    if name == "text":
        path = Path(cfg.opt_text)
        if not path.is_file():
            raise UserError(f"--opt-text {path}: no such file (tinyshakespeare: https://raw.githubusercontent.com/"
                            f"karpathy/char-rnn/master/data/tinyshakespeare/input.txt)")
        tokens = len(get_tokenizer().encode_ordinary(path.read_text(encoding="utf-8"))) + 1  # + EOT
        flags = dict(input=[str(path)], shard_tokens=-(-tokens // 10))
    else:
        world = work / "world"
        synthetic.main(synthetic.Config(out=str(world), seed=cfg.seed))
        flags = dict(input=[str(world / "pretrain.jsonl")], shard_tokens=fineweb.PRESETS["small"]["shard_tokens"])
    fineweb.main(config_from(fineweb.Config, None, None, out_dir=str(out), workers=1, **flags))
    return out


def optimizer_run(cfg: Config, shards: Path, work: Path, optimizer: str, lr: float, adamw_lr: float, seed: int) -> dict:
    """One pretrain.py run (small preset, --opt-steps, quiet): its validation curve and the training seconds
    (steps' dt, evaluations excluded) up to each evaluation."""
    name = f"{shards.name}-{optimizer}-{lr:g}-seed{seed}"
    flags = dict(model=cfg.opt_model, data_dir=str(shards), max_steps=cfg.opt_steps, eval_every=cfg.opt_eval_every,
                 val_tokens=4096, hellaswag_path="", num_samples=0, save_every=0, ckpt=str(work / f"{name}.pt"),
                 run_name=str(work / name), seed=seed, optimizer=optimizer, max_lr=adamw_lr, min_lr=adamw_lr / 10,
                 muon_lr=lr if optimizer == "muon" else 0.02, device=cfg.device, compile=False)
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        pretrain.main(config_from(pretrain.Config, pretrain.PRESETS, "small", **flags))
    log = read_log(work / name / "log.jsonl")
    step_s = {r["step"]: r["dt_ms"] / 1000 for r in log if r["kind"] == "train"}
    curve = [(r["step"], r["val_loss"], sum(v for k, v in step_s.items() if k < r["step"]))
             for r in log if r["kind"] == "eval" and "val_loss" in r]
    return {"optimizer": optimizer, "lr": lr, "adamw_lr": adamw_lr, "seed": seed, "curve": curve,
            "final_val_loss": curve[-1][1], "train_seconds": sum(step_s.values())}


def to_target(run: dict, target: float, tokens_per_step: int) -> dict:
    """Tokens and training seconds of a run's first evaluation at or below `target`."""
    step, _, seconds = next(point for point in run["curve"] if point[1] <= target)
    return {"tokens": step * tokens_per_step, "seconds": seconds}


def newton_schulz_seconds(rt: Runtime, repeats: int) -> dict:
    """Seconds of torch.optim.Muon's Newton-Schulz iteration (bfloat16) on the gpt2 size's largest block
    matrix, against the same iteration in float32 (a reference written here), on this device."""
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, _zeropower_via_newtonschulz

    def float32_iteration(g: torch.Tensor) -> torch.Tensor:
        x = g.float().T  # (768, 3072): the Gram matrix of the short side
        x = x / x.norm().clamp(min=1e-7)
        for _ in range(5):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=DEFAULT_B, alpha=DEFAULT_C), x, beta=DEFAULT_A)
        return x.T

    grad = torch.randn(3072, 768, generator=torch.Generator().manual_seed(0)).to(rt.device)
    bf16 = lambda: _zeropower_via_newtonschulz(grad, (DEFAULT_A, DEFAULT_B, DEFAULT_C), 5, 1e-7)  # noqa: E731
    seconds = race({"bfloat16": bf16, "float32": lambda: float32_iteration(grad)}, repeats, 1, make_sync(rt.device))
    gap = (bf16().float() - float32_iteration(grad)).abs().max().item()
    return {"shape": [3072, 768], "bfloat16_s": statistics.median(seconds["bfloat16"]),
            "float32_s": statistics.median(seconds["float32"]),
            "ratio": paired_ratio(seconds["bfloat16"], seconds["float32"]), "max_abs_difference": gap}


def bench_optimizer(cfg: Config, rt: Runtime) -> dict:
    """Per corpus: AdamW swept over --opt-adamw-lrs, Muon over --opt-muon-lrs (AdamW on the rest at AdamW's
    best rate), --opt-seeds seeds at each best rate; the target is the highest of the best runs' lowest
    validation losses (every best run reaches it); tokens and seconds to it, and the final loss."""
    tokens_per_step = pretrain.PRESETS["small"]["total_batch_tokens"]
    results = {"model": cfg.opt_model, "steps": cfg.opt_steps, "tokens_per_step": tokens_per_step,
               "newton_schulz": newton_schulz_seconds(rt, cfg.repeats), "corpora": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for corpus in cfg.opt_corpora:
            work = Path(tmp) / corpus
            shards = optimizer_corpus(cfg, corpus, work)
            sweep = {"adamw": [optimizer_run(cfg, shards, work, "adamw", lr, lr, cfg.seed) for lr in cfg.opt_adamw_lrs]}
            best_adamw = min(sweep["adamw"], key=lambda r: r["final_val_loss"])["lr"]
            sweep["muon"] = [optimizer_run(cfg, shards, work, "muon", lr, best_adamw, cfg.seed) for lr in cfg.opt_muon_lrs]
            best = {}
            for opt, runs in sweep.items():
                top = min(runs, key=lambda r: r["final_val_loss"])
                best[opt] = [top] + [optimizer_run(cfg, shards, work, opt, top["lr"], best_adamw, cfg.seed + k)
                                     for k in range(1, cfg.opt_seeds)]
            target = max(min(v for _, v, _ in run["curve"]) for runs in best.values() for run in runs)
            row = {"target_val_loss": target, "sweep": sweep, "best": {}}
            for opt, runs in best.items():
                reached = [to_target(run, target, tokens_per_step) for run in runs]
                row["best"][opt] = {"lr": runs[0]["lr"], "runs": runs, "reached": reached,
                                    "tokens": [r["tokens"] for r in reached], "seconds": [r["seconds"] for r in reached],
                                    "final_val_loss": [run["final_val_loss"] for run in runs]}
            a, m = row["best"]["adamw"], row["best"]["muon"]
            row["tokens_ratio"] = statistics.mean(a["tokens"]) / statistics.mean(m["tokens"])
            row["seconds_ratio"] = statistics.mean(a["seconds"]) / statistics.mean(m["seconds"])
            results["corpora"][corpus] = row
            print0(f"bench: optimizer {corpus}: target {target:.3f}, AdamW/Muon tokens {row['tokens_ratio']:.2f}x, "
                   f"seconds {row['seconds_ratio']:.2f}x")
    return results


# Sections in the order they run.
SECTIONS = {
    "train": bench_train,
    "generate": bench_generate,
    "hellaswag": lambda cfg, ours, hf, rt: bench_hellaswag(cfg, ours, rt),
    "ppo": lambda cfg, ours, hf, rt: bench_ppo(cfg, ours, rt),
    "serve": lambda cfg, ours, hf, rt: bench_serve(cfg, ours, rt),
    "optimizer": lambda cfg, ours, hf, rt: bench_optimizer(cfg, rt),
}


# -----------------------------------------------------------------------------
# report

def machine_info(device: torch.device) -> dict:
    import transformers
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"device": str(device), "cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "os": platform.platform(), "load_average_at_start": os.getloadavg()[0]}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return info


def check_targets(results: dict) -> list[dict]:
    """Each target's median paired ratio, and whether it is met (None: that part did not run)."""
    out = []
    for path, minimum, what in TARGETS:
        node = results
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        value = node["median"] if node else None
        out.append({"key": ".".join(path), "what": what, "target": minimum, "value": value,
                    "met": None if value is None else value >= minimum})
    return out


def _num(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _rate(st: dict) -> str:
    return f"{_num(st['per_s'])} ({_num(st['per_s_min'])}-{_num(st['per_s_max'])})"


def _opt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio(r: dict) -> str:
    return f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})"


def format_report(results: dict) -> str:
    """Markdown tables: median (min-max) rates over the timed runs, and per-round paired ratios."""
    m = results["machine"]
    lines = [f"model `{results['model']['name']}` ({results['model']['params'] / 1e6:.1f}M params) on "
             f"{m.get('gpu', m['cpu'])}, {m['cpu_cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
             f"transformers {m['transformers']}; {results['config']['repeats']} timed runs per side; "
             f"load average {m['load_average_at_start']:.1f} at the start, {m['load_average_at_end']:.1f} at the end",
             ""]
    if "train" in results:
        t = results["train"]
        lines += [f"**Training step** (forward + backward + AdamW), batch {t['batch_size']} x {t['seq_len']} tokens",
                  "", "| variant | side | tokens/s | step ms | MFU | ours / transformers |",
                  "|---|---|---|---|---|---|"]
        for variant, row in t["variants"].items():
            for side, label in (("ours", "ours"), ("hf", "transformers")):
                st = row[side]
                mfu = f"{100 * st['mfu']:.1f}%" if st["mfu"] is not None else "-"
                ratio = _ratio(row["ratio"]) if side == "ours" else ""
                lines.append(f"| {variant} | {label} | {_rate(st)} | {st['step_ms']:.1f} | {mfu} | {ratio} |")
        lines.append("")
    if "generate" in results:
        gen = results["generate"]
        lines += [f"**Generation**, greedy, {gen['prompt_len']}-token prompts + {gen['new_tokens']} new tokens, "
                  f"{gen['dtype']}", "",
                  "| batch | side | new tokens/s | ours faster by | same tokens as ours |", "|---|---|---|---|---|"]
        for B, row in gen["batches"].items():
            lines.append(f"| {B} | ours (KV cache) | {_rate(row['ours'])} | | |")
            lines.append(f"| {B} | transformers generate | {_rate(row['hf'])} | {_ratio(row['ratio_vs_hf'])} | "
                         f"{100 * row['agree_hf']:.1f}% |")
            if "no_cache" in row:
                lines.append(f"| {B} | no-cache loop | {_rate(row['no_cache'])} | "
                             f"{_ratio(row['ratio_vs_no_cache'])} | {100 * row['agree_no_cache']:.1f}% |")
        lines.append("")
    if "hellaswag" in results:
        h = results["hellaswag"]
        lines += [f"**HellaSwag** ({h['style']}), {h['rows']} rows from {h['source']}", "",
                  "| side | examples/s | batched faster by | acc |", "|---|---|---|---|"]
        acc = lambda accs: ", ".join(f"{style} {a:.3f}" for style, a in accs.items())  # noqa: E731
        lines.append(f"| batched ({h['batch_size']} per forward) | {_rate(h['batched'])} | {_ratio(h['ratio'])} | "
                     f"{acc(h['acc_batched'])} |")
        lines.append(f"| one by one | {_rate(h['one_by_one'])} | | {acc(h['acc_one_by_one'])} |")
        lines.append("")
    if "ppo" in results:
        p = results["ppo"]
        lines += [f"**PPO step** (ppo.py's loop), {p['rollouts']} rollouts of up to {p['response_tokens']} tokens "
                  f"after prompts of up to {p['prompt_tokens']}, 4 epochs x 2 minibatches, median of {p['steps']} steps",
                  "", "| part | seconds | share |", "|---|---|---|"]
        for part in ("rollout", "scoring", "update"):
            lines.append(f"| {part} | {p[part]['median_s']:.2f} | {100 * p[part]['median_s'] / p['total_median_s']:.0f}% |")
        lines += [f"| total | {p['total_median_s']:.2f} | |", "",
                  f"Rollout share of the step (median of per-step shares): {100 * p['rollout_share']:.0f}%; "
                  f"generation {_num(p['gen_tok_per_s'])} tokens/s.", ""]
    if "serve" in results:
        sv = results["serve"]
        labels = {"serve.py": f"serve.py (max batch {sv['max_batch']})", "one_at_a_time": "serve.py, one at a time",
                  "transformers": "transformers serve --continuous-batching"}
        lines += [f"**Serving** ({sv['model']}), streaming greedy /v1/completions on loopback, {sv['tokens']}-token "
                  f"completions, {sv['rounds']} rounds per level; same text as serve.py's on 4 prompts: " +
                  ", ".join(f"{labels[s]} {100 * a:.0f}%" for s, a in sv["texts_agree"].items()), "",
                  "| clients | server | requests/s | tokens/s | TTFT p50 / p95 s | latency p50 / p95 s | errors | serve.py faster by |",
                  "|---|---|---|---|---|---|---|---|"]
        for clients, level in sv["levels"].items():
            for side in sv["sides"]:
                st = level[side]
                ratio = _ratio(level["ratio"][side]) if side in level["ratio"] else ""
                lines.append(f"| {clients} | {labels[side]} | {st['requests_per_s']:.2f} | {_num(st['tokens_per_s'])} | "
                             f"{_opt(st['ttft_p50_s'])} / {_opt(st['ttft_p95_s'])} | {_opt(st['latency_p50_s'], 2)} / "
                             f"{_opt(st['latency_p95_s'], 2)} | {st['errors']} | {ratio} |")
        lines.append("")
    if "optimizer" in results:
        o = results["optimizer"]
        ns = o["newton_schulz"]
        spread = lambda xs, fmt: f"{fmt(statistics.mean(xs))} ({fmt(min(xs))}-{fmt(max(xs))})"  # noqa: E731
        lines += [f"**Optimizers** (pretrain.py, model `{o['model']}`, {o['steps']} steps of {o['tokens_per_step']} "
                  f"tokens, warmup + cosine; mean (range) over seeds at each optimizer's best rate)", "",
                  "| corpus | optimizer | best lr (swept: final val loss) | tokens to target | train s to target | "
                  "final val loss | AdamW / Muon tokens | seconds |", "|---|---|---|---|---|---|---|---|"]
        for corpus, row in o["corpora"].items():
            for opt, label in (("adamw", "AdamW"), ("muon", "Muon + AdamW")):
                b = row["best"][opt]
                swept = ", ".join(f"{r['lr']:g}: {r['final_val_loss']:.3f}" for r in row["sweep"][opt])
                ratios = (f"{row['tokens_ratio']:.2f}x | {row['seconds_ratio']:.2f}x" if opt == "muon" else " | ")
                lines.append(f"| {corpus} (target {row['target_val_loss']:.3f}) | {label} | {b['lr']:g} ({swept}) | "
                             f"{spread(b['tokens'], lambda v: f'{v:,.0f}')} | "
                             f"{spread(b['seconds'], lambda v: f'{v:.0f}')} | "
                             f"{spread(b['final_val_loss'], lambda v: f'{v:.3f}')} | {ratios} |")
        lines += ["", f"Newton-Schulz (5 steps) on a {ns['shape'][0]}x{ns['shape'][1]} matrix: bfloat16 "
                  f"{1000 * ns['bfloat16_s']:.1f} ms, float32 {1000 * ns['float32_s']:.1f} ms (bfloat16 faster by "
                  f"{_ratio(ns['ratio'])}; largest difference {ns['max_abs_difference']:.4f})", ""]
    lines += ["", "| target | value | met |", "|---|---|---|"]
    for tgt in results["targets"]:
        value = "-" if tgt["value"] is None else f"{tgt['value']:.2f}x"
        met = {None: "not run", True: "yes", False: "no"}[tgt["met"]]
        lines.append(f"| {tgt['what']} >= {tgt['target']}x | {value} | {met} |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------

def main(cfg: Config) -> dict:
    # --- config
    unknown = [s for s in cfg.sections if s not in SECTIONS]
    if unknown:
        raise UserError(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if cfg.model not in MODEL_PRESETS:
        raise UserError(f"unknown model {cfg.model!r}; choose from {', '.join(MODEL_PRESETS)}")
    block_size = model_config(cfg.model).block_size
    if cfg.seq_len < 2 or cfg.seq_len > block_size:
        raise UserError(f"--seq-len must be in 2..{block_size} (the model's block size), got {cfg.seq_len}")
    if cfg.prompt_len < 1 or cfg.prompt_len + cfg.gen_tokens > block_size:
        raise UserError(f"--prompt-len + --gen-tokens must fit the block size {block_size}")
    if min(cfg.batch_size, cfg.train_steps, cfg.repeats, cfg.gen_tokens, cfg.hellaswag_rows,
           cfg.hellaswag_batch, *cfg.gen_batch_sizes) < 1 or min(cfg.warmup, cfg.threads) < 0:
        raise UserError("batch sizes, --train-steps, --repeats, --gen-tokens and --hellaswag-rows must be "
                        "positive, --warmup and --threads not negative")
    if "serve" in cfg.sections and (min(*cfg.serve_clients, cfg.serve_requests, cfg.serve_rounds, cfg.serve_tokens,
                                        cfg.serve_max_batch) < 1 or cfg.serve_seconds <= 0):
        raise UserError("--serve-clients, --serve-requests, --serve-rounds, --serve-tokens, --serve-max-batch and "
                        "--serve-seconds must be positive")

    # --- setup
    rt = compute_init(cfg.seed, cfg.device, "float32")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    resolve_variants(cfg.variants, rt.device)  # a bad --variants fails before minutes of work
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    out = Path(cfg.out or f"runs/bench/{cfg.preset}-{rt.device_type}.json")

    # --- models
    ours, hf = twin_models(cfg, rt.device, with_hf=bool({"train", "generate"} & set(cfg.sections)))
    results = {"machine": machine_info(rt.device), "config": dataclasses.asdict(cfg),
               "model": {"name": cfg.model, **dataclasses.asdict(ours.config), "params": ours.num_params(False),
                         "hf_attention": hf.config._attn_implementation if hf is not None else None}}

    # --- sections
    for name in cfg.sections:
        print0(f"bench: {name} ...")
        t0 = time.perf_counter()
        results[name] = SECTIONS[name](cfg, ours, hf, rt)
        results[name]["section_seconds"] = time.perf_counter() - t0
    results["machine"]["load_average_at_end"] = os.getloadavg()[0]  # other jobs on the machine
    results["targets"] = check_targets(results)

    # --- report
    print0(format_report(results))
    write_json(out, results)
    print0(f"wrote {out}")
    return results


if __name__ == "__main__":
    cli_main(main, Config, PRESETS)
