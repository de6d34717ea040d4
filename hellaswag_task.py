"""PPO for HellaSwag: the `--task hellaswag` of ppo.py (one PPO loop serves every task; this file holds
what is particular to this one). The policy and its frozen reference start from GPT-2 (`--init gpt2`) or
from one of our checkpoints (`--init pretrain.pt`); training reads the train split only, evaluation is
hellaswag.py's on the val split (completion and harness styles, in-domain and zero-shot rows), against
the starting model's score measured in the same run. Two reward sources:

- `--reward label`: multiple choice as the action. For a train context the policy's distribution over
  the 4 endings is softmax(score / --temperature), an ending's score being its mean (`--choice-norm
  mean`, what acc_norm ranks by) or summed (`sum`, acc) log-likelihood given the context. The policy
  samples an ending (--samples-per-prompt of them from one scoring forward) and earns 1 for the
  labelled one (`--label-reward hit`); the per-action KL penalty to the reference's choice distribution,
  the baseline (value model or the context's other samples) and the clipped objective are ppo.py's.
- `--reward judge --judge MODEL`: free completion. The policy writes a continuation of the context (KV
  cache, cut after its first sentence end) and a judge scores it: the mean log-prob of the continuation
  given the context under a Hugging Face causal LM of any tokenizer, a sequence classifier's score, or
  one of our reward_model.py checkpoints. The bridge decodes our GPT-2 tokens to text and re-tokenizes
  with the judge's tokenizer, finding the context/continuation boundary at the character level.

    python ppo.py --task hellaswag --reward label --init gpt2                       # one GPU: GPT-2 124M
    python ppo.py --task hellaswag --reward judge --init gpt2 --judge EleutherAI/gpt-neo-2.7B
    python ppo.py --task hellaswag --reward judge --init gpt2 --judge meta-llama/Llama-3.2-3B --judge-dtype bf16
    torchrun --standalone --nproc_per_node=2 ppo.py --task hellaswag --reward label --init gpt2 --micro-batch 4
    torchrun --standalone --nproc_per_node=8 ppo.py --task hellaswag --reward label --init gpt2

Tiny CPU run on generated data (after pretrain.py --preset small on it):

    python ppo.py --task hellaswag --reward label --preset small --init pretrain.pt \\
        --hellaswag-dir data/synthetic/hellaswag --temperature 1 --lr 3e-4 --kl-coef 0.3 --rollout-batch 32 \\
        --samples-per-prompt 8 --ppo-epochs 2 --num-minibatches 2 --micro-batch 32 --max-steps 40 --eval-prompts 300

A library for ppo.py: importing it does nothing; it never imports ppo.py (the Task protocol and the token
rollout it shares live in rollouts.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

import hellaswag
from checkpoints import build_from_checkpoint, load_lm, same_weights
from common import UserError, all_reduce_sum, get_tokenizer
from judges import Judge
from model import GPT, PAD_ID, ScoreModel, left_pad, sampling_logprobs
from rollouts import TokenActions

CHOICE_NORMS = ("mean", "sum")
LABEL_REWARDS = ("hit", "margin")
SENTENCE_ENDS = (b".", b"!", b"?", b"\n")


# -----------------------------------------------------------------------------
# the 4-way choice policy: pure functions on (B, 4, T) right-padded context+ending sequences

@dataclass
class ChoiceBatch:
    """Rows of 4 context+ending sequences, right-padded, with the ending tokens as targets."""
    idx: torch.Tensor             # (B, 4, T) tokens (inputs: every sequence but its last token)
    attention_mask: torch.Tensor  # (B, 4, T) 0/1 real tokens
    targets: torch.Tensor         # (B, 4, T) the next token at ending positions, -1 elsewhere
    value_at: torch.Tensor        # (B,) position of the last context token (the state the choice is made in)


def choice_batch(examples: list[hellaswag.Encoded], block_size: int) -> ChoiceBatch:
    """Encoded rows (hellaswag.encode_row) → a ChoiceBatch; contexts cut from the left to the block size,
    as hellaswag.py's evaluation does."""
    seqs = [[hellaswag._sequence(ex.context, e, block_size) for e in ex.endings] for ex in examples]
    T = max(len(s) - 1 for row in seqs for s, _ in row)
    B = len(examples)
    idx = torch.full((B, 4, T), PAD_ID, dtype=torch.long)
    targets = torch.full((B, 4, T), -1, dtype=torch.long)
    mask = torch.zeros((B, 4, T), dtype=torch.long)
    value_at = torch.zeros(B, dtype=torch.long)
    for b, row in enumerate(seqs):
        for j, (seq, n) in enumerate(row):
            L = len(seq) - 1
            idx[b, j, :L] = torch.tensor(seq[:-1])
            targets[b, j, L - n:L] = torch.tensor(seq[L - n + 1:])
            mask[b, j, :L] = 1
        seq, n = row[0]
        value_at[b] = max(0, len(seq) - 1 - n)  # predicts the first ending token: the last context token
    return ChoiceBatch(idx, mask, targets, value_at)


def choice_scores(model: GPT, idx: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor,
                  norm: str = "mean") -> torch.Tensor:
    """(B, 4) log-likelihood of each ending given its context: summed over the ending's tokens, or
    their mean (norm "mean"). The vocabulary projection runs at ending positions only."""
    T = int(attention_mask.sum(-1).max())  # this micro-batch's longest sequence: no all-padding columns
    idx, attention_mask, targets = idx[..., :T], attention_mask[..., :T], targets[..., :T]
    B, K, _ = idx.shape
    flat_t = targets.reshape(B * K, T)
    h = model.hidden_states(idx.reshape(B * K, T), attention_mask.reshape(B * K, T))   # (4B, T, C)
    keep = flat_t != -1
    logp = -F.cross_entropy(model.logits(h[keep]).float(), flat_t[keep], reduction="none")  # (N,)
    sums = torch.zeros(B * K, device=idx.device, dtype=logp.dtype).index_add(0, keep.nonzero()[:, 0], logp)
    if norm == "mean":
        sums = sums / keep.sum(1).clamp(min=1)
    return sums.view(B, K)


def choice_logprobs(scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, 4) log-probs of the choice policy: log softmax(scores / temperature)."""
    return sampling_logprobs(scores, temperature)


def choice_kl(scores: torch.Tensor, ref_scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B,) exact KL(policy || reference) between the two choice distributions."""
    logp, ref_logp = choice_logprobs(scores, temperature), choice_logprobs(ref_scores, temperature)
    return (logp.exp() * (logp - ref_logp)).sum(-1)


def label_rewards(actions: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, kind: str = "hit") -> torch.Tensor:
    """(B,) reward of the chosen endings. hit: 1 for the labelled ending, 0 otherwise. margin: 1 for the
    labelled ending; a wrong one costs by how far its score (at rollout time) exceeds the label's, up to
    1, and nothing when the label already scores above it - the mistakes argmax accuracy would make."""
    hit = (actions == labels).float()
    if kind == "hit":
        return hit
    chosen = scores.gather(1, actions[:, None]).squeeze(1)
    labelled = scores.gather(1, labels[:, None]).squeeze(1)
    return torch.where(actions == labels, hit, (labelled - chosen).clamp(-1.0, 0.0))


class ChoicePolicyAndValue(nn.Module):
    """ppo.py's policy+value forward for a choice action: the policy's 4 ending scores (B, 4) as the
    logits of one action, and the value (B, 1) of the context at its last token."""

    def __init__(self, policy: GPT, value: ScoreModel, norm: str = "mean"):
        super().__init__()
        self.policy, self.value, self.norm = policy, value, norm

    def forward(self, idx, attention_mask, targets, value_at, expand=None):
        """`expand` (R,) maps rollout rows to the B contexts given, so that the several samples of one
        context share its forward; without it, one row per context."""
        scores = choice_scores(self.policy, idx, attention_mask, targets, self.norm)            # (B, 4)
        T = int(attention_mask[:, 0].sum(-1).max())
        values = self.value(idx[:, 0, :T], attention_mask[:, 0, :T])                           # (B, T)
        values = values.gather(1, value_at[:, None])                                            # (B, 1)
        return (scores, values) if expand is None else (scores[expand], values[expand])        # (R, 4), (R, 1)


@dataclass
class ChoiceRollout:
    """One rank's share of a PPO step with choice actions: one action per row (N = 1), `group` rows per
    context (its samples, consecutive: row r belongs to context r // group)."""
    batch: ChoiceBatch          # the B contexts
    items: list                 # (row, Encoded) per context, for the sample table
    group: int                  # samples per context: R = B * group rollout rows
    actions: torch.Tensor       # (R, 1) the chosen ending
    labels: torch.Tensor        # (R,)
    probs: torch.Tensor         # (R, 4) the policy's choice distribution at rollout time
    mask: torch.Tensor          # (R, 1) ones
    logprobs: torch.Tensor      # (R, 1)
    ref_logprobs: torch.Tensor  # (R, 1)
    values: torch.Tensor        # (R, 1) the value of the row's context
    scores: torch.Tensor        # (R,) the reward
    raw_scores: torch.Tensor    # (R,)
    entropy: torch.Tensor       # (R, 1) entropy of the choice distribution

    @property
    def response(self) -> torch.Tensor:
        return self.actions

    def forward_args(self, rows: torch.Tensor) -> tuple:
        """Each context of these rows once, and where each row's context is among them."""
        contexts, expand = torch.unique(torch.div(rows, self.group, rounding_mode="floor"), return_inverse=True)
        b = self.batch
        return b.idx[contexts], b.attention_mask[contexts], b.targets[contexts], b.value_at[contexts], expand

    def show(self, task, i: int) -> str:
        row, a = self.items[i // self.group][0], int(self.actions[i, 0])
        verdict = "right" if a == int(self.labels[i]) else f"wrong, label {int(self.labels[i])}"
        return f"...{row['ctx'][-100:]!r} -> [{a}] {row['endings'][a]!r} ({verdict}, p {self.probs[i, a].item():.2f})"


# -----------------------------------------------------------------------------
# free completion: responses end at their first sentence end

@lru_cache(maxsize=1)
def sentence_end_tokens() -> torch.Tensor:
    """(50257,) bool: GPT-2 tokens whose bytes end a sentence (. ! ? or a newline)."""
    enc = get_tokenizer()
    ends = torch.zeros(enc.n_vocab, dtype=torch.bool)
    for t in range(enc.n_vocab):
        b = enc.decode_single_token_bytes(t)
        ends[t] = any(s in b for s in SENTENCE_ENDS)
    return ends


def cut_at_sentence_end(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Responses (B, N) cut after their first sentence-ending token (PAD_ID and mask 0 after it)."""
    ends = sentence_end_tokens().to(tokens.device)
    is_end = ends[tokens.clamp(max=ends.numel() - 1)] & (tokens < ends.numel()) & mask.bool()
    after = (is_end.long().cumsum(1) - is_end.long()) > 0  # strictly after the first end
    mask = mask * (~after).long()
    return torch.where(mask.bool(), tokens, torch.full_like(tokens, PAD_ID)), mask


# -----------------------------------------------------------------------------
# policy and value initialisation

def load_init(init: str, ckpt_dir: str) -> GPT:
    """The starting policy, dropout off: GPT-2 weights (hub name or local HF directory) or a
    pretrain/sft checkpoint."""
    return load_lm(init, ckpt_dir, ("pretrain", "sft"), dropout=0.0)[0]


def value_from_init(cfg) -> ScoreModel:
    """The value model: the starting policy's trunk with a zero scalar head (there is no reward model to
    start from). A randomly initialised head would predict values of order 1 that differ from context to
    context, noise larger than the reward's own spread (a 0/1 hit), and the advantages r - V would carry
    it for the many steps the head takes to learn; from zero, the first updates are REINFORCE with the
    batch mean as baseline (whitening subtracts it) and the value model takes over as it learns."""
    lm = load_init(cfg.init, cfg.ckpt_dir)
    value = ScoreModel.from_lm_state(lm.config, lm.state_dict())
    torch.nn.init.zeros_(value.score_head.weight)
    return value


# -----------------------------------------------------------------------------
# the task

class LabelReward:
    """--reward label: HellaSwag's labels score the chosen ending."""

    def __init__(self, cfg, rt):
        if cfg.choice_norm not in CHOICE_NORMS:
            raise UserError(f"--choice-norm must be {' or '.join(CHOICE_NORMS)}, not {cfg.choice_norm!r}")
        if cfg.label_reward not in LABEL_REWARDS:
            raise UserError(f"--label-reward must be {' or '.join(LABEL_REWARDS)}, not {cfg.label_reward!r}")
        self.cfg = cfg

    def value_model(self) -> ScoreModel:
        return value_from_init(self.cfg)


class JudgeReward:
    """--reward judge: a judge model scores the policy's continuation of the context."""

    def __init__(self, cfg, rt):
        self.cfg = cfg
        self.judge = Judge(cfg.judge, cfg.judge_device or rt.device, cfg.judge_dtype, cfg.judge_batch, cfg.ckpt_dir)

    def value_model(self) -> ScoreModel:
        return value_from_init(self.cfg)


class HellaswagTask(TokenActions):
    """--task hellaswag. Prompts are HellaSwag train contexts (completion style: the `ctx` field); with
    --reward judge the response is a sampled continuation scored by the judge (rollouts.token_rollout),
    with --reward label it is the choice of an ending (HellaswagChoiceTask's rollout and forward). Evaluation is
    hellaswag.evaluate on the first --eval-prompts val rows for the policy and, once, the start model."""

    REWARDS = {"label": LabelReward, "judge": JudgeReward}
    SHOW_CHARS = 120

    @classmethod
    def build(cls, cfg, info: dict, rt) -> HellaswagTask:
        """The task for --reward: free completion (this class) for judge, the choice task for label."""
        return (HellaswagChoiceTask if cfg.reward == "label" else HellaswagTask)(cfg, info, rt)

    def __init__(self, cfg, info: dict, rt):
        if cfg.reward not in self.REWARDS:
            raise UserError(f"--task hellaswag takes --reward {' or '.join(self.REWARDS)}, not {cfg.reward!r}")
        if cfg.train_split != "train":
            raise UserError(f"--task hellaswag trains on the train split only (--train-split {cfg.train_split!r})")
        self.cfg, self.info, self.rt = cfg, info, rt
        self.reward = self.REWARDS[cfg.reward](cfg, rt)
        self.train_rows = hellaswag.load_rows(hellaswag.fetch_on_local_rank0(rt, "train", cfg.hellaswag_dir))
        self.eval_rows = hellaswag.load_rows(hellaswag.fetch_on_local_rank0(rt, "val", cfg.hellaswag_dir),
                                             limit=cfg.eval_prompts)
        self.enc = get_tokenizer()
        self.start: dict = {}

    @staticmethod
    def load_policy(cfg, resume: dict | None) -> tuple[GPT, GPT, dict]:
        """(policy, frozen reference, info): both from --init; the policy from the checkpoint on --resume."""
        ref = load_init(cfg.init, cfg.ckpt_dir).eval().requires_grad_(False)
        if resume is not None:
            if resume.get("task") != "hellaswag" or resume.get("hellaswag", {}).get("init") != cfg.init:
                raise UserError(f"{cfg.ckpt} was not trained by --task hellaswag from --init {cfg.init}")
            policy = build_from_checkpoint(resume, GPT, dropout=0.0, where=cfg.ckpt)
        else:
            policy = load_init(cfg.init, cfg.ckpt_dir)
        budget = cfg.max_prompt_tokens or ref.config.block_size - cfg.response_length
        if budget <= 0:
            raise UserError(f"--response-length {cfg.response_length} leaves no room for the context in the "
                            f"model's block size {ref.config.block_size}")
        info = {"init": cfg.init, "reward": cfg.reward, "choice_norm": cfg.choice_norm, "max_prompt_tokens": budget}
        return policy, ref, info

    def __len__(self) -> int:
        return len(self.train_rows)

    def prompt(self, row: dict) -> list[int]:
        return self.enc.encode_ordinary(row["ctx"])[-self.info["max_prompt_tokens"]:]

    def train_prompts(self, indices: list[int]) -> list:
        return [self.prompt(self.train_rows[i]) for i in indices]

    @torch.no_grad()
    def respond(self, policy: GPT, query: torch.Tensor, query_mask: torch.Tensor, temperature: float,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A continuation of at least one token, cut after its first sentence end (HellaSwag endings are
        one sentence) or its EOS."""
        tokens, _, mask = policy.generate(query, query_mask, max_new_tokens=self.cfg.response_length,
                                          temperature=temperature, generator=generator, min_new_tokens=1)
        return cut_at_sentence_end(tokens, mask)

    def texts(self, query: torch.Tensor, query_mask: torch.Tensor, response: torch.Tensor,
              response_mask: torch.Tensor) -> tuple[list[str], list[str]]:
        contexts = [self.enc.decode(q[m.bool()].tolist()) for q, m in zip(query.cpu(), query_mask.cpu())]
        conts = [self.enc.decode([t for t in r[m.bool()].tolist() if t < self.enc.n_vocab and t != self.enc.eot_token])
                 for r, m in zip(response.cpu(), response_mask.cpu())]
        return contexts, conts

    def score(self, query, query_mask, response, response_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, raw): the judge's score of each continuation; --judge-empty-score when it has nothing
        to score."""
        raw, scored = self.reward.judge.score(*self.texts(query, query_mask, response, response_mask))
        raw = raw.to(response.device)
        scores = torch.where(scored.to(response.device), raw, torch.full_like(raw, self.cfg.judge_empty_score))
        return scores, raw

    def checkpoint_extra(self) -> dict:
        return {"hellaswag": self.info}

    # --- evaluation

    @torch.no_grad()
    def evaluate_policy(self, policy: GPT, ref: GPT) -> tuple[dict, list[str]]:
        """acc and acc_norm on the val rows, completion and harness styles, overall and by split_type, for
        the policy and (measured once) the start model; with a judge, also the judge's mean score of
        greedy continuations of the first val contexts."""
        if not self.start:
            self.start.update(self._measure(ref, "start"))
        if same_weights(policy, ref):  # the first evaluation of a fresh run: the policy is the start model
            record = {"eval_" + k.removeprefix("start_"): v for k, v in self.start.items()}
        else:
            record = self._measure(policy, "eval")
        record.update(self.start)
        return record, []

    def _measure(self, model: GPT, prefix: str) -> dict:
        results = hellaswag.evaluate(model, self.eval_rows, self.rt, "both", batch_size=self.cfg.micro_batch,
                                     progress=False)
        record = {}
        for style, r in results.items():
            tag = "" if style == "completion" else "harness_"
            record[f"{prefix}_{tag}acc"], record[f"{prefix}_{tag}acc_norm"] = r["acc"], r["acc_norm"]
            for split_type, sub in r["by_split_type"].items():
                if sub["n"]:
                    record[f"{prefix}_{tag}{split_type}_acc_norm"] = sub["acc_norm"]
        if isinstance(self.reward, JudgeReward):
            record[f"{prefix}_judge_score"] = self.greedy_judge_score(model)
        return record

    def greedy_judge_score(self, model: GPT, rows: int = 32) -> float:
        """Mean judge score of greedy continuations of this rank's share of the first val contexts,
        averaged over ranks."""
        mine = self.eval_rows[:rows][self.rt.rank::self.rt.world_size]
        total = torch.zeros(2, dtype=torch.float64, device=self.rt.device)
        for s in range(0, len(mine), self.cfg.micro_batch):
            query, qmask = (t.to(self.rt.device) for t in left_pad([self.prompt(r) for r in mine[s:s + self.cfg.micro_batch]], PAD_ID))
            was = model.training
            model.eval()
            with self.rt.autocast():
                response, rmask = self.respond(model, query, qmask, 0.0)
            model.train(was)
            scores, _ = self.score(query, qmask, response, rmask)
            total += torch.tensor([scores.sum().item(), len(scores)], dtype=torch.float64, device=self.rt.device)
        total = all_reduce_sum(total)
        return (total[0] / total[1].clamp(min=1)).item()


class HellaswagChoiceTask(HellaswagTask):
    """--task hellaswag --reward label: the action is a choice among the 4 endings (one per row), so the
    rollout and the policy+value forward are this task's own; rewards, GAE, the clipped update, logging
    and checkpoints are ppo.py's."""

    def train_prompts(self, indices: list[int]) -> list:
        rows = [self.train_rows[i] for i in indices]
        return [(row, hellaswag.encode_row(row, "completion", self.enc)) for row in rows]

    def policy_and_value(self, policy: GPT, value: ScoreModel) -> nn.Module:
        return ChoicePolicyAndValue(policy, value, self.cfg.choice_norm)

    @torch.no_grad()
    def rollout(self, items: list, policy: GPT, pv: nn.Module, ref: GPT, cfg, rt,
                generator: torch.Generator) -> tuple[ChoiceRollout, dict]:
        """Score the 4 endings with the policy (through `pv`, the forward the update uses: the first ratio
        is exactly 1) and the reference, sample --samples-per-prompt endings per context (with
        replacement) from softmax(scores / temperature), reward each."""
        t0 = time.time()
        batch = choice_batch([enc for _, enc in items], policy.config.block_size)
        batch = ChoiceBatch(*(t.to(rt.device) for t in (batch.idx, batch.attention_mask, batch.targets, batch.value_at)))
        B = len(items)
        scores, ref_scores, values = [], [], []
        for s in range(0, B, cfg.micro_batch):
            c = slice(s, s + cfg.micro_batch)
            with rt.autocast():
                sc, v = pv(batch.idx[c], batch.attention_mask[c], batch.targets[c], batch.value_at[c])
                ref_sc = choice_scores(ref, batch.idx[c], batch.attention_mask[c], batch.targets[c], cfg.choice_norm)
            scores.append(sc.float())
            ref_scores.append(ref_sc.float())
            values.append(v.float())
        scores, ref_scores, values = torch.cat(scores), torch.cat(ref_scores), torch.cat(values)
        t_score = time.time() - t0
        K = cfg.samples_per_prompt
        logp_all = choice_logprobs(scores, cfg.temperature)                                   # (B, 4)
        actions = torch.multinomial(logp_all.exp(), K, replacement=True, generator=generator)  # (B, K)
        per_row = lambda x: x.repeat_interleave(K, dim=0)                                     # (B, ...) -> (B * K, ...)
        logp_all, ref_logp_all, scores = per_row(logp_all), per_row(choice_logprobs(ref_scores, cfg.temperature)), per_row(scores)
        actions = actions.reshape(B * K, 1)
        labels = per_row(torch.tensor([enc.label for _, enc in items], device=rt.device))
        reward = label_rewards(actions[:, 0], labels, scores, cfg.label_reward)
        ro = ChoiceRollout(batch=batch, items=items, group=K, actions=actions, labels=labels, probs=logp_all.exp(),
                           mask=torch.ones(B * K, 1, device=rt.device), logprobs=logp_all.gather(1, actions),
                           ref_logprobs=ref_logp_all.gather(1, actions), values=per_row(values),
                           scores=reward, raw_scores=reward,
                           entropy=torch.special.entr(logp_all.exp()).sum(-1, keepdim=True))
        return ro, {"t_gen": time.time() - t0 - t_score, "t_score": t_score, "gen_tokens": float(B * K)}

    def evaluate_policy(self, policy: GPT, ref: GPT) -> tuple[dict, list[str]]:
        record, samples = super().evaluate_policy(policy, ref)
        return {**record, "eval_choice_kl": self.choice_kl_on_val(policy, ref)}, samples

    @torch.no_grad()
    def choice_kl_on_val(self, policy: GPT, ref: GPT, rows: int = 64) -> float:
        """Mean exact KL of the policy's choice distribution to the reference's on the first val rows
        (this rank's share, averaged over ranks), at the rollout temperature."""
        mine = self.eval_rows[:rows][self.rt.rank::self.rt.world_size]
        total = torch.zeros(2, dtype=torch.float64, device=self.rt.device)
        was = policy.training
        policy.eval()
        for s in range(0, len(mine), self.cfg.micro_batch):
            b = choice_batch([hellaswag.encode_row(r, "completion", self.enc) for r in mine[s:s + self.cfg.micro_batch]],
                             policy.config.block_size)
            args = [t.to(self.rt.device) for t in (b.idx, b.attention_mask, b.targets)]
            with self.rt.autocast():
                kl = choice_kl(choice_scores(policy, *args, self.cfg.choice_norm).float(),
                               choice_scores(ref, *args, self.cfg.choice_norm).float(), self.cfg.temperature)
            total += torch.tensor([kl.sum().item(), len(kl)], dtype=torch.float64, device=self.rt.device)
        policy.train(was)
        total = all_reduce_sum(total)
        return (total[0] / total[1].clamp(min=1)).item()
