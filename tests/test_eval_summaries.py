"""eval_summaries.py: win rates and their intervals against hand values, a judge LM of another tokenizer
asked in both orders (checked against scoring the texts directly with transformers), ROUGE against hand
counts, the summaries cache, user errors, the real TL;DR posts end to end, and the gold score as an
oracle judge on the generated world's small chain."""
import json
import math

import numpy as np
import pytest
import torch

import eval_summaries as es
import tldr
from checkpoints import load_reward_model, save_checkpoint
from common import UserError, config_from
from conftest import ROOT, rig_unigram, run_script
from model import GPT, GPTConfig, ScoreModel
from summaries import decode_summary, gold_scores, score_texts

REALDATA = ROOT.parent / "shared" / "realdata" / "tldr"
INFO = tldr.template_info(max_prompt_tokens=200, max_summary_tokens=24)


def _lm(seed: int) -> GPT:
    """A tiny model with peaked logits (as in test_summarize): its greedy summaries depend on its weights."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=256, n_layer=1, n_head=2, n_embd=32))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(25)
        model.transformer.ln_f.weight.normal_()
    return model.eval()


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_tiny")
    save_checkpoint(out / "best_sft.pt", stage="sft", model=_lm(1), tldr=INFO)
    save_checkpoint(out / "ppo_latest.pt", stage="ppo", model=_lm(2), tldr=INFO)
    torch.manual_seed(3)
    save_checkpoint(out / "reward_model.pt", stage="reward_model", model=ScoreModel(_lm(1).config), tldr=INFO,
                    reward_norm={"bias_shift": 0.0, "std": 1.0})
    return out


def _cfg(ckpts, out, **overrides):
    values = dict(ckpt_dir=str(ckpts), out_dir=str(out), device="cpu", dtype="float32", batch_size=16)
    return config_from(es.Config, None, None, **{**values, **overrides})


# -----------------------------------------------------------------------------
# win rates, intervals, the two orders

def test_wilson_interval_and_win_rates_against_hand_values():
    # textbook Wilson intervals: 50 of 100 -> (0.4038, 0.5962); 0 of 10 -> (0, 0.2775); 10 of 10 -> (0.7225, 1)
    assert es.wilson_interval(0.5, 100) == pytest.approx((0.40383, 0.59617), abs=1e-5)
    assert es.wilson_interval(0.0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert es.wilson_interval(1.0, 10) == pytest.approx((0.72247, 1.0), abs=1e-5)
    # 6 wins, 2 ties, 2 losses: (6 + 1) / 10; Wilson at p 0.7, n 10 by hand: center (0.7 + 1.92073 / 10) / 1.38415,
    # half-width 1.95996 / 1.38415 * sqrt(0.021 + 3.84146 / 400)
    w = es.win_rate([1.0] * 6 + [0.5] * 2 + [0.0] * 2)
    assert (w["wins"], w["ties"], w["losses"], w["n"]) == (6, 2, 2, 10) and w["win_rate"] == pytest.approx(0.7)
    center, half = (0.7 + 1.920729 / 10) / 1.384146, 1.959964 / 1.384146 * math.sqrt(0.021 + 3.841459 / 400)
    assert w["ci95"] == pytest.approx([center - half, center + half], abs=1e-5)
    assert es.pointwise_outcomes([0.3, 0.1, 0.2], [0.1, 0.3, 0.2]) == [1.0, 0.0, 0.5]
    # [item, order, answer]: order 0 asks with x as A, order 1 with x as B
    logp = torch.tensor([[[-1.0, -2.0], [-2.0, -1.0]],    # x preferred in both orders: a win
                         [[-2.0, -1.0], [-1.0, -2.0]],    # the other in both: a loss
                         [[-1.0, -2.0], [-1.0, -2.0]],    # A both times (position bias): the orders disagree
                         [[-2.0, -1.0], [-2.0, -1.0]],    # B both times
                         [[-1.0, -1.0], [-2.0, -1.0]]])   # no preference in one order
    assert es.combine_orders(logp) == [1.0, 0.0, 0.5, 0.5, 0.5]


def build_judge(out, texts, first_position=False):
    """A byte-level BPE trained on `texts` (no BOS added: the bridge prepends one), and a tiny random
    GPT-2-architecture LM over it. first_position: the final layer norm outputs a constant vector, so every
    position predicts the same distribution, in which the tokens of " A" beat those of " B"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1500, special_tokens=["<s>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>", pad_token="<pad>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(hf_tok), n_positions=2048, n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    if first_position:
        a, b = (set(hf_tok(x, add_special_tokens=False)["input_ids"]) for x in es.ANSWERS)
        logits = torch.zeros(len(hf_tok))
        logits[list(a - b)], logits[list(b - a)] = 5.0, -5.0
        rig_unigram(model, logits)
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def judge_posts(synthetic_dir):
    rows = tldr.load_sft(str(synthetic_dir / "tldr"), "test")[:4]
    return [r.post for r in rows], [r.summary for r in rows]


@pytest.fixture(scope="module")
def judge_dirs(judge_posts, tmp_path_factory):
    posts, refs = judge_posts
    texts = [es.judge_question(p, r, r) + "\n\n" + es.ANSWER_PREFIX + " A B" for p, r in zip(posts, refs)] * 3
    out = tmp_path_factory.mktemp("judges")
    return build_judge(out / "random", texts), build_judge(out / "first", texts, first_position=True)


def _direct_answer_logprob(model, tokenizer, context, answer):
    """log p(answer | context) by transformers alone: BOS + the context's tokens, then the answer's (the
    answers start with a space, where the byte-level pre-tokenizer splits, so no token straddles them)."""
    ctx = [tokenizer.bos_token_id] + tokenizer(context, add_special_tokens=False)["input_ids"]
    ans = tokenizer(answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = model(torch.tensor([ctx + ans])).logits[0].float().log_softmax(-1)
    return sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(ans))


def test_judge_lm_of_another_tokenizer_asks_both_orders(judge_dirs, judge_posts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    posts, refs = judge_posts
    xs, ys = refs, [" ".join(r.split()[:5]) for r in refs]   # the references against cut copies of them
    judge = es.load_judge(_cfg(tmp_path, tmp_path, judge=str(judge_dirs[0]), judge_device="cpu",
                               judge_dtype="float32"), None)
    asked = []
    real = judge.logprobs
    judge.logprobs = lambda contexts, answers: (asked.append(list(zip(contexts, answers))), real(contexts, answers))[1]
    outcomes = es.judge_outcomes(judge, posts, xs, ys)

    # both orders, both answers, for every post
    (seen,) = asked
    assert len(seen) == 4 * len(posts)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(judge_dirs[0]), AutoTokenizer.from_pretrained(judge_dirs[0])
    expected = []
    for i, (post, x, y) in enumerate(zip(posts, xs, ys)):
        first, second = (es.judge_question(post, a, b) + "\n\n" + es.ANSWER_PREFIX for a, b in ((x, y), (y, x)))
        assert seen[4 * i:4 * i + 4] == [(first, " A"), (first, " B"), (second, " A"), (second, " B")]
        lp = [[_direct_answer_logprob(model, tokenizer, c, a) for a in es.ANSWERS] for c in (first, second)]
        x_first, x_second = lp[0][0] > lp[0][1], lp[1][1] > lp[1][0]   # x is A, then x is B
        y_first, y_second = lp[0][1] > lp[0][0], lp[1][0] > lp[1][1]
        expected.append(1.0 if x_first and x_second else 0.0 if y_first and y_second else 0.5)
    assert outcomes == expected
    # identical summaries are a tie without a question
    asked.clear()
    assert es.judge_outcomes(judge, posts[:2], xs[:2], xs[:2]) == [0.5, 0.5] and asked == []

    # a judge that always answers A: every post a tie between the orders, a win rate of exactly 50%
    first_judge = es.load_judge(_cfg(tmp_path, tmp_path, judge=str(judge_dirs[1]), judge_device="cpu",
                                     judge_dtype="float32"), None)
    sums, _ = first_judge.logprobs([es.judge_question(posts[0], xs[0], ys[0]) + "\n\nPreferred:"] * 2, list(es.ANSWERS))
    assert sums[0] > sums[1] + 5
    w = es.win_rate(es.judge_outcomes(first_judge, posts, xs, ys))
    assert w["win_rate"] == 0.5 and w["ties"] == len(posts)


# -----------------------------------------------------------------------------
# text figures

def test_rouge_and_copied_trigrams_against_hand_counts():
    from summaries import rouge_scorer
    post = tldr.Post("The cat sat on the mat all day, and the dog barked at it.")
    ref, pred = "the cat sat on the mat", "The cat lay on the mat."
    f = es.text_figures([post], [pred], [ref], rouge_scorer())
    # unigrams: 5 of 6 shared; bigrams: "the cat", "on the", "the mat" of 5; longest common subsequence: 5 of 6
    assert f["rouge1"] == pytest.approx(5 / 6) and f["rouge2"] == pytest.approx(3 / 5) and f["rougeL"] == pytest.approx(5 / 6)
    assert f["words"] == 6
    # trigrams of the prediction: "the cat lay", "cat lay on", "lay on the", "on the mat": only the last is in the post
    assert f["copied_trigrams"] == pytest.approx(1 / 4)
    assert es.copied_trigram_share("a b c", "two words") is None


# -----------------------------------------------------------------------------
# the stage

def _greedy(model, post):
    """Independent reference: the training prompt, the plain KV-cache generate, decoded up to EOS."""
    ids, _ = tldr.prompt_tokens(post, min(INFO["max_prompt_tokens"], model.config.block_size - INFO["max_summary_tokens"]),
                                INFO["template"])
    tokens, _, mask = model.generate(torch.tensor([ids]), max_new_tokens=INFO["max_summary_tokens"], temperature=0.0)
    new = tokens[0][mask[0].bool()].tolist()
    return decode_summary(new), 50256 in new


def test_stage_figures_cache_and_rerun(tiny_ckpts, synthetic_dir, tmp_path, monkeypatch):
    data = str(synthetic_dir / "tldr")
    cfg = _cfg(tiny_ckpts, tmp_path / "eval", data=data, posts=6)
    record = es.main(cfg)
    rows = tldr.load_sft(data, "test")[:6]
    posts, refs = [r.post for r in rows], [r.summary for r in rows]
    assert record["posts"] == 6 and record["gold"] and record["sft"] == "best_sft"
    assert list(record["models"]) == ["best_sft", "ppo_latest"]

    cache = [json.loads(line) for line in (tmp_path / "eval" / "summaries.jsonl").read_text().splitlines()]
    assert len(cache) == 12 and {"post_id", "model", "sha256", "summary", "ended"} <= set(cache[0])
    mine = {}
    for name, seed in (("best_sft", 1), ("ppo_latest", 2)):
        got = {r["post_id"]: (r["summary"], r["ended"]) for r in cache if r["model"] == name}
        mine[name] = [_greedy(_lm(seed), p) for p in posts]
        assert [got[es.post_id(p)] for p in posts] == mine[name]
        assert record["models"][name]["eos_rate"] == pytest.approx(np.mean([e for _, e in mine[name]]))

    # the reward model's and the gold score's win rates, recounted from their scores
    rm, ckpt = load_reward_model(str(tiny_ckpts / "reward_model.pt"))
    r = {n: score_texts(rm, posts, [s for s, _ in mine[n]], ckpt["tldr"]).numpy() for n in mine}
    r_ref = score_texts(rm, posts, refs, ckpt["tldr"]).numpy()
    ppo = record["models"]["ppo_latest"]
    assert ppo["win_rates"]["reward_model"]["reference"]["wins"] == int((r["ppo_latest"] > r_ref).sum())
    assert ppo["win_rates"]["reward_model"]["sft"]["wins"] == int((r["ppo_latest"] > r["best_sft"]).sum())
    assert "sft" not in record["models"]["best_sft"]["win_rates"]["reward_model"]   # not against itself
    g = {n: np.array(gold_scores(posts, [s for s, _ in mine[n]])) for n in mine}
    w = ppo["win_rates"]["gold"]["sft"]
    assert (w["wins"], w["losses"]) == (int((g["ppo_latest"] > g["best_sft"]).sum()), int((g["ppo_latest"] < g["best_sft"]).sum()))
    d = g["ppo_latest"] - g["best_sft"]
    assert ppo["vs_sft"]["score"]["diff"] == pytest.approx(d.mean(), abs=1e-12)
    assert ppo["vs_sft"]["score"]["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(len(d)), abs=1e-12)
    assert record["reference"]["gold"] == pytest.approx(np.mean(gold_scores(posts, refs)))
    assert record["example"]["summaries"]["ppo_latest"] == mine["ppo_latest"][0][0]
    table = (tmp_path / "eval" / "eval.md").read_text()
    assert "| ROUGE-1 / 2 / L |" in table and "win rate vs SFT, gold score" in table

    # a rerun generates nothing; a changed checkpoint or more posts generate only what the cache lacks
    calls = []
    real = es.summarize_with
    monkeypatch.setattr(es, "summarize_with", lambda path, stages, ps, rt, bs: (calls.append((path.name, len(ps))),
                                                                               real(path, stages, ps, rt, bs))[1])
    again = es.main(cfg)
    assert calls == [] and {k: v for k, v in again.items() if k != "seconds"} == \
        {k: v for k, v in record.items() if k != "seconds"}
    save_checkpoint(tiny_ckpts / "ppo_latest.pt", stage="ppo", model=_lm(4), tldr=INFO)
    es.main(config_from(es.Config, None, None, **{**cfg.__dict__, "posts": 8}))
    assert calls == [("best_sft.pt", 2), ("ppo_latest.pt", 8)]
    save_checkpoint(tiny_ckpts / "ppo_latest.pt", stage="ppo", model=_lm(2), tldr=INFO)


def test_user_errors(tiny_ckpts, synthetic_dir, tmp_path):
    data = str(synthetic_dir / "tldr")
    proc = run_script(["eval_summaries.py", "--ckpt-dir", tiny_ckpts, "--policies", "nope.pt", "--data", data,
                       "--out-dir", tmp_path])
    assert proc.returncode == 2 and proc.stderr == f"error: policy checkpoint not found: {tiny_ckpts / 'nope.pt'}\n"
    with pytest.raises(UserError, match="--posts must be positive, got 0"):
        es.main(_cfg(tiny_ckpts, tmp_path, data=data, posts=0))
    proc = run_script(["eval_summaries.py", "--ckpt-dir", tiny_ckpts, "--data", data, "--out-dir", tmp_path,
                       "--judge", tmp_path / "no_judge", "--device", "cpu"])
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: cannot load judge '{tmp_path / 'no_judge'}'")
    assert proc.stderr.count("\n") == 1
    with pytest.raises(UserError, match="--rm checkpoint not found"):
        es.main(_cfg(tiny_ckpts, tmp_path, data=data, rm="missing.pt"))
    assert not (tmp_path / "eval.json").exists()


def test_real_tldr_posts_end_to_end(tiny_ckpts, tmp_path):
    from rouge_score import rouge_scorer
    record = es.main(_cfg(tiny_ckpts, tmp_path, data=str(REALDATA), split="valid", posts=100))
    rows = [json.loads(line) for line in (REALDATA / "valid.jsonl").open()]
    assert record["posts"] == len(rows) == 20 and record["gold"] is False      # real posts: no gold score
    cache = {(r["model"], r["post_id"]): r["summary"] for r in map(json.loads, (tmp_path / "summaries.jsonl").open())}
    posts = [tldr.parse_prompt(r["prompt"]) for r in rows]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for name in ("best_sft", "ppo_latest"):
        m = record["models"][name]
        assert "gold" not in m and set(m["win_rates"]) == {"reward_model"}
        scores = [scorer.score(r["label"], cache[(name, es.post_id(p))]) for r, p in zip(rows, posts)]
        for key in ("rouge1", "rouge2", "rougeL"):
            assert m[key] == pytest.approx(np.mean([s[key].fmeasure for s in scores]))
    assert record["reference"]["words"] == pytest.approx(np.mean([len(r["label"].split()) for r in rows]))


def test_oracle_judge_ranks_ppo_and_sft_as_the_paired_gold_difference(small_sft_ckpt, small_rm_ckpt, small_ppo_run,
                                                                      synthetic_dir, tmp_path):
    # the suite's small chain (its reward model learned the world's variant comparisons): measured on 200
    # test posts gold 0.128 -> 0.087 (-0.041 +- 0.017), oracle win rate over SFT 0.425 (0.359-0.494)
    ppo_dir = small_ppo_run[0]
    record = es.main(config_from(es.Config, None, None, policies=[str(small_sft_ckpt), str(ppo_dir / "ppo_latest.pt")],
                                 sft=str(small_sft_ckpt), rm=str(small_rm_ckpt), data=str(synthetic_dir / "tldr"),
                                 comparisons=str(synthetic_dir / "comparisons"), rm_pairs=100, posts=200,
                                 out_dir=str(tmp_path), device="cpu", batch_size=100))
    ppo = record["models"]["ppo_latest"]
    win, diff = ppo["win_rates"]["gold"]["sft"], ppo["vs_sft"]["score"]
    print(f"small chain, 200 test posts: gold {record['models']['best_sft']['gold']:.3f} -> {ppo['gold']:.3f} "
          f"({diff['diff']:+.3f} +- {diff['se']:.3f}); oracle win rate over SFT {win['win_rate']:.3f} {win['ci95']}; "
          f"RM win rate {ppo['win_rates']['reward_model']['sft']['win_rate']:.3f}")
    assert win["win_rate"] != 0.5 and (win["win_rate"] > 0.5) == (diff["diff"] > 0)
    assert record["reward_model_vs_gold"]["rm_gold_summaries"] == 200


def test_correlations_and_paired_difference_against_references():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(size=50)
    y[:10] = x[:10]
    assert es.pearson(torch.tensor(x), torch.tensor(y)) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    # Spearman by hand: ranks with ties averaged, then Pearson of the ranks
    a, b = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 3.0, 2.0, 4.0])
    assert es.spearman(a, b) == pytest.approx(0.8)   # 1 - 6 * 2 / (4 * 15)
    assert es.average_ranks(torch.tensor([0.5, 0.2, 0.5, 0.9])).tolist() == [2.5, 1.0, 2.5, 4.0]
    assert es.pearson(torch.ones(3), a[:3]) is None    # a constant has no correlation
    # order agreement: pair 3 is a gold tie (left out); pairs 1, 2 agree, pair 4 does not
    rc, rr = torch.tensor([1.0, 0.3, 5.0, 0.0]), torch.tensor([0.0, 0.1, 4.0, 1.0])
    gc, gr = torch.tensor([0.9, 0.6, 0.5, 0.7]), torch.tensor([0.1, 0.5, 0.5, 0.2])
    assert es.gold_agreement(rc, rr, gc, gr) == pytest.approx(2 / 3)
    # differences 0.2, 0.0, -0.3: mean -1/30; deviations 7/30, 1/30, -8/30 give a sample variance of
    # (49 + 1 + 64) / 900 / 2, so a standard error of sqrt(114 / 1800 / 3)
    diff, se = es.paired_difference([0.5, 0.2, 0.9], [0.7, 0.2, 0.6])
    assert diff == pytest.approx(-1 / 30) and se == pytest.approx(math.sqrt(114 / 1800 / 3))
    assert es.paired_difference([0.4], [0.5]) == (pytest.approx(0.1), None)
    assert es.paired_difference([], []) == (None, None)
