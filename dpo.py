"""Direct Preference Optimization: align the SFT summarizer on the same comparisons the reward model learns
from, without a reward model, rollouts or a value model (Rafailov et al. 2023, "Direct Preference
Optimization: Your Language Model is Secretly a Reward Model").

The policy starts from the SFT model, which stays frozen as the reference. For a pair (x, chosen y_w,
rejected y_l) the implicit reward of a summary is r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)), the log-probs
summed over the summary's tokens (its EOS included; prompt and padding count nothing), and the loss is
    sigmoid:  -log sigmoid(r(x, y_w) - r(x, y_l))            (DPO, eq. 7; with --label-smoothing e the conservative
                                                              cDPO: -(1-e) log s(.) - e log s(-.), for noisy labels)
    ipo:      (h - 1/(2 beta))^2, h = r(x,y_w)/beta - r(x,y_l)/beta   (IPO, Azar et al. 2023, eq. 17)
The reference log-probs are computed once before training (the reference never changes; a run of part of an
epoch computes them for that part only), not by a second forward at every step. Every --eval-every steps on the
validation pairs: loss, implicit reward accuracy (r(chosen) > r(rejected)), chosen / rejected rewards and their
margin; and greedy summaries of --kl-prompts
held-out posts, their KL to the reference along the summary (the exact per-token KL summed over it) and, on the
generated world, their gold score.

    python dpo.py --sft best_sft.pt                                    # one GPU, CarperAI comparisons
    torchrun --standalone --nproc_per_node=2 dpo.py --sft best_sft.pt --micro-batch 4    # two T4s
    python dpo.py --sft best_sft.pt --loss ipo --beta 0.5
    python dpo.py --resume                                             # continue checkpoints/dpo_latest.pt exactly

CPU run on the generated world (after sft.py and sample_comparisons.py, see the README):

    python dpo.py --preset small --sft best_sft.pt --comparisons checkpoints/comparisons_sft --gold on

Writes `checkpoints/dpo_latest.pt` (stage "dpo": the policy, with optimizer, data position and RNG for --resume)
and `checkpoints/best_dpo.pt` (the lowest validation loss) at each evaluation, and `runs/<run-name>/log.jsonl`.
summarize.py, serve.py, eval_summaries.py and export.py take a dpo checkpoint wherever they take a PPO policy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import summaries
import tldr
from checkpoints import build_from_checkpoint, load_checkpoint, load_lm, prompt_info
from common import UserError, all_reduce_sum, check_flags, cli_main, print0
from model import GPT, pack_summaries
from training import (RunFlags, begin_step, best_and_latest, checkpoint_writer, grad_accum_steps, init_runtime, lr_at,
                      micro_steps, prepare_for_training, start_position, start_run, step_seconds, update_step,
                      use_compile)

STAGE = "dpo"
SFT_STAGES = ("sft",)
LOSSES = ("sigmoid", "ipo")


@dataclass
class Config(RunFlags):
    preset: str = "gpt2"                  # tiny (tests) | small (CPU demo) | gpt2 (124M on the real comparisons, the defaults)
    sft: str = "best_sft.pt"              # the SFT checkpoint: where the policy starts, and the frozen reference
    comparisons: str = "CarperAI/openai_summarize_comparisons"  # preference pairs: HF dataset name or local folder of {split}.jsonl/.parquet (CarperAI or OpenAI schema, or sample_comparisons.py's)
    val_split: str = "valid"              # split of the validation pairs and the held-out posts (valid also finds valid1/validation)
    loss: str = "sigmoid"                 # sigmoid (DPO) | ipo (IPO: a squared loss that keeps the margin at 1/(2 beta))
    beta: float = 0.1                     # the implicit reward's scale: a larger beta keeps the policy nearer the reference
    label_smoothing: float = 0.0          # sigmoid only: the share of labels taken to be flipped (conservative DPO; 0: plain DPO)
    batch_size: int = 64                  # preference pairs per optimizer step over all ranks (the DPO paper's 64)
    micro_batch: int = 8                  # pairs per forward per rank (two sequences each: chosen and rejected)
    epochs: float = 1.0                   # passes over the train pairs; sets the step count unless --max-steps
    max_steps: int = 0                    # optimizer steps (0: from --epochs); the cosine ends here
    warmup_steps: int = 150               # linear warmup steps (the DPO paper's 150)
    max_lr: float = 1e-6                  # peak learning rate (the DPO paper's 1e-6 for GPT-2-sized and larger models)
    min_lr: float = 1e-7                  # learning rate at the end of the cosine
    weight_decay: float = 0.0             # AdamW weight decay on matmul and embedding weights
    beta1: float = 0.9                    # AdamW beta1
    beta2: float = 0.95                   # AdamW beta2
    eval_every: int = 200                 # steps between evaluations and checkpoints, plus one at the end (0: at the end only)
    val_pairs: int = 1024                 # validation pairs per evaluation, a fixed sample of --val-split (0: all)
    kl_prompts: int = 64                  # held-out posts (of --val-split) whose greedy summaries measure the KL to the reference (0: none)
    eval_batch: int = 32                  # sequences per forward in evaluation, reference log-probs and generation
    gold: str = "auto"                    # gold score of those greedy summaries: auto (when the posts come from synthetic.py) | on | off
    best_ckpt: str = "best_dpo.pt"        # the checkpoint with the lowest validation loss
    latest_ckpt: str = "dpo_latest.pt"    # the last checkpoint, read by --resume
    run_name: str = "dpo"


TINY = dict(max_steps=6, eval_every=3, batch_size=8, micro_batch=4, warmup_steps=1, max_lr=1e-4, min_lr=1e-5,
            val_pairs=16, kl_prompts=4, eval_batch=16)  # the tests: seconds
# the demo: half a pass over the comparisons of sample_comparisons.py (1,600 posts, about 3,000 pairs) - the
# second half adds little on the generated world and would cost the demo two minutes
SMALL = dict(epochs=0.5, eval_every=25, batch_size=32, micro_batch=16, warmup_steps=10, max_lr=5e-5, min_lr=5e-6,
             val_pairs=256, kl_prompts=64, eval_batch=64)
PRESETS = {"tiny": TINY, "small": SMALL, "gpt2": {}}


# -----------------------------------------------------------------------------
# the loss

def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and the implicit rewards beta * log(pi / pi_ref) of the chosen and the rejected
    summary (B,), from summed log-probs (B,) of each."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        # cDPO (Mitchell 2023): with probability e the label is wrong, so the target is 1 - e, not 1
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss == "ipo":
        # IPO regresses the log-ratio margin to 1/(2 tau) instead of pushing it to infinity, which is what
        # over-fits DPO on deterministic preferences (Azar et al. 2023, section 5)
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss {loss!r} is not one of {LOSSES}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


class PairLogprobs(torch.nn.Module):
    """Summed log-probs (B, 2) of each pair's chosen and rejected summary under `model`, from one packed row per
    pair (model.pack_summaries: `prompt | chosen | rejected`, the prompt computed once - on TL;DR most of the
    tokens - and each summary seeing the prompt and itself only, so each log-prob is the one the summary gets
    after the prompt alone). A module of its own so that DDP and torch.compile wrap the packed forward."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, idx, positions, attn_mask, predictors, targets, owners):
        h = self.model.packed_hidden_states(idx, positions, attn_mask)                  # (B, T, C)
        logits = self.model.logits(h.flatten(0, 1)[predictors])                          # (N, V)
        logp = F.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)  # (N,)
        return torch.zeros(idx.size(0) * 2, device=logp.device).index_add(0, owners, logp).view(-1, 2)


def packed_pairs(triples: list[tldr.Triple]) -> dict[str, torch.Tensor]:
    """PairLogprobs' inputs: pack_summaries' rows, and for each summary token (N in all) the flat index of the
    position that predicts it (the prompt's last token for a summary's first token, else the token before it
    in the same summary), the token, and its owner (2 * pair + 0 for chosen, 1 for rejected)."""
    batch = pack_summaries([(p, [c, r]) for p, c, r in triples])
    T = batch["idx"].size(1)
    predictors, targets, owners = [], [], []
    for i, (prompt, chosen, rejected) in enumerate(triples):
        start = len(prompt)
        for k, summary in enumerate((chosen, rejected)):
            predictors += [i * T + len(prompt) - 1] + [i * T + start + j for j in range(len(summary) - 1)]
            targets += summary
            owners += [2 * i + k] * len(summary)
            start += len(summary)
    return {k: batch[k] for k in ("idx", "positions", "attn_mask")} | {
        "predictors": torch.tensor(predictors), "targets": torch.tensor(targets), "owners": torch.tensor(owners)}


def pair_logprobs(scorer: PairLogprobs | torch.nn.Module, triples: list[tldr.Triple],
                  device) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed log-probs (B,) of a list of triples through a PairLogprobs (or its wrapper)."""
    logps = scorer(**{k: v.to(device) for k, v in packed_pairs(triples).items()})
    return logps[:, 0], logps[:, 1]


@torch.no_grad()
def reference_logprobs(ref: GPT, triples: list[tldr.Triple], rt, batch_size: int,
                       indices: list[int] | None = None) -> torch.Tensor:
    """(N, 2) summed log-probs of the chosen and rejected summaries of the pairs at `indices` (all when None)
    under the reference, computed once: rank r scores every world_size-th of them and the all-reduce fills in
    the rest. The other rows are NaN, so that a pair used without its reference log-probs cannot pass unseen."""
    indices = list(range(len(triples))) if indices is None else indices
    out = torch.zeros(len(triples), 2, dtype=torch.float64, device=rt.device)
    mine = indices[rt.rank::rt.world_size]
    scorer = PairLogprobs(ref).eval()
    for start in range(0, len(mine), batch_size):
        rows = mine[start:start + batch_size]
        with rt.autocast():
            chosen, rejected = pair_logprobs(scorer, [triples[i] for i in rows], rt.device)
        out[rows] = torch.stack([chosen, rejected], 1).double()
    out = all_reduce_sum(out).float()
    unscored = torch.ones(len(triples), dtype=torch.bool, device=out.device)
    unscored[indices] = False
    out[unscored] = float("nan")
    return out


def trained_pairs(n: int, seed: int, steps: int, batch_size: int) -> list[int]:
    """The pairs a run of `steps` optimizer steps of `batch_size` pairs trains on, over all ranks: the start of
    the pair sampler's stream (the same whether the run starts or resumes). A run of a fraction of an epoch
    needs the reference log-probs of that fraction only."""
    if steps * batch_size >= n:
        return list(range(n))
    return sorted(tldr.EpochSampler(n, seed).next_indices(steps * batch_size))


# -----------------------------------------------------------------------------
# data

@dataclass
class DPOData:
    """A run's token triples, their reference log-probs, the held-out posts and the pair sampler."""
    train: list[tldr.Triple]
    valid: list[tldr.Triple]
    ref_train: torch.Tensor    # (N_train, 2): chosen, rejected
    ref_valid: torch.Tensor    # (N_valid, 2)
    held_out: list[tldr.Post]  # posts whose greedy summaries measure the KL to the reference
    sampler: tldr.EpochSampler
    max_steps: int             # optimizer steps of the run (--max-steps, or --epochs over the train pairs)


def load_data(cfg: Config, info: dict, ref: GPT, rt) -> DPOData:
    train = tldr.load_comparisons(cfg.comparisons, "train")
    valid = tldr.load_comparisons(cfg.comparisons, cfg.val_split)
    if cfg.val_pairs and len(valid) > cfg.val_pairs:
        g = torch.Generator().manual_seed(cfg.seed)
        valid = [valid[i] for i in sorted(torch.randperm(len(valid), generator=g)[:cfg.val_pairs].tolist())]
    held_out = list(dict.fromkeys(c.post for c in valid))[:cfg.kl_prompts]
    train_triples, valid_triples = tldr.encode_comparisons(train, info), tldr.encode_comparisons(valid, info)
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train_triples) / cfg.batch_size))
    trained = trained_pairs(len(train_triples), cfg.seed, max_steps, cfg.batch_size)
    print0(f"comparisons: {len(train_triples):,} train / {len(valid_triples):,} {cfg.val_split} pairs; the reference's "
           f"log-probs of the {len(trained):,} train pairs of {max_steps} steps and of the {cfg.val_split} pairs, "
           f"computed once")
    return DPOData(train_triples, valid_triples, reference_logprobs(ref, train_triples, rt, cfg.eval_batch, trained),
                   reference_logprobs(ref, valid_triples, rt, cfg.eval_batch), held_out,
                   tldr.EpochSampler(len(train_triples), cfg.seed, rt.rank, rt.world_size), max_steps)


# -----------------------------------------------------------------------------
# a step and an evaluation

STAT_NAMES = ("loss", "accuracy", "chosen_reward", "rejected_reward")


def pair_stats(losses, chosen_reward, rejected_reward) -> torch.Tensor:
    """Sums (4,) over a batch of pairs: loss, implicit reward accuracy (a tie counts half), chosen and rejected rewards."""
    won = (chosen_reward > rejected_reward).float() + 0.5 * (chosen_reward == rejected_reward).float()
    return torch.stack([losses.detach().sum(), won.sum(), chosen_reward.sum(), rejected_reward.sum()]).double()


def means(sums: torch.Tensor, n: int) -> dict:
    """STAT_NAMES means over n pairs, plus the margin (chosen - rejected reward)."""
    out = dict(zip(STAT_NAMES, (sums / n).tolist()))
    out["margin"] = out["chosen_reward"] - out["rejected_reward"]
    return out


def train_step(model, scaler, data: DPOData, batches: list[list[int]], cfg: Config, rt) -> dict:
    """Forward and backward of one optimizer step's micro-batches through `model` (the policy's PairLogprobs,
    compiled and DDP-wrapped as asked); the step's means over every rank."""
    sums = torch.zeros(4, dtype=torch.float64, device=rt.device)
    for micro in micro_steps(model, rt, len(batches)):
        rows = batches[micro]
        with rt.autocast():
            chosen, rejected = pair_logprobs(model, [data.train[i] for i in rows], rt.device)
        ref = data.ref_train[rows].to(rt.device)
        losses, r_chosen, r_rejected = dpo_loss(chosen.float(), rejected.float(), ref[:, 0], ref[:, 1], cfg.beta,
                                                cfg.loss, cfg.label_smoothing)
        # each pair of the global batch weighs the same; DDP averages gradients over ranks, hence * world_size
        scaler.scale(losses.sum() / cfg.batch_size * rt.world_size).backward()
        sums += pair_stats(losses, r_chosen, r_rejected)
    return means(all_reduce_sum(sums), cfg.batch_size)


@torch.no_grad()
def validation_stats(model: GPT, data: DPOData, cfg: Config, rt) -> dict:
    """The step's statistics over every validation pair (rank r scores pairs r::world_size)."""
    sums = torch.zeros(4, dtype=torch.float64, device=rt.device)
    mine = list(range(rt.rank, len(data.valid), rt.world_size))
    scorer = PairLogprobs(model)
    model.eval()
    for start in range(0, len(mine), cfg.eval_batch):
        rows = mine[start:start + cfg.eval_batch]
        with rt.autocast():
            chosen, rejected = pair_logprobs(scorer, [data.valid[i] for i in rows], rt.device)
        ref = data.ref_valid[rows].to(rt.device)
        sums += pair_stats(*dpo_loss(chosen.float(), rejected.float(), ref[:, 0], ref[:, 1], cfg.beta, cfg.loss,
                                     cfg.label_smoothing))
    model.train()
    return {f"val_{k}": v for k, v in means(all_reduce_sum(sums), len(data.valid)).items()}


def held_out_stats(model: GPT, ref: GPT, posts: list[tldr.Post], info: dict, gold: bool, cfg: Config, rt) -> dict:
    """Greedy summaries of the held-out posts: their mean KL to the reference along the summary, their mean
    length in tokens, and (generated posts) their gold score."""
    texts = summaries.generate_summaries(model, posts, rt, cfg.eval_batch, info["max_summary_tokens"],
                                         max_prompt_tokens=info["max_prompt_tokens"], template=info["template"])
    kl, lengths = summaries.kl_to_reference(model, ref, posts, texts, info, rt, cfg.eval_batch)
    record = {"kl_to_ref": sum(kl) / len(kl), "summary_tokens": sum(lengths) / len(lengths)}
    if gold:
        record["gold_score"] = summaries.mean_gold_score(posts, texts)
    return record


# -----------------------------------------------------------------------------
# the stage

def check_config(cfg: Config):
    check_flags(cfg, positive=("batch_size", "micro_batch", "max_lr", "beta", "eval_batch"),
                non_negative=("epochs", "max_steps", "warmup_steps", "min_lr", "eval_every", "val_pairs", "kl_prompts",
                              "stop_at", "grad_clip", "label_smoothing"))
    if cfg.loss not in LOSSES:
        raise UserError(f"unknown --loss {cfg.loss!r}; choose {' or '.join(LOSSES)}")
    if not cfg.label_smoothing < 0.5:
        raise UserError(f"--label-smoothing must be in [0, 0.5), got {cfg.label_smoothing}")
    if cfg.label_smoothing and cfg.loss != "sigmoid":
        raise UserError("--label-smoothing applies to --loss sigmoid only")
    if cfg.max_steps == 0 and cfg.epochs == 0:
        raise UserError("give --max-steps or --epochs")


def main(cfg: Config) -> dict:
    # --- config
    check_config(cfg)
    gold = summaries.use_gold(cfg.gold, cfg.comparisons)

    # --- setup
    rt = init_runtime(cfg)
    accum = grad_accum_steps(cfg.batch_size, cfg.micro_batch, rt.world_size, unit="pairs")
    best_path, latest_path = best_and_latest(cfg)

    # --- models: the reference is the SFT model, frozen; the policy starts from it (or from --resume)
    ref, sft_ckpt = load_lm(cfg.sft, cfg.ckpt_dir, SFT_STAGES, dropout=0.0, flag="--sft", hub=False)
    ckpt = load_checkpoint(latest_path, STAGE) if cfg.resume else None
    model = build_from_checkpoint(ckpt, GPT, dropout=0.0, where=latest_path) if ckpt else \
        build_from_checkpoint(sft_ckpt, GPT, dropout=0.0, where=cfg.sft)
    info = prompt_info(sft_ckpt)
    ref.to(rt.device).requires_grad_(False)
    model.to(rt.device)
    raw = model  # evaluation and generation always run the plain module, never the compiled/DDP one
    optimizer = raw.configure_optimizers(cfg.weight_decay, cfg.max_lr, (cfg.beta1, cfg.beta2), rt.device_type)
    scaler = rt.grad_scaler()

    # --- data: token triples through the SFT model's template, and the reference's log-probs of them
    data = load_data(cfg, info, ref, rt)

    # --- schedule
    max_steps = data.max_steps
    fresh = {"best_val_loss": float("inf"), "skipped_steps": 0}
    start_step, metrics = start_position(ckpt, optimizer, scaler, data.sampler, fresh)
    model = prepare_for_training(PairLogprobs(model), rt, use_compile(cfg, rt), dynamic=True)
    run = start_run(cfg, rt, "dpo", start_step, max_steps,
                    f"{raw.num_params() / 1e6:.2f}M params from {cfg.sft if not cfg.resume else latest_path}, "
                    f"{cfg.loss} loss, beta {cfg.beta}", f"{cfg.batch_size} pairs/step = {cfg.micro_batch} x "
                    f"{rt.world_size} rank(s) x {accum} accumulation step(s)", latest_path,
                    f"best val loss so far {metrics['best_val_loss']:.4f}")
    if run.nothing_to_do:
        return metrics

    save = checkpoint_writer(STAGE, raw, cfg, metrics, optimizer, scaler, data.sampler, tldr=info)

    def evaluate_and_save(step: int):
        record = validation_stats(raw, data, cfg, rt)
        if rt.master and data.held_out:
            record.update(held_out_stats(raw, ref, data.held_out, info, gold, cfg, rt))
        run.keep_best(record, step, metrics, save, best_path, latest_path, rt.master)

    # --- loop
    if start_step == 0:
        evaluate_and_save(0)
    for step in range(start_step, run.end):
        t0 = begin_step(model, optimizer)
        batches = [data.sampler.next_indices(cfg.micro_batch) for _ in range(accum)]
        stats = train_step(model, scaler, data, batches, cfg, rt)
        lr = lr_at(step, cfg.max_lr, cfg.min_lr, cfg.warmup_steps, max_steps)
        record = update_step(model, optimizer, scaler, lr, cfg.grad_clip, stats.pop("loss"), step, metrics)
        record.update(stats, dt_ms=step_seconds(rt, t0) * 1000)
        run.log_step(record, step, scaler, metrics)
        metrics["train_loss"] = record["loss"]

        run.end_step(step + 1, cfg.eval_every, evaluate_and_save, save, latest_path, rt.master)
    return run.finish(metrics)


if __name__ == "__main__":
    cli_main(main, Config, PRESETS)
