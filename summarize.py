"""Summarize a Reddit-style post with the trained summarizer: the PPO policy (`checkpoints/ppo_latest.pt`),
or the SFT model (`checkpoints/best_sft.pt`) when there is no PPO checkpoint yet.

    python summarize.py "My roommate keeps eating my food ..."          # the post as an argument
    cat post.txt | python summarize.py                                  # or on stdin (also: `-`)
    python summarize.py --title "Roommate problems" --subreddit roommates - < post.txt
    python summarize.py --temperature 0.7 --top-p 0.9 --num-samples 3 --seed 1 "..."   # sample instead of greedy
    python summarize.py --ckpt best_sft.pt "..."                        # the SFT model, to compare

The prompt is built with the checkpoint's own template and budgets (what training used); a post longer
than the prompt budget is cut at a line or word boundary, as in training, with a note on stderr.
Summaries go to stdout, one per line; notes and errors go to stderr.
"""
from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass

import torch

import summaries
import tldr
from common import UserError, cli_main, compute_init, die
from summaries import DEFAULT_CKPT, Summarizer, find_summarizer_path, sampling_problem, summarizer_dir


@dataclass
class Config:
    post: str = "-"                       # the post text (also the first argument); - reads it from stdin
    title: str = ""                       # the post's title
    subreddit: str = ""                   # the subreddit, with or without r/
    ckpt: str = DEFAULT_CKPT              # summarizer checkpoint (ppo or sft); the default falls back to best_sft.pt
    ckpt_dir: str = "checkpoints"         # where bare checkpoint names resolve
    temperature: float = 0.0              # 0: greedy (deterministic); > 0 samples
    top_k: int = 0                        # sample among the k likeliest tokens only (0: off)
    top_p: float = 1.0                    # sample from the smallest set of tokens with this much probability (1: off)
    num_samples: int = 1                  # summaries to print (more than one needs --temperature > 0)
    seed: int = 1337                      # seeds sampling
    max_new_tokens: int = 0               # most summary tokens (0: the checkpoint's summary budget)
    device: str = "auto"                  # auto | cuda | cpu | mps
    dtype: str = "auto"                   # auto (bf16 on Ampere+, fp16 on older GPUs, fp32 on CPU) | float32 | bfloat16 | float16


def split_positional(argv: list[str], cls=Config) -> list[str]:
    """Turn the one positional argument (the post, or -) into `--post=...`, so that the dataclass parser
    sees only flags. A flag of a non-boolean field consumes the next word, as argparse does; after `--`
    every word is positional."""
    hints = typing.get_type_hints(cls)
    takes_value = {"--" + f.name.replace("_", "-"): hints[f.name] is not bool for f in dataclasses.fields(cls)}
    takes_value.update({"--no-" + f.name.replace("_", "-"): False for f in dataclasses.fields(cls) if hints[f.name] is bool})
    out, positional, i = [], [], 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            positional += argv[i + 1:]
            break
        if word.startswith("--"):
            name = word.split("=", 1)[0]
            if name not in takes_value and name != "--help":
                raise UserError(f"unknown flag {name}; python summarize.py --help lists them")
            consumes = "=" not in word and takes_value.get(name, False)
            out += argv[i:i + 1 + consumes]
            i += 1 + consumes
        elif word.startswith("-") and word != "-":  # -h and the like: argparse's business
            out.append(word)
            i += 1
        else:
            positional.append(word)
            i += 1
    if len(positional) > 1:
        raise UserError(f"give the post as one argument (quote it), not {len(positional)} words; or pipe it on stdin")
    return out + [f"--post={positional[0]}"] if positional else out


def read_post(text: str) -> str:
    """The post from the argument, or from stdin for `-`: UTF-8, not empty."""
    if text == "-":
        if sys.stdin is None:
            raise UserError("no post given and no stdin to read it from")
        if sys.stdin.isatty():
            print("reading the post from stdin (end with Ctrl-D)...", file=sys.stderr, flush=True)
        data = sys.stdin.buffer.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"the post on stdin is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                            f"convert it, e.g. with iconv -t utf-8") from None
    else:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes of the command line arrive as lone surrogates
            raise UserError("the post argument is not UTF-8 text; convert it, e.g. with iconv -t utf-8") from None
    text = text.replace("\r\n", "\n").strip()
    if not text:
        raise UserError("the post is empty: give its text as the argument or on stdin")
    return text


def check_config(cfg: Config):
    problem = sampling_problem(cfg.temperature, cfg.top_k, cfg.top_p)
    if problem:
        field, why = problem
        raise UserError(f"--{field.replace('_', '-')}: {why}")
    if cfg.num_samples < 1 or cfg.max_new_tokens < 0:
        raise UserError(f"--num-samples must be >= 1 and --max-new-tokens >= 0, got {cfg.num_samples} and {cfg.max_new_tokens}")
    if cfg.num_samples > 1 and cfg.temperature == 0:
        raise UserError("--num-samples > 1 needs --temperature > 0 (greedy decoding gives one summary)")


def main(cfg: Config) -> list[str]:
    # --- config
    check_config(cfg)
    text = read_post(cfg.post)
    post = tldr.Post(text, cfg.title.strip(), cfg.subreddit.strip().removeprefix("r/"))

    # --- model: the checkpoint's weights and the prompt template it was trained with
    note = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    ckpt_dir = summarizer_dir(cfg.ckpt_dir, note) if cfg.ckpt == DEFAULT_CKPT else cfg.ckpt_dir
    path = find_summarizer_path(cfg.ckpt, ckpt_dir, note)
    rt = compute_init(cfg.seed, cfg.device, cfg.dtype)
    summarizer = Summarizer.load(path, rt.device)
    info = summarizer.info
    max_new = cfg.max_new_tokens or summarizer.budget

    # --- prompt: truncated exactly as generate_summaries will, to say so
    ids, truncated = summarizer.prompt(post, max_new)
    if truncated:
        full = len(tldr.prompt_tokens(post, 10 ** 9, info["template"])[0])
        budget = summaries.prompt_budget(summarizer.model.config.block_size, max_new, info["max_prompt_tokens"])
        print(f"note: the prompt is {full} tokens, over the model's {budget}-token budget; the post was cut to fit "
              f"({len(ids)} tokens), as in training", file=sys.stderr, flush=True)

    # --- generate
    generator = torch.Generator(device=rt.device).manual_seed(cfg.seed) if cfg.temperature > 0 else None
    texts, _ = summarizer.summarize([post] * cfg.num_samples, rt, batch_size=cfg.num_samples, max_new_tokens=max_new,
                                    temperature=cfg.temperature, top_k=cfg.top_k or None,
                                    top_p=cfg.top_p if cfg.top_p < 1 else None, generator=generator)
    for text in texts:
        print(text, flush=True)
    return texts


def cli(argv: list[str] | None = None):
    """The command line: the post as the one positional argument, then flags as every stage parses them."""
    try:
        args = split_positional(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        die(str(e))
    return cli_main(main, Config, None, argv=args)


if __name__ == "__main__":
    cli()
