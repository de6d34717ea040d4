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

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

import summaries
import tldr
from checkpoints import build_from_checkpoint, load_checkpoint, load_lm
from common import UserError, all_reduce_sum, check_flags, cli_main, mfu, print0
from model import GPT
from training import (RunFlags, begin_step, best_and_latest, checkpoint_writer, grad_accum_steps, init_runtime, lr_at,
                      micro_steps, prepare_for_training, start_position, start_run, step_seconds, update_step,
                      use_compile)

STAGE = "sft"
INIT_STAGES = ("pretrain", "sft")


@dataclass
class Config(RunFlags):
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
    eval_every: int = 200                 # steps between evaluations and checkpoints (0: at the end only)
    val_examples: int = 0                 # validation examples for the loss, the first N of --val-split (0: all)
    eval_batch: int = 32                  # examples per forward in evaluation and generation
    num_samples: int = 3                  # greedy summaries of validation posts printed next to the references
    rouge_samples: int = 0                # ROUGE-1/2/L of greedy summaries on this many validation posts (needs rouge-score; 0: off)
    gold_samples: int = 0                 # mean gold score of greedy summaries on this many validation posts (generated data only; 0: off)
    best_ckpt: str = "best_sft.pt"        # the checkpoint with the lowest validation loss
    latest_ckpt: str = "sft_latest.pt"    # the last checkpoint, read by --resume
    run_name: str = "sft"


PRESETS = {
    "tiny": dict(max_prompt_tokens=40, max_summary_tokens=24, batch_size=8, micro_batch=4, max_steps=12,
                 warmup_steps=2, max_lr=2e-3, min_lr=2e-4, eval_every=4, val_examples=16, eval_batch=16,
                 num_samples=1),
    "small": dict(max_prompt_tokens=200, max_summary_tokens=53, batch_size=16, micro_batch=16, max_steps=150,
                  warmup_steps=5, max_lr=3e-3, min_lr=3e-4, eval_every=50, val_examples=128, eval_batch=64,
                  num_samples=2),
    "gpt2": {},
}


# -----------------------------------------------------------------------------
# model and data

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


def check_config(cfg: Config):
    check_flags(cfg, positive=("max_prompt_tokens", "max_summary_tokens", "batch_size", "micro_batch", "max_lr",
                               "eval_batch"),
                non_negative=("epochs", "max_steps", "warmup_steps", "min_lr", "eval_every", "val_examples",
                              "num_samples", "rouge_samples", "gold_samples", "stop_at", "grad_clip"))
    if cfg.max_steps == 0 and cfg.epochs == 0:
        raise UserError("give --max-steps or --epochs")


@dataclass
class SFTData:
    """Tokenized examples of a run: (prompt, summary) token pairs and the validation posts shown."""
    train_pairs: list
    val_pairs: list
    shown: list           # validation examples summarized at each evaluation
    sampler: tldr.EpochSampler


def load_data(cfg: Config, rt) -> SFTData:
    train_examples = tldr.load_sft(cfg.data, cfg.train_split)
    val_examples = tldr.load_sft(cfg.data, cfg.val_split)
    if cfg.val_examples:
        val_examples = val_examples[:cfg.val_examples]
    encode = dict(max_prompt_tokens=cfg.max_prompt_tokens, max_summary_tokens=cfg.max_summary_tokens,
                  template=tldr.TEMPLATE, progress=rt.master)
    train_pairs = tldr.encode_sft(train_examples, **encode)
    return SFTData(train_pairs, tldr.encode_sft(val_examples, **encode),
                   val_examples[:max(cfg.num_samples, cfg.rouge_samples, cfg.gold_samples)],
                   tldr.EpochSampler(len(train_pairs), cfg.seed, rt.rank, rt.world_size))


def train_step(model, scaler, batches: list, rt) -> tuple[float, float, float]:
    """Forward and backward of one optimizer step's micro-batches; (mean loss per summary token over
    every rank, summary tokens, all tokens) of the step."""
    # every summary token of the step weighs the same, however they fall on micro-batches and ranks
    counts = torch.tensor([float((t != -1).sum()) for _, t, _ in batches] + [sum(int(m.sum()) for _, _, m in batches)],
                          device=rt.device)
    global_counts = all_reduce_sum(counts.clone())
    n_targets, n_tokens = global_counts[:-1].sum(), global_counts[-1].item()
    loss_sum = torch.zeros((), device=rt.device)
    for micro in micro_steps(model, rt, len(batches)):
        idx, targets, mask = (t.to(rt.device) for t in batches[micro])
        with rt.autocast():
            _, loss = model(idx, targets, mask, logits_at="targets")
        # DDP averages gradients over ranks: scale by world_size so the result is the global token mean
        loss = loss * counts[micro] / n_targets
        loss_sum += loss.detach()
        scaler.scale(loss * rt.world_size).backward()
    return all_reduce_sum(loss_sum).item(), n_targets.item(), n_tokens


def sample_scores(model: GPT, shown: list, cfg: Config, rt, info: dict, scorer, logger, step: int) -> dict:
    """Greedy summaries of the shown validation posts: a few printed, all logged as a sample table, and
    their ROUGE against the references and gold score (on generated data) as the flags ask."""
    texts = summaries.generate_summaries(model, [e.post for e in shown], rt, cfg.eval_batch, cfg.max_summary_tokens,
                                         max_prompt_tokens=cfg.max_prompt_tokens, template=info["template"])
    for e, s in list(zip(shown, texts))[:cfg.num_samples]:
        print0(f"  post:      {e.post.post[:150]!r}...\n  reference: {e.summary!r}\n  generated: {s!r}")
    record = {}
    if cfg.rouge_samples:
        record.update(summaries.rouge(scorer, texts[:cfg.rouge_samples], [e.summary for e in shown[:cfg.rouge_samples]]))
    if cfg.gold_samples:
        record["gold_score"] = summaries.mean_gold_score([e.post for e in shown[:cfg.gold_samples]],
                                                         texts[:cfg.gold_samples])
    logger.log({"samples": [{"reference": e.summary, "generated": s} for e, s in zip(shown, texts)]},
               step, kind="sample", echo=False)
    return record


def main(cfg: Config) -> dict:
    # --- config
    check_config(cfg)

    # --- setup
    rt = init_runtime(cfg)
    accum = grad_accum_steps(cfg.batch_size, cfg.micro_batch, rt.world_size, unit="examples")
    best_path, latest_path = best_and_latest(cfg)
    scorer = summaries.rouge_scorer() if cfg.rouge_samples else None

    # --- model
    ckpt = load_checkpoint(latest_path, STAGE) if cfg.resume else None
    model = build_from_checkpoint(ckpt, GPT, where=latest_path) if ckpt else load_lm(cfg.init, cfg.ckpt_dir, INIT_STAGES)[0]
    block_size = model.config.block_size
    if cfg.max_prompt_tokens + cfg.max_summary_tokens > block_size:
        raise UserError(f"--max-prompt-tokens {cfg.max_prompt_tokens} + --max-summary-tokens {cfg.max_summary_tokens} "
                        f"exceed the model's block size {block_size}; lower --max-prompt-tokens")
    model.to(rt.device)
    raw = model  # evaluation and generation always run the plain module, never the compiled/DDP one
    optimizer = raw.configure_optimizers(cfg.weight_decay, cfg.max_lr, (cfg.beta1, cfg.beta2), rt.device_type)
    scaler = rt.grad_scaler()

    # --- data
    data = load_data(cfg, rt)
    shown = data.shown

    # --- schedule
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(data.train_pairs) / cfg.batch_size))
    start_step, metrics = start_position(ckpt, optimizer, scaler, data.sampler, {"best_val_loss": float("inf"), "skipped_steps": 0})
    model = prepare_for_training(model, rt, use_compile(cfg, rt))
    peak = rt.peak_tflops()
    info = tldr.template_info(tldr.TEMPLATE, cfg.max_prompt_tokens, cfg.max_summary_tokens)
    mean_len = sum(len(p) + len(s) for p, s in data.train_pairs) / len(data.train_pairs)
    run = start_run(cfg, rt, "sft", start_step, max_steps,
                    f"{raw.num_params() / 1e6:.2f}M params from {cfg.init if not cfg.resume else latest_path}",
                    f"{len(data.train_pairs):,} train / {len(data.val_pairs):,} val examples (mean {mean_len:.0f} "
                    f"tokens), {cfg.batch_size} examples/step = {cfg.micro_batch} x {rt.world_size} rank(s) x {accum} "
                    f"accumulation step(s)", latest_path, f"best val loss so far {metrics['best_val_loss']:.4f}")
    if run.nothing_to_do:
        return metrics

    save = checkpoint_writer(STAGE, raw, cfg, metrics, optimizer, scaler, data.sampler, tldr=info)

    def evaluate_and_save(step: int):
        record = {"val_loss": val_loss(raw, data.val_pairs, rt, cfg.eval_batch, rt.master)}
        if rt.master and shown:
            record.update(sample_scores(raw, shown, cfg, rt, info, scorer, run.logger, step))
        run.keep_best(record, step, metrics, save, best_path, latest_path, rt.master)

    # --- loop
    if start_step == 0:
        evaluate_and_save(0)
    for step in range(start_step, run.end):
        t0 = begin_step(model, optimizer)
        batches = micro_batches(data.train_pairs, data.sampler, cfg.micro_batch, accum)
        train_loss, n_targets, n_tokens = train_step(model, scaler, batches, rt)
        lr = lr_at(step, cfg.max_lr, cfg.min_lr, cfg.warmup_steps, max_steps)
        record = update_step(model, optimizer, scaler, lr, cfg.grad_clip, train_loss, step, metrics)
        dt = step_seconds(rt, t0)
        record.update(dt_ms=dt * 1000, tok_per_s=n_tokens / dt)
        if peak:  # the vocabulary projection runs at summary positions only: count its FLOPs there only
            lm_head_flops = 6 * raw.lm_head.weight.numel() * (n_tokens - n_targets)
            flops_per_token = raw.flops_per_token(int(n_tokens / cfg.batch_size)) - lm_head_flops / n_tokens
            record["mfu"] = mfu(flops_per_token, record["tok_per_s"] / rt.world_size, peak)
        run.log_step(record, step, scaler, metrics)
        metrics["train_loss"] = train_loss

        run.end_step(step + 1, cfg.eval_every, evaluate_and_save, save, latest_path, rt.master)
    return run.finish(metrics)


if __name__ == "__main__":
    cli_main(main, Config, PRESETS)
