"""Shared test setup: CPU only, offline, project root importable."""
import os
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


@pytest.fixture
def tiny_config():
    from model import GPTConfig
    return GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=64)


def skip_without_cpu_fp16():
    """Skip the calling test where this torch build has no CPU float16 autocast (fp16 paths on a CPU)."""
    import torch
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.ones(2, 2) @ torch.ones(2, 2)
    except RuntimeError:
        pytest.skip("this torch has no CPU float16 autocast")


def run_script(args, cwd=None, env=None, timeout=300):
    """Run a project script in a fresh interpreter, as a user would; returns CompletedProcess."""
    import subprocess
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# Session fixtures that several stages share (a pretrained small model, an SFT model, ...) live in
# tests/fixtures_<stage>.py next to the stage that owns them; they are gathered here so pytest finds them.
def _gather_fixture_modules():
    import importlib
    for path in sorted(Path(__file__).parent.glob("fixtures_*.py")):
        module = importlib.import_module(path.stem)
        for name, value in vars(module).items():
            if hasattr(value, "_fixture_function_marker") or type(value).__name__ == "FixtureFunctionDefinition":
                globals()[name] = value


_gather_fixture_modules()
