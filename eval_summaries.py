"""Evaluate summarizers: greedy summaries of the first --posts posts of a split by each policy checkpoint
(SFT, PPO, any language-model checkpoint of this project), generated once with the shared summarizer
(summaries.Summarizer, each checkpoint's own prompt template and budgets) and cached, then

- ROUGE-1/2/L F1 against the reference summaries (rouge-score, stemmed);
- win rates against the reference summaries and against the SFT model's summaries, judged by our reward
  model (the higher reward wins), by the generated world's gold score (on its posts: the oracle judge) and by
  a judge language model of any tokenizer (--judge): the pairwise question asked in both orders (A/B
  swapped), the preference read from the judge's log-probabilities of the answers " A" and " B", a tie
  where the two orders disagree. Each with a 95% Wilson score interval, a tie counting half a win;
- on the generated world, the gold score and its parts (length, missing details, wrong facts)
  with the paired difference to the SFT model on the same posts and its standard error, and the reward
  model's agreement with the gold score on the world's comparisons (--comparisons);
- words per summary, the share of summaries the model ended itself (EOS) and the share of summary
  word trigrams copied from the post: what over-optimising a reward changes;
- each policy's KL to the SFT model along its own summaries (the exact KL of the two next-token
  distributions at each summary token, summed over the summary): how far PPO or DPO moved from SFT.

    python eval_summaries.py --policies best_sft.pt ppo_latest.pt dpo_latest.pt --posts 1000            # SFT, PPO, DPO

    python eval_summaries.py --policies best_sft.pt ppo_latest.pt --judge Qwen/Qwen2.5-7B-Instruct --posts 1000   # one GPU
    python eval_summaries.py --policies best_sft.pt ppo_latest.pt --judge meta-llama/Llama-3.1-8B-Instruct --judge-device cuda:1
    python eval_summaries.py --ckpt-dir checkpoints/small --data data/synthetic/tldr \\
        --comparisons data/synthetic/comparisons --posts 400 --out-dir runs/small/eval                 # CPU, generated world
    python eval_summaries.py --ckpt-dir checkpoints/small --data my_posts --split valid --posts 20 \
        --out-dir runs/small/eval_my_posts      # a local folder of posts (my_posts/valid.jsonl: tldr.py's schemas)

Writes OUT_DIR/eval.json (every figure by name), OUT_DIR/eval.md (the table) and OUT_DIR/summaries.jsonl,
the cache: one row per (post, model) with the post's id (a hash of its subreddit, title and text), the
model's name and checkpoint hash, the summary and whether it ended with EOS. A rerun generates only what
the cache lacks; a checkpoint that changed (another hash) or another post gets new summaries.
One process: the summaries of 1,000 posts by GPT-2 124M take minutes on a GPU; a 7B judge on the same GPU
needs tens of minutes for two policies (4 forwards per pair of summaries: two orders, two answers).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import summaries
import tldr
from checkpoints import LM_STAGES, file_sha256, load_checkpoint, load_reward_model, resolve_ckpt
from common import UserError, check_flags, cli_main, compute_init, read_jsonl, write_json, write_text
from judges import Judge
from summaries import Summarizer

POLICY_STAGES = LM_STAGES
Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal

# The TL;DR comparison question of Rafailov et al. 2023 (DPO, its GPT-4 judge of TL;DR summaries; also
# Huang et al. 2024), with the free-text comparison left out: the answer is read from log-probabilities.
JUDGE_QUESTION = ("Which of the following summaries does a better job of summarizing the most important points "
                  "in the given forum post, without including unimportant or irrelevant details? A good summary "
                  "is both precise and concise.\n\nPost:\n{post}\n\nSummary A:\n{a}\n\nSummary B:\n{b}\n\n"
                  'State only "A" or "B" to indicate your choice.')
ANSWER_PREFIX = "Preferred:"
ANSWERS = (" A", " B")


@dataclass
class Config:
    policies: list[str] = field(default_factory=lambda: ["best_sft.pt", "ppo_latest.pt"])  # summarizer checkpoints (sft, ppo or any LM checkpoint); bare names resolve in --ckpt-dir
    sft: str = "best_sft.pt"              # the SFT model every other policy is compared against ("": no such comparison)
    rm: str = "reward_model.pt"           # reward model judging the pairs ("": none)
    judge: str = ""                       # judge language model of any tokenizer: a Hugging Face hub name or local directory ("": none)
    data: str = "CarperAI/openai_summarize_tldr"  # posts with reference summaries: a hub dataset or a local folder (tldr.py's schemas)
    split: str = "test"                   # split of --data
    posts: int = 1000                     # evaluate the first this many posts of the split (all of them when it has fewer)
    gold: str = "auto"                    # the generated world's gold score and its oracle judge: auto (when --data was written by synthetic.py) | on | off
    comparisons: str = ""                 # the world's comparisons for the reward model's agreement with the gold score ("": skip)
    rm_pairs: int = 500                   # valid pairs of --comparisons scored for that agreement (0: all)
    example: int = 0                      # index of the post shown as the example (its reference and every policy's summary)
    out_dir: str = "runs/eval"            # eval.json, eval.md and the summaries cache summaries.jsonl
    ckpt_dir: str = "checkpoints"         # where bare checkpoint names resolve
    batch_size: int = 32                  # posts per generation batch, sequences per reward-model forward
    judge_batch: int = 8                  # sequences per judge forward
    judge_device: str = ""                # the judge's device ("": the policies')
    judge_dtype: str = "auto"             # auto (bf16 on Ampere+, fp16 on older GPUs, fp32 on CPU) | float32 | bfloat16 | float16
    judge_chat: bool = True               # ask through the judge tokenizer's chat template when it has one
    device: str = "auto"                  # auto | cuda | cpu | mps
    dtype: str = "auto"                   # auto (bf16 on Ampere+, fp16 on older GPUs, fp32 on CPU) | float32 | bfloat16 | float16


# -----------------------------------------------------------------------------
# win rates and their intervals

def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion p observed over n trials (Wilson 1927): unlike p +- z*se it
    stays inside [0, 1] and does not collapse to a point at 0% or 100%."""
    if n <= 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def win_rate(outcomes: list[float]) -> dict:
    """Outcomes 1 (win), 0.5 (tie), 0 (loss) → counts, the win rate (a tie counts half) and its 95% Wilson
    interval. A tie varies less than a coin flip, so with ties the interval is on the safe side."""
    n = len(outcomes)
    wins, ties = sum(o == 1 for o in outcomes), sum(o == 0.5 for o in outcomes)
    rate = (wins + ties / 2) / n if n else None
    lo, hi = wilson_interval(rate, n) if n else (None, None)
    return {"wins": wins, "ties": ties, "losses": n - wins - ties, "n": n, "win_rate": rate, "ci95": [lo, hi]}


def pointwise_outcomes(scores: list[float], other: list[float]) -> list[float]:
    """Per item: 1 where the first score is higher, 0 where lower, 0.5 where equal."""
    return [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(scores, other)]


def combine_orders(logp: torch.Tensor) -> list[float]:
    """(N, 2, 2) answer log-probs [item, order, answer A/B] of a pairwise question asked with x as A (order
    0) and with x as B (order 1) → outcomes for x: 1 when both orders prefer x, 0 when both prefer the
    other, 0.5 when they disagree (or an order has no preference): position bias cancels out."""
    first = torch.sign(logp[:, 0, 0] - logp[:, 0, 1])   # > 0: x (answer A) preferred
    second = torch.sign(logp[:, 1, 1] - logp[:, 1, 0])  # > 0: x (answer B) preferred
    return [1.0 if a > 0 and b > 0 else 0.0 if a < 0 and b < 0 else 0.5 for a, b in zip(first.tolist(), second.tolist())]


def paired_difference(before: list[float], after: list[float]) -> tuple[float | None, float | None]:
    """Mean of after - before over the same items, and its standard error (sample standard deviation over
    sqrt(n); None below two items). Pairing removes what the items themselves vary by; a difference within
    about two standard errors of 0 is what reruns of the same chain scatter by."""
    d = torch.tensor(after, dtype=torch.float64) - torch.tensor(before, dtype=torch.float64)
    if len(d) == 0:
        return None, None
    return d.mean().item(), (d.std() / len(d) ** 0.5).item() if len(d) > 1 else None


# -----------------------------------------------------------------------------
# the judge language model: the pairwise question through judges.py's text bridge

def judge_question(post: tldr.Post, a: str, b: str) -> str:
    text = f"SUBREDDIT: r/{post.subreddit}\nTITLE: {post.title}\nPOST: {post.post}" if post.title else post.post
    return JUDGE_QUESTION.format(post=text, a=a.strip(), b=b.strip())


def judge_context(tokenizer, question: str, chat: bool = True) -> str:
    """The text the judge continues with an answer: the question, in the tokenizer's chat template when it
    has one (an instruction-tuned judge answers there), then the answer prefix."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
        bos = tokenizer.bos_token
        if bos and text.startswith(bos):  # the bridge's tokenizer call adds it once more otherwise
            text = text[len(bos):]
        return text + ANSWER_PREFIX
    return question + "\n\n" + ANSWER_PREFIX


def judge_outcomes(judge, posts: list[tldr.Post], xs: list[str], ys: list[str], chat: bool = True) -> list[float]:
    """x against y on each post by the judge LM, both orders asked: 1 / 0.5 / 0 (combine_orders). Identical
    summaries are a tie without asking."""
    ask = [i for i in range(len(posts)) if xs[i].strip() != ys[i].strip()]
    contexts, answers = [], []
    for i in ask:
        for a, b in ((xs[i], ys[i]), (ys[i], xs[i])):
            context = judge_context(judge.tokenizer, judge_question(posts[i], a, b), chat)
            contexts += [context] * len(ANSWERS)
            answers += ANSWERS
    out = [0.5] * len(posts)
    if ask:
        sums, _ = judge.logprobs(contexts, answers)
        for i, o in zip(ask, combine_orders(sums.view(len(ask), 2, len(ANSWERS)))):
            out[i] = o
    return out


def load_judge(cfg: Config, rt):
    """The --judge causal LM through judges.Judge (any tokenizer; a UserError when it cannot be loaded or is
    not a causal LM)."""
    judge = Judge(cfg.judge, cfg.judge_device or rt.device, cfg.judge_dtype, cfg.judge_batch, cfg.ckpt_dir)
    if judge.kind != "lm":
        raise UserError(f"--judge {cfg.judge} is not a causal language model; the pairwise question reads the "
                        f"answer's log-probabilities")
    return judge


# -----------------------------------------------------------------------------
# summaries, once: the cache

def post_id(post: tldr.Post) -> str:
    """A post's id: a hash of its subreddit, title and text (the datasets carry no id of their own)."""
    return hashlib.sha1(json.dumps([post.subreddit, post.title, post.post]).encode()).hexdigest()[:16]


def read_cache(path: Path) -> dict[tuple[str, str], dict]:
    """(checkpoint hash, post id) → cached row; a torn last line is ignored."""
    rows = {}
    for row in read_jsonl(path) if path.is_file() else []:
        try:
            rows[(row["sha256"], row["post_id"])] = row
        except (KeyError, TypeError):
            continue
    return rows


def write_cache(path: Path, rows: dict):
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows.values()))


@torch.no_grad()
def summarize_with(ckpt_path: Path, stages, posts: list[tldr.Post], rt, batch_size: int) -> tuple[list[str], list[bool]]:
    """Greedy summaries by a checkpoint's model with the prompt template and budgets it was trained with
    (what summarize.py does), and whether each ended with EOS."""
    summarizer = Summarizer.load(ckpt_path, rt.device, stages)
    return summarizer.summarize(posts, rt, batch_size, progress=True)


def cached_summaries(name: str, path: Path, posts: list[tldr.Post], cache: dict, rt, batch_size: int,
                     cache_path: Path) -> tuple[list[str], list[bool], str, int]:
    """(summaries, ended, checkpoint hash, how many were generated now) of one policy: the cached ones,
    the rest generated and added to the cache file."""
    sha = file_sha256(path)
    ids = [post_id(p) for p in posts]
    missing: dict[str, int] = {}  # post id → its first index (a post that occurs twice is summarized once)
    for i, pid in enumerate(ids):
        if (sha, pid) not in cache:
            missing.setdefault(pid, i)
    todo = list(missing.values())
    if todo:
        texts, ends = summarize_with(path, POLICY_STAGES, [posts[i] for i in todo], rt, batch_size)
        for i, text, end in zip(todo, texts, ends):
            cache[(sha, ids[i])] = {"post_id": ids[i], "model": name, "checkpoint": str(path), "sha256": sha,
                                    "summary": text, "ended": end}
        write_cache(cache_path, cache)
    rows = [cache[(sha, pid)] for pid in ids]
    return [r["summary"] for r in rows], [bool(r["ended"]) for r in rows], sha, len(todo)


@torch.no_grad()
def kl_to_sft(path: Path, sft: Summarizer, posts: list[tldr.Post], texts: list[str], rt, batch_size: int) -> list[float]:
    """KL(policy || SFT) along each of the policy's summaries (summaries.kl_to_reference: exact per token, summed
    over the summary and its EOS), the prompt built by the policy's own template."""
    policy = Summarizer.load(path, rt.device, POLICY_STAGES)
    return summaries.kl_to_reference(policy.model, sft.model, posts, texts, policy.info, rt, batch_size)[0]


# -----------------------------------------------------------------------------
# figures of one set of summaries

_WORD = re.compile(r"[a-z0-9']+")


def copied_trigram_share(post: str, summary: str) -> float | None:
    """Share of the summary's word trigrams (lowercased words) that occur in the post; None below 3 words."""
    words = _WORD.findall(summary.lower())
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    if not grams:
        return None
    pw = _WORD.findall(post.lower())
    source = {tuple(pw[i:i + 3]) for i in range(len(pw) - 2)}
    return sum(g in source for g in grams) / len(grams)


def text_figures(posts: list[tldr.Post], texts: list[str], references: list[str], scorer) -> dict:
    """ROUGE-1/2/L F1 against the references, words per summary, copied-trigram share."""
    copied = [c for c in (copied_trigram_share(p.post, s) for p, s in zip(posts, texts)) if c is not None]
    return {**summaries.rouge(scorer, texts, references), "words": _mean([len(s.split()) for s in texts]),
            "copied_trigrams": _mean(copied), "empty": sum(not s.strip() for s in texts)}


def gold_figures(breakdowns: list[dict]) -> dict:
    return {"gold": _mean([b["score"] for b in breakdowns]), "gold_words": _mean([b["words"] for b in breakdowns]),
            "gold_missing": _mean([len(b["missing"]) for b in breakdowns]),
            "gold_wrong": _mean([len(b["wrong"]) for b in breakdowns])}


def gold_parts(breakdowns: list[dict]) -> dict[str, list[float]]:
    return {"score": [b["score"] for b in breakdowns], "words": [b["words"] for b in breakdowns],
            "missing": [len(b["missing"]) for b in breakdowns], "wrong": [len(b["wrong"]) for b in breakdowns]}


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


# -----------------------------------------------------------------------------
# the reward model against the gold score (generated world)

def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n, ties sharing the mean of their ranks (what Spearman's rho needs)."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty(len(x), dtype=torch.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(x: torch.Tensor, y: torch.Tensor) -> float | None:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    den = (x.pow(2).sum() * y.pow(2).sum()).sqrt()
    return (x * y).sum().item() / den.item() if den > 0 else None


def spearman(x: torch.Tensor, y: torch.Tensor) -> float | None:
    return pearson(average_ranks(x), average_ranks(y))


def gold_agreement(rm_chosen: torch.Tensor, rm_rejected: torch.Tensor, gold_chosen: torch.Tensor,
                   gold_rejected: torch.Tensor) -> float | None:
    """Share of pairs the reward model orders as the gold score does (pairs the gold score ties are left
    out): the reward model's accuracy against noise-free labels."""
    g = torch.sign(gold_chosen - gold_rejected)
    keep = g != 0
    if not keep.any():
        return None
    return (torch.sign(rm_chosen - rm_rejected)[keep] == g[keep]).double().mean().item()


def reward_model_vs_gold(score, comparisons: list[tldr.Comparison]) -> dict:
    """Rewards (score: (posts, summaries) → tensor) of both summaries of each pair against their gold
    scores: Pearson and Spearman over all summaries, and the agreement on the order within pairs."""
    posts = [c.post for c in comparisons] * 2
    texts = [c.chosen for c in comparisons] + [c.rejected for c in comparisons]
    rewards = score(posts, texts).double()
    parts = summaries.gold_breakdowns(posts, texts)
    gold = torch.tensor([b["score"] for b in parts], dtype=torch.float64)
    n = len(comparisons)
    # a wrong fact is only visible against the post, the other faults in the summary alone: the two
    # agreements say which the reward model has learned
    stated = torch.tensor([bool(b["wrong"]) for b in parts])
    wrong_fact = stated[:n] | stated[n:]
    agreement = lambda pairs: gold_agreement(rewards[:n][pairs], rewards[n:][pairs], gold[:n][pairs], gold[n:][pairs])
    return {"rm_gold_pearson": pearson(rewards, gold), "rm_gold_spearman": spearman(rewards, gold),
            "rm_gold_pair_accuracy": agreement(slice(None)), "rm_gold_pair_accuracy_wrong_fact": agreement(wrong_fact),
            "rm_gold_pair_accuracy_other": agreement(~wrong_fact), "rm_gold_wrong_fact_pairs": int(wrong_fact.sum()),
            "rm_gold_summaries": len(texts)}


# -----------------------------------------------------------------------------
# the stage

def check_config(cfg: Config) -> tuple[dict[str, Path], Path | None, Path | None]:
    """Flags and files, before anything is loaded: ({name: policy path}, sft path, reward-model path)."""
    check_flags(cfg, positive=("posts", "batch_size", "judge_batch"), non_negative=("rm_pairs", "example"))
    if not cfg.policies:
        raise UserError("--policies needs at least one checkpoint")
    paths = {}
    for p in cfg.policies:
        path = resolve_ckpt(p, cfg.ckpt_dir)
        if not path.is_file():
            raise UserError(f"policy checkpoint not found: {path}")
        name = path.stem
        if name in paths or name == "reference":
            raise UserError(f"two policies are named {name!r}; give checkpoints with different file names")
        paths[name] = path
    found = []
    for flag, value in (("--sft", cfg.sft), ("--rm", cfg.rm)):
        path = resolve_ckpt(value, cfg.ckpt_dir) if value else None
        if path is not None and not path.is_file():
            raise UserError(f"{flag} checkpoint not found: {path} (pass {flag} \"\" to leave it out)")
        found.append(path)
    if cfg.comparisons and not (summaries.use_gold(cfg.gold, cfg.data) and cfg.rm):
        raise UserError("--comparisons measures the reward model against the gold score: it needs --rm and posts of "
                        "the generated world (--gold)")
    return paths, found[0], found[1]


def main(cfg: Config) -> dict:
    # --- config and inputs: every user error before a summary is generated
    paths, sft_path, rm_path = check_config(cfg)
    gold = summaries.use_gold(cfg.gold, cfg.data)
    rt = compute_init(0, cfg.device, cfg.dtype)
    judge = load_judge(cfg, rt) if cfg.judge else None
    rows = tldr.load_sft(cfg.data, cfg.split)[:cfg.posts]
    if cfg.example >= len(rows):
        raise UserError(f"--example {cfg.example} is outside the {len(rows)} evaluated posts")
    posts, refs = [r.post for r in rows], [r.summary for r in rows]
    sft_name = None
    todo = dict(paths)
    if sft_path is not None:
        sft_name = next((n for n, p in paths.items() if p.resolve() == sft_path.resolve()), None)
        if sft_name is None:
            sft_name = sft_path.stem if sft_path.stem not in paths else "sft"
            todo[sft_name] = sft_path
    stages = {name: load_checkpoint(path, POLICY_STAGES)["stage"] for name, path in todo.items()}
    reward_model = load_reward_model(str(rm_path)) if rm_path is not None else None
    rm_pairs = tldr.load_comparisons(cfg.comparisons, "valid")[:cfg.rm_pairs or None] if cfg.comparisons else []
    out = Path(cfg.out_dir)
    cache_path = out / "summaries.jsonl"
    t0 = time.time()

    # --- summaries, once per (checkpoint, post)
    cache = read_cache(cache_path)
    models, texts_of, generated = {}, {}, {}
    for name, path in todo.items():
        texts, ends, sha, generated[name] = cached_summaries(name, path, posts, cache, rt, cfg.batch_size, cache_path)
        texts_of[name] = texts
        models[name] = {"checkpoint": str(path), "sha256": sha, "stage": stages[name],
                        "role": "sft" if name == sft_name else "policy", "eos_rate": _mean(ends)}
    print(f"summaries of {len(posts)} posts: {sum(generated.values())} generated, "
          f"{len(posts) * len(todo) - sum(generated.values())} from {cache_path}", flush=True)

    # --- KL to the SFT model along each policy's own summaries
    if sft_name:
        sft_model = Summarizer.load(todo[sft_name], rt.device, POLICY_STAGES)
        for name in todo:
            if name != sft_name:
                models[name]["kl_to_sft"] = _mean(kl_to_sft(todo[name], sft_model, posts, texts_of[name], rt, cfg.batch_size))
        del sft_model

    # --- figures of the texts
    scorer = summaries.rouge_scorer()
    reference = {k: v for k, v in text_figures(posts, refs, refs, scorer).items() if not k.startswith("rouge")}
    for name in todo:
        models[name].update(text_figures(posts, texts_of[name], refs, scorer))
    opponents = lambda name: [("reference", refs)] + ([("sft", texts_of[sft_name])] if sft_name and name != sft_name else [])
    wins = {name: {} for name in todo}

    # --- the reward model as a judge
    record_rm = {}
    if reward_model is not None:
        rm, rm_ckpt = reward_model
        rm.to(rt.device)
        score = lambda ps, ss: summaries.score_texts(rm, ps, ss, rm_ckpt.get("tldr"), cfg.batch_size, rt.autocast)
        rewards = {name: score(posts, texts_of[name]).tolist() for name in todo}
        ref_rewards = score(posts, refs).tolist()
        reference["reward"] = _mean(ref_rewards)
        for name in todo:
            models[name]["reward"] = _mean(rewards[name])
            other = {"reference": ref_rewards, "sft": rewards.get(sft_name)}
            wins[name]["reward_model"] = {o: win_rate(pointwise_outcomes(rewards[name], other[o])) for o, _ in opponents(name)}
        if rm_pairs:
            record_rm = reward_model_vs_gold(score, rm_pairs)
        del rm, reward_model

    # --- the gold score: its breakdown, the paired differences to SFT, the oracle judge
    if gold:
        parts = {name: gold_parts(summaries.gold_breakdowns(posts, texts_of[name])) for name in todo}
        ref_parts = gold_parts(summaries.gold_breakdowns(posts, refs))
        reference.update(_gold_means(ref_parts))
        for name in todo:
            models[name].update(_gold_means(parts[name]))
            other = {"reference": ref_parts["score"], "sft": parts[sft_name]["score"] if sft_name else None}
            wins[name]["gold"] = {o: win_rate(pointwise_outcomes(parts[name]["score"], other[o])) for o, _ in opponents(name)}
            if sft_name and name != sft_name:
                models[name]["vs_sft"] = {k: dict(zip(("diff", "se"), paired_difference(parts[sft_name][k], parts[name][k])))
                                          for k in ("score", "words", "missing", "wrong")}

    # --- the judge language model
    if judge is not None:
        for name in todo:
            wins[name]["judge"] = {o: win_rate(judge_outcomes(judge, posts, texts_of[name], ys, cfg.judge_chat))
                                   for o, ys in opponents(name)}
    for name in todo:
        models[name]["win_rates"] = wins[name]

    # --- the example post
    i = cfg.example
    example = {"index": i, "post_id": post_id(posts[i]), "post": posts[i].post, "title": posts[i].title,
               "subreddit": posts[i].subreddit, "reference": refs[i], "summaries": {n: texts_of[n][i] for n in todo}}
    if gold:
        example["gold"] = dict(zip(["reference", *todo], summaries.gold_scores([posts[i]] * (1 + len(todo)),
                                                                         [refs[i], *(texts_of[n][i] for n in todo)])))

    # --- write
    record = {"data": cfg.data, "split": cfg.split, "posts": len(posts), "sft": sft_name,
              "reward_model": str(rm_path) if rm_path else None, "judge": cfg.judge or None, "gold": gold,
              "interval": "95% Wilson score interval; a tie counts half a win",
              "models": models, "reference": reference, "reward_model_vs_gold": record_rm, "example": example,
              "seconds": time.time() - t0}
    record = _plain(record)
    text = format_table(record)
    write_json(out / "eval.json", record)
    write_text(out / "eval.md", text)
    print(text, end="")
    print(f"wrote {out / 'eval.json'} and {out / 'eval.md'} ({time.time() - t0:.1f}s)")
    return record


def _gold_means(parts: dict[str, list[float]]) -> dict:
    return {"gold": _mean(parts["score"]), "gold_words": _mean(parts["words"]),
            "gold_missing": _mean(parts["missing"]), "gold_wrong": _mean(parts["wrong"])}


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# -----------------------------------------------------------------------------
# the markdown table: one row per figure, one column per model

JUDGES = (("reward_model", "reward model"), ("gold", "gold score"), ("judge", "judge LM"))


def format_win(w: dict | None) -> str:
    if not w or w.get("win_rate") is None:
        return ""
    lo, hi = w["ci95"]
    return f"{100 * w['win_rate']:.1f}% ({100 * lo:.1f}-{100 * hi:.1f})"


def format_table(record: dict) -> str:
    names = list(record["models"])
    cols = ["reference", *names]
    get = lambda col, key: record["reference"].get(key) if col == "reference" else record["models"][col].get(key)
    num = lambda v, d=3: "" if v is None else f"{v:.{d}f}"
    pct = lambda v: "" if v is None else f"{100 * v:.1f}%"
    rows = [("ROUGE-1 / 2 / L", lambda c: "" if c == "reference" else
             " / ".join(num(get(c, k)) for k in ("rouge1", "rouge2", "rougeL")))]
    for key, label in JUDGES:
        if any(key in record["models"][n]["win_rates"] for n in names):
            for opp in ("reference", "sft"):
                rows.append((f"win rate vs {'references' if opp == 'reference' else 'SFT'}, {label}",
                             lambda c, key=key, opp=opp: "" if c == "reference" else
                             format_win(record["models"][c]["win_rates"].get(key, {}).get(opp))))
    if record["reward_model"]:
        rows.append(("reward-model score", lambda c: num(get(c, "reward"))))
    if record["gold"]:
        rows.append(("gold score", lambda c: num(get(c, "gold"))))
        rows.append(("gold score: paired difference to SFT (standard error)", lambda c: _diff(record, c, "score")))
        rows.append(("missing details / wrong facts per summary",
                     lambda c: f"{num(get(c, 'gold_missing'), 2)} / {num(get(c, 'gold_wrong'), 2)}"))
    if any("kl_to_sft" in record["models"][n] for n in names):
        rows.append(("KL to SFT along its summaries (nats)", lambda c: num(get(c, "kl_to_sft"), 2)))
    rows += [("words per summary", lambda c: num(get(c, "words"), 1)),
             ("ended with EOS", lambda c: "" if c == "reference" else pct(get(c, "eos_rate"))),
             ("summary trigrams copied from the post", lambda c: pct(get(c, "copied_trigrams")))]
    lines = [f"# Summaries of {record['posts']:,} {record['split']} posts of {record['data']}", "",
             "| figure | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [f"| {label} | " + " | ".join(cell(c) for c in cols) + " |" for label, cell in rows]
    lines += ["", f"Win rates: {record['interval']}; a judge LM is asked in both orders, disagreeing orders "
                  f"count as a tie." + (f" Judge: {record['judge']}." if record["judge"] else "")]
    return "\n".join(lines) + "\n"


def _diff(record: dict, col: str, key: str) -> str:
    d = record["models"].get(col, {}).get("vs_sft", {}).get(key) if col != "reference" else None
    if not d or d["diff"] is None:
        return ""
    return f"{d['diff']:+.3f}" + (f" ({d['se']:.3f})" if d["se"] is not None else "")


if __name__ == "__main__":
    cli_main(main, Config)
