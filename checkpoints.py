"""Checkpoints: the format of DESIGN.md (a dict of plain types, loaded with weights_only=True only), atomic
saves, stage checks, RNG state, file hashes, and the one place that turns a checkpoint or a GPT-2 hub name
into a model: `load_lm` (a language model: a stage's starting model, a summarizer, an evaluated model) and
`load_reward_model`. `prompt_info` is the prompt template and budgets a checkpoint was trained with.

A library: importing it has no side effects.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

import tldr
from common import UserError, atomic_write, first_line, unwrap
from model import GPT, GPTConfig, ScoreModel, build_model

CHECKPOINT_FORMAT = 1
LM_STAGES = ("pretrain", "sft", "ppo", "dpo")  # checkpoints that hold a language model (ppo: its policy)
REWARD_MODEL_STAGE = "reward_model"
REWARD_MODEL_CKPT = "reward_model.pt"      # reward_model.py's finished (normalised) checkpoint


# -----------------------------------------------------------------------------
# paths and files

def resolve_ckpt(name: str, ckpt_dir: str | os.PathLike = "checkpoints") -> Path:
    """A bare file name lives inside ckpt_dir; anything with a path separator is a path."""
    if os.sep in name or "/" in name:
        return Path(name)
    return Path(ckpt_dir) / name


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks: what names a checkpoint in caches and model cards."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -----------------------------------------------------------------------------
# state: weights and every RNG, as plain data

def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the unwrapped model, without `_orig_mod.` / `module.` prefixes."""
    sd = unwrap(model).state_dict()
    return {k.replace("_orig_mod.", "").removeprefix("module."): v for k, v in sd.items()}


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two models hold equal tensors under the same names (a policy not yet updated and its
    reference: an evaluation of one stands for both)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def rng_state() -> dict:
    """Every RNG a stage draws from, as weights_only-loadable plain data."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# -----------------------------------------------------------------------------
# save and load

def save_checkpoint(path: str | os.PathLike, *, stage: str, model: torch.nn.Module, step: int = 0,
                    config: Any = None, metrics: dict | None = None, optimizer=None, scaler=None,
                    data_state: dict | None = None, rng: dict | None = None, **extra) -> Path:
    """Atomically write the checkpoint contract of DESIGN.md: a dict of plain types only."""
    base = unwrap(model)
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "stage": stage,
        "model_config": dataclasses.asdict(base.config),
        "model": model_state_dict(base),
        "step": int(step),
        "metrics": dict(metrics or {}),
        "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config or {}),
    }
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    if scaler is not None and scaler.is_enabled():
        ckpt["scaler"] = scaler.state_dict()
    if data_state is not None:
        ckpt["data_state"] = data_state
    if rng is not None:
        ckpt["rng"] = rng
    ckpt.update(extra)
    atomic_write(path, lambda f: torch.save(ckpt, f))
    return Path(path)


def load_checkpoint(path: str | os.PathLike, stages: str | tuple[str, ...] | None = None,
                    map_location: Any = "cpu", ckpt_dir: str | os.PathLike = "checkpoints", mmap: bool = False) -> dict:
    """Load with weights_only=True (a pickle that would run code is refused) and check the stage.
    Every failure a user can cause is a UserError with one clear line. mmap: the tensors are mapped from the
    file, not read (a check of the entries costs next to nothing)."""
    path = resolve_ckpt(str(path), ckpt_dir)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e).upper():  # the pickle names a function or class: it could run code
            raise UserError(f"refusing to load {path}: it is not a plain-data checkpoint "
                            f"(its pickle references code, which could run on load)") from None
        raise UserError(f"cannot read checkpoint {path}: corrupt or truncated (not a torch checkpoint file)") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError) as e:
        raise UserError(f"cannot read checkpoint {path}: corrupt or truncated ({first_line(e)})") from None
    if not isinstance(ckpt, dict) or "stage" not in ckpt or "model" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this project (no 'stage'/'model' entries)")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} has checkpoint format {ckpt.get('format')!r}; this code reads {CHECKPOINT_FORMAT}")
    if stages is not None:
        stages = (stages,) if isinstance(stages, str) else tuple(stages)
        if ckpt["stage"] not in stages:
            raise UserError(f"{path} is a '{ckpt['stage']}' checkpoint; expected {' or '.join(stages)}")
    return ckpt


def prompt_info(ckpt: dict | None) -> dict:
    """The prompt template and token budgets a checkpoint was trained with (its "tldr" entry), or tldr.py's
    defaults for a checkpoint without one (pretraining) and for GPT-2 weights (None)."""
    return dict((ckpt or {}).get("tldr") or tldr.template_info())


# -----------------------------------------------------------------------------
# the one loader of models

def build_from_checkpoint(ckpt: dict, cls=None, dropout: float | None = None, where: Any = "checkpoint"):
    """A GPT or ScoreModel from a loaded checkpoint dict (its `model_config` and `model`); `dropout`, when
    given, replaces the trained value (0.0 for evaluation, generation and RLHF, which never use it).
    Weights that do not fit the config are one UserError naming `where` and the first tensor at fault."""
    if cls is None:
        cls = ScoreModel if "score_head.weight" in ckpt["model"] else GPT
    try:
        with torch.device("meta"):  # shapes only: no memory, and no draw from the RNG that real init uses
            expected = cls(GPTConfig.from_dict(ckpt["model_config"])).state_dict()
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{where}: its model_config does not describe a model ({first_line(e)})") from None
    given = ckpt["model"]
    for name in expected:
        if name not in given:
            raise UserError(f"{where}: weights do not fit its model_config (missing tensor {name})")
        if tuple(given[name].shape) != tuple(expected[name].shape):
            raise UserError(f"{where}: weights do not fit its model_config ({name} is {tuple(given[name].shape)}, "
                            f"the config needs {tuple(expected[name].shape)})")
    unexpected = sorted(set(given) - set(expected))
    if unexpected:
        raise UserError(f"{where}: weights do not fit its model_config (unexpected tensor {unexpected[0]})")
    return build_model(ckpt, cls, dropout)


def is_checkpoint_name(source: str, ckpt_dir: str | os.PathLike = "checkpoints") -> bool:
    """Whether a model source names a checkpoint file (an existing file, or any name ending in .pt) rather
    than GPT-2 weights (a hub name such as gpt2, or a local Hugging Face directory)."""
    return resolve_ckpt(source, ckpt_dir).is_file() or source.endswith(".pt")


def load_lm(source: str, ckpt_dir: str | os.PathLike = "checkpoints", stages: tuple[str, ...] = LM_STAGES,
            dropout: float | None = None, flag: str = "--init", hub: bool = True) -> tuple[GPT, dict | None]:
    """A language model and its checkpoint dict: from a checkpoint file of one of `stages` (a bare name
    resolves in ckpt_dir), or - when `hub` - OpenAI's GPT-2 weights by hub name (gpt2, gpt2-medium, ...)
    or from a local Hugging Face directory, with checkpoint None. `dropout` replaces the trained value when
    given (0.0 wherever the model is not being trained from scratch on more data)."""
    if not hub or is_checkpoint_name(source, ckpt_dir):
        path = resolve_ckpt(source, ckpt_dir)
        ckpt = load_checkpoint(path, stages)
        if "score_head.weight" in ckpt["model"]:
            raise UserError(f"{path} holds a score model (reward/value head), not a language model")
        return build_from_checkpoint(ckpt, GPT, dropout, where=path), ckpt
    try:
        return GPT.from_pretrained(source, **({} if dropout is None else {"dropout": dropout})), None
    except pickle.UnpicklingError:  # transformers loads pytorch_model.bin with weights_only=True
        raise UserError(f"{flag} {source!r}: its weights file is not plain tensor data (a damaged file, or a "
                        f"pickle that references code, which could run on load); nothing was loaded") from None
    except (OSError, ValueError, KeyError, ImportError, RuntimeError, EOFError) as e:
        raise UserError(f"{flag} {source!r} is neither a checkpoint in {ckpt_dir}/ nor loadable GPT-2 weights "
                        f"({first_line(e)})") from None


def load_reward_model(path: str, map_location="cpu", ckpt_dir: str | os.PathLike = "checkpoints") -> tuple[ScoreModel, dict]:
    """A trained, normalised reward model (eval mode, dropout off) and its checkpoint dict (`tldr` holds the
    prompt template and budgets it was trained with, `reward_norm` the normalisation)."""
    ckpt = load_checkpoint(path, REWARD_MODEL_STAGE, map_location, ckpt_dir)
    if "reward_norm" not in ckpt:
        raise UserError(f"{path} has no reward normalisation: it is a training snapshot, not a finished reward "
                        f"model; use the --best-ckpt checkpoint ({REWARD_MODEL_CKPT})")
    where = resolve_ckpt(str(path), ckpt_dir)
    return build_from_checkpoint(ckpt, ScoreModel, dropout=0.0, where=where).eval(), ckpt
