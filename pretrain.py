"""Pretrain GPT-2 on the token shards that fineweb.py writes: one CPU, one GPU, or torchrun on many.

The defaults are the GPT-2 (124M) recipe on FineWeb-Edu 10B (as in build-nanogpt / llm.c): 524,288
tokens per step, 19,073 steps, warmup 715, lr 6e-4 → 6e-5 cosine, AdamW (0.9, 0.95), weight decay
0.1, grad clip 1.0, validation loss, HellaSwag and samples every 250 steps.

    python fineweb.py                                                  # data/fineweb_edu: 10B tokens
    python hellaswag.py --hf gpt2                                      # (optional) fetches HellaSwag val, scored every --eval-every
    python pretrain.py                                                 # one GPU (80 GB: micro-batch 64)
    torchrun --standalone --nproc_per_node=2 pretrain.py --micro-batch 16   # two T4s (fp16 + GradScaler)
    torchrun --standalone --nproc_per_node=8 pretrain.py               # 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 pretrain.py  # 2 nodes
    python pretrain.py --resume                                        # continue checkpoints/pretrain.pt exactly
    python pretrain.py --init-from gpt2                                # start from OpenAI's GPT-2 weights

Tiny CPU run on generated data:

    python synthetic.py --out data/synthetic
    python fineweb.py --preset small --input data/synthetic/pretrain.jsonl --out-dir data/synthetic_shards
    python pretrain.py --preset small --data-dir data/synthetic_shards \\
        --hellaswag-path data/synthetic/hellaswag/hellaswag_val.jsonl

Writes `checkpoints/pretrain.pt` (stage "pretrain") every --save-every steps and at the end, and
`runs/<run-name>/log.jsonl` (one record per step and per evaluation).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import hellaswag
from checkpoints import build_from_checkpoint, load_checkpoint, load_lm, resolve_ckpt
from common import UserError, all_reduce_sum, check_flags, cli_main, first_line, get_tokenizer, mfu, print0
from model import EOS_ID, GPT, MODEL_PRESETS, TOKENIZER_VOCAB, model_config
from training import (OPTIMIZERS, RunFlags, begin_step, build_optimizer, grad_accum_steps, init_runtime, lr_at,
                      micro_steps, muon_momentum_at, prepare_for_training, start_position, start_run,
                      step_seconds, update_step, use_compile)

STAGE = "pretrain"


@dataclass
class Config(RunFlags):
    preset: str = "gpt2"                  # tiny (tests) | small (CPU demo) | gpt2 (the full recipe, the defaults)
    model: str = "gpt2"                   # model size from model.MODEL_PRESETS: tiny, small, gpt2, gpt2-medium, ...
    init_from: str = ""                   # start from OpenAI weights: a GPT-2 hub name (gpt2, ...) or local HF directory ("" = random init)
    block_size: int = 1024                # model context length (positions) for a fresh model
    seq_len: int = 1024                   # training sequence length (<= the model's block size)
    data_dir: str = "data/fineweb_edu"    # token shards from fineweb.py: val_*.npy, train_*.npy
    total_batch_tokens: int = 524_288     # tokens per optimizer step over all ranks (GPT-3 small's 0.5M)
    micro_batch: int = 64                 # sequences per forward per rank (64 fits 80 GB; 16 fits a T4 in fp16)
    max_steps: int = 19_073               # optimizer steps (10B tokens / 524,288); the cosine ends here
    warmup_steps: int = 715               # linear warmup steps (375M tokens, as GPT-3)
    max_lr: float = 6e-4                  # peak learning rate
    min_lr: float = 6e-5                  # learning rate at the end of the cosine
    weight_decay: float = 0.1             # AdamW weight decay on matmul and embedding weights
    beta1: float = 0.9                    # AdamW beta1
    beta2: float = 0.95                   # AdamW beta2
    optimizer: str = "adamw"              # adamw: AdamW on everything (the GPT-2 recipe) | muon: torch.optim.Muon on the blocks' 2-D matrices (attention qkv and projection, MLP in and out) and AdamW (--max-lr, --weight-decay, --beta1/2) on the rest (embeddings, the tied head, LayerNorm gains, biases)
    muon_lr: float = 0.02                 # Muon's peak learning rate; the warmup + cosine of --max-lr scales it alike
    muon_momentum: float = 0.95           # Muon's Nesterov momentum after its warmup
    muon_momentum_start: float = 0.85     # Muon's momentum at step 0, raised linearly to --muon-momentum
    muon_momentum_warmup: int = 300       # steps over which Muon's momentum rises (0: --muon-momentum from the start)
    muon_weight_decay: float = 0.01       # Muon's decoupled weight decay (each step multiplies its matrices by 1 - lr x this)
    eval_every: int = 250                 # steps between evaluations: val loss, HellaSwag, samples (0: at the end only)
    val_tokens: int = 10_485_760          # validation tokens per evaluation, the same for any number of ranks
    hellaswag_path: str = "data/hellaswag/hellaswag_val.jsonl"  # HellaSwag rows evaluated when the file exists
    hellaswag_limit: int = 0              # evaluate the first N HellaSwag rows only (0: all)
    num_samples: int = 4                  # continuations sampled on rank 0 at each evaluation
    sample_tokens: int = 32               # new tokens per sample
    sample_prompt: str = "Hello, I'm a language model,"  # prompt of the samples
    save_every: int = 1000                # steps between checkpoints, plus one at the end (0: at the end only)
    ckpt: str = "pretrain.pt"             # checkpoint written (and read by --resume); a bare name lives in --ckpt-dir
    resume: bool = False                  # continue exactly from --ckpt (optimizer, scaler, data position, RNG)
    run_name: str = "pretrain"
    seed: int = 1337                      # seeds init, the shard order and the samples


PRESETS = {
    "tiny": dict(model="tiny", block_size=64, seq_len=32, total_batch_tokens=256, micro_batch=4, max_steps=30,
                 warmup_steps=3, max_lr=3e-3, min_lr=3e-4, eval_every=10, val_tokens=1024, hellaswag_limit=20,
                 num_samples=1, sample_tokens=8, save_every=0, muon_momentum_warmup=10),
    # small batches learn the most per token at this size (CPU time is the budget); block 256 leaves room
    # for the SFT prompts of the small TL;DR preset
    "small": dict(model="small", block_size=256, seq_len=128, total_batch_tokens=512, micro_batch=4, max_steps=700,
                  warmup_steps=10, max_lr=2e-3, min_lr=2e-4, eval_every=100, val_tokens=8192, hellaswag_limit=150,
                  num_samples=2, sample_tokens=24, sample_prompt="My roommate keeps", save_every=100,
                  muon_momentum_warmup=50),
    "gpt2": {},
}


# -----------------------------------------------------------------------------
# data

def shard_paths(data_dir: str | Path, split: str) -> list[Path]:
    return sorted(Path(data_dir).glob(f"{split}_[0-9][0-9][0-9][0-9][0-9][0-9].npy"))


def open_shard(path: Path) -> np.ndarray:
    """A memory map of a uint16 shard: ranks share the page cache instead of each copying the shard."""
    try:
        tokens = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"cannot read shard {path} ({first_line(e, 120)}); convert it again with fineweb.py") from None
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise UserError(f"{path} is not a uint16 token shard (dtype {tokens.dtype}, shape {tokens.shape})")
    return tokens


def check_token_ids(tokens: np.ndarray, path: Path):
    """A shard's ids must be GPT-2 tokens: a larger one would index past the embedding table (or into its
    padding slots, whose -inf logits make the loss infinite). One pass over the shard, made once."""
    if len(tokens) and int(tokens.max()) >= TOKENIZER_VOCAB:
        raise UserError(f"{path} holds token id {int(tokens.max())}, outside the GPT-2 vocabulary of "
                        f"{TOKENIZER_VOCAB}; it is not a fineweb.py shard of GPT-2 tokens, convert the data again")


class ShardLoader:
    """(B, T) input/target batches read in order from memory-mapped shards.

    Every optimizer step reads one window of accum x world_size x B x T consecutive tokens (+1 for the
    last target); micro-step m of rank r reads the (m * world_size + r)-th B x T slice of it. So ranks
    never see the same data, and a step reads the same tokens for any split of the same global batch
    into ranks and micro-steps. Shards are visited in an order shuffled per epoch from the seed, and a
    shard's tail shorter than a window is dropped. (epoch, shard, offset) is the whole resumable
    position, identical on every rank."""

    def __init__(self, paths: list[Path], batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, accum: int = 1):
        if not paths:
            raise UserError("no train shards given")
        self.paths, self.B, self.T = list(paths), batch_size, seq_len
        self.rank, self.world_size, self.seed, self.accum = rank, world_size, seed, accum
        self.shards = [open_shard(p) for p in self.paths]
        self.window = batch_size * seq_len * world_size * accum
        if max(len(s) for s in self.shards) < self.window + 1:
            raise UserError(f"every train shard is shorter than one optimizer step of {self.window:,} tokens + 1; "
                            f"lower --total-batch-tokens or write bigger shards")
        self.epoch, self.pos, self.offset, self.micro = 0, 0, 0, 0
        self.order = self.shard_order(0)
        self.checked: set[int] = set()  # shards whose ids were checked (check_token_ids), when first read

    def shard_order(self, epoch: int) -> list[int]:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)).tolist()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = self.B, self.T
        if self.micro == 0:
            while self.offset + self.window + 1 > len(self.shards[self.order[self.pos]]):
                self.pos, self.offset = self.pos + 1, 0
                if self.pos == len(self.order):
                    self.epoch, self.pos = self.epoch + 1, 0
                    self.order = self.shard_order(self.epoch)
        shard = self.order[self.pos]
        if shard not in self.checked:
            check_token_ids(self.shards[shard], self.paths[shard])
            self.checked.add(shard)
        start = self.offset + (self.micro * self.world_size + self.rank) * B * T
        buf = torch.from_numpy(self.shards[shard][start:start + B * T + 1].astype(np.int64))
        self.micro += 1
        if self.micro == self.accum:
            self.micro, self.offset = 0, self.offset + self.window
        return buf[:-1].view(B, T), buf[1:].view(B, T)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "offset": self.offset, "micro": self.micro,
                "num_shards": len(self.shards)}

    def load_state_dict(self, state: dict):
        if state["num_shards"] != len(self.shards):
            raise UserError(f"the checkpoint's data position is over {state['num_shards']} train shards but "
                            f"{len(self.shards)} are there now; resume with the same --data-dir")
        self.epoch, self.pos, self.offset, self.micro = state["epoch"], state["pos"], state["offset"], state["micro"]
        self.order = self.shard_order(self.epoch)


def val_sequences(shards: list[np.ndarray], seq_len: int, budget_tokens: int) -> list[tuple[int, int]]:
    """(shard, start) of the first budget_tokens // seq_len validation sequences: a fixed set, whatever
    the number of ranks."""
    wanted = budget_tokens // seq_len
    seqs = []
    for i, shard in enumerate(shards):
        for start in range(0, len(shard) - seq_len, seq_len):
            if len(seqs) == wanted:
                return seqs
            seqs.append((i, start))
    return seqs


@torch.no_grad()
def val_loss(model, shards: list[np.ndarray], seqs: list[tuple[int, int]], seq_len: int, batch_size: int, rt,
             progress: bool = False) -> float:
    """Mean next-token loss over `seqs`: rank r scores seqs[r::world_size], and the summed losses and
    token counts are all-reduced, so every rank gets the loss of the whole set."""
    mine = seqs[rt.rank::rt.world_size]
    acc_dtype = torch.float32 if rt.device_type == "mps" else torch.float64
    totals = torch.zeros(2, dtype=acc_dtype, device=rt.device)
    was_training = model.training
    model.eval()
    for i in tqdm(range(0, len(mine), batch_size), desc="val loss", leave=False, disable=not progress):
        rows = [torch.from_numpy(shards[s][a:a + seq_len + 1].astype(np.int64)) for s, a in mine[i:i + batch_size]]
        buf = torch.stack(rows).to(rt.device)
        x, y = buf[:, :-1], buf[:, 1:]
        with rt.autocast():
            _, loss = model(x, y)
        totals += torch.stack([loss.to(acc_dtype) * y.numel(), torch.tensor(y.numel(), dtype=acc_dtype, device=rt.device)])
    model.train(was_training)
    all_reduce_sum(totals)
    return (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")


# -----------------------------------------------------------------------------
# evaluation hooks: HellaSwag (hellaswag.py) and samples

def load_hellaswag(path: str, limit: int = 0) -> list[dict] | None:
    """Validated HellaSwag rows, or None (one line printed) when the file is absent."""
    if not path or not Path(path).is_file():
        print0(f"hellaswag: {path or '(no path)'} not found, skipped (python hellaswag.py downloads it)")
        return None
    rows = hellaswag.load_rows(path)
    return rows[:limit] if limit else rows


def hellaswag_metrics(model, rows: list[dict], rt) -> dict:
    result = hellaswag.evaluate(model, rows, rt, style="both")
    return {"hellaswag_acc_norm": result["completion"]["acc_norm"],
            "hellaswag_harness_acc_norm": result["harness"]["acc_norm"]}


@torch.no_grad()
def sample(model, prompt: str, num: int, max_new_tokens: int, rt, seed: int) -> list[str]:
    """Top-k 50 continuations (of <|endoftext|> for an empty prompt) from a private generator, so that
    sampling never moves the training RNG."""
    enc = get_tokenizer()
    idx = torch.tensor([enc.encode_ordinary(prompt) or [EOS_ID]] * num, device=rt.device)
    gen = torch.Generator(device=rt.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    with rt.autocast():
        tokens, _, mask = model.generate(idx, max_new_tokens=max_new_tokens, temperature=1.0, top_k=50, generator=gen)
    model.train(was_training)
    return [prompt + enc.decode(row[m.bool()].tolist()) for row, m in zip(tokens.cpu(), mask.cpu())]


def check_config(cfg: Config):
    if cfg.model not in MODEL_PRESETS:
        raise UserError(f"unknown --model {cfg.model!r}; choose from {', '.join(MODEL_PRESETS)}")
    check_flags(cfg, positive=("seq_len", "micro_batch", "max_steps", "max_lr", "block_size", "muon_lr"),
                non_negative=("warmup_steps", "min_lr", "eval_every", "save_every", "val_tokens", "stop_at",
                              "grad_clip", "hellaswag_limit", "num_samples", "sample_tokens", "muon_weight_decay",
                              "muon_momentum_warmup"))
    if cfg.optimizer not in OPTIMIZERS:
        raise UserError(f"unknown --optimizer {cfg.optimizer!r}; choose {' or '.join(OPTIMIZERS)}")
    for flag in ("muon_momentum", "muon_momentum_start"):
        if not 0 <= getattr(cfg, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be in [0, 1), got {getattr(cfg, flag)}")
    if cfg.resume and cfg.init_from:
        raise UserError("give --resume or --init-from, not both")


def load_model(cfg: Config, ckpt_path) -> tuple[GPT, dict | None]:
    """(model, checkpoint or None): the --resume checkpoint's, GPT-2 weights (--init-from), or a fresh
    model of the --model size."""
    if cfg.resume:
        ckpt = load_checkpoint(ckpt_path, STAGE)
        if not {"optimizer", "data_state", "rng"} <= set(ckpt):
            raise UserError(f"{ckpt_path} holds no training state (optimizer, data position, RNG), so it cannot be resumed")
        trained_with = ckpt.get("config", {}).get("optimizer", "adamw")
        if trained_with != cfg.optimizer:
            raise UserError(f"{ckpt_path} was trained with --optimizer {trained_with}: resume it with the same optimizer")
        return build_from_checkpoint(ckpt, GPT, where=ckpt_path), ckpt
    if cfg.init_from:
        return load_lm(cfg.init_from, cfg.ckpt_dir, flag="--init-from")[0], None
    return GPT(model_config(cfg.model, block_size=cfg.block_size)), None


def muon_schedule(optimizer, cfg: Config, step: int):
    """Muon's momentum for this step: its warmup (the learning rate follows the shared schedule, set_lr)."""
    optimizer.set_momentum(muon_momentum_at(step, cfg.muon_momentum_start, cfg.muon_momentum, cfg.muon_momentum_warmup))


def train_step(model, loader: ShardLoader, scaler, rt, accum: int) -> float:
    """Forward and backward of one optimizer step's micro-batches; the mean loss over every rank."""
    loss_sum = torch.zeros((), device=rt.device)
    for _ in micro_steps(model, rt, accum):
        x, y = loader.next_batch()
        x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
        with rt.autocast():
            _, loss = model(x, y)
        loss = loss / accum
        loss_sum += loss.detach()
        scaler.scale(loss).backward()
    return all_reduce_sum(loss_sum).item() / rt.world_size


def main(cfg: Config) -> dict:
    # --- config
    check_config(cfg)

    # --- setup
    rt = init_runtime(cfg)
    accum = grad_accum_steps(cfg.total_batch_tokens, cfg.micro_batch * cfg.seq_len, rt.world_size)
    ckpt_path = resolve_ckpt(cfg.ckpt, cfg.ckpt_dir)

    # --- data
    train_paths, val_paths = shard_paths(cfg.data_dir, "train"), shard_paths(cfg.data_dir, "val")
    if not train_paths:
        raise UserError(f"no train shards (train_NNNNNN.npy) in {cfg.data_dir}; write them with fineweb.py")
    loader = ShardLoader(train_paths, cfg.micro_batch, cfg.seq_len, rt.rank, rt.world_size, cfg.seed, accum)
    val_shards = [open_shard(p) for p in val_paths]
    for tokens, path in zip(val_shards, val_paths):
        check_token_ids(tokens, path)
    val_seqs = val_sequences(val_shards, cfg.seq_len, cfg.val_tokens)
    if not val_seqs:
        print0(f"val loss: no val shard with {cfg.seq_len + 1}+ tokens in {cfg.data_dir} (or --val-tokens 0), skipped")
    elif len(val_seqs) * cfg.seq_len < cfg.val_tokens:
        print0(f"val loss: the val shards hold only {len(val_seqs) * cfg.seq_len:,} of --val-tokens {cfg.val_tokens:,}")
    hellaswag_rows = load_hellaswag(cfg.hellaswag_path, cfg.hellaswag_limit)

    # --- model
    model, ckpt = load_model(cfg, ckpt_path)
    if cfg.seq_len > model.config.block_size:
        raise UserError(f"--seq-len {cfg.seq_len} exceeds the model's block size {model.config.block_size}")
    model.to(rt.device)
    raw = model  # evaluation and sampling always run the plain module, never the compiled/DDP one
    optimizer = build_optimizer(raw, cfg.optimizer, cfg.max_lr, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                                rt.device_type, cfg.muon_lr, cfg.muon_momentum, cfg.muon_weight_decay)
    scaler = rt.grad_scaler()
    start_step, metrics = start_position(ckpt, optimizer, scaler, loader, {"skipped_steps": 0})
    model = prepare_for_training(model, rt, use_compile(cfg, rt))

    # --- schedule
    flops_per_token = raw.flops_per_token(cfg.seq_len)
    peak = rt.peak_tflops()
    run = start_run(cfg, rt, "pretrain", start_step, cfg.max_steps, f"{raw.num_params() / 1e6:.2f}M params",
                    f"{cfg.total_batch_tokens:,} tokens/step = {cfg.micro_batch} x {cfg.seq_len} x {rt.world_size} "
                    f"rank(s) x {accum} accumulation step(s), {len(train_paths)} train shard(s)", ckpt_path)
    if run.nothing_to_do:
        return metrics

    def run_evals(step: int):
        record = {}
        if val_seqs:
            record["val_loss"] = val_loss(raw, val_shards, val_seqs, cfg.seq_len, cfg.micro_batch, rt, rt.master)
        if hellaswag_rows:
            record.update(hellaswag_metrics(raw, hellaswag_rows, rt))
        if record:
            run.logger.log(record, step, kind="eval")
            metrics.update(record)
        if rt.master and cfg.num_samples and cfg.sample_tokens:
            texts = sample(raw, cfg.sample_prompt, cfg.num_samples, cfg.sample_tokens, rt, cfg.seed + step)
            for i, text in enumerate(texts):
                print0(f"sample {i}: {text!r}")
            run.logger.log({"samples": texts}, step, kind="sample", echo=False)

    # --- loop
    if start_step == 0:
        run_evals(0)
    for step in range(start_step, run.end):
        t0 = begin_step(model, optimizer)
        train_loss = train_step(model, loader, scaler, rt, accum)
        lr = lr_at(step, cfg.max_lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
        if cfg.optimizer == "muon":
            muon_schedule(optimizer, cfg, step)
        record = update_step(model, optimizer, scaler, lr, cfg.grad_clip, train_loss, step, metrics)
        if cfg.optimizer == "muon":
            record.update(optimizer.muon_settings())
        dt = step_seconds(rt, t0)
        record.update(dt_ms=dt * 1000, tok_per_s=cfg.total_batch_tokens / dt)
        if peak:
            record["mfu"] = mfu(flops_per_token, record["tok_per_s"] / rt.world_size, peak)
        run.log_step(record, step, scaler, metrics)
        metrics.update(train_loss=train_loss, tokens=(step + 1) * cfg.total_batch_tokens)

        done = step + 1
        if run.is_last(done) or run.is_due(done, cfg.eval_every):
            run_evals(done)
        if rt.master and run.save_is_due(done, cfg.save_every):
            run.save(ckpt_path, done, stage=STAGE, model=raw, config=cfg, metrics=metrics, optimizer=optimizer,
                     scaler=scaler, data_state=loader.state_dict())
    return run.finish(metrics)


if __name__ == "__main__":
    cli_main(main, Config, PRESETS)
