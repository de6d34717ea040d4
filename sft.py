"""Supervised fine-tuning on TL;DR: teach a pretrained GPT-2 to summarize Reddit posts (Stiennon et al. 2020).

The model reads `SUBREDDIT: r/...\\nTITLE: ...\\nPOST: ...\\nTL;DR:` and learns ` {summary}<|endoftext|>`; the
loss is the mean cross-entropy over summary tokens only (the vocabulary projection is computed at those
positions only). AdamW, warmup + cosine, gradient accumulation, DDP through torchrun, fp16 + GradScaler
on a T4. Every --eval-every steps: validation loss on summary tokens, a few greedy summaries next to
their references, and optionally ROUGE and (generated data only) the gold score.

    python sft.py --init pretrain.pt                                  # one GPU: checkpoints/best_sft.pt
    python sft.py --init gpt2                                         # from OpenAI's GPT-2 (124M) weights
    torchrun --standalone --nproc_per_node=2 sft.py --init gpt2 --micro-batch 8    # two T4s (fp16 + GradScaler)
    torchrun --standalone --nproc_per_node=8 sft.py --init gpt2       # 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 sft.py --init gpt2  # 2 nodes
    python sft.py --init gpt2 --resume                                # continue checkpoints/sft_latest.pt exactly

CPU runs on generated data, from pretrain.py's CPU run of the same preset (docstring of pretrain.py):

    python synthetic.py --out data/synthetic
    python sft.py --preset small --init pretrain.pt --data data/synthetic/tldr --gold-samples 64   # minutes
    python sft.py --preset tiny --init pretrain.pt --data data/synthetic/tldr                     # seconds

Writes `checkpoints/best_sft.pt` (stage "sft", the lowest validation loss so far, step 0 included) and
`checkpoints/sft_latest.pt` (stage "sft", with optimizer, scaler, data position and RNG for --resume) at
each evaluation, and `runs/<run-name>/log.jsonl`. Both checkpoints store the prompt template under "tldr".
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import tldr
from common import (RunLogger, UserError, all_reduce_sum, check_flags, cli_main, compute_init, grad_accum_steps,
                    load_checkpoint, lr_at, mfu, optimizer_step, prepare_for_training, print0, resolve_ckpt,
                    restore_training_state, rng_state, save_checkpoint)
from model import GPT, build_model

STAGE = "sft"
INIT_STAGES = ("pretrain", "sft")


@dataclass
class Config:
    preset: str = "gpt2"                  # tiny (tests) | small (CPU demo on generated data) | gpt2 (GPT-2 124M on TL;DR, the defaults)
    init: str = "pretrain.pt"             # start from: a pretrain (or sft) checkpoint, or GPT-2 weights by hub name (gpt2, gpt2-medium, ...) or local HF directory
    data: str = "CarperAI/openai_summarize_tldr"  # HF dataset name, or a local folder of {train,valid}.jsonl|.parquet (CarperAI or OpenAI schema)
    train_split: str = "train"            # split trained on
    val_split: str = "valid"              # split evaluated on
    max_prompt_tokens: int = 512          # prompt budget: the post is cut at a line or word boundary to fit
    max_summary_tokens: int = 53          # summary budget, EOS included (longer summaries are cut)
    batch_size: int = 64                  # examples per optimizer step over all ranks
    micro_batch: int = 16                 # examples per forward per rank (16 fits a T4 in fp16 for gpt2)
    epochs: float = 1.0                   # passes over the training set, when --max-steps is 0
    max_steps: int = 0                    # optimizer steps; the cosine ends here (0: --epochs over the training set)
    warmup_steps: int = 50                # linear warmup steps
    max_lr: float = 3e-5                  # peak learning rate
    min_lr: float = 3e-6                  # learning rate at the end of the cosine
    weight_decay: float = 0.0             # AdamW weight decay on matmul and embedding weights
    beta1: float = 0.9                    # AdamW beta1
    beta2: float = 0.95                   # AdamW beta2
    grad_clip: float = 1.0                # clip the global gradient norm to this (0: no clipping)
    eval_every: int = 200                 # steps between evaluations and checkpoints (0: at the end only)
    val_examples: int = 0                 # validation examples for the loss, the first N of --val-split (0: all)
    eval_batch: int = 32                  # examples per forward in evaluation and generation
    num_samples: int = 3                  # greedy summaries of validation posts printed next to the references
    rouge_samples: int = 0                # ROUGE-1/2/L of greedy summaries on this many validation posts (needs rouge-score; 0: off)
    gold_samples: int = 0                 # mean gold score of greedy summaries on this many validation posts (generated data only; 0: off)
    ckpt_dir: str = "checkpoints"         # where bare checkpoint names resolve
    best_ckpt: str = "best_sft.pt"        # the checkpoint with the lowest validation loss
    latest_ckpt: str = "sft_latest.pt"    # the last checkpoint, read by --resume
    resume: bool = False                  # continue exactly from --latest-ckpt (optimizer, scaler, data position, RNG)
    stop_at: int = 0                      # end this run after this step with a checkpoint, keeping the --max-steps schedule (0: run to the end)
    run_name: str = "sft"                 # run folder runs/<run-name>/ for config.json and log.jsonl
    wandb: bool = False                   # also log to Weights & Biases
    wandb_project: str = "gpt2-rlhf"      # W&B project
    device: str = "auto"                  # auto | cuda | cpu | mps
    dtype: str = "auto"                   # auto (bf16 on Ampere+, fp16 + GradScaler on older GPUs, fp32 on CPU) | float32 | bfloat16 | float16
    compile: bool | None = None           # torch.compile the training forward (default: on for CUDA, off elsewhere)
    seed: int = 1337                      # seeds the data order


PRESETS = {
    "tiny": dict(max_prompt_tokens=40, max_summary_tokens=24, batch_size=8, micro_batch=4, max_steps=12,
                 warmup_steps=2, max_lr=2e-3, min_lr=2e-4, eval_every=4, val_examples=16, eval_batch=16,
                 num_samples=1),
    "small": dict(max_prompt_tokens=200, max_summary_tokens=53, batch_size=16, micro_batch=16, max_steps=150,
                  warmup_steps=5, max_lr=3e-3, min_lr=3e-4, eval_every=25, val_examples=128, eval_batch=64,
                  num_samples=2),
    "gpt2": {},
}


# -----------------------------------------------------------------------------
# model and data

def load_init(init: str, ckpt_dir: str) -> tuple[GPT, dict | None]:
    """The model to fine-tune: a pretrain/sft checkpoint, or GPT-2 weights through transformers.
    Returns (model, checkpoint dict or None)."""
    path = resolve_ckpt(init, ckpt_dir)
    if path.is_file() or init.endswith(".pt"):
        ckpt = load_checkpoint(path, INIT_STAGES)
        if "score_head.weight" in ckpt["model"]:
            raise UserError(f"{path} holds a score model (reward/value head), not a language model")
        return build_model(ckpt, GPT), ckpt
    try:
        return GPT.from_pretrained(init), None
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"--init {init!r} is neither a checkpoint file nor loadable GPT-2 weights: "
                        f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None


def micro_batches(pairs, sampler: tldr.EpochSampler, micro_batch: int, accum: int):
    """This rank's micro-batches of one optimizer step (idx, targets, mask), drawn up front so that the
    step's summary-token count is known before any backward."""
    return [tldr.sft_batch([pairs[i] for i in sampler.next_indices(micro_batch)]) for _ in range(accum)]


@torch.no_grad()
def val_loss(model, pairs, rt, batch_size: int, progress: bool = False) -> float:
    """Mean cross-entropy per summary token over `pairs`: rank r scores pairs[r::world_size] and the
    summed losses and token counts are all-reduced, so every rank gets the loss of the whole set."""
    mine = sorted(pairs[rt.rank::rt.world_size], key=lambda p: len(p[0]) + len(p[1]))  # little padding per batch
    acc_dtype = torch.float32 if rt.device_type == "mps" else torch.float64
    totals = torch.zeros(2, dtype=acc_dtype, device=rt.device)
    was_training = model.training
    model.eval()
    for i in tqdm(range(0, len(mine), batch_size), desc="val loss", leave=False, disable=not progress):
        idx, targets, mask = (t.to(rt.device) for t in tldr.sft_batch(mine[i:i + batch_size]))
        with rt.autocast():
            _, loss = model(idx, targets, mask, logits_at="targets")
        n = (targets != -1).sum()
        totals += torch.stack([loss.to(acc_dtype) * n, n.to(acc_dtype)])
    model.train(was_training)
    all_reduce_sum(totals)
    return (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")


def rouge_scorer():
    """Google's rouge-score (the maintained reimplementation of ROUGE-1.5.5), stemmed, F1 of 1/2/L."""
    try:
        from rouge_score import rouge_scorer as rs
    except ImportError:
        raise UserError("--rouge-samples needs the rouge-score package: pip install rouge-score") from None
    return rs.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def rouge(scorer, predictions: list[str], references: list[str]) -> dict:
    """Mean ROUGE-1/2/L F1 in [0, 1] of predictions against references."""
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    return {k: sum(s[k].fmeasure for s in scores) / max(1, len(scores)) for k in ("rouge1", "rouge2", "rougeL")}


def check_config(cfg: Config):
    check_flags(cfg, positive=("max_prompt_tokens", "max_summary_tokens", "batch_size", "micro_batch", "max_lr",
                               "eval_batch"),
                non_negative=("epochs", "max_steps", "warmup_steps", "min_lr", "eval_every", "val_examples",
                              "num_samples", "rouge_samples", "gold_samples", "stop_at", "grad_clip"))
    if cfg.max_steps == 0 and cfg.epochs == 0:
        raise UserError("give --max-steps or --epochs")


def main(cfg: Config) -> dict:
    # --- config
    check_config(cfg)

    # --- setup
    rt = compute_init(cfg.seed, cfg.device, cfg.dtype)
    accum = grad_accum_steps(cfg.batch_size, cfg.micro_batch, rt.world_size, unit="examples")
    best_path, latest_path = resolve_ckpt(cfg.best_ckpt, cfg.ckpt_dir), resolve_ckpt(cfg.latest_ckpt, cfg.ckpt_dir)
    use_compile = cfg.compile if cfg.compile is not None else rt.device_type == "cuda"
    template = tldr.TEMPLATE
    scorer = rouge_scorer() if cfg.rouge_samples else None

    # --- model
    if cfg.resume:
        ckpt = load_checkpoint(latest_path, STAGE)
        model = build_model(ckpt, GPT)
    else:
        model, _ = load_init(cfg.init, cfg.ckpt_dir)
    block_size = model.config.block_size
    if cfg.max_prompt_tokens + cfg.max_summary_tokens > block_size:
        raise UserError(f"--max-prompt-tokens {cfg.max_prompt_tokens} + --max-summary-tokens {cfg.max_summary_tokens} "
                        f"exceed the model's block size {block_size}; lower --max-prompt-tokens")
    model.to(rt.device)
    raw = model  # evaluation and generation always run the plain module, never the compiled/DDP one
    optimizer = raw.configure_optimizers(cfg.weight_decay, cfg.max_lr, (cfg.beta1, cfg.beta2), rt.device_type)
    scaler = rt.grad_scaler()

    # --- data
    train_examples = tldr.load_sft(cfg.data, cfg.train_split)
    val_examples = tldr.load_sft(cfg.data, cfg.val_split)
    if cfg.val_examples:
        val_examples = val_examples[:cfg.val_examples]
    encode = dict(max_prompt_tokens=cfg.max_prompt_tokens, max_summary_tokens=cfg.max_summary_tokens, template=template)
    train_pairs = tldr.encode_sft(train_examples, **encode, progress=rt.master)
    val_pairs = tldr.encode_sft(val_examples, **encode, progress=rt.master)
    sampler = tldr.EpochSampler(len(train_pairs), cfg.seed, rt.rank, rt.world_size)
    shown = val_examples[:max(cfg.num_samples, cfg.rouge_samples, cfg.gold_samples)]

    # --- schedule
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train_pairs) / cfg.batch_size))
    start_step, metrics = 0, {"best_val_loss": float("inf"), "skipped_steps": 0}
    if cfg.resume:
        restore_training_state(ckpt, optimizer, scaler, sampler)
        start_step, metrics = ckpt["step"], {**metrics, **ckpt["metrics"]}
    model = prepare_for_training(model, rt, use_compile)
    end = min(max_steps, cfg.stop_at) if cfg.stop_at else max_steps
    peak = rt.peak_tflops()
    info = tldr.template_info(template, cfg.max_prompt_tokens, cfg.max_summary_tokens)
    logger = RunLogger(Path("runs") / cfg.run_name, cfg, enabled=rt.master,
                       wandb_project=cfg.wandb_project if cfg.wandb else None, run_name=cfg.run_name)
    mean_len = sum(len(p) + len(s) for p, s in train_pairs) / len(train_pairs)
    print0(f"sft: {raw.num_params() / 1e6:.2f}M params from {cfg.init if not cfg.resume else latest_path}, "
           f"{rt.world_size} process(es) on {rt.device_type}, {str(rt.dtype).removeprefix('torch.')}, "
           f"{len(train_pairs):,} train / {len(val_pairs):,} val examples (mean {mean_len:.0f} tokens), "
           f"{cfg.batch_size} examples/step = {cfg.micro_batch} x {rt.world_size} rank(s) x {accum} accumulation "
           f"step(s), steps {start_step}->{end} of {max_steps}, compile {'on' if use_compile else 'off'}")
    if start_step:
        print0(f"resumed from {latest_path} at step {start_step} (best val loss so far {metrics['best_val_loss']:.4f})")
    if start_step >= end:
        print0(f"nothing to do: the checkpoint is at step {start_step}")
        return metrics

    def save(path, step, with_state: bool):
        state = dict(optimizer=optimizer, scaler=scaler, data_state=sampler.state_dict(), rng=rng_state()) \
            if with_state else {}
        save_checkpoint(path, stage=STAGE, model=raw, step=step, config=cfg, metrics=metrics, tldr=info, **state)

    def evaluate(step: int):
        record = {"val_loss": val_loss(raw, val_pairs, rt, cfg.eval_batch, rt.master)}
        if rt.master and shown:
            summaries = tldr.generate_summaries(raw, [e.post for e in shown], rt, cfg.eval_batch, cfg.max_summary_tokens,
                                                max_prompt_tokens=cfg.max_prompt_tokens, template=template)
            for e, s in list(zip(shown, summaries))[:cfg.num_samples]:
                print0(f"  post:      {e.post.post[:150]!r}...\n  reference: {e.summary!r}\n  generated: {s!r}")
            if cfg.rouge_samples:
                record.update(rouge(scorer, summaries[:cfg.rouge_samples], [e.summary for e in shown[:cfg.rouge_samples]]))
            if cfg.gold_samples:
                record["gold_score"] = tldr.mean_gold_score([e.post for e in shown[:cfg.gold_samples]],
                                                            summaries[:cfg.gold_samples])
            logger.log({"samples": [{"reference": e.summary, "generated": s} for e, s in zip(shown, summaries)]},
                       step, kind="sample", echo=False)
        improved = record["val_loss"] < metrics["best_val_loss"]
        metrics.update(record)
        if improved:
            metrics.update(best_val_loss=record["val_loss"], best_step=step)
        logger.log({**record, "best_val_loss": metrics["best_val_loss"]}, step, kind="eval")
        if rt.master:
            if improved:
                save(best_path, step, with_state=False)
                print0(f"saved {best_path} (step {step}, val loss {record['val_loss']:.4f})")
            save(latest_path, step, with_state=True)

    # --- loop
    if start_step == 0:
        evaluate(0)
    for step in range(start_step, end):
        t0 = time.time()
        model.train()
        optimizer.zero_grad(set_to_none=True)
        batches = micro_batches(train_pairs, sampler, cfg.micro_batch, accum)
        # every summary token of the step weighs the same, however they fall on micro-batches and ranks
        counts = torch.tensor([float((t != -1).sum()) for _, t, _ in batches] + [sum(int(m.sum()) for _, _, m in batches)],
                              device=rt.device)
        global_counts = all_reduce_sum(counts.clone())
        n_targets, n_tokens = global_counts[:-1].sum(), global_counts[-1].item()
        loss_sum = torch.zeros((), device=rt.device)
        for micro, (idx, targets, mask) in enumerate(batches):
            idx, targets, mask = idx.to(rt.device), targets.to(rt.device), mask.to(rt.device)
            # gradients are all-reduced only on the last micro-step; the choice is made before the forward
            sync = not rt.ddp or micro == accum - 1
            with contextlib.nullcontext() if sync else model.no_sync():
                with rt.autocast():
                    _, loss = model(idx, targets, mask, logits_at="targets")
                # DDP averages gradients over ranks: scale by world_size so the result is the global token mean
                loss = loss * counts[micro] / n_targets
                loss_sum += loss.detach()
                scaler.scale(loss * rt.world_size).backward()
        train_loss = all_reduce_sum(loss_sum).item()
        lr = lr_at(step, cfg.max_lr, cfg.min_lr, cfg.warmup_steps, max_steps)
        grad_norm, skipped = optimizer_step(model, optimizer, scaler, lr, cfg.grad_clip, train_loss, step)
        metrics["skipped_steps"] += int(skipped)
        if rt.device_type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        tok_per_s = n_tokens / dt
        record = {"loss": train_loss, "lr": lr, "grad_norm": grad_norm, "dt_ms": dt * 1000, "tok_per_s": tok_per_s}
        if peak:  # the vocabulary projection runs at summary positions only: count its FLOPs there only
            lm_head_flops = 6 * raw.lm_head.weight.numel() * (n_tokens - n_targets.item())
            flops_per_token = raw.flops_per_token(int(n_tokens / cfg.batch_size)) - lm_head_flops / n_tokens
            record["mfu"] = mfu(flops_per_token, tok_per_s / rt.world_size, peak)
        if scaler.is_enabled():
            record["skipped_steps"] = metrics["skipped_steps"]
        logger.log(record, step)
        metrics["train_loss"] = train_loss

        done = step + 1
        if done == max_steps or (cfg.eval_every and done % cfg.eval_every == 0):
            evaluate(done)
        elif done == end and rt.master:  # --stop-at between evaluations: only what --resume needs
            save(latest_path, done, with_state=True)
            print0(f"saved {latest_path} (step {done})")
    logger.finish()
    return metrics


if __name__ == "__main__":
    cli_main(main, Config, PRESETS)
