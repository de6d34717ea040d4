"""HellaSwag: download the rowanz/hellaswag files and evaluate a language model on them, scored the two
ways people quote, so that our numbers compare with both references:

- `completion` (build-nanogpt): context tokens + " " + ending tokens; acc picks the ending with the
  largest summed log-likelihood, acc_norm the largest mean log-likelihood per ending token.
  GPT-2 124M, 10,042 val rows: acc 0.2859, acc_norm 0.2955.
- `harness` (EleutherAI lm-evaluation-harness): `activity_label: ctx_a + " " + ctx_b.capitalize()`
  with WikiHow's bracketed tags cleaned up, the same clean-up on the endings; acc by summed
  log-likelihood, acc_norm by log-likelihood divided by the ending's length in characters.
  GPT-2 124M: acc 0.2892, acc_norm 0.3114.

Each is also broken down by `split_type` (in-domain vs zero-shot activities).

    python hellaswag.py --ckpt pretrain.pt                      # one GPU (or CPU): checkpoints/pretrain.pt
    python hellaswag.py --hf gpt2                               # OpenAI's GPT-2 124M (needs the HF hub once)
    torchrun --standalone --nproc_per_node=2 hellaswag.py --ckpt pretrain.pt   # two T4s (fp16 autocast)
    torchrun --standalone --nproc_per_node=8 hellaswag.py --ckpt pretrain.pt --batch-size 64
    python hellaswag.py --preset tiny --ckpt pretrain.pt        # CPU: the first 200 val rows

The split is downloaded into `--data-dir` (default data/hellaswag/) on first use. The result table is
printed and written as JSON next to the checkpoint (`checkpoints/pretrain_hellaswag_val.json`) or to
`--out`. `evaluate()` is what pretrain.py calls during training.
"""
from __future__ import annotations

import contextlib
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from checkpoints import LM_STAGES, load_lm, resolve_ckpt
from common import (UserError, all_reduce_sum, atomic_write, cli_main, compute_init, get_tokenizer, json_line, print0,
                    unwrap, write_json)
from model import GPT, PAD_ID

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
SPLITS = ("train", "val", "test")  # test has no labels: it can be downloaded but not scored
STYLES = ("completion", "harness")
SPLIT_TYPES = ("indomain", "zeroshot")
UNKNOWN_SPLIT_TYPE = "unknown"  # rows of copies that dropped the field: counted in the overall accuracy only
STRING_FIELDS = ("activity_label", "ctx_a", "ctx_b", "ctx", "split_type")


@dataclass
class Config:
    preset: str | None = None        # tiny | small | gpt2: batch size and row limit for that model size
    ckpt: str = ""                   # LM checkpoint to evaluate (a bare name lives in --ckpt-dir), e.g. pretrain.pt
    hf: str = ""                     # instead of --ckpt: OpenAI GPT-2 by hub name (gpt2, gpt2-medium, ...) or a local HF directory
    ckpt_dir: str = "checkpoints"    # where bare checkpoint names resolve
    split: str = "val"               # val (10,042 rows) or train (39,905); test has no labels
    data_dir: str = "data/hellaswag"  # holds hellaswag_{split}.jsonl; a missing split is downloaded here
    limit: int = 0                   # evaluate the first N rows only (0: all)
    style: str = "both"              # completion (build-nanogpt) | harness (lm-evaluation-harness) | both
    batch_size: int = 16             # examples per forward; each brings its 4 endings
    out: str = ""                    # result JSON path; empty: next to the checkpoint
    device: str = "auto"             # auto | cuda | cpu | mps
    dtype: str = "auto"              # auto (bf16 on Ampere+, fp16 on older GPUs, fp32 on CPU) | float32 | bfloat16 | float16


PRESETS = {
    "tiny": {"batch_size": 8, "limit": 200},
    "small": {"batch_size": 16},
    "gpt2": {"batch_size": 32},
}


# -----------------------------------------------------------------------------
# data: download, load, validate

def hellaswag_path(split: str, data_dir: str | os.PathLike = "data/hellaswag") -> Path:
    if split not in SPLITS:
        raise UserError(f"unknown HellaSwag split {split!r}; choose from {', '.join(SPLITS)}")
    return Path(data_dir) / f"hellaswag_{split}.jsonl"


def download(url: str, dest: str | os.PathLike, timeout: float = 30.0) -> Path:
    """Fetch url into dest with a progress bar; the file appears whole or not at all."""
    from tqdm import tqdm
    dest = Path(dest)

    def write(f):
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))

    atomic_write(dest, write)
    return dest


def ensure_hellaswag(split: str, data_dir: str | os.PathLike = "data/hellaswag", url: str = URL) -> Path:
    """The split's jsonl, downloaded on first use and reused after."""
    path = hellaswag_path(split, data_dir)
    if path.is_file():
        return path
    src = url.format(split=split)
    try:
        return download(src, path)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(f"HellaSwag {split} split not found at {path} and cannot be downloaded ({reason}); "
                        f"fetch {src} and put it at {path}") from None


def load_rows(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """Validated rows of a HellaSwag jsonl file (label as int). A malformed row is a UserError naming its line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"HellaSwag file not found: {path}")
    rows = []
    with open(path, "rb") as f:  # decoded line by line, so that a bad byte is reported with its line
        for lineno, raw in enumerate(f, 1):
            if limit and len(rows) >= limit:
                break
            where = f"{path}, line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{where}: not UTF-8 text; download the split again") from None
            if line.strip():
                rows.append(validate_row(json_line(line, where), where))
    if not rows:
        raise UserError(f"{path} holds no HellaSwag rows")
    return rows


def validate_row(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    split_types = SPLIT_TYPES
    if "context" in row and "ctx" not in row:
        row, split_types = context_schema_row(row, where), (*SPLIT_TYPES, UNKNOWN_SPLIT_TYPE)
    for key in (*STRING_FIELDS, "endings", "label"):
        if key not in row:
            raise UserError(f"{where}: missing field '{key}'")
    for key in STRING_FIELDS:
        if not isinstance(row[key], str):
            raise UserError(f"{where}: field '{key}' must be a string")
    endings = row["endings"]
    if not isinstance(endings, list) or len(endings) != 4 or not all(isinstance(e, str) for e in endings):
        n = len(endings) if isinstance(endings, list) else type(endings).__name__
        raise UserError(f"{where}: 'endings' must be a list of 4 strings, got {n}")
    label = row["label"]
    if isinstance(label, str) and label.strip().isdigit():  # the HF copy stores labels as strings
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < 4:
        raise UserError(f"{where}: label must be 0, 1, 2 or 3, got {row['label']!r}")
    if row["split_type"] not in split_types:
        raise UserError(f"{where}: split_type must be one of {', '.join(split_types)}, got {row['split_type']!r}")
    return {**row, "label": label}


def context_schema_row(row: dict, where: str) -> dict:
    """A row of the copies that ship one `context` string (with `endings`, `label`, `activity_label`) in
    the original schema. The context stands whole as ctx_a with an empty ctx_b: the completion style
    scores it exactly as the original row; the harness style cannot capitalize the ctx_b it lost (in
    ActivityNet rows its first word stays lower case; WikiHow rows, whose ctx_b is empty, come out exact).
    Without a split_type the row counts in the overall accuracy only."""
    if not isinstance(row["context"], str):
        raise UserError(f"{where}: field 'context' must be a string")
    return {"split_type": UNKNOWN_SPLIT_TYPE, **row,
            "ctx_a": row["context"], "ctx_b": "", "ctx": row["context"]}


# -----------------------------------------------------------------------------
# the two ways of turning a row into (context tokens, 4 ending tokens, acc_norm divisors)

def harness_preprocess(text: str) -> str:
    """lm-evaluation-harness's clean-up; the brackets are artifacts of HellaSwag's WikiHow rows.
    Kept byte-for-byte, quirks included (one pass of double-space collapsing)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def harness_texts(row: dict) -> tuple[str, list[str]]:
    """(context, endings) as the harness builds them; each ending is scored as " " + ending."""
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return harness_preprocess(row["activity_label"] + ": " + ctx), [harness_preprocess(e) for e in row["endings"]]


@dataclass
class Encoded:
    context: list[int]         # tokens every ending is conditioned on
    endings: list[list[int]]   # the 4 endings' tokens (scored)
    norms: list[float] | None  # acc_norm divisors; None: the number of scored tokens
    label: int
    split_type: str


def encode_row(row: dict, style: str, enc=None) -> Encoded:
    enc = enc or get_tokenizer()
    if style == "completion":  # build-nanogpt: context and " " + ending tokenized apart
        context = enc.encode_ordinary(row["ctx"])
        endings = [enc.encode_ordinary(" " + e) for e in row["endings"]]
        norms = None
    elif style == "harness":
        context_text, choices = harness_texts(row)
        context, endings = [], []
        for choice in choices:
            context, ending = harness_encode_pair(context_text, " " + choice, enc)
            endings.append(ending)
        norms = [float(max(1, len(c))) for c in choices]  # guard: an ending the clean-up emptied
    else:
        raise UserError(f"unknown style {style!r}; choose from completion, harness, both")
    return Encoded(context, endings, norms, row["label"], row["split_type"])


def harness_encode_pair(context: str, continuation: str, enc) -> tuple[list[int], list[int]]:
    """The harness's split: trailing context spaces move to the continuation, the whole string is
    tokenized once and the continuation is what follows the context's own tokens."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    ctx = enc.encode_ordinary(context)
    whole = enc.encode_ordinary(context + continuation)
    return ctx, whole[len(ctx):]


# -----------------------------------------------------------------------------
# scoring: the log-likelihood of every ending, many examples per forward

def _sequence(context: list[int], ending: list[int], block_size: int) -> tuple[list[int], int]:
    """Context + ending cut from the left to block_size + 1 tokens (inputs are all but the last);
    returns the tokens and how many of the last ones are scored (a first token has no prediction)."""
    seq = (context + ending)[-(block_size + 1):]
    return seq, min(len(ending), len(seq) - 1)


@torch.no_grad()
def score_endings(model, examples: list[Encoded], batch_size: int = 16, autocast=None,
                  progress: bool = False, desc: str = "hellaswag") -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-likelihood of each ending and its number of scored tokens, both (N, 4) on the CPU.

    Every forward holds 4 * batch_size right-padded context+ending sequences, taken in order of length
    from all the examples' endings so that almost nothing is padding, and the vocabulary projection
    runs only at ending positions."""
    from tqdm import tqdm
    base = unwrap(model)
    device = next(base.parameters()).device
    block_size = base.config.block_size
    autocast = autocast or contextlib.nullcontext
    seqs = [_sequence(ex.context, e, block_size) for ex in examples for e in ex.endings]  # example-major
    order = sorted(range(len(seqs)), key=lambda k: -len(seqs[k][0]))
    rows_per_batch = 4 * batch_size
    batches = [order[i:i + rows_per_batch] for i in range(0, len(order), rows_per_batch)]
    sums = torch.zeros(len(seqs), dtype=torch.float64)
    counts = torch.zeros(len(seqs), dtype=torch.long)
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        T = len(seqs[batch[0]][0]) - 1  # the longest comes first
        idx = torch.full((len(batch), T), PAD_ID, dtype=torch.long)
        targets = torch.full((len(batch), T), -1, dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for r, k in enumerate(batch):
            seq, n = seqs[k]
            L = len(seq) - 1
            idx[r, :L] = torch.tensor(seq[:-1])
            targets[r, L - n:L] = torch.tensor(seq[L - n + 1:])
            mask[r, :L] = 1
        idx, targets, mask = idx.to(device), targets.to(device), mask.to(device)
        keep = targets != -1
        with autocast():
            # no padding in this batch: no mask, so attention keeps its fused causal path
            x = base.hidden_states(idx, None if bool(mask.all()) else mask)            # (R, T, C)
            # the projection at ending positions only, as forward(logits_at="targets") does, but with
            # the vocab bias fused into the matmul and without forward's unused mean loss: on a CPU
            # these two extra passes over (N, V) cost as much as the projection itself
            logits = torch.addmm(base.vocab_bias, x[keep], base.lm_head.weight.t())     # (N, V)
        logprobs = -F.cross_entropy(logits.float(), targets[keep], reduction="none")  # (N,)
        row_sums = torch.zeros(len(batch), device=device).index_add_(0, keep.nonzero()[:, 0], logprobs)
        sel = torch.tensor(batch)
        sums[sel] = row_sums.double().cpu()
        counts[sel] = keep.sum(1).cpu()
    return sums.view(-1, 4), counts.view(-1, 4)


def predictions(sums: torch.Tensor, counts: torch.Tensor, norms: torch.Tensor | None = None):
    """(acc choice, acc_norm choice) per example: the largest summed log-likelihood, and the largest
    log-likelihood per token (norms None) or per character (norms given). Ties go to the first."""
    norm = counts.double() if norms is None else norms.double()
    return sums.argmax(1), (sums / norm).argmax(1)


# -----------------------------------------------------------------------------
# evaluation: counts per style and split_type, sharded across DDP ranks

def evaluate(model, rows: list[dict], rt=None, style: str = "both", batch_size: int = 16,
             progress: bool = True) -> dict:
    """acc and acc_norm of `model` on `rows` for the requested style(s), overall and by split_type.

    Eval mode inside (the caller's mode comes back after), autocast from `rt`, rows sharded across
    ranks when torch.distributed is initialized; every rank returns the same all-reduced result."""
    styles = STYLES if style == "both" else (style,)
    if any(s not in STYLES for s in styles):
        raise UserError(f"unknown style {style!r}; choose from completion, harness, both")
    if not rows:
        raise UserError("no HellaSwag rows to evaluate")
    if batch_size < 1:
        raise UserError(f"batch size must be positive, got {batch_size}")
    dist = torch.distributed
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    shard = rows[rank::world]
    base = unwrap(model)  # never the DDP wrapper: its forward would sync buffers across uneven shards
    was_training = base.training
    base.eval()
    enc = get_tokenizer()
    # per style: [correct, correct_norm, n] for all rows, then for each split_type
    counts = torch.zeros(len(styles), 1 + len(SPLIT_TYPES), 3, dtype=torch.long)
    try:
        for s, name in enumerate(styles):
            examples = [encode_row(r, name, enc) for r in shard]
            if not examples:
                continue
            sums, n_tokens = score_endings(base, examples, batch_size, rt.autocast if rt else None,
                                           progress=progress and rank == 0, desc=f"hellaswag {name}")
            norms = None if examples[0].norms is None else torch.tensor([ex.norms for ex in examples])
            pred, pred_norm = predictions(sums, n_tokens, norms)
            labels = torch.tensor([ex.label for ex in examples])
            for ex, ok, ok_norm in zip(examples, pred == labels, pred_norm == labels):
                groups = (0,) if ex.split_type == UNKNOWN_SPLIT_TYPE else (0, 1 + SPLIT_TYPES.index(ex.split_type))
                for g in groups:
                    counts[s, g] += torch.tensor([int(ok), int(ok_norm), 1])
    finally:
        base.train(was_training)
    device = next(base.parameters()).device
    counts = all_reduce_sum(counts.to(device)).cpu()
    return {name: summarize_counts(counts[s]) for s, name in enumerate(styles)}


def _acc(c: torch.Tensor) -> dict:
    correct, correct_norm, n = (int(v) for v in c)
    return {"acc": correct / n if n else None, "acc_norm": correct_norm / n if n else None, "n": n}


def summarize_counts(c: torch.Tensor) -> dict:
    return {**_acc(c[0]), "by_split_type": {t: _acc(c[1 + i]) for i, t in enumerate(SPLIT_TYPES)}}


def format_table(results: dict) -> str:
    lines = [f"{'style':<11} {'rows':<9} {'n':>6} {'acc':>7} {'acc_norm':>9}"]
    fmt = lambda v: f"{v:.4f}" if v is not None else "-"  # noqa: E731
    for name, r in results.items():
        lines.append(f"{name:<11} {'all':<9} {r['n']:>6} {fmt(r['acc']):>7} {fmt(r['acc_norm']):>9}")
        for t, sub in r["by_split_type"].items():
            lines.append(f"{'':<11} {t:<9} {sub['n']:>6} {fmt(sub['acc']):>7} {fmt(sub['acc_norm']):>9}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# CLI helpers

def load_model(cfg: Config) -> tuple[GPT, str, Path, dict]:
    """(model, description, default JSON path, checkpoint metadata) from --ckpt or --hf."""
    if cfg.hf:
        model, _ = load_lm(cfg.hf, cfg.ckpt_dir, flag="--hf")
        local = Path(cfg.hf)
        stem = local.name if local.is_dir() else cfg.hf.replace("/", "_")
        parent = local.parent if local.is_dir() else Path(cfg.ckpt_dir)
        return model, f"hf:{cfg.hf}", parent / f"{stem}_hellaswag_{cfg.split}.json", {}
    model, ckpt = load_lm(cfg.ckpt, cfg.ckpt_dir, LM_STAGES, hub=False)
    path = resolve_ckpt(cfg.ckpt, cfg.ckpt_dir)
    meta = {"stage": ckpt["stage"], "step": ckpt.get("step")}
    return model, str(path), path.with_name(f"{path.stem}_hellaswag_{cfg.split}.json"), meta


def fetch_on_local_rank0(rt, split: str, data_dir: str) -> Path:
    """One download per machine; every rank learns whether it worked, so none waits forever."""
    err = None
    if rt.local_rank == 0:
        try:
            ensure_hellaswag(split, data_dir)
        except UserError as e:
            err = e
    failed = all_reduce_sum(torch.tensor([int(err is not None)], device=rt.device)).item()
    if err is not None:
        raise err
    if failed:
        raise UserError(f"HellaSwag {split} split could not be fetched on another rank (see its error)")
    return hellaswag_path(split, data_dir)


def main(cfg: Config):
    # --- config
    if bool(cfg.ckpt) == bool(cfg.hf):
        raise UserError("give exactly one of --ckpt (a checkpoint of this project) or --hf (a GPT-2 name or HF directory)")
    if cfg.split not in ("train", "val"):
        raise UserError(f"--split must be val or train (test has no labels), got {cfg.split!r}")
    if cfg.style not in (*STYLES, "both"):
        raise UserError(f"--style must be completion, harness or both, got {cfg.style!r}")
    if cfg.batch_size < 1 or cfg.limit < 0:
        raise UserError("--batch-size must be positive and --limit non-negative")
    if cfg.ckpt and not resolve_ckpt(cfg.ckpt, cfg.ckpt_dir).is_file():  # before a download, not after
        raise UserError(f"checkpoint not found: {resolve_ckpt(cfg.ckpt, cfg.ckpt_dir)}")

    # --- setup
    rt = compute_init(device=cfg.device, dtype=cfg.dtype)

    # --- data
    path = fetch_on_local_rank0(rt, cfg.split, cfg.data_dir)
    rows = load_rows(path, limit=cfg.limit or None)

    # --- model
    model, name, default_out, meta = load_model(cfg)
    model.to(rt.device)

    # --- evaluate
    t0 = time.time()
    results = evaluate(model, rows, rt, style=cfg.style, batch_size=cfg.batch_size)
    dt = time.time() - t0
    styles = len(results)
    print0(f"HellaSwag {cfg.split}: {len(rows)} rows, {name}, {rt.world_size} process(es), {rt.dtype}, "
           f"{dt:.1f}s ({len(rows) * styles / dt:.1f} examples/s over {styles} style(s))")
    print0(format_table(results))
    if rt.master:
        out = Path(cfg.out) if cfg.out else default_out
        record = {"model": name, **meta, "split": cfg.split, "data": str(path), "rows": len(rows),
                  "world_size": rt.world_size, "dtype": str(rt.dtype).removeprefix("torch."),
                  "seconds": dt, "examples_per_s": len(rows) * styles / dt, "results": results}
        write_json(out, record)
        print0(f"wrote {out}")
    return results


if __name__ == "__main__":
    cli_main(main, Config, PRESETS)
