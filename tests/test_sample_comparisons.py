"""sample_comparisons.py and the world's rater: pairs of a policy's own samples, labelled by the gold score."""
import json
import random

import pytest

import sample_comparisons
import synthetic as S
import tldr
from common import UserError, config_from
from conftest import run_script


@pytest.fixture(scope="module")
def world():
    return S.make_world(seed=0, num_posts=200)


def test_rate_pair_labels_the_better_summary_with_noise(world):
    post = world["train"][0]
    rng = random.Random(0)
    wrong = S.summary_variant(post, "wrong", rng)
    assert S.gold_score(post.prompt, post.summary) - S.gold_score(post.prompt, wrong) >= S.MIN_GOLD_GAP
    assert S.rate_pair(post.prompt, post.summary, post.summary, rng, 0.0) is None           # the same text
    good = next(g for g in (S.summary_variant(post, "good", rng) for _ in range(50))
                if abs(S.gold_score(post.prompt, g) - S.gold_score(post.prompt, post.summary)) < S.MIN_GOLD_GAP)
    assert S.rate_pair(post.prompt, post.summary, good, rng, 0.0) is None                   # a tie
    assert S.rate_pair(post.prompt, wrong, post.summary, rng, 0.0)[0] is False              # b is better
    assert S.rate_pair(post.prompt, post.summary, wrong, rng, 0.0)[0] is True
    labels = [S.rate_pair(post.prompt, post.summary, wrong, rng, 0.2) for _ in range(4000)]
    flipped = sum(f for _, _, _, f in labels)
    assert abs(flipped / 4000 - 0.2) < 0.03
    assert all(chosen_a == (not f) for chosen_a, _, _, f in labels)


def test_rate_samples_pairs_distinct_samples_by_gold(world):
    rng = random.Random(1)
    n_pairs = n_flipped = 0
    for post in world["train"][:60]:
        kinds = ("ref", "wrong", "missing", "truncated", "long")
        samples = [S.summary_variant(post, k, rng) for k in kinds] + [post.summary, "  "]  # a repeat, an empty one
        pairs = S.rate_samples(post.prompt, samples, rng, 0.1, max_pairs=3)
        assert len(pairs) <= 3
        for chosen, rejected, flipped in pairs:
            assert chosen != rejected and chosen.strip() and rejected.strip()
            gap = S.gold_score(post.prompt, chosen) - S.gold_score(post.prompt, rejected)
            assert abs(gap) >= S.MIN_GOLD_GAP and (gap < 0) == flipped
            n_flipped += flipped
        n_pairs += len(pairs)
    assert n_pairs > 120 and 0 < n_flipped < 0.25 * n_pairs
    # no pair at all among samples the rater cannot tell apart
    assert S.rate_samples(world["train"][0].prompt, ["a b c", "a b c d"], rng, 0.0, 5) == []


def _cfg(policy, synthetic_dir, out, **overrides):
    values = dict(policy=str(policy), data=str(synthetic_dir / "tldr"), out=str(out), train_posts=24,
                  valid_posts=8, samples_per_post=3, device="cpu", dtype="float32")
    return config_from(sample_comparisons.Config, None, None, **{**values, **overrides})


def test_writes_comparisons_of_the_policy_samples(small_sft_ckpt, synthetic_dir, tmp_path):
    manifest = sample_comparisons.main(_cfg(small_sft_ckpt, synthetic_dir, tmp_path / "a"))
    posts = {e.post.post: e.post for e in tldr.load_sft(str(synthetic_dir / "tldr"), "train")}
    for split, n_posts in (("train", 24), ("valid", 8)):
        stats = manifest["splits"][split]
        assert stats["posts"] == n_posts and stats["samples"] == 3 * n_posts and 0 < stats["pairs"] <= 2 * n_posts
        pairs = tldr.load_comparisons(str(tmp_path / "a"), split)   # the schema reward_model.py reads
        assert len(pairs) == stats["pairs"]
        worse_chosen = 0
        for c in pairs:
            prompt = tldr.render_prompt(c.post)
            gap = S.gold_score(prompt, c.chosen) - S.gold_score(prompt, c.rejected)
            assert abs(gap) >= S.MIN_GOLD_GAP
            worse_chosen += gap < 0
            if split == "train":
                assert c.post.post in posts
        assert worse_chosen == stats["flipped"]
    assert json.loads((tmp_path / "a" / "manifest.json").read_text()) == manifest
    # the same seed draws the same samples and labels
    sample_comparisons.main(_cfg(small_sft_ckpt, synthetic_dir, tmp_path / "b"))
    for name in ("train.jsonl", "valid.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_user_errors(small_sft_ckpt, small_rm_ckpt, synthetic_dir, tmp_path):
    base = ["sample_comparisons.py", "--data", synthetic_dir / "tldr", "--out", tmp_path / "out",
            "--train-posts", "4", "--valid-posts", "4", "--device", "cpu"]
    for bad in (dict(samples_per_post=1), dict(label_noise=1.5), dict(temperature=0.0)):
        with pytest.raises(UserError, match="--" + next(iter(bad)).replace("_", "-")):
            sample_comparisons.check_config(_cfg(small_sft_ckpt, synthetic_dir, tmp_path / "out", **bad))
    cases = [(["--policy", small_sft_ckpt, "--samples-per-post", "1"], "--samples-per-post"),
             (["--policy", small_rm_ckpt], "reward_model")]
    # posts not written by synthetic.py: the rater has no facts to check, so no pair has a clear winner
    real = tmp_path / "real"
    real.mkdir()
    row = {"prompt": "SUBREDDIT: r/cooking\nTITLE: Bread\nPOST: My bread never rises. What am I doing wrong?\nTL;DR:",
           "label": " My bread does not rise."}
    for split in ("train", "valid"):
        (real / f"{split}.jsonl").write_text(json.dumps(row) + "\n")
    cases.append((["--policy", small_sft_ckpt, "--data", real], "synthetic.py"))
    for args, needle in cases:
        r = run_script([*base, *args])
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()
