"""What every trainer shares (pretrain.py, sft.py, reward_model.py, ppo.py): the run flags, the start of a
run (compile choice, logger, resume and "nothing to do" messages, --stop-at), gradient-accumulation
micro-steps, the LR schedule, the optimizer step, progress lines with an ETA, the JSONL log and its reader.

A library: importing it has no side effects.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from common import UserError, compute_init, print0, read_jsonl, write_json
from checkpoints import resolve_ckpt, rng_state, save_checkpoint, set_rng_state


# -----------------------------------------------------------------------------
# flags every trainer has; a trainer's Config inherits them and redeclares a field to change its default
# (a redeclared field without a comment keeps the help text written here)

@dataclass
class RunFlags:
    ckpt_dir: str = "checkpoints"         # where bare checkpoint names resolve
    resume: bool = False                  # continue exactly from --latest-ckpt (optimizer, scaler, data position, RNG)
    stop_at: int = 0                      # end this run after this step with a checkpoint, keeping the --max-steps schedule (0: run to the end)
    run_name: str = "run"                 # run folder runs/<run-name>/ for config.json and log.jsonl
    wandb: bool = False                   # also log to Weights & Biases
    wandb_project: str = "gpt2-rlhf"      # W&B project
    device: str = "auto"                  # auto | cuda | cpu | mps
    dtype: str = "auto"                   # auto (bf16 on Ampere+, fp16 + GradScaler on older GPUs, fp32 on CPU) | float32 | bfloat16 | float16
    compile: bool | None = None           # torch.compile the training forward (default: on for CUDA, off elsewhere)
    grad_clip: float = 1.0                # clip the global gradient norm to this (0: no clipping)
    seed: int = 1337                      # seeds the data order


def use_compile(cfg: RunFlags, rt) -> bool:
    """--compile as given, else on for CUDA only (compiling on a CPU costs more than it saves in a short run)."""
    return cfg.compile if cfg.compile is not None else rt.device_type == "cuda"


# -----------------------------------------------------------------------------
# a run: from the first step it takes to the step it stops at

@dataclass
class Run:
    """Where a run starts and stops, its logger and its progress. `end` is where this invocation stops
    (--stop-at, else max_steps); the schedule always runs to max_steps."""
    start_step: int
    end: int
    max_steps: int
    logger: "RunLogger"
    started: float = dataclasses.field(default_factory=time.time)

    @property
    def nothing_to_do(self) -> bool:
        return self.start_step >= self.end

    def is_due(self, done: int, every: int) -> bool:
        """Whether a periodic action (evaluate, save, sample) falls after `done` steps: every `every` steps
        (0: never) and at the end of the schedule."""
        return done == self.max_steps or bool(every and done % every == 0)

    def is_last(self, done: int) -> bool:
        return done == self.end

    def log_step(self, record: dict, step: int, scaler=None, metrics: dict | None = None):
        """One training line, `step x/N` with the ETA of this invocation; the JSONL record is `record`, plus
        the count of steps the fp16 GradScaler skipped (metrics["skipped_steps"]) when it is enabled."""
        if scaler is not None and scaler.is_enabled():
            record["skipped_steps"] = metrics["skipped_steps"]
        done = step + 1 - self.start_step
        left = self.end - step - 1
        eta = (time.time() - self.started) / done * left if done > 0 else 0.0
        self.logger.log(record, step, progress=f"{step + 1}/{self.max_steps} eta {format_duration(eta)}")

    def saved(self, path, step: int):
        print0(f"saved {path} (step {step})")

    def save_is_due(self, done: int, save_every: int) -> bool:
        """Whether the resumable checkpoint is written after step `done`: every `save_every` steps (0: never)
        and where this invocation stops."""
        return self.is_last(done) or self.is_due(done, save_every)

    def save(self, path, done: int, **fields):
        """Write the resumable checkpoint `path` after step `done`: save_checkpoint's `fields` and the RNG state."""
        save_checkpoint(path, step=done, rng=rng_state(), **fields)
        self.saved(path, done)

    def keep_best(self, record: dict, step: int, metrics: dict, save: Callable[[Any, int, bool], None], best_path,
                  latest_path, master: bool):
        """The end of an evaluation in a trainer that keeps a best and a latest checkpoint (sft.py, dpo.py): the
        record joins `metrics`, the lowest val_loss so far is best_val_loss (and best_step), the eval line is
        logged, and rank 0 writes best_path when it improved (`save(path, step, with_state=False)`) and
        latest_path always (with the training state, for --resume)."""
        improved = record["val_loss"] < metrics["best_val_loss"]
        metrics.update(record)
        if improved:
            metrics.update(best_val_loss=record["val_loss"], best_step=step)
        self.logger.log({**record, "best_val_loss": metrics["best_val_loss"]}, step, kind="eval")
        if master:
            if improved:
                save(best_path, step, False)
                print0(f"saved {best_path} (step {step}, val loss {record['val_loss']:.4f})")
            save(latest_path, step, True)

    def end_step(self, done: int, eval_every: int, evaluate: Callable[[int], None],
                 save: Callable[[Any, int, bool], None], latest_path, master: bool):
        """After step `done`: evaluate (which saves) when it is due; else, where this invocation stops between
        evaluations (--stop-at), rank 0 saves only what --resume needs."""
        if self.is_due(done, eval_every):
            evaluate(done)
        elif self.is_last(done) and master:
            save(latest_path, done, True)
            self.saved(latest_path, done)

    def finish(self, result: dict) -> dict:
        """Close the logger; returns `result`, what the trainer's main returns."""
        self.logger.finish()
        return result


def start_run(cfg: RunFlags, rt, name: str, start_step: int, max_steps: int, model_text: str, batch_text: str,
              resumed_from: Any = None, resumed_note: str = "") -> Run:
    """The shared start of every trainer: the banner line (`name: <model>, <processes, device, dtype>,
    <batch>, steps a->b of N, compile on|off`), the resume line, the logger of runs/<run-name>/, and - when
    the checkpoint is already at the stop step - the "nothing to do" line (the caller returns then:
    `run.nothing_to_do`)."""
    end = min(max_steps, cfg.stop_at) if cfg.stop_at else max_steps
    print0(f"{name}: {model_text}, {rt.world_size} process(es) on {rt.device_type}, "
           f"{str(rt.dtype).removeprefix('torch.')}, {batch_text}, steps {start_step}->{end} of {max_steps}, "
           f"compile {'on' if use_compile(cfg, rt) else 'off'}")
    if start_step:
        print0(f"resumed from {resumed_from} at step {start_step}{f' ({resumed_note})' if resumed_note else ''}")
    run = Run(start_step, end, max_steps, RunLogger(None, enabled=False))
    if run.nothing_to_do:
        print0(f"nothing to do: the checkpoint is at step {start_step}")
        return run
    run.logger = RunLogger(Path("runs") / cfg.run_name, cfg, enabled=rt.master,
                           wandb_project=cfg.wandb_project if cfg.wandb else None, run_name=cfg.run_name)
    return run


def checkpoint_writer(stage: str, model: torch.nn.Module, cfg, metrics: dict, optimizer, scaler, data,
                      **extra) -> Callable[[Any, int, bool], None]:
    """save(path, step, with_state) of a trainer that keeps a best and a latest checkpoint: the model, its flags,
    `metrics` and `extra` (the prompt template), and with_state also the optimizer, scaler, data position
    (`data.state_dict()`) and RNG that --resume needs."""
    def save(path, step: int, with_state: bool):
        state = dict(optimizer=optimizer, scaler=scaler, data_state=data.state_dict(), rng=rng_state()) \
            if with_state else {}
        save_checkpoint(path, stage=stage, model=model, step=step, config=cfg, metrics=metrics, **extra, **state)
    return save


def best_and_latest(cfg) -> tuple[Path, Path]:
    """The --best-ckpt and --latest-ckpt paths of a trainer that keeps both (a bare name lives in --ckpt-dir)."""
    return resolve_ckpt(cfg.best_ckpt, cfg.ckpt_dir), resolve_ckpt(cfg.latest_ckpt, cfg.ckpt_dir)


def init_runtime(cfg: RunFlags):
    """compute_init from the run flags: seed, device, DDP, dtype."""
    return compute_init(cfg.seed, cfg.device, cfg.dtype)


# -----------------------------------------------------------------------------
# one optimizer step: micro-steps, then the step itself

def micro_steps(model: torch.nn.Module, rt, n: int) -> Iterator[int]:
    """The micro-step indices of one optimizer step, each yielded inside the context its forward and
    backward must run in: under DDP, gradients are all-reduced on the last micro-step only (no_sync on the
    others), and that choice is made before the forward."""
    for i in range(n):
        sync = not rt.ddp or i == n - 1
        with contextlib.nullcontext() if sync else model.no_sync():
            yield i


def grad_accum_steps(total_batch: int, micro_batch: int, world_size: int, unit: str = "tokens") -> int:
    """Micro-steps per optimizer step so that micro_batch * world_size * steps == total_batch."""
    per_step = micro_batch * world_size
    if total_batch <= 0 or total_batch % per_step != 0:
        raise UserError(f"total batch of {total_batch} {unit} is not a positive multiple of "
                        f"micro-batch x world size = {micro_batch} x {world_size} = {per_step} {unit}")
    return total_batch // per_step


def lr_at(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup from max_lr/warmup to max_lr, then cosine decay to min_lr at max_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)


def set_lr(optimizer, lr: float):
    """The schedule's learning rate on every parameter group, times the group's `lr_scale` where it has one
    (Muon's groups: --muon-lr / --max-lr, so that one warmup + cosine drives both optimizers)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def optimizer_step(model, optimizer, scaler, lr: float, grad_clip: float, loss: float, step: int) -> tuple[float, bool]:
    """A training stage's optimizer step once its gradients are accumulated: stop with a clear message
    when the step's loss (all ranks) is not finite, set the learning rate, unscale, clip (0: no
    clipping), step. Returns (grad norm, skipped): with fp16 the GradScaler skips a step whose gradients
    overflowed and lowers its scale - normal and counted, not fatal."""
    if not math.isfinite(loss):
        raise UserError(f"loss is {loss} at step {step}: training diverged; resume from the last checkpoint "
                        f"with a lower --max-lr, or use --dtype float32/bfloat16")
    set_lr(optimizer, lr)
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return norm.item(), scaler.is_enabled() and scaler.get_scale() < scale


# -----------------------------------------------------------------------------
# the optimizers: AdamW (the GPT-2 recipe), or Muon for the blocks' matrices with AdamW for the rest

OPTIMIZERS = ("adamw", "muon")


def muon_split(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(Muon's, AdamW's) parameters of a GPT. Muon orthogonalizes the update of a hidden layer's weight matrix
    (Jordan et al. 2024, "Muon: An optimizer for hidden layers"), so it takes the 2-D weights inside the
    transformer blocks: attention qkv and projection, MLP in and out. Everything else goes to AdamW: the token
    and position embeddings and the head (tied to the token embedding: an embedding's rows are not a linear
    map's, and named_parameters lists the tied tensor once), LayerNorm gains and biases."""
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (muon if name.startswith("transformer.h.") and p.ndim == 2 else adamw).append(p)
    return muon, adamw


class MuonAdamW:
    """torch.optim.Muon and torch.optim.AdamW stepped as one optimizer: the GradScaler (unscale_ and step see
    both optimizers' groups, so an overflow in either skips both), set_lr, zero_grad and the checkpoint's
    `optimizer` entry ({"muon": ..., "adamw": ...}) see one object. Under DDP the gradients are all-reduced
    before the step, so every rank's Newton-Schulz iteration gets the same input and makes the same update."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    def zero_grad(self, set_to_none: bool = True):
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def step(self):
        self.muon.step()
        self.adamw.step()

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict):
        if set(state) != {"muon", "adamw"}:
            raise UserError("the checkpoint's optimizer state is AdamW's alone: resume it with --optimizer adamw")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])

    def set_momentum(self, momentum: float):
        for group in self.muon.param_groups:
            group["momentum"] = momentum

    def muon_settings(self) -> dict:
        """What Muon stepped with, for the log: its learning rate (set_lr's) and momentum."""
        group = self.muon.param_groups[0]
        return {"muon_lr": group["lr"], "muon_momentum": group["momentum"]}


def muon_momentum_at(step: int, start: float, end: float, warmup_steps: int) -> float:
    """Muon's momentum, raised linearly from `start` to `end` over the first warmup_steps (modded-nanogpt's
    0.85 -> 0.95 over 300 steps: less momentum while the early gradients change fast)."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


def build_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float, betas: tuple[float, float],
                    device_type: str, muon_lr: float = 0.02, muon_momentum: float = 0.95,
                    muon_weight_decay: float = 0.01):
    """`adamw`: GPT.configure_optimizers (decay on 2-D weights only). `muon`: MuonAdamW, torch.optim.Muon on
    muon_split's matrices (Nesterov, 5 Newton-Schulz steps, the update scaled by sqrt(max(1, rows/cols)) as in
    Keller Jordan's implementation) and AdamW with `lr`, `weight_decay` (2-D embeddings only) and `betas` on
    the rest. Muon's groups carry lr_scale = muon_lr / lr, so the schedule of set_lr scales both alike."""
    if name == "adamw":
        return model.configure_optimizers(weight_decay, lr, betas, device_type)
    if name != "muon":
        raise ValueError(f"optimizer {name!r} is not one of {OPTIMIZERS}")
    matrices, rest = muon_split(model)
    muon = torch.optim.Muon([{"params": matrices, "lr_scale": muon_lr / lr}], lr=muon_lr,
                            weight_decay=muon_weight_decay, momentum=muon_momentum, nesterov=True,
                            adjust_lr_fn="original")
    return MuonAdamW(muon, model.configure_optimizers(weight_decay, lr, betas, device_type, params=rest))


def begin_step(model: torch.nn.Module, optimizer) -> float:
    """Train mode, gradients cleared; the step's start time."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    return time.time()


def update_step(model, optimizer, scaler, lr: float, grad_clip: float, loss: float, step: int, metrics: dict) -> dict:
    """optimizer_step, counting a step the GradScaler skipped in metrics["skipped_steps"]; returns the
    first fields of the step's log record (loss, lr, grad_norm)."""
    grad_norm, skipped = optimizer_step(model, optimizer, scaler, lr, grad_clip, loss, step)
    metrics["skipped_steps"] += int(skipped)
    return {"loss": loss, "lr": lr, "grad_norm": grad_norm}


def step_seconds(rt, t0: float) -> float:
    """Seconds since t0 once the device has finished the step's work (CUDA runs asynchronously)."""
    if rt.device_type == "cuda":
        torch.cuda.synchronize()
    return time.time() - t0


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


def start_position(ckpt: dict | None, optimizer, scaler, data, metrics: dict) -> tuple[int, dict]:
    """(first step, metrics) of a run: 0 and `metrics` for a fresh one; for --resume the checkpoint's step and
    its metrics over those defaults, its training state restored (restore_training_state)."""
    if ckpt is None:
        return 0, metrics
    restore_training_state(ckpt, optimizer, scaler, data)
    return ckpt["step"], {**metrics, **ckpt["metrics"]}


def restore_training_state(ckpt: dict, optimizer, scaler, data) -> None:
    """Continue exactly where a checkpoint stopped: optimizer moments, GradScaler scale, the data
    position (`data` has load_state_dict) and every RNG."""
    optimizer.load_state_dict(ckpt["optimizer"])
    if "scaler" in ckpt and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    data.load_state_dict(ckpt["data_state"])
    set_rng_state(ckpt["rng"])


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
                write_json(self.run_dir / "config.json", cfg)
        if wandb_project:
            import wandb  # WANDB_MODE=offline works without a network
            cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
            self.wandb = wandb.init(project=wandb_project, name=run_name, config=cfg,
                                    dir=str(run_dir) if run_dir else None)

    def log(self, metrics: dict, step: int | None = None, kind: str = "train", echo: bool = True,
            progress: str | None = None):
        """Record metrics; echo prints them as one `key value | ...` line (with `progress`, such as
        `12/700 eta 3m05s`, in place of the bare step number: the line only, not the record)."""
        if not self.enabled:
            return
        record = {"kind": kind, **({"step": step} if step is not None else {}),
                  **{k: _plain(v) for k, v in metrics.items()}, "time": time.time()}
        if echo:
            shown = {**record, "step": progress} if progress is not None and step is not None else record
            print(format_metrics(shown), flush=True)
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


def format_duration(seconds: float) -> str:
    """12s, 3m05s, 2h07m."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def read_log(path: str | Path) -> list[dict]:
    """A log.jsonl as records ordered by step; when a resumed run logged a step again, its last record of
    that kind wins. A missing file is an empty log; a torn line (a run killed mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records: dict[tuple, dict] = {}
    for i, r in enumerate(read_jsonl(path)):
        if r is not None:
            records[(r.get("kind"), r["step"]) if "step" in r else ("line", i)] = r
    return sorted(records.values(), key=lambda r: (r.get("step", -1), r.get("time", 0)))
