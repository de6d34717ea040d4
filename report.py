"""The pipeline's report: what each stage achieved, as one table, from the stages' own records - the JSONL
logs in the run folder, the checkpoints' `metrics`, hellaswag.py's result JSON - plus the figures no
stage records, computed here with the stages' own functions: the reward model's correlation with the
gold score and the SFT and PPO models' greedy summaries of the same test posts compared by the gold score
(generated world only), and one post summarized by the SFT model and by the PPO policy.

    python report.py --run-dir runs/small --ckpt-dir checkpoints/small --world data/synthetic   # after ./run.sh small
    python report.py --run-dir runs/gpt2 --ckpt-dir checkpoints/gpt2                            # a real run (no gold score)

run.sh calls it last. It prints the table and writes RUN_DIR/report.md and RUN_DIR/report.json (every
figure by name; null where a stage did not record it). A stage that has not run yet leaves its rows at
n/a rather than failing, so the report also works on a run in progress.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import tldr
from common import UserError, atomic_write, cli_main, compute_init, load_checkpoint
from model import GPT, build_model
from plot import number, read_log, series


@dataclass
class Config:
    run_dir: str = "runs/small"           # run.sh's run folder: <stage>/log.jsonl per stage and times.tsv
    ckpt_dir: str = "checkpoints/small"   # the run's checkpoints: pretrain.pt, best_sft.pt, reward_model.pt, ppo_latest.pt
    world: str = ""                       # the generated world the run used (synthetic.py --out): gold scores ("" for real data)
    posts: str = ""                       # TL;DR posts for the example ("": WORLD/tldr, else CarperAI/openai_summarize_tldr)
    example_split: str = "test"           # split of the example post
    example: int = 0                      # index of the example post in that split
    rm_pairs: int = 500                   # validation comparisons scored for the reward model's gold correlation (0: all)
    gold_posts: int = 400                 # test posts summarized by SFT and PPO for their paired gold comparison (0: all)
    batch_size: int = 32                  # sequences per forward when scoring and summarizing
    out: str = ""                         # report markdown (default RUN_DIR/report.md; report.json beside it)
    device: str = "auto"                  # auto | cuda | cpu | mps


STAGES = ("pretrain", "sft", "reward_model", "ppo")


# -----------------------------------------------------------------------------
# reading the stages' records

def first_last(records: list[dict], key: str, kind: str = "eval") -> tuple[float | None, float | None]:
    """The first and last value of `key` over the `kind` records, (None, None) when there is none."""
    s = series(records, key, kind)
    return (s[0][1], s[-1][1]) if s else (None, None)


def read_times(path: str | Path) -> dict[str, float]:
    """run.sh's times.tsv (stage, seconds): the latest entry of each stage, summed over resumed parts."""
    out: dict[str, float] = {}
    path = Path(path)
    if path.is_file():
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) == 2 and parts[1].strip().isdigit():
                out[parts[0]] = out.get(parts[0], 0.0) + float(parts[1])
    return out


def checkpoint_metrics(path: Path, stages) -> dict:
    return load_checkpoint(path, stages)["metrics"] if path.is_file() else {}


# -----------------------------------------------------------------------------
# figures no stage records

def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n, ties sharing the mean of their ranks (what Spearman's rho needs)."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty(len(x), dtype=torch.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(x: torch.Tensor, y: torch.Tensor) -> float | None:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    den = (x.pow(2).sum() * y.pow(2).sum()).sqrt()
    return (x * y).sum().item() / den.item() if den > 0 else None


def spearman(x: torch.Tensor, y: torch.Tensor) -> float | None:
    return pearson(average_ranks(x), average_ranks(y))


def gold_agreement(rm_chosen: torch.Tensor, rm_rejected: torch.Tensor, gold_chosen: torch.Tensor,
                   gold_rejected: torch.Tensor) -> float | None:
    """Share of pairs the reward model orders as the gold score does (pairs the gold score ties are left
    out): the reward model's accuracy against noise-free labels."""
    g = torch.sign(gold_chosen - gold_rejected)
    keep = g != 0
    if not keep.any():
        return None
    return (torch.sign(rm_chosen - rm_rejected)[keep] == g[keep]).double().mean().item()


@torch.no_grad()
def reward_model_vs_gold(rm_path: Path, comparisons: list[tldr.Comparison], rt, batch_size: int) -> dict:
    """Rewards of both summaries of each pair against their gold scores: Pearson and Spearman over all
    summaries, and the agreement on the order within pairs."""
    from reward_model import load_reward_model, score_texts
    model, ckpt = load_reward_model(str(rm_path))
    model.to(rt.device)
    posts = [c.post for c in comparisons] * 2
    summaries = [c.chosen for c in comparisons] + [c.rejected for c in comparisons]
    rewards = score_texts(model, posts, summaries, ckpt.get("tldr"), batch_size, rt.autocast).double()
    parts = tldr.gold_breakdowns(posts, summaries)
    gold = torch.tensor([b["score"] for b in parts], dtype=torch.float64)
    n = len(comparisons)
    # a wrong fact is only visible against the post, the other faults in the summary alone: the two
    # agreements say which the reward model has learned
    stated = torch.tensor([bool(b["wrong"]) for b in parts])
    wrong_fact = stated[:n] | stated[n:]
    agreement = lambda pairs: gold_agreement(rewards[:n][pairs], rewards[n:][pairs], gold[:n][pairs], gold[n:][pairs])
    return {"rm_gold_pearson": pearson(rewards, gold), "rm_gold_spearman": spearman(rewards, gold),
            "rm_gold_pair_accuracy": agreement(slice(None)), "rm_gold_pair_accuracy_wrong_fact": agreement(wrong_fact),
            "rm_gold_pair_accuracy_other": agreement(~wrong_fact), "rm_gold_wrong_fact_pairs": int(wrong_fact.sum()),
            "rm_gold_summaries": len(summaries)}


def paired_difference(before: list[float], after: list[float]) -> tuple[float | None, float | None]:
    """Mean of after - before over the same items, and its standard error (sample standard deviation over
    sqrt(n); None below two items). Pairing removes what the items themselves vary by; a difference within
    about two standard errors of 0 is what reruns of the same chain scatter by."""
    d = torch.tensor(after, dtype=torch.float64) - torch.tensor(before, dtype=torch.float64)
    if len(d) == 0:
        return None, None
    return d.mean().item(), (d.std() / len(d) ** 0.5).item() if len(d) > 1 else None


@torch.no_grad()
def summarize_with(ckpt_path: Path, stages, posts: list[tldr.Post], rt, batch_size: int) -> list[str]:
    """Greedy summaries by a checkpoint's model with the prompt template and budgets it was trained with
    (what summarize.py does)."""
    ckpt = load_checkpoint(ckpt_path, stages)
    model = build_model(ckpt, GPT, dropout=0.0).to(rt.device)
    info = ckpt.get("tldr") or tldr.template_info()
    return tldr.generate_summaries(model, posts, rt, batch_size, info["max_summary_tokens"],
                                   max_prompt_tokens=info["max_prompt_tokens"], template=info["template"])


# -----------------------------------------------------------------------------
# the figures and the table

def collect(cfg: Config, rt=None) -> dict:
    """Every figure of the report, by name (None where it was not recorded), the example post and the
    stage times."""
    run, ckpts = Path(cfg.run_dir), Path(cfg.ckpt_dir)
    logs = {s: read_log(run / s / "log.jsonl") for s in STAGES}
    f: dict = {}

    # pretraining: the step-0 evaluation is the random-init model
    pre = logs["pretrain"]
    f["pretrain_val_loss_first"], f["pretrain_val_loss_last"] = first_last(pre, "val_loss")
    f["pretrain_train_loss_first"], f["pretrain_train_loss_last"] = first_last(pre, "loss", "train")
    f["pretrain_hellaswag_first"], f["pretrain_hellaswag_last"] = first_last(pre, "hellaswag_acc_norm")
    f["pretrain_hellaswag_harness_first"], f["pretrain_hellaswag_harness_last"] = first_last(pre, "hellaswag_harness_acc_norm")
    f["pretrain_tok_per_s"] = _median([v for _, v in series(pre, "tok_per_s", "train")])
    pre_cfg = _run_config(run / "pretrain")
    f["pretrain_hellaswag_rows"] = pre_cfg.get("hellaswag_limit") or None
    f["pretrain_steps"] = pre[-1]["step"] if pre else None

    hs = ckpts / "pretrain_hellaswag_val.json"
    if hs.is_file():
        res = json.loads(hs.read_text())
        f["hellaswag_rows"] = res.get("rows")
        f["hellaswag_acc_norm"] = number(res["results"].get("completion", {}).get("acc_norm"))
        f["hellaswag_harness_acc_norm"] = number(res["results"].get("harness", {}).get("acc_norm"))
    ref = ckpts / "gpt2_hellaswag_val.json"
    if ref.is_file():
        f["hellaswag_gpt2_acc_norm"] = number(json.loads(ref.read_text())["results"].get("completion", {}).get("acc_norm"))

    # SFT: the step-0 evaluation is the pretrained model; best_sft.pt holds the metrics of its evaluation
    sft = logs["sft"]
    best = checkpoint_metrics(ckpts / "best_sft.pt", "sft")
    f["sft_val_loss_first"], _ = first_last(sft, "val_loss")
    f["sft_val_loss_best"] = number(best.get("best_val_loss", best.get("val_loss")))
    f["sft_gold_first"], _ = first_last(sft, "gold_score")
    f["sft_gold_best"] = number(best.get("gold_score"))
    f["sft_train_loss_first"], f["sft_train_loss_last"] = first_last(sft, "loss", "train")

    # reward model: best checkpoint's validation accuracy; the gold correlation is computed here
    rm_path = ckpts / "reward_model.pt"
    rm = checkpoint_metrics(rm_path, "reward_model")
    f["rm_val_accuracy"] = number(rm.get("val_accuracy"))
    f["rm_val_pairs"] = rm.get("val_pairs")
    f["rm_train_loss_first"], f["rm_train_loss_last"] = first_last(logs["reward_model"], "loss", "train")
    comparisons_dir = Path(cfg.world) / "comparisons" if cfg.world else None
    if rm_path.is_file() and comparisons_dir is not None and comparisons_dir.is_dir():
        pairs = tldr.load_comparisons(str(comparisons_dir), "valid")
        f.update(reward_model_vs_gold(rm_path, pairs[:cfg.rm_pairs or None], rt, cfg.batch_size))

    # PPO: the step-0 evaluation is the SFT policy; eval_* are greedy summaries of held-out posts
    ppo = logs["ppo"]
    f["ppo_rm_score_first"], f["ppo_rm_score_last"] = first_last(ppo, "eval_rm_score")
    f["ppo_kl_first"], f["ppo_kl_last"] = first_last(ppo, "eval_kl")
    f["ppo_gold_first"], f["ppo_gold_last"] = first_last(ppo, "eval_gold")
    f["ppo_sft_gold"], _ = first_last(ppo, "sft_gold")
    _, f["ppo_win_rate"] = first_last(ppo, "eval_win_rate")
    f["ppo_train_rm_score_first"], f["ppo_train_rm_score_last"] = first_last(ppo, "rm_score", "train")
    f["ppo_train_kl_first"], f["ppo_train_kl_last"] = first_last(ppo, "kl", "train")
    f["ppo_steps"] = max((r["step"] for r in ppo if "step" in r), default=None)
    f["ppo_eval_prompts"] = _run_config(run / "ppo").get("eval_prompts")

    # PPO against SFT by the gold score on the same test posts: the ppo log's evaluation holds too few
    # posts for a difference of a few hundredths
    sft_path, ppo_path = ckpts / "best_sft.pt", ckpts / "ppo_latest.pt"
    if cfg.world and sft_path.is_file() and ppo_path.is_file():
        posts = [e.post for e in tldr.load_sft(str(Path(cfg.world) / "tldr"), "test")[:cfg.gold_posts or None]]
        parts = {name: tldr.gold_breakdowns(posts, summarize_with(path, name, posts, rt, cfg.batch_size))
                 for name, path in (("sft", sft_path), ("ppo", ppo_path))}
        mean = lambda xs: sum(xs) / len(xs) if xs else None
        for name, bd in parts.items():
            f[f"test_gold_{name}"] = mean([b["score"] for b in bd])
            f[f"test_words_{name}"] = mean([b["words"] for b in bd])
            f[f"test_missing_{name}"] = mean([len(b["missing"]) for b in bd])
            f[f"test_wrong_{name}"] = mean([len(b["wrong"]) for b in bd])
        f["test_gold_diff"], f["test_gold_se"] = paired_difference(*([b["score"] for b in parts[name]]
                                                                     for name in ("sft", "ppo")))
        f["test_gold_posts"] = len(posts)

    # one post, both summarizers
    example = None
    if sft_path.is_file() and ppo_path.is_file():
        data = cfg.posts or (str(Path(cfg.world) / "tldr") if cfg.world else "CarperAI/openai_summarize_tldr")
        rows = tldr.load_sft(data, cfg.example_split)
        if not 0 <= cfg.example < len(rows):
            raise UserError(f"--example {cfg.example} is outside the {len(rows)} posts of {data} {cfg.example_split}")
        post = rows[cfg.example]
        example = {"post": post.post.post, "title": post.post.title, "subreddit": post.post.subreddit,
                   "reference": post.summary,
                   "sft": summarize_with(sft_path, "sft", [post.post], rt, 1)[0],
                   "ppo": summarize_with(ppo_path, "ppo", [post.post], rt, 1)[0]}
        if cfg.world:
            example["gold"] = dict(zip(("reference", "sft", "ppo"), tldr.gold_scores(
                [post.post] * 3, [example["reference"], example["sft"], example["ppo"]])))
    return {"figures": {k: _plain(v) for k, v in f.items()}, "example": example,
            "times": read_times(run / "times.tsv")}


def _run_config(run_dir: Path) -> dict:
    path = run_dir / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _median(xs: list[float]) -> float | None:
    return sorted(xs)[len(xs) // 2] if xs else None


def _plain(v):
    return v if v is None or isinstance(v, (int, str)) else number(v)


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.{digits}f}"


def _signed(v) -> str:
    return "n/a" if v is None else f"{v:+.4f}"


def table_rows(f: dict) -> list[tuple[str, str, str, str]]:
    """(metric, before, after, where it comes from) for every row of the table."""
    g = f.get
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"
    hs_rows = f" ({_fmt(g('pretrain_hellaswag_rows'))} rows)" if g("pretrain_hellaswag_rows") else ""
    return [
        ("pretrain: val loss", _fmt(g("pretrain_val_loss_first")), _fmt(g("pretrain_val_loss_last")),
         f"pretrain log, random init → step {_fmt(g('pretrain_steps'))}"),
        (f"HellaSwag acc_norm, completion{hs_rows}", pct(g("pretrain_hellaswag_first")), pct(g("pretrain_hellaswag_last")),
         "pretrain log (chance 25%)"),
        (f"HellaSwag acc_norm, harness{hs_rows}", pct(g("pretrain_hellaswag_harness_first")),
         pct(g("pretrain_hellaswag_harness_last")), "pretrain log (chance 25%)"),
        (f"HellaSwag acc_norm, completion / harness ({_fmt(g('hellaswag_rows'))} rows)", "",
         f"{pct(g('hellaswag_acc_norm'))} / {pct(g('hellaswag_harness_acc_norm'))}", "hellaswag.py on pretrain.pt"),
        ("SFT: val loss (summary tokens)", _fmt(g("sft_val_loss_first")), _fmt(g("sft_val_loss_best")),
         "sft log step 0 (pretrained) → best_sft.pt"),
        ("SFT: gold score of greedy summaries", _fmt(g("sft_gold_first")), _fmt(g("sft_gold_best")),
         "sft log step 0 (pretrained) → best_sft.pt"),
        ("reward model: val accuracy", "50.0%", pct(g("rm_val_accuracy")),
         f"reward_model.pt ({_fmt(g('rm_val_pairs'))} valid pairs of the comparisons it learned from, noisy labels)"),
        ("reward model: accuracy against gold order", "50.0%", pct(g("rm_gold_pair_accuracy")),
         "report.py, the world's valid comparisons (summary variants)"),
        ("reward model: gold order, pairs with / without a wrong fact", "50.0%",
         f"{pct(g('rm_gold_pair_accuracy_wrong_fact'))} / {pct(g('rm_gold_pair_accuracy_other'))}",
         f"report.py, {_fmt(g('rm_gold_wrong_fact_pairs'))} of them where a summary states what the post does not"),
        ("reward model: gold correlation, Pearson / Spearman", "",
         f"{_fmt(g('rm_gold_pearson'), 3)} / {_fmt(g('rm_gold_spearman'), 3)}",
         f"report.py, their {_fmt(g('rm_gold_summaries'))} summaries"),
        ("PPO: reward-model score (greedy)", _fmt(g("ppo_rm_score_first")), _fmt(g("ppo_rm_score_last")),
         f"ppo log eval, SFT → step {_fmt(g('ppo_steps'))}"),
        ("PPO: KL to SFT (nats per summary)", _fmt(g("ppo_kl_first")), _fmt(g("ppo_kl_last")), "ppo log eval"),
        ("PPO: gold score (greedy)", _fmt(g("ppo_gold_first")), _fmt(g("ppo_gold_last")), "ppo log eval"),
        ("PPO: gold score, SFT and PPO on the same test posts", _fmt(g("test_gold_sft")), _fmt(g("test_gold_ppo")),
         f"report.py, {_fmt(g('test_gold_posts'))} test posts: PPO - SFT {_signed(g('test_gold_diff'))} "
         f"(standard error {_fmt(g('test_gold_se'))})"),
        ("summaries: words / missing details / wrong facts",
         " / ".join(_fmt(g(f"test_{k}_sft"), 2) for k in ("words", "missing", "wrong")),
         " / ".join(_fmt(g(f"test_{k}_ppo"), 2) for k in ("words", "missing", "wrong")),
         "report.py, the same test posts, means per summary (SFT → PPO)"),
        ("PPO: win rate over SFT by the reward model", "", pct(g("ppo_win_rate")),
         f"ppo log eval, {_fmt(g('ppo_eval_prompts'))} held-out posts"),
        ("PPO: rollout reward-model score / KL", f"{_fmt(g('ppo_train_rm_score_first'))} / {_fmt(g('ppo_train_kl_first'))}",
         f"{_fmt(g('ppo_train_rm_score_last'))} / {_fmt(g('ppo_train_kl_last'))}", "ppo log, first → last step"),
    ]


def format_report(report: dict, title: str = "Pipeline report") -> str:
    lines = [f"# {title}", "", "| metric | before | after | from |", "|---|---|---|---|"]
    lines += [f"| {m} | {b} | {a} | {src} |" for m, b, a, src in table_rows(report["figures"])]
    ex = report.get("example")
    if ex:
        gold = ex.get("gold") or {}
        g = lambda k: f" (gold {gold[k]:.2f})" if k in gold else ""
        post = " ".join(ex["post"].split())
        lines += ["", f"**Example** (r/{ex['subreddit']}, \"{ex['title']}\"): {post}", "",
                  f"- reference{g('reference')}: {ex['reference']}",
                  f"- SFT{g('sft')}: {ex['sft']}",
                  f"- PPO{g('ppo')}: {ex['ppo']}"]
    times = report.get("times") or {}
    if times:
        lines += ["", "| stage | seconds |", "|---|---|"]
        lines += [f"| {stage} | {sec:.0f} |" for stage, sec in times.items()]
        lines += [f"| total | {sum(times.values()):.0f} |"]
    return "\n".join(lines) + "\n"


def main(cfg: Config) -> dict:
    # --- config
    run = Path(cfg.run_dir)
    if not run.is_dir():
        raise UserError(f"run folder not found: {run} (run ./run.sh first, or pass --run-dir)")
    if cfg.world and not Path(cfg.world).is_dir():
        raise UserError(f"--world {cfg.world} is not a folder written by synthetic.py")
    out = Path(cfg.out) if cfg.out else run / "report.md"

    # --- setup
    rt = compute_init(device=cfg.device)

    # --- figures
    t0 = time.time()
    report = collect(cfg, rt)
    text = format_report(report, f"Pipeline report: {run.name}")

    # --- write
    atomic_write(out, lambda f: f.write(text), "w")
    atomic_write(out.with_suffix(".json"), lambda f: f.write(json.dumps(report, indent=2) + "\n"), "w")
    print(text, end="")
    print(f"wrote {out} and {out.with_suffix('.json')} ({time.time() - t0:.1f}s)")
    return report


if __name__ == "__main__":
    cli_main(main, Config, None)
