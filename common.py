"""What every stage shares: flags from a Config dataclass, runtime setup (seed, device, DDP, dtype, autocast
and GradScaler), the tokenizer, atomic writes and JSONL files, and the user-error path. Checkpoints live in
checkpoints.py, the training skeleton in training.py.

A library: importing it has no side effects.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import inspect
import json
import math
import os
import random
import re
import sys
import time
import typing
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
BUNDLED_TIKTOKEN_CACHE = ROOT / "assets" / "tiktoken_cache"


# -----------------------------------------------------------------------------
# user errors: one line on stderr, exit code 2, never a traceback

class UserError(Exception):
    """An error the user caused (bad flag, missing file, wrong checkpoint): reported in one line."""


def die(msg: str) -> typing.NoReturn:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


# -----------------------------------------------------------------------------
# config: a dataclass is the single source of flags, defaults, presets and --help

def _field_comments(cls) -> dict[str, str]:
    """The one-line `# comment` after each field in the dataclass source, used as --help text."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for line in src.splitlines():
            m = re.match(r"^\s+(\w+)\s*:[^#]*#\s*(.*)$", line)
            if m:
                comments[m.group(1)] = m.group(2).strip()
    return comments


def _flag_type(tp) -> tuple[Callable | None, bool]:
    """(argparse type, is_list) for a field annotation; Optional[X] parses as X."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (list, tuple):
        return (args[0] if args else str), True
    if args and origin is not None and len(args) == 1:  # Optional[X] / X | None
        return _flag_type(args[0])
    return tp, False


def config_from(cls, presets: dict[str, dict] | None = None, preset: str | None = None, **overrides):
    """Build a Config: dataclass defaults, then the preset's values, then explicit overrides."""
    values: dict[str, Any] = {}
    if preset is not None:
        if not presets or preset not in presets:
            raise UserError(f"unknown preset {preset!r}; choose from: {', '.join(presets or {})}")
        values.update(presets[preset])
    values.update(overrides)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise UserError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    if "preset" in names and preset is not None:
        values["preset"] = preset
    return cls(**values)


def finite_float(text: str) -> float:
    """argparse type of every float flag: a number, and a finite one (float() reads nan and inf, which would
    disable a check such as grad clipping silently or fail deep inside the optimizer)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


class FlagParser(argparse.ArgumentParser):
    """argparse with the project's error form: a bad flag is one `error:` line and exit 2 (not argparse's
    usage block); --help still shows every flag. Flags are never abbreviated (with abbreviations, a mistyped
    `--data` silently meant `--data-dir`)."""

    def error(self, message: str) -> typing.NoReturn:
        die(f"{message} (python {self.prog} --help lists the flags)")


def parse_config(cls, presets: dict[str, dict] | None = None, argv: list[str] | None = None,
                 description: str | None = None, prog: str | None = None):
    """Command line → Config. Flags are kebab-case mirrors of the fields (`max_steps` ↔ `--max-steps`);
    `--preset NAME` picks a coherent set of defaults that explicit flags override."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    parser = FlagParser(prog=prog, description=description, allow_abbrev=False,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=None,
                            help="a coherent set of defaults; explicit flags override it")
    for f in dataclasses.fields(cls):
        if f.name == "preset":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        helptext = comments.get(f.name, "")
        tp, is_list = _flag_type(hints[f.name])
        tp = finite_float if tp is float else tp
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=f"{helptext} (default: {default})")
        else:
            parser.add_argument(flag, type=tp, nargs="+" if is_list else None, default=argparse.SUPPRESS,
                                action="extend" if is_list else "store",
                                metavar=f.name.upper(), help=f"{helptext} (default: {default})")
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed one usage line; keep exit code 2 for errors
        raise SystemExit(e.code)
    explicit = {k: v for k, v in vars(ns).items() if k != "preset"}
    return config_from(cls, presets, getattr(ns, "preset", None), **explicit)


def cli_main(main: Callable, cls, presets: dict[str, dict] | None = None, argv: list[str] | None = None):
    """The `if __name__ == "__main__"` body of every stage: parse flags, run, turn UserError into exit 2."""
    finished = False
    try:
        module = inspect.getmodule(main)
        cfg = parse_config(cls, presets, argv, description=module.__doc__, prog=Path(module.__file__).name)
        result = main(cfg)
        finished = True
        return result
    except UserError as e:
        die(str(e))
    finally:
        cleanup(finished)


# -----------------------------------------------------------------------------
# runtime: seed, device, DDP, dtype

GPU_PEAK_TFLOPS = {  # dense 16-bit tensor-core peaks, used for MFU
    "T4": 65.0, "A100": 312.0, "H100": 989.0, "H200": 989.0, "A10G": 125.0, "L4": 121.0,
    "V100": 125.0, "RTX 3090": 71.0, "RTX 4090": 165.0, "L40S": 362.0,
}


@dataclass
class Runtime:
    device: torch.device
    device_type: str        # "cuda" | "mps" | "cpu"
    dtype: torch.dtype      # autocast dtype (float32 means no autocast)
    ddp: bool
    rank: int
    local_rank: int
    world_size: int

    @property
    def master(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Enabled only for fp16, where small gradients would otherwise underflow."""
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype == torch.float16)

    def peak_tflops(self) -> float | None:
        if self.device_type != "cuda":
            return None
        return gpu_peak_tflops(torch.cuda.get_device_name(self.device))


def gpu_peak_tflops(device_name: str) -> float | None:
    """Peak dense 16-bit TFLOP/s of a GPU by its name; None when unknown (no MFU beats a wrong one)."""
    for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return GPU_PEAK_TFLOPS[key]
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilization in [0, 1]: one GPU's training FLOP/s (`GPT.flops_per_token` x that GPU's
    tokens/s) over its peak; None when the peak is unknown (CPU, unlisted GPU)."""
    if not peak_tflops:
        return None
    return flops_per_token * tokens_per_s / (peak_tflops * 1e12)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def select_dtype(requested: str, device_type: str, capability: tuple[int, int] | None = None) -> torch.dtype:
    """`auto`: bf16 on CUDA capability >= 8.0, fp16 (+ GradScaler) below (a T4 is 7.5 and emulates
    bf16 slowly although torch.cuda.is_bf16_supported() says True), fp32 on CPU and MPS."""
    if requested != "auto":
        if requested not in DTYPES:
            raise UserError(f"unknown dtype {requested!r}; choose auto, float32, bfloat16 or float16")
        return DTYPES[requested]
    if device_type != "cuda":
        return torch.float32
    if capability is None:
        capability = torch.cuda.get_device_capability()
    return torch.bfloat16 if tuple(capability) >= (8, 0) else torch.float16


DEVICE_TYPES = ("cuda", "mps", "cpu")


def resolve_device(requested: str = "auto") -> str:
    """`auto` (CUDA, else MPS, else CPU), or the device asked for, checked: a device type this machine does
    not have is a UserError, not a failure at the first tensor moved there."""
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind, _, index = requested.partition(":")
    if kind not in DEVICE_TYPES or (index and not (kind == "cuda" and index.isdigit())):
        raise UserError(f"unknown --device {requested!r}; choose auto, cuda, cuda:N, mps or cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {requested}: no CUDA GPU is available here (or this torch is a CPU build); "
                        f"use --device cpu")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise UserError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise UserError("--device mps: Apple's MPS is not available here; use --device cpu")
    return requested


def compute_init(seed: int = 1337, device: str = "auto", dtype: str = "auto") -> Runtime:
    """Seed, device, DDP (under torchrun: NCCL on GPUs, gloo on CPU), TF32 and the autocast dtype."""
    ddp = int(os.environ.get("RANK", -1)) != -1 and int(os.environ.get("WORLD_SIZE", 1)) > 1
    device_name = resolve_device(device)
    device_type = device_name.split(":")[0]
    if ddp:
        import torch.distributed as dist
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        if device_type == "cuda":
            device_name = f"cuda:{local_rank}"
            torch.cuda.set_device(device_name)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    else:
        rank, local_rank, world_size = 0, 0, 1
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    seed_everything(seed)
    capability = torch.cuda.get_device_capability(device_name) if device_type == "cuda" else None
    return Runtime(device=torch.device(device_name), device_type=device_type,
                   dtype=select_dtype(dtype, device_type, capability), ddp=ddp, rank=rank,
                   local_rank=local_rank, world_size=world_size)


def cleanup(finished: bool = False):
    """Leave the process group. After a run that finished, every rank first waits for the others (rank 0 may
    still be writing a checkpoint); after a failure nothing is waited for - the other ranks may never get here.
    What still holds the group (a DDP wrapper's reducer in a reference cycle) is collected first: a gloo group
    whose last owner goes only at interpreter shutdown can abort the process there ("terminate called without
    an active exception")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if finished:
            torch.distributed.barrier()
        gc.collect()
        torch.distributed.destroy_process_group()


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum across ranks (no-op outside DDP)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# -----------------------------------------------------------------------------
# tokenizer

@lru_cache(maxsize=1)
def get_tokenizer():
    """tiktoken's `gpt2` encoding. Offline out of the box: the two vocab files ship in
    assets/tiktoken_cache under tiktoken's cache names (tiktoken still checks their sha256);
    TIKTOKEN_CACHE_DIR, when set, is honoured as tiktoken does."""
    import tiktoken
    if "TIKTOKEN_CACHE_DIR" not in os.environ and "DATA_GYM_CACHE_DIR" not in os.environ:
        os.environ["TIKTOKEN_CACHE_DIR"] = str(BUNDLED_TIKTOKEN_CACHE)
    return tiktoken.get_encoding("gpt2")


# -----------------------------------------------------------------------------
# files: atomic writes, JSONL

def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb"):
    """Write through a temp file in the same folder, fsync, then os.replace: a crash at any point
    leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


STALE_TEMP_SECONDS = 60  # a write in progress touches its temp file far more often than this


def remove_stale_temps(folder: Path, min_age: float = STALE_TEMP_SECONDS):
    """Delete the temp files (`.NAME.PID.tmp`) that atomic_write left in `folder` when its process was killed
    mid-write, checkpoint-sized garbage otherwise. A live process's temp file is never touched: one whose PID
    runs here, or one written to within `min_age` seconds (a process of another node on a shared disk; 0 where
    one process owns the folder)."""
    for tmp in folder.glob(".*.tmp"):
        pid = tmp.name[:-len(".tmp")].rpartition(".")[2]
        if not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
            continue
        with contextlib.suppress(OSError):  # gone meanwhile, or not a file
            if tmp.is_file() and time.time() - tmp.stat().st_mtime >= min_age:
                tmp.unlink()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def write_text(path: str | os.PathLike, text: str):
    """Atomically write UTF-8 text (atomic_write)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")), "wb")


def write_json(path: str | os.PathLike, obj, indent: int = 2):
    """Atomically write obj as indented JSON with a final newline."""
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict | None]:
    """The rows of a JSONL file (jsonl_rows of its UTF-8 text)."""
    return jsonl_rows(Path(path).read_text(encoding="utf-8"))


def json_line(line: str, where: str):
    """One JSON value of a JSONL line, or one UserError naming `where` (file and line) when the line is not
    valid JSON or nested too deep to parse."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise UserError(f"{where}: not valid JSON (nested too deeply)") from None


def jsonl_rows(text: str) -> list[dict | None]:
    """The rows of JSONL text, blank lines left out; a line that is not a JSON object (a torn last line, a
    damaged or absurdly nested one) is None, for the caller to count or skip, never an exception."""
    rows: list[dict | None] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            row = None
        rows.append(row if isinstance(row, dict) else None)
    return rows


# -----------------------------------------------------------------------------
# flag checks and error text

def check_flags(cfg, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """One clear error for a flag out of range: `positive` fields must be > 0, `non_negative` ones >= 0."""
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must not be negative, got {getattr(cfg, name)}")


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, cut to at most `limit` characters at a sentence (or word)
    end, or its type name when it has none: what a one-line user error quotes of a library's exception."""
    text = str(e).strip().splitlines()
    if not text:
        return type(e).__name__
    line = text[0]
    if len(line) <= limit:
        return line
    head = line[:limit]
    end = head.rfind(". ")  # whole sentences where one fits, else whole words
    return head[:end + 1] if end > 0 else head.rsplit(" ", 1)[0] + " ..."
