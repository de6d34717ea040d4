"""GPT-2 in one file: the language model, the scalar-head ScoreModel (reward and value), KV-cache
generation, and import/export of OpenAI's GPT-2 weights through Hugging Face `transformers`.

Parameter names follow nanoGPT and map 1:1 to `GPT2LMHeadModel` (its four Conv1D weights are
transposed). A library: no side effects, never imports a stage script.
"""
from __future__ import annotations

import inspect
import math
import weakref
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F

EOS_ID = 50256          # <|endoftext|>
PAD_ID = 50257          # first padded vocab slot: a valid embedding row, never a target, never sampled
TOKENIZER_VOCAB = 50257  # ids >= this are padding of the embedding table and get logit -inf


@dataclass
class GPTConfig:
    block_size: int = 1024   # max sequence length (positions)
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for fast matmuls
    n_layer: int = 12        # transformer blocks
    n_head: int = 12         # attention heads
    n_embd: int = 768        # embedding width
    dropout: float = 0.0     # 0 for pretraining at this scale and always 0 in RLHF
    bias: bool = True        # biases in Linear and LayerNorm, as GPT-2

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


MODEL_PRESETS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64),             # tests: seconds on a CPU
    "small": dict(n_layer=4, n_head=4, n_embd=128),           # CPU demo: learns the generated world in minutes
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),          # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),   # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),      # 1558M
}


def model_config(preset: str, **overrides) -> GPTConfig:
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose from {', '.join(MODEL_PRESETS)}")
    return GPTConfig(**{**MODEL_PRESETS[preset], **overrides})


# -----------------------------------------------------------------------------
# attention masks and positions for padded batches

def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask → (B, T) positions counting real tokens only, so that a left-padded row
    sees the same positions as the row alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def causal_padding_mask(attention_mask: torch.Tensor, past: int = 0) -> torch.Tensor:
    """Boolean (B, 1, Tq, past+Tq) mask: causal, real keys only. Every query also sees itself so
    that a padding query has one key to attend to (its output is unused but must stay finite)."""
    B, L = attention_mask.shape
    q_idx = torch.arange(past, L, device=attention_mask.device)[:, None]  # (Tq, 1)
    k_idx = torch.arange(L, device=attention_mask.device)[None, :]        # (1, L)
    causal = k_idx <= q_idx                                                # (Tq, L)
    mask = causal[None] & attention_mask.bool()[:, None, :]               # (B, Tq, L)
    mask = mask | (k_idx == q_idx)[None]
    return mask[:, None]                                                  # (B, 1, Tq, L)


class KVCache:
    """Preallocated keys/values for every layer: each decoding step writes one slot in place
    instead of concatenating the whole cache. BatchDecoder also uses a window of it: the first `rows` rows
    (None: all) and the slots from `start` on (those before it belong to no row any more)."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        hd = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, hd)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.len = 0  # the end of the filled slots in every layer
        self.start = 0
        self.rows: int | None = None

    @property
    def span(self) -> int:
        """Slots filled so far, in the window."""
        return self.len - self.start

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write (B, H, T, hd) at the current end; return views of the window's slots filled so far."""
        start, end = self.len, self.len + k.size(2)
        self.k[layer, :self.rows, :, start:end] = k
        self.v[layer, :self.rows, :, start:end] = v
        return self.k[layer, :self.rows, :, self.start:end], self.v[layer, :self.rows, :, self.start:end]


# -----------------------------------------------------------------------------
# the loss

def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of (N, V) logits over the targets != -1, in fp32: F.cross_entropy's value
    and gradient, with a leaner backward while training eagerly (torch.compile fuses its own)."""
    if logits.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return _CrossEntropy.apply(logits, targets)
    return F.cross_entropy(logits.float(), targets, ignore_index=-1)


class _CrossEntropy(torch.autograd.Function):
    """The backward turns the forward's own log-softmax buffer into the gradient in place (as llm.c's
    fused classifier does), where F.cross_entropy allocates two more (N, V) tensors (the one-hot
    gradient and the log-softmax gradient). On a CPU those fresh buffers are the expensive part:
    every page of them is faulted in anew each step. A second backward through the same graph is
    refused by autograd (the saved buffer was modified), never silently wrong."""

    @staticmethod
    def forward(ctx, logits, targets):
        logp = F.log_softmax(logits.float(), dim=-1)                              # (N, V)
        keep = targets != -1
        safe = torch.where(keep, targets, 0)[:, None]                             # (N, 1)
        nll = -logp.gather(1, safe).squeeze(1)                                    # (N,)
        count = keep.sum()
        ctx.save_for_backward(logp, safe, keep, count)
        ctx.logits_dtype = logits.dtype
        return torch.where(keep, nll, 0.0).sum() / count

    @staticmethod
    def backward(ctx, grad_loss):
        logp, safe, keep, count = ctx.saved_tensors
        grad = logp.exp_()                                                        # softmax, in place
        grad.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=grad.dtype))   # minus the one-hot
        grad.mul_((grad_loss / count * keep)[:, None])                            # ignored rows: 0
        return grad.to(ctx.logits_dtype), None


# -----------------------------------------------------------------------------
# the transformer

# -----------------------------------------------------------------------------
# matrix products at inference on a CPU

ONEDNN_MIN_NUMEL = 1 << 18  # smaller matrices (the small preset's trunk) are faster through F.linear
ONEDNN_ROWS_HINT = 16  # rows oneDNN lays a weight out for: 1-200 rows gain (not the 124M vocabulary at 1 row)
_ONEDNN_WEIGHTS: dict[int, tuple] = {}  # id(weight) -> (its version and storage, its oneDNN layout)
_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) without autograd; on a CPU, through oneDNN's float32 inner product for a matrix of
    at least ONEDNN_MIN_NUMEL entries, on a copy of the weight in oneDNN's own layout for ONEDNN_ROWS_HINT rows.
    MKL's sgemm, which F.linear calls there, takes a generic path on CPUs it does not recognise (AMD's): for a
    few rows, oneDNN is 1.3-2.6x faster against GPT-2's vocabulary matrix and 1.3-2.0x against the 124M
    model's trunk matrices on a 2-core EPYC (docs/serving.md), and a decoding step is mostly these products.
    The same float32 arithmetic in another summation order (differences of ~1e-5). A weight's oneDNN copy is
    kept while the weight is unchanged (its version counter: an optimizer step makes a new copy) and dropped
    with the weight."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 \
            or weight.numel() < ONEDNN_MIN_NUMEL or torch.compiler.is_compiling() or _ONEDNN_LINEAR is None:
        return F.linear(x, weight, bias)
    # the version counts in-place changes; the storage pointer catches a weight whose tensor was swapped
    key, version = id(weight), (weight._version, weight.data_ptr())
    cached = _ONEDNN_WEIGHTS.get(key)
    if cached is None or cached[0] != version:
        if cached is None:
            weakref.finalize(weight, _ONEDNN_WEIGHTS.pop, key, None)
        cached = _ONEDNN_WEIGHTS[key] = (version, torch.ops.mkldnn._reorder_linear_weight(weight.detach(),
                                                                                          ONEDNN_ROWS_HINT))
    flat = x.reshape(-1, x.size(-1)).contiguous()
    out = _ONEDNN_LINEAR(flat, cached[1], bias.detach() if bias is not None else None, "none", [], "")  # (N, out)
    return out.view(*x.shape[:-1], weight.size(0))


class Linear(nn.Linear):
    """nn.Linear whose forward without autograd goes through cpu_linear (oneDNN on a CPU)."""

    def forward(self, x):
        if torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        return cpu_linear(x, self.weight, self.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x, attn_mask=None, cache: KVCache | None = None, layer: int = 0, last_only: bool = False):
        """Attention output (B, T, C); with last_only, (B, 1, C) for the last position only (the keys and values
        of every position are still computed and cached)."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v)                             # (B, nh, L, hs)
        dropout_p = self.dropout if self.training else 0.0
        if last_only:  # the last query sees every key but padding: no causal mask
            q, T = q[:, :, -1:], 1                                       # (B, nh, 1, hs)
            attn_mask = attn_mask[:, :, -1:] if attn_mask is not None else None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        elif attn_mask is None:  # unpadded and uncached: the flash kernel's is_causal path
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)                 # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, cache=None, layer=0, last_only=False):
        h = self.attn(self.ln_1(x), attn_mask, cache, layer, last_only)
        x = (x[:, -1:] if last_only else x) + h
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        # padding slots of the vocabulary are not tokens: -inf logits keep them out of every softmax
        vocab_bias = torch.zeros(config.vocab_size)
        vocab_bias[TOKENIZER_VOCAB:] = float("-inf")
        self.register_buffer("vocab_bias", vocab_bias, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        """GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)."""
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_SCALE_INIT", False):
                std *= (2 * self.config.n_layer) ** -0.5
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    # --- forward -------------------------------------------------------------------------------

    def hidden_states(self, idx, attention_mask=None, cache: KVCache | None = None, positions=None,
                      last_only: bool = False):
        """Final-layer-norm output (B, T, C). With a cache, idx holds only the new tokens and
        attention_mask covers everything so far (cached + new). With last_only, (B, 1, C) at the last position
        only: the last layer computes the other positions' keys and values and nothing more of them, a
        prefill's saving of most of one layer (a fifth of the `small` model's)."""
        B, T = idx.size()
        past = cache.span if cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens exceeds block_size {self.config.block_size}")
        if attention_mask is None:
            attn_mask = None if past == 0 else torch.ones(B, 1, T, past + T, dtype=torch.bool, device=idx.device)
            if positions is None:
                positions = torch.arange(past, past + T, device=idx.device)[None]  # (1, T)
        else:
            attn_mask = causal_padding_mask(attention_mask, past)                  # (B, 1, T, L)
            if positions is None:
                positions = positions_from_mask(attention_mask)[:, past:]          # (B, T)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))  # (B, T, C)
        last = len(self.transformer.h) - 1
        for i, block in enumerate(self.transformer.h):
            x = block(x, attn_mask, cache, i, last_only and i == last)
        if cache is not None:
            cache.len += T
        return self.transformer.ln_f(x)

    def packed_hidden_states(self, idx, positions, attn_mask):
        """Final-layer-norm output (B, T, C) of rows packed by pack_summaries: explicit positions (B, T) and a
        ready (B, 1, T, T) boolean attention mask (a summary sees its prompt and itself only)."""
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, attn_mask)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, attention_mask=None, logits_at=None):
        """idx (B, T) → logits and the mean cross-entropy over targets != -1.

        The vocabulary projection dominates a small model's cost, so `logits_at` restricts it to the
        positions that need it: None → all (B, T, V); a slice → (B, len, V) at those positions;
        "targets" → (N, V) at the N positions whose target is not -1 (row-major order)."""
        x = self.hidden_states(idx, attention_mask)                              # (B, T, C)
        if logits_at is None:
            logits = self.logits(x)                                              # (B, T, V)
        elif isinstance(logits_at, slice):
            logits = self.logits(x[:, logits_at])                                # (B, len, V)
            targets = targets[:, logits_at] if targets is not None else None
        elif logits_at == "targets":
            keep = targets != -1
            logits = self.logits(x[keep])                                        # (N, V)
            targets = targets[keep]
        else:
            raise ValueError(f"logits_at must be None, a slice or 'targets', not {logits_at!r}")
        loss = None
        if targets is not None:
            loss = cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., C) → logits (..., V), -inf at the padded vocabulary slots, without a
        separate `+ vocab_bias` pass over all of (..., V): when training, the bias rides in the
        projection's matmul (addmm); without autograd the padded columns are simply overwritten."""
        if torch.is_grad_enabled() and (x.requires_grad or self.lm_head.weight.requires_grad):
            return F.linear(x, self.lm_head.weight, self.vocab_bias)
        logits = cpu_linear(x, self.lm_head.weight)
        logits[..., TOKENIZER_VOCAB:] = float("-inf")
        return logits

    # --- generation ----------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, idx, attention_mask=None, max_new_tokens: int = 64, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_id: int | None = EOS_ID,
                 min_new_tokens: int = 0, generator: torch.Generator | None = None, pad_id: int = PAD_ID):
        """Sample continuations of a batch of left-padded prompts with a preallocated KV cache.

        temperature 0 is greedy. Returns (tokens, logprobs, mask), each (B, N) with N <= max_new_tokens:
        the new tokens (pad_id after a row's EOS), their log-probs under the distribution they were
        drawn from (temperature, top-k and top-p applied; greedy reports temperature 1), and a 0/1 mask
        of real tokens (the EOS included).

        The sampling settings may differ from row to row: temperature, top_k and top_p each take a number
        or a (B,) tensor (temperature 0: greedy; top_k 0 and top_p 1: off), and generator one
        torch.Generator or a list of one per row (None: the global RNG), so that a row samples exactly as
        it would alone.

        Rows that have ended leave the batch once an eighth of it has ended (their keys and values dropped from
        the cache), so that a batch of mixed lengths does not decode to its longest row at full width - unless
        one torch.Generator serves every row, whose draws would then change with the batch's width."""
        B, T0 = idx.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(idx)
        if attention_mask[:, -1].min() == 0:
            raise ValueError("generate expects left-padded prompts (the last column must be real tokens)")
        max_new_tokens = min(max_new_tokens, self.config.block_size - T0)
        cache = KVCache(self.config, B, T0 + max_new_tokens, idx.device, self.cache_dtype())
        mask = torch.cat([attention_mask.long(), attention_mask.new_zeros(B, max_new_tokens).long()], dim=1)
        next_pos = positions_from_mask(attention_mask)[:, -1:] + 1                # (B, 1)
        x = self.hidden_states(idx, mask[:, :T0], cache, last_only=True)[:, -1]   # (B, C)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        greedy = greedy_rows(temperature, B, idx.device)                         # a bool or (B,)
        rows = torch.arange(B, device=idx.device)  # the original row of each row still in the batch
        settings = [temperature, top_k, top_p, generator, greedy]  # per-row ones shrink with the batch
        can_drop = not isinstance(generator, torch.Generator)
        out_tokens, out_logprobs, out_mask = [], [], []

        def full(values: torch.Tensor, fill) -> torch.Tensor:  # (B,) with `fill` at the rows that left
            if len(rows) == B:
                return values
            return torch.full((B,), fill, dtype=values.dtype, device=values.device).index_copy(0, rows, values)

        for t in range(max_new_tokens):
            logits = self.logits(x).float()                                       # (b, V), b <= B rows left
            if eos_id is not None and t < min_new_tokens:
                logits[:, eos_id] = float("-inf")
            tok, logp = choose_tokens(logits, *settings)
            tok_logp = logp.gather(-1, tok[:, None]).squeeze(-1)
            tok = torch.where(done, torch.full_like(tok, pad_id), tok)
            out_tokens.append(full(tok, pad_id))
            out_logprobs.append(full(torch.where(done, torch.zeros_like(tok_logp), tok_logp), 0.0))
            out_mask.append(full((~done).long(), 0))
            if eos_id is not None:
                done = done | (tok == eos_id)
            ended = int(done.sum())  # the step's one host sync
            if ended == len(done) or t == max_new_tokens - 1:
                break
            mask[:, T0 + t] = 1
            if can_drop and 8 * ended >= len(done):
                keep = (~done).nonzero().squeeze(1)
                rows, tok, mask, next_pos, done = rows[keep], tok[keep], mask[keep], next_pos[keep], done[keep]
                cache.k, cache.v = cache.k[:, keep], cache.v[:, keep]
                settings = [s[keep] if torch.is_tensor(s) and s.dim() == 1 else
                            [s[i] for i in keep.tolist()] if isinstance(s, list) else s for s in settings]
            x = self.hidden_states(tok[:, None], mask[:, :T0 + t + 1], cache, positions=next_pos)[:, -1]
            next_pos = next_pos + 1
        return torch.stack(out_tokens, 1), torch.stack(out_logprobs, 1), torch.stack(out_mask, 1)

    def cache_dtype(self) -> torch.dtype:
        """The dtype a KV cache holds: autocast's when it is on (keys and values come out in it), else the
        weights'."""
        param = next(self.parameters())
        return torch.get_autocast_dtype(param.device.type) if torch.is_autocast_enabled(param.device.type) \
            else param.dtype

    # --- optimizer and FLOPs ---------------------------------------------------------------------

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas=(0.9, 0.95),
                             device_type: str = "cpu", eps: float = 1e-8, params: list | None = None):
        """AdamW with decay on 2-D weights only (matmuls, embeddings), fused on CUDA; over `params` when given
        (the parameters another optimizer does not take), else over every trainable parameter."""
        params = [p for p in (self.parameters() if params is None else params) if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=tuple(betas), eps=eps,
                                 **({"fused": True} if fused else {}))

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6N plus attention 12 * L * C * T (PaLM appendix B)."""
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * T

    # --- OpenAI GPT-2 weights through transformers -------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_dir: str, **overrides) -> "GPT":
        """OpenAI GPT-2 weights from a hub name (`gpt2`, `gpt2-medium`, ...) or a local HF directory."""
        from transformers import GPT2LMHeadModel
        hf = GPT2LMHeadModel.from_pretrained(name_or_dir)
        hc = hf.config
        config = GPTConfig(block_size=hc.n_positions, vocab_size=max(50304, hc.vocab_size), n_layer=hc.n_layer,
                           n_head=hc.n_head, n_embd=hc.n_embd, **overrides)
        model = cls(config)
        load_hf_state_dict(model, hf.state_dict())
        return model

    def export_hf(self, out_dir: str):
        """Write this model as a `GPT2LMHeadModel` directory (config.json + weights), real vocab only."""
        from transformers import GPT2Config, GPT2LMHeadModel
        cfg = self.config
        hc = GPT2Config(vocab_size=TOKENIZER_VOCAB, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, activation_function="gelu_new",
                        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                        bos_token_id=EOS_ID, eos_token_id=EOS_ID)
        hf = GPT2LMHeadModel(hc)
        hf.load_state_dict(to_hf_state_dict(self), strict=False)
        hf.tie_weights()
        hf.save_pretrained(out_dir)


_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def load_hf_state_dict(model: GPT, hf_sd: dict):
    """Copy a GPT2LMHeadModel state dict into our model (Conv1D weights transposed, vocab padded)."""
    sd = model.state_dict()
    for k, v in hf_sd.items():
        if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias") or k == "lm_head.weight":
            continue  # causal-mask buffers; lm_head is tied to wte
        if k not in sd:
            raise KeyError(f"unexpected GPT-2 weight {k}")
        if k.endswith(_CONV1D):
            v = v.t()
        with torch.no_grad():
            if k == "transformer.wte.weight":
                sd[k].zero_()
                sd[k][: v.size(0)].copy_(v)
            else:
                sd[k].copy_(v)


def to_hf_state_dict(model: GPT) -> dict:
    out = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" or not k.startswith("transformer."):
            continue
        v = v.detach().cpu()
        if k.endswith(_CONV1D):
            v = v.t()
        if k == "transformer.wte.weight":
            v = v[:TOKENIZER_VOCAB]
        out[k] = v.contiguous().clone()
    return out


def row_argmax(logits: torch.Tensor, block: int = 64) -> torch.Tensor:
    """logits.argmax(-1) of (B, V), the same index (the first maximum; a NaN counts as the maximum), through the
    maximum of each block of `block` columns: the blocks' maxima are one vectorized reduction, where a CPU's
    argmax over a whole row is a scalar loop (0.11 vs 0.72 ms for 27 rows of GPT-2's vocabulary on a 2-core EPYC,
    docs/serving.md)."""
    B, V = logits.shape
    if V % block or V < 8 * block:
        return logits.argmax(-1)
    blocks = logits.reshape(B, V // block, block)                                # (B, V/block, block)
    best = blocks.amax(-1).argmax(-1)                                             # (B,) the first block with the max
    return best * block + blocks[torch.arange(B, device=logits.device), best].argmax(-1)


def choose_tokens(logits: torch.Tensor, temperature=1.0, top_k=None, top_p=None, generator=None,
                  greedy=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of each row (B,) and the sampling distribution's log-probs (B, V): the argmax for
    greedy rows (temperature 0), a draw from the filtered distribution for the others. Settings as in
    sampling_logprobs; `greedy` is greedy_rows(temperature, ...) when the caller already has it."""
    if greedy is None:
        greedy = greedy_rows(temperature, logits.size(0), logits.device)
    logp = sampling_logprobs(logits, temperature, top_k, top_p)                       # (B, V)
    if greedy is True:
        return row_argmax(logits), logp
    if greedy is False:
        return sample_tokens(logp.exp(), generator), logp
    # a mixed batch: greedy rows take the argmax, the others sample
    return torch.where(greedy, row_argmax(logits), sample_tokens(logp.exp(), generator)), logp


def greedy_rows(temperature, rows: int, device):
    """Which rows decode greedily (temperature 0): a bool when every row agrees, so that a uniform batch
    takes the single-path code, else a (B,) bool mask."""
    if not torch.is_tensor(temperature):
        return temperature == 0
    if temperature.numel() != rows:
        raise ValueError(f"a per-row temperature needs {rows} values, got {temperature.numel()}")
    greedy = temperature.to(device) == 0
    return bool(greedy[0]) if bool((greedy == greedy[0]).all()) else greedy


def sampling_logprobs(logits: torch.Tensor, temperature=1.0, top_k=None, top_p=None) -> torch.Tensor:
    """Log-probs (..., V) of the distribution tokens are sampled from. PPO recomputes training
    log-probs with this same function so rollout and update agree exactly.

    Each setting is a number (None: off) or, for logits (B, V), a (B,) tensor of per-row values:
    temperature 0 (greedy) is reported at temperature 1, top_k 0 and top_p >= 1 are off."""
    logits = logits.float()
    V = logits.size(-1)
    if torch.is_tensor(temperature):
        t = temperature.to(logits.device, torch.float32)
        logits = logits / torch.where(t > 0, t, torch.ones_like(t)).unsqueeze(-1)
    elif temperature and temperature > 0:
        logits = logits / temperature
    if torch.is_tensor(top_k):
        k = top_k.to(logits.device, torch.long)
        active = (k > 0) & (k < V)
        if bool(active.any()):
            top = torch.topk(logits, int(k[active].max()), dim=-1).values                    # (B, kmax)
            kth = top.gather(-1, (k.clamp(min=1, max=top.size(-1)) - 1).unsqueeze(-1))         # (B, 1)
            kth = torch.where(active.unsqueeze(-1), kth, torch.full_like(kth, float("-inf")))
            logits = logits.masked_fill(logits < kth, float("-inf"))
    elif top_k is not None and 0 < top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if torch.is_tensor(top_p):
        p = top_p.to(logits.device, torch.float32)
        active = (p > 0) & (p < 1)
        if bool(active.any()):
            logits = _top_p_filter(logits, torch.where(active, p, torch.full_like(p, float("inf"))).unsqueeze(-1))
    elif top_p is not None and 0 < top_p < 1:
        logits = _top_p_filter(logits, top_p)
    return F.log_softmax(logits, dim=-1)


def position_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || ref) (...) of next-token distributions given as log-probs (..., V): exact, summed over the
    vocabulary (no sampling estimate); a token p gives no mass contributes nothing, whatever ref says."""
    return (logp.exp() * (logp - ref_logp).nan_to_num(0.0, posinf=0.0, neginf=0.0)).sum(-1)


def _top_p_filter(logits: torch.Tensor, top_p) -> torch.Tensor:
    """Drop a token when the mass before it already reaches top_p (a number or (B, 1); the top token
    always stays)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    drop_sorted = (probs.cumsum(-1) - probs) >= top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_tokens(probs: torch.Tensor, generator=None) -> torch.Tensor:
    """One token per row of probs (B, V) by inverse CDF: one uniform draw per row. torch.multinomial
    draws one exponential per vocabulary entry instead, which on the CPU is most of a decode step's time
    for a small model (6.4M draws per step for 128 rows of GPT-2's vocabulary).

    generator: one torch.Generator for the batch, or a list of one per row (None entries: the global
    RNG), so that a row draws the same numbers in any batch as it would alone."""
    cdf = probs.float().cumsum(-1)                                                     # (B, V)
    total = cdf[:, -1:].contiguous()                                                   # (B, 1)
    if isinstance(generator, (list, tuple)):
        if len(generator) != probs.size(0):
            raise ValueError(f"{len(generator)} generators for {probs.size(0)} rows")
        u = torch.cat([torch.rand(1, 1, generator=g, device=probs.device) for g in generator])
    else:
        u = torch.rand(probs.size(0), 1, generator=generator, device=probs.device)
    tok = torch.searchsorted(cdf, u * total, right=True)                               # (B, 1)
    # rounding can put u * total on the total itself, past every token: take the first token at which
    # the cumulative mass reaches the total instead (it has mass: the cumulative sum rises there)
    last_with_mass = torch.searchsorted(cdf, total)                                    # (B, 1)
    return torch.minimum(tok, last_with_mass).squeeze(-1)


# -----------------------------------------------------------------------------
# continuous batching: rows join and leave a running decode between steps

class BatchDecoder:
    """A running batch for a server (iteration-level scheduling, as in Orca, Yu et al. 2022): new prompts
    are prefilled and join between two decoding steps, and finished rows leave, instead of every request
    waiting for the batch in flight to end.

    Rows stay right-aligned in one KV cache: slot t of every row is the same number of steps back, a row
    shorter than the longest is left-padded (masked out), and positions come from each row's own mask, so
    a row computes what it would alone. Padding that no row needs any more leaves the attention window when
    rows leave, so the window never holds more slots than its longest row: every row that fits the context
    alone fits.

    The cache is a buffer with room for more rows and slots than the batch holds: a row that joins is written
    into it, a row that leaves is replaced by one of the last rows, and the window moves right as the rows
    grow. Only when the buffer is too small is the window copied to a new one (with room to spare), so that a
    step where rows join or leave moves a few rows, not the whole cache.

        decoder.add(idx, mask, budgets) # prefill left-padded prompts; the rows are appended
        logits = decoder.logits()       # (B, V) next-token logits of every row
        order = decoder.retain(rows)    # drop the others (finished, cancelled); `order`: the rows' new order
        decoder.advance(tokens)         # feed one token per row
    """

    def __init__(self, model: GPT, max_rows: int | None = None):
        self.model = model
        self.device = model.transformer.wte.weight.device
        self.max_rows = max_rows  # the most rows the batch will hold (None: no bound): the buffer's room at most
        self.cache: KVCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)      # (B, L) real slots of the window
        self.next_pos = torch.zeros(0, 1, dtype=torch.long, device=self.device)  # (B, 1) next token's position
        self.remaining: list[int] = []                                           # tokens each row may still take
        self.x = torch.zeros(0, model.config.n_embd, device=self.device)         # (B, C) last hidden state per row
        # joining rows prefilled by length without padding (a CPU: padding costs as much as tokens there, and the
        # unmasked causal attention kernel is faster), or all in one padded batch (parallel hardware)
        self.unpadded_prefill = self.device.type == "cpu"

    @property
    def rows(self) -> int:
        return self.mask.size(0)

    @property
    def span(self) -> int:
        """Slots in the attention window: the longest row's."""
        return self.mask.size(1)

    def _fits(self, rows: int, span: int, right: int) -> bool:
        """Whether the buffer holds `rows` rows and a window of `span` slots ending where it ends now, with
        `right` slots to grow into."""
        c = self.cache
        return c is not None and rows <= c.k.size(1) and c.len - span >= 0 and c.len + right <= c.k.size(3)

    def _relayout(self, rows: int, span: int, right: int, dtype):
        """A new buffer with room for `rows` rows (when they do not fit the old room: twice it, up to max_rows) whose
        window ends at slot block_size, so that any prompt fits to its left, with `right` slots to grow into and
        half the window and `right` again (at least 64): the window moves right a step at a time for that long
        before the next copy. The rows so far are copied in. A slot enters the window written (a prompt, a
        token) or zeroed (padding: masked slots must hold finite numbers, as softmax weight 0 times NaN is NaN),
        so the rest of the buffer is never read, never set, and its memory never touched."""
        old = self.cache
        room_rows = old.k.size(1) if old is not None else 0
        if rows > room_rows:
            room_rows = max(rows, min(2 * room_rows, self.max_rows or 1 << 30))
        end = max(self.model.config.block_size, span)
        cache = KVCache(self.model.config, room_rows, end + right + max(64, (span + right) // 2), self.device, dtype)
        B, L = self.rows, self.span
        if B:
            cache.k[:, :B, :, end - L:end] = old.k[:, :B, :, old.start:old.len]
            cache.v[:, :B, :, end - L:end] = old.v[:, :B, :, old.start:old.len]
        cache.len, cache.start, cache.rows = end, end - L, B
        self.cache = cache

    @torch.no_grad()
    def add(self, idx: torch.Tensor, mask: torch.Tensor, budgets: list[int]):
        """Prefill left-padded prompts idx (b, P) with their 0/1 mask and append them as rows; budgets[i] is
        how many tokens row i may be fed."""
        block = self.model.config.block_size
        lengths = mask.sum(1).tolist()
        for n_prompt, n_new in zip(lengths, budgets):
            if not n_prompt or n_prompt + n_new > block:
                raise ValueError(f"a prompt of {n_prompt} tokens and {n_new} new ones do not fit block_size {block}")
        (b, P), dtype = idx.shape, self.model.cache_dtype()
        idx, mask = idx.to(self.device), mask.to(self.device)
        B, L_old = self.rows, self.span
        L = max(L_old, P)
        remaining = self.remaining + list(budgets)
        if B == 0 and self.cache is not None:  # an empty batch starts again where a new buffer would
            self.cache.len = self.cache.start = max(self.model.config.block_size, L)
        if not self._fits(B + b, L, max(remaining)) or self.cache.k.dtype != dtype:
            self._relayout(B + b, L, max(remaining), dtype)
        cache = self.cache
        start, end = cache.len - L, cache.len
        # slots that become padding hold what earlier rows left there: zeros, so that they are finite
        cache.k[:, :B, :, start:cache.start] = 0
        cache.v[:, :B, :, start:cache.start] = 0
        prefilled = []
        for rows, n in self._prefill_groups(lengths, P):
            # prompts of n tokens (the last n columns), each right-aligned in its row of the window
            fresh = KVCache(self.model.config, len(rows), n, self.device, dtype)
            padded = any(lengths[r] != n for r in rows)
            index = torch.tensor(rows, device=self.device)
            h = self.model.hidden_states(idx[index, P - n:], mask[index, P - n:] if padded else None, fresh,
                                         last_only=True)[:, -1]                    # (g, C)
            cache.k[:, B + index, :, start:end - n] = 0
            cache.v[:, B + index, :, start:end - n] = 0
            cache.k[:, B + index, :, end - n:end] = fresh.k
            cache.v[:, B + index, :, end - n:end] = fresh.v
            prefilled.append((index, h))
        x = torch.empty(b, prefilled[0][1].size(-1), device=self.device, dtype=prefilled[0][1].dtype)  # (b, C)
        for index, h in prefilled:
            x[index] = h
        cache.start, cache.rows = start, B + b
        full = torch.zeros((B + b, L), dtype=torch.long, device=self.device)
        full[:B, L - L_old:] = self.mask
        full[B:, L - P:] = mask
        self.mask, self.remaining = full, remaining
        self.next_pos = torch.cat([self.next_pos, positions_from_mask(mask)[:, -1:] + 1])
        self.x = torch.cat([self.x.to(x.dtype), x])

    def _prefill_groups(self, lengths: list[int], P: int) -> list[tuple[list[int], int]]:
        """How the new rows are prefilled: (their indices, the columns they take), as unpadded_prefill says."""
        if not self.unpadded_prefill:
            return [(list(range(len(lengths))), P)]
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            groups.setdefault(n, []).append(i)
        return [(rows, n) for n, rows in groups.items()]

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        return self.model.logits(self.x).float()                                  # (B, V)

    def retain(self, rows: list[int]) -> list[int]:
        """Keep only these rows, in the order that moves the fewest: a row that leaves from among the first
        len(rows) is replaced by one of the kept rows after them. Returns the old index of each row, in the new
        order."""
        n, kept = len(rows), set(rows)
        later = iter(sorted(r for r in rows if r >= n))
        order = [j if j in kept else next(later) for j in range(n)]
        self.keep(order)
        return order

    @torch.no_grad()
    def keep(self, rows: list[int]):
        """Keep only these rows, in this order, and move the window past the left slots that are padding in
        all of them."""
        if rows == list(range(self.rows)):
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.mask, self.next_pos = self.mask[index], self.next_pos[index]
        self.remaining, self.x = [self.remaining[r] for r in rows], self.x[index]
        cache = self.cache
        s, e = cache.start, cache.len
        moves = [(j, i) for j, i in enumerate(rows) if i != j]
        written = set()
        for j, i in moves:
            if i in written:  # a row would be read after its slot was written: all through a copy
                cache.k[:, :len(rows), :, s:e] = cache.k[:, index, :, s:e]
                cache.v[:, :len(rows), :, s:e] = cache.v[:, index, :, s:e]
                break
            written.add(j)
        else:
            for j, i in moves:
                cache.k[:, j, :, s:e] = cache.k[:, i, :, s:e]
                cache.v[:, j, :, s:e] = cache.v[:, i, :, s:e]
        first = int((self.mask.cumsum(1) == 0).sum(1).min()) if rows else self.span  # all-padding left slots
        self.mask = self.mask[:, first:]
        cache.start, cache.rows = s + first, len(rows)

    @torch.no_grad()
    def advance(self, tokens: torch.Tensor):
        """Feed one token per row (B,): every row's window grows by one slot."""
        if self.rows == 0:
            return
        if min(self.remaining) <= 0:
            raise ValueError("a row was fed past its budget")
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.x = self.model.hidden_states(tokens.to(self.device)[:, None], self.mask, self.cache,
                                          positions=self.next_pos)[:, -1]
        self.next_pos = self.next_pos + 1
        self.remaining = [n - 1 for n in self.remaining]


# -----------------------------------------------------------------------------
# padding: left for generation (the last real token of every row at the same position), right for training

def left_pad(seqs: list[list[int]], pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) tokens and 0/1 mask, padding on the left: the layout generation needs."""
    return _pad(seqs, pad_id, left=True)


def right_pad(seqs: list[list[int]], pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) tokens and 0/1 mask, padding on the right: the layout training uses."""
    return _pad(seqs, pad_id, left=False)


def _pad(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            cols = slice(T - len(s), T) if left else slice(0, len(s))
            idx[i, cols] = torch.tensor(s)
            mask[i, cols] = 1
    return idx, mask


def pack_summaries(rows: list[tuple[list[int], list[list[int]]]], pad_id: int = PAD_ID) -> dict[str, torch.Tensor]:
    """One row per prompt, `prompt | summary 1 | summary 2 | ...`, right-padded, with what attention needs
    so that the prompt is computed once for all its summaries (on TL;DR the prompt is most of the tokens):
    a summary sees the prompt and itself only, and its positions restart after the prompt, so its scores
    equal those of `prompt + summary` run alone (tests check this).
    Returns idx, positions (B, T), attn_mask (B, 1, T, T) bool, and ends (B, K): the last token of each
    of the K summaries of a row, where the rewards are read."""
    T = max(len(p) + sum(map(len, ss)) for p, ss in rows)
    B, K = len(rows), len(rows[0][1])
    idx = torch.full((B, T), pad_id, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    segment = torch.full((B, T), -1, dtype=torch.long)  # 0 prompt, k summary k, -1 padding
    ends = torch.zeros((B, K), dtype=torch.long)
    for i, (p, texts) in enumerate(rows):
        idx[i, :len(p)], positions[i, :len(p)], segment[i, :len(p)] = torch.tensor(p), torch.arange(len(p)), 0
        start = len(p)
        for k, s in enumerate(texts):
            stop = start + len(s)
            idx[i, start:stop], segment[i, start:stop] = torch.tensor(s), k + 1
            positions[i, start:stop] = torch.arange(len(p), len(p) + len(s))
            ends[i, k] = stop - 1
            start = stop
    q, k = segment[:, :, None], segment[:, None, :]                       # (B, T, 1), (B, 1, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    visible = causal & (k >= 0) & ((k == 0) | (k == q))  # real, not ahead, the prompt or the same summary
    visible |= torch.eye(T, dtype=torch.bool)  # padding queries attend to themselves: finite, unused
    return {"idx": idx, "positions": positions, "attn_mask": visible[:, None], "ends": ends}


# -----------------------------------------------------------------------------
# scalar head: reward model and value model

class ScoreModel(GPT):
    """GPT trunk + Linear(n_embd, 1). reward = score at the last real token; value = score at every position."""

    def __init__(self, config: GPTConfig):
        super().__init__(config)
        self.score_head = nn.Linear(config.n_embd, 1)
        # std 1/sqrt(d+1) as in OpenAI's lm-human-preferences reward head
        nn.init.normal_(self.score_head.weight, std=1.0 / math.sqrt(config.n_embd + 1))
        nn.init.zeros_(self.score_head.bias)

    def forward(self, idx, attention_mask=None):
        """Scores at every position (B, T)."""
        return self.score_head(self.hidden_states(idx, attention_mask)).squeeze(-1)

    def values(self, idx, attention_mask=None):
        return self(idx, attention_mask)

    def reward(self, idx, attention_mask=None):
        """Score at the last real token of each row (B,), for left- or right-padded batches."""
        scores = self(idx, attention_mask)                                        # (B, T)
        if attention_mask is None:
            return scores[:, -1]
        return scores.gather(1, last_real_index(attention_mask)[:, None]).squeeze(1)

    @classmethod
    def from_lm_state(cls, config: GPTConfig, lm_state: dict) -> "ScoreModel":
        """Trunk from a language model's weights; the head keeps its fresh init."""
        model = cls(config)
        missing, unexpected = model.load_state_dict(lm_state, strict=False)
        if unexpected or set(missing) - {"score_head.weight", "score_head.bias"}:
            raise ValueError(f"LM weights do not fit: missing {missing}, unexpected {unexpected}")
        return model


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last 1 in each row of a 0/1 mask."""
    T = attention_mask.size(1)
    idx = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), idx, torch.zeros_like(idx)).max(dim=1).values


def build_model(ckpt: dict, cls=None, dropout: float | None = None) -> nn.Module:
    """A GPT or ScoreModel from a loaded checkpoint dict (its `model_config` and `model`); `dropout`, when
    given, replaces the trained value (0.0 for evaluation, generation and RLHF, which never use it)."""
    overrides = {} if dropout is None else {"dropout": dropout}
    config = GPTConfig.from_dict({**ckpt["model_config"], **overrides})
    if cls is None:
        cls = ScoreModel if "score_head.weight" in ckpt["model"] else GPT
    model = cls(config)
    model.load_state_dict(ckpt["model"])
    return model
