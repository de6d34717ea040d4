"""TL;DR posts and preference comparisons: loading, the prompt template, truncation, tokenization and
training batches. Shared by every stage that reads posts - one implementation of the prompt the policy
sees, the reward model scores and the server serves (generation and the measures of summaries live in
summaries.py).

Sources (`--data`):
- a Hugging Face dataset name: `CarperAI/openai_summarize_tldr` (SFT: `prompt`, `label`),
  `CarperAI/openai_summarize_comparisons` (`prompt`, `chosen`, `rejected`), or any dataset in the
  raw OpenAI schemas below;
- a local folder with `{split}.jsonl` or `{split}.parquet` files (or one such file) in any of these
  schemas: CarperAI SFT (`prompt`, `label`), OpenAI SFT (`subreddit`, `title`, `post`, `summary`),
  CarperAI comparisons (`prompt`, `chosen`, `rejected`), OpenAI comparisons
  (`info{post,title,subreddit}`, `summaries[2]{text}`, `choice`).

Bad rows (unreadable line, missing field, empty post or summary) are counted, reported in one
warning line on stderr and skipped; a split with no usable row is a UserError.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common import UserError, first_line, get_tokenizer, jsonl_rows
from model import EOS_ID, right_pad

TEMPLATE = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"
MAX_PROMPT_TOKENS = 512
MAX_SUMMARY_TOKENS = 53

SPLIT_ALIASES = {  # our split name → names used by the datasets we read
    "train": ("train",),
    "valid": ("valid", "validation", "valid1", "val"),
    "test": ("test", "valid2"),
}
SFT_SCHEMAS = ({"prompt", "label"}, {"post", "summary"})
COMPARISON_SCHEMAS = ({"prompt", "chosen", "rejected"}, {"info", "summaries", "choice"})


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
    """A prefix of at most max_chars ending at a line break (when that keeps at least half of what
    fits), else at a space; a single word longer than that is cut inside."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars + 1]  # a boundary right after the last kept char counts too
    line = head.rfind("\n")
    if line >= max_chars // 2:
        return head[:line].rstrip()
    space = max(head.rfind(" "), line)
    if space > 0:
        return head[:space].rstrip()
    return text[:max_chars]


def prompt_tokens(post: Post, max_prompt_tokens: int = MAX_PROMPT_TOKENS, template: str = TEMPLATE,
                  tokenizer=None) -> tuple[list[int], bool]:
    """Tokens of the rendered prompt, the post cut at a line or word boundary so that the whole
    prompt fits the budget (a title longer than half the room the template leaves is cut too). Returns (tokens, truncated).
    This is the one function that turns a post into what the model sees, in every stage."""
    tok = tokenizer or get_tokenizer()
    ids = tok.encode_ordinary(render_prompt(post, template))
    if len(ids) <= max_prompt_tokens:
        return ids, False
    frame = len(tok.encode_ordinary(render_prompt(Post("", post.title, post.subreddit), template)))
    bare = len(tok.encode_ordinary(render_prompt(Post("", "", post.subreddit), template)))
    if bare >= max_prompt_tokens:
        raise UserError(f"the prompt template and subreddit alone take {bare} tokens, over the "
                        f"{max_prompt_tokens}-token prompt budget")
    title_budget = bare + (max_prompt_tokens - bare) // 2
    if frame > title_budget:  # a runaway title: it gets at most half of the room the template leaves
        title = _shrink_to_fit(post.title, lambda t: len(tok.encode_ordinary(
            render_prompt(Post("", t, post.subreddit), template))), title_budget)
        post = Post(post.post, title, post.subreddit)
    body = _shrink_to_fit(post.post, lambda b: len(tok.encode_ordinary(render_prompt(Post(b, post.title, post.subreddit),
                                                                                   template))), max_prompt_tokens)
    return tok.encode_ordinary(render_prompt(Post(body, post.title, post.subreddit), template)), True


def _shrink_to_fit(text: str, count, budget: int) -> str:
    """A boundary-cut prefix of text with count(prefix) <= budget (count: tokens of the rendered prompt).
    Each round cuts about the measured overshoot, so a long post takes a few tokenizer calls, not one per word."""
    n = count(text)
    while n > budget and text:
        over = n - budget
        # characters per token of this text, with one char of slack so every round shrinks
        chars = max(0, len(text) - max(1, int(over * len(text) / max(1, n - count("")))) - 1)
        text = _cut_at_boundary(text, chars)
        n = count(text)
    return text


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

def _read_rows(data: str, split: str) -> tuple[list[dict | None], str]:
    """Rows of one split from a local folder or file, or a Hugging Face dataset; (rows, source)."""
    names = SPLIT_ALIASES.get(split, (split,))
    path = Path(data).expanduser()
    if path.exists():
        if path.is_file():
            files = [path]
        else:
            files = [path / f"{n}.{ext}" for n in names for ext in ("jsonl", "json", "parquet")]
            files = [f for f in files if f.is_file()][:1]
            if not files:
                raise UserError(f"no {split} split in {path} (looked for {', '.join(n + '.jsonl/.parquet' for n in names)})")
        return _load_local(files[0]), str(files[0])
    # a hub name is exactly owner/name; anything else that does not exist is a missing local path
    if data.count("/") != 1 or data.startswith((".", "/", "~")) or Path(data.split("/")[0]).is_dir():
        raise UserError(f"data not found: {data} (neither a local path nor a Hugging Face dataset name)")
    return _load_hub(data, names), f"{data}[{split}]"


def _load_local(path: Path) -> list[dict | None]:
    """Rows of a local .jsonl/.json/.parquet file. An unreadable JSON line becomes None, which the
    loaders count and skip instead of failing the whole file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise UserError(f"cannot read {path}: {first_line(e)}") from None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {first_line(e)}") from None
    if text.lstrip().startswith("["):  # a .json file holding one list of rows
        try:
            rows = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise UserError(f"cannot read {path}: {first_line(e)}") from None
        return [r if isinstance(r, dict) else None for r in rows]
    return jsonl_rows(text)


def _load_hub(name: str, split_names: tuple[str, ...]) -> list[dict]:
    import datasets
    try:
        available = datasets.get_dataset_split_names(name)
    except Exception as e:  # offline, unknown name, gated: datasets raises many types
        raise UserError(f"cannot load dataset {name} (offline? pass --data with local files): {first_line(e)}") from None
    split = next((s for s in split_names if s in available), None)
    if split is None:
        raise UserError(f"dataset {name} has splits {available}, none of {list(split_names)}")
    return list(datasets.load_dataset(name, split=split))


def _schema(rows: list[dict | None], schemas: tuple[set, ...], what: str, source: str, expected: str) -> set:
    """The first schema that a row of the split has all fields of (rows missing some are skipped later)."""
    seen = set()
    for row in rows[:1000]:
        if row is None:
            continue
        seen |= row.keys()
        for schema in schemas:
            if schema <= row.keys():
                return schema
    raise UserError(f"{source}: unknown {what} schema with fields {sorted(seen)}; expected {expected}")


def _post_from_row(row: dict) -> Post:
    if "prompt" in row:
        if not isinstance(row["prompt"], str):
            raise ValueError("prompt is not a string")
        return parse_prompt(row["prompt"])
    info = row.get("info", row)
    return Post(post=(info.get("post") or "").strip(), title=(info.get("title") or "").strip(),
                subreddit=(info.get("subreddit") or "").strip())


class _Skip(Exception):
    """A row that is left out, with the reason it is counted under."""


def _load_split(data: str, split: str, schemas: tuple[set, ...], what: str, expected: str, label: str,
                convert) -> list:
    """The rows of one split as `convert(row, schema)` makes them; a row it refuses (_Skip), an unreadable
    line and a row missing a field are counted by reason, reported in one line on stderr and skipped."""
    rows, source = _read_rows(data, split)
    stats, out = LoadStats(rows=len(rows)), []
    schema = _schema(rows, schemas, what, source, expected)
    for row in rows:
        try:
            if row is None:
                raise _Skip("unreadable line")
            if not schema <= row.keys():
                raise _Skip("missing field")
            out.append(convert(row, schema))
        except _Skip as skip:
            stats.skip(str(skip))
    stats.kept = len(out)
    stats.report(label, source)
    if not out:
        raise UserError(f"no usable {label} in {source}")
    return out


def _sft_example(row: dict, schema: set) -> SFTExample:
    try:
        post = _post_from_row(row)
    except (ValueError, TypeError, AttributeError, RecursionError):
        raise _Skip("malformed prompt") from None
    summary = row.get("label", row.get("summary"))
    if not post.post:
        raise _Skip("empty post")
    if not isinstance(summary, str) or not summary.strip():
        raise _Skip("empty summary")
    return SFTExample(post, summary.strip())


def _comparison(row: dict, schema: set) -> Comparison:
    try:
        post = _post_from_row(row)
        if "chosen" in schema:
            chosen, rejected = strip_summary_prefix(row["chosen"]), strip_summary_prefix(row["rejected"])
        else:
            choice = int(row["choice"])
            texts = [s["text"] for s in row["summaries"]]
            if len(texts) != 2 or choice not in (0, 1):
                raise ValueError("need two summaries and choice 0 or 1")
            chosen, rejected = texts[choice].strip(), texts[1 - choice].strip()
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        raise _Skip("malformed row") from None
    if not post.post:
        raise _Skip("empty post")
    if not chosen or not rejected:
        raise _Skip("empty summary")
    if chosen == rejected:
        raise _Skip("identical summaries")
    return Comparison(post, chosen, rejected)


def load_sft(data: str, split: str) -> list[SFTExample]:
    """Posts with reference summaries; bad rows are counted, reported on stderr and skipped."""
    return _load_split(data, split, SFT_SCHEMAS, "SFT", "prompt/label (CarperAI) or subreddit/title/post/summary (OpenAI)",
                       "SFT rows", _sft_example)


def load_comparisons(data: str, split: str) -> list[Comparison]:
    """Preference pairs; identical or empty summaries and bad rows are counted and dropped."""
    return _load_split(data, split, COMPARISON_SCHEMAS, "comparisons",
                       "prompt/chosen/rejected (CarperAI) or info/summaries/choice (OpenAI)", "comparisons", _comparison)


class EpochSampler:
    """A resumable stream of example indices: every epoch is a fresh permutation drawn from (seed, epoch),
    and each call takes the next `batch_size * world_size` of the stream, of which rank r gets the r-th
    slice, so ranks never see the same examples. (epoch, pos) is the whole position; a batch that
    crosses an epoch end continues into the next permutation."""

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if n <= 0:
            raise UserError("no examples to sample from")
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.epoch, self.pos = 0, 0
        self.order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def next_indices(self, batch_size: int) -> list[int]:
        stream = []
        while len(stream) < batch_size * self.world_size:
            take = min(batch_size * self.world_size - len(stream), self.n - self.pos)
            stream.extend(self.order[self.pos:self.pos + take].tolist())
            self.pos += take
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self.order = self._permutation(self.epoch)
        return stream[self.rank * batch_size:(self.rank + 1) * batch_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict):
        if state["n"] != self.n:
            raise UserError(f"the checkpoint's data position is over {state['n']} examples but the data has "
                            f"{self.n} now; resume with the same --data")
        self.seed, self.epoch, self.pos = state.get("seed", self.seed), state["epoch"], state["pos"]
        self.order = self._permutation(self.epoch)


# -----------------------------------------------------------------------------
# batching

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
               max_summary_tokens: int = MAX_SUMMARY_TOKENS, template: str = TEMPLATE,
               progress: bool = False) -> list[tuple[list[int], list[int]]]:
    """(prompt tokens, summary tokens) of each example, in order."""
    from tqdm import tqdm
    tok = get_tokenizer()
    return [(prompt_tokens(e.post, max_prompt_tokens, template, tok)[0], summary_tokens(e.summary, max_summary_tokens, tok))
            for e in tqdm(examples, desc="tokenizing", unit="ex", leave=False, disable=not progress)]


Triple = tuple[list[int], list[int], list[int]]  # prompt, chosen summary, rejected summary (tokens)


def encode_comparisons(comparisons: list[Comparison], info: dict) -> list[Triple]:
    """Tokens of preference pairs through the template and truncation in `info` (template_info): the prompt
    the policy sees, each summary as ` {summary}<|endoftext|>` (what reward_model.py scores and dpo.py trains on)."""
    tok = get_tokenizer()
    cache: dict[Post, list[int]] = {}  # a post is usually compared many times
    out = []
    for c in comparisons:
        if c.post not in cache:
            cache[c.post] = prompt_tokens(c.post, info["max_prompt_tokens"], info["template"], tok)[0]
        out.append((cache[c.post], summary_tokens(c.chosen, info["max_summary_tokens"], tok),
                    summary_tokens(c.rejected, info["max_summary_tokens"], tok)))
    return out


def template_info(template: str = TEMPLATE, max_prompt_tokens: int = MAX_PROMPT_TOKENS,
                  max_summary_tokens: int = MAX_SUMMARY_TOKENS) -> dict:
    """What a checkpoint keeps so that later stages and summarize.py build the same prompts."""
    return {"template": template, "max_prompt_tokens": max_prompt_tokens, "max_summary_tokens": max_summary_tokens}
