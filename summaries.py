"""The one inference path for summarizers: a checkpoint loaded as a `Summarizer` (its model and the prompt
template and budgets it was trained with), batched generation with the KV cache, the decoded summary
text, and what summaries are measured by - the generated world's gold score (`--gold auto`), ROUGE and a
reward model's score. Used by sft.py's evaluation, ppo.py, summarize.py, serve.py, eval_summaries.py,
export.py and sample_comparisons.py, so that a post becomes the same tokens and a summary the same text
in every one of them.

A library: importing it has no side effects.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import synthetic
import tldr
from checkpoints import build_from_checkpoint, load_checkpoint, prompt_info, resolve_ckpt
from common import UserError, get_tokenizer
from model import EOS_ID, GPT, PAD_ID, ScoreModel, left_pad, position_kl, right_pad

SUMMARIZER_STAGES = ("ppo", "sft", "dpo")
DEFAULT_CKPT, FALLBACK_CKPT = "ppo_latest.pt", "best_sft.pt"   # the PPO policy, else the SFT model
DPO_CKPT = "dpo_latest.pt"   # the DPO policy, served beside the PPO and SFT models when it exists
METADATA_SKIPPED = ("model", "optimizer", "scaler", "rng", "data_state", "value_model")  # tensors a summarizer does not keep


# -----------------------------------------------------------------------------
# generation

# The sampler divides float32 logits by the temperature: below MIN_TEMPERATURE the quotient can overflow to inf
# (and the distribution becomes NaN), a temperature that is inf in float32 (1e39 is finite only as a float64)
# makes every logit 0 or NaN, and above MAX_TEMPERATURE the distribution is the uniform one over the vocabulary
# in all but name. So a temperature is 0 (greedy) or in [MIN_TEMPERATURE, MAX_TEMPERATURE].
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0


def sampling_problem(temperature, top_k, top_p) -> tuple[str, str] | None:
    """(the field, why) when these settings cannot be sampled with in float32, else None: the one check of
    sampling settings, made by summarize.py on its flags, by the server on a request field by field
    (serving.protocol) and again before a row is admitted (serving.engine)."""
    if not isinstance(temperature, (int, float)) or not temperature >= 0:
        return "temperature", f"temperature must be >= 0, got {temperature!r}"
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
        return "temperature", (f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], "
                               f"got {temperature:g}")
    if not isinstance(top_k, int) or not 0 <= top_k < 2 ** 63:
        return "top_k", f"top_k must be >= 0 (0: off), got {top_k!r}"
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        return "top_p", f"top_p must be in (0, 1], got {top_p!r}"
    if not np.float32(top_p) > 0:  # 5e-324 is > 0 as a float64 but 0 as a float32, where top-p would turn off
        return "top_p", f"top_p must be in (0, 1] as a float32, got {top_p:g}"
    return None


def prompt_budget(block_size: int, max_new_tokens: int, max_prompt_tokens: int = tldr.MAX_PROMPT_TOKENS) -> int:
    """Prompt tokens a model can take when it will add max_new_tokens: the checkpoint's prompt budget, or
    less where the context is shorter (every summarizer, CLI and server, cuts posts to this)."""
    budget = min(max_prompt_tokens, block_size - max_new_tokens)
    if budget <= 0:
        raise UserError(f"the model's block size {block_size} leaves no room for a prompt and "
                        f"{max_new_tokens} new tokens")
    return budget


def decode_summary(tokens: list[int], tokenizer=None) -> str:
    """Generated summary tokens → text, up to (not including) the first EOS, stripped."""
    tokens = list(tokens)
    if EOS_ID in tokens:
        tokens = tokens[:tokens.index(EOS_ID)]
    tok = tokenizer or get_tokenizer()
    return tok.decode([t for t in tokens if t < EOS_ID]).strip()


def generate_summaries(model, posts: list[tldr.Post | str], *args, **kwargs) -> list[str]:
    """Summaries of posts (a Post, or a bare post text) from a GPT: the texts of generate_summaries_and_ends,
    which takes the same arguments."""
    return generate_summaries_and_ends(model, posts, *args, **kwargs)[0]


@torch.no_grad()
def generate_summaries_and_ends(model, posts: list[tldr.Post | str], rt=None, batch_size: int = 16,
                                max_new_tokens: int = tldr.MAX_SUMMARY_TOKENS, temperature: float = 0.0,
                                max_prompt_tokens: int = tldr.MAX_PROMPT_TOKENS, template: str = tldr.TEMPLATE,
                                top_k: int | None = None, top_p: float | None = None,
                                generator: torch.Generator | None = None,
                                progress: bool = False) -> tuple[list[str], list[bool]]:
    """Summaries of posts (a Post, or a bare post text) from a GPT, and for each whether the model ended it
    (emitted EOS) rather than running into max_new_tokens - which the text alone does not tell. Prompts are
    built by tldr.prompt_tokens, left-padded and decoded with the KV cache (temperature 0: greedy), the text
    taken up to the first EOS. rt (a common.Runtime) supplies autocast; without it the model's own device
    and dtype are used. Prompts are batched by length to waste little padding; the result keeps the order
    of posts."""
    if not posts:
        return [], []
    posts = [p if isinstance(p, tldr.Post) else tldr.Post(str(p)) for p in posts]
    device = next(model.parameters()).device
    budget = prompt_budget(model.config.block_size, max_new_tokens, max_prompt_tokens)
    tok = get_tokenizer()
    prompts = [tldr.prompt_tokens(p, budget, template, tok)[0] for p in posts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    ended: list[bool] = [False] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="summaries", leave=False, disable=not progress):
            rows = order[start:start + batch_size]
            idx, mask = left_pad([prompts[i] for i in rows])
            with rt.autocast() if rt is not None else contextlib.nullcontext():
                tokens, _, new_mask = model.generate(idx.to(device), mask.to(device), max_new_tokens=max_new_tokens,
                                                     temperature=temperature, top_k=top_k, top_p=top_p,
                                                     generator=generator)
            for i, row, m in zip(rows, tokens.cpu(), new_mask.cpu()):
                new = row[m.bool()].tolist()
                out[i], ended[i] = decode_summary(new, tok), EOS_ID in new
    finally:
        model.train(was_training)
    return out, ended


# -----------------------------------------------------------------------------
# how far a policy's summaries are from its reference

def summary_logits(model: GPT, pairs: list[tuple[list[int], list[int]]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, V) at the N positions that predict summary tokens, the row of each (N,)) of (prompt, summary)
    token pairs, right-padded in one batch; the vocabulary projection runs at those positions only."""
    idx, targets, mask = (t.to(device) for t in tldr.sft_batch(pairs))
    logits, _ = model(idx, targets, mask, logits_at="targets")                    # (N, V)
    return logits, (targets != -1).nonzero()[:, 0]


@torch.no_grad()
def kl_to_reference(model: GPT, ref: GPT, posts: list[tldr.Post], texts: list[str], info: dict, rt,
                    batch_size: int = 16) -> tuple[list[float], list[int]]:
    """KL(model || ref) along each of `model`'s summaries `texts` of `posts`: the exact KL of the two next-token
    distributions at every summary token (model.position_kl), summed over the summary and its EOS - how far a
    fine-tuned policy has moved from its reference on the text it writes (temperature 1) - and each summary's
    length in tokens. The prompt is the one the summary was written after: `info`'s template and budgets, cut
    to what the model's context leaves (as generate_summaries_and_ends)."""
    budget = prompt_budget(model.config.block_size, info["max_summary_tokens"], info["max_prompt_tokens"])
    tok = get_tokenizer()
    pairs = [(tldr.prompt_tokens(post, budget, info["template"], tok)[0],
              tldr.summary_tokens(text, info["max_summary_tokens"], tok)) for post, text in zip(posts, texts)]
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        with rt.autocast():
            logits, rows = summary_logits(model, chunk, rt.device)
            ref_logits, _ = summary_logits(ref, chunk, rt.device)
        kl = position_kl(F.log_softmax(logits.float(), -1), F.log_softmax(ref_logits.float(), -1))   # (N,)
        out += torch.zeros(len(chunk), device=kl.device, dtype=kl.dtype).index_add(0, rows, kl).tolist()
    return out, [len(summary) for _, summary in pairs]


# -----------------------------------------------------------------------------
# a summarizer checkpoint

@dataclass
class Summarizer:
    """A summarizer checkpoint ready to generate: the model on its device, dropout off, and the prompt
    template and token budgets it was trained with (the checkpoint's "tldr" entry). Every command that
    summarizes builds prompts through it, so a post becomes the same tokens in each."""
    model: GPT
    info: dict            # template, max_prompt_tokens, max_summary_tokens
    stage: str
    step: int
    metrics: dict
    checkpoint: dict      # the checkpoint's entries but its tensors (config, model_config, stage, ...)

    @classmethod
    def from_checkpoint(cls, ckpt: dict, device, where="checkpoint") -> "Summarizer":
        model = build_from_checkpoint(ckpt, GPT, dropout=0.0, where=where).to(device).eval()
        return cls(model, prompt_info(ckpt), ckpt["stage"], int(ckpt.get("step", 0)), dict(ckpt.get("metrics") or {}),
                   {k: v for k, v in ckpt.items() if k not in METADATA_SKIPPED})

    @classmethod
    def load(cls, path, device="cpu", stages: tuple[str, ...] = SUMMARIZER_STAGES,
             ckpt_dir: str = "checkpoints") -> "Summarizer":
        """The summarizer of a checkpoint file (a bare name resolves in ckpt_dir) of one of `stages`."""
        return cls.from_checkpoint(load_checkpoint(path, stages, ckpt_dir=ckpt_dir), device,
                                   where=resolve_ckpt(str(path), ckpt_dir))

    @property
    def budget(self) -> int:
        """Most summary tokens: the checkpoint's summary budget."""
        return self.info["max_summary_tokens"]

    def prompt(self, post: tldr.Post, max_new_tokens: int) -> tuple[list[int], bool]:
        """(prompt tokens, whether the post was cut to fit) for a summary of up to max_new_tokens."""
        budget = prompt_budget(self.model.config.block_size, max_new_tokens, self.info["max_prompt_tokens"])
        return tldr.prompt_tokens(post, budget, self.info["template"])

    def summarize(self, posts: list[tldr.Post], rt=None, batch_size: int = 16, max_new_tokens: int = 0,
                  temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                  generator: torch.Generator | None = None, progress: bool = False) -> tuple[list[str], list[bool]]:
        """(summaries, whether each ended with EOS) of posts, with this checkpoint's prompts; max_new_tokens
        0 is the checkpoint's summary budget."""
        return generate_summaries_and_ends(self.model, posts, rt, batch_size, max_new_tokens or self.budget,
                                           temperature, self.info["max_prompt_tokens"], self.info["template"],
                                           top_k, top_p, generator, progress)


def summarizer_dir(ckpt_dir: str, note=None) -> str:
    """ckpt_dir, or - when it holds no summarizer (neither DEFAULT_CKPT nor FALLBACK_CKPT) but exactly one of
    its subfolders does, as after `make demo` (run.sh writes checkpoints/<name>/) - that subfolder, and
    `note` is told so. Several candidate subfolders are a UserError that names them."""
    base = Path(ckpt_dir)
    def holds_one(folder: Path) -> bool:
        return any((folder / name).is_file() for name in (DEFAULT_CKPT, FALLBACK_CKPT))
    if not base.is_dir() or holds_one(base):
        return ckpt_dir
    runs = sorted(d for d in base.iterdir() if d.is_dir() and holds_one(d))
    if len(runs) > 1:
        raise UserError(f"no summarizer in {base}/ itself, and {len(runs)} of its run folders hold one "
                        f"({', '.join(d.name for d in runs)}): choose one with --ckpt-dir {base}/NAME")
    if runs and note is not None:
        note(f"note: no summarizer in {base}/ itself; using the run folder {runs[0]} (--ckpt-dir chooses another)")
    return str(runs[0]) if runs else ckpt_dir


def find_summarizer_path(ckpt: str, ckpt_dir: str, note=None) -> Path:
    """The summarizer checkpoint to use: `ckpt` as given, except that the default name (the PPO policy)
    falls back to the SFT model when no PPO run exists yet (`note` is told so)."""
    path = resolve_ckpt(ckpt, ckpt_dir)
    if ckpt != DEFAULT_CKPT or path.is_file():
        return path
    fallback = resolve_ckpt(FALLBACK_CKPT, ckpt_dir)
    if not fallback.is_file():
        raise UserError(f"no summarizer: neither {path} (ppo.py) nor {fallback} (sft.py) exists; train one or "
                        f"pass --ckpt / --ckpt-dir")
    if note is not None:
        note(f"note: {path} not found; using the SFT model {fallback}")
    return fallback


# -----------------------------------------------------------------------------
# measures of summaries: the gold score, ROUGE, a reward model

def use_gold(mode: str, data: str) -> bool:
    """Whether to report the gold score: `auto` when the posts come from synthetic.py (its manifest.json
    beside or above the split files: the gold score means nothing on real posts), `on`, `off`."""
    if mode not in ("auto", "on", "off"):
        raise UserError(f"--gold must be auto, on or off, not {mode!r}")
    if mode != "auto":
        return mode == "on"
    path = Path(data)
    return path.exists() and any((d / "manifest.json").is_file() for d in (path, path.parent))


def gold_breakdowns(posts: list[tldr.Post], summaries: list[str]) -> list[dict]:
    """synthetic.gold_breakdown of each summary against its whole prompt (score, covered, wrong, ...).
    Meaningful only on posts of the generated world (synthetic.py); on real Reddit posts it measures nothing."""
    if len(posts) != len(summaries):
        raise ValueError(f"{len(posts)} posts but {len(summaries)} summaries")
    return [synthetic.gold_breakdown(tldr.render_prompt(p), s) for p, s in zip(posts, summaries)]


def gold_scores(posts: list[tldr.Post], summaries: list[str]) -> list[float]:
    """The gold score of each summary (gold_breakdowns' "score")."""
    return [b["score"] for b in gold_breakdowns(posts, summaries)]


def mean_gold_score(posts: list[tldr.Post], summaries: list[str]) -> float:
    scores = gold_scores(posts, summaries)
    return sum(scores) / len(scores) if scores else float("nan")


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


@torch.no_grad()
def score_tokens(model: ScoreModel, seqs: list[list[int]], batch_size: int = 32,
                 autocast=contextlib.nullcontext) -> torch.Tensor:
    """Rewards (N,) float32 on the CPU of token sequences (prompt + summary each), batched by length.
    autocast: a context factory such as `Runtime.autocast`."""
    if not seqs:
        return torch.zeros(0)
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.empty(len(seqs))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        idx, mask = right_pad([seqs[i] for i in chunk], PAD_ID)
        with autocast():
            rewards = model.reward(idx.to(device), mask.to(device))
        out[chunk] = rewards.float().cpu()
    return out


def score_texts(model: ScoreModel, posts: list[tldr.Post], summaries: list[str], info: dict | None = None,
                batch_size: int = 32, autocast=contextlib.nullcontext) -> torch.Tensor:
    """Rewards (N,) of (post, summary) pairs, built exactly as in training (info: the checkpoint's `tldr`)."""
    if len(posts) != len(summaries):
        raise ValueError(f"{len(posts)} posts but {len(summaries)} summaries")
    info = info or tldr.template_info()
    seqs = [tldr.prompt_tokens(p, info["max_prompt_tokens"], info["template"])[0]
            + tldr.summary_tokens(s, info["max_summary_tokens"]) for p, s in zip(posts, summaries)]
    return score_tokens(model, seqs, batch_size, autocast)
