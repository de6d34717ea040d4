"""What a PPO task is, and the rollout of tasks whose action is a sequence of tokens.

ppo.py runs one PPO loop for every `--task`. A task follows the `Task` protocol below: it builds itself
from the flags, loads its starting policy, hands out prompts, produces a rollout (the actions, their
log-probs under the policy and the reference, values and scores) through the policy+value module its
update trains, and evaluates a policy. Every hook is a method of the task: nothing is looked up by name.

Tasks whose action is a response of tokens (TL;DR summaries; HellaSwag continuations judged by a model)
share `TokenActions`: `PolicyAndValue` and `token_rollout`, which sample with the KV cache and then run one
forward per model over prompt + response with logits at response positions only. A task with another
kind of action (HellaSwag's choice among four endings) brings its own rollout object with the fields of
`Rollout` that ppo.py reads.

A library for ppo.py and its task plugins: importing it does nothing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn as nn

from common import get_tokenizer
from model import GPT, PAD_ID, ScoreModel, left_pad, sampling_logprobs
from summaries import decode_summary


# -----------------------------------------------------------------------------
# the protocol

class RewardSource(Protocol):
    """What scores a task's responses; the value model starts from it."""

    def value_model(self) -> ScoreModel: ...


class Task(Protocol):
    """One `--task` of ppo.py. `build` chooses and constructs the task for the flags; `load_policy` gives
    (policy, frozen reference, prompt info) before the task exists, so that the task can be built with the
    policy's prompt budget. ppo.py calls exactly these."""

    reward: RewardSource

    @classmethod
    def build(cls, cfg, info: dict, rt) -> "Task": ...

    @staticmethod
    def load_policy(cfg, resume: dict | None) -> tuple[GPT, GPT, dict]: ...

    def __len__(self) -> int: ...  # training prompts

    def train_prompts(self, indices: list[int]) -> list: ...

    def policy_and_value(self, policy: GPT, value: ScoreModel) -> nn.Module: ...

    def rollout(self, prompts: list, policy: GPT, pv: nn.Module, ref: GPT, cfg, rt,
                generator: torch.Generator) -> tuple[Any, dict]: ...  # (a Rollout-like object, timing)

    def evaluate_policy(self, policy: GPT, ref: GPT) -> tuple[dict, list[str]]: ...  # (record, sample lines)

    def checkpoint_extra(self) -> dict: ...  # what the checkpoint records about the task


class TokenTask(Task, Protocol):
    """A task whose action is a sequence of tokens: what token_rollout needs of it."""

    def respond(self, policy: GPT, query: torch.Tensor, query_mask: torch.Tensor, temperature: float,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def score(self, query: torch.Tensor, query_mask: torch.Tensor, response: torch.Tensor,
              response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...  # (scores, raw scores)

    def show(self, query: list[int], response_text: str) -> str: ...  # one rollout as a sample-table line


class TokenActions:
    """The hooks of a task whose action is a sequence of tokens, whose sample lines show the last
    SHOW_CHARS characters of the prompt."""

    SHOW_CHARS = 160

    def policy_and_value(self, policy: GPT, value: ScoreModel) -> nn.Module:
        return PolicyAndValue(policy, value)

    def rollout(self, prompts: list[list[int]], policy: GPT, pv: nn.Module, ref: GPT, cfg, rt,
                generator: torch.Generator) -> tuple[Rollout, dict]:
        return token_rollout(self, prompts, policy, pv, ref, cfg, rt, generator)

    def show(self, query: list[int], response_text: str) -> str:
        text = get_tokenizer().decode(query)
        text = text if len(text) <= self.SHOW_CHARS else "..." + text[-self.SHOW_CHARS:]
        return f"{text!r} -> {response_text!r}"


# -----------------------------------------------------------------------------
# per-token log-probs at response positions

def masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x where mask is 1, else 0 - also where x is -inf or nan there (the log-prob of a pad token)."""
    return torch.where(mask.bool(), x, torch.zeros_like(x))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (...) of `tokens` under the sampling distribution at `temperature` (model.sampling_logprobs,
    exactly what generate() draws from) and the full (..., V) log-probs."""
    logp_all = sampling_logprobs(logits, temperature)
    return logp_all.gather(-1, tokens[..., None]).squeeze(-1), logp_all


def response_logits(model: GPT, idx: torch.Tensor, attention_mask: torch.Tensor, start: int) -> torch.Tensor:
    """Logits (K, V) at the positions that predict the K real response tokens (row-major order) of
    left-padded prompts followed by right-padded responses from column `start` on. The vocabulary
    projection, most of a small model's cost, runs nowhere else: not on the prompt, not on padding."""
    h = model.hidden_states(idx, attention_mask)[:, start - 1:-1]   # position t predicts token t+1
    return model.logits(h[attention_mask[:, start:].bool()])


def unflatten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(K,) values at the real tokens of a (B, N) mask, row-major → (B, N) with 0 elsewhere (differentiable)."""
    return torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_scatter(mask.bool(), x)


def entropy(logp_all: torch.Tensor) -> torch.Tensor:
    """Entropy (B, N) of distributions given as log-probs (-inf entries contribute 0)."""
    return torch.special.entr(logp_all.exp()).sum(-1)


# -----------------------------------------------------------------------------
# policy and value under one module

class PolicyAndValue(nn.Module):
    """Policy and value model under one module: one DDP wrapper, one optimizer, one clipped gradient norm.
    forward → the policy's logits (K, V) at the K real response tokens, and the values (B, N) of the
    states before each response token."""

    def __init__(self, policy: GPT, value: ScoreModel):
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor, start: int):
        logits = response_logits(self.policy, idx, attention_mask, start)          # (K, V)
        values = self.value(idx, attention_mask)[:, start - 1:-1]                  # (B, N)
        return logits, values


# -----------------------------------------------------------------------------
# batching helpers

def response_texts(response: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """Decoded responses up to their EOS."""
    return [decode_summary(row[m.bool()].tolist()) for row, m in zip(response.cpu(), mask.cpu())]


def pad_cat(chunks: list[torch.Tensor], value: int) -> torch.Tensor:
    """Concatenate (b, n_i) chunks along rows, right-padding each to the longest n_i."""
    n = max(c.size(1) for c in chunks)
    return torch.cat([torch.nn.functional.pad(c, (0, n - c.size(1)), value=value) for c in chunks])


def chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


# -----------------------------------------------------------------------------
# the token rollout

@dataclass
class Rollout:
    """One rank's share of a PPO step: prompt + response tokens and everything PPO computes on them."""
    idx: torch.Tensor           # (B, T0 + N) left-padded prompts, then right-padded responses
    attention_mask: torch.Tensor  # (B, T0 + N)
    start: int                  # T0: where responses begin
    mask: torch.Tensor          # (B, N) float: real response tokens (EOS included)
    logprobs: torch.Tensor      # (B, N) policy log-probs at the rollout temperature
    ref_logprobs: torch.Tensor  # (B, N) reference log-probs at the same temperature
    values: torch.Tensor        # (B, N) value of the state before each response token
    scores: torch.Tensor        # (B,) reward-model score, or the missing-EOS score
    raw_scores: torch.Tensor    # (B,) reward-model score as given
    entropy: torch.Tensor       # (B, N) entropy of the policy's sampling distribution
    group = 1                   # rows per prompt that share one forward (a class constant: one response per prompt)

    @property
    def response(self) -> torch.Tensor:
        return self.idx[:, self.start:]

    @property
    def actions(self) -> torch.Tensor:
        """(B, N) what the policy chose at each step: the response tokens."""
        return self.response

    def forward_args(self, rows: torch.Tensor) -> tuple:
        """Arguments of the policy+value forward for these rows."""
        return self.idx[rows], self.attention_mask[rows], self.start

    def show(self, task, i: int) -> str:
        query = self.idx[i, :self.start][self.attention_mask[i, :self.start].bool()].tolist()
        return task.show(query, response_texts(self.response[i:i + 1].cpu(), self.mask[i:i + 1].cpu())[0])


@torch.no_grad()
def token_rollout(task: TokenTask, prompts: list[list[int]], policy: GPT, pv: nn.Module, ref: GPT, cfg, rt,
            generator: torch.Generator) -> tuple[Rollout, dict]:
    """Sample responses with `policy`, then one forward per model over prompt + response with logits at
    response positions only: policy log-probs and values (one pass through `pv`, the PolicyAndValue forward
    the update uses, so that the first ratio is exactly 1), reference log-probs, scores."""
    query, query_mask = (t.to(rt.device) for t in left_pad(prompts, PAD_ID))
    B, T0 = query.shape
    t0 = time.time()
    responses, masks = [], []
    for c in chunks(B, cfg.gen_batch or B):
        with rt.autocast():
            tokens, mask = task.respond(policy, query[c], query_mask[c], cfg.temperature, generator)
        responses.append(tokens)
        masks.append(mask)
    response, response_mask = pad_cat(responses, PAD_ID), pad_cat(masks, 0)
    if rt.device_type == "cuda":
        torch.cuda.synchronize()
    t_gen = time.time() - t0

    t0 = time.time()
    idx, attention_mask = torch.cat([query, response], 1), torch.cat([query_mask, response_mask], 1)
    out = {k: [] for k in ("logprobs", "ref_logprobs", "values", "entropy", "scores", "raw_scores")}
    for c in chunks(B, cfg.micro_batch):
        real = response_mask[c].bool()
        with rt.autocast():
            logits, values = pv(idx[c], attention_mask[c], T0)
            ref_logits = response_logits(ref, idx[c], attention_mask[c], T0)
        logp, logp_all = token_logprobs(logits, response[c][real], cfg.temperature)
        out["logprobs"].append(unflatten(logp, real))
        out["entropy"].append(unflatten(entropy(logp_all), real))
        del logits, logp_all
        out["ref_logprobs"].append(unflatten(token_logprobs(ref_logits, response[c][real], cfg.temperature)[0], real))
        out["values"].append(values.float())
        scores, raw = task.score(query[c], query_mask[c], response[c], response_mask[c])
        out["scores"].append(scores)
        out["raw_scores"].append(raw)
    mask = response_mask.float()
    out = {k: torch.cat(v) for k, v in out.items()}
    out["values"] = masked(out["values"], mask)  # padding carries nothing
    if rt.device_type == "cuda":
        torch.cuda.synchronize()
    timing = {"t_gen": t_gen, "t_score": time.time() - t0, "gen_tokens": mask.sum().item()}
    return Rollout(idx=idx, attention_mask=attention_mask, start=T0, mask=mask, **out), timing
