"""Reward model: a GPT trunk with a scalar head, trained on human preference comparisons so that the
summary people preferred scores higher (Stiennon et al. 2020). The trunk starts from the SFT model,
the head near zero; Bradley-Terry loss -logsigmoid(r_chosen - r_rejected) with chosen and rejected in
one forward; the reward is the score at the last real token (the summary's EOS). The best checkpoint
by validation accuracy is written with its head bias shifted so that reference summaries (SFT
validation rows) score 0 on average; PPO loads it with `load_reward_model`.

    python reward_model.py --init best_sft.pt                          # one GPU, CarperAI comparisons
    python reward_model.py --init gpt2                                 # from OpenAI's GPT-2 instead of SFT
    torchrun --standalone --nproc_per_node=2 reward_model.py --init best_sft.pt --micro-batch 4   # two T4s
    torchrun --standalone --nproc_per_node=8 reward_model.py --init best_sft.pt                  # 8 GPUs
    python reward_model.py --init best_sft.pt --data data/comparisons_raw   # local files, CarperAI or OpenAI schema
    python reward_model.py --resume                                    # continue checkpoints/reward_model_latest.pt exactly
    python reward_model.py --score --ckpt reward_model.pt --post "..." --summary "..."   # score one pair

Tiny CPU run on generated data (after sft.py): on the variant comparisons synthetic.py writes, or on
comparisons of the SFT model's own samples (sample_comparisons.py: what PPO needs, see the README)

    python synthetic.py --out data/synthetic
    python reward_model.py --preset small --init best_sft.pt --data data/synthetic/comparisons \\
        --sft-data data/synthetic/tldr
    python sample_comparisons.py --policy best_sft.pt --data data/synthetic/tldr --out data/synthetic/comparisons_sft
    python reward_model.py --preset small --init best_sft.pt --data data/synthetic/comparisons_sft \\
        --sft-data data/synthetic/tldr

Writes `checkpoints/reward_model.pt` (stage "reward_model", the best by validation accuracy,
normalised), `checkpoints/reward_model_latest.pt` (for --resume) and `runs/<run-name>/log.jsonl`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import summaries
import tldr
from checkpoints import (build_from_checkpoint, load_checkpoint, load_lm, load_reward_model, prompt_info,
                         save_checkpoint)
from common import UserError, all_reduce_sum, check_flags, cli_main, mfu, print0, unwrap
from model import ScoreModel, pack_summaries
from training import (RunFlags, begin_step, best_and_latest, grad_accum_steps, init_runtime, lr_at, micro_steps,
                      prepare_for_training, restore_training_state, start_run, step_seconds, update_step, use_compile)

STAGE = "reward_model"
INIT_STAGES = ("sft",)


@dataclass
class Config(RunFlags):
    preset: str = "gpt2"                  # tiny (tests) | small (CPU demo) | gpt2 (124M on the real comparisons, the defaults)
    init: str = "best_sft.pt"             # SFT checkpoint (bare name: in --ckpt-dir), or GPT-2 weights: a hub name (gpt2, ...) or local HF directory
    data: str = "CarperAI/openai_summarize_comparisons"  # comparisons: HF dataset name or local folder of {split}.jsonl/.parquet (CarperAI or OpenAI schema)
    val_split: str = "valid"              # split measured for accuracy and the best checkpoint (valid also finds valid1/validation)
    sft_data: str = "CarperAI/openai_summarize_tldr"  # posts with reference summaries whose mean reward is set to 0 (its valid split)
    norm_rows: int = 2048                 # reference summaries used for that normalisation (0: all)
    batch_size: int = 64                  # preference pairs per optimizer step over all ranks
    micro_batch: int = 8                  # pairs per forward per rank (two sequences each: chosen and rejected)
    epochs: float = 1.0                   # passes over the train pairs (Stiennon et al.: 1); sets the step count unless --max-steps
    max_steps: int = 0                    # optimizer steps (0: from --epochs); the cosine ends here
    warmup_steps: int = 30                # linear warmup steps
    max_lr: float = 3e-5                  # peak learning rate
    min_lr: float = 3e-6                  # learning rate at the end of the cosine
    weight_decay: float = 0.0             # AdamW weight decay on matmul and embedding weights
    freeze_embeddings: bool = False       # keep the token embeddings fixed (tied to the LM head, which a reward model never uses; saves their optimizer work)
    beta1: float = 0.9                    # AdamW beta1
    beta2: float = 0.95                   # AdamW beta2
    eval_every: int = 200                 # steps between validation passes, plus one at the end (0: at the end only)
    val_pairs: int = 4096                 # validation pairs per pass, a fixed sample of the split (0: all)
    save_every: int = 200                 # steps between --latest-ckpt checkpoints, plus one at the end (0: at the end only)
    best_ckpt: str = "reward_model.pt"    # the checkpoint with the best validation accuracy, normalised; a bare name lives in --ckpt-dir
    latest_ckpt: str = "reward_model_latest.pt"  # the last checkpoint, with optimizer and data position, read by --resume
    stop_at: int = 0                      # end this run after this step with a --latest-ckpt checkpoint, keeping the schedule (0: run to the end)
    score: bool = False                   # no training: print the reward of --post/--summary under --ckpt
    ckpt: str = "reward_model.pt"         # reward model read by --score
    post: str = ""                        # --score: the post text
    title: str = ""                       # --score: the post title
    subreddit: str = ""                   # --score: the subreddit, without r/
    summary: str = ""                     # --score: the summary to score
    run_name: str = "reward_model"
    seed: int = 1337                      # seeds the order of the pairs and the validation sample


PRESETS = {
    "tiny": dict(batch_size=8, micro_batch=4, max_steps=6, warmup_steps=2, max_lr=1e-3, min_lr=1e-4, eval_every=3,
                 val_pairs=16, save_every=3, norm_rows=16),
    "small": dict(batch_size=16, micro_batch=16, epochs=1.0, warmup_steps=10, max_lr=1e-3, min_lr=1e-4, eval_every=100,
                  val_pairs=0, save_every=100, norm_rows=400),
    "gpt2": {},
}


# -----------------------------------------------------------------------------
# data: comparisons → token triples → packed rows (prompt once, then chosen, then rejected)

Triple = tldr.Triple


def pair_stats(comparisons: list[tldr.Comparison]) -> dict:
    """Repeated pairs (several raters, or one rater twice) and contradicting ones (the same two summaries
    with opposite labels): both are kept - they are votes - but worth knowing about."""
    seen: dict[tuple, int] = {}
    duplicates = contradictions = 0
    for c in comparisons:
        key = (c.post, c.chosen, c.rejected)
        duplicates += key in seen
        contradictions += (c.post, c.rejected, c.chosen) in seen
        seen[key] = 1
    return {"pairs": len(comparisons), "duplicate_pairs": duplicates, "contradicting_pairs": contradictions}


class PairScorer(torch.nn.Module):
    """Rewards (B, K) of the summaries of a batch from `pack_summaries`. A module of its own so that
    DDP and torch.compile wrap the packed forward; `model` is the ScoreModel whose weights it uses."""

    def __init__(self, model: ScoreModel):
        super().__init__()
        self.model = model

    def forward(self, idx, positions, attn_mask, ends):
        scores = self.model.score_head(self.model.packed_hidden_states(idx, positions, attn_mask)).squeeze(-1)  # (B, T)
        return scores.gather(1, ends)                                     # (B, K)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """-log P(chosen preferred) under the Bradley-Terry model, averaged over pairs."""
    return -F.logsigmoid(r_chosen.float() - r_rejected.float()).mean()


def pair_rewards(scorer: PairScorer | torch.nn.Module, triples: list[Triple], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) rewards, float32, of a list of triples through a PairScorer (or its wrapper)."""
    batch = {k: v.to(device) for k, v in pack_summaries([(p, [c, r]) for p, c, r in triples]).items()}
    rewards = scorer(**batch).float()                                     # (P, 2)
    return rewards[:, 0], rewards[:, 1]


def micro_batches(items: list, size: int, key=None) -> list[list]:
    """Consecutive chunks of `size`, after sorting by `key` (length) so that each pads little."""
    if key is not None:
        items = sorted(items, key=key)
    return [items[i:i + size] for i in range(0, len(items), size)]


def triple_len(t: Triple) -> int:
    return len(t[0]) + len(t[1]) + len(t[2])


# -----------------------------------------------------------------------------
# evaluation and normalisation (each rank takes every world_size-th item; sums are all-reduced)

@torch.no_grad()
def pair_accuracy(scorer: PairScorer, triples: list[Triple], micro_batch: int, rt) -> dict:
    """Validation accuracy (a tie counts half) and Bradley-Terry loss over `triples`."""
    scorer.eval()
    sums = torch.zeros(3, device=rt.device)  # correct, loss sum, pairs
    for chunk in micro_batches(triples[rt.rank::rt.world_size], micro_batch, key=triple_len):
        with rt.autocast():
            rc, rr = pair_rewards(scorer, chunk, rt.device)
        margin = rc - rr
        sums += torch.stack([((margin > 0).float() + 0.5 * (margin == 0).float()).sum(),
                             -F.logsigmoid(margin).sum(), torch.tensor(float(len(chunk)), device=rt.device)])
    correct, loss, n = all_reduce_sum(sums).tolist()
    return {"val_accuracy": correct / n, "val_loss": loss / n, "val_pairs": int(n)}


@torch.no_grad()
def reference_stats(model: ScoreModel, seqs: list[list[int]], micro_batch: int, rt) -> tuple[float, float]:
    """Mean and standard deviation of the reward over reference sequences (prompt + reference summary)."""
    model.eval()
    rewards = summaries.score_tokens(model, seqs[rt.rank::rt.world_size], micro_batch, rt.autocast).double()
    sums = all_reduce_sum(torch.tensor([rewards.sum(), (rewards ** 2).sum(), len(rewards)], dtype=torch.float64,
                                       device=rt.device)).tolist()
    mean = sums[0] / sums[2]
    return mean, math.sqrt(max(0.0, sums[1] / sums[2] - mean ** 2))


def normalized_state(model: ScoreModel, mean: float) -> dict:
    """The model's state dict with the head bias lowered by `mean`: reference summaries then score 0."""
    state = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}
    state["score_head.bias"] = state["score_head.bias"] - mean
    return state


# -----------------------------------------------------------------------------
# initialisation

def init_model(cfg: Config) -> tuple[ScoreModel, dict]:
    """ScoreModel from an SFT checkpoint (trunk) or OpenAI GPT-2 weights, dropout off; returns it with the tldr
    template info it must use (copied from the SFT checkpoint, defaults for raw GPT-2)."""
    with torch.random.fork_rng(devices=[]):  # the LM only carries weights: the head's init draws as if it were not built
        lm, ckpt = load_lm(cfg.init, cfg.ckpt_dir, INIT_STAGES, dropout=0.0)
    return ScoreModel.from_lm_state(lm.config, lm.state_dict()), prompt_info(ckpt)


def check_config(cfg: Config):
    check_flags(cfg, positive=("batch_size", "micro_batch", "max_lr"),
                non_negative=("warmup_steps", "min_lr", "eval_every", "val_pairs", "save_every", "stop_at",
                              "grad_clip", "norm_rows", "max_steps", "epochs", "weight_decay"))
    if cfg.max_steps == 0 and cfg.epochs == 0:
        raise UserError("give a positive --max-steps or --epochs")


# -----------------------------------------------------------------------------
# --score: one pair

def score_main(cfg: Config) -> float:
    if not cfg.post.strip() or not cfg.summary.strip():
        raise UserError("--score needs a non-empty --post and --summary")
    rt = init_runtime(cfg)
    model, ckpt = load_reward_model(cfg.ckpt, rt.device, cfg.ckpt_dir)
    model.to(rt.device)
    post = tldr.Post(cfg.post.strip(), cfg.title.strip(), cfg.subreddit.strip().removeprefix("r/"))
    reward = summaries.score_texts(model, [post], [cfg.summary], ckpt.get("tldr"), autocast=rt.autocast)[0].item()
    std = ckpt["reward_norm"].get("std") or 0.0
    z = f" ({reward / std:+.2f} std from the mean reference summary)" if std > 0 else ""
    print(f"reward {reward:+.4f}{z}")
    return reward


# -----------------------------------------------------------------------------
# the stage

@dataclass
class RewardData:
    """Token triples of a run, the reference sequences the reward is normalised on, the pair sampler."""
    train: list[Triple]
    valid: list[Triple]
    references: list[list[int]]
    sampler: tldr.EpochSampler


def load_data(cfg: Config, info: dict, rt) -> RewardData:
    train = tldr.load_comparisons(cfg.data, "train")
    valid = tldr.load_comparisons(cfg.data, cfg.val_split)
    stats = pair_stats(train)
    print0(f"comparisons: {len(train):,} train pairs ({stats['duplicate_pairs']:,} repeated, "
           f"{stats['contradicting_pairs']:,} contradicting an earlier pair), {len(valid):,} {cfg.val_split} pairs")
    if cfg.val_pairs and len(valid) > cfg.val_pairs:
        g = torch.Generator().manual_seed(cfg.seed)
        valid = [valid[i] for i in sorted(torch.randperm(len(valid), generator=g)[:cfg.val_pairs].tolist())]
    train_triples = tldr.encode_comparisons(train, info)
    refs = tldr.load_sft(cfg.sft_data, "valid")[:cfg.norm_rows or None]
    ref_seqs = [p + s for p, s in tldr.encode_sft(refs, info["max_prompt_tokens"], info["max_summary_tokens"],
                                                  info["template"])]
    return RewardData(train_triples, tldr.encode_comparisons(valid, info), ref_seqs,
                      tldr.EpochSampler(len(train_triples), cfg.seed, rt.rank, rt.world_size))


def load_model(cfg: Config, latest_path) -> tuple[ScoreModel, dict, dict | None]:
    """(model, prompt info, the --resume checkpoint or None)."""
    if not cfg.resume:
        return *init_model(cfg), None
    resume = load_checkpoint(latest_path, STAGE, "cpu")
    if "optimizer" not in resume:
        raise UserError(f"{latest_path} has no optimizer state; --resume needs the --latest-ckpt checkpoint")
    return build_from_checkpoint(resume, ScoreModel, where=latest_path), resume["tldr"], resume


def train_step(model, scaler, chunks: list[list[Triple]], rt) -> tuple[float, float, float]:
    """Forward and backward of one optimizer step's micro-batches; (summed loss, correct pairs, tokens)
    over every rank."""
    sums = torch.zeros(3, device=rt.device)  # loss sum, correct, tokens
    for micro in micro_steps(model, rt, len(chunks)):
        chunk = chunks[micro]
        with rt.autocast():
            rc, rr = pair_rewards(model, chunk, rt.device)
        loss = bradley_terry_loss(rc, rr)
        scaler.scale(loss / len(chunks)).backward()
        tokens = sum(len(p) + len(c) + len(r) for p, c, r in chunk)
        sums += torch.stack([loss.detach() * len(chunk), (rc > rr).float().sum().detach(),
                             torch.tensor(float(tokens), device=rt.device)])
    loss_sum, correct, tokens = all_reduce_sum(sums).tolist()
    return loss_sum, correct, tokens


def main(cfg: Config) -> dict:
    # --- config
    if cfg.score:
        return {"reward": score_main(cfg)}
    check_config(cfg)

    # --- setup
    rt = init_runtime(cfg)
    accum = grad_accum_steps(cfg.batch_size, cfg.micro_batch, rt.world_size, unit="pairs")
    out_path, latest_path = best_and_latest(cfg)

    # --- model
    raw, info, resume = load_model(cfg, latest_path)
    if info["max_prompt_tokens"] + info["max_summary_tokens"] > raw.config.block_size:
        raise UserError(f"prompt + summary budgets ({info['max_prompt_tokens']} + {info['max_summary_tokens']} tokens) "
                        f"exceed the model's block size {raw.config.block_size}")
    raw.to(rt.device)
    scorer = PairScorer(raw)  # evaluation and normalisation run the plain modules, never the compiled/DDP one

    # --- data
    data = load_data(cfg, info, rt)

    # --- optimizer
    raw.transformer.wte.weight.requires_grad_(not cfg.freeze_embeddings)
    optimizer = raw.configure_optimizers(cfg.weight_decay, cfg.max_lr, (cfg.beta1, cfg.beta2), rt.device_type)
    scaler = rt.grad_scaler()
    start_step, best, metrics = 0, {"val_accuracy": -1.0, "step": -1}, {"skipped_steps": 0}
    if resume is not None:
        restore_training_state(resume, optimizer, scaler, data.sampler)
        start_step, best = resume["step"], dict(resume["best"])
        metrics = {**metrics, **resume["metrics"]}
    model = prepare_for_training(scorer, rt, use_compile(cfg, rt), dynamic=True)  # what trains: the packed forward

    # --- schedule
    max_steps = cfg.max_steps or max(1, int(cfg.epochs * len(data.train) // cfg.batch_size))
    n_trunk = raw.num_params() - raw.transformer.wte.weight.numel()  # no vocabulary projection in a reward model
    peak = rt.peak_tflops()
    run = start_run(cfg, rt, "reward model", start_step, max_steps, f"{n_trunk / 1e6:.2f}M trunk params",
                    f"{cfg.batch_size} pairs/step = {cfg.micro_batch} x {rt.world_size} rank(s) x {accum} "
                    f"accumulation step(s) "
                    f"({max_steps * cfg.batch_size / len(data.train):.2f} epochs)", latest_path,
                    f"best val accuracy so far {best['val_accuracy']:.4f}")
    if run.nothing_to_do:
        return {"step": start_step, "best": best}

    def evaluate_and_save(step: int) -> dict:
        record = pair_accuracy(scorer, data.valid, cfg.micro_batch * 2, rt)
        if record["val_accuracy"] > best["val_accuracy"]:
            mean, std = reference_stats(raw, data.references, cfg.micro_batch * 2, rt)
            best.update(val_accuracy=record["val_accuracy"], val_loss=record["val_loss"], step=step)
            if rt.master:  # the shifted bias goes into a copy of the weights: training continues bit-exactly
                snapshot = ScoreModel(raw.config)
                snapshot.load_state_dict(normalized_state(raw, mean))
                save_checkpoint(out_path, stage=STAGE, model=snapshot, step=step, config=cfg,
                                metrics={**record, "ref_reward_mean_before": mean}, tldr=info,
                                reward_norm={"bias_shift": -mean, "std": std, "rows": len(data.references)})
            record["saved"] = str(out_path)
        run.logger.log(record, step, kind="eval")
        return record

    # --- loop
    for step in range(start_step, run.end):
        t0 = begin_step(model, optimizer)
        batch = [data.train[i] for i in data.sampler.next_indices(cfg.batch_size // rt.world_size)]
        loss_sum, correct, tokens = train_step(model, scaler, micro_batches(batch, cfg.micro_batch, key=triple_len), rt)
        train_loss = loss_sum / cfg.batch_size
        lr = lr_at(step, cfg.max_lr, cfg.min_lr, cfg.warmup_steps, max_steps)
        record = update_step(model, optimizer, scaler, lr, cfg.grad_clip, train_loss, step, metrics)
        dt = step_seconds(rt, t0)
        record.update(accuracy=correct / cfg.batch_size, dt_ms=dt * 1000, pairs_per_s=cfg.batch_size / dt,
                      tok_per_s=tokens / dt)
        if peak:
            seq_len = tokens / cfg.batch_size  # packed row length: the attention span
            record["mfu"] = mfu(6 * n_trunk + 12 * raw.config.n_layer * raw.config.n_embd * seq_len,
                                tokens / dt / rt.world_size, peak)
        run.log_step(record, step, scaler, metrics)
        metrics.update(train_loss=train_loss, step=step + 1)

        done = step + 1
        if run.is_due(done, cfg.eval_every):
            metrics.update(evaluate_and_save(done))
        if rt.master and run.save_is_due(done, cfg.save_every):
            run.save(latest_path, done, stage=STAGE, model=raw, config=cfg, metrics=metrics, optimizer=optimizer,
                     scaler=scaler, data_state=data.sampler.state_dict(), tldr=info, best=best)

    if rt.master and best["step"] >= 0:
        print0(f"best val accuracy {best['val_accuracy']:.4f} at step {best['step']}, saved to {out_path}")
    return run.finish({**metrics, "best": best})


if __name__ == "__main__":
    cli_main(main, Config, PRESETS)
