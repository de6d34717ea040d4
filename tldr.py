"""TL;DR posts and preference comparisons: loading, the prompt template, truncation, tokenization
and batching. Shared by sft.py, reward_model.py, ppo.py and summarize.py - one implementation of
the prompt the policy sees, the reward model scores and the CLI serves.

Sources (`--data`):
- a Hugging Face dataset name: `CarperAI/openai_summarize_tldr` (SFT: `prompt`, `label`),
  `CarperAI/openai_summarize_comparisons` (`prompt`, `chosen`, `rejected`), or any dataset in the
  raw OpenAI schemas below;
- a local folder with `{split}.jsonl` or `{split}.parquet` files in any of these schemas:
  CarperAI SFT (`prompt`, `label`), OpenAI SFT (`subreddit`, `title`, `post`, `summary`),
  CarperAI comparisons (`prompt`, `chosen`, `rejected`), OpenAI comparisons
  (`info{post,title,subreddit}`, `summaries[2]{text}`, `choice`).
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common import UserError, get_tokenizer
from model import EOS_ID, PAD_ID

TEMPLATE = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"
MAX_PROMPT_TOKENS = 512
MAX_SUMMARY_TOKENS = 53

SPLIT_ALIASES = {  # our split name → names used by the datasets we read
    "train": ("train",),
    "valid": ("valid", "validation", "valid1", "val"),
    "test": ("test", "valid2"),
}


@dataclass(frozen=True)
class Post:
    post: str
    title: str = ""
    subreddit: str = ""


@dataclass
class SFTExample:
    post: Post
    summary: str


@dataclass
class Comparison:
    post: Post
    chosen: str
    rejected: str


@dataclass
class LoadStats:
    rows: int = 0
    kept: int = 0
    skipped: dict = field(default_factory=dict)  # reason → count

    def skip(self, reason: str):
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def report(self, what: str, source: str):
        if self.skipped:
            reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items()))
            print(f"warning: {what} from {source}: skipped {sum(self.skipped.values())} of {self.rows} rows "
                  f"({reasons})", file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# prompt template and truncation

_PROMPT_RE = re.compile(r"^SUBREDDIT: r/(?P<subreddit>.*?)\s*\nTITLE: (?P<title>.*?)\s*\nPOST: (?P<post>.*?)\s*\n?TL;DR:\s*$",
                        re.DOTALL)


def parse_prompt(prompt: str) -> Post:
    """Inverse of the template, for datasets that ship rendered prompts (CarperAI)."""
    m = _PROMPT_RE.match(prompt.strip() + ("" if prompt.strip().endswith("TL;DR:") else "\nTL;DR:"))
    if not m:
        raise ValueError("prompt does not follow the SUBREDDIT/TITLE/POST/TL;DR template")
    return Post(post=m["post"].strip(), title=m["title"].strip(), subreddit=m["subreddit"].strip())


def render_prompt(post: Post, template: str = TEMPLATE) -> str:
    return template.format(subreddit=post.subreddit, title=post.title, post=post.post)


def _cut_at_boundary(text: str, max_chars: int) -> str:
    """The longest prefix of at most max_chars that ends at a line break, else at a space."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    for sep in ("\n", " "):
        cut = head.rfind(sep)
        if cut > 0:
            return head[:cut].rstrip()
    return head


def prompt_tokens(post: Post, max_prompt_tokens: int = MAX_PROMPT_TOKENS, template: str = TEMPLATE,
                  tokenizer=None) -> tuple[list[int], bool]:
    """Tokens of the rendered prompt, the post cut at a line or word boundary so that the whole
    prompt fits the budget. Returns (tokens, truncated)."""
    tok = tokenizer or get_tokenizer()
    ids = tok.encode_ordinary(render_prompt(post, template))
    if len(ids) <= max_prompt_tokens:
        return ids, False
    frame = len(tok.encode_ordinary(render_prompt(Post("", post.title, post.subreddit), template)))
    if frame >= max_prompt_tokens:
        raise UserError(f"the title and subreddit alone take {frame} tokens, over the {max_prompt_tokens}-token prompt budget")
    body = post.post
    # shrink by the token overshoot measured in characters, then step back to a boundary until it fits
    while True:
        over = len(ids) - max_prompt_tokens
        chars = max(0, len(body) - max(1, int(over * len(body) / max(1, len(ids) - frame))) - 1)
        body = _cut_at_boundary(body, chars)
        ids = tok.encode_ordinary(render_prompt(Post(body, post.title, post.subreddit), template))
        if len(ids) <= max_prompt_tokens:
            return ids, True


def summary_tokens(summary: str, max_summary_tokens: int = MAX_SUMMARY_TOKENS, tokenizer=None) -> list[int]:
    """` {summary}<|endoftext|>`, cut to the budget (a cut summary loses its EOS: it did not end)."""
    tok = tokenizer or get_tokenizer()
    ids = tok.encode_ordinary(" " + summary.strip()) + [EOS_ID]
    return ids[:max_summary_tokens]


def strip_summary_prefix(text: str) -> str:
    """CarperAI comparisons store summaries as 'TL;DR: ...'."""
    text = text.strip()
    return text[len("TL;DR:"):].strip() if text.startswith("TL;DR:") else text


# -----------------------------------------------------------------------------
# loading

def _read_rows(data: str, split: str) -> tuple[list[dict], str]:
    """Rows of one split from a local folder or a Hugging Face dataset; (rows, source description)."""
    names = SPLIT_ALIASES.get(split, (split,))
    path = Path(data)
    if path.exists():
        if path.is_file():
            files = [path]
        else:
            files = [path / f"{n}.{ext}" for n in names for ext in ("jsonl", "json", "parquet")]
            files = [f for f in files if f.is_file()][:1]
            if not files:
                raise UserError(f"no {split} split in {path} (looked for {', '.join(n + '.jsonl/.parquet' for n in names)})")
        return _load_local(files[0]), str(files[0])
    if "/" not in data:
        raise UserError(f"data not found: {data} (neither a local path nor a Hugging Face dataset name)")
    return _load_hub(data, names), f"{data}[{split}]"


def _load_local(path: Path) -> list[dict]:
    import datasets
    kind = "parquet" if path.suffix == ".parquet" else "json"
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # datasets raises many types for unreadable files
        raise UserError(f"cannot read {path}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
    return list(ds)


def _load_hub(name: str, split_names: tuple[str, ...]) -> list[dict]:
    import datasets
    try:
        available = datasets.get_dataset_split_names(name)
    except Exception as e:
        raise UserError(f"cannot load dataset {name} (offline? pass --data with local files): "
                        f"{str(e).splitlines()[0][:160] if str(e) else type(e).__name__}") from None
    split = next((s for s in split_names if s in available), None)
    if split is None:
        raise UserError(f"dataset {name} has splits {available}, none of {list(split_names)}")
    return list(datasets.load_dataset(name, split=split))


def _post_from_row(row: dict) -> Post:
    if "prompt" in row:
        return parse_prompt(row["prompt"])
    info = row.get("info", row)
    return Post(post=(info.get("post") or "").strip(), title=(info.get("title") or "").strip(),
                subreddit=(info.get("subreddit") or "").strip())


def load_sft(data: str, split: str) -> list[SFTExample]:
    """Posts with reference summaries; bad rows are counted, reported on stderr and skipped."""
    rows, source = _read_rows(data, split)
    stats, out = LoadStats(rows=len(rows)), []
    if rows and not ({"prompt", "label"} <= rows[0].keys() or {"post", "summary"} <= rows[0].keys()):
        raise UserError(f"{source}: unknown SFT schema with fields {sorted(rows[0])}; expected "
                        f"prompt/label (CarperAI) or subreddit/title/post/summary (OpenAI)")
    for row in rows:
        try:
            post = _post_from_row(row)
        except (ValueError, TypeError, AttributeError):
            stats.skip("malformed prompt")
            continue
        summary = row.get("label", row.get("summary"))
        if not post.post:
            stats.skip("empty post")
        elif not isinstance(summary, str) or not summary.strip():
            stats.skip("empty summary")
        else:
            out.append(SFTExample(post, summary.strip()))
    stats.kept = len(out)
    stats.report("SFT rows", source)
    if not out:
        raise UserError(f"no usable SFT rows in {source}")
    return out


def load_comparisons(data: str, split: str) -> list[Comparison]:
    """Preference pairs; identical or empty summaries and bad rows are counted and dropped."""
    rows, source = _read_rows(data, split)
    stats, out = LoadStats(rows=len(rows)), []
    if rows and not ({"prompt", "chosen", "rejected"} <= rows[0].keys() or {"info", "summaries", "choice"} <= rows[0].keys()):
        raise UserError(f"{source}: unknown comparisons schema with fields {sorted(rows[0])}; expected "
                        f"prompt/chosen/rejected (CarperAI) or info/summaries/choice (OpenAI)")
    for row in rows:
        try:
            post = _post_from_row(row)
            if "chosen" in row:
                chosen, rejected = strip_summary_prefix(row["chosen"]), strip_summary_prefix(row["rejected"])
            else:
                choice = int(row["choice"])
                texts = [s["text"] for s in row["summaries"]]
                if len(texts) != 2 or choice not in (0, 1):
                    raise ValueError("need two summaries and choice 0 or 1")
                chosen, rejected = texts[choice].strip(), texts[1 - choice].strip()
        except (ValueError, TypeError, KeyError, AttributeError):
            stats.skip("malformed row")
            continue
        if not post.post:
            stats.skip("empty post")
        elif not chosen or not rejected:
            stats.skip("empty summary")
        elif chosen == rejected:
            stats.skip("identical summaries")
        else:
            out.append(Comparison(post, chosen, rejected))
    stats.kept = len(out)
    stats.report("comparisons", source)
    if not out:
        raise UserError(f"no usable comparisons in {source}")
    return out


# -----------------------------------------------------------------------------
# batching

def left_pad(seqs: list[list[int]], pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) tokens and 0/1 mask, padding on the left: the layout generation needs."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            idx[i, T - len(s):] = torch.tensor(s)
            mask[i, T - len(s):] = 1
    return idx, mask


def right_pad(seqs: list[list[int]], pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) tokens and 0/1 mask, padding on the right: the layout training uses."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return idx, mask


def sft_batch(pairs: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt, summary) token pairs → right-padded idx, next-token targets that are -1 everywhere
    but on the summary tokens (its EOS included), and the attention mask."""
    seqs = [p + s for p, s in pairs]
    idx, mask = right_pad(seqs)
    targets = torch.full_like(idx, -1)
    for i, (p, s) in enumerate(pairs):
        # position t predicts token t+1: the summary tokens are predicted from len(p)-1 on
        targets[i, len(p) - 1: len(p) - 1 + len(s)] = torch.tensor(s)
    return idx, targets, mask


def encode_sft(examples: list[SFTExample], max_prompt_tokens: int = MAX_PROMPT_TOKENS,
               max_summary_tokens: int = MAX_SUMMARY_TOKENS, template: str = TEMPLATE) -> list[tuple[list[int], list[int]]]:
    return [(prompt_tokens(e.post, max_prompt_tokens, template)[0], summary_tokens(e.summary, max_summary_tokens))
            for e in examples]


def template_info(template: str = TEMPLATE, max_prompt_tokens: int = MAX_PROMPT_TOKENS,
                  max_summary_tokens: int = MAX_SUMMARY_TOKENS) -> dict:
    """What a checkpoint keeps so that later stages and summarize.py build the same prompts."""
    return {"template": template, "max_prompt_tokens": max_prompt_tokens, "max_summary_tokens": max_summary_tokens}
