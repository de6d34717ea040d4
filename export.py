"""Export a summarizer checkpoint as a Hugging Face model directory: the weights as safetensors
(`GPT2LMHeadModel`), GPT-2's tokenizer files built from the vocabulary the project ships (so it works
offline), a generation config (EOS, greedy, the summary budget), the prompt template and budgets
(`tldr.json`) and a model card (README.md) saying how the model was trained, its prompt and its
evaluation figures (eval_summaries.py's eval.json, when given). Optionally uploads it to the Hub.

    python export.py --ckpt ppo_latest.pt --out hf/ppo --eval runs/gpt2/eval/eval.json
    python export.py --ckpt ppo_latest.pt --out hf/ppo --push-to-hub you/gpt2-tldr-ppo    # needs `hf auth login` or HF_TOKEN
    python export.py --ckpt-dir checkpoints/small --ckpt ppo_latest.pt --out hf/small-ppo \\
        --eval runs/small/eval/eval.json                                                    # the CPU demo's policy

Then, offline:

    from transformers import pipeline
    summarize = pipeline("text-generation", model="hf/ppo")
    summarize(prompt, return_full_text=False)[0]["generated_text"]   # prompt: the card's template, filled in

gives the summary summarize.py gives (greedy, up to the first <|endoftext|>) for a prompt within the budget.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from checkpoints import LM_STAGES, file_sha256, resolve_ckpt
from common import BUNDLED_TIKTOKEN_CACHE, UserError, cli_main, first_line, get_tokenizer, write_json, write_text
from model import EOS_ID
from summaries import Summarizer, use_gold

STAGES = LM_STAGES
# the two files tiktoken's `gpt2` encoding is made of, cached under the sha1 of their URL
# what an export writes: a folder holding these files only (tldr.json among them) is an earlier export
EXPORT_FILES = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "tldr.json", "README.md",
                "pytorch_model.bin"}
GPT2_FILES = {"vocab.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
              "merges.txt": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"}


@dataclass
class Config:
    ckpt: str = "ppo_latest.pt"           # the checkpoint to export (ppo, sft or pretrain); a bare name resolves in --ckpt-dir
    out: str = ""                         # the directory to write (created; an earlier export there is replaced, any other non-empty folder refused)
    overwrite: bool = False               # replace --out even when it is a non-empty folder that is not an earlier export
    ckpt_dir: str = "checkpoints"         # where bare checkpoint names resolve
    eval: str = ""                        # eval_summaries.py's eval.json: its figures of this checkpoint go into the card ("": none)
    name: str = ""                        # the model's name in the card ("": the --push-to-hub repo, else the --out folder's name)
    push_to_hub: str = ""                 # also upload the directory to this Hugging Face repo (owner/name)
    private: bool = False                 # create the Hub repo private


# -----------------------------------------------------------------------------
# the tokenizer, offline

def tiktoken_file(url: str) -> Path:
    """The cached copy of one of tiktoken's GPT-2 files: TIKTOKEN_CACHE_DIR's when set, else the bundled one."""
    get_tokenizer()  # loads (and so checks) the encoding; sets TIKTOKEN_CACHE_DIR to the bundle when unset
    key = hashlib.sha1(url.encode()).hexdigest()
    for folder in (os.environ.get("TIKTOKEN_CACHE_DIR"), os.environ.get("DATA_GYM_CACHE_DIR"), BUNDLED_TIKTOKEN_CACHE):
        if folder and (Path(folder) / key).is_file():
            return Path(folder) / key
    raise UserError(f"GPT-2's tokenizer file {url} is not in the tiktoken cache ({BUNDLED_TIKTOKEN_CACHE})")


def save_tokenizer(out: Path, model_max_length: int):
    """GPT-2's tokenizer as transformers files (vocab.json, merges.txt, tokenizer.json, ...): the same BPE
    as tiktoken's `gpt2`, built from the same two files; <|endoftext|> is BOS, EOS and pad."""
    from transformers import GPT2TokenizerFast
    with tempfile.TemporaryDirectory() as tmp:
        for name, url in GPT2_FILES.items():
            shutil.copyfile(tiktoken_file(url), Path(tmp) / name)
        # from a folder of the two files: what every transformers version reads as GPT-2's tokenizer
        tok = GPT2TokenizerFast.from_pretrained(tmp, model_max_length=model_max_length, add_prefix_space=False,
                                                clean_up_tokenization_spaces=False, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                                pad_token="<|endoftext|>")
        tok.save_pretrained(str(out))
    return tok


# -----------------------------------------------------------------------------
# the model card

def eval_figures(eval_path: str, sha256: str) -> tuple[dict | None, dict | None]:
    """(this checkpoint's entry in eval.json, the whole record): matched by the checkpoint's hash, so
    figures of another checkpoint never reach the card."""
    if not eval_path:
        return None, None
    path = Path(eval_path)
    if not path.is_file():
        raise UserError(f"--eval {path} not found (eval_summaries.py writes OUT_DIR/eval.json)")
    try:
        record = json.loads(path.read_text())
        entry = next((m for m in record["models"].values() if m.get("sha256") == sha256), None)
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
        raise UserError(f"--eval {path} is not an eval.json of eval_summaries.py") from None
    if entry is None:
        raise UserError(f"{path} holds no figures of this checkpoint (its hash is not among the evaluated "
                        f"models); evaluate it with eval_summaries.py first, or leave --eval out")
    return entry, record


def trained_on_generated_world(ckpt: dict) -> bool:
    """Whether the checkpoint records training on synthetic.py's generated world: its --data holds the world's
    manifest.json (where that folder is at hand), lies under a folder named synthetic (where the demo writes
    it), or the run asked for the gold score, which exists only there."""
    c = ckpt.get("config") or {}
    data = str(c.get("data") or "")
    if data and (use_gold("auto", data) or "synthetic" in Path(data).parts):
        return True
    return c.get("gold") == "on" or bool(c.get("gold_samples"))


def training_lines(ckpt: dict) -> list[str]:
    """How the checkpoint was trained, from the run's own config and metrics."""
    c, m, stage = ckpt.get("config") or {}, ckpt.get("metrics") or {}, ckpt["stage"]
    c = {k: c.get(k, "(not recorded)") for k in ("sft", "rm", "kl_coef", "data", "init", "comparisons", "beta", "loss")}
    lines = []
    if stage == "ppo":
        lines.append(f"- PPO (Stiennon et al. 2020; the N+ implementation details of Huang et al. 2024) for "
                     f"{ckpt.get('step', 0):,} steps from the SFT model `{c['sft']}`, rewarded by the reward "
                     f"model `{c['rm']}` with a per-token KL penalty to the SFT model (beta "
                     f"{c['kl_coef']}), on the posts of `{c['data']}`.")
        lines.append("- The SFT model: supervised fine-tuning on the reference summaries (loss on summary tokens only); "
                     "the reward model: initialised from it, Bradley-Terry loss on preference comparisons of summaries.")
    elif stage == "dpo":
        lines.append(f"- DPO (Rafailov et al. 2023; loss `{c['loss']}`, beta {c['beta']}) for {ckpt.get('step', 0):,} "
                     f"steps from the SFT model `{c['sft']}`, which stayed frozen as the reference, on the preference "
                     f"comparisons of `{c['comparisons']}` - no reward model, no sampling during training.")
        lines.append("- The SFT model: supervised fine-tuning on the reference summaries (loss on summary tokens only).")
    elif stage == "sft":
        lines.append(f"- Supervised fine-tuning from `{c['init']}` on the reference summaries of "
                     f"`{c['data']}` (loss on summary tokens only), {ckpt.get('step', 0):,} steps; the best "
                     f"checkpoint by validation loss" + (f" ({m['best_val_loss']:.4f})." if "best_val_loss" in m else "."))
    else:
        lines.append(f"- Pretraining only ({ckpt.get('step', 0):,} steps): not a summarizer yet.")
    if trained_on_generated_world(ckpt):
        lines.insert(0, f"- **A demo model, not a real summarizer**: trained on the posts of the project's generated "
                        f"world (`synthetic.py`, `{c['data']}`), not on Reddit posts. It summarizes posts of that world; "
                        f"a real post gets nonsense.")
    lines.append("- The pipeline pretrains GPT-2 from random initialisation (`pretrain.py`: the recipe of build-nanogpt / "
                 "llm.c on FineWeb-Edu, or the generated demo world at the CPU sizes) unless a stage starts from "
                 "OpenAI's weights (`--init gpt2`).")
    return lines


def model_card(name: str, summarizer: Summarizer, entry: dict | None, record: dict | None) -> str:
    ckpt, info = summarizer.checkpoint, summarizer.info
    cfg = ckpt["model_config"]
    params = sum(v.numel() for k, v in summarizer.model.state_dict().items()
                 if k.startswith("transformer.") and not k.endswith(".attn.bias"))
    prompt = info["template"].format(subreddit="{subreddit}", title="{title}", post="{post}")
    data = (ckpt.get("config") or {}).get("data", "")
    datasets = [d for d in (data,) if d.count("/") == 1 and not Path(d).exists()]
    # the project's own license (LICENSE, MIT); the weights add the terms of the data they were trained on
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation", "license: mit",
             "tags: [gpt2, summarization, tldr, rlhf" + (f", {ckpt['stage']}" if ckpt["stage"] in ("ppo", "dpo") else "") + "]"]
    if datasets:
        front.append("datasets: [" + ", ".join(datasets) + "]")
    lines = front + ["---", "", f"# {name}", "",
                     f"A Reddit post summarizer (TL;DR): a GPT-2-architecture model of {cfg['n_layer']} layers x "
                     f"{cfg['n_embd']} ({params / 1e6:.1f}M parameters, {cfg['block_size']}-token context), stage "
                     f"`{ckpt['stage']}` of the gpt2-rlhf pipeline, which trains GPT-2 from scratch and aligns it with "
                     f"RLHF in plain PyTorch.", "", "## Training", "", *training_lines(ckpt), "",
                     "## Prompt", "", "The model was trained on exactly this prompt; the summary follows `TL;DR:` and "
                     "ends with `<|endoftext|>`:", "", "```", prompt, "```", "",
                     f"A post is cut at a line or word boundary so that the whole prompt fits "
                     f"{info['max_prompt_tokens']} tokens (`tldr.prompt_tokens` in the project); the summary is at most "
                     f"{info['max_summary_tokens']} tokens (`generation_config.json`: greedy, "
                     f"`max_new_tokens={info['max_summary_tokens']}`, stop at EOS). `tldr.json` holds the template and "
                     f"both budgets.", "", "## Usage", "", "```python", "from transformers import pipeline",
                     f'summarize = pipeline("text-generation", model="{name}")',
                     'prompt = "SUBREDDIT: r/relationships\\nTITLE: ...\\nPOST: ...\\nTL;DR:"',
                     'print(summarize(prompt, return_full_text=False)[0]["generated_text"].strip())', "```", ""]
    lines += evaluation_lines(entry, record)
    return "\n".join(lines) + "\n"


def evaluation_lines(entry: dict | None, record: dict | None) -> list[str]:
    if entry is None:
        return ["## Evaluation", "", "Not evaluated yet: `eval_summaries.py`, then `export.py --eval eval.json`."]
    win = lambda w: "" if not w or w.get("win_rate") is None else \
        f"{100 * w['win_rate']:.1f}% (95% CI {100 * w['ci95'][0]:.1f}-{100 * w['ci95'][1]:.1f}, n={w['n']})"
    rows = [("ROUGE-1 / ROUGE-2 / ROUGE-L", " / ".join(f"{entry[k]:.3f}" for k in ("rouge1", "rouge2", "rougeL")))]
    labels = {"reward_model": "the reward model", "gold": "the generated world's gold score",
              "judge": f"the judge {record.get('judge')}"}
    for judge, by_opponent in entry.get("win_rates", {}).items():
        for opp, w in by_opponent.items():
            rows.append((f"win rate against {'the reference summaries' if opp == 'reference' else 'the SFT model'}, "
                         f"by {labels.get(judge, judge)}", win(w)))
    if entry.get("gold") is not None:
        rows.append(("gold score (0-1)", f"{entry['gold']:.3f}"))
    rows += [("words per summary", f"{entry['words']:.1f}"),
             ("summaries ended with EOS", f"{100 * entry['eos_rate']:.1f}%")]
    if entry.get("copied_trigrams") is not None:
        rows.append(("summary trigrams copied from the post", f"{100 * entry['copied_trigrams']:.1f}%"))
    return ["## Evaluation", "",
            f"Greedy summaries of the first {record['posts']:,} `{record['split']}` posts of `{record['data']}` "
            f"(`eval_summaries.py`). Win rates count a tie as half a win; a judge language model is asked in both "
            f"orders and a tie is where the orders disagree.", "", "| figure | value |", "|---|---|",
            *(f"| {k} | {v} |" for k, v in rows)]


# -----------------------------------------------------------------------------

def push(out: Path, repo: str, private: bool):
    """Upload the directory to a Hub model repo (created when missing). Any failure - offline, no login,
    no permission - is one error line; the local directory stays."""
    try:
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(out), repo_id=repo, repo_type="model",
                                 commit_message="Upload the summarizer exported by export.py")
    except Exception as e:  # huggingface_hub raises many types (offline mode, HTTP, auth, validation)
        raise UserError(f"cannot push to the Hub repo {repo} ({first_line(e)}); "
                        f"{out} is written") from None
    return getattr(info, "commit_url", None) or f"https://huggingface.co/{repo}"


def is_earlier_export(folder: Path) -> bool:
    names = {p.name for p in folder.iterdir()}
    return "tldr.json" in names and names <= EXPORT_FILES


def check_out(out: Path, overwrite: bool):
    """Refuse an --out that would lose the user's files or cannot be written, before any work."""
    try:
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} exists and is not a directory")
        if out.is_dir() and any(out.iterdir()) and not overwrite and not is_earlier_export(out):
            raise UserError(f"--out {out} is a non-empty folder that is not an earlier export; give an empty or "
                            f"new folder, or --overwrite to replace it and everything in it")
    except OSError as e:  # a name too long, a folder that cannot be listed
        raise UserError(f"cannot write --out {out}: {e.strerror or first_line(e)}") from None


def make_staging(out: Path) -> Path:
    """An empty folder beside --out (so that the final rename stays on one file system), created with the
    permissions of any new folder (the umask's, not mkdtemp's 700)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise UserError(f"cannot write --out {out}: {e.strerror or first_line(e)}"
                        + (f" ({e.filename})" if e.filename else "")) from None
    return staging


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(staging: Path, out: Path):
    """Give the staged files and folder the modes of normal new ones (safetensors writes 600), then put the
    folder in place of --out: the old one is moved aside first and removed last, so a failure at any point
    leaves the old export or the new one, never a mix."""
    mask = umask()
    for p in staging.iterdir():
        p.chmod(0o666 & ~mask)
    staging.chmod(0o777 & ~mask)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    try:
        os.replace(staging, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_export(folder: Path, name: str, summarizer: Summarizer, entry: dict | None, record: dict | None):
    """Weights, tokenizer, generation config, prompt and card into `folder`."""
    info, model = summarizer.info, summarizer.model
    model.export_hf(str(folder))
    save_tokenizer(folder, model.config.block_size)
    from transformers import GenerationConfig
    GenerationConfig(do_sample=False, max_new_tokens=info["max_summary_tokens"], eos_token_id=EOS_ID,
                     pad_token_id=EOS_ID, bos_token_id=EOS_ID).save_pretrained(str(folder))
    write_json(folder / "tldr.json", info)
    write_text(folder / "README.md", model_card(name, summarizer, entry, record))


def main(cfg: Config) -> Path:
    # --- config: every input checked before any work
    if not cfg.out:
        raise UserError("--out DIR is required: the Hugging Face model directory to write")
    if cfg.push_to_hub and cfg.push_to_hub.count("/") != 1:
        raise UserError(f"--push-to-hub takes a repo as owner/name, not {cfg.push_to_hub!r}")
    out = Path(cfg.out)
    check_out(out, cfg.overwrite)
    path = resolve_ckpt(cfg.ckpt, cfg.ckpt_dir)
    summarizer = Summarizer.load(path, "cpu", STAGES)
    entry, record = eval_figures(cfg.eval, file_sha256(path)) if cfg.eval else (None, None)
    name = cfg.name or cfg.push_to_hub or out.name

    # --- written into a folder beside --out, then renamed into place: a failed export leaves nothing half-made
    staging = make_staging(out)
    try:
        write_export(staging, name, summarizer, entry, record)
        publish(staging, out)
    except OSError as e:
        raise UserError(f"cannot write --out {out}: {e.strerror or first_line(e)}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}", flush=True)

    # --- the Hub
    if cfg.push_to_hub:
        print(f"pushed to {push(out, cfg.push_to_hub, cfg.private)}", flush=True)
    return out


if __name__ == "__main__":
    cli_main(main, Config)
