"""reward_model.py: the Bradley-Terry loss, packed chosen/rejected scoring against sequences scored
alone, exact resume, reward normalisation, user errors, the --score CLI, and that a small reward model
learns the generated preferences (accuracy against noisy labels, rank correlation with the gold score)."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reward_model as rm
import synthetic
import tldr
from checkpoints import load_checkpoint, load_reward_model, save_checkpoint
from common import UserError, cli_main, config_from
from conftest import run_script, run_torchrun, skip_without_cpu_fp16
from model import GPT, GPTConfig, ScoreModel, TOKENIZER_VOCAB, left_pad, right_pad
from summaries import score_texts, score_tokens

TINY_INFO = tldr.template_info(max_prompt_tokens=64, max_summary_tokens=24)


def _tiny_score_model(seed=0) -> ScoreModel:
    torch.manual_seed(seed)
    model = ScoreModel(GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():  # a head that spreads rewards widely, so that any mix-up of positions shows
        model.score_head.weight.normal_(0, 1.0)
    return model


def _random_triples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))
    tokens = lambda k: torch.randint(0, TOKENIZER_VOCAB, (k,), generator=g).tolist()
    return [(tokens(lens(3, 30)), tokens(lens(1, 12)), tokens(lens(1, 12))) for _ in range(n)]


# -----------------------------------------------------------------------------
# the loss

def test_bradley_terry_loss_hand_values_and_swapping_flips_the_gradient():
    rc, rr = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5])
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2
    assert rm.bradley_terry_loss(rc, rr).item() == pytest.approx(expected, abs=1e-6)

    # through a model: d(-logsig(m))/dθ = -sig(-m) ∇m, swapped d(-logsig(-m))/dθ = +sig(m) ∇m
    model = _tiny_score_model()
    scorer = rm.PairScorer(model)
    triple = _random_triples(1, seed=1)

    def grads(swap):
        model.zero_grad()
        rc, rr = rm.pair_rewards(scorer, triple, "cpu")
        (rm.bradley_terry_loss(rr, rc) if swap else rm.bradley_terry_loss(rc, rr)).backward()
        return (rc - rr).item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    m, g = grads(False)
    _, g_swapped = grads(True)
    assert g.abs().max() > 0
    ratio = torch.sigmoid(torch.tensor(m)) / torch.sigmoid(torch.tensor(-m))
    torch.testing.assert_close(g_swapped, -ratio * g, rtol=1e-3, atol=1e-5 * g.abs().max().item())
    assert F.cosine_similarity(g, g_swapped, dim=0) < -0.9999

    # in a batch, the loss pushes every chosen reward up and every rejected reward down
    rc, rr = torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)
    rm.bradley_terry_loss(rc, rr).backward()
    assert (rc.grad < 0).all() and (rr.grad > 0).all()


# -----------------------------------------------------------------------------
# scoring: packed pairs, padded batches and sequences alone agree

def test_packed_pairs_equal_each_sequence_scored_alone_left_or_right_padded():
    model = _tiny_score_model()
    triples = _random_triples(5)
    seqs = [p + c for p, c, _ in triples] + [p + r for p, _, r in triples]
    with torch.no_grad():
        alone = torch.stack([model.reward(torch.tensor([s]))[0] for s in seqs])
        right = model.reward(*right_pad(seqs))
        left = model.reward(*left_pad(seqs))
        rc, rr = rm.pair_rewards(rm.PairScorer(model), triples, "cpu")
        one_by_one = [rm.pair_rewards(rm.PairScorer(model), [t], "cpu") for t in triples]
    assert alone.std() > 0.1  # rewards differ: a mix-up of rows or positions could not hide
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([rc, rr]), alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack([torch.cat(p) for p in one_by_one]), torch.stack([rc, rr], 1),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(score_tokens(model, seqs, batch_size=3), alone, atol=1e-5, rtol=0)
    # several summaries under one prompt (best-of-n scoring): each still scores as if alone
    rows = [(p, [c, r, triples[(i + 1) % 5][1]]) for i, (p, c, r) in enumerate(triples)]
    with torch.no_grad():
        packed = rm.PairScorer(model)(**rm.pack_summaries(rows))
        third = torch.stack([model.reward(torch.tensor([p + ss[2]]))[0] for p, ss in rows])
    torch.testing.assert_close(packed, torch.stack([rc, rr, third], 1), atol=1e-5, rtol=0)


def test_score_texts_builds_the_training_prompt():
    model = _tiny_score_model()
    posts = [tldr.Post("My roommate eats my food. " * k, "Food", "roommates") for k in (1, 9)]
    summaries = ["Roommate eats my food.", "Food thief roommate, what do I do?"]
    got = score_texts(model, posts, summaries, TINY_INFO, batch_size=1)
    for post, summary, reward in zip(posts, summaries, got):
        ids = tldr.prompt_tokens(post, 64)[0] + tldr.summary_tokens(summary, 24)
        with torch.no_grad():
            assert reward.item() == pytest.approx(model.reward(torch.tensor([ids]))[0].item(), abs=1e-5)


# -----------------------------------------------------------------------------
# tiny runs: resume, normalisation, errors, --score

@pytest.fixture(scope="module")
def tiny(synthetic_dir, tmp_path_factory):
    """Small slices of the generated comparisons and references, and a random tiny 'sft' checkpoint."""
    root = tmp_path_factory.mktemp("rm_tiny")
    for name, rows in (("comparisons/train", 48), ("comparisons/valid", 16), ("tldr/valid", 16)):
        lines = (synthetic_dir / f"{name}.jsonl").read_text().splitlines()[:rows]
        (root / name).parent.mkdir(exist_ok=True)
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    torch.manual_seed(0)
    lm = GPT(GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32))
    save_checkpoint(root / "sft.pt", stage="sft", model=lm, tldr=TINY_INFO)
    save_checkpoint(root / "pretrain.pt", stage="pretrain", model=lm)
    return root


def tiny_cfg(tiny, out, **kw):
    kw = {"init": str(tiny / "sft.pt"), "data": str(tiny / "comparisons"), "sft_data": str(tiny / "tldr"),
          "ckpt_dir": str(out), "run_name": str(out / "run"), "max_steps": 6, **kw}
    return config_from(rm.Config, rm.PRESETS, "tiny", **kw)


def records(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def tiny_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm_straight")
    return out, rm.main(tiny_cfg(tiny, out))


def test_resume_is_exact(tiny, tiny_run, tmp_path):
    straight, _ = tiny_run
    rm.main(tiny_cfg(tiny, tmp_path, stop_at=4))
    assert load_checkpoint(tmp_path / "reward_model_latest.pt")["step"] == 4
    rm.main(tiny_cfg(tiny, tmp_path, resume=True))
    a, b = records(straight / "run", "train"), records(tmp_path / "run", "train")
    assert [r["step"] for r in b] == list(range(6))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # exactly equal on CPU
    assert [r["val_accuracy"] for r in records(straight / "run", "eval")] == \
        [r["val_accuracy"] for r in records(tmp_path / "run", "eval")]
    for name in ("reward_model.pt", "reward_model_latest.pt"):
        sa, sb = load_checkpoint(straight / name), load_checkpoint(tmp_path / name)
        assert sa["step"] == sb["step"] and sa.get("data_state") == sb.get("data_state")
        assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])


def test_fp16_skipped_steps_are_logged_and_survive_a_resume(tiny, tmp_path):
    skip_without_cpu_fp16()
    kw = dict(dtype="float16", max_steps=4, eval_every=0)
    straight = rm.main(tiny_cfg(tiny, tmp_path / "straight", **kw))
    rm.main(tiny_cfg(tiny, tmp_path / "split", stop_at=2, **kw))
    split = rm.main(tiny_cfg(tiny, tmp_path / "split", resume=True, **kw))
    logged = [r["skipped_steps"] for r in records(tmp_path / "straight" / "run", "train")]
    # the GradScaler's first scale (2**16) overflows fp16 gradients: the first step is skipped, counted
    assert logged == sorted(logged) and logged[0] == 1 and straight["skipped_steps"] == logged[-1]
    assert split["skipped_steps"] == straight["skipped_steps"]  # the count continues across --resume


def test_best_checkpoint_is_normalised_on_reference_summaries(tiny, tiny_run):
    out, result = tiny_run
    model, ckpt = load_reward_model("reward_model.pt", "cpu", out)
    assert ckpt["stage"] == "reward_model" and ckpt["tldr"] == TINY_INFO
    best = max(records(out / "run", "eval"), key=lambda r: r["val_accuracy"])  # the first of equals
    assert ckpt["metrics"]["val_accuracy"] == best["val_accuracy"] == result["best"]["val_accuracy"]
    assert ckpt["step"] == best["step"]
    refs = tldr.load_sft(str(tiny / "tldr"), "valid")
    rewards = score_texts(model, [e.post for e in refs], [e.summary for e in refs], ckpt["tldr"]).double()
    norm = ckpt["reward_norm"]
    assert norm["rows"] == len(refs) == 16
    assert abs(rewards.mean().item()) < 1e-3
    assert norm["std"] == pytest.approx(rewards.std(unbiased=False).item(), rel=1e-3) and norm["std"] > 0
    # the shift is what the references scored before it: undoing it gives that mean back
    assert norm["bias_shift"] == pytest.approx(-ckpt["metrics"]["ref_reward_mean_before"])
    with torch.no_grad():
        model.score_head.bias -= norm["bias_shift"]
    before = score_texts(model, [e.post for e in refs], [e.summary for e in refs], ckpt["tldr"]).double()
    assert before.mean().item() == pytest.approx(ckpt["metrics"]["ref_reward_mean_before"], abs=1e-4)
    assert abs(ckpt["metrics"]["ref_reward_mean_before"]) > 1e-2  # the shift did something


def test_pair_stats_count_repeated_and_contradicting_pairs():
    post, other = tldr.Post("p"), tldr.Post("q")
    pairs = [tldr.Comparison(post, "a", "b"), tldr.Comparison(post, "a", "b"), tldr.Comparison(post, "b", "a"),
             tldr.Comparison(other, "b", "a")]
    assert rm.pair_stats(pairs) == {"pairs": 4, "duplicate_pairs": 1, "contradicting_pairs": 1}


def test_user_errors(tiny, tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    row = json.loads((tiny / "comparisons" / "train.jsonl").read_text().splitlines()[0])
    datasets = {
        "blank": ["", ""],
        "unusable": [json.dumps({**row, "rejected": row["chosen"]}) + "\n" + json.dumps({**row, "chosen": "TL;DR: "})] * 2,
        "schema": [json.dumps({"text": "a", "score": 1})] * 2,
    }
    for name, (train, valid) in datasets.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.jsonl").write_text(train)
        (tmp_path / name / "valid.jsonl").write_text(valid)
    cases = [
        (dict(init=str(tiny / "pretrain.pt")), "'pretrain' checkpoint; expected sft"),
        (dict(init=str(tmp_path / "missing.pt")), "checkpoint not found"),
        (dict(data=str(tmp_path / "blank")), r"blank/train.jsonl: .*fields \[\]"),
        (dict(data=str(tmp_path / "unusable")), "no usable comparisons"),
        (dict(data=str(tmp_path / "schema")), "unknown comparisons schema"),
        (dict(batch_size=6), "not a positive multiple"),
    ]
    for kw, message in cases:
        with pytest.raises(UserError, match=message):
            rm.main(tiny_cfg(tiny, tmp_path / "run", **kw))
    err = capsys.readouterr().err
    assert "skipped 2 of 2 rows (1 empty summary, 1 identical summaries)" in err  # dropped pairs are counted
    with pytest.raises(UserError, match="not a finished reward model"):
        load_reward_model("reward_model_latest.pt", "cpu", out)
    # through the command line: one `error:` line and exit code 2
    with pytest.raises(SystemExit) as e:
        cli_main(rm.main, rm.Config, rm.PRESETS, ["--preset", "tiny", "--init", str(tiny / "pretrain.pt"),
                                                  "--ckpt-dir", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "expected sft" in err[-1]


def test_init_from_a_local_gpt2_directory_keeps_the_trunk_and_default_template(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=TOKENIZER_VOCAB, n_positions=1024, n_embd=32, n_layer=2, n_head=2))
    hf.save_pretrained(tmp_path / "hf")
    model, info = rm.init_model(config_from(rm.Config, rm.PRESETS, "tiny", init=str(tmp_path / "hf")))
    lm = GPT.from_pretrained(str(tmp_path / "hf"))
    assert info == tldr.template_info()  # raw GPT-2: the default prompt budgets
    assert isinstance(model, ScoreModel) and model.config.dropout == 0.0
    for k, v in lm.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_torchrun_two_processes_match_one(tiny, tmp_path):
    kw = dict(max_steps=4, eval_every=2, save_every=0)
    single = rm.main(tiny_cfg(tiny, tmp_path / "one", **kw))  # 8 pairs/step = 4 x 1 rank x 2 accumulation steps
    flags = ["--preset", "tiny", "--init", tiny / "sft.pt", "--data", tiny / "comparisons", "--sft-data", tiny / "tldr",
             "--ckpt-dir", tmp_path / "two", "--run-name", tmp_path / "two" / "run", "--max-steps", 4,
             "--eval-every", 2, "--save-every", 0]
    r = run_torchrun("reward_model.py", flags, cwd=tmp_path)
    assert "2 process(es) on cpu" in r.stdout and "4 x 2 rank(s) x 1 accumulation step(s)" in r.stdout
    one, two = records(tmp_path / "one" / "run", "train"), records(tmp_path / "two" / "run", "train")
    assert [x["step"] for x in two] == [0, 1, 2, 3]
    # the same pairs and math; only the order of float sums differs (all-reduce vs accumulation)
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5), (one, two)
        assert b["accuracy"] == a["accuracy"]
    ev1, ev2 = records(tmp_path / "one" / "run", "eval"), records(tmp_path / "two" / "run", "eval")
    assert [e["val_pairs"] for e in ev2] == [16, 16]  # both ranks' halves counted once
    for a, b in zip(ev1, ev2):
        assert b["val_accuracy"] == a["val_accuracy"] and b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
    s1, s2 = load_checkpoint(tmp_path / "one" / "reward_model.pt"), load_checkpoint(tmp_path / "two" / "reward_model.pt")
    assert s2["reward_norm"]["bias_shift"] == pytest.approx(s1["reward_norm"]["bias_shift"], rel=1e-3, abs=1e-4)
    assert single["best"]["step"] == s2["step"]


def test_score_cli_prints_the_reward_of_one_pair(tiny_run):
    out, _ = tiny_run
    post, summary = "My roommate keeps eating my food.\n\nWhat do I do?", "Roommate eats my food. Help?"
    r = run_script(["reward_model.py", "--score", "--ckpt", "reward_model.pt", "--ckpt-dir", out, "--post", post,
                    "--title", "Food", "--subreddit", "roommates", "--summary", summary])
    assert r.returncode == 0, r.stderr[-2000:]
    printed = float(r.stdout.split()[1])
    model, ckpt = load_reward_model(out / "reward_model.pt")
    expected = score_texts(model, [tldr.Post(post, "Food", "roommates")], [summary], ckpt["tldr"])[0].item()
    assert printed == pytest.approx(expected, abs=1e-4)
    r = run_script(["reward_model.py", "--score", "--ckpt", "nope.pt", "--ckpt-dir", out, "--post", "p",
                    "--summary", "s"])
    assert r.returncode == 2 and r.stderr.strip().startswith("error: checkpoint not found")
    assert "Traceback" not in r.stderr


# -----------------------------------------------------------------------------
# learning: the small reward model on the generated world

def spearman(x, y) -> float:
    """Spearman's rank correlation: Pearson's on ranks, ties given their mean rank."""
    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):  # ties share their mean rank
            r[v == value] = r[v == value].mean()
        return r
    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def test_spearman_matches_hand_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)  # 1 - 6*2/(3*8)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)  # ranks 0.5 0.5 2 vs 0 1 2


def test_small_reward_model_learns_the_generated_preferences(small_rm_ckpt, synthetic_dir):
    model, ckpt = load_reward_model(small_rm_ckpt)
    metrics = ckpt["metrics"]
    # against the noisy labels of all 500 valid pairs (8% of them flipped: a perfect model gets ~92%).
    # A trunk this small and this briefly pretrained judges coverage, length, copying and truncation but
    # hardly ever a wrong fact (that needs matching the summary against the post): measured 0.706.
    assert metrics["val_pairs"] == 500
    assert metrics["val_accuracy"] >= 0.66, metrics
    # held-out test posts: every distinct summary of the first 150 test pairs, against the gold score
    pairs = tldr.load_comparisons(str(synthetic_dir / "comparisons"), "test")[:150]
    items = {(c.post, s) for c in pairs for s in (c.chosen, c.rejected)}
    posts, summaries = zip(*sorted(items, key=lambda t: (t[0].post, t[1])))
    rewards = score_texts(model, list(posts), list(summaries), ckpt["tldr"], batch_size=64)
    gold = [synthetic.gold_score(tldr.render_prompt(p), s) for p, s in zip(posts, summaries)]
    rho = spearman(rewards.tolist(), gold)
    by_text = dict(zip(zip(posts, summaries), rewards.tolist()))
    gold_pairs = [(by_text[c.post, c.chosen] > by_text[c.post, c.rejected]) ==
                  (synthetic.gold_score(tldr.render_prompt(c.post), c.chosen) >
                   synthetic.gold_score(tldr.render_prompt(c.post), c.rejected)) for c in pairs]
    print(f"small reward model: val accuracy {metrics['val_accuracy']:.3f} (noisy labels), Spearman with gold "
          f"{rho:.3f} over {len(gold)} held-out summaries, agreement with gold on {len(pairs)} test pairs "
          f"{np.mean(gold_pairs):.3f}")
    assert rho > 0.4  # measured 0.513
