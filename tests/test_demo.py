"""The demo: run.sh chains every stage through its real script (tiny size here), report.py turns the
stages' records into the report, plot.py turns JSONL logs into PNGs."""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import synthetic
import tldr
from checkpoints import load_checkpoint
from common import UserError
from conftest import ROOT, run_script
from model import GPT, build_model
from summaries import generate_summaries

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHECKPOINTS = ("pretrain.pt", "pretrain_hellaswag_val.json", "best_sft.pt", "reward_model.pt", "ppo_latest.pt",
               "dpo_latest.pt")
TRAINED = ("pretrain", "hellaswag", "sft", "reward_model", "ppo", "dpo", "eval")


def run_sh(args, cwd, timeout=1500, python=sys.executable):  # a generous timeout: the CPU may be shared
    env = {**os.environ, "PYTHON": python, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(["bash", str(ROOT / "run.sh"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """./run.sh tiny in an empty folder, as a user would run it: (folder, completed process)."""
    work = tmp_path_factory.mktemp("demo")
    proc = run_sh(["tiny"], work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, proc


def _tiny(tiny_run):
    """(work folder, checkpoints folder, run folder, report.json, its figures) of the tiny run."""
    work, _ = tiny_run
    ckpts, run = work / "checkpoints" / "tiny", work / "runs" / "tiny"
    report = json.loads((run / "report.json").read_text())
    return work, ckpts, run, report, report["figures"]


def test_run_sh_tiny_runs_every_stage_through_its_script(tiny_run):
    work, proc = tiny_run
    ckpts, run = work / "checkpoints" / "tiny", work / "runs" / "tiny"
    for name in CHECKPOINTS:
        assert (ckpts / name).is_file(), name
    for stage in ("pretrain", "sft", "reward_model", "ppo", "dpo"):
        assert (run / stage / "log.jsonl").stat().st_size > 0, stage
    # every stage ran through its own script, in order, up to summarize.py serving the PPO policy
    order = [proc.stdout.index(f"== {s}\n") for s in ("synthetic", "fineweb", *TRAINED, "summarize")]
    assert order == sorted(order)
    assert "== summarize\n" in proc.stdout


def test_run_sh_tiny_report_figures_are_finite_numbers(tiny_run):
    work, ckpts, run, report, figures = _tiny(tiny_run)
    expected = {"pretrain_val_loss_first", "pretrain_val_loss_last", "pretrain_hellaswag_first", "pretrain_hellaswag_last",
                "hellaswag_acc_norm", "sft_val_loss_first", "sft_val_loss_best", "sft_gold_first", "sft_gold_best",
                "rm_val_accuracy", "rm_gold_pearson", "rm_gold_spearman", "rm_gold_pair_accuracy",
                "rm_gold_pair_accuracy_wrong_fact", "rm_gold_pair_accuracy_other", "ppo_rm_score_first",
                "ppo_rm_score_last", "ppo_kl_first", "ppo_kl_last", "ppo_gold_first", "ppo_gold_last", "ppo_win_rate"}
    assert expected <= set(figures)
    bad = {k: v for k, v in figures.items() if not isinstance(v, (int, float)) or not math.isfinite(v)}
    assert not bad, bad


def test_run_sh_tiny_report_agrees_with_the_stage_records(tiny_run):
    work, ckpts, run, report, figures = _tiny(tiny_run)
    # the stages' own records, read independently
    pre = [json.loads(l) for l in (run / "pretrain" / "log.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in pre if r["kind"] == "eval" and "val_loss" in r]
    assert figures["pretrain_val_loss_first"] == val[0] and figures["pretrain_val_loss_last"] == val[-1]
    assert figures["pretrain_val_loss_last"] < figures["pretrain_val_loss_first"]
    assert figures["ppo_kl_first"] == pytest.approx(0.0, abs=1e-4)  # step 0 evaluates the SFT policy itself
    assert 0 <= figures["ppo_win_rate"] <= 1 and 0 <= figures["rm_val_accuracy"] <= 1
    hs = json.loads((ckpts / "pretrain_hellaswag_val.json").read_text())
    assert figures["hellaswag_acc_norm"] == hs["results"]["completion"]["acc_norm"]


def test_run_sh_tiny_report_recounts_the_reward_model_gold_agreement(tiny_run):
    work, ckpts, run, report, figures = _tiny(tiny_run)
    # the pairs where a summary states a fact the post does not, counted here from the generated files
    pairs = [json.loads(l) for l in (work / "data" / "synthetic_tiny" / "comparisons" / "valid.jsonl").open()][:500]
    stated = lambda row, key: bool(synthetic.gold_breakdown(row["prompt"], row[key].removeprefix("TL;DR:"))["wrong"])
    assert figures["rm_gold_wrong_fact_pairs"] == sum(stated(r, "chosen") or stated(r, "rejected") for r in pairs) > 0
    for key in ("rm_gold_pair_accuracy", "rm_gold_pair_accuracy_wrong_fact", "rm_gold_pair_accuracy_other"):
        assert 0 <= figures[key] <= 1, key
    # generated pairs are never gold ties, so the overall agreement is the two parts weighted by their sizes
    n, n_wrong = figures["rm_gold_summaries"] // 2, figures["rm_gold_wrong_fact_pairs"]
    assert figures["rm_gold_pair_accuracy"] == pytest.approx(
        (n_wrong * figures["rm_gold_pair_accuracy_wrong_fact"] + (n - n_wrong) * figures["rm_gold_pair_accuracy_other"]) / n)


def test_run_sh_tiny_report_test_gold_and_eval_rows_recomputed_from_checkpoints(tiny_run):
    work, ckpts, run, report, figures = _tiny(tiny_run)
    # SFT and PPO on the same test posts, both sides recomputed here from their checkpoints
    test_rows = [json.loads(l) for l in (work / "data" / "synthetic_tiny" / "tldr" / "test.jsonl").open()]
    assert figures["test_gold_posts"] == len(test_rows) >= 2
    posts = [tldr.parse_prompt(r["prompt"]) for r in test_rows]
    gold = {}
    for name, stage in (("best_sft.pt", "sft"), ("ppo_latest.pt", "ppo")):
        ckpt = load_checkpoint(ckpts / name, stage)
        model = build_model(ckpt, GPT, dropout=0.0)
        info = ckpt["tldr"]
        summaries = generate_summaries(model, posts, max_new_tokens=info["max_summary_tokens"],
                                            max_prompt_tokens=info["max_prompt_tokens"], template=info["template"])
        parts = [synthetic.gold_breakdown(r["prompt"], s) for r, s in zip(test_rows, summaries)]
        gold[stage] = np.array([b["score"] for b in parts])
        assert figures[f"test_gold_{stage}"] == pytest.approx(gold[stage].mean())
        assert figures[f"test_words_{stage}"] == pytest.approx(np.mean([b["words"] for b in parts]))
    diff = gold["ppo"] - gold["sft"]
    assert figures["test_gold_diff"] == pytest.approx(diff.mean(), abs=1e-12)
    assert figures["test_gold_se"] == pytest.approx(diff.std(ddof=1) / math.sqrt(len(diff)), abs=1e-12)
    # the evaluation stage's rows: its record, read independently; the gold win rate recounted from the
    # summaries recomputed above
    ev = json.loads((run / "eval" / "eval.json").read_text())
    assert ev["posts"] == len(test_rows) and report["eval"]["ppo"] == "ppo_latest" and report["eval"]["sft"] == "best_sft"
    for who, name in (("sft", "best_sft"), ("ppo", "ppo_latest")):
        assert figures[f"eval_rouge1_{who}"] == ev["models"][name]["rouge1"]
        assert 0 <= figures[f"eval_win_reward_model_reference_{who}"] <= 1
        assert figures[f"eval_win_gold_reference_{who}_lo"] <= figures[f"eval_win_gold_reference_{who}"] \
            <= figures[f"eval_win_gold_reference_{who}_hi"]
    wins = (diff > 0).sum() + 0.5 * (diff == 0).sum()
    assert figures["eval_win_gold_sft_ppo"] == pytest.approx(wins / len(diff))


def test_run_sh_tiny_report_table_and_plots(tiny_run):
    work, ckpts, run, report, figures = _tiny(tiny_run)
    # the markdown table: every row's "after" cell holds a number
    text = (run / "report.md").read_text()
    main_table = text.split("\n## ")[0]  # the sections after it have tables of their own
    rows = [line.split("|")[1:-1] for line in main_table.splitlines() if line.startswith("| ") and "---" not in line]
    table = [r for r in rows if len(r) == 4 and r[0].strip() != "metric"]
    assert len(table) >= 12
    for metric, _, after, _ in table:
        assert re.search(r"-?\d+\.\d+", after), (metric, after)
    example = report["example"]
    assert example["sft"] in text and example["ppo"] in text and set(example["gold"]) == {"reference", "sft", "ppo"}
    for png in ("loss.png", "hellaswag.png", "ppo.png"):
        assert (run / png).read_bytes()[:8] == PNG_MAGIC, png


def test_run_sh_tiny_report_compares_ppo_and_dpo(tiny_run):
    work, ckpts, run, report, figures = _tiny(tiny_run)
    assert load_checkpoint(ckpts / "dpo_latest.pt", "dpo")["stage"] == "dpo" and (ckpts / "best_dpo.pt").is_file()
    assert report["eval"]["dpo"] == "dpo_latest"
    ev = json.loads((run / "eval" / "eval.json").read_text())
    for who in ("ppo", "dpo"):
        assert figures[f"eval_kl_to_sft_{who}"] == ev["models"][f"{who}_latest"]["kl_to_sft"] >= 0
        assert figures[f"test_gold_{who}"] == ev["models"][f"{who}_latest"]["gold"]
    assert "kl_to_sft" not in ev["models"]["best_sft"]
    assert figures["dpo_val_accuracy_first"] == 0.5  # step 0 evaluates the SFT policy: every implicit reward is 0
    assert figures["dpo_kl_first"] == pytest.approx(0.0, abs=1e-5)
    section = (run / "report.md").read_text().split("## PPO vs DPO")[1]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert [c.strip() for c in rows[0]] == ["figure", "SFT", "PPO", "DPO"]
    kl = next(r for r in rows if r[0].strip().startswith("KL to SFT"))
    assert float(kl[2]) == pytest.approx(figures["eval_kl_to_sft_ppo"], abs=0.006)
    assert float(kl[3]) == pytest.approx(figures["eval_kl_to_sft_dpo"], abs=0.006)
    assert (run / "dpo.png").read_bytes()[:8] == PNG_MAGIC


def test_run_sh_rerun_skips_finished_stages(tiny_run):
    work, _ = tiny_run
    ckpts = work / "checkpoints" / "tiny"
    before = {n: (ckpts / n).stat().st_mtime_ns for n in CHECKPOINTS}
    calls = work / "calls.txt"
    proc = run_sh(["tiny"], work, python=fake_python(work, calls))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for stage in TRAINED:
        assert f"== {stage}: done before, skipped" in proc.stdout, stage
    assert scripts(calls) == ["summarize.py", "report.py", "plot.py"]   # serving and reporting only
    assert {n: (ckpts / n).stat().st_mtime_ns for n in CHECKPOINTS} == before


def fake_python(folder, calls):
    """An interpreter stand-in that records each command line and succeeds: what run.sh would run."""
    path = folder / "fake_python"
    path.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n')
    path.chmod(0o755)
    return str(path)


def scripts(calls) -> list[str]:
    return [line.split()[0].rsplit("/", 1)[-1] for line in calls.read_text().splitlines()] if calls.exists() else []


def test_run_sh_continues_an_interrupted_stage_and_force_redoes_all(tmp_path):
    """The bookkeeping alone, on a hand-made run folder: sft was interrupted after its latest checkpoint,
    so it continues with --resume and the stages after it run; --force redoes every stage fresh."""
    ck, run = tmp_path / "checkpoints" / "tiny", tmp_path / "runs" / "tiny"
    for d in (ck, run / ".done", run / "sft", tmp_path / "data" / "synthetic_tiny", tmp_path / "data" / "synthetic_tiny_shards"):
        d.mkdir(parents=True)
    (tmp_path / "data" / "synthetic_tiny" / "manifest.json").write_text("{}")
    (tmp_path / "data" / "synthetic_tiny_shards" / "progress.json").write_text('{"complete": true}')
    for name in ("pretrain.pt", "pretrain_hellaswag_val.json", "sft_latest.pt"):
        (ck / name).write_bytes(b"x")
    for stage in ("pretrain", "hellaswag"):
        (run / ".done" / stage).touch()
    (run / "sft" / "log.jsonl").write_text('{"kind": "train", "step": 0, "loss": 5.0}\n')

    calls = tmp_path / "calls.txt"
    proc = run_sh(["tiny"], tmp_path, python=fake_python(tmp_path, calls))
    assert proc.returncode == 0, proc.stderr
    assert scripts(calls) == ["sft.py", "reward_model.py", "ppo.py", "dpo.py", "eval_summaries.py", "summarize.py", "report.py",
                              "plot.py"]
    lines = calls.read_text().splitlines()
    assert "--resume" in lines[0].split() and "--resume" not in lines[1].split()
    assert (run / "sft" / "log.jsonl").exists()                       # a continued run keeps its log
    assert "== sft: continuing from checkpoints/tiny/sft_latest.pt" in proc.stdout

    calls.unlink()
    proc = run_sh(["tiny", "--force"], tmp_path, python=fake_python(tmp_path, calls))
    assert proc.returncode == 0, proc.stderr
    assert scripts(calls) == ["pretrain.py", "hellaswag.py", "sft.py", "reward_model.py", "ppo.py", "dpo.py",
                              "eval_summaries.py", "summarize.py", "report.py", "plot.py"]
    assert not any("--resume" in line.split() for line in calls.read_text().splitlines())
    assert not (run / "sft" / "log.jsonl").exists()                   # a fresh run does not append to the old log
    assert sorted(p.name for p in (ck / "previous").iterdir()) == ["pretrain.pt", "pretrain_hellaswag_val.json",
                                                                  "sft_latest.pt"]
    assert "== --force: the earlier run's 3 checkpoint files moved to checkpoints/tiny/previous/" in proc.stdout

    # the forced run interrupted before its stages saved anything: a rerun resumes none of the earlier run's files
    for marker in (run / ".done").iterdir():
        marker.unlink()
    calls.unlink()
    proc = run_sh(["tiny"], tmp_path, python=fake_python(tmp_path, calls))
    assert proc.returncode == 0 and "continuing from" not in proc.stdout, proc.stdout
    assert not any("--resume" in line.split() for line in calls.read_text().splitlines())


def test_run_sh_bad_arguments_are_one_line_errors(tmp_path):
    for args, msg in ((["huge"], "unknown argument 'huge'"), ([], "give a preset"),
                      (["tiny", "--name", "a/b"], "--name may hold"), (["tiny", "--name", ".."], "--name may hold"),
                      (["tiny", "--name=."], "--name may hold")):
        proc = run_sh(args, tmp_path)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and msg in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # nothing was written


# -----------------------------------------------------------------------------
# report.py and plot.py on a recorded log (no checkpoints)

def write_logs(run_dir):
    """Logs in the stages' format, written by the stages' own logger; pretrain's was resumed at step 2."""
    from training import RunLogger
    pre = RunLogger(run_dir / "pretrain", {"hellaswag_limit": 200})
    pre.log({"val_loss": 10.8, "hellaswag_acc_norm": 0.25, "hellaswag_harness_acc_norm": 0.26}, 0, "eval", echo=False)
    for step, loss in enumerate([10.0, 8.0, 6.5, 5.0]):
        pre.log({"loss": loss, "tok_per_s": 1000.0 + step}, step, echo=False)
    pre.log({"loss": 99.0}, 2, echo=False)   # the resumed run redid step 2...
    pre.log({"loss": 6.0}, 2, echo=False)    # ...and its last record counts
    pre.log({"val_loss": 4.2, "hellaswag_acc_norm": 0.41, "hellaswag_harness_acc_norm": 0.44}, 4, "eval", echo=False)
    pre.log({"samples": ["text"]}, 4, "sample", echo=False)
    ppo = RunLogger(run_dir / "ppo", {"eval_prompts": 16})
    ppo.log({"eval_rm_score": -0.5, "eval_kl": 0.0, "eval_gold": 0.4, "sft_gold": 0.4, "eval_win_rate": 0.5}, 0, "eval", echo=False)
    for step in range(3):
        ppo.log({"rm_score": -0.5 + 0.3 * step, "score": -0.6 + 0.3 * step, "kl": 0.5 * step}, step, echo=False)
    ppo.log({"eval_rm_score": 0.3, "eval_kl": 1.5, "eval_gold": 0.55, "sft_gold": 0.4, "eval_win_rate": 0.75}, 3, "eval", echo=False)
    with open(run_dir / "pretrain" / "log.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 5, "loss"')  # torn by a kill mid-write


def test_report_from_recorded_logs(tmp_path):
    import report
    from common import config_from
    run = tmp_path / "run"
    write_logs(run)
    (run / "times.tsv").write_text("pretrain\t30\nsft\t12\npretrain\t5\n")
    cfg = config_from(report.Config, run_dir=str(run), ckpt_dir=str(tmp_path / "none"))
    out = report.collect(cfg)
    f = out["figures"]
    assert (f["pretrain_val_loss_first"], f["pretrain_val_loss_last"]) == (10.8, 4.2)
    assert (f["pretrain_train_loss_first"], f["pretrain_train_loss_last"]) == (10.0, 5.0)
    assert (f["pretrain_hellaswag_first"], f["pretrain_hellaswag_last"]) == (0.25, 0.41)
    assert f["pretrain_hellaswag_rows"] == 200 and f["pretrain_steps"] == 4
    assert (f["ppo_rm_score_first"], f["ppo_rm_score_last"], f["ppo_kl_last"]) == (-0.5, 0.3, 1.5)
    assert (f["ppo_gold_first"], f["ppo_gold_last"], f["ppo_win_rate"]) == (0.4, 0.55, 0.75)
    assert (f["ppo_train_kl_first"], f["ppo_train_kl_last"]) == (0.0, 1.0)
    assert f["sft_val_loss_best"] is None and f["rm_val_accuracy"] is None and out["example"] is None
    assert out["times"] == {"pretrain": 35.0, "sft": 12.0}

    text = report.format_report(out)
    assert "| pretrain: val loss | 10.8000 | 4.2000 |" in text
    assert "| PPO: win rate over SFT by the reward model |  | 75.0% |" in text
    assert "| SFT: val loss (summary tokens) | n/a | n/a |" in text   # a stage not run yet: n/a, no failure
    assert "| total | 47 |" in text


def test_plot_from_recorded_logs(tmp_path):
    import plot
    run = tmp_path / "run"
    write_logs(run)
    proc = run_script(["plot.py", "--run-dir", run])
    assert proc.returncode == 0, proc.stderr
    for png in ("loss.png", "hellaswag.png", "ppo.png"):
        data = (run / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, png
    # only what a log holds is drawn: a pretraining log alone gives no PPO plot
    out = tmp_path / "only_pretrain"
    made = plot.main(plot.Config(logs=[str(run / "pretrain" / "log.jsonl")], out_dir=str(out)))
    assert sorted(p.name for p in made) == ["hellaswag.png", "loss.png"]
    # a log with nothing to plot is a user error, not an empty folder of plots
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "log.jsonl").write_text('{"kind": "sample", "step": 0, "samples": []}\n')
    with pytest.raises(UserError, match="nothing to plot"):
        plot.main(plot.Config(logs=[str(tmp_path / "empty" / "log.jsonl")], out_dir=str(tmp_path / "e")))
    assert not (tmp_path / "e").exists()


def test_read_log_keeps_the_last_record_of_a_step(tmp_path):
    from plot import series
    from training import read_log
    write_logs(tmp_path)
    records = read_log(tmp_path / "pretrain" / "log.jsonl")
    assert series(records, "loss", "train") == [(0, 10.0), (1, 8.0), (2, 6.0), (3, 5.0)]
    assert read_log(tmp_path / "missing.jsonl") == []


def test_report_reads_the_evaluation_stage_record(tmp_path):
    """An eval.json as eval_summaries.py writes it (hand-made values): SFT is its --sft model, PPO the
    checkpoint of stage ppo; their rows and the example come from it, nothing is recomputed."""
    import report
    from common import config_from
    win = lambda rate, lo, hi, n=400: {"wins": 0, "ties": 0, "losses": 0, "n": n, "win_rate": rate, "ci95": [lo, hi]}
    common = {"words": 20.0, "eos_rate": 0.9, "copied_trigrams": 0.25, "gold_words": 20.0, "gold_missing": 1.0,
              "gold_wrong": 0.5}
    record = {"data": "data/synthetic/tldr", "split": "test", "posts": 400, "sft": "best_sft", "judge": None,
              "gold": True, "reward_model_vs_gold": {"rm_gold_pearson": 0.5},
              "models": {
                  "best_sft": {**common, "stage": "sft", "rouge1": 0.31, "rouge2": 0.11, "rougeL": 0.25, "gold": 0.40,
                               "win_rates": {"reward_model": {"reference": win(0.3, 0.26, 0.35)}}},
                  "ppo_latest": {**common, "stage": "ppo", "rouge1": 0.29, "rouge2": 0.10, "rougeL": 0.24, "gold": 0.46,
                                 "eos_rate": 0.5, "vs_sft": {"score": {"diff": 0.06, "se": 0.02}},
                                 "win_rates": {"reward_model": {"reference": win(0.45, 0.40, 0.50), "sft": win(0.8, 0.76, 0.84)},
                                               "gold": {"reference": win(0.2, 0.16, 0.24), "sft": win(0.6, 0.55, 0.65)}}}},
              "example": {"post": "p", "title": "t", "subreddit": "s", "reference": "r",
                          "summaries": {"best_sft": "a", "ppo_latest": "b"},
                          "gold": {"reference": 0.9, "best_sft": 0.4, "ppo_latest": 0.5}}}
    (tmp_path / "run" / "eval").mkdir(parents=True)
    (tmp_path / "run" / "eval" / "eval.json").write_text(json.dumps(record))
    out = report.collect(config_from(report.Config, run_dir=str(tmp_path / "run"), ckpt_dir=str(tmp_path / "none")))
    f = out["figures"]
    assert (f["eval_rouge1_sft"], f["eval_rouge1_ppo"], f["test_gold_sft"], f["test_gold_ppo"]) == (0.31, 0.29, 0.40, 0.46)
    assert (f["test_gold_diff"], f["test_gold_se"], f["test_gold_posts"], f["rm_gold_pearson"]) == (0.06, 0.02, 400, 0.5)
    assert out["example"] == {"post": "p", "title": "t", "subreddit": "s", "reference": "r", "sft": "a", "ppo": "b",
                              "gold": {"reference": 0.9, "sft": 0.4, "ppo": 0.5}}
    text = report.format_report(out)
    assert "| summaries: ROUGE-1 / 2 / L against the references | 0.310 / 0.110 / 0.250 | 0.290 / 0.100 / 0.240 |" in text
    assert "| win rate against the references, by the reward model | 30.0% (26.0-35.0) | 45.0% (40.0-50.0) |" in text
    assert "| PPO: win rate over SFT, by the gold score (oracle) |  | 60.0% (55.0-65.0) |" in text
    assert "| win rate against the references, by the gold score (oracle) | n/a | 20.0% (16.0-24.0) |" in text
    assert "| summaries: ended with EOS / trigrams copied from the post | 90.0% / 25.0% | 50.0% / 25.0% |" in text
    assert "judge" not in text                                          # no judge ran: no judge rows
    assert "PPO - SFT +0.0600 (standard error 0.0200)" in text


def test_report_cli_errors(tmp_path):
    proc = run_script(["report.py", "--run-dir", tmp_path / "nope"])
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: run folder not found: {tmp_path / 'nope'} " \
                                                           f"(run ./run.sh first, or pass --run-dir)"
