"""hellaswag.py: hand-computed choices, batched == one-by-one, the harness clean-up, data errors,
download, the CLI, a 2-process torchrun, and a pretrained small model above chance."""
import json
import random
import sys

import pytest
import torch
import torch.nn.functional as F

from checkpoints import load_checkpoint, save_checkpoint
from common import UserError
from conftest import run_script, run_torchrun, unigram_gpt as rigged_gpt
from hellaswag import (encode_row, ensure_hellaswag, evaluate, harness_preprocess, harness_texts, load_rows,
                       score_endings, validate_row)
from model import GPT, TOKENIZER_VOCAB, GPTConfig, build_model

WORDS = ("the a man woman dog girl runs jumps into pool ball quickly slowly then and river house red blue "
         "kitchen knife bakes cake washes car paints fence guitar plays song crowd cheers").split()


def make_rows(n, seed=0):
    """Real-schema rows of varied lengths (so batches need padding), WikiHow tags included."""
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    rows = []
    for i in range(n):
        ctx_a = words(rng.randint(3, 25)) + "." + (" [step] " + words(3) + "." if i % 3 == 0 else "")
        ctx_b = words(rng.randint(0, 3))
        rows.append({"ind": i, "activity_label": words(2), "ctx_a": ctx_a, "ctx_b": ctx_b,
                     "ctx": (ctx_a + " " + ctx_b).strip(), "endings": [words(rng.randint(1, 15)) + "." for _ in range(4)],
                     "label": rng.randrange(4), "split": "val", "split_type": ("indomain", "zeroshot")[i % 2],
                     "source_id": f"gen~{i}"})
    return rows


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -----------------------------------------------------------------------------
# hand-computed: a model whose next-token distribution we set, three hand-written rows

HAND_ROWS = [
    {"ind": 1, "activity_label": "Walking the dog", "ctx_a": "A man is standing in a yard with a dog.", "ctx_b": "the dog",
     "endings": ["sleeps.", "jumps over the fence into the garden.", "eats a sandwich at the table.",
                 "reads the newspaper in the kitchen."], "label": 1, "split_type": "indomain"},
    {"ind": 2, "activity_label": "Riding a bike", "ctx_a": "A girl rides a bike down a hill.", "ctx_b": "she",
     "endings": ["walks to the store and buys some milk for breakfast.", "falls.", "smiles.",
                 "goes home and cooks dinner for the family."], "label": 2, "split_type": "zeroshot"},
    {"ind": 3, "activity_label": "Food and Entertaining", "ctx_b": "",
     "ctx_a": "[header] How to bake bread [title] Mix the flour and water. [step] Knead the dough for ten minutes.",
     "endings": ["[substeps] Let it rest.", "Bake it in the oven.", "[title] Eat the dough raw.",
                 "Put the dough somewhere warm so that it can rise."], "label": 3, "split_type": "indomain"},
]
BOOST = {" jumps": 6.0, " fence": 6.0, " garden": 6.0, " smiles": 6.0, " rest": 12.0, " rise": 9.0, " warm": 9.0}


def unigram_gpt(boost):
    """A real GPT whose next-token logits ignore the context (conftest.unigram_gpt): boost (token → logit),
    0 elsewhere; returns it with its logits over the real vocabulary."""
    model = rigged_gpt(boost, GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=64))
    return model, model.transformer.wte.weight[:TOKENIZER_VOCAB, 0].detach().clone()


def test_hand_written_rows_choices_and_accuracies(tmp_path):
    rows = load_rows(write_jsonl(tmp_path / "hs.jsonl", [{**r, "ctx": (r["ctx_a"] + " " + r["ctx_b"]).strip(),
                                                           "split": "val", "source_id": "x"} for r in HAND_ROWS]))
    model, unigram = unigram_gpt(BOOST)
    log_z = torch.logsumexp(unigram.double(), 0).item()  # every token costs log Z minus its boost
    # expected per-row choices, worked out from the boosts by hand (Z ~ e^12.35, so fewer unboosted tokens win
    # the summed score): row 1 " sleeps." = 2 plain tokens beats 8 tokens holding three +6 boosts on the sum,
    # loses on the mean; row 3's tag tokens sink "[substeps] Let it rest." in completion style while the
    # harness strips them, and " rest" (+12) then wins the sum; per-character norm favours row 2's long ending 0.
    expected = {"completion": ([0, 2, 1], [1, 2, 3]), "harness": ([0, 2, 0], [1, 0, 3])}
    # tokens per ending, counted by hand: " sleeps." is " sleeps" + "."; " [substeps] Let it rest." is
    # " [" "sub" "steps" "]" " Let" " it" " rest" "."; the harness scores "  Let it rest." (its clean-up keeps
    # the space before the removed tag): " " " Let" " it" " rest" "."
    hand_counts = {"completion": ([2, 8, 7, 7], [8, 6, 8, 11]), "harness": ([2, 8, 7, 7], [5, 6, 6, 11])}
    for style, (acc_choice, norm_choice) in expected.items():
        examples = [encode_row(r, style) for r in rows]
        sums, counts = score_endings(model, examples, batch_size=2)
        assert (counts[0].tolist(), counts[2].tolist()) == hand_counts[style]
        for ex, row_sums, row_counts in zip(examples, sums, counts):
            hand = [sum(unigram[t].item() - log_z for t in ending) for ending in ex.endings]
            assert row_sums.tolist() == pytest.approx(hand, rel=2e-5)  # fp32 log-softmax over 50k logits
            assert row_counts.tolist() == [len(e) for e in ex.endings]
        norms = counts.double() if style == "completion" else torch.tensor([ex.norms for ex in examples])
        assert sums.argmax(1).tolist() == acc_choice
        assert (sums / norms).argmax(1).tolist() == norm_choice
    result = evaluate(model, rows, style="both", batch_size=3, progress=False)
    c, h = result["completion"], result["harness"]
    assert (c["acc"], c["acc_norm"], c["n"]) == (pytest.approx(1 / 3), 1.0, 3)
    assert (h["acc"], h["acc_norm"], h["n"]) == (pytest.approx(1 / 3), pytest.approx(2 / 3), 3)
    assert c["by_split_type"]["indomain"] == {"acc": 0.0, "acc_norm": 1.0, "n": 2}
    assert c["by_split_type"]["zeroshot"] == {"acc": 1.0, "acc_norm": 1.0, "n": 1}
    assert h["by_split_type"]["indomain"] == {"acc": 0.0, "acc_norm": 1.0, "n": 2}
    assert h["by_split_type"]["zeroshot"] == {"acc": 1.0, "acc_norm": 0.0, "n": 1}
    only = evaluate(model, rows, style="harness", progress=False)
    assert list(only) == ["harness"] and only["harness"] == h


def test_harness_preprocessing_matches_lm_eval():
    wikihow = "[header] How to bake bread [title] Mix the flour and water. [step] Knead the dough for ten minutes."
    assert harness_preprocess(wikihow) == " How to bake bread. Mix the flour and water. Knead the dough for ten minutes."
    assert harness_preprocess("[substeps] Let it rest.") == " Let it rest."
    assert harness_preprocess("  Preheat the oven.  ") == "Preheat the oven."
    assert harness_preprocess("Add salt. [step] Stir.") == "Add salt. Stir."
    assert harness_preprocess("one   two") == "one  two"  # the harness collapses double spaces in one pass
    row = validate_row({"activity_label": "Food and Entertaining", "ctx_a": wikihow, "ctx_b": "", "ctx": wikihow,
                        "endings": ["[title] Eat it raw.", "Bake it [step] twice.", "a", "b"], "label": 0,
                        "split_type": "indomain"}, "x")
    context, endings = harness_texts(row)
    assert context == "Food and Entertaining: How to bake bread. Mix the flour and water. Knead the dough for ten minutes."
    assert endings[:2] == [" Eat it raw.", "Bake it twice."]
    # ctx_b.capitalize() lowercases the rest of ctx_b, as the harness does
    activity = {**row, "activity_label": "Bowling", "ctx_a": "A man holds a ball.", "ctx_b": "then the man Throws"}
    assert harness_texts(activity)[0] == "Bowling: A man holds a ball. Then the man throws"


# -----------------------------------------------------------------------------
# batched scoring against a naive one-sequence-at-a-time loop

def naive_scores(model, examples):
    """Full logits of each unpadded context+ending alone, fp32 log-softmax (as lm-evaluation-harness),
    summed over the ending."""
    out = []
    with torch.no_grad():
        for ex in examples:
            row = []
            for ending in ex.endings:
                ids = torch.tensor([ex.context + ending])
                logp = F.log_softmax(model(ids[:, :-1])[0][0], -1)  # (T-1, V)
                n = len(ending)
                row.append(logp[-n:].gather(1, ids[0, -n:, None]).double().sum().item())
            out.append(row)
    return torch.tensor(out, dtype=torch.float64)


def test_batched_equals_one_by_one(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    rows = [validate_row(r, "x") for r in make_rows(8, seed=1)]
    for style in ("completion", "harness"):
        examples = [encode_row(r, style) for r in rows]
        batched, counts = score_endings(model, examples, batch_size=3)  # 12 padded rows per forward
        alone, _ = score_endings(model, examples, batch_size=1)
        reference = naive_scores(model.eval(), examples)
        assert counts.tolist() == [[len(e) for e in ex.endings] for ex in examples]
        # per-token losses (what build-nanogpt averages) agree to 1e-5 in fp32
        for got in (batched, alone):
            assert torch.allclose(got / counts, reference / counts, atol=1e-5, rtol=0), \
                ((got - reference) / counts).abs().max()
            assert got.argmax(1).tolist() == reference.argmax(1).tolist()
            assert (got / counts).argmax(1).tolist() == (reference / counts).argmax(1).tolist()
    model.train()
    evaluate(model, rows, batch_size=3, progress=False)
    assert model.training, "evaluate must give the model back in the mode it came in"


def test_context_longer_than_block_is_cut_from_the_left(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config).eval()
    row = validate_row({**make_rows(1)[0], "ctx": " ".join(["word"] * 300)}, "x")
    ex = encode_row(row, "completion")
    assert len(ex.context) > tiny_config.block_size
    sums, counts = score_endings(model, [ex])
    for j, ending in enumerate(ex.endings):  # as the harness does: keep the last block_size + 1 tokens
        ids = torch.tensor([(ex.context + ending)[-(tiny_config.block_size + 1):]])
        with torch.no_grad():
            logp = F.log_softmax(model(ids[:, :-1])[0][0], -1)
        n = len(ending)
        assert sums[0, j].item() == pytest.approx(logp[-n:].gather(1, ids[0, -n:, None]).double().sum().item(), abs=1e-5)
    assert counts[0].tolist() == [len(e) for e in ex.endings]


# -----------------------------------------------------------------------------
# data: validation errors name the line; download is atomic and reused

@pytest.mark.parametrize("edit, message", [
    (lambda r: r.pop("endings"), "line 2: missing field 'endings'"),
    (lambda r: r.update(endings=r["endings"][:3]), "line 2: 'endings' must be a list of 4 strings, got 3"),
    (lambda r: r.update(label=4), "line 2: label must be 0, 1, 2 or 3, got 4"),
    (lambda r: r.update(label="x"), "line 2: label must be 0, 1, 2 or 3"),
    (lambda r: r.update(split_type="other"), "line 2: split_type must be one of indomain, zeroshot"),
    (lambda r: r.update(ctx_a=None), "line 2: field 'ctx_a' must be a string"),
])
def test_malformed_row_names_the_line(tmp_path, edit, message):
    rows = make_rows(3)
    edit(rows[1])
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_rows(write_jsonl(tmp_path / "bad.jsonl", rows))


def test_bad_json_empty_file_and_string_labels(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(make_rows(1)[0]) + "\n{not json\n")
    with pytest.raises(UserError, match=r"x.jsonl, line 2: not valid JSON"):
        load_rows(path)
    path.write_text("\n")
    with pytest.raises(UserError, match="holds no HellaSwag rows"):
        load_rows(path)
    with pytest.raises(UserError, match="not found"):
        load_rows(tmp_path / "missing.jsonl")
    rows = make_rows(5)
    rows[0]["label"] = "3"  # the Hugging Face copy stores labels as strings
    loaded = load_rows(write_jsonl(path, rows), limit=2)
    assert len(loaded) == 2 and loaded[0]["label"] == 3


def test_download_is_atomic_and_reused(tmp_path):
    src = write_jsonl(tmp_path / "mirror" / "hellaswag_val.jsonl", make_rows(4))
    url = (tmp_path / "mirror").as_uri() + "/hellaswag_{split}.jsonl"
    data = tmp_path / "data"
    path = ensure_hellaswag("val", data, url=url)
    assert path == data / "hellaswag_val.jsonl" and path.read_bytes() == src.read_bytes()
    assert [p.name for p in data.iterdir()] == ["hellaswag_val.jsonl"]  # no temp file left behind
    src.unlink()
    assert ensure_hellaswag("val", data, url=url) == path  # already there: no second download
    with pytest.raises(UserError, match=r"hellaswag_train.jsonl.*put it at .*data/hellaswag_train.jsonl"):
        ensure_hellaswag("train", data, url=url)
    assert not (data / "hellaswag_train.jsonl").exists()


def test_cli_offline_and_missing_data_is_one_line_exit_2(tmp_path, tiny_config):
    save_checkpoint(tmp_path / "pretrain.pt", stage="pretrain", model=GPT(tiny_config))
    # an unreachable proxy: offline wherever the test runs
    offline = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "no_proxy": "",
               "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    r = run_script(["hellaswag.py", "--ckpt", "pretrain.pt", "--ckpt-dir", tmp_path, "--data-dir", tmp_path / "hs"],
                   env=offline, timeout=120)
    assert r.returncode == 2, r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in r.stderr
    assert "hellaswag_val.jsonl" in err[0] and f"put it at {tmp_path / 'hs' / 'hellaswag_val.jsonl'}" in err[0]


# -----------------------------------------------------------------------------
# the CLI in one process (OpenAI-format weights) and under torchrun (our checkpoint) agree

def test_cli_and_two_process_torchrun_give_the_same_counts(tmp_path, tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    ckpt = save_checkpoint(tmp_path / "ckpts" / "tiny.pt", stage="pretrain", model=model, step=7)
    model.export_hf(tmp_path / "tiny_hf")
    rows = make_rows(11, seed=2)  # odd: the two ranks get 6 and 5 rows
    data = tmp_path / "hs"
    write_jsonl(data / "hellaswag_val.jsonl", rows)
    expected = evaluate(model, [validate_row(r, "x") for r in rows], batch_size=4, progress=False)

    single = run_script(["hellaswag.py", "--hf", tmp_path / "tiny_hf", "--data-dir", data, "--batch-size", "4",
                         "--device", "cpu"], timeout=180)
    assert single.returncode == 0, single.stderr
    assert "completion" in single.stdout and "harness" in single.stdout and "zeroshot" in single.stdout
    record = json.loads((tmp_path / "tiny_hf_hellaswag_val.json").read_text())  # next to the HF directory
    assert record["results"] == expected and record["rows"] == 11

    out = tmp_path / "ddp.json"
    ddp = run_torchrun("hellaswag.py", ["--ckpt", "tiny.pt", "--ckpt-dir", ckpt.parent, "--data-dir", data,
                                        "--batch-size", "4", "--device", "cpu", "--out", out], timeout=240)
    record = json.loads(out.read_text())
    assert record["world_size"] == 2 and record["step"] == 7 and record["stage"] == "pretrain"
    assert record["results"] == expected
    assert ddp.stdout.count("wrote ") == 1  # rank 0 alone prints and writes


# -----------------------------------------------------------------------------
# learning: the small model pretrained on the generated world beats chance

def test_small_pretrained_model_beats_chance(small_pretrain_ckpt, synthetic_dir):
    ckpt = load_checkpoint(small_pretrain_ckpt, "pretrain")
    rows = load_rows(synthetic_dir / "hellaswag" / "hellaswag_val.jsonl", limit=500)
    # the reference is the same architecture untrained: length and frequency cues alone lift acc_norm on
    # generated rows a little above 0.25, and only what pretraining taught should count
    torch.manual_seed(0)
    untrained = GPT(GPTConfig.from_dict(ckpt["model_config"]))
    scores = {name: evaluate(model, rows, style="completion", batch_size=32, progress=False)["completion"]
              for name, model in (("untrained", untrained), ("pretrained", build_model(ckpt, cls=GPT)))}
    print(", ".join(f"{name} acc {r['acc']:.3f} acc_norm {r['acc_norm']:.3f}" for name, r in scores.items()),
          f"on {scores['pretrained']['n']} generated val rows", file=sys.stderr)
    # 0.05 is 2.5 standard errors of one accuracy on 500 rows (sqrt(0.25 * 0.75 / 500) = 0.019)
    assert scores["pretrained"]["n"] == 500
    assert scores["pretrained"]["acc_norm"] > max(0.30, scores["untrained"]["acc_norm"] + 0.05), scores
