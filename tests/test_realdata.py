"""The real samples of ../shared/realdata through every loader: tinyshakespeare through fineweb.py into shards
(checked against tiktoken directly) and a few pretraining steps on them; real HellaSwag validation rows in both
styles (the harness clean-up against hand-written strings and a preprocessed copy of the whole split, the scores
against a naive loop); the real TL;DR posts through the loaders, sft.py, summarize.py and serve.py."""
import bz2
import hashlib
import json

import numpy as np
import pytest
import tiktoken
import torch
from fastapi.testclient import TestClient

import fineweb
import hellaswag as hs
import pretrain
import serve
import tldr
from checkpoints import load_checkpoint, load_lm, save_checkpoint
from common import config_from
from conftest import ROOT, run_script
from model import GPT
from serving.app import create_app
from summaries import Summarizer

REAL = ROOT.parent / "shared" / "realdata"
pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} is absent (CI puts ../shared beside the clone)")
SHAKESPEARE = REAL / "tinyshakespeare" / "input.txt"
HELLASWAG_FULL = REAL / "hellaswag" / "hellaswag_val_first10.jsonl"
HELLASWAG_500 = REAL / "hellaswag" / "hellaswag_val_500_sample.jsonl"
HELLASWAG_ALL = REAL / "hellaswag" / "hellaswag_val_all_preprocessed.txt.bz2"
TLDR = REAL / "tldr"
PARAGRAPHS = 2000  # the play's first speeches as a JSONL source of many documents


# -----------------------------------------------------------------------------
# tinyshakespeare -> fineweb.py shards -> pretrain.py

@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    """(the text, the speeches written as JSONL, the shard folder): fineweb.py --preset tiny on the .txt file
    (one document) followed by the JSONL file (one document a speech)."""
    text = SHAKESPEARE.read_text()
    out = tmp_path_factory.mktemp("shakespeare")
    speeches = [p for p in text.split("\n\n") if p.strip()][:PARAGRAPHS]
    jsonl = out / "speeches.jsonl"
    jsonl.write_text("".join(json.dumps({"text": p}) + "\n" for p in speeches))
    shards = out / "shards"
    fineweb.main(config_from(fineweb.Config, fineweb.PRESETS, "tiny", input=[str(SHAKESPEARE), str(jsonl)],
                             out_dir=str(shards), workers=1))
    return text, speeches, shards


@pytest.fixture(scope="module")
def shakespeare_lm(shakespeare, tmp_path_factory):
    """pretrain.py --preset tiny for 40 steps on the shards: (checkpoint path, its metrics)."""
    out = tmp_path_factory.mktemp("shakespeare_lm")
    cfg = config_from(pretrain.Config, pretrain.PRESETS, "tiny", data_dir=str(shakespeare[2]), max_steps=40,
                      eval_every=0, save_every=0, hellaswag_path="", num_samples=0, ckpt=str(out / "pretrain.pt"),
                      run_name=str(out / "run"))
    return out / "pretrain.pt", pretrain.main(cfg)


def test_tinyshakespeare_shards_are_tiktoken_encodings_with_one_eot_per_document(shakespeare):
    text, speeches, shards = shakespeare
    assert hashlib.md5(SHAKESPEARE.read_bytes()).hexdigest() == "6fb458f1232090904fb40fe944165e91"
    gpt2 = tiktoken.get_encoding("gpt2")  # tiktoken itself, not the project's tokenizer helper
    eot = gpt2.eot_token
    expected = np.concatenate([[eot, *gpt2.encode_ordinary(doc)] for doc in [text, *speeches]])
    paths = sorted(shards.glob("*.npy"), key=lambda p: int(p.stem.split("_")[1]))
    assert paths[0].name == "val_000000.npy" and all(p.name.startswith("train_") for p in paths[1:])
    shard_arrays = [np.load(p) for p in paths]
    assert all(a.dtype == np.uint16 for a in shard_arrays)
    assert all(len(a) == fineweb.PRESETS["tiny"]["shard_tokens"] for a in shard_arrays[:-1])
    tokens = np.concatenate(shard_arrays).astype(np.int64)
    assert len(tokens) == len(expected) > 300_000  # the whole play: about 338k tokens, and the speeches again
    assert np.array_equal(tokens, expected)
    assert (tokens == eot).sum() == 1 + len(speeches) and tokens[0] == eot
    progress = json.loads((shards / fineweb.PROGRESS).read_text())
    assert progress["tokens"] == len(expected) and progress["complete"]


def test_pretraining_on_tinyshakespeare_lowers_the_loss(shakespeare_lm):
    path, metrics = shakespeare_lm
    log = [json.loads(line) for line in (path.parent / "run" / "log.jsonl").open()]
    losses = [r["loss"] for r in log if r["kind"] == "train"]
    assert len(losses) == 40 and np.isfinite(losses).all()
    # from about ln(50304) = 10.8 at the start to under 7.5 in 40 steps of 512 tokens (measured: 6.7, val 7.3)
    assert losses[0] > 10 and np.mean(losses[-5:]) < 7.5, losses
    assert np.isfinite(metrics["val_loss"]) and metrics["val_loss"] < 8


# -----------------------------------------------------------------------------
# HellaSwag: the real rows, both styles

def test_real_rows_load_with_their_endings_and_labels():
    rows = hs.load_rows(HELLASWAG_FULL)
    assert len(rows) == 10 and all(len(r["endings"]) == 4 for r in rows)
    assert [r["label"] for r in rows] == [3, 3, 2, 2, 1, 1, 2, 0, 1, 1]
    assert {r["split_type"] for r in rows} <= set(hs.SPLIT_TYPES)
    sample = hs.load_rows(HELLASWAG_500)  # the copy with one `context` string and no split_type
    assert len(sample) == 500 and all(len(r["endings"]) == 4 and r["split_type"] == hs.UNKNOWN_SPLIT_TYPE for r in sample)
    assert all(r["ctx"] == r["ctx_a"] == r["context"] and r["ctx_b"] == "" for r in sample)


def test_harness_clean_up_of_real_rows_against_hand_written_strings():
    rows = hs.load_rows(HELLASWAG_FULL)
    # ActivityNet rows: "activity_label: ctx_a Ctx_b", the ctx_b capitalized; the endings unchanged
    assert hs.harness_texts(rows[0]) == ("Roof shingle removal: A man is sitting on a roof. He", [
        "is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
        "starts pulling up roofing on a roof."])
    assert hs.harness_texts(rows[1])[0] == ("Clean and jerk: A lady walks to a barbell. She bends down and grabs the "
                                            "pole. The lady")
    assert hs.harness_texts(rows[8])[0] == ("Sharpening knives: A man is holding a pocket knife while sitting on some "
                                            "rocks in the wilderness. Then he")
    # the completion style keeps the raw ctx, and each ending is tokenized after a space
    enc = tiktoken.get_encoding("gpt2")
    encoded = hs.encode_row(rows[0], "completion")
    assert encoded.context == enc.encode_ordinary("A man is sitting on a roof. he")
    assert encoded.endings[3] == enc.encode_ordinary(" starts pulling up roofing on a roof.")
    # WikiHow rows: " [title]" becomes ". ", the other bracketed tags go, then one pass of double spaces
    sample = hs.load_rows(HELLASWAG_500)
    context, endings = hs.harness_texts(sample[0])
    assert context == ("Family Life: How to recover from an emotional affair. Forgive yourself. While forgiving others "
                       "can be challenging, it's often even harder to forgive yourself. Remember that if you had known "
                       "the path of your actions and their consequences, you probably would not have done what you did.")
    assert endings[1] == ("Forgiveness in someone else can only serve to make it harder. Cheating can be very emotional, "
                          "and can even be worse.")
    # the harness's quirk, kept: an ending that starts with a tag keeps the space the tag left
    assert hs.harness_preprocess("[substeps] Many new petunias.") == " Many new petunias."


def test_harness_clean_up_matches_a_preprocessed_copy_of_the_whole_split():
    """hellaswag_val_all_preprocessed holds every val row as "activity_label: ctx" (ctx_b left in lower case) and
    its endings, cleaned independently of this project: WikiHow's four tags removed, then stripped."""
    lines = bz2.open(HELLASWAG_ALL, "rt").read().split("\n")
    copy = [lines[i:i + 6] for i in range(0, len(lines) - 5, 6)]
    assert len(copy) == 10042
    for row, (context, label, *endings) in zip(hs.load_rows(HELLASWAG_FULL), copy):
        assert hs.harness_preprocess(row["activity_label"] + ": " + row["ctx"]) == context
        assert [hs.harness_preprocess(e) for e in row["endings"]] == endings and int(label) == row["label"]
    by_context = {}
    for context, label, *endings in copy:
        by_context.setdefault(context, []).append((int(label), endings))
    sample = hs.load_rows(HELLASWAG_500)
    same = 0
    for row in sample:
        context, endings = hs.harness_texts(row)
        same += (row["label"], [e.strip() for e in endings]) in by_context.get(context, [])
    # measured: 497 of 500 the same; the other 3 are a row whose title this sample lost, an ending with a
    # bracketed remark the copy keeps ("[not recommended]": the harness removes every bracket) and a double
    # space the harness's single pass leaves
    assert same == 497


def _naive_completion_choices(model, rows) -> list[int]:
    """The completion style by hand: one forward per ending, the summed log-probability of its tokens."""
    enc = tiktoken.get_encoding("gpt2")
    choices = []
    for row in rows:
        context = enc.encode_ordinary(row["ctx"])
        totals = []
        for ending in row["endings"]:
            tokens = enc.encode_ordinary(" " + ending)
            ids = torch.tensor([context + tokens])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids)[0][0].float(), -1)
            totals.append(sum(logp[len(context) - 1 + i, t].item() for i, t in enumerate(tokens)))
        choices.append(int(np.argmax(totals)))
    return choices


def test_hellaswag_cli_scores_real_rows_in_both_styles(shakespeare_lm, tmp_path):
    """hellaswag.py on the 10 full rows, both styles, for the briefly trained model and an untrained one of the
    same shape; the completion accuracy equals the naive loop's."""
    data = tmp_path / "hellaswag"
    data.mkdir()
    (data / "hellaswag_val.jsonl").symlink_to(HELLASWAG_FULL)
    trained, _ = load_lm(str(shakespeare_lm[0]), dropout=0.0)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "untrained.pt", stage="pretrain", model=GPT(trained.config))
    rows = hs.load_rows(HELLASWAG_FULL)
    for ckpt in (shakespeare_lm[0], tmp_path / "untrained.pt"):
        out = tmp_path / f"{ckpt.stem}.json"
        r = run_script([ROOT / "hellaswag.py", "--ckpt", ckpt, "--data-dir", data, "--device", "cpu", "--out", out])
        assert r.returncode == 0, r.stderr
        record = json.loads(out.read_text())
        assert record["rows"] == 10 and set(record["results"]) == {"completion", "harness"}
        for style in ("completion", "harness"):
            res = record["results"][style]
            assert res["n"] == 10 and 0 <= res["acc"] <= 1 and 0 <= res["acc_norm"] <= 1
            assert sum(sub["n"] for sub in res["by_split_type"].values()) == 10
        model, _ = load_lm(str(ckpt), dropout=0.0)
        naive = _naive_completion_choices(model.eval(), rows)
        assert record["results"]["completion"]["acc"] == pytest.approx(np.mean([c == r["label"] for c, r in zip(naive, rows)]))


def test_hellaswag_scores_rows_of_the_500_row_copy(shakespeare_lm):
    rows = hs.load_rows(HELLASWAG_500)[:100]  # all 500 take 25 s on 2 cores
    results = hs.evaluate(load_lm(str(shakespeare_lm[0]), dropout=0.0)[0], rows, style="both", batch_size=32, progress=False)
    for style in ("completion", "harness"):
        assert results[style]["n"] == 100 and 0.1 < results[style]["acc"] < 0.5
        assert all(sub["n"] == 0 for sub in results[style]["by_split_type"].values())


# -----------------------------------------------------------------------------
# TL;DR: the 30 real posts through the loaders, sft.py, summarize.py and serve.py

def test_real_posts_load_and_render_the_template():
    train, valid = tldr.load_sft(str(TLDR), "train"), tldr.load_sft(str(TLDR), "valid")
    assert len(train) == 10 and len(valid) == 20
    example = train[6]
    assert example.post.subreddit == "relationships"
    assert example.summary == ("Gf said she almost didn't date me because I was too short.  Now I am really turned off "
                               "by her.")
    assert tldr.render_prompt(example.post) == (
        "SUBREDDIT: r/relationships\nTITLE: Is it weird that this turned me off from my gf?\nPOST: The other day my "
        "girlfriend(23 years old) and myself(22 years old) were talking and she revealed to me that she almost didn't "
        "date me because I was too short (5'7\"-5'8\").  She is only about 5'5\".  Now she loves me a lot and thinks I "
        "am the best thing to ever happen to her but for some reason, learning about this, really turned me off. I have "
        "never associated height with anything other than how tall is someone, but apparently people associate height "
        "with strength, power, attractiveness and other stuff that has nothing to do with height.  Is it bad of me to "
        "want to break up with her for this shallow view?\n\nI know its kinda shallow of me but I am extremely turned "
        "off by this.\nTL;DR:")
    # a long real post is cut at a word boundary to the prompt budget, the template's ends kept
    ids, truncated = tldr.prompt_tokens(train[0].post, 128)
    text = tiktoken.get_encoding("gpt2").decode(ids)
    assert truncated and len(ids) <= 128 and text.startswith("SUBREDDIT: r/relationships\nTITLE: ")
    assert text.endswith("\nTL;DR:") and "POST: " in text


@pytest.fixture(scope="module")
def real_sft(shakespeare_lm, tmp_path_factory):
    """sft.py --preset tiny on the 10 real train posts for 4 steps, validated on the 20 real valid posts."""
    out = tmp_path_factory.mktemp("real_sft")
    r = run_script([ROOT / "sft.py", "--preset", "tiny", "--init", shakespeare_lm[0], "--data", TLDR, "--max-steps", "4",
                    "--eval-every", "0", "--ckpt-dir", out, "--run-name", out / "run", "--device", "cpu"])
    assert r.returncode == 0, r.stderr
    return out


def test_sft_trains_on_real_posts(real_sft):
    ckpt = load_checkpoint(real_sft / "best_sft.pt", "sft")
    log = [json.loads(line) for line in (real_sft / "run" / "log.jsonl").open()]
    assert [r["step"] for r in log if r["kind"] == "train"] == [0, 1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in log if r["kind"] == "train")
    assert np.isfinite(ckpt["metrics"]["best_val_loss"]) and ckpt["tldr"]["template"] == tldr.TEMPLATE


def test_summarize_and_serve_take_a_real_post(real_sft):
    post = tldr.load_sft(str(TLDR), "valid")[0].post
    summarizer = Summarizer.load(real_sft / "best_sft.pt", "cpu")
    expected = summarizer.summarize([post], None, batch_size=1, temperature=0.0)[0][0]
    r = run_script([ROOT / "summarize.py", "--ckpt", real_sft / "best_sft.pt", "--subreddit", post.subreddit,
                    "--title", post.title, "--device", "cpu", post.post])
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == expected and "the post was cut to fit" in r.stderr  # a real post is long
    cfg = config_from(serve.Config, None, None, ckpt=[str(real_sft / "best_sft.pt")], device="cpu")
    with TestClient(create_app(serve.load_engines(cfg), cfg), base_url="http://localhost") as client:
        # the whole prompt of a real post, longer than the model's context: "template" takes it apart and cuts it
        reply = client.post("/v1/completions", json={"model": "best_sft", "prompt": tldr.render_prompt(post),
                                                    "temperature": 0, "template": True})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"].strip() == expected
