"""Shared test setup: CPU only, offline, project root importable."""
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers share the machine's cores: one thread each (scripts the tests start inherit it), so that
    # neither worker's OpenMP threads spin against the other's
    os.environ["OMP_NUM_THREADS"] = "1"

import fineweb  # noqa: E402  (the environment above is set before any project module loads)
import ppo  # noqa: E402
import pretrain  # noqa: E402
import reward_model  # noqa: E402
import sft  # noqa: E402
import synthetic  # noqa: E402
from common import config_from  # noqa: E402
from model import GPTConfig  # noqa: E402


# The suite runs on two pytest-xdist workers (pytest.ini: -n 2 --dist loadgroup --no-loadscope-reorder). The
# generated world's trained chain (below) is the longest job, so its tests form two groups, each on one worker:
# those that need the reward model or PPO go first (their worker trains the whole chain), those that need only
# the pretrained or SFT model go last (by then the other worker has run every other file, and the chain's first
# links it shares, built once for both workers, are ready or nearly so). The other tests stay together by file,
# so that a file's module fixtures are built once.
LATE_CHAIN = {"small_rm_ckpt", "small_ppo_run"}
EARLY_CHAIN = {"small_pretrain_ckpt", "small_sft_ckpt"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups off the markers
def pytest_collection_modifyitems(config, items):
    def group(item) -> tuple[int, str]:
        names = set(getattr(item, "fixturenames", ()))
        if names & LATE_CHAIN:
            return 0, "chain-rm-ppo"
        if names & EARLY_CHAIN:
            return 2, "chain-pretrain-sft"
        return 1, item.nodeid.split("::")[0]

    items.sort(key=lambda item: group(item)[0])  # stable: the order within each part is kept
    for item in items:
        item.add_marker(pytest.mark.xdist_group(group(item)[1]))


@pytest.fixture
def tiny_config():
    return GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=64)


def random_pretrain_ckpt(tmp_path_factory, name: str, config) -> Path:
    """A GPT of `config` at its seed-0 random init, saved as a pretrain checkpoint (a starting model for the
    trainers' and tasks' tiny runs)."""
    import torch
    from checkpoints import save_checkpoint
    from model import GPT
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(name) / "pretrain.pt"
    save_checkpoint(path, stage="pretrain", model=GPT(config))
    return path


def skip_without_cpu_fp16():
    """Skip the calling test where this torch build has no CPU float16 autocast (fp16 paths on a CPU)."""
    import torch
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.ones(2, 2) @ torch.ones(2, 2)
    except RuntimeError:
        pytest.skip("this torch has no CPU float16 autocast")


def rig_unigram(model, logits):
    """Make a GPT - ours or transformers' GPT2LMHeadModel - ignore its context: ln_f outputs the unit vector
    e0 whatever comes in, so the next-token logits are wte[:, 0], set to `logits`. A model whose every
    prediction is known by hand."""
    import torch
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.transformer.wte.weight[:, 0] = logits
    return model


def unigram_gpt(boost: dict, config, seed: int = 0):
    """A rigged GPT of `config` (rig_unigram) whose next-token logit is boost[word] for each one-token word
    and 0 for every other token."""
    import torch
    from common import get_tokenizer
    from model import GPT
    torch.manual_seed(seed)
    model = GPT(config)
    enc = get_tokenizer()
    logits = torch.zeros(config.vocab_size)
    for word, value in boost.items():
        (tok,) = enc.encode_ordinary(word)
        logits[tok] = value
    return rig_unigram(model, logits)


def run_script(args, cwd=None, env=None, timeout=300):
    """Run a project script in a fresh interpreter, as a user would; returns CompletedProcess."""
    import subprocess
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def first_rows(src: Path, out: Path, rows: dict[str, int]) -> Path:
    """out/ holding the first rows[split] lines of each src/{split}.jsonl: a small copy of a generated data set."""
    out.mkdir(parents=True, exist_ok=True)
    for split, n in rows.items():
        lines = (src / f"{split}.jsonl").read_text().splitlines()[:n]
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return out


def run_torchrun(script: str, flags: list, cwd=None, timeout: float = 300):
    """A project script under `torchrun --standalone` with 2 gloo processes on the CPU, one thread each (two
    processes of two threads on two cores would spin against each other); fails the test with the end of its
    stderr unless it exits 0, else returns the CompletedProcess."""
    r = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", ROOT / script, *flags],
                   cwd=cwd, env={"OMP_NUM_THREADS": "1"}, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


# The session fixtures below are the generated world's test chain, trained once per session and shared by
# every stage's tests: data -> pretrain -> SFT -> reward model -> PPO.

def built_once(tmp_path_factory, name: str, build) -> Path:
    """The folder `name`, filled by build(folder) once per test session for all xdist workers: the first
    worker to need it builds it under a file lock, the others wait for it and reuse it."""
    import fcntl
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the run's folder, shared by workers
    out = root / "shared" / name
    out.parent.mkdir(exist_ok=True)
    with open(out.parent / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / ".built").exists():
            shutil.rmtree(out, ignore_errors=True)  # a build that failed halfway
            out.mkdir()
            build(out)
            (out / ".built").touch()
    return out

# -----------------------------------------------------------------------------
# The generated world every stage's tests train and evaluate on (written once per test session).

@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    return built_once(tmp_path_factory, "synthetic", lambda out: synthetic.write_all(out, seed=0))


# -----------------------------------------------------------------------------
# Session fixtures of the pretraining stage: fineweb.py shards of the generated world, and a `small` model
# pretrained on them (what the HellaSwag tests evaluate and the SFT tests fine-tune).

SMALL_STEPS = 300  # `small` steps (x 512 tokens, under two minutes): the model knows the world's facts and actions


@pytest.fixture(scope="session")
def pretrain_shards(synthetic_dir, tmp_path_factory):
    """fineweb.py --preset small on the generated pretrain.jsonl: val_000000.npy + train shards."""
    def build(out):
        fineweb.main(config_from(fineweb.Config, fineweb.PRESETS, "small", input=[str(synthetic_dir / "pretrain.jsonl")],
                                 out_dir=str(out), workers=1))
    return built_once(tmp_path_factory, "pretrain_shards", build)


@pytest.fixture(scope="session")
def small_pretrain_ckpt(pretrain_shards, tmp_path_factory):
    """Path of a stage-"pretrain" checkpoint: pretrain.py --preset small for SMALL_STEPS steps."""
    def build(out):
        pretrain.main(config_from(pretrain.Config, pretrain.PRESETS, "small", data_dir=str(pretrain_shards),
                                  max_steps=SMALL_STEPS, eval_every=0, save_every=0, hellaswag_path="", num_samples=0,
                                  ckpt=str(out / "pretrain.pt"), run_name=str(out / "run")))
    return built_once(tmp_path_factory, "small_pretrain", build) / "pretrain.pt"


# -----------------------------------------------------------------------------
# Session fixture of the SFT stage: the `small` pretrained model fine-tuned on the generated TL;DR posts
# (what test_sft checks against the gold score and the reward-model tests start from).

SFT_STEPS = 100  # `small` steps (x 16 examples, half an epoch): greedy summaries clearly beat the pretrained model's


@pytest.fixture(scope="session")
def small_sft_ckpt(small_pretrain_ckpt, synthetic_dir, tmp_path_factory):
    """Path of a stage-"sft" checkpoint (best_sft.pt): sft.py --preset small for SFT_STEPS steps."""
    def build(out):
        sft.main(config_from(sft.Config, sft.PRESETS, "small", init=str(small_pretrain_ckpt),
                             data=str(synthetic_dir / "tldr"), max_steps=SFT_STEPS, eval_every=0, val_examples=64,
                             num_samples=0, ckpt_dir=str(out), run_name=str(out / "run")))
    return built_once(tmp_path_factory, "small_sft", build) / "best_sft.pt"


# -----------------------------------------------------------------------------
# Session fixture of the reward-model stage: a `small` reward model trained from the small SFT model on the
# generated comparisons (10% label noise) - what the reward-model tests check and PPO's tests load.

SMALL_RM_STEPS = 120  # x 16 pairs: about half an epoch of the 4,000 generated train pairs


@pytest.fixture(scope="session")
def small_rm_ckpt(small_sft_ckpt, synthetic_dir, tmp_path_factory):
    """Path of a stage-"reward_model" checkpoint: reward_model.py --preset small for SMALL_RM_STEPS steps,
    validated on all 500 valid pairs at the end, normalised on the 400 valid reference summaries."""
    out = tmp_path_factory.mktemp("small_rm")
    cfg = config_from(reward_model.Config, reward_model.PRESETS, "small", init=str(small_sft_ckpt),
                      data=str(synthetic_dir / "comparisons"), sft_data=str(synthetic_dir / "tldr"),
                      max_steps=SMALL_RM_STEPS, eval_every=0, save_every=0, ckpt_dir=str(out),
                      run_name=str(out / "run"))
    reward_model.main(cfg)
    return out / "reward_model.pt"


# -----------------------------------------------------------------------------
# Session fixture of the PPO stage: the `small` PPO run of the generated world's test chain (SFT fixture ->
# reward-model fixture -> PPO), what test_ppo checks learning on and the evaluation stage's oracle-judge
# test compares with the SFT model.

SMALL_PPO = dict(ppo_epochs=2, max_steps=8)  # the preset's 4 epochs and 12 steps would not fit the suite's time


@pytest.fixture(scope="session")
def small_ppo_run(small_sft_ckpt, small_rm_ckpt, synthetic_dir, tmp_path_factory):
    """(folder holding ppo_latest.pt and the run's log in run/, ppo.main's metrics, its Config)."""
    out = tmp_path_factory.mktemp("small_ppo")
    cfg = config_from(ppo.Config, ppo.PRESETS, "small", sft=str(small_sft_ckpt), rm=str(small_rm_ckpt),
                      data=str(synthetic_dir / "tldr"), eval_every=0, sample_every=0, save_every=0, ckpt_dir=str(out),
                      run_name=str(out / "run"), **SMALL_PPO)
    return out, ppo.main(cfg), cfg
