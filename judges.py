"""Judges: frozen models that score text, of any tokenizer - a Hugging Face causal LM (the log-prob of a
continuation given its context), a sequence classifier, or one of our reward models. Our GPT-2 tokens are
decoded to text and re-tokenized with the judge's tokenizer, the context/continuation boundary found by
character offsets. Used by eval_summaries.py (a judge LM's pairwise preference between summaries) and by
ppo.py's HellaSwag task (`--reward judge`).

A library: importing it has no side effects.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from checkpoints import is_checkpoint_name, load_reward_model
from common import UserError, first_line, get_tokenizer, select_dtype
from model import PAD_ID, right_pad


def judge_pair_tokens(tokenizer, context: str, continuation: str) -> tuple[list[int], int, int]:
    """(ids, start, end): `context + continuation` in the judge's tokens, BOS first, where ids[start:end]
    are the continuation's tokens - every token with a character of the continuation (one straddling
    the boundary included, as a merge across it holds continuation text) - and everything before
    start is context. A tokenizer that adds no BOS gets its bos (or eos) token prepended, so that the
    first continuation token is predicted too."""
    enc = tokenizer(context + continuation, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids, offsets = [bos] + ids, [(0, 0)] + offsets
    boundary = len(context)
    cont = [i for i, (s, e) in enumerate(offsets) if e > s and e > boundary]  # special tokens have (0, 0)
    if not cont:
        return ids, len(ids), len(ids)
    return ids, cont[0], cont[-1] + 1


class Judge:
    """A frozen scorer of (context, continuation) texts, batched, in no_grad: a Hugging Face causal LM
    (mean log-prob of the continuation's tokens), a sequence classifier (its score: the logit with one
    label, else the log-prob of the last label) or our reward model (the reward at the last token of
    context + continuation in GPT-2 tokens). Returns (scores (N,), scored (N,) bool): False where the
    continuation gives the judge nothing to score (an empty causal-LM continuation)."""

    def __init__(self, name: str, device: str | torch.device = "cpu", dtype: str = "auto", batch_size: int = 16,
                 ckpt_dir: str = "checkpoints"):
        if not name:
            raise UserError("--reward judge needs --judge MODEL: a Hugging Face model (hub name or local "
                            "directory) or a reward_model.py checkpoint")
        self.device = torch.device(device)
        self.dtype = select_dtype(dtype, self.device.type)
        self.batch_size = batch_size
        if is_checkpoint_name(name, ckpt_dir):
            model, _ = load_reward_model(name, "cpu", ckpt_dir)
            self.kind, self.tokenizer = "rm", get_tokenizer()
            self.max_len = model.config.block_size
        else:
            model, self.tokenizer, self.kind = _load_hf_judge(name, self.dtype)
            self.max_len = _max_positions(model.config)
        model = model.to(self.device, self.dtype) if self.kind == "rm" else model.to(self.device)  # HF: loaded in dtype
        self.model = model.eval().requires_grad_(False)
        self.name = name

    @torch.no_grad()
    def score(self, contexts: list[str], continuations: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        scores, scored = torch.zeros(len(contexts)), torch.ones(len(contexts), dtype=torch.bool)
        for s in range(0, len(contexts), self.batch_size):
            c = slice(s, s + self.batch_size)
            if self.kind == "lm":
                scores[c], scored[c] = self._lm(contexts[c], continuations[c])
            elif self.kind == "classifier":
                scores[c] = self._classifier(contexts[c], continuations[c])
            else:
                scores[c] = self._rm(contexts[c], continuations[c])
        return scores, scored

    @torch.no_grad()
    def logprobs(self, contexts: list[str], continuations: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sums (N,), counts (N,)): a causal-LM judge's summed log-prob of each continuation's tokens given
        its context, and how many tokens that is (0 for an empty continuation). What a pairwise question
        reads its answer from: the probability of the whole answer string, however the judge's tokenizer
        splits it."""
        if self.kind != "lm":
            raise UserError(f"judge {self.name!r} is a {'classifier' if self.kind == 'classifier' else 'reward model'}; "
                            f"answer log-probabilities need a causal language model")
        sums, counts = torch.zeros(len(contexts)), torch.zeros(len(contexts))
        for s in range(0, len(contexts), self.batch_size):
            c = slice(s, s + self.batch_size)
            sums[c], counts[c] = self._lm_sums(contexts[c], continuations[c])
        return sums, counts

    def _lm(self, contexts, continuations):
        sums, counts = self._lm_sums(contexts, continuations)
        return sums / counts.clamp(min=1), counts > 0

    def _lm_sums(self, contexts, continuations):
        pairs = [judge_pair_tokens(self.tokenizer, a, b) for a, b in zip(contexts, continuations)]
        cut = [max(0, len(ids) - self.max_len) for ids, _, _ in pairs]  # keep the end: the continuation
        seqs = [(ids[k:], max(1, start - k), end - k) for (ids, start, end), k in zip(pairs, cut)]
        idx, mask = right_pad([ids for ids, _, _ in seqs], self.tokenizer.pad_token_id or 0)
        logits = self.model(input_ids=idx.to(self.device), attention_mask=mask.to(self.device)).logits
        sums, counts = torch.zeros(len(seqs)), torch.zeros(len(seqs))
        for r, (ids, start, end) in enumerate(seqs):
            if end <= start:
                continue
            logp = F.log_softmax(logits[r, start - 1:end - 1].float(), dim=-1)
            sums[r] = logp.gather(1, idx[r, start:end, None].to(self.device)).sum().cpu()
            counts[r] = end - start
        return sums, counts

    def _classifier(self, contexts, continuations):
        enc = self.tokenizer(list(contexts), list(continuations), padding=True, truncation=True,
                             max_length=self.max_len, return_tensors="pt").to(self.device)
        logits = self.model(**enc).logits.float()
        return (logits[:, 0] if logits.size(1) == 1 else logits.log_softmax(-1)[:, -1]).cpu()

    def _rm(self, contexts, continuations):
        seqs = [self.tokenizer.encode_ordinary(a + b)[-self.max_len:] or [PAD_ID] for a, b in zip(contexts, continuations)]
        idx, mask = right_pad(seqs, PAD_ID)
        return self.model.reward(idx.to(self.device), mask.to(self.device)).float().cpu()


def _load_hf_judge(name: str, dtype: torch.dtype):
    """(model, fast tokenizer, kind) through the Auto classes: a causal LM, or a sequence classifier when
    the checkpoint's architecture says so. The tokenizer must be a fast one: the bridge needs offsets."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
        config = AutoConfig.from_pretrained(name)
        tokenizer = AutoTokenizer.from_pretrained(name)
        classifier = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
        auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
        model = auto.from_pretrained(name, **{_dtype_kwarg(): dtype})
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise UserError(f"cannot load judge {name!r}: {first_line(e)}") from None
    if not tokenizer.is_fast:
        raise UserError(f"judge {name!r} has no fast tokenizer: the text bridge needs character offsets")
    if tokenizer.pad_token_id is None:  # batches are padded; which id pads does not matter under the mask
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.bos_token
    if classifier and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, "classifier" if classifier else "lm"


def _dtype_kwarg() -> str:
    """from_pretrained's weights-dtype argument: `dtype` since transformers 4.56, `torch_dtype` before."""
    import transformers
    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _max_positions(config) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return 2048
