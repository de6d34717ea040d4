"""What every stage shares: config parsing, runtime setup (seed, device, DDP, dtype), autocast and
GradScaler, the LR schedule, checkpoints, the tokenizer, logging and the user-error path.

A library: importing it has no side effects.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import pickle
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
CHECKPOINT_FORMAT = 1


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


def parse_config(cls, presets: dict[str, dict] | None = None, argv: list[str] | None = None,
                 description: str | None = None):
    """Command line → Config. Flags are kebab-case mirrors of the fields (`max_steps` ↔ `--max-steps`);
    `--preset NAME` picks a coherent set of defaults that explicit flags override."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    parser = argparse.ArgumentParser(description=description,
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
    try:
        cfg = parse_config(cls, presets, argv, description=inspect.getmodule(main).__doc__)
        return main(cfg)
    except UserError as e:
        die(str(e))
    finally:
        cleanup()


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


def resolve_device(requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


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


def cleanup():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
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
# schedule

def lr_at(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup from max_lr/warmup to max_lr, then cosine decay to min_lr at max_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two models hold equal tensors under the same names (a policy not yet updated and its
    reference: an evaluation of one stands for both)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def optimizer_step(model, optimizer, scaler, lr: float, grad_clip: float, loss: float, step: int) -> tuple[float, bool]:
    """A training stage's optimizer step once its gradients are accumulated: stop with a clear message
    when the step's loss (all ranks) is not finite, set the learning rate, unscale, clip (0: no
    clipping), step. Returns (grad norm, skipped): with fp16 the GradScaler skips a step whose gradients
    overflowed and lowers its scale - normal and counted, not fatal."""
    if not math.isfinite(loss):
        raise UserError(f"loss is {loss} at step {step}: training diverged; resume from the last checkpoint "
                        f"with a lower --max-lr, or use --dtype float32/bfloat16")
    for group in optimizer.param_groups:
        group["lr"] = lr
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return norm.item(), scaler.is_enabled() and scaler.get_scale() < scale


def grad_accum_steps(total_batch: int, micro_batch: int, world_size: int, unit: str = "tokens") -> int:
    """Micro-steps per optimizer step so that micro_batch * world_size * steps == total_batch."""
    per_step = micro_batch * world_size
    if total_batch <= 0 or total_batch % per_step != 0:
        raise UserError(f"total batch of {total_batch} {unit} is not a positive multiple of "
                        f"micro-batch x world size = {micro_batch} x {world_size} = {per_step} {unit}")
    return total_batch // per_step


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
# checkpoints: plain-data dicts, atomic writes, weights_only loads

def resolve_ckpt(name: str, ckpt_dir: str | os.PathLike = "checkpoints") -> Path:
    """A bare file name lives inside ckpt_dir; anything with a path separator is a path."""
    if os.sep in name or "/" in name:
        return Path(name)
    return Path(ckpt_dir) / name


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb"):
    """Write through a temp file in the same folder, fsync, then os.replace: a crash at any point
    leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the unwrapped model, without `_orig_mod.` / `module.` prefixes."""
    sd = unwrap(model).state_dict()
    return {k.replace("_orig_mod.", "").removeprefix("module."): v for k, v in sd.items()}


def rng_state() -> dict:
    """Every RNG a stage draws from, as weights_only-loadable plain data."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_flags(cfg, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """One clear error for a flag out of range: `positive` fields must be > 0, `non_negative` ones >= 0."""
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must not be negative, got {getattr(cfg, name)}")


def restore_training_state(ckpt: dict, optimizer, scaler, data) -> None:
    """Continue exactly where a checkpoint stopped: optimizer moments, GradScaler scale, the data
    position (`data` has load_state_dict) and every RNG."""
    optimizer.load_state_dict(ckpt["optimizer"])
    if "scaler" in ckpt and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    data.load_state_dict(ckpt["data_state"])
    set_rng_state(ckpt["rng"])


def prepare_for_training(model: torch.nn.Module, rt, use_compile: bool, dynamic: bool = False,
                         **ddp_kwargs) -> torch.nn.Module:
    """The module the training loop calls: compiled when asked, then DDP-wrapped under torchrun.
    Evaluation and saving keep using the plain module."""
    if use_compile:
        model = torch.compile(model, dynamic=dynamic or None)
    if rt.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None, **ddp_kwargs)
    return model


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(path: str | os.PathLike, *, stage: str, model: torch.nn.Module, step: int = 0,
                    config: Any = None, metrics: dict | None = None, optimizer=None, scaler=None,
                    data_state: dict | None = None, rng: dict | None = None, **extra) -> Path:
    """Atomically write the checkpoint contract of DESIGN.md: a dict of plain types only."""
    base = unwrap(model)
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "stage": stage,
        "model_config": dataclasses.asdict(base.config),
        "model": model_state_dict(base),
        "step": int(step),
        "metrics": dict(metrics or {}),
        "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config or {}),
    }
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    if scaler is not None and scaler.is_enabled():
        ckpt["scaler"] = scaler.state_dict()
    if data_state is not None:
        ckpt["data_state"] = data_state
    if rng is not None:
        ckpt["rng"] = rng
    ckpt.update(extra)
    atomic_write(path, lambda f: torch.save(ckpt, f))
    return Path(path)


def load_checkpoint(path: str | os.PathLike, stages: str | tuple[str, ...] | None = None,
                    map_location: Any = "cpu", ckpt_dir: str | os.PathLike = "checkpoints") -> dict:
    """Load with weights_only=True (a pickle that would run code is refused) and check the stage.
    Every failure a user can cause is a UserError with one clear line."""
    path = resolve_ckpt(str(path), ckpt_dir)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e).upper():  # the pickle names a function or class: it could run code
            raise UserError(f"refusing to load {path}: it is not a plain-data checkpoint "
                            f"(its pickle references code, which could run on load)") from None
        raise UserError(f"cannot read checkpoint {path}: corrupt or truncated ({_first_line(e)})") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError) as e:
        raise UserError(f"cannot read checkpoint {path}: corrupt or truncated ({_first_line(e)})") from None
    if not isinstance(ckpt, dict) or "stage" not in ckpt or "model" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this project (no 'stage'/'model' entries)")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} has checkpoint format {ckpt.get('format')!r}; this code reads {CHECKPOINT_FORMAT}")
    if stages is not None:
        stages = (stages,) if isinstance(stages, str) else tuple(stages)
        if ckpt["stage"] not in stages:
            raise UserError(f"{path} is a '{ckpt['stage']}' checkpoint; expected {' or '.join(stages)}")
    return ckpt


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


# -----------------------------------------------------------------------------
# logging: one line per step on stdout, JSONL in the run folder, optional wandb

class RunLogger:
    def __init__(self, run_dir: str | os.PathLike | None, config: Any = None, enabled: bool = True,
                 wandb_project: str | None = None, run_name: str | None = None):
        self.enabled = enabled
        self.path = None
        self.wandb = None
        if not enabled:
            return
        if run_dir is not None:
            self.run_dir = Path(run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.path = self.run_dir / "log.jsonl"
            if config is not None:
                cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
                atomic_write(self.run_dir / "config.json", lambda f: f.write(json.dumps(cfg, indent=2)), "w")
        if wandb_project:
            import wandb  # WANDB_MODE=offline works without a network
            cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
            self.wandb = wandb.init(project=wandb_project, name=run_name, config=cfg,
                                    dir=str(run_dir) if run_dir else None)

    def log(self, metrics: dict, step: int | None = None, kind: str = "train", echo: bool = True):
        """Record metrics; echo prints them as one `key value | ...` line."""
        if not self.enabled:
            return
        record = {"kind": kind, **({"step": step} if step is not None else {}),
                  **{k: _plain(v) for k, v in metrics.items()}, "time": time.time()}
        if echo:
            print(format_metrics(record), flush=True)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in metrics.items() if isinstance(_plain(v), (int, float))},
                           step=step)

    def finish(self):
        if self.wandb is not None:
            self.wandb.finish()


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def format_metrics(record: dict) -> str:
    parts = []
    for k, v in record.items():
        if k in ("time",):
            continue
        if isinstance(v, float):
            v = f"{v:.3e}" if (v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5)) else f"{v:.4f}"
        parts.append(f"{k} {v}")
    return " | ".join(parts)
