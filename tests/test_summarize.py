"""summarize.py: the post as an argument and on stdin (a real process), the PPO → SFT checkpoint
fallback and its errors, empty and non-UTF-8 input, an over-long post cut as in training, sampling."""
import io
import sys

import pytest
import torch

import summarize
import tldr
from checkpoints import save_checkpoint
from common import UserError, config_from
from conftest import ROOT, run_script
from model import GPT, GPTConfig, ScoreModel
from summaries import decode_summary

INFO = tldr.template_info(max_prompt_tokens=48, max_summary_tokens=10)
POST = tldr.Post("My roommate keeps eating my food and I don't know what to do about it.", "Food thief", "roommates")


def _lm(seed: int) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32))
    with torch.no_grad():  # peaked logits, and no copying of the last token: a summary depends on the weights
        model.transformer.wte.weight.mul_(25)
        model.transformer.ln_f.weight.normal_()
    return model.eval()


def _greedy(model: GPT, post: tldr.Post, info=INFO) -> str:
    """Independent reference: the training prompt, the plain KV-cache generate, decoded up to EOS."""
    ids, _ = tldr.prompt_tokens(post, min(info["max_prompt_tokens"], model.config.block_size - info["max_summary_tokens"]),
                                info["template"])
    tokens, _, mask = model.generate(torch.tensor([ids]), max_new_tokens=info["max_summary_tokens"], temperature=0.0)
    return decode_summary(tokens[0][mask[0].bool()].tolist())


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A folder with ppo_latest.pt and best_sft.pt of two different tiny models, and one with SFT only."""
    both, sft_only = tmp_path_factory.mktemp("both"), tmp_path_factory.mktemp("sft_only")
    ppo_model, sft_model = _lm(1), _lm(2)
    save_checkpoint(both / "ppo_latest.pt", stage="ppo", model=ppo_model, tldr=INFO)
    for d in (both, sft_only):
        save_checkpoint(d / "best_sft.pt", stage="sft", model=sft_model, tldr=INFO)
    save_checkpoint(both / "rm.pt", stage="reward_model", model=ScoreModel(sft_model.config), tldr=INFO)
    assert _greedy(ppo_model, POST) != _greedy(sft_model, POST)  # so that the tests can tell them apart
    return {"both": both, "sft_only": sft_only, "ppo": ppo_model, "sft": sft_model}


def _run(monkeypatch, capsys, stdin: bytes | None = None, **overrides):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    out = summarize.main(config_from(summarize.Config, None, None, device="cpu", **overrides))
    captured = capsys.readouterr()
    return out, captured.out, captured.err


def test_cli_argument_and_stdin(ckpts):
    """Real processes: the post as the argument, then on stdin; both print the PPO model's greedy summary."""
    expected = _greedy(ckpts["ppo"], POST)
    args = [ROOT / "summarize.py", "--ckpt-dir", ckpts["both"], "--title", POST.title, "--subreddit", "r/roommates"]
    r = run_script([*args, POST.post])
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"
    import subprocess
    r = subprocess.run([sys.executable, *map(str, args), "-"], input=POST.post.encode(), capture_output=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == expected + "\n"


def test_fallback_to_sft_and_missing_checkpoints(ckpts, tmp_path, monkeypatch, capsys):
    out, stdout, err = _run(monkeypatch, capsys, post=POST.post, title=POST.title, subreddit=POST.subreddit,
                            ckpt_dir=str(ckpts["sft_only"]))
    assert out == [_greedy(ckpts["sft"], POST)] and stdout == out[0] + "\n"
    assert "ppo_latest.pt not found" in err and "best_sft.pt" in err
    with pytest.raises(UserError, match=r"neither .*ppo_latest\.pt.* nor .*best_sft\.pt"):
        _run(monkeypatch, capsys, post="a post", ckpt_dir=str(tmp_path))
    with pytest.raises(UserError, match="checkpoint not found"):  # an explicit --ckpt never falls back
        _run(monkeypatch, capsys, post="a post", ckpt="mine.pt", ckpt_dir=str(ckpts["both"]))
    with pytest.raises(UserError, match="'reward_model' checkpoint; expected ppo or sft"):
        _run(monkeypatch, capsys, post="a post", ckpt="rm.pt", ckpt_dir=str(ckpts["both"]))


def test_empty_and_non_utf8_input(ckpts, monkeypatch, capsys):
    with pytest.raises(UserError, match="the post is empty"):
        _run(monkeypatch, capsys, post="   \n ", ckpt_dir=str(ckpts["both"]))
    with pytest.raises(UserError, match="the post is empty"):
        _run(monkeypatch, capsys, stdin=b"\n\n", ckpt_dir=str(ckpts["both"]))
    with pytest.raises(UserError, match="not UTF-8"):
        _run(monkeypatch, capsys, stdin="café".encode("latin-1"), ckpt_dir=str(ckpts["both"]))
    out, _, _ = _run(monkeypatch, capsys, stdin="Ünïcode post – fine\n".encode(), ckpt_dir=str(ckpts["both"]))
    assert len(out) == 1


def test_over_long_post_is_cut_as_in_training(ckpts, monkeypatch, capsys):
    long_post = tldr.Post("\n".join(f"Line {i} of a very long story about my roommate and the food." for i in range(60)),
                          "Long", "roommates")
    out, _, err = _run(monkeypatch, capsys, post=long_post.post, title="Long", subreddit="roommates",
                       ckpt_dir=str(ckpts["both"]))
    assert "over the model's 48-token budget" in err and "as in training" in err
    ids, truncated = tldr.prompt_tokens(long_post, 48, INFO["template"])
    assert truncated and len(ids) <= 48
    assert out == [_greedy(ckpts["ppo"], long_post)]
    _, _, err = _run(monkeypatch, capsys, post=POST.post, ckpt_dir=str(ckpts["both"]))
    assert "budget" not in err  # a post that fits gets no note


def test_sampling_flags_and_positional_parsing(ckpts, monkeypatch, capsys):
    kw = dict(post=POST.post, ckpt_dir=str(ckpts["both"]), temperature=1.0, top_k=50, num_samples=3, seed=7)
    out, stdout, _ = _run(monkeypatch, capsys, **kw)
    assert len(out) == 3 and len(set(out)) > 1 and stdout.count("\n") >= 3
    assert _run(monkeypatch, capsys, **kw)[0] == out  # --seed makes it reproducible
    with pytest.raises(UserError, match="needs --temperature"):
        _run(monkeypatch, capsys, post="x", num_samples=2, ckpt_dir=str(ckpts["both"]))

    split = summarize.split_positional
    assert split(["--title", "My title", "the post", "--top-k", "5"]) == \
        ["--title", "My title", "--top-k", "5", "--post=the post"]
    assert split(["--temperature", "0.5", "-"]) == ["--temperature", "0.5", "--post=-"]
    with pytest.raises(UserError, match="unknown flag --temp;"):  # flags are never abbreviated
        split(["--temp", "0.5", "-"])
    with pytest.raises(UserError, match="unknown flag --tempurature;"):  # not taken for the post's words
        split(["--tempurature", "0.5", "the post"])
    assert split(["--", "--starts with dashes"]) == ["--post=--starts with dashes"]
    assert split(["--title=T"]) == ["--title=T"]
    with pytest.raises(UserError, match="one argument"):
        split(["two", "words"])


def test_default_folder_falls_back_to_its_one_run_folder(ckpts, tmp_path, monkeypatch, capsys):
    """After `make demo` the models are in checkpoints/small/: the documented `python summarize.py "post"`
    (checkpoints/ by default) uses that folder and says so; two run folders are an error naming both."""
    import shutil
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ckpts["both"], tmp_path / "checkpoints" / "small")
    out, _, err = _run(monkeypatch, capsys, post=POST.post, title=POST.title, subreddit=POST.subreddit)
    assert out == [_greedy(ckpts["ppo"], POST)]
    assert "using the run folder checkpoints/small" in err
    shutil.copytree(ckpts["sft_only"], tmp_path / "checkpoints" / "other")
    with pytest.raises(UserError, match=r"2 of its run folders hold one \(other, small\).*--ckpt-dir checkpoints/NAME"):
        _run(monkeypatch, capsys, post=POST.post)
    out, _, err = _run(monkeypatch, capsys, post=POST.post, title=POST.title, subreddit=POST.subreddit,
                       ckpt_dir="checkpoints/other")
    assert out == [_greedy(ckpts["sft"], POST)] and "run folder" not in err
