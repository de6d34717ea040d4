"""The GPU figures in one command: everything only a CUDA GPU can show, measured side by side in one run,
printed as one table and appended with the device's name to BENCHMARKS.md.

    make gpu-check                         # = python gpu_check.py: the 124M model on the first CUDA GPU (<= 8 min)
    python gpu_check.py --batch-size 32    # a larger training batch (MFU grows with it on big GPUs)
    python gpu_check.py --dry-run          # the same script at the tiny size on the CPU (seconds; nothing appended)

What it measures (the 124M `gpt2` model, random weights unless said):
  1. pretraining step tokens/s and MFU: bf16 autocast + torch.compile, fp16 autocast + GradScaler (a T4's
     way), fp32, each against transformers' GPT2LMHeadModel with the same weights, batch and optimizer
     (bench.py's train section)
  2. peak memory of an fp16 training step at micro-batch 1, 2, 4, ... x 1024 tokens, and the largest that
     stays under 16 GB (the T4 question: what --micro-batch to give pretrain.py there)
  3. KV-cache generation tokens/s against transformers generate (bench.py's generate section)
  4. HellaSwag examples/s, batched (bench.py's hellaswag section, generated rows)
  5. serve.py requests/s and time to first token at 32 streaming clients against `transformers serve
     --continuous-batching` and one request at a time (bench.py's serve section)
  6. pretrain.py for 200 steps with bf16 + torch.compile on the generated world's documents: the loss must
     fall and stay finite (nothing diverges under compile and autocast)

On a machine without a CUDA GPU it says so and exits 0 without measuring anything.
"""
from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

import bench
import fineweb
import pretrain
import synthetic
from common import UserError, cli_main, compute_init, config_from, print0, write_json, write_text
from model import GPT, TOKENIZER_VOCAB, model_config
from training import read_log

GB = 1e9


@dataclass
class Config:
    dry_run: bool = False            # the tiny model on the CPU: checks the script itself (what the tests run); appends nothing
    batch_size: int = 16             # training batch in sequences for the speed comparison (x --seq-len tokens)
    seq_len: int = 1024              # tokens per sequence (the model's context)
    memory_limit_gb: float = 16.0    # the largest fp16 micro-batch is the one whose peak stays under this (a T4: 16 GB)
    max_micro_batch: int = 64        # micro-batches tried: 1, 2, 4, ... up to this
    pretrain_steps: int = 200        # steps of the pretraining run under compile + autocast
    serve_clients: int = 32          # concurrent streaming clients against serve.py
    benchmarks: str = "BENCHMARKS.md"  # the file the table is appended to
    out: str = ""                    # the full results as JSON ('' = runs/bench/gpu-check-<device>.json)
    seed: int = 0


def settings(cfg: Config) -> dict:
    """What the check runs: bench.py's Config fields for its sections, plus the micro-batches of the memory probe
    and the pretraining run's preset and steps. --dry-run: the tiny model, a few tokens, fp32 only, seconds on
    a CPU."""
    gpu = dict(model="gpt2", batch_size=cfg.batch_size, seq_len=cfg.seq_len, variants=["bf16+compile", "fp16", "fp32"],
               gen_batch_sizes=[1, 32], gen_tokens=128, prompt_len=32, hellaswag_rows=256, hellaswag_batch=64,
               serve_clients=[cfg.serve_clients], serve_requests=2 * cfg.serve_clients, serve_tokens=53, repeats=3,
               serve_sides=["serve.py", "transformers", "one_at_a_time"],
               micro_batches=[2 ** i for i in range(cfg.max_micro_batch.bit_length())],
               pretrain_preset="gpt2", pretrain_steps=cfg.pretrain_steps)
    dry_run = dict(model="tiny", batch_size=2, seq_len=32, variants=["fp32"], gen_batch_sizes=[1], gen_tokens=8,
                   prompt_len=8, hellaswag_rows=8, hellaswag_batch=4, serve_clients=[2], serve_requests=4,
                   serve_tokens=8, serve_sides=["serve.py", "one_at_a_time"], repeats=1, micro_batches=[1, 2], pretrain_preset="tiny", pretrain_steps=5)
    return {**gpu, **(dry_run if cfg.dry_run else {})}


# -----------------------------------------------------------------------------
# the parts bench.py does not have: fp16 peak memory by micro-batch, a pretraining run

def peak_memory_by_micro_batch(model_name: str, seq_len: int, micro_batches: list[int], limit_gb: float,
                               device: torch.device) -> dict:
    """Peak CUDA memory (GB) of one fp16 AdamW training step per micro-batch, as pretrain.py runs it (autocast,
    GradScaler, fused AdamW), until one goes over the limit or runs out of memory; on a CPU the steps run
    and no memory is reported."""
    rows, largest = {}, None
    rt = compute_init(0, str(device), "float16" if device.type == "cuda" else "float32")
    for B in micro_batches:
        torch.manual_seed(0)
        model = GPT(model_config(model_name)).to(device)
        optimizer = model.configure_optimizers(weight_decay=0.1, learning_rate=6e-4, device_type=device.type)
        scaler = rt.grad_scaler()
        x = torch.randint(0, TOKENIZER_VOCAB, (B, seq_len + 1), device=device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            with rt.autocast():
                _, loss = model(x[:, :-1], targets=x[:, 1:])
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            peak = torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None
        except torch.OutOfMemoryError:
            peak = math.inf
        del model, optimizer, x
        rows[str(B)] = peak
        if peak is not None and peak > limit_gb:
            break
        if peak is not None:
            largest = B
    return {"seq_len": seq_len, "limit_gb": limit_gb, "peak_gb": rows, "largest_micro_batch": largest}


def pretraining_config(preset: str, steps: int, device: torch.device, compile_model: bool, work: Path) -> pretrain.Config:
    """pretrain.py's Config for the check's run on the generated world's documents (written and tokenized into
    work/): the preset's model and batch, autocast by --dtype auto, torch.compile as asked."""
    synthetic.write_all(work / "world", seed=0, **synthetic.PRESETS["tiny" if preset == "tiny" else "demo"])
    fineweb.main(fineweb.Config(input=[str(work / "world" / "pretrain.jsonl")], out_dir=str(work / "shards"),
                                shard_tokens=2048 if preset == "tiny" else 100_000, workers=1))  # some train shards
    overrides = dict(data_dir=str(work / "shards"), max_steps=steps, warmup_steps=min(20, steps // 4 + 1),
                     eval_every=0, save_every=0, hellaswag_path="", num_samples=0, ckpt=str(work / "pretrain.pt"),
                     run_name=str(work / "run"), device=str(device.type), compile=compile_model)
    if preset == "gpt2":  # a 64k-token step: 200 of them in a minute or two, long enough to see a divergence
        overrides.update(micro_batch=16, total_batch_tokens=16 * 1024 * 4, seq_len=1024)
    return config_from(pretrain.Config, pretrain.PRESETS, preset, **overrides)


def pretraining_run(cfg: pretrain.Config) -> dict:
    """pretrain.py (its main, as the command runs it): the mean loss of the first and the last tenth of the
    run, whether it fell and stayed finite."""
    t0 = time.perf_counter()
    pretrain.main(cfg)
    seconds = time.perf_counter() - t0
    losses = [r["loss"] for r in read_log(Path(cfg.run_name) / "log.jsonl") if r["kind"] == "train"]
    k = max(1, len(losses) // 10)  # the first and the last tenth of the run
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return {"steps": len(losses), "seconds": seconds, "loss_first": first, "loss_last": last,
            "finite": all(math.isfinite(v) for v in losses), "fell": last < first, "compile": bool(cfg.compile)}


# -----------------------------------------------------------------------------
# the table

def _fmt(v, spec=".0f") -> str:
    return "-" if v is None else format(v, spec)


def format_table(results: dict) -> str:
    machine, memory, hs, run = results["machine"], results["memory"], results["hellaswag"], results["pretrain_run"]
    rows = [("measure", "ours", "transformers", "ours / transformers"), ("---",) * 4]

    def speed(side: dict) -> str:
        return _fmt(side["per_s"]) + ("" if side["mfu"] is None else f" ({100 * side['mfu']:.1f}% MFU)")

    rows += [(f"pretraining tokens/s, {variant}", speed(row["ours"]), speed(row["hf"]), f"{row['ratio']['median']:.2f}x")
             for variant, row in results["train"]["variants"].items()]
    rows.append((f"fp16 step peak GB by micro-batch x {memory['seq_len']} tokens",
                 ", ".join(f"{b}: {_fmt(p, '.1f')}" for b, p in memory["peak_gb"].items()), "", ""))
    rows.append((f"largest fp16 micro-batch under {memory['limit_gb']:g} GB", _fmt(memory["largest_micro_batch"], "d"), "", ""))
    rows += [(f"KV-cache generation tokens/s, batch {batch}", _fmt(row["ours"]["per_s"]), _fmt(row["hf"]["per_s"]),
              f"{row['ratio_vs_hf']['median']:.2f}x") for batch, row in results["generate"]["batches"].items()]
    rows.append((f"HellaSwag examples/s (batch {hs['batch_size']}, {hs['dtype']})", _fmt(hs["batched"]["per_s"]), "",
                 f"{hs['ratio']['median']:.1f}x one by one"))
    peer = lambda level: (f"{level['transformers']['requests_per_s']:.1f} ({_fmt(level['transformers']['ttft_p95_s'], '.2f')} s)"  # noqa: E731
                          if "transformers" in level else "")
    rows += [(f"serve.py requests/s at {clients} clients (p95 TTFT); transformers serve",
              f"{level['serve.py']['requests_per_s']:.1f} ({_fmt(level['serve.py']['ttft_p95_s'], '.2f')} s)", peer(level),
              ", ".join(f"{r['median']:.1f}x {side.replace('_', ' ')}" for side, r in level["ratio"].items()))
             for clients, level in results["serve"]["levels"].items()]
    verdict = ("falls" if run["fell"] else "DOES NOT FALL") + ("" if run["finite"] else ", NOT FINITE")
    rows.append((f"pretrain.py {run['steps']} steps{' + compile' if run['compile'] else ''}: mean loss of the first "
                 f"-> last tenth", f"{run['loss_first']:.2f} -> {run['loss_last']:.2f} ({verdict})", "", ""))
    head = (f"{machine.get('gpu', machine['device'])}, torch {machine['torch']}, transformers {machine['transformers']}, "
            f"training batch {results['train']['batch_size']} x {results['train']['seq_len']} tokens")
    return head + "\n\n" + "\n".join("| " + " | ".join(cells) + " |" for cells in rows)


# -----------------------------------------------------------------------------
# main

def main(cfg: Config) -> dict | None:
    # --- config
    if not cfg.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine, so nothing was measured; run it where one is "
              "(python gpu_check.py --dry-run tries the script itself on the CPU)")
        return None
    if min(cfg.batch_size, cfg.seq_len, cfg.max_micro_batch, cfg.pretrain_steps, cfg.serve_clients) < 1:
        raise UserError("--batch-size, --seq-len, --max-micro-batch, --pretrain-steps and --serve-clients must be positive")
    run = settings(cfg)
    device = torch.device("cpu" if cfg.dry_run else "cuda")
    bench_fields = {f.name for f in dataclasses.fields(bench.Config)}
    bench_cfg = bench.Config(preset="gpu-check", no_cache_max_batch=0, serve_rounds=1, warmup=1, device=str(device),
                             seed=cfg.seed, **{k: v for k, v in run.items() if k in bench_fields})
    out = Path(cfg.out or f"runs/bench/gpu-check-{'dry-run' if cfg.dry_run else 'cuda'}.json")

    # --- models: ours at random init and transformers' GPT-2 with the same weights
    rt = compute_init(cfg.seed, str(device), "float32")
    import transformers
    transformers.logging.set_verbosity_error()
    ours, hf = bench.twin_models(bench_cfg, rt.device)
    results = {"machine": bench.machine_info(rt.device), "dry_run": cfg.dry_run, "config": dataclasses.asdict(cfg)}

    # --- measurements: bench.py's sections, then (the GPU to themselves) the memory probe and the pretraining run
    t_start = time.perf_counter()
    sections = {"train": lambda: bench.bench_train(bench_cfg, ours, hf, rt),
                "generate": lambda: bench.bench_generate(bench_cfg, ours, hf, rt),
                "hellaswag": lambda: bench.bench_hellaswag(bench_cfg, ours, rt),
                "serve": lambda: bench.bench_serve(bench_cfg, ours, rt)}
    for name, measure in sections.items():
        print0(f"gpu_check: {name} ...")
        t0 = time.perf_counter()
        results[name] = {**measure(), "section_seconds": time.perf_counter() - t0}
    del sections, ours, hf
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print0("gpu_check: memory ...")
    results["memory"] = peak_memory_by_micro_batch(bench_cfg.model, bench_cfg.seq_len, run["micro_batches"],
                                                   cfg.memory_limit_gb, rt.device)
    print0("gpu_check: pretraining run ...")
    with tempfile.TemporaryDirectory() as work:
        results["pretrain_run"] = pretraining_run(pretraining_config(
            run["pretrain_preset"], run["pretrain_steps"], device, compile_model=not cfg.dry_run, work=Path(work)))
    results["seconds"] = time.perf_counter() - t_start

    # --- report
    table = format_table(results)
    print0(table)
    write_json(out, results)
    if not cfg.dry_run:
        benchmarks = Path(cfg.benchmarks)
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        section = f"\n## GPU check: {results['machine']['gpu']} ({stamp}, `make gpu-check`)\n\n{table}\n"
        write_text(benchmarks, (benchmarks.read_text() if benchmarks.is_file() else "") + section)
        print0(f"appended to {benchmarks}")
    print0(f"wrote {out} ({results['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    cli_main(main, Config)
