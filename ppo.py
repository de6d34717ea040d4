"""PPO: align the TL;DR summarizer with the reward model (Stiennon et al. 2020), with the details of
"The N+ implementation details of RLHF with PPO" (Huang et al. 2024): policy and frozen reference from
SFT, value model from the reward model, rollouts with the KV cache at temperature 0.7 (the same
temperature in every log-prob), responses cut after their first EOS and scored -1 when they never end,
a per-token KL penalty (beta 0.05, optionally adaptive), GAE (gamma 1, lambda 0.95), advantages
whitened over real tokens of every rank, clipped policy and value losses, 4 epochs over minibatches,
AdamW with linear decay, dropout off.

    python ppo.py --sft best_sft.pt --rm reward_model.pt                 # one GPU (80 GB)
    torchrun --standalone --nproc_per_node=2 ppo.py --micro-batch 4 --gen-batch 32   # two T4s (fp16 + GradScaler)
    torchrun --standalone --nproc_per_node=8 ppo.py                      # 8 GPUs
    python ppo.py --resume                                               # continue checkpoints/ppo_latest.pt exactly
    python summarize.py "post text"                                      # serve the result

Tiny CPU run on generated data (after sft.py and reward_model.py on it):

    python ppo.py --preset small --data data/synthetic/tldr

Writes `checkpoints/ppo_latest.pt` (stage "ppo": the policy, the value model, optimizer, data position,
RNG and the prompt template) every --save-every steps and at the end, and `runs/<run-name>/log.jsonl`
(one record per step, per evaluation and per sample table).

One loop serves every task: a task (`--task`) says where prompts come from, how a response is produced,
how it is scored (`--reward`) and what evaluation adds; `TASKS` and each task's `REWARDS` list them.
`--task hellaswag` (hellaswag_task.py) fine-tunes a GPT-2 for HellaSwag with `--reward label|judge`.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

import hellaswag_task
import summaries
import tldr
from checkpoints import (build_from_checkpoint, load_checkpoint, load_lm, load_reward_model, model_state_dict,
                         prompt_info, resolve_ckpt, same_weights)
from common import UserError, all_reduce_sum, check_flags, cli_main, print0
from model import EOS_ID, GPT, PAD_ID, ScoreModel, last_real_index, left_pad, position_kl, sampling_logprobs
from rollouts import (Rollout, Task, TokenActions, chunks, masked, response_logits, response_texts, token_logprobs,
                      unflatten)
from training import (RunFlags, init_runtime, micro_steps, prepare_for_training, restore_training_state, set_lr,
                      start_run, use_compile)

STAGE = "ppo"
POLICY_STAGES = ("sft",)


@dataclass
class Config(RunFlags):
    preset: str = "gpt2"                  # tiny (tests) | small (CPU demo) | gpt2 (124M on the real TL;DR, the defaults)
    task: str = "tldr"                    # what the policy learns: tldr (summarize Reddit posts) | hellaswag (hellaswag_task.py)
    reward: str = "rm"                    # reward source: rm (tldr: our reward model, scoring the policy's own tokens) | label, judge (hellaswag)
    sft: str = "best_sft.pt"              # SFT checkpoint: the initial policy and the frozen reference
    rm: str = "reward_model.pt"           # reward model checkpoint; the value model starts from it too
    data: str = "CarperAI/openai_summarize_tldr"  # posts: HF dataset name or local folder of {split}.jsonl/.parquet
    train_split: str = "train"            # split whose posts are the rollout prompts
    eval_split: str = "valid"             # split of the held-out evaluation posts
    max_prompt_tokens: int = 0            # prompt budget (0: the SFT checkpoint's, so prompts match training)
    response_length: int = 53             # most tokens per response (TL;DR: 53)
    temperature: float = 0.7              # sampling temperature of rollouts, also applied to every training log-prob
    missing_eos_score: float = -1.0       # score of a response that never emits EOS (replaces the reward model's)
    rollout_batch: int = 512              # prompts rolled out per PPO step over all ranks
    gen_batch: int = 0                    # prompts generated at once per rank (0: the rank's whole share)
    num_minibatches: int = 4              # optimizer steps per PPO epoch (the rollout batch split this many ways)
    micro_batch: int = 16                 # rows per forward/backward per rank (gradient accumulation inside a minibatch)
    ppo_epochs: int = 4                   # passes over each rollout batch
    max_steps: int = 1000                 # PPO steps (rollout + update); the linear LR decay ends here
    lr: float = 1e-5                      # initial learning rate, decayed linearly to 0 at --max-steps
    weight_decay: float = 0.0             # AdamW weight decay on matmul and embedding weights
    adam_eps: float = 1e-5                # AdamW epsilon (1e-5 as in the N+ details, not torch's 1e-8)
    grad_clip: float = 1.0                # clip the joint gradient norm of policy and value model (0: no clipping)
    kl_coef: float = 0.05                 # beta of the per-token KL penalty -beta * (logp - logp_ref)
    adaptive_kl: bool = False             # adapt beta towards --kl-target (Ziegler et al. 2019)
    kl_target: float = 6.0                # --adaptive-kl: target KL per response (nats)
    kl_horizon: int = 10000               # --adaptive-kl: horizon in rollouts of the controller
    gamma: float = 1.0                    # GAE discount
    lam: float = 0.95                     # GAE lambda
    cliprange: float = 0.2                # PPO ratio clip
    cliprange_value: float = 0.2          # value clip around the rollout's values
    vf_coef: float = 0.1                  # weight of the value loss
    max_approx_kl: float = 1.0            # stop when the approx KL between policy and rollout policy exceeds this (0: never)
    eval_every: int = 50                  # steps between evaluations, plus one at the start and the end (0: start and end only)
    eval_prompts: int = 256               # held-out posts summarized greedily at each evaluation (hellaswag: val rows scored)
    gold: str = "auto"                    # gold score of summaries: auto (when --data was written by synthetic.py) | on | off
    sample_every: int = 10                # steps between sample tables (0: never)
    sample_rows: int = 3                  # rollouts shown in each sample table
    save_every: int = 50                  # steps between checkpoints, plus one at the end (0: at the end only)
    ckpt: str = "ppo_latest.pt"           # checkpoint written (and read by --resume); a bare name lives in --ckpt-dir
    resume: bool = False                  # continue exactly from --ckpt (optimizer, scaler, KL coefficient, data position, RNG)
    run_name: str = "ppo"
    compile: bool | None = None           # torch.compile the policy+value forward (default: on for CUDA, off elsewhere)
    seed: int = 1337                      # seeds the prompt order, the rollouts and the minibatch shuffles
    init: str = "gpt2"                    # hellaswag: starting policy and frozen reference: GPT-2 weights (hub name or HF directory) or a pretrain/sft checkpoint
    hellaswag_dir: str = "data/hellaswag"  # hellaswag: folder of hellaswag_{train,val}.jsonl (downloaded when missing); train for rollouts, val for evaluation
    choice_norm: str = "mean"             # hellaswag --reward label: an ending's score is its mean (as acc_norm) or sum (as acc) log-likelihood per token
    label_reward: str = "hit"             # hellaswag --reward label: hit (1 for the labelled ending, else 0) | margin (a wrong ending also costs up to 1 by how far it outscores the label)
    baseline: str = "value"               # advantage baseline: value (GAE on the value model, the N+ details) | group (RLOO: the mean reward of the prompt's other samples; needs --samples-per-prompt >= 2)
    samples_per_prompt: int = 1           # hellaswag --reward label: endings sampled per context from its one scoring forward; the update also scores each context once for all its samples
    judge: str = ""                       # hellaswag --reward judge: HF causal LM or sequence classifier (hub name or local directory, any tokenizer), or a reward_model.py checkpoint
    judge_device: str = ""                # hellaswag --reward judge: device of the judge (empty: the policy's)
    judge_dtype: str = "auto"             # hellaswag --reward judge: judge weights dtype: auto (bf16 on Ampere+, fp16 on older GPUs, fp32 on CPU) | float32 | bfloat16 | float16
    judge_batch: int = 16                 # hellaswag --reward judge: continuations per judge forward
    judge_empty_score: float = -10.0      # hellaswag --reward judge: score of a continuation that leaves the judge nothing to score


PRESETS = {
    "tiny": dict(response_length=12, rollout_batch=8, num_minibatches=2, micro_batch=2, ppo_epochs=2, max_steps=4,
                 lr=1e-4, eval_every=2, eval_prompts=8, sample_every=2, sample_rows=2, save_every=2),
    # small: a minute or two of a 2-core CPU; a model this small moves little at 3e-5 in so few steps
    "small": dict(rollout_batch=32, num_minibatches=2, micro_batch=16, ppo_epochs=4, max_steps=12, lr=1e-4,
                  eval_every=6, eval_prompts=64, sample_every=6, save_every=6),
    "gpt2": {},
}


# -----------------------------------------------------------------------------
# the PPO math: pure functions on (B, N) response tensors; `mask` marks real response tokens (EOS included)

def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where mask is 1, over every rank."""
    s = all_reduce_sum(torch.stack([(x * mask).sum(), mask.sum()]).float())
    return s[0] / s[1].clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std with mean and unbiased variance over the real tokens of every rank (two
    all-reduces: a global mean first, then the squared deviations from it); 0 on padding."""
    mask = mask.to(x.dtype)
    s = all_reduce_sum(torch.stack([(x * mask).sum(), mask.sum()]))
    mean, n = s[0] / s[1].clamp(min=1), s[1]
    var = all_reduce_sum(((x - mean) ** 2 * mask).sum()) / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
               kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards -kl_coef * (logp - logp_ref), plus the sequence's score at its last real token.
    Returns (rewards, kl), both (B, N) and 0 on padding."""
    kl = masked(logprobs - ref_logprobs, mask)
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards[rows, last_real_index(mask)] += scores.to(rewards.dtype)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over each response (padding is terminal: value 0, reward 0).
    Returns (advantages, returns = advantages + values)."""
    values, rewards = masked(values, mask), masked(rewards, mask)
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    N = rewards.size(1)
    for t in reversed(range(N)):
        next_value = values[:, t + 1] if t + 1 < N else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, advantages + values


def group_advantages(rewards: torch.Tensor, mask: torch.Tensor, group: int) -> torch.Tensor:
    """RLOO advantages (Ahmadian et al. 2024, "Back to Basics"): a response's total reward minus the mean
    total reward of the other responses to the same prompt (rows group*i ... group*i + group-1), given to
    each of its real tokens. The baseline depends on the prompt and not on the response, so the gradient
    stays unbiased; it needs no value model and no steps for one to learn."""
    totals = masked(rewards, mask).sum(1).view(-1, group)                      # (P, G)
    others = (totals.sum(1, keepdim=True) - totals) / (group - 1)              # (P, G)
    return (totals - others).reshape(-1, 1) * mask                             # (P * G, N)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float, denom: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate max(-A r, -A clip(r, 1-c, 1+c)) summed over real tokens / denom (default: their
    count; a minibatch split into micro-batches passes the minibatch's count so that the micro-batch
    sums add up to its mean). Stats: clip fraction, approx KL 0.5 (log r)^2, mean ratio (same normaliser)."""
    denom = mask.sum() if denom is None else denom
    logratio = masked(logprobs - old_logprobs, mask)
    ratio = torch.exp(logratio)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = (torch.max(loss1, loss2) * mask).sum() / denom
    stats = {"clipfrac": ((loss2 > loss1).float() * mask).sum() / denom,
             "approx_kl": 0.5 * (logratio ** 2 * mask).sum() / denom,
             "ratio": (ratio * mask).sum() / denom}
    return loss, {k: v.detach() for k, v in stats.items()}


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float, denom: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict]:
    """0.5 max((v - R)^2, (v_clipped - R)^2) with v_clipped within cliprange_value of the rollout's value."""
    denom = mask.sum() if denom is None else denom
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss1 = (values - returns) ** 2
    loss2 = (clipped - returns) ** 2
    loss = 0.5 * (torch.max(loss1, loss2) * mask).sum() / denom
    return loss, {"vf_clipfrac": (((loss2 > loss1).float() * mask).sum() / denom).detach()}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the real tokens of every rank."""
    def var(x):
        mean = masked_mean(x, mask)
        return masked_mean((x - mean) ** 2, mask)
    v = var(returns).item()
    return float("nan") if v == 0 else 1.0 - var(returns - values).item() / v


class KLController:
    """beta of the KL penalty: fixed, or adaptive (Ziegler et al. 2019): moved by a proportional error
    clipped to +-20%, at a rate of (rollouts this step / horizon)."""

    def __init__(self, value: float, target: float | None = None, horizon: int = 10000):
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, kl: float, n: int):
        if self.target is None:
            return
        error = max(-0.2, min(0.2, kl / self.target - 1.0))
        self.value *= 1.0 + error * n / self.horizon


# -----------------------------------------------------------------------------
# models

def frozen(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# tasks and reward sources: one PPO loop, pluggable prompts, responses, scores and evaluation

class RewardModelReward:
    """--reward rm: our reward model reads the policy's own tokens (both speak GPT-2 tokens, so nothing is
    decoded and re-tokenized) and its score at the response's last real token - the EOS, as in training -
    is the reward. The value model starts from the same weights."""

    def __init__(self, cfg: Config, rt):
        self.model, ckpt = load_reward_model(cfg.rm, "cpu", cfg.ckpt_dir)
        self.model = frozen(self.model.to(rt.device))
        self.info = ckpt.get("tldr")
        self.rt = rt

    @torch.no_grad()
    def __call__(self, idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with self.rt.autocast():
            return self.model.reward(idx, mask).float()

    def value_model(self) -> ScoreModel:
        return copy.deepcopy(self.model).train().requires_grad_(True)


class TldrTask(TokenActions):
    """--task tldr: summarize Reddit posts. Prompts are tldr.py's template with the SFT checkpoint's
    budgets (left-padded for generation), a response is a sampled summary ended by EOS, its score is the
    reward source's, or --missing-eos-score when it never ends. Evaluation adds the gold score of
    synthetic.py's world when the posts come from it."""

    REWARDS = {"rm": RewardModelReward}

    @classmethod
    def build(cls, cfg: Config, info: dict, rt) -> TldrTask:
        return cls(cfg, info, rt)

    @staticmethod
    def load_policy(cfg: Config, resume: dict | None) -> tuple[GPT, GPT, dict]:
        return load_policy(cfg, resume)

    def __init__(self, cfg: Config, info: dict, rt):
        if cfg.reward not in self.REWARDS:
            raise UserError(f"--task tldr takes --reward {' or '.join(self.REWARDS)}, not {cfg.reward!r}")
        self.cfg, self.info, self.rt = cfg, info, rt
        self.baseline: dict = {}  # the SFT model's greedy summaries of the eval posts, computed once
        self.train_posts = [e.post for e in tldr.load_sft(cfg.data, cfg.train_split)]
        self.eval_posts = [e.post for e in tldr.load_sft(cfg.data, cfg.eval_split)[:cfg.eval_prompts]]
        self.reward = self.REWARDS[cfg.reward](cfg, rt)
        if self.reward.info and self.reward.info.get("template") != info["template"]:
            raise UserError(f"the reward model {cfg.rm} was trained with another prompt template than the SFT "
                            f"checkpoint {cfg.sft}; train it from that SFT checkpoint")
        self.gold = summaries.use_gold(cfg.gold, cfg.data)

    def __len__(self) -> int:
        return len(self.train_posts)

    def prompt(self, post: tldr.Post) -> list[int]:
        return tldr.prompt_tokens(post, self.info["max_prompt_tokens"], self.info["template"])[0]

    def train_prompts(self, indices: list[int]) -> list[list[int]]:
        return [self.prompt(self.train_posts[i]) for i in indices]

    @torch.no_grad()
    def respond(self, policy: GPT, query: torch.Tensor, query_mask: torch.Tensor, temperature: float,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Responses (B, N) and their 0/1 mask: sampled with the KV cache (temperature 0: greedy), cut
        after the first EOS (PAD_ID after it)."""
        tokens, _, mask = policy.generate(query, query_mask, max_new_tokens=self.cfg.response_length,
                                          temperature=temperature, generator=generator)
        return tokens, mask

    def score(self, query, query_mask, response, response_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores the PPO rewards use, the reward source's raw scores), both (B,)."""
        raw = self.reward(torch.cat([query, response], 1), torch.cat([query_mask, response_mask], 1))
        ended = ((response == EOS_ID) & response_mask.bool()).any(1)
        return torch.where(ended, raw, torch.full_like(raw, self.cfg.missing_eos_score)), raw

    def quality(self, posts: list[tldr.Post], texts: list[str]) -> dict[str, list[float]]:
        """Per-item quality measures beyond the reward: the gold score on generated data."""
        return {"gold": summaries.gold_scores(posts, texts)} if self.gold else {}

    def checkpoint_extra(self) -> dict:
        return {"tldr": self.info}

    @torch.no_grad()
    def evaluate_policy(self, policy: GPT, ref: GPT) -> tuple[dict, list[str]]:
        """Greedy summaries of the held-out posts: mean score, KL to the reference, win rate against the
        SFT model's summaries of the same posts as judged by the reward source, response length, EOS
        share, and gold scores (policy and SFT) on generated data; two summaries as sample lines."""
        cfg, rt = self.cfg, self.rt
        posts = self.eval_posts[rt.rank::rt.world_size]
        if not self.baseline:  # the reference never changes
            self.baseline.update(greedy_responses(self, ref, ref, posts, cfg, rt))
        baseline = self.baseline
        # a policy not yet updated is the SFT model: its summaries are the baseline's
        mine = baseline if same_weights(policy, ref) else greedy_responses(self, policy, ref, posts, cfg, rt)
        wins = [float(a > b) + 0.5 * float(a == b) for a, b in zip(mine["scores"], baseline["scores"])]
        per_item = {"eval_score": mine["scores"], "eval_rm_score": mine["raw_scores"], "eval_kl": mine["kl"],
                    "eval_win_rate": wins, "eval_length": mine["length"], "eval_eos": mine["ended"],
                    "sft_score": baseline["scores"]}
        if "gold" in mine:
            per_item.update(eval_gold=mine["gold"], sft_gold=baseline["gold"])
        samples = [f"eval sample: ...{p.post[-80:]!r} -> {t!r}" for p, t in zip(posts[:2], mine["texts"][:2])]
        return global_means(per_item, rt.device), samples


TASKS: dict[str, type[Task]] = {"tldr": TldrTask, "hellaswag": hellaswag_task.HellaswagTask}


# -----------------------------------------------------------------------------
# rollout and evaluation

@torch.no_grad()
def path_kl(logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(policy || reference) of the full next-token distributions along given responses, summed over
    each response: (B,) from (K, V) logits at its real tokens. Exact per position (no sampling estimate),
    at the rollout temperature."""
    kl = position_kl(sampling_logprobs(logits, temperature), sampling_logprobs(ref_logits, temperature))   # (K,)
    return unflatten(kl, mask).sum(1)


@torch.no_grad()
def greedy_responses(task, model: GPT, ref: GPT, posts: list, cfg: Config, rt) -> dict:
    """Greedy responses of `model` to `posts` with their scores, texts, path KL to the reference and
    the task's quality measures; lists, one item per post."""
    out = {"scores": [], "raw_scores": [], "kl": [], "texts": [], "ended": [], "length": []}
    for c in chunks(len(posts), cfg.gen_batch or max(1, len(posts))):
        query, query_mask = (t.to(rt.device) for t in left_pad([task.prompt(p) for p in posts[c]], PAD_ID))
        T0 = query.size(1)
        with rt.autocast():
            response, response_mask = task.respond(model, query, query_mask, 0.0)
        scores, raw = task.score(query, query_mask, response, response_mask)
        out["scores"] += scores.tolist()
        out["raw_scores"] += raw.tolist()
        if model is ref:  # the SFT baseline: KL 0 by definition
            out["kl"] += [0.0] * len(scores)
        else:
            idx, am = torch.cat([query, response], 1), torch.cat([query_mask, response_mask], 1)
            with rt.autocast():
                logits, ref_logits = response_logits(model, idx, am, T0), response_logits(ref, idx, am, T0)
            out["kl"] += path_kl(logits, ref_logits, response_mask.float(), cfg.temperature).tolist()
        out["texts"] += response_texts(response.cpu(), response_mask.cpu())
        out["ended"] += ((response == EOS_ID) & response_mask.bool()).any(1).float().tolist()
        out["length"] += response_mask.sum(1).float().tolist()
    out.update(task.quality(posts, out["texts"]))
    return out


def global_means(values: dict[str, list[float]], device) -> dict[str, float]:
    """Means over every rank of per-item lists (all with the same number of items)."""
    keys = sorted(values)
    n = len(values[keys[0]]) if keys else 0
    sums = all_reduce_sum(torch.tensor([sum(values[k]) for k in keys] + [n], dtype=torch.float64, device=device))
    count = max(1.0, sums[-1].item())
    return {k: sums[i].item() / count for i, k in enumerate(keys)}


# -----------------------------------------------------------------------------
# update: ppo_epochs x num_minibatches optimizer steps on one rollout

def ppo_update(model: nn.Module, optimizer, scaler, ro: Rollout, advantages: torch.Tensor, returns: torch.Tensor,
               cfg: Config, rt, step: int, generator: torch.Generator) -> dict:
    """Returns the mean stats over every minibatch and rank; stops with a UserError naming the step when a
    loss is not finite or the approx KL to the rollout policy exceeds --max-approx-kl."""
    B = ro.mask.size(0)
    G = ro.group  # rows that share one forward (one context's samples) stay in one micro-batch
    mb_size = B // cfg.num_minibatches
    names = ("pg_loss", "vf_loss", "clipfrac", "vf_clipfrac", "approx_kl", "ratio", "grad_norm")
    totals = torch.zeros(len(names), dtype=torch.float64)
    n_updates = 0
    for epoch in range(cfg.ppo_epochs):
        order = (torch.randperm(B // G, generator=generator)[:, None] * G + torch.arange(G)).flatten().to(rt.device)
        for mb in range(cfg.num_minibatches):
            rows = order[mb * mb_size:(mb + 1) * mb_size]
            denom = ro.mask[rows].sum().clamp(min=1)  # real tokens of this minibatch on this rank
            optimizer.zero_grad(set_to_none=True)
            sums = torch.zeros(len(names) - 1, device=rt.device)
            micro = chunks(len(rows), cfg.micro_batch * G)
            for i in micro_steps(model, rt, len(micro)):
                r = rows[micro[i]]
                real = ro.mask[r].bool()
                with rt.autocast():
                    logits, values = model(*ro.forward_args(r))
                logp = unflatten(token_logprobs(logits, ro.actions[r][real], cfg.temperature)[0], real)
                del logits
                pg, pg_stats = policy_loss(logp, ro.logprobs[r], advantages[r], ro.mask[r], cfg.cliprange, denom)
                vf, vf_stats = value_loss(values.float(), ro.values[r], returns[r], ro.mask[r],
                                          cfg.cliprange_value, denom)
                loss = pg + cfg.vf_coef * vf
                scaler.scale(loss).backward()
                sums += torch.stack([pg.detach(), vf.detach(), pg_stats["clipfrac"], vf_stats["vf_clipfrac"],
                                     pg_stats["approx_kl"], pg_stats["ratio"]])
            sums = all_reduce_sum(sums) / rt.world_size
            check_update(sums, dict(zip(names, range(len(names)))), cfg, step, epoch, mb)
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            scaler.step(optimizer)
            scaler.update()
            totals += torch.cat([sums.double().cpu(), grad_norm.detach().double().cpu().reshape(1)])
            n_updates += 1
    return {k: v / n_updates for k, v in zip(names, totals.tolist())}


def check_update(sums: torch.Tensor, at: dict, cfg: Config, step: int, epoch: int, mb: int):
    where = f"step {step} (epoch {epoch}, minibatch {mb})"
    for name, what in (("pg_loss", "policy loss"), ("vf_loss", "value loss")):
        v = sums[at[name]].item()
        if not math.isfinite(v):
            raise UserError(f"{what} is {v} at {where}: training diverged; resume from the last checkpoint with "
                            f"a lower --lr, or use --dtype float32/bfloat16")
    kl = sums[at["approx_kl"]].item()
    if cfg.max_approx_kl and kl > cfg.max_approx_kl:
        raise UserError(f"approx KL between the policy and its rollout policy is {kl:.3g} at {where}, above "
                        f"--max-approx-kl {cfg.max_approx_kl}: the update is too large; lower --lr or --ppo-epochs")


# -----------------------------------------------------------------------------
# setup helpers

def check_config(cfg: Config, world_size: int):
    if cfg.task not in TASKS:
        raise UserError(f"unknown --task {cfg.task!r}; choose from {', '.join(TASKS)}")
    check_flags(cfg, positive=("response_length", "rollout_batch", "samples_per_prompt", "num_minibatches", "micro_batch", "ppo_epochs",
                               "max_steps", "lr", "temperature", "eval_prompts", "kl_horizon"),
                non_negative=("max_prompt_tokens", "gen_batch", "kl_coef", "weight_decay", "grad_clip", "cliprange",
                              "cliprange_value", "vf_coef", "eval_every", "sample_every", "sample_rows", "save_every",
                              "stop_at", "max_approx_kl"))
    if cfg.samples_per_prompt > 1 and (cfg.task, cfg.reward) != ("hellaswag", "label"):
        raise UserError("--samples-per-prompt above 1 needs --task hellaswag --reward label (several choices per "
                        "context from one forward)")
    if cfg.baseline not in ("value", "group"):
        raise UserError(f"--baseline must be value or group, not {cfg.baseline!r}")
    if cfg.baseline == "group" and cfg.samples_per_prompt < 2:
        raise UserError("--baseline group compares the samples of one prompt: it needs --samples-per-prompt 2 or more")
    if not (0 <= cfg.gamma <= 1 and 0 <= cfg.lam <= 1):
        raise UserError(f"--gamma and --lam must be in [0, 1], got {cfg.gamma} and {cfg.lam}")
    if cfg.adaptive_kl and cfg.kl_target <= 0:
        raise UserError(f"--kl-target must be positive with --adaptive-kl, got {cfg.kl_target}")
    per_rank = cfg.rollout_batch // world_size
    if cfg.rollout_batch % world_size or per_rank % cfg.num_minibatches:
        raise UserError(f"--rollout-batch {cfg.rollout_batch} must split evenly over {world_size} rank(s) and then "
                        f"--num-minibatches {cfg.num_minibatches}")


def load_policy(cfg: Config, resume: dict | None) -> tuple[GPT, GPT, dict]:
    """(policy, frozen reference, prompt info): the reference is always the SFT model; the policy is the
    SFT model or, on --resume, the checkpoint's."""
    ref, sft = load_lm(cfg.sft, cfg.ckpt_dir, POLICY_STAGES, dropout=0.0, flag="--sft", hub=False)
    info = prompt_info(sft)
    ref = frozen(ref)
    policy = build_from_checkpoint(resume if resume is not None else sft, GPT, dropout=0.0,
                                   where=cfg.ckpt if resume is not None else cfg.sft)
    if resume is not None and resume.get("tldr", {}).get("template") != info["template"]:
        raise UserError(f"{cfg.ckpt} was trained with another prompt template than {cfg.sft}")
    if cfg.max_prompt_tokens:
        info["max_prompt_tokens"] = cfg.max_prompt_tokens
    if info["max_prompt_tokens"] + cfg.response_length > ref.config.block_size:
        raise UserError(f"prompt budget + --response-length ({info['max_prompt_tokens']} + {cfg.response_length} "
                        f"tokens) exceed the model's block size {ref.config.block_size}; lower --max-prompt-tokens")
    return policy, ref, info


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A seed per (run seed, step, rank): rollouts and shuffles do not depend on what ran before, so a
    resumed run draws exactly what the straight run drew."""
    return (seed * 1_000_003 + step * 10_007 + rank) % (2 ** 63)


def load_models(cfg: Config, rt, resume: dict | None, ckpt_path) -> tuple[Task, GPT, GPT, ScoreModel, nn.Module]:
    """(task, policy, frozen reference, value model, policy+value module on the device): the policy and
    reference from the task's starting model (SFT for tldr), the value model from the reward source (or,
    on --resume, the checkpoint's)."""
    policy, ref, info = TASKS[cfg.task].load_policy(cfg, resume)
    ref.to(rt.device)
    task = TASKS[cfg.task].build(cfg, info, rt)
    if resume is not None:
        value = build_from_checkpoint({"model_config": resume["value_config"], "model": resume["value_model"]},
                                      ScoreModel, dropout=0.0, where=f"{ckpt_path} (value model)")
    else:
        value = task.reward.value_model()
    if value.config.block_size < info["max_prompt_tokens"] + cfg.response_length:
        raise UserError(f"the value/reward model's block size {value.config.block_size} is below prompt budget + "
                        f"--response-length ({info['max_prompt_tokens']} + {cfg.response_length})")
    return task, policy, ref, value, task.policy_and_value(policy, value).to(rt.device)


def step_record(ro, kl: torch.Tensor, stats: dict, timing: dict, rt, kl_coef: float, explained_var: float,
                lr: float) -> tuple[dict, float]:
    """The step's log record (rollout statistics over every rank, the update's, timings) and the number of
    rollouts over every rank."""
    n = torch.tensor(float(ro.mask.size(0)), device=rt.device)
    seq = all_reduce_sum(torch.stack([n, ro.scores.sum(), (ro.scores ** 2).sum(), ro.raw_scores.sum(),
                                      kl.sum(), ro.mask.sum(), ((ro.response == EOS_ID) & ro.mask.bool()).any(1).float().sum(),
                                      torch.tensor(timing["gen_tokens"], device=rt.device)]).double())
    n_all, s, s2, raw, kl_sum, tokens, ended, gen_tokens = seq.tolist()
    score_mean = s / n_all
    return {"score": score_mean, "score_std": math.sqrt(max(0.0, s2 / n_all - score_mean ** 2)),
            "rm_score": raw / n_all, "kl": kl_sum / n_all, "kl_coef": kl_coef,
            "entropy": masked_mean(ro.entropy, ro.mask).item(), **stats, "explained_var": explained_var,
            "resp_len": tokens / n_all, "eos_rate": ended / n_all, "lr": lr,
            "gen_tok_per_s": gen_tokens / max(timing["t_gen"], 1e-9), "t_gen": timing["t_gen"],
            "t_score": timing["t_score"]}, n_all


def check_rollout(ro, step: int):
    bad = all_reduce_sum(torch.stack([(~torch.isfinite(ro.raw_scores)).sum(), (~torch.isfinite(ro.values)).sum()]))
    if bad.sum() > 0:  # decided on every rank alike, so that no rank waits for another forever
        raise UserError(f"the {'reward' if bad[0] else 'value'} model returned non-finite scores at step {step}")


def evaluate_and_log(task: Task, policy: GPT, ref: GPT, run, step: int, metrics: dict):
    record, sample_lines = task.evaluate_policy(policy, ref)
    run.logger.log(record, step, kind="eval")
    for line in sample_lines:
        print0(line)
    metrics.update(record)


def sample_table(ro, task: Task, rows: int) -> list[dict]:
    """The first rollouts of the step with their scores, printed and returned for the log."""
    table = []
    for i in range(min(rows, ro.mask.size(0))):
        table.append({"score": ro.scores[i].item(), "sample": ro.show(task, i)})
        print0(f"  sample {i} | score {ro.scores[i].item():+.3f} | {table[-1]['sample']}")
    return table


def main(cfg: Config) -> dict:
    # --- config
    rt = init_runtime(cfg)
    check_config(cfg, rt.world_size)
    ckpt_path = resolve_ckpt(cfg.ckpt, cfg.ckpt_dir)

    # --- models: 1. policy and frozen reference from SFT, reward source, value model from the reward model
    resume = load_checkpoint(ckpt_path, STAGE, "cpu") if cfg.resume else None
    task, policy, ref, value, pv = load_models(cfg, rt, resume, ckpt_path)

    # --- data: prompts in an order shuffled per epoch, each rank rolling out its slice of every batch
    if len(task) < cfg.rollout_batch:
        raise UserError(f"only {len(task)} {cfg.train_split} prompts, fewer than one --rollout-batch {cfg.rollout_batch}")
    loader = tldr.EpochSampler(len(task), cfg.seed, rt.rank, rt.world_size)

    # --- optimizer and schedule: AdamW over policy and value together, lr decayed linearly to 0
    optimizer = GPT.configure_optimizers(pv, cfg.weight_decay, cfg.lr, (0.9, 0.999), rt.device_type, eps=cfg.adam_eps)
    scaler = rt.grad_scaler()
    kl_ctl = KLController(cfg.kl_coef, cfg.kl_target if cfg.adaptive_kl else None, cfg.kl_horizon)
    start_step, metrics = 0, {}
    if resume is not None:
        restore_training_state(resume, optimizer, scaler, loader)
        kl_ctl.value = float(resume["kl_coef"])
        start_step, metrics = resume["step"], dict(resume["metrics"])
    fwd = torch.compile(pv, dynamic=True) if use_compile(cfg, rt) else pv   # rollout and update share one forward
    model = prepare_for_training(fwd, rt, use_compile=False, broadcast_buffers=False)
    samples = f" x {cfg.samples_per_prompt} samples" if cfg.samples_per_prompt > 1 else ""
    run = start_run(cfg, rt, "ppo", start_step, cfg.max_steps,
                    f"task {cfg.task}, reward {cfg.reward}, policy {policy.num_params() / 1e6:.2f}M params",
                    f"{cfg.rollout_batch} rollouts/step{samples} x {cfg.ppo_epochs} epochs x {cfg.num_minibatches} "
                    f"minibatches, {len(task):,} prompts", ckpt_path)
    if run.nothing_to_do:
        return metrics

    # --- loop
    if start_step == 0:
        evaluate_and_log(task, policy, ref, run, 0, metrics)
    for step in range(start_step, run.end):
        t_step = time.time()
        # 2. rollouts: this rank's share of the prompts, sampled at the rollout temperature
        gen = torch.Generator(device=rt.device).manual_seed(step_seed(cfg.seed, step, rt.rank))
        prompts = task.train_prompts(loader.next_indices(cfg.rollout_batch // rt.world_size))
        pv.eval()
        ro, timing = task.rollout(prompts, policy, fwd, ref, cfg, rt, gen)
        check_rollout(ro, step)

        # 3. rewards: per-token KL penalty, the score at the last response token
        rewards, kl = kl_rewards(ro.logprobs, ro.ref_logprobs, ro.scores, ro.mask, kl_ctl.value)
        # 4. advantages: GAE (or the prompt's other samples as baseline), whitened over the real tokens of
        # every rank; the value model learns the GAE returns either way
        advantages, returns = gae(rewards, ro.values, ro.mask, cfg.gamma, cfg.lam)
        if cfg.baseline == "group":
            advantages = group_advantages(rewards, ro.mask, cfg.samples_per_prompt)
        advantages = masked_whiten(advantages, ro.mask)

        # 5. update: ppo_epochs x num_minibatches clipped policy + value steps
        t0 = time.time()
        lr = cfg.lr * (1.0 - step / cfg.max_steps)
        set_lr(optimizer, lr)
        pv.train()
        shuffle = torch.Generator().manual_seed(step_seed(cfg.seed, step, rt.rank))
        stats = ppo_update(model, optimizer, scaler, ro, advantages, returns, cfg, rt, step, shuffle)
        t_update = time.time() - t0

        # 6. log, adapt beta (by the rollouts of this step over all ranks: samples, not prompts)
        record, n_rollouts = step_record(ro, kl, stats, timing, rt, kl_ctl.value,
                                         explained_variance(ro.values, returns, ro.mask), lr)
        record.update(t_update=t_update, dt=time.time() - t_step)
        run.log_step(record, step)
        kl_ctl.update(record["kl"], int(n_rollouts))
        metrics.update(score=record["score"], kl=record["kl"], step=step + 1)
        if rt.master and cfg.sample_every and cfg.sample_rows and step % cfg.sample_every == 0:
            run.logger.log({"samples": sample_table(ro, task, cfg.sample_rows)}, step, kind="sample", echo=False)

        done = step + 1
        if run.is_last(done) or run.is_due(done, cfg.eval_every):
            evaluate_and_log(task, policy, ref, run, done, metrics)
        if rt.master and run.save_is_due(done, cfg.save_every):
            run.save(ckpt_path, done, stage=STAGE, model=policy, config=cfg, metrics=metrics, optimizer=optimizer,
                     scaler=scaler, data_state=loader.state_dict(), value_model=model_state_dict(value),
                     value_config=asdict(value.config), kl_coef=kl_ctl.value, task=cfg.task, **task.checkpoint_extra())
    return run.finish(metrics)


if __name__ == "__main__":
    cli_main(main, Config, PRESETS)
