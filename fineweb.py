"""FineWeb-Edu (or local text files) → uint16 token shards for pretrain.py.

Every document is tokenized with GPT-2's tokenizer and prefixed by <|endoftext|> (50256), and the token
stream is cut into shards of `--shard-tokens` tokens: `OUT/val_000000.npy` first, then
`OUT/train_000001.npy`, `OUT/train_000002.npy`, ... (a document may span shards). Shards are written
atomically; a `progress.json` written after each one lets a rerun of the same command skip finished
shards and continue where the last run stopped.

    python fineweb.py                                           # FineWeb-Edu sample-10BT: ~10B tokens, 100 shards
    python fineweb.py --max-tokens 100000000                    # the first 100M tokens only (streamed)
    python fineweb.py --input my_corpus/*.jsonl --out-dir data/mine   # local .txt / .jsonl (field text) / .parquet
    python fineweb.py --preset small --input data/synthetic/pretrain.jsonl --out-dir data/synthetic_shards  # CPU demo

A `.txt` file is one document; a `.jsonl` file holds one JSON object per line with a string `text`
field; a `.parquet` file has a string `text` column (`--text-field` names another).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from common import UserError, atomic_write, cli_main, get_tokenizer, json_line, remove_stale_temps, write_json
from model import EOS_ID

PROGRESS = "progress.json"
SHARD_FORMAT = 1


@dataclass
class Config:
    preset: str = "gpt2"                     # tiny | small | gpt2: shard size for that scale
    input: list[str] = field(default_factory=list)  # local .txt/.jsonl/.parquet files instead of the HF dataset
    dataset: str = "HuggingFaceFW/fineweb-edu"  # Hugging Face dataset, streamed (used when --input is empty)
    name: str = "sample-10BT"                # dataset config: sample-10BT, sample-100BT, ...
    split: str = "train"                     # dataset split
    text_field: str = "text"                 # field/column that holds the document text
    out_dir: str = "data/fineweb_edu"        # shards go here: val_000000.npy, train_000001.npy, ...
    shard_tokens: int = 100_000_000          # tokens per shard (the first shard is the validation set)
    max_tokens: int = 0                      # stop after this many tokens in all (0: the whole dataset)
    workers: int = 0                         # tokenizer processes (0: half the CPU cores; 1: no pool)


PRESETS = {
    "tiny": {"shard_tokens": 16_384},
    "small": {"shard_tokens": 100_000},
    "gpt2": {},
}


# -----------------------------------------------------------------------------
# reading documents

def read_local(path: Path, text_field: str = "text", skip: int = 0) -> Iterator[str]:
    """Documents of one local file, after skipping the first `skip`. Bad input raises UserError."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        if skip == 0:
            yield _read_text(path)
    elif suffix == ".jsonl":
        yield from _read_jsonl(path, text_field, skip)
    elif suffix == ".parquet":
        yield from _read_parquet(path, text_field, skip)
    else:
        raise UserError(f"{path}: unsupported file type {suffix or '(none)'}; use .txt, .jsonl or .parquet")


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None


def _read_jsonl(path: Path, text_field: str, skip: int) -> Iterator[str]:
    n = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{lineno}: not UTF-8 text (invalid byte at column {e.start + 1})") from None
            if not line.strip():
                continue
            n += 1
            if n <= skip:
                continue
            row = json_line(line, f"{path}:{lineno}")
            text = row.get(text_field) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise UserError(f"{path}:{lineno}: no string '{text_field}' field")
            yield text


def _read_parquet(path: Path, text_field: str, skip: int) -> Iterator[str]:
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise UserError(f"{path}: not a readable parquet file ({str(e).splitlines()[0][:120]})") from None
    if text_field not in pf.schema_arrow.names:
        raise UserError(f"{path}: no '{text_field}' column (columns: {', '.join(pf.schema_arrow.names)})")
    n = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            n += 1
            if n <= skip:
                continue
            if not isinstance(text, str):
                raise UserError(f"{path}: row {n} has no string '{text_field}' value")
            yield text


def local_documents(paths: list[Path], text_field: str, skip: int = 0) -> Iterator[str]:
    """Documents of all files in order, after skipping the first `skip` of the whole sequence."""
    for path in paths:
        for text in read_local(path, text_field):
            if skip:
                skip -= 1
                continue
            yield text


def hf_documents(dataset: str, name: str, split: str, text_field: str, skip: int = 0) -> Iterator[str]:
    """Stream a Hugging Face dataset (nothing is downloaded beyond what is read)."""
    from datasets import load_dataset
    try:
        ds = load_dataset(dataset, name=name, split=split, streaming=True)
    except Exception as e:  # offline, unknown name, ...: datasets raises many types
        raise UserError(f"cannot open {dataset} ({name}, {split}): {str(e).splitlines()[0][:200]}") from None
    if skip:
        ds = ds.skip(skip)
    for n, row in enumerate(ds, skip + 1):
        text = row.get(text_field)
        if not isinstance(text, str):
            raise UserError(f"{dataset}: row {n} has no string '{text_field}' field")
        yield text


def check_files(paths: list[Path]):
    for path in paths:
        if not path.is_file():
            raise UserError(f"input file not found: {path}")
        if path.suffix.lower() not in (".txt", ".jsonl", ".parquet"):
            raise UserError(f"{path}: unsupported file type {path.suffix or '(none)'}; use .txt, .jsonl or .parquet")


def check_inputs(paths: list[Path], text_field: str) -> int:
    """Read every local file once before anything is written, so that bad input leaves no shard."""
    check_files(paths)
    n = 0
    for _ in tqdm(local_documents(paths, text_field), desc="checking input", unit="doc", leave=False, disable=None):
        n += 1
    if n == 0:
        raise UserError(f"no documents in {', '.join(map(str, paths))}")
    return n


# -----------------------------------------------------------------------------
# tokenizing and sharding

def tokenize(text: str) -> np.ndarray:
    """<|endoftext|> + the document's tokens, as uint16 (GPT-2's 50,257 ids fit)."""
    ids = np.array([EOS_ID, *get_tokenizer().encode_ordinary(text)], dtype=np.uint32)
    assert ids.max() < 2**16, "token id does not fit uint16"
    return ids.astype(np.uint16)


def shard_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"{'val' if index == 0 else 'train'}_{index:06d}.npy"


def write_shard(path: Path, tokens: np.ndarray):
    atomic_write(path, lambda f: np.save(f, tokens))


def read_progress(out_dir: Path) -> dict | None:
    path = out_dir / PROGRESS
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is corrupt; delete {out_dir} and convert again") from None


def write_progress(out_dir: Path, progress: dict):
    write_json(out_dir / PROGRESS, progress, indent=1)


def shard_documents(docs: Iterator[np.ndarray], out_dir: Path, shard_tokens: int, max_tokens: int,
                    progress: dict, on_shard=None, bar=None) -> dict:
    """Cut the token stream into shards. `progress` is the position to start from (shards written,
    document index, tokens of that document already written, tokens written); it is updated and
    saved after every shard, so that a rerun of the same conversion can continue from it."""
    buf = np.empty(shard_tokens, dtype=np.uint16)
    fill = 0
    doc, offset = progress["doc"], progress["offset"]
    total = progress["tokens"]
    for tokens in docs:
        pos, offset = offset, 0
        if max_tokens and total + len(tokens) - pos > max_tokens:
            tokens = tokens[: pos + max_tokens - total]
        while pos < len(tokens):
            take = min(shard_tokens - fill, len(tokens) - pos)
            buf[fill:fill + take] = tokens[pos:pos + take]
            fill, pos, total = fill + take, pos + take, total + take
            if bar is not None:
                bar.update(take)
            if fill == shard_tokens:
                write_shard(shard_path(out_dir, progress["shards"]), buf)
                fill = 0
                at_doc_end = pos == len(tokens)
                progress.update(shards=progress["shards"] + 1, doc=doc + 1 if at_doc_end else doc,
                                offset=0 if at_doc_end else pos, tokens=total)
                write_progress(out_dir, progress)
                if on_shard is not None:
                    on_shard(progress)
        doc += 1
        if max_tokens and total >= max_tokens:
            break
    if fill:
        write_shard(shard_path(out_dir, progress["shards"]), buf[:fill])
        progress.update(shards=progress["shards"] + 1)
    progress.update(doc=doc, offset=0, tokens=total, complete=True)
    write_progress(out_dir, progress)
    return progress


def source_of(cfg: Config) -> dict:
    """What identifies a conversion: a rerun continues only the same one."""
    if cfg.input:
        files = [{"path": str(Path(p).resolve()), "bytes": Path(p).stat().st_size} for p in cfg.input]
        source = {"files": files, "text_field": cfg.text_field}
    else:
        source = {"dataset": cfg.dataset, "name": cfg.name, "split": cfg.split, "text_field": cfg.text_field}
    return {"format": SHARD_FORMAT, "source": source, "shard_tokens": cfg.shard_tokens, "max_tokens": cfg.max_tokens}


def summary(progress: dict, out_dir: Path, seconds: float | None = None) -> str:
    n = progress["shards"]
    val = min(progress["tokens"], progress["settings"]["shard_tokens"])
    speed = f" in {seconds:.1f}s ({progress['tokens'] / max(seconds, 1e-9):,.0f} tokens/s)" if seconds else ""
    return (f"{progress['doc']:,} documents, {progress['tokens']:,} tokens ({val:,} val, "
            f"{progress['tokens'] - val:,} train), {n} shard(s) in {out_dir}{speed}")


def main(cfg: Config) -> dict:
    # --- config
    if cfg.shard_tokens < 1 or cfg.max_tokens < 0 or cfg.workers < 0:
        raise UserError("--shard-tokens must be positive, --max-tokens and --workers non-negative")
    paths = [Path(p) for p in cfg.input]
    check_files(paths)
    out_dir = Path(cfg.out_dir)
    settings = source_of(cfg)

    # --- where a previous run stopped
    progress = read_progress(out_dir)
    if progress is not None and progress.get("settings") != settings:
        raise UserError(f"{out_dir} holds shards of a different conversion (other input, --shard-tokens or "
                        f"--max-tokens); pick another --out-dir or delete {out_dir}")
    if progress is None and out_dir.is_dir() and any(out_dir.glob("*_[0-9][0-9][0-9][0-9][0-9][0-9].npy")):
        raise UserError(f"{out_dir} holds shards but no {PROGRESS}; pick another --out-dir or delete those shards")
    if progress is not None and progress.get("complete"):
        print(f"already complete: {summary(progress, out_dir)}")
        return progress
    if progress is None:
        progress = {"settings": settings, "shards": 0, "doc": 0, "offset": 0, "tokens": 0, "complete": False}
    elif progress["shards"]:
        print(f"resuming after {progress['shards']} finished shard(s), {progress['tokens']:,} tokens, "
              f"at document {progress['doc']:,}")

    # --- documents
    if paths:
        check_inputs(paths, cfg.text_field)
        texts = local_documents(paths, cfg.text_field, skip=progress["doc"])
    else:
        texts = hf_documents(cfg.dataset, cfg.name, cfg.split, cfg.text_field, skip=progress["doc"])
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir, min_age=0)  # left by a conversion that was killed mid-write (one process writes here)

    # --- tokenize (a process pool: the worker is a module-level function, so spawn works) and shard
    workers = cfg.workers or max(1, (os.cpu_count() or 2) // 2)
    t0 = time.time()
    bar = tqdm(total=cfg.max_tokens or None, initial=progress["tokens"], unit="tok", unit_scale=True,
               desc=f"tokenizing ({workers} process{'es' if workers > 1 else ''})", smoothing=0.1)
    with bar:
        if workers == 1:
            progress = shard_documents(map(tokenize, texts), out_dir, cfg.shard_tokens, cfg.max_tokens,
                                       progress, bar=bar)
        else:
            with mp.get_context("spawn").Pool(workers) as pool:
                progress = shard_documents(pool.imap(tokenize, texts, chunksize=16), out_dir, cfg.shard_tokens,
                                           cfg.max_tokens, progress, bar=bar)
    print(f"done: {summary(progress, out_dir, time.time() - t0)}")
    if progress["shards"] < 2:
        print(f"note: every token went into the val shard; pretrain.py needs train shards too, "
              f"so convert again with a --shard-tokens below {progress['tokens']:,}")
    return progress


if __name__ == "__main__":
    cli_main(main, Config, PRESETS)
