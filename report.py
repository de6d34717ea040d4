"""The pipeline's report: what each stage achieved, as one table, from the stages' own records only - the
JSONL logs in the run folder, the checkpoints' `metrics`, hellaswag.py's result JSON and eval_summaries.py's
eval.json (ROUGE, win rates with their intervals, the gold score of SFT and PPO on the same test posts,
the reward model against the gold score, the example post). It loads no model and generates nothing.

    python report.py --run-dir runs/small --ckpt-dir checkpoints/small     # after ./run.sh small
    python report.py --run-dir runs/gpt2 --ckpt-dir checkpoints/gpt2       # a real run (no gold score)

run.sh calls it last. It prints the table, after the definitions of its terms (before / after, HellaSwag's
completion and harness styles, the gold score, win rates and who judges them), and the example post, the
one eval_summaries.py --example picked by position (default 0: the first evaluated post, not chosen for
its summaries), a PPO vs DPO section (SFT, PPO and DPO side by side on the same posts, when the evaluation
stage evaluated a DPO policy), and writes RUN_DIR/report.md and RUN_DIR/report.json (every figure by name; null where a
stage did not record it). A stage that has not run yet leaves its rows at
n/a rather than failing, so the report also works on a run in progress.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from checkpoints import load_checkpoint
from common import UserError, cli_main, write_json, write_text
from plot import number, series
from training import read_log


@dataclass
class Config:
    run_dir: str = "runs/small"           # run.sh's run folder: <stage>/log.jsonl per stage and times.tsv
    ckpt_dir: str = "checkpoints/small"   # the run's checkpoints: pretrain.pt, best_sft.pt, reward_model.pt, ppo_latest.pt
    eval: str = ""                        # eval_summaries.py's eval.json (default RUN_DIR/eval/eval.json)
    out: str = ""                         # report markdown (default RUN_DIR/report.md; report.json beside it)


STAGES = ("pretrain", "sft", "reward_model", "ppo", "dpo")


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
# eval_summaries.py's record

JUDGES = ("reward_model", "gold", "judge")


def eval_figures(record: dict) -> tuple[dict, dict | None]:
    """(figures, example, what was evaluated) of an eval.json: the SFT model (eval_summaries.py's --sft), the PPO
    policy and the DPO policy (the first evaluated checkpoint of stage ppo, of stage dpo) side by side, by the
    names the tables use."""
    models = record.get("models") or {}
    sft_name = record.get("sft")
    ppo_name = next((n for n, m in models.items() if m.get("stage") == "ppo"), None)
    dpo_name = next((n for n, m in models.items() if m.get("stage") == "dpo"), None)
    f: dict = {"eval_posts": record.get("posts")}
    f.update(record.get("reward_model_vs_gold") or {})
    for who, name in (("sft", sft_name), ("ppo", ppo_name), ("dpo", dpo_name)):
        m = models.get(name) if name else None
        if not m:
            continue
        for key in ("rouge1", "rouge2", "rougeL", "words", "eos_rate", "copied_trigrams", "kl_to_sft", "reward"):
            if m.get(key) is not None:  # no trigram share where every summary is under 3 words
                f[f"eval_{key}_{who}"] = m[key]
        if record.get("gold"):
            f[f"test_gold_{who}"], f[f"test_words_{who}"] = m.get("gold"), m.get("gold_words")
            f[f"test_missing_{who}"], f[f"test_wrong_{who}"] = m.get("gold_missing"), m.get("gold_wrong")
        for judge in JUDGES:
            for opp, w in (m.get("win_rates") or {}).get(judge, {}).items():
                key = f"eval_win_{judge}_{opp}_{who}"
                f[key], (f[key + "_lo"], f[key + "_hi"]) = w["win_rate"], w["ci95"]
                f[key + "_n"] = w["n"]
        if who == "ppo" and "vs_sft" in m:
            f["test_gold_diff"], f["test_gold_se"] = m["vs_sft"]["score"]["diff"], m["vs_sft"]["score"]["se"]
        if who == "dpo" and "vs_sft" in m:
            f["test_gold_diff_dpo"], f["test_gold_se_dpo"] = m["vs_sft"]["score"]["diff"], m["vs_sft"]["score"]["se"]
    if record.get("gold"):
        f["test_gold_posts"] = record.get("posts")
    ex = record.get("example")
    example = None
    if ex and sft_name in ex.get("summaries", {}) and ppo_name in ex.get("summaries", {}):
        example = {k: ex[k] for k in ("post", "title", "subreddit", "reference")}
        example.update(sft=ex["summaries"][sft_name], ppo=ex["summaries"][ppo_name])
        if ex.get("gold"):
            example["gold"] = {"reference": ex["gold"]["reference"], "sft": ex["gold"][sft_name], "ppo": ex["gold"][ppo_name]}
    meta = {k: record.get(k) for k in ("data", "split", "judge", "sft")}
    # which evaluated post the example is (eval_summaries.py --example, default 0: the first), for its label
    meta["example_index"] = ex.get("index") if ex else None
    return f, example, {**meta, "ppo": ppo_name, "dpo": dpo_name}


# -----------------------------------------------------------------------------
# the figures and the table

def collect(cfg: Config) -> dict:
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

    # reward model: best checkpoint's validation accuracy (its agreement with the gold score: eval.json)
    rm = checkpoint_metrics(ckpts / "reward_model.pt", "reward_model")
    f["rm_val_accuracy"] = number(rm.get("val_accuracy"))
    f["rm_val_pairs"] = rm.get("val_pairs")
    f["rm_train_loss_first"], f["rm_train_loss_last"] = first_last(logs["reward_model"], "loss", "train")

    # PPO: the step-0 evaluation is the SFT policy; eval_* are greedy summaries of held-out posts
    ppo = logs["ppo"]
    for name, key in (("rm_score", "eval_rm_score"), ("kl", "eval_kl"), ("gold", "eval_gold")):
        f[f"ppo_{name}_first"], f[f"ppo_{name}_last"] = first_last(ppo, key)
    f["ppo_sft_gold"], _ = first_last(ppo, "sft_gold")
    _, f["ppo_win_rate"] = first_last(ppo, "eval_win_rate")
    f["ppo_train_rm_score_first"], f["ppo_train_rm_score_last"] = first_last(ppo, "rm_score", "train")
    f["ppo_train_kl_first"], f["ppo_train_kl_last"] = first_last(ppo, "kl", "train")
    f["ppo_steps"] = max((r["step"] for r in ppo if "step" in r), default=None)
    f["ppo_eval_prompts"] = _run_config(run / "ppo").get("eval_prompts")

    # DPO: the step-0 evaluation is the SFT policy itself (implicit rewards 0, accuracy 50%)
    dpo = logs["dpo"]
    for name, key in (("val_accuracy", "val_accuracy"), ("val_margin", "val_margin"), ("kl", "kl_to_ref"),
                      ("gold", "gold_score")):
        f[f"dpo_{name}_first"], f[f"dpo_{name}_last"] = first_last(dpo, key)
    f["dpo_steps"] = max((r["step"] for r in dpo if "step" in r), default=None)

    # the evaluation stage: ROUGE, win rates, the gold score on the same test posts, the example
    eval_path = Path(cfg.eval) if cfg.eval else run / "eval" / "eval.json"
    example, evaluated = None, None
    if eval_path.is_file():
        try:
            figures, example, evaluated = eval_figures(json.loads(eval_path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise UserError(f"{eval_path} is not an eval.json of eval_summaries.py") from None
        f.update(figures)
    return {"figures": {k: _plain(v) for k, v in f.items()}, "example": example, "eval": evaluated,
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


def table_rows(f: dict, evaluated: dict | None = None) -> list[tuple[str, str, str, str]]:
    """(metric, before, after, where it comes from) for every row of the table; `evaluated`: what the
    evaluation stage evaluated (split, judge), None when it has not run."""
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
         "eval_summaries.py, the world's valid comparisons (summary variants)"),
        ("reward model: gold order, pairs with / without a wrong fact", "50.0%",
         f"{pct(g('rm_gold_pair_accuracy_wrong_fact'))} / {pct(g('rm_gold_pair_accuracy_other'))}",
         f"eval_summaries.py, {_fmt(g('rm_gold_wrong_fact_pairs'))} of them where a summary states what the post does not"),
        ("reward model: gold correlation, Pearson / Spearman", "",
         f"{_fmt(g('rm_gold_pearson'), 3)} / {_fmt(g('rm_gold_spearman'), 3)}",
         f"eval_summaries.py, their {_fmt(g('rm_gold_summaries'))} summaries"),
        ("PPO: reward-model score (greedy)", _fmt(g("ppo_rm_score_first")), _fmt(g("ppo_rm_score_last")),
         f"ppo log eval, SFT → step {_fmt(g('ppo_steps'))}"),
        ("PPO: KL to SFT (nats per summary)", _fmt(g("ppo_kl_first")), _fmt(g("ppo_kl_last")), "ppo log eval"),
        ("PPO: gold score (greedy)", _fmt(g("ppo_gold_first")), _fmt(g("ppo_gold_last")), "ppo log eval"),
        ("PPO: gold score, SFT and PPO on the same test posts", _fmt(g("test_gold_sft")), _fmt(g("test_gold_ppo")),
         f"eval_summaries.py, {_fmt(g('test_gold_posts'))} test posts: PPO - SFT {_signed(g('test_gold_diff'))} "
         f"(standard error {_fmt(g('test_gold_se'))})"),
        ("summaries: words / missing details / wrong facts",
         " / ".join(_fmt(g(f"test_{k}_sft"), 2) for k in ("words", "missing", "wrong")),
         " / ".join(_fmt(g(f"test_{k}_ppo"), 2) for k in ("words", "missing", "wrong")),
         "eval_summaries.py, the same test posts, means per summary (SFT → PPO)"),
        ("PPO: win rate over SFT by the reward model", "", pct(g("ppo_win_rate")),
         f"ppo log eval, {_fmt(g('ppo_eval_prompts'))} held-out posts"),
        *eval_rows(f, evaluated),
        ("PPO: rollout reward-model score / KL", f"{_fmt(g('ppo_train_rm_score_first'))} / {_fmt(g('ppo_train_kl_first'))}",
         f"{_fmt(g('ppo_train_rm_score_last'))} / {_fmt(g('ppo_train_kl_last'))}", "ppo log, first → last step"),
    ]


def eval_rows(f: dict, evaluated: dict | None) -> list[tuple[str, str, str, str]]:
    """The evaluation stage's rows, SFT before and PPO after: ROUGE, the win rates of each judge that ran,
    EOS and copying. Nothing when the stage has not run."""
    g = f.get
    if evaluated is None or g("eval_posts") is None:
        return []
    src = f"eval_summaries.py, {_fmt(g('eval_posts'))} {evaluated['split']} posts"
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"
    rouge = lambda who: " / ".join(_fmt(g(f"eval_{k}_{who}"), 3) for k in ("rouge1", "rouge2", "rougeL"))
    rows = [("summaries: ROUGE-1 / 2 / L against the references", rouge("sft"), rouge("ppo"), src)]
    names = {"reward_model": "the reward model", "gold": "the gold score (oracle)", "judge": f"the judge {evaluated['judge']}"}
    for judge, label in names.items():
        ref, sft = f"eval_win_{judge}_reference", f"eval_win_{judge}_sft"
        if g(f"{ref}_sft") is None and g(f"{ref}_ppo") is None:
            continue
        rows.append((f"win rate against the references, by {label}", _win(f, f"{ref}_sft"), _win(f, f"{ref}_ppo"),
                     f"{src}; 95% Wilson interval, a tie counts half"))
        if g(f"{sft}_ppo") is not None:
            rows.append((f"PPO: win rate over SFT, by {label}", "", _win(f, f"{sft}_ppo"), src))
    rows.append(("summaries: ended with EOS / trigrams copied from the post",
                 f"{pct(g('eval_eos_rate_sft'))} / {pct(g('eval_copied_trigrams_sft'))}",
                 f"{pct(g('eval_eos_rate_ppo'))} / {pct(g('eval_copied_trigrams_ppo'))}", f"{src} (SFT → PPO)"))
    return rows


def policy_comparison(f: dict, evaluated: dict | None) -> list[str]:
    """Markdown lines of the PPO vs DPO section: SFT, PPO and DPO side by side on the evaluation stage's posts,
    plus DPO's own log. Nothing when no DPO policy was evaluated."""
    g = f.get
    if evaluated is None or not evaluated.get("dpo") or g("eval_posts") is None:
        return []
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"
    cols = ("sft", "ppo", "dpo")
    row = lambda label, cell: f"| {label} | " + " | ".join(cell(who) for who in cols) + " |"
    lines = ["", f"## PPO vs DPO ({_fmt(g('eval_posts'))} {evaluated['split']} posts, greedy summaries, eval_summaries.py)",
             "", "Both start from the SFT model and learn from the same comparisons: PPO through the reward model "
             "trained on them, DPO directly.", "", "| figure | SFT | PPO | DPO |", "|---|---|---|---|"]
    if g("test_gold_sft") is not None:
        lines.append(row("gold score", lambda w: _fmt(g(f"test_gold_{w}"))))
        diff = {"ppo": ("test_gold_diff", "test_gold_se"), "dpo": ("test_gold_diff_dpo", "test_gold_se_dpo")}
        lines.append(row("gold score: paired difference to SFT (standard error)", lambda w: "" if w == "sft" else
                         f"{_signed(g(diff[w][0]))} ({_fmt(g(diff[w][1]))})"))
        lines.append(row("win rate over SFT, by the gold score (oracle)", lambda w: "" if w == "sft" else
                         _win(f, f"eval_win_gold_sft_{w}")))
        lines.append(row("win rate against the references, by the gold score", lambda w: _win(f, f"eval_win_gold_reference_{w}")))
    if g("eval_reward_sft") is not None:
        lines.append(row("reward-model score", lambda w: _fmt(g(f"eval_reward_{w}"))))
        lines.append(row("win rate over SFT, by the reward model", lambda w: "" if w == "sft" else
                         _win(f, f"eval_win_reward_model_sft_{w}")))
        lines.append(row("win rate against the references, by the reward model",
                         lambda w: _win(f, f"eval_win_reward_model_reference_{w}")))
    if g("eval_win_judge_sft_ppo") is not None:
        lines.append(row(f"win rate over SFT, by the judge {evaluated['judge']}", lambda w: "" if w == "sft" else
                         _win(f, f"eval_win_judge_sft_{w}")))
    lines += [row("KL to SFT along its summaries (nats)", lambda w: "" if w == "sft" else _fmt(g(f"eval_kl_to_sft_{w}"), 2)),
              row("ROUGE-1 / 2 / L", lambda w: " / ".join(_fmt(g(f"eval_{k}_{w}"), 3) for k in ("rouge1", "rouge2", "rougeL"))),
              row("words per summary / trigrams copied from the post",
                  lambda w: f"{_fmt(g(f'eval_words_{w}'), 1)} / {pct(g(f'eval_copied_trigrams_{w}'))}"),
              "", f"DPO's own log (dpo.py, step 0 → {_fmt(g('dpo_steps'))}): validation implicit-reward accuracy "
              f"{pct(g('dpo_val_accuracy_first'))} → {pct(g('dpo_val_accuracy_last'))}, margin "
              f"{_fmt(g('dpo_val_margin_first'), 3)} → {_fmt(g('dpo_val_margin_last'), 3)}, KL to SFT on held-out posts "
              f"{_fmt(g('dpo_kl_first'), 3)} → {_fmt(g('dpo_kl_last'), 3)}, their gold score "
              f"{_fmt(g('dpo_gold_first'), 3)} → {_fmt(g('dpo_gold_last'), 3)}."]
    return lines


def _win(f: dict, key: str) -> str:
    if f.get(key) is None:
        return "n/a"
    return f"{100 * f[key]:.1f}% ({100 * f[key + '_lo']:.1f}-{100 * f[key + '_hi']:.1f})"


def terms(evaluated: dict | None) -> list[str]:
    """The report's terms, defined before the table where they first appear (markdown lines)."""
    judge = (evaluated or {}).get("judge")
    raters = "the reward model (the higher reward wins) or the gold score (the higher gold score wins; generated world only)"
    if judge:
        raters = (f"the reward model (the higher reward wins), the gold score (the higher gold score wins; generated "
                  f"world only) or the judge language model {judge} (asked which summary is better, in both orders)")
    return [
        "How to read it:",
        "",
        "- **before / after**: a stage's starting point (random init for pretraining, the pretrained model for SFT, "
        "chance for the reward model, the SFT policy for PPO) and its result; **from** names the record each figure "
        "is read from.",
        "- **HellaSwag acc_norm**: the share of HellaSwag rows on which the model gives the right one of 4 endings the "
        "highest length-normalised log-likelihood (chance 25%), scored two ways: **completion** style is ours "
        "(build-nanogpt's: context, then the ending; log-likelihood per ending token), **harness** style is "
        "lm-evaluation-harness's preprocessing (activity label and cleaned context; log-likelihood per character of "
        "the ending).",
        "- **gold score**: the generated world's hidden oracle score of a summary (synthetic.py), 0-1: does it name "
        "the post's person, problem and question, state no wrong facts, stay concise and finish. It is meaningful on "
        "generated posts only (n/a on real data). **missing details** and **wrong facts** are its parts: the post's "
        "key facts a summary leaves out, and facts it states that the post does not support.",
        "- **reward-model score**: the reward model's score of a summary, shifted so that reference summaries average "
        "0. **KL to SFT**: how far the PPO policy's next-token distributions are from the SFT model's, summed over "
        "a summary, in nats.",
        f"- **win rate**: the share of posts on which a rater prefers a model's summary to the other summary of the "
        f"same post (the human reference, or the SFT model's); a tie counts half. The rater is named in each row: "
        f"{raters}. In parentheses, the 95% Wilson score interval.",
        "- **ROUGE-1 / 2 / L**: F1 word overlap (unigrams, bigrams, longest common subsequence) with the reference "
        "summaries.",
        "",
    ]


def example_label(evaluated: dict | None, posts) -> str:
    """How the example post was chosen: by its index among the evaluated posts, never by its summaries."""
    evaluated = evaluated or {}
    i, split = evaluated.get("example_index"), evaluated.get("split") or "evaluated"
    of = f" of the {posts:,} {split} posts evaluated" if isinstance(posts, int) else f" of the {split} posts"
    if i == 0:
        return f"Example: the first{of}"
    if isinstance(i, int):
        return f"Example: post {i + 1}{of}"
    return f"Example: one{of}"


def format_report(report: dict, title: str = "Pipeline report") -> str:
    lines = [f"# {title}", "", *terms(report.get("eval")), "| metric | before | after | from |", "|---|---|---|---|"]
    lines += [f"| {m} | {b} | {a} | {src} |" for m, b, a, src in table_rows(report["figures"], report.get("eval"))]
    ex = report.get("example")
    if ex:
        gold = ex.get("gold") or {}
        g = lambda k: f" (gold {gold[k]:.2f})" if k in gold else ""
        post = " ".join(ex["post"].split())
        i = (report.get("eval") or {}).get("example_index")
        flag = f"eval_summaries.py --example {i}" + (", the default" if i == 0 else "") if isinstance(i, int) else \
            "eval_summaries.py --example"
        lines += ["", f"**{example_label(report.get('eval'), report['figures'].get('eval_posts'))}** "
                      f"({flag}: chosen by its position, not for how its summaries came out), "
                      f"r/{ex['subreddit']}, \"{ex['title']}\": {post}", "",
                  f"- reference{g('reference')}: {ex['reference']}",
                  f"- SFT{g('sft')}: {ex['sft']}",
                  f"- PPO{g('ppo')}: {ex['ppo']}"]
    times = report.get("times") or {}
    if times:
        lines += ["", "| stage | seconds |", "|---|---|"]
        lines += [f"| {stage} | {sec:.0f} |" for stage, sec in times.items()]
        lines += [f"| total | {sum(times.values()):.0f} |"]
    lines += policy_comparison(report["figures"], report.get("eval"))
    return "\n".join(lines) + "\n"


def main(cfg: Config) -> dict:
    # --- config
    run = Path(cfg.run_dir)
    if not run.is_dir():
        raise UserError(f"run folder not found: {run} (run ./run.sh first, or pass --run-dir)")
    out = Path(cfg.out) if cfg.out else run / "report.md"

    # --- figures
    t0 = time.time()
    report = collect(cfg)
    text = format_report(report, f"Pipeline report: {run.name}")

    # --- write
    write_text(out, text)
    write_json(out.with_suffix(".json"), report)
    print(text, end="")
    print(f"wrote {out} and {out.with_suffix('.json')} ({time.time() - t0:.1f}s)")
    return report


if __name__ == "__main__":
    cli_main(main, Config)
