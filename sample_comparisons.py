"""Preference comparisons of a policy's own summaries, labelled by the generated world's rater.

OpenAI's raters compared summaries sampled from the policies being trained (Stiennon et al. 2020,
"Learning to summarize from human feedback", sec. 3.1, step 1), so their reward model learned to order
what the policy writes. synthetic.py's comparisons pair variants of a post's reference summary
(another wording, a detail dropped or changed, filler, a copied sentence, a cut ending); a reward model
that orders those well need not order an SFT model's samples, whose errors are others (several wrong
details at once, broken sentences). This script samples `--samples-per-post` summaries of each post from
`--policy` at PPO's rollout temperature and lets the world's rater (synthetic.rate_pair: the higher gold
score wins by a clear margin, each label flipped with probability `--label-noise`) label pairs of them.
It writes `{train,valid}.jsonl` in CarperAI's comparison schema, which reward_model.py reads with `--data`.

The rater is the generated world's gold score, so this works on posts written by synthetic.py only: on
real Reddit posts the comparisons come from people (CarperAI/openai_summarize_comparisons).

    python synthetic.py --out data/synthetic
    python sample_comparisons.py --policy best_sft.pt --data data/synthetic/tldr --out data/synthetic/comparisons_sft
    python reward_model.py --preset small --init best_sft.pt --data data/synthetic/comparisons_sft \\
        --sft-data data/synthetic/tldr
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import synthetic
import tldr
from common import UserError, check_flags, cli_main, compute_init, write_text
from summaries import Summarizer

SPLITS = ("train", "valid")


@dataclass
class Config:
    policy: str = "best_sft.pt"                    # SFT or PPO checkpoint whose samples are compared
    data: str = "data/synthetic/tldr"              # posts of the generated world (synthetic.py's tldr folder)
    out: str = "data/synthetic/comparisons_sft"    # writes train.jsonl, valid.jsonl and manifest.json here
    ckpt_dir: str = "checkpoints"                  # where a bare --policy name resolves
    train_posts: int = 0                           # posts of the train split to sample (0: all)
    valid_posts: int = 0                           # posts of the valid split to sample (0: all)
    samples_per_post: int = 4                      # summaries sampled per post
    pairs_per_post: int = 2                        # labelled pairs kept per post, at most
    temperature: float = 0.7                       # PPO's rollout temperature: pairs of what PPO will sample
    label_noise: float = 0.1                       # share of labels flipped, like noisy human raters
    batch_size: int = 64                           # posts generated at once
    seed: int = 0                                  # same seed, policy and data -> the same pairs
    device: str = "auto"                           # auto | cpu | cuda | mps
    dtype: str = "auto"                            # auto | float32 | bfloat16 | float16 (autocast)


def check_config(cfg: Config):
    check_flags(cfg, positive=("samples_per_post", "pairs_per_post", "batch_size", "temperature"),
                non_negative=("train_posts", "valid_posts"))
    if cfg.samples_per_post < 2:
        raise UserError(f"--samples-per-post must be at least 2 to make a pair, got {cfg.samples_per_post}")
    if not 0 <= cfg.label_noise <= 1:
        raise UserError(f"--label-noise must be in [0, 1], got {cfg.label_noise}")


def sample_split(summarizer: Summarizer, posts: list[tldr.Post], cfg: Config, rt, split: str) -> list[list[str]]:
    """cfg.samples_per_post summaries of each post (a list per post), drawn from a generator seeded by
    (seed, split) so that each split's samples do not depend on how many posts the other one has."""
    generator = torch.Generator(device=rt.device).manual_seed(cfg.seed * len(SPLITS) + SPLITS.index(split))
    rounds = [summarizer.summarize(posts, rt, cfg.batch_size, temperature=cfg.temperature, generator=generator)[0]
              for _ in range(cfg.samples_per_post)]
    return [list(s) for s in zip(*rounds)]


def comparison_rows(posts: list[tldr.Post], samples: list[list[str]], cfg: Config, split: str) -> tuple[list[dict], dict]:
    """The labelled pairs as CarperAI rows (prompt without the TL;DR line, "TL;DR: " + summary), and counts."""
    rng = random.Random(f"{cfg.seed}:sampled-comparisons:{split}")
    rows, flipped, gold = [], 0, []
    for post, texts in zip(posts, samples):
        prompt = tldr.render_prompt(post)
        gold += [synthetic.gold_score(prompt, t) for t in texts]
        for chosen, rejected, flip in synthetic.rate_samples(prompt, texts, rng, cfg.label_noise, cfg.pairs_per_post):
            rows.append({"prompt": synthetic.comparison_prompt(post.subreddit, post.title, post.post),
                         "chosen": f"TL;DR: {chosen}", "rejected": f"TL;DR: {rejected}"})
            flipped += flip
    stats = {"posts": len(posts), "samples": len(gold), "pairs": len(rows), "flipped": flipped,
             "mean_gold": sum(gold) / len(gold) if gold else None,
             "zero_gold_share": sum(g == 0 for g in gold) / len(gold) if gold else None}
    return rows, stats


def main(cfg: Config) -> dict:
    # --- config, policy
    check_config(cfg)
    rt = compute_init(cfg.seed, cfg.device, cfg.dtype)
    summarizer = Summarizer.load(cfg.policy, rt.device, ("sft", "ppo"), cfg.ckpt_dir)
    limits = {"train": cfg.train_posts, "valid": cfg.valid_posts}

    # --- sample each split's posts, label pairs of the samples
    manifest = {"config": asdict(cfg), "splits": {}}  # config.policy names the sampled checkpoint
    rows_by_split = {}
    for split in SPLITS:
        posts = [e.post for e in tldr.load_sft(cfg.data, split)]
        posts = posts[:limits[split]] if limits[split] else posts
        samples = sample_split(summarizer, posts, cfg, rt, split)
        rows, stats = comparison_rows(posts, samples, cfg, split)
        if not rows:
            raise UserError(f"no pair of {split} samples has a clear winner by the gold score ({stats['samples']} "
                            f"samples of {len(posts)} posts): the rater needs posts written by synthetic.py, and a "
                            f"policy whose samples differ")
        rows_by_split[split], manifest["splits"][split] = rows, stats
        print(f"{split}: {stats['pairs']} pairs ({stats['flipped']} labels flipped) from {stats['samples']} samples of "
              f"{len(posts)} posts; mean gold of the samples {stats['mean_gold']:.3f}", flush=True)

    # --- write: every file only once all splits have pairs
    out = Path(cfg.out)
    for split, rows in rows_by_split.items():
        synthetic.write_jsonl(out / f"{split}.jsonl", rows)
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    write_text(out / "manifest.json", text)
    return manifest


if __name__ == "__main__":
    cli_main(main, Config)
