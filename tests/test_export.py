"""export.py: the Hugging Face directory loads in transformers offline, its tokenizer is tiktoken's GPT-2
and its greedy summary is ours; the card carries the evaluation figures of this checkpoint only; the Hub
upload is called with the directory, and fails in one line offline."""
import json
import os
import stat
from pathlib import Path

import pytest
import torch

import export
import tldr
from checkpoints import save_checkpoint
from common import UserError, config_from, get_tokenizer
from conftest import ROOT
from eval_summaries import file_sha256
from model import GPT, GPTConfig
from summaries import generate_summaries

INFO = tldr.template_info(max_prompt_tokens=200, max_summary_tokens=24)
POST = tldr.Post("My roommate (25M) keeps eating my food. It's been two months; a note on the fridge did nothing. "
                 "Should I confront him about it?", "Roommate eats my food", "roommates")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    torch.manual_seed(2)
    model = GPT(GPTConfig(block_size=256, n_layer=1, n_head=2, n_embd=32))
    with torch.no_grad():  # peaked logits: a greedy summary that depends on the weights, no near-ties
        model.transformer.wte.weight.mul_(25)
        model.transformer.ln_f.weight.normal_()
    ckpt = save_checkpoint(out / "ppo_latest.pt", stage="ppo", model=model, tldr=INFO, step=12,
                           config={"sft": "best_sft.pt", "rm": "reward_model.pt", "kl_coef": 0.05, "data": "data/synthetic/tldr"})
    entry = {"sha256": file_sha256(ckpt), "stage": "ppo", "rouge1": 0.31, "rouge2": 0.12, "rougeL": 0.25, "words": 21.5,
             "eos_rate": 0.75, "copied_trigrams": 0.4, "win_rates": {"reward_model": {"reference": {
                 "wins": 3, "ties": 0, "losses": 1, "n": 4, "win_rate": 0.75, "ci95": [0.3006, 0.9544]}}}}
    (out / "eval.json").write_text(json.dumps({"data": "CarperAI/openai_summarize_tldr", "split": "test", "posts": 4,
                                               "judge": None, "models": {"ppo_latest": entry}}))
    export.main(config_from(export.Config, None, None, ckpt=str(ckpt), out=str(out / "hf"), eval=str(out / "eval.json")))
    return out, model


def test_exported_directory_loads_offline_and_summarizes_as_we_do(exported):
    from transformers import AutoTokenizer, pipeline
    out, model = exported
    hf = out / "hf"
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tldr.json", "README.md"} \
        <= {p.name for p in hf.iterdir()}
    gen = json.loads((hf / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["max_new_tokens"], gen["do_sample"]) == (50256, 24, False)
    assert json.loads((hf / "tldr.json").read_text()) == INFO

    # the tokenizer is tiktoken's gpt2, byte for byte, special token included
    tok = AutoTokenizer.from_pretrained(hf)
    text = "SUBREDDIT: r/test\nTITLE: Héllo  wörld 😀\nPOST: I've   been there...\n\n\tTL;DR: ok<|endoftext|>"
    assert tok(text)["input_ids"] == get_tokenizer().encode(text, allowed_special="all")
    assert tok.eos_token_id == 50256

    # our summarizer's greedy summary (the prompt fits the budget: nothing is cut)
    ids, truncated = tldr.prompt_tokens(POST, INFO["max_prompt_tokens"], INFO["template"])
    assert not truncated
    ours = generate_summaries(model, [POST], max_new_tokens=INFO["max_summary_tokens"],
                                   max_prompt_tokens=INFO["max_prompt_tokens"], template=INFO["template"])[0]
    assert ours
    summarize = pipeline("text-generation", model=str(hf), device="cpu")
    got = summarize(tldr.render_prompt(POST, INFO["template"]), return_full_text=False)[0]["generated_text"]
    assert got.strip() == ours


def test_model_card_says_how_it_was_trained_and_its_figures(exported, tmp_path):
    out, _ = exported
    card = (out / "hf" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\n")
    assert "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:" in card
    assert "12 steps from the SFT model `best_sft.pt`" in card and "(beta 0.05)" in card
    assert "| ROUGE-1 / ROUGE-2 / ROUGE-L | 0.310 / 0.120 / 0.250 |" in card
    assert "| win rate against the reference summaries, by the reward model | 75.0% (95% CI 30.1-95.4, n=4) |" in card
    # figures of another checkpoint are refused, not copied into the card
    other = tmp_path / "other.pt"
    save_checkpoint(other, stage="sft", model=GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32)), tldr=INFO)
    with pytest.raises(UserError, match="holds no figures of this checkpoint"):
        export.main(config_from(export.Config, None, None, ckpt=str(other), out=str(tmp_path / "x"),
                                eval=str(out / "eval.json")))
    with pytest.raises(UserError, match="--out DIR is required"):
        export.main(config_from(export.Config, None, None, ckpt=str(other)))


def test_push_to_hub_uploads_the_directory_and_fails_cleanly_offline(exported, tmp_path, monkeypatch):
    out, _ = exported
    calls = []

    class FakeApi:
        def create_repo(self, repo, **kw):
            calls.append(("create", repo, kw["private"], kw["exist_ok"]))

        def upload_folder(self, folder_path, repo_id, **kw):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    import huggingface_hub
    real = huggingface_hub.HfApi
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    export.main(config_from(export.Config, None, None, ckpt=str(out / "ppo_latest.pt"), out=str(tmp_path / "hf"),
                            push_to_hub="someone/tldr-ppo", private=True))
    assert calls[0] == ("create", "someone/tldr-ppo", True, True)
    assert calls[1][:2] == ("upload", "someone/tldr-ppo") and "model.safetensors" in calls[1][2]
    assert "summarize = pipeline(\"text-generation\", model=\"someone/tldr-ppo\")" in (tmp_path / "hf" / "README.md").read_text()

    monkeypatch.setattr(huggingface_hub, "HfApi", real)   # the real client, offline (HF_HUB_OFFLINE=1 in the tests)
    with pytest.raises(UserError, match=r"cannot push to the Hub repo someone/tldr-ppo .*; .* is written"):
        export.push(tmp_path / "hf", "someone/tldr-ppo", False)
    with pytest.raises(UserError, match="owner/name"):
        export.main(config_from(export.Config, None, None, ckpt=str(out / "ppo_latest.pt"), out=str(tmp_path / "y"),
                                push_to_hub="no-owner"))


def _export(ckpt, out, **kw):
    return export.main(config_from(export.Config, None, None, ckpt=str(ckpt), out=str(out), **kw))


def test_out_folder_of_the_user_is_refused_unless_overwrite(exported, tmp_path):
    """A non-empty --out that is not an earlier export keeps the user's files (refused before any work);
    --overwrite replaces it whole; an earlier export is replaced without asking; files get the modes of
    normal new files (the umask's), model.safetensors included; nothing is left beside --out."""
    out, _ = exported
    ckpt = out / "ppo_latest.pt"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my notes\n")
    (mine / "config.json").write_text("{\"mine\": true}\n")
    with pytest.raises(UserError, match="non-empty folder that is not an earlier export.*--overwrite"):
        _export(ckpt, mine)
    assert (mine / "README.md").read_text() == "my notes\n" and sorted(p.name for p in mine.iterdir()) == \
        ["README.md", "config.json"]

    old_mask = os.umask(0o022)
    try:
        _export(ckpt, mine, overwrite=True)
    finally:
        os.umask(old_mask)
    assert "my notes" not in (mine / "README.md").read_text() and (mine / "model.safetensors").is_file()
    assert {stat.S_IMODE(p.stat().st_mode) for p in mine.iterdir()} == {0o644}
    assert stat.S_IMODE(mine.stat().st_mode) == 0o755
    assert export.is_earlier_export(mine)

    _export(ckpt, mine)  # an earlier export: replaced in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging or old folder left


def test_failed_or_impossible_export_leaves_nothing(exported, tmp_path, monkeypatch):
    out, _ = exported
    ckpt = out / "ppo_latest.pt"
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(UserError, match="exists and is not a directory"):
        _export(ckpt, afile)
    with pytest.raises(UserError, match="cannot write --out"):  # NotADirectoryError under a file
        _export(ckpt, afile / "hf")
    with pytest.raises(UserError, match="cannot write --out"):  # a name over the file system's limit
        _export(ckpt, tmp_path / ("x" * 300))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(export, "save_tokenizer", disk_full)
    with pytest.raises(UserError, match="cannot write --out .*No space left on device"):
        _export(ckpt, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # neither --out nor a half-made folder


def test_card_license_is_true_and_a_demo_model_says_so(exported):
    out, _ = exported
    card = (out / "hf" / "README.md").read_text()
    assert "license: mit" in card and "MIT License" in (ROOT / "LICENSE").read_text()
    # the fixture's checkpoint was trained on data/synthetic/tldr: the generated world
    assert "A demo model, not a real summarizer" in card and "`data/synthetic/tldr`" in card
    real = {"stage": "sft", "step": 5, "config": {"data": "CarperAI/openai_summarize_tldr", "init": "gpt2"}, "metrics": {}}
    assert not export.trained_on_generated_world(real)
    assert not any("demo model" in line for line in export.training_lines(real))
    assert export.trained_on_generated_world({**real, "config": {"data": "/elsewhere/tldr", "gold_samples": 64}})
    assert "/hf/" in (ROOT / ".gitignore").read_text().split()


def test_card_of_a_dpo_policy_says_dpo():
    dpo = {"stage": "dpo", "step": 48, "metrics": {},
           "config": {"sft": "best_sft.pt", "comparisons": "CarperAI/openai_summarize_comparisons", "beta": 0.1,
                      "loss": "sigmoid", "gold": "auto"}}
    lines = export.training_lines(dpo)
    assert lines[0].startswith("- DPO (Rafailov et al. 2023; loss `sigmoid`, beta 0.1) for 48 steps from the SFT model `best_sft.pt`")
    assert "CarperAI/openai_summarize_comparisons" in lines[0] and not any("Pretraining only" in line for line in lines)
    assert not export.trained_on_generated_world(dpo)
    assert export.trained_on_generated_world({**dpo, "config": {**dpo["config"], "gold": "on"}})
