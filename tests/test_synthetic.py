"""synthetic.py: determinism, the real datasets' schemas, gold_score's judgement, label noise, lengths."""
import json
import random
import re
import statistics

import pytest

import synthetic as S
from common import UserError, cli_main, get_tokenizer

SMALL = dict(num_posts=80, pretrain_docs=60, comparisons_train=60, comparisons_valid=20, comparisons_test=20,
             hellaswag_train=30, hellaswag_val=30, hellaswag_test=20)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return out, S.write_all(out, seed=0, **SMALL)


@pytest.fixture(scope="module")
def world():
    return S.make_world(seed=0, num_posts=400)


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_layout_and_determinism(written, tmp_path):
    out, paths = written
    expected = {"pretrain.jsonl", "pretrain.parquet", "manifest.json", "hellaswag/hellaswag_train.jsonl",
                "hellaswag/hellaswag_val.jsonl", "hellaswag/hellaswag_test.jsonl"}
    expected |= {f"{d}/{s}.jsonl" for d in ("tldr", "tldr_raw", "comparisons", "comparisons_raw") for s in S.SPLITS}
    assert {str(p) for p in _files(out)} == expected  # no temp files left behind either
    assert {p.relative_to(out).as_posix() for p in paths.values()} == expected

    again = S.write_all(tmp_path / "again", seed=0, **SMALL)
    other = S.write_all(tmp_path / "other", seed=1, **SMALL)
    for name, path in paths.items():
        assert path.read_bytes() == again[name].read_bytes(), f"{name} differs for the same seed"
        assert path.read_bytes() != other[name].read_bytes(), f"{name} is the same for another seed"


def _load(kind, files, cache):
    import datasets
    datasets.disable_progress_bars()
    return datasets.load_dataset(kind, data_files={k: str(v) for k, v in files.items()}, cache_dir=str(cache))


def test_schemas_load_with_datasets(written, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out, paths = written
    cache = tmp_path / "hf_cache"
    split_files = lambda d: {s: paths[f"{d}/{s}"] for s in S.SPLITS}  # noqa: E731

    tldr = _load("json", split_files("tldr"), cache)
    assert set(tldr) == set(S.SPLITS)
    for split in S.SPLITS:
        assert tldr[split].column_names == ["label", "prompt"]
        assert tldr[split].num_rows == json.loads(paths["manifest"].read_text())["posts"][split]
    row = tldr["train"][0]
    assert re.fullmatch(r"SUBREDDIT: r/\w+\nTITLE: [^\n]+\nPOST: .+\nTL;DR:", row["prompt"], re.DOTALL)
    assert row["label"] == row["label"].strip() and row["label"][-1] in ".?!"

    raw = _load("json", split_files("tldr_raw"), cache)
    assert sorted(raw["valid"].column_names) == ["id", "post", "subreddit", "summary", "title"]
    r = raw["train"][0]
    assert r["id"].startswith("t3_")
    assert S.tldr_prompt(r["subreddit"], r["title"], r["post"]) == row["prompt"] and r["summary"] == row["label"]
    # splits never share a post
    ids = {s: set(raw[s]["id"]) for s in S.SPLITS}
    assert not (ids["train"] & ids["valid"] or ids["train"] & ids["test"] or ids["valid"] & ids["test"])

    comp = _load("json", split_files("comparisons"), cache)
    assert comp["test"].column_names == ["chosen", "prompt", "rejected"]
    c = comp["train"][0]
    assert re.fullmatch(r"SUBREDDIT: r/\w+\nTITLE: [^\n]+\nPOST: .+", c["prompt"], re.DOTALL)
    assert "TL;DR" not in c["prompt"]
    assert all(x.startswith("TL;DR: ") and not x.startswith("TL;DR:  ") for x in (c["chosen"], c["rejected"]))
    train_posts = {p for p in tldr["train"]["prompt"]}
    assert all(p + "\nTL;DR:" in train_posts for p in comp["train"]["prompt"])  # pairs use their split's posts

    comp_raw = _load("json", split_files("comparisons_raw"), cache)
    assert sorted(comp_raw["train"].column_names) == ["batch", "choice", "extra", "info", "split", "summaries", "worker"]
    x = comp_raw["valid"][0]
    assert sorted(x["info"]) == ["id", "post", "subreddit", "title"]
    assert len(x["summaries"]) == 2 and sorted(x["summaries"][0]) == ["note", "policy", "text"]
    assert all(s["text"].startswith(" ") for s in x["summaries"]) and x["choice"] in (0, 1)
    assert {r["split"] for s in S.SPLITS for r in comp_raw[s]} == {"train", "valid1", "valid2"}
    # the raw and CarperAI files hold the same pairs
    carper = comp["valid"][0]
    assert "TL;DR:" + x["summaries"][x["choice"]]["text"] == carper["chosen"]
    assert "TL;DR:" + x["summaries"][1 - x["choice"]]["text"] == carper["rejected"]

    hs = _load("json", {s: paths[f"hellaswag/{s}"] for s in ("train", "val")}, cache)
    hs["test"] = _load("json", {"test": paths["hellaswag/test"]}, cache)["test"]  # alone: its own columns
    fields = ["activity_label", "ctx", "ctx_a", "ctx_b", "endings", "ind", "label", "source_id", "split", "split_type"]
    assert sorted(hs["train"].column_names) == fields and sorted(hs["val"].column_names) == fields
    assert sorted(hs["test"].column_names) == [f for f in fields if f != "label"]  # unlabeled, like the real one
    for row in hs["val"]:
        assert len(row["endings"]) == 4 and 0 <= row["label"] < 4 and row["split"] == "val"
        assert row["ctx"] == (f"{row['ctx_a']} {row['ctx_b']}" if row["ctx_b"] else row["ctx_a"])
        assert row["source_id"].split("~")[0] in ("activitynet", "wikihow")
    assert set(hs["train"]["split_type"]) == {"indomain"}
    assert set(hs["val"]["split_type"]) | set(hs["test"]["split_type"]) == {"indomain", "zeroshot"}

    pre = _load("json", {"train": paths["pretrain_jsonl"]}, cache)["train"]
    assert pre.column_names == ["text"] and pre.num_rows == SMALL["pretrain_docs"]
    pq = _load("parquet", {"train": paths["pretrain_parquet"]}, cache)["train"]
    assert pq.column_names == list(S.FINEWEB_COLUMNS)
    assert pq["text"] == pre["text"]
    types = {k: str(v.dtype) for k, v in pq.features.items()}
    assert types["token_count"] == "int64" and types["int_score"] == "int64" and types["score"] == "float64"
    enc = get_tokenizer()
    assert pq[0]["token_count"] == len(enc.encode_ordinary(pq[0]["text"]))


def test_pretraining_text_never_uses_the_sft_template():
    docs = S.make_pretrain_docs(seed=0, num=600)
    assert len(docs) == 600 and len(set(docs)) > 540
    for doc in docs:
        assert "TL;DR" not in doc and "SUBREDDIT:" not in doc and not re.search(r"^(TITLE|POST):", doc, re.M)
    # it does teach the world: the actions HellaSwag asks about appear in it
    text = "\n".join(docs)
    assert all(S._imperative(a) in text or S._third_person(a) in text for p in S.PROBLEMS.values() for a in p.actions)


def test_posts_parse_back_to_their_slots(world):
    """gold_score relies on recovering a post's slots from its text: each slot value must be found and
    nothing else (no template, distractor or filler may contain another value's key words)."""
    for post in world["train"] + world["valid"]:
        expected = {k: frozenset([post.slots[k]]) for k in S.SLOT_KINDS}
        assert S.parse_slots(post.prompt) == expected, post.prompt
        assert S.parse_slots(post.post) == expected
        assert S.PROBLEMS[post.slots["problem"]].subreddit == post.subreddit
    for text in S.DISTRACTORS + S.FEELINGS + S.CLOSINGS + S.RAMBLES:
        assert not any(S.parse_slots(text).values()), text


def test_gold_score_prefers_the_reference(world):
    posts = world["train"]
    rng = random.Random(0)
    for post in posts:
        assert S.gold_score(post.prompt, post.summary) >= 0.85
        assert S.gold_score(post.post, " " + post.summary + "<|endoftext|>") == S.gold_score(post.prompt, post.summary)
    for kind in S.DEGRADATIONS:
        wins = [S.gold_score(p.prompt, p.summary) > S.gold_score(p.prompt, S.summary_variant(p, kind, rng)) for p in posts]
        assert sum(wins) / len(wins) >= 0.95, kind
    good = [S.gold_score(p.prompt, S.summary_variant(p, "good", rng)) for p in posts]
    assert min(good) >= 0.85  # mildly different good summaries stay good


def test_gold_score_checks_each_quality():
    post = S.render_post(random.Random(3), {"who": "roommate", "gender": "m", "problem": "food", "duration": "a month",
                                            "tried": "note", "question": "confront"})
    ref = "My roommate has been eating my food without asking for a month. Should I confront him?"
    base = S.gold_score(post.prompt, ref)
    assert base == pytest.approx(1.0)
    worse = {
        "wrong who": ref.replace("roommate", "sister"),
        "wrong duration": ref.replace("a month", "two years"),
        "wrong tried": ref.replace(". Should", " and I've sent an email. Should"),
        "no question": ref.split(". ")[0] + ".",
        "no problem": "My roommate is driving me crazy. Should I confront him?",
        "cut mid-way": "My roommate has been eating my food without asking for a",
        "too long": ref + " " + " ".join(S.RAMBLES),
        "copied distractor": ref + " " + S.DISTRACTORS[0],
        "repetition": "My roommate my roommate my roommate has been eating my food for a month. Should I confront him?",
    }
    for what, text in worse.items():
        assert S.gold_score(post.prompt, text) < base - 0.05, what
    assert S.gold_score(post.prompt, "") == 0.0
    # a fluent, finished sentence about nothing in the post is worth nothing, and less than a summary
    # that gets the main facts right and one detail wrong
    off_topic = "You can take a few deep breaths and think about what you want."
    assert S.gold_score(post.prompt, off_topic) == 0.0
    assert S.gold_score(post.prompt, worse["wrong duration"]) > 0.0


def test_label_noise_rate_and_exposure(world):
    pairs = S.make_comparisons(world["train"], 3000, seed=0, label_noise=0.1)
    rate = sum(c.flipped for c in pairs) / len(pairs)
    assert abs(rate - 0.1) < 0.03
    for c in pairs:  # .flipped is exactly "gold prefers the rejected one"
        assert c.chosen != c.rejected and abs(c.chosen_score - c.rejected_score) >= 0.05
        assert c.flipped == (S.gold_score(c.post.prompt, c.chosen) < S.gold_score(c.post.prompt, c.rejected))
    kinds = {c.chosen_kind for c in pairs} | {c.rejected_kind for c in pairs}
    assert kinds == set(S.CANDIDATE_KINDS)
    clean = S.make_comparisons(world["train"], 300, seed=0, label_noise=0.0)
    assert not any(c.flipped for c in clean)
    noisy = S.make_comparisons(world["train"], 1000, seed=0, label_noise=0.3)
    assert abs(sum(c.flipped for c in noisy) / 1000 - 0.3) < 0.05


def test_manifest_reports_the_noise_in_the_files(written):
    out, paths = written
    manifest = json.loads(paths["manifest"].read_text())
    prompts = {}
    for line in paths["tldr_raw/train"].read_text().splitlines():
        r = json.loads(line)
        prompts[S.comparison_prompt(r["subreddit"], r["title"], r["post"])] = r
    rows = [json.loads(line) for line in paths["comparisons/train"].read_text().splitlines()]
    flipped = sum(S.gold_score(r["prompt"], r["chosen"][len("TL;DR: "):]) < S.gold_score(r["prompt"], r["rejected"][7:])
                  for r in rows)
    assert manifest["label_noise_applied"]["train"] == {"pairs": len(rows), "flipped": flipped,
                                                        "rate": flipped / len(rows)}
    assert all(r["prompt"] in prompts for r in rows)


def test_token_lengths_fit_the_prompt_budget(world):
    enc = get_tokenizer()
    posts = world["train"] + world["valid"] + world["test"]
    prompt_lens = [len(enc.encode_ordinary(p.prompt)) for p in posts]
    summary_lens = [len(enc.encode_ordinary(" " + p.summary)) for p in posts]
    assert max(prompt_lens) < 512
    assert 80 <= statistics.median(prompt_lens) <= 250
    assert 12 <= min(summary_lens) and max(summary_lens) <= 35


def test_hellaswag_follows_the_world_logic():
    for split in ("train", "val"):
        for row in S.make_hellaswag(seed=0, num=300, split=split):
            problems = S.parse_slots(row["ctx"])["problem"]
            assert len(problems) == 1, row["ctx"]
            ending_problems = [S.action_problem(e) for e in row["endings"]]
            assert ending_problems[row["label"]] in problems  # the right ending is this problem's action
            assert sum(p in problems for p in ending_problems) == 1  # and the other three are not
            assert len(set(row["endings"])) == 4
    zeroshot = S.zeroshot_problems(0)
    train = S.make_hellaswag(seed=0, num=300, split="train")
    assert not {r["activity_label"] for r in train} & {S.PROBLEMS[p].activity for p in zeroshot}
    # held-out problems' actions appear in no train ending, right or wrong; they do in val's wrong endings
    assert not {S.action_problem(e) for r in train for e in r["endings"]} & zeroshot
    val_wrong = {S.action_problem(e) for r in S.make_hellaswag(seed=0, num=300, split="val")
                 for i, e in enumerate(r["endings"]) if i != r["label"]}
    assert val_wrong & zeroshot


def test_bad_sizes_are_user_errors(tmp_path, capsys):
    with pytest.raises(UserError, match="num-posts 0"):
        S.write_all(tmp_path, num_posts=0)
    with pytest.raises(UserError, match="comparisons-valid"):
        S.write_all(tmp_path, **{**SMALL, "comparisons_valid": 0})
    with pytest.raises(UserError, match="label-noise"):
        S.write_all(tmp_path, **{**SMALL, "label_noise": 1.5})
    with pytest.raises(SystemExit) as e:
        cli_main(S.main, S.Config, S.PRESETS, argv=["--out", str(tmp_path / "x"), "--num-posts", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_cli_writes_the_tiny_preset(tmp_path, capsys):
    cli_main(S.main, S.Config, S.PRESETS, argv=["--preset", "tiny", "--out", str(tmp_path), "--seed", "3"])
    assert "wrote" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["posts"]["train"] == S.PRESETS["tiny"]["num_posts"] - 12
    assert len((tmp_path / "hellaswag" / "hellaswag_val.jsonl").read_text().splitlines()) == 40
