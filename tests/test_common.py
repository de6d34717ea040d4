import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field

import pytest
import torch

import common
from checkpoints import load_checkpoint, resolve_ckpt, rng_state, save_checkpoint, set_rng_state
from common import UserError
from conftest import ROOT, run_script
from model import GPT, build_model
from training import RunLogger, grad_accum_steps, lr_at


def _saved(tmp_path, tiny_config, stage="pretrain", name="a.pt", **kw):
    torch.manual_seed(0)
    model = GPT(tiny_config).eval()
    path = save_checkpoint(tmp_path / name, stage=stage, model=model, step=7, metrics={"val_loss": 1.5}, **kw)
    return model, path


def test_checkpoint_roundtrip_weights_only(tmp_path, tiny_config):
    model, path = _saved(tmp_path, tiny_config)
    ckpt = torch.load(path, weights_only=True)  # the contract: plain data only
    assert ckpt["format"] == 1 and ckpt["stage"] == "pretrain" and ckpt["step"] == 7
    loaded = build_model(load_checkpoint(path, "pretrain")).eval()
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])


def test_optimizer_scaler_and_rng_state_roundtrip(tmp_path, tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    opt = model.configure_optimizers(0.1, 1e-3)
    model(torch.randint(0, 100, (1, 8)), targets=torch.randint(0, 100, (1, 8)))[1].backward()
    opt.step()
    rng = rng_state()
    path = save_checkpoint(tmp_path / "b.pt", stage="pretrain", model=model, optimizer=opt, rng=rng)
    ckpt = load_checkpoint(path)
    expected = torch.rand(3)
    set_rng_state(ckpt["rng"])
    assert torch.equal(torch.rand(3), expected)
    opt2 = GPT(tiny_config).configure_optimizers(0.1, 1e-3)
    opt2.load_state_dict(ckpt["optimizer"])
    assert opt2.state_dict()["state"][0]["step"] == 1


def test_no_orig_mod_keys_after_compile(tmp_path, tiny_config):
    model = GPT(tiny_config)
    compiled = torch.compile(model)
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    path = save_checkpoint(tmp_path / "c.pt", stage="pretrain", model=compiled)
    keys = load_checkpoint(path)["model"].keys()
    assert keys and not any("_orig_mod" in k for k in keys)


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    # the child saves a small good checkpoint, then a very large one; we kill it mid-write
    child = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from checkpoints import save_checkpoint
        from model import GPT, GPTConfig
        m = GPT(GPTConfig(block_size=32, n_layer=1, n_head=1, n_embd=16))
        save_checkpoint({str(tmp_path / 'ck.pt')!r}, stage='pretrain', model=m, step=1)
        print('saved', flush=True)
        big = torch.zeros(400_000_000, dtype=torch.uint8)
        save_checkpoint({str(tmp_path / 'ck.pt')!r}, stage='pretrain', model=m, step=2, blob=big)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saved"
    deadline = time.time() + 60
    while not list(tmp_path.glob(".ck.pt.*.tmp")) and time.time() < deadline:
        time.sleep(0.005)
    assert list(tmp_path.glob(".ck.pt.*.tmp")), "the second save never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(tmp_path / "ck.pt")["step"] == 1


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "stage": "pretrain", "model": {}, "payload": Evil()}, path)
    with pytest.raises(UserError, match="not a plain-data checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


CLI = textwrap.dedent("""
    import sys
    from dataclasses import dataclass
    sys.path.insert(0, {root!r})
    import checkpoints
    import common

    @dataclass
    class Config:
        ckpt: str = "x.pt"  # checkpoint to inspect
        ckpt_dir: str = "checkpoints"  # where bare names live

    def main(cfg):
        ckpt = checkpoints.load_checkpoint(cfg.ckpt, "sft", ckpt_dir=cfg.ckpt_dir)
        print("stage", ckpt["stage"])

    common.cli_main(main, Config)
""")


@pytest.mark.parametrize("case", ["missing", "truncated", "wrong_stage", "garbage", "evil"])
def test_user_errors_are_one_line_exit_2(tmp_path, tiny_config, case):
    script = tmp_path / "inspect_ckpt.py"
    script.write_text(CLI.format(root=str(ROOT)))
    _, good = _saved(tmp_path, tiny_config, stage="pretrain", name="pre.pt")
    if case == "missing":
        target, expect = "nothere.pt", "checkpoint not found"
    elif case == "truncated":
        data = good.read_bytes()
        (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
        target, expect = "trunc.pt", "corrupt or truncated"
    elif case == "wrong_stage":
        target, expect = "pre.pt", "is a 'pretrain' checkpoint; expected sft"
    elif case == "garbage":
        (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
        target, expect = "junk.pt", "corrupt or truncated"
    else:
        torch.save({"f": os.system}, tmp_path / "evil.pt")
        target, expect = "evil.pt", "not a plain-data checkpoint"
    res = run_script([script, "--ckpt", target, "--ckpt-dir", tmp_path])
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_bare_names_resolve_inside_ckpt_dir():
    assert resolve_ckpt("best_sft.pt", "ck") == common.Path("ck/best_sft.pt")
    assert resolve_ckpt("runs/x.pt", "ck") == common.Path("runs/x.pt")


@pytest.mark.parametrize("capability,expected", [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16),
                                                 ((7, 5), torch.float16)])
def test_dtype_auto_by_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # T4 says True: ignored
    assert common.select_dtype("auto", "cuda") == expected
    rt = common.Runtime(torch.device("cpu"), "cpu", expected, False, 0, 0, 1)
    assert rt.grad_scaler().is_enabled() == (expected == torch.float16)


def test_dtype_auto_cpu_is_fp32_and_explicit_choices():
    assert common.select_dtype("auto", "cpu") == torch.float32
    assert common.select_dtype("auto", "mps") == torch.float32
    assert common.select_dtype("float16", "cuda", (9, 0)) == torch.float16
    with pytest.raises(UserError):
        common.select_dtype("int8", "cpu")


def test_tokenizer_offline_without_env(tmp_path):
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import common; print(common.get_tokenizer().encode('hello world'))"
    env = {k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")}
    env.update(https_proxy="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9", TMPDIR=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[31373, 995]"


@dataclass
class _Cfg:
    max_steps: int = 10  # optimizer steps
    learning_rate: float = 1e-3  # peak LR
    compile: bool = False  # torch.compile the model
    init: str | None = None  # starting checkpoint
    files: list[str] = field(default_factory=list)  # input files
    preset: str = "none"  # the preset used


def test_parse_config_flags_presets_and_help(capsys):
    presets = {"tiny": {"max_steps": 3, "learning_rate": 0.5}}
    cfg = common.parse_config(_Cfg, presets, ["--preset", "tiny", "--learning-rate", "0.25", "--compile",
                                              "--files", "a", "b"])
    assert (cfg.max_steps, cfg.learning_rate, cfg.compile, cfg.files, cfg.preset) == (3, 0.25, True, ["a", "b"], "tiny")
    assert common.parse_config(_Cfg, presets, ["--no-compile"]).compile is False
    assert common.parse_config(_Cfg, presets, ["--files", "a", "--files", "b", "c"]).files == ["a", "b", "c"]  # repeatable
    with pytest.raises(SystemExit) as e:
        common.parse_config(_Cfg, presets, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--max-steps" in out and "optimizer steps" in out and "--preset" in out
    with pytest.raises(SystemExit) as e:
        common.parse_config(_Cfg, presets, ["--max-steps", "many"])
    assert e.value.code == 2


def test_lr_schedule_warmup_then_cosine():
    lrs = [lr_at(s, 1.0, 0.1, 10, 110) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55) and lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_grad_accum_steps_checked():
    assert grad_accum_steps(524288, 16 * 1024, 2) == 16
    with pytest.raises(UserError, match="not a positive multiple"):
        grad_accum_steps(1000, 64, 2)


def test_mfu_peaks():
    assert common.gpu_peak_tflops("Tesla T4") == 65.0
    assert common.gpu_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert common.gpu_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert common.gpu_peak_tflops("Some Unknown GPU") is None


def test_run_logger_writes_jsonl(tmp_path, capsys):
    log = RunLogger(tmp_path / "run", config={"a": 1})
    log.log({"loss": torch.tensor(2.5), "lr": 6e-4}, step=3)
    import json
    rec = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert rec["step"] == 3 and rec["loss"] == 2.5 and rec["kind"] == "train"
    assert "step 3 | loss 2.5000" in capsys.readouterr().out


def test_check_flags_names_the_flag_out_of_range():
    @dataclass
    class Cfg:
        micro_batch: int = 4
        warmup_steps: int = 0

    cfg = Cfg()
    common.check_flags(cfg, positive=("micro_batch",), non_negative=("warmup_steps",))  # in range: no error
    cfg.micro_batch = 0
    with pytest.raises(UserError, match=r"^--micro-batch must be positive, got 0$"):
        common.check_flags(cfg, positive=("micro_batch",), non_negative=("warmup_steps",))
    cfg.micro_batch, cfg.warmup_steps = 4, -1
    with pytest.raises(UserError, match=r"^--warmup-steps must not be negative, got -1$"):
        common.check_flags(cfg, positive=("micro_batch",), non_negative=("warmup_steps",))


def test_devices_are_checked_when_resolved(monkeypatch):
    assert common.resolve_device("cpu") == "cpu"
    for bad, message in (("tpu", "unknown --device 'tpu'"), ("cpu:1", "unknown --device"), ("cuda:x", "unknown --device")):
        with pytest.raises(UserError, match=message):
            common.resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA GPU is available"):
        common.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert common.resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(UserError, match="has 2 CUDA device"):
        common.resolve_device("cuda:2")


@pytest.mark.parametrize("text,ok", [("3e-4", True), ("-1", True), ("nan", False), ("inf", False), ("-inf", False),
                                     ("1e999", False), ("x", False)])
def test_float_flags_must_be_finite(text, ok):
    import argparse
    if ok:
        assert common.finite_float(text) == float(text)
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            common.finite_float(text)


def test_first_line_is_cut_at_a_sentence_or_word_end():
    assert common.first_line(ValueError("short.\nsecond line")) == "short."
    assert common.first_line(RuntimeError("One sentence. " + "x " * 150), limit=50) == "One sentence."
    assert common.first_line(RuntimeError("word " * 100), limit=23) == "word word word word ..."
    assert common.first_line(KeyError()) == "KeyError"
