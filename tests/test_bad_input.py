"""Bad input across every command line: one row per bad input (the command, the input it builds, the
message expected). Each must end in exit code 2 with one `error:` line and no traceback, and write nothing
outside the command's output folder. The bad files are built once per test session; the commands run
in-process through the same `cli_main` as their `__main__`. The server's hostile requests are rows of
test_serve.py (test_bad_input_gets_a_clear_error, test_a_bad_row_in_a_batch_fails_alone)."""
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import common
import eval_summaries
import export
import hellaswag
import ppo
import pretrain
import reward_model
import serve
import sft
import summarize
from checkpoints import load_checkpoint, save_checkpoint
from model import GPT, GPTConfig, TOKENIZER_VOCAB


@pytest.fixture(scope="session")
def bad(synthetic_dir, tmp_path_factory):
    """The bad (and the few good) inputs every row draws from, in one read-only folder."""
    d = tmp_path_factory.mktemp("bad_inputs")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=1024, n_layer=1, n_head=1, n_embd=32))
    good = save_checkpoint(d / "pretrain.pt", stage="pretrain", model=model)
    save_checkpoint(d / "sft.pt", stage="sft", model=model)

    def altered(name, stage, change):
        ckpt = torch.load(good, weights_only=True)
        ckpt["stage"] = stage
        change(ckpt)
        torch.save(ckpt, d / name)
        return d / name

    wrong_shape = lambda c: c["model"].__setitem__("transformer.h.0.attn.c_attn.weight", torch.zeros(3, 3))
    altered("bad_shape.pt", "pretrain", wrong_shape)
    altered("bad_shape_sft.pt", "sft", wrong_shape)
    altered("missing_tensor_sft.pt", "sft", lambda c: c["model"].pop("transformer.h.0.mlp.c_fc.weight"))
    altered("no_config.pt", "pretrain", lambda c: c.__setitem__("model_config", {"n_layer": "two"}))
    (d / "truncated.pt").write_bytes(good.read_bytes()[:5000])
    torch.save({"f": os.system}, d / "evil.pt")

    # a Hugging Face folder whose weights file would run code when unpickled without weights_only
    hf = d / "hf_evil"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 1, "n_embd": 32,
                                                "n_positions": 64, "vocab_size": TOKENIZER_VOCAB}))
    torch.save({"transformer.wte.weight": os.system}, hf / "pytorch_model.bin")

    # token shards: one train shard holds an id past the GPT-2 vocabulary
    shards = d / "shards_bad_ids"
    shards.mkdir()
    tokens = np.arange(4096, dtype=np.uint16) % 1000
    np.save(shards / "val_000000.npy", tokens)
    tokens = tokens.copy()
    tokens[3000] = 60000
    np.save(shards / "train_000000.npy", tokens)

    # HellaSwag splits: a line not UTF-8, a line of 100k '['
    rows = (synthetic_dir / "hellaswag" / "hellaswag_val.jsonl").read_bytes().splitlines()[:5]
    for name, line in (("hs_not_utf8", b'{"ctx": "\xff\xfe"}'), ("hs_nested", b"[" * 100_000)):
        (d / name).mkdir()
        (d / name / "hellaswag_val.jsonl").write_bytes(b"\n".join(rows + [line]) + b"\n")
    return d


def _listing(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _sft_from(init: str):
    """The arguments of an SFT run from the bad checkpoint `init`."""
    return lambda s: ["--init", str(s.bad / init), "--data", _tldr(s), "--ckpt-dir", str(s.out)]


def _hellaswag_of(model: str, data: str = "", *extra: str, flag: str = "--ckpt"):
    """The arguments of a hellaswag.py run of `model` (a file or folder of the bad inputs) on the rows in `data`
    (a folder of the bad inputs; empty: the generated world's)."""
    return lambda s: [flag, str(s.bad / model), *extra, "--data-dir", str(s.bad / data if data else s.world / "hellaswag"),
                      "--out", str(s.out / "r.json")]


def _tldr(s):
    return str(s.world / "tldr")


# (id, module, argv built from the inputs `s`, fragment of the one error line). `s.out` is the output folder.
ROWS = [
    # flags: NaN and infinite floats, unknown and abbreviated flags, devices this machine lacks
    ("pretrain_nan_lr", pretrain, lambda s: ["--max-lr", "nan"], "argument --max-lr: must be a finite number"),
    ("sft_inf_grad_clip", sft, lambda s: ["--grad-clip", "inf"], "argument --grad-clip: must be a finite number"),
    ("ppo_nan_lr", ppo, lambda s: ["--lr", "nan"], "argument --lr: must be a finite number"),
    ("rm_nan_lr", reward_model, lambda s: ["--max-lr=-inf"], "argument --max-lr: must be a finite number"),
    ("hellaswag_abbreviated_flag", hellaswag, lambda s: ["--data", "x"], "unrecognized arguments: --data x"),
    ("summarize_nan_temperature", summarize, lambda s: ["--temperature", "nan", "post"], "must be a finite number"),
    ("summarize_float32_inf_temperature", summarize, lambda s: ["--ckpt", str(s.bad / "sft.pt"), "--temperature", "1e39", "post"],
     "--temperature: temperature must be 0 (greedy) or in [0.001, 100]"),
    ("summarize_typo_flag", summarize, lambda s: ["--tempurature", "0.5", "the post"], "unknown flag --tempurature;"),
    ("summarize_not_utf8_post", summarize, lambda s: ["--ckpt", str(s.bad / "sft.pt"), "caf\udce9 post"],
     "the post argument is not UTF-8 text"),
    ("summarize_device_tpu", summarize, lambda s: ["--ckpt", str(s.bad / "sft.pt"), "--device", "tpu", "post"],
     "unknown --device 'tpu'"),
    ("summarize_device_cuda", summarize, lambda s: ["--ckpt", str(s.bad / "sft.pt"), "--device", "cuda:0", "post"],
     "--device cuda:0: no CUDA GPU"),
    ("hellaswag_device_mps", hellaswag, _hellaswag_of("pretrain.pt", "", "--device", "mps"),
     "--device mps: Apple's MPS is not available"),
    # checkpoints: weights that do not fit their config, broken and code-running pickles
    ("summarize_bad_shape", summarize, lambda s: ["--ckpt", str(s.bad / "bad_shape_sft.pt"), "post"],
     "weights do not fit its model_config (transformer.h.0.attn.c_attn.weight is (3, 3)"),
    ("summarize_missing_tensor", summarize, lambda s: ["--ckpt", str(s.bad / "missing_tensor_sft.pt"), "post"],
     "missing tensor transformer.h.0.mlp.c_fc.weight"),
    ("sft_init_bad_config", sft, _sft_from("no_config.pt"), "its model_config does not describe a model"),
    ("sft_init_truncated", sft, _sft_from("truncated.pt"), "corrupt or truncated"),
    ("sft_init_evil", sft, _sft_from("evil.pt"), "not a plain-data checkpoint"),
    ("sft_init_evil_hf_folder", sft, _sft_from("hf_evil"), "its weights file is not plain tensor data"),
    ("pretrain_init_evil_hf_folder", pretrain, lambda s: ["--preset", "tiny", "--init-from", str(s.bad / "hf_evil"),
                                                          "--data-dir", str(s.bad / "shards_bad_ids"), "--ckpt-dir", str(s.out),
                                                          "--run-name", str(s.out / "run"), "--hellaswag-path", ""],
     "its weights file is not plain tensor data"),
    ("hellaswag_evil_hf_folder", hellaswag, _hellaswag_of("hf_evil", flag="--hf"), "its weights file is not plain tensor data"),
    ("hellaswag_bad_shape", hellaswag, _hellaswag_of("bad_shape.pt"), "weights do not fit its model_config"),
    ("reward_model_init_bad_shape", reward_model, lambda s: ["--preset", "tiny", "--init", str(s.bad / "bad_shape_sft.pt"),
                                                             "--data", str(s.world / "comparisons"), "--sft-data", _tldr(s),
                                                             "--ckpt-dir", str(s.out), "--run-name", str(s.out / "run")],
     "weights do not fit its model_config"),
    ("ppo_sft_bad_shape", ppo, lambda s: ["--preset", "tiny", "--sft", str(s.bad / "bad_shape_sft.pt"), "--rm", str(s.bad / "sft.pt"),
                                          "--data", _tldr(s), "--ckpt-dir", str(s.out), "--run-name", str(s.out / "run")],
     "weights do not fit its model_config"),
    ("export_bad_shape", export, lambda s: ["--ckpt", str(s.bad / "bad_shape_sft.pt"), "--out", str(s.out / "hf")],
     "weights do not fit its model_config"),
    ("serve_bad_shape", serve, lambda s: ["--ckpt", str(s.bad / "bad_shape_sft.pt"), "--port", "0", "--examples", ""],
     "weights do not fit its model_config"),
    ("eval_wrong_stage_rm_before_any_summary", eval_summaries,
     lambda s: ["--policies", str(s.bad / "sft.pt"), "--sft", "", "--rm", str(s.bad / "pretrain.pt"), "--data", _tldr(s),
                "--posts", "2", "--out-dir", str(s.out / "eval")],
     "is a 'pretrain' checkpoint; expected reward_model"),
    # data files: token ids past the vocabulary, HellaSwag lines not UTF-8 or nested too deeply
    ("pretrain_token_id_past_vocab", pretrain, lambda s: ["--preset", "tiny", "--data-dir", str(s.bad / "shards_bad_ids"),
                                                          "--ckpt-dir", str(s.out), "--run-name", str(s.out / "run"),
                                                          "--hellaswag-path", "", "--no-compile"],
     "train_000000.npy holds token id 60000, outside the GPT-2 vocabulary"),
    ("hellaswag_not_utf8", hellaswag, _hellaswag_of("pretrain.pt", "hs_not_utf8"), "hellaswag_val.jsonl, line 6: not UTF-8 text"),
    ("pretrain_hellaswag_not_utf8", pretrain, lambda s: ["--preset", "tiny", "--data-dir", str(s.bad / "shards_bad_ids"),
                                                         "--hellaswag-path", str(s.bad / "hs_not_utf8" / "hellaswag_val.jsonl"),
                                                         "--ckpt-dir", str(s.out), "--run-name", str(s.out / "run")],
     "line 6: not UTF-8 text"),
    ("hellaswag_nested_json", hellaswag, _hellaswag_of("pretrain.pt", "hs_nested"), "line 6: not valid JSON (nested too deeply)"),
]


def run_cli(module, argv):
    """A command's `__main__` path, in-process: its exit code (0 when main returned)."""
    try:
        if module is summarize:
            summarize.cli(argv)
        else:
            common.cli_main(module.main, module.Config, getattr(module, "PRESETS", None), argv=argv)
    except SystemExit as e:
        return e.code
    return 0


@pytest.mark.parametrize("module,build,message", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(module, build, message, bad, synthetic_dir, tmp_path,
                                                          monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # where a command's default paths (checkpoints/, runs/) would land
    s = SimpleNamespace(bad=bad, world=synthetic_dir, out=work / "out")
    inputs_before = _listing(bad)
    code = run_cli(module, build(s))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err
    assert lines and lines[-1].startswith("error: ") and message in lines[-1], err
    assert not [line for line in lines[:-1] if line.startswith("error")], err  # one error line (notes may precede it)
    assert _listing(bad) == inputs_before, "an input file was changed"
    outside = sorted(p for p in _listing(work) if not p.startswith("out/"))
    assert not outside, f"files written outside the output folder: {outside}"
    load_checkpoint(bad / "pretrain.pt")  # the good checkpoint beside the bad ones still loads


def test_stale_temp_files_of_dead_processes_are_removed_on_the_next_save(bad, tmp_path):
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".ck.pt.{dead_pid}.tmp"
    stale.write_bytes(b"x" * 1000)
    minutes_ago = time.time() - 5 * 60
    os.utime(stale, (minutes_ago, minutes_ago))
    live = tmp_path / f".other.pt.{os.getppid()}.tmp"  # a live process's save in progress
    live.write_bytes(b"y")
    os.utime(live, (minutes_ago, minutes_ago))
    fresh = tmp_path / f".remote.pt.{dead_pid}.tmp"  # being written by a process of another node
    fresh.write_bytes(b"z")
    ckpt = load_checkpoint(bad / "pretrain.pt")
    model = GPT(GPTConfig.from_dict(ckpt["model_config"]))
    save_checkpoint(tmp_path / "ck.pt", stage="pretrain", model=model)
    assert not stale.exists() and live.exists() and fresh.exists()
    assert load_checkpoint(tmp_path / "ck.pt")["stage"] == "pretrain"
