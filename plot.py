"""Plots of a run from its JSONL logs (what every stage writes to runs/<run-name>/log.jsonl): training and
validation loss per stage, HellaSwag over pretraining, reward and KL over PPO steps, DPO's implicit-reward
accuracy, margin and KL. PNG files, matplotlib without a display.

    python plot.py --run-dir runs/small                      # after ./run.sh small: runs/small/*.png
    python plot.py --run-dir runs                            # stages run by hand: runs/pretrain, runs/sft, ...
    python plot.py --logs runs/pretrain/log.jsonl runs/gpt2/pretrain/log.jsonl --out-dir plots   # any logs

Which plot a log joins is decided by what it holds, not by its name: a log with `loss` / `val_loss`
gets a loss panel, one with HellaSwag scores a HellaSwag panel, one with `rm_score` / `kl` (PPO) a reward
and a KL panel, one with `val_accuracy` / `val_margin` (DPO) dpo.png. Metrics a log lacks are skipped; a plot
with nothing to show is not written. When a resumed run logged a step twice, the later record wins.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from common import UserError, cli_main
from training import read_log


@dataclass
class Config:
    run_dir: str = "runs/small"                      # a folder whose subfolders hold log.jsonl (one per stage)
    logs: list[str] = field(default_factory=list)    # log.jsonl files to plot instead (each named by its folder)
    out_dir: str = ""                                # where the PNGs go (default: --run-dir)


STAGE_ORDER = ("pretrain", "sft", "reward_model", "ppo", "dpo")
HELLASWAG_KEYS = {"hellaswag_acc_norm": "completion acc_norm", "hellaswag_harness_acc_norm": "harness acc_norm"}


# -----------------------------------------------------------------------------
# reading logs (training.read_log; report.py reads them through these too)

def number(v) -> float | None:
    """v as a float when it is a finite number, else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def series(records: list[dict], key: str, kind: str = "eval") -> list[tuple[int, float]]:
    """(step, value) of every `kind` record with a finite number under `key`."""
    return [(r["step"], number(r[key])) for r in records
            if r.get("kind") == kind and "step" in r and number(r.get(key)) is not None]


def find_logs(run_dir: str | Path) -> dict[str, Path]:
    """{stage folder name: log.jsonl} of the subfolders of run_dir, the pipeline's stages first."""
    run_dir = Path(run_dir)
    found = {p.parent.name: p for p in sorted(run_dir.glob("*/log.jsonl"))}
    order = [s for s in STAGE_ORDER if s in found] + [s for s in found if s not in STAGE_ORDER]
    return {s: found[s] for s in order}


# -----------------------------------------------------------------------------
# plots: each returns the path written, or None when its logs hold nothing to plot

def _figure(n_panels: int, height: float = 3.2):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = min(n_panels, 3)
    rows = math.ceil(n_panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, height * rows), squeeze=False)
    for ax in axes.flat[n_panels:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat)


def _label(ax, title: str, xlabel: str, ylabel: str | None, title_size: float | None = None, legend_size: float = 8):
    """A panel's title, axis labels, grid and legend."""
    ax.set_title(title, fontsize=title_size)
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def _save_panels(plt, fig, axes, titles: tuple[str, ...], xlabel: str, path: Path) -> Path:
    """The three-panel figures (PPO, DPO): each panel titled, labelled small, then saved."""
    for ax, title in zip(axes, titles):
        _label(ax, title, xlabel, None, title_size=10, legend_size=7)
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_losses(logs: dict[str, list[dict]], path: Path) -> Path | None:
    """Training loss (line) and validation loss (markers) per stage, one panel each."""
    panels = {name: (series(r, "loss", "train"), series(r, "val_loss")) for name, r in logs.items()}
    panels = {name: s for name, s in panels.items() if s[0] or s[1]}
    if not panels:
        return None
    plt, fig, axes = _figure(len(panels))
    for ax, (name, (train, val)) in zip(axes, panels.items()):
        if train:
            ax.plot(*zip(*train), lw=1, alpha=0.8, label="train loss")
        if val:
            ax.plot(*zip(*val), "o-", ms=4, label="val loss")
        _label(ax, name, "step", "loss")
    return _save(plt, fig, path)


def plot_hellaswag(logs: dict[str, list[dict]], path: Path) -> Path | None:
    """HellaSwag acc_norm at each evaluation during pretraining, with the 25% chance line."""
    curves = [(name, label, series(r, key)) for name, r in logs.items() for key, label in HELLASWAG_KEYS.items()]
    curves = [c for c in curves if c[2]]
    if not curves:
        return None
    plt, fig, (ax,) = _figure(1, height=3.6)
    several = len({name for name, _, _ in curves}) > 1
    for name, label, s in curves:
        ax.plot(*zip(*s), "o-", ms=4, label=f"{name}: {label}" if several else label)
    ax.axhline(0.25, color="gray", ls="--", lw=1, label="chance")
    _label(ax, "HellaSwag during pretraining", "step", "acc_norm")
    return _save(plt, fig, path)


def plot_ppo(logs: dict[str, list[dict]], path: Path) -> Path | None:
    """Reward (rollouts' RM score, their missing-EOS penalty as its own curve, greedy evaluation) and KL to
    the reference over PPO steps, plus the gold score of evaluations when the log has it."""
    runs = {name: r for name, r in logs.items() if series(r, "rm_score", "train") or series(r, "kl", "train")}
    if not runs:
        return None
    has_gold = any(series(r, "eval_gold") for r in runs.values())
    plt, fig, axes = _figure(3 if has_gold else 2)
    prefix = (lambda name: f"{name}: ") if len(runs) > 1 else (lambda name: "")
    # one color per curve for one run (several runs take the color cycle, a curve keeps its line style)
    color = (lambda c: None) if len(runs) > 1 else (lambda c: c)
    for name, r in runs.items():
        p = prefix(name)
        # The score PPO optimises is the RM score with -1 for a response without EOS: where every response
        # ends, the two curves coincide. So the penalty is drawn as its own curve (score - RM score, <= 0).
        rm, score = series(r, "rm_score", "train"), series(r, "score", "train")
        if rm:
            axes[0].plot(*zip(*rm), "-", lw=1.5, color=color("C0"), label=p + "rollout RM score")
            rm_at = dict(rm)
            penalty = [(step, v - rm_at[step]) for step, v in score if step in rm_at]
            if penalty:
                axes[0].plot(*zip(*penalty), "--", lw=1.5, color=color("C3"),
                             label=p + "EOS penalty (score - RM score)")
        elif score:
            axes[0].plot(*zip(*score), "-", lw=1.5, color=color("C0"), label=p + "rollout score")
        s = series(r, "eval_rm_score")
        if s:
            axes[0].plot(*zip(*s), "o-", ms=4, lw=1, color=color("C2"), label=p + "greedy eval RM score")
        for key, label, style, c in (("kl", "rollout KL", "-", "C0"), ("eval_kl", "greedy eval KL", "o-", "C2")):
            s = series(r, key, "eval" if key.startswith("eval_") else "train")
            if s:
                axes[1].plot(*zip(*s), style, ms=4, lw=1, color=color(c), label=p + label)
        if has_gold:
            for key, label, style, c in (("eval_gold", "policy", "o-", "C2"), ("sft_gold", "SFT", "--", "C7")):
                s = series(r, key)
                if s:
                    axes[2].plot(*zip(*s), style, ms=4, lw=1, color=color(c), label=p + label)
    titles = ("reward", "KL to the SFT reference (nats per response)", "gold score (greedy eval)")
    return _save_panels(plt, fig, axes, titles, "PPO step", path)


def plot_dpo(logs: dict[str, list[dict]], path: Path) -> Path | None:
    """DPO's evaluations: implicit-reward accuracy and margin on the validation pairs, and the KL to the
    reference (and the gold score) of greedy summaries of held-out posts."""
    runs = {name: r for name, r in logs.items() if series(r, "val_accuracy") and series(r, "val_margin")}
    if not runs:
        return None
    plt, fig, axes = _figure(3)
    for name, r in runs.items():
        p = f"{name}: " if len(runs) > 1 else ""
        axes[0].plot(*zip(*series(r, "val_accuracy")), "o-", ms=4, label=p + "implicit-reward accuracy")
        axes[1].plot(*zip(*series(r, "val_margin")), "o-", ms=4, label=p + "chosen - rejected reward")
        for key, label in (("kl_to_ref", "KL to SFT (nats per summary)"), ("gold_score", "gold score")):
            if series(r, key):
                axes[2].plot(*zip(*series(r, key)), "o-", ms=4, label=p + label)
    axes[0].axhline(0.5, color="gray", ls="--", lw=1, label="chance")
    titles = ("validation pairs: accuracy", "validation pairs: reward margin", "greedy summaries of held-out posts")
    return _save_panels(plt, fig, axes, titles, "DPO step", path)


def plot_all(logs: dict[str, list[dict]], out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    made = [plot_losses(logs, out_dir / "loss.png"), plot_hellaswag(logs, out_dir / "hellaswag.png"),
            plot_ppo(logs, out_dir / "ppo.png"), plot_dpo(logs, out_dir / "dpo.png")]
    return [p for p in made if p is not None]


def main(cfg: Config) -> list[Path]:
    # --- logs
    if cfg.logs:
        missing = [p for p in cfg.logs if not Path(p).is_file()]
        if missing:
            raise UserError(f"log not found: {missing[0]}")
        paths = {}
        for p in map(Path, cfg.logs):
            name = p.parent.name or p.stem
            paths[name if name not in paths else str(p.parent)] = p
    else:
        if not Path(cfg.run_dir).is_dir():
            raise UserError(f"run folder not found: {cfg.run_dir}")
        paths = find_logs(cfg.run_dir)
        if not paths:
            raise UserError(f"no <stage>/log.jsonl under {cfg.run_dir}")
    logs = {name: read_log(p) for name, p in paths.items()}

    # --- plots
    made = plot_all(logs, cfg.out_dir or (cfg.run_dir if not cfg.logs else "."))
    if not made:
        raise UserError(f"nothing to plot in {', '.join(map(str, paths.values()))}: no loss, HellaSwag or PPO records")
    print(f"wrote {', '.join(map(str, made))}")
    return made


if __name__ == "__main__":
    cli_main(main, Config)
