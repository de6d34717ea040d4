"""ppo.py --task hellaswag (hellaswag_task.py): the 4-way choice policy's scores, log-probs and KL against
hand values and against hellaswag.py's own scorer; rollout log-probs equal the update's forward (ratio 1);
the judge bridge against scoring the same text directly with an offline judge of another tokenizer (a
`tokenizers` BPE + a tiny random Llama, a classifier, our reward model); the judge path end to end from
the command line; an exact resume; several samples per context sharing one forward. How far `--reward
label` raises a small model's val acc_norm on the generated data is `make test-slow` (marked `slow`: its
40 steps take about 4 minutes of 2 cores, more than the 10-minute suite has left)."""
import json
import math
import sys
import time
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import hellaswag
import hellaswag_task as ht
import ppo
from checkpoints import load_checkpoint, save_checkpoint
from common import UserError, compute_init, config_from, get_tokenizer
from conftest import ROOT, random_pretrain_ckpt, run_script, unigram_gpt as rigged_gpt
from judges import Judge, judge_pair_tokens
from model import GPT, PAD_ID, TOKENIZER_VOCAB, GPTConfig, ScoreModel, build_model

UNICODE = "Zoë's café – naïve 😀 ünïcödé"


# -----------------------------------------------------------------------------
# the choice policy against hand values

def unigram_gpt(boost: dict[str, float], seed: int = 0) -> GPT:
    """A GPT whose next-token logits ignore the context (conftest.unigram_gpt): `boost` (token text → logit)
    and 0 elsewhere."""
    return rigged_gpt(boost, GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32), seed).eval()


def hand_logp(boost: dict[str, float], word: str) -> float:
    """log p(word) under unigram_gpt(boost): its logit minus log Z over the 50,257 real tokens."""
    log_z = math.log(TOKENIZER_VOCAB - len(boost) + sum(math.exp(v) for v in boost.values()))
    return boost.get(word, 0.0) - log_z


ENDINGS = [[" cat", " sleeps"], [" dog"], [" sleeps", " dog", " dog"], [" runs"]]


def hand_example(label=2):
    enc = get_tokenizer()
    return hellaswag.Encoded(context=enc.encode_ordinary("The house is quiet and"),
                             endings=[[enc.encode_ordinary(w)[0] for w in e] for e in ENDINGS],
                             norms=None, label=label, split_type="indomain")


def test_choice_scores_logprobs_and_kl_against_hand_values():
    policy_boost = {" cat": 4.0, " sleeps": 2.0, " dog": 3.0, " runs": -1.0}
    ref_boost = {" cat": 1.0, " sleeps": 5.0, " dog": 0.5}
    policy, ref = unigram_gpt(policy_boost), unigram_gpt(ref_boost, seed=1)
    batch = ht.choice_batch([hand_example(), hand_example(0)], policy.config.block_size)
    args = (batch.idx, batch.attention_mask, batch.targets)

    sums = [sum(hand_logp(policy_boost, w) for w in e) for e in ENDINGS]
    means = [s / len(e) for s, e in zip(sums, ENDINGS)]
    with torch.no_grad():
        got_sum, got_mean = ht.choice_scores(policy, *args, norm="sum"), ht.choice_scores(policy, *args, norm="mean")
        ref_mean = ht.choice_scores(ref, *args, norm="mean")
    torch.testing.assert_close(got_sum, torch.tensor([sums, sums]), atol=1e-4, rtol=0)
    torch.testing.assert_close(got_mean, torch.tensor([means, means]), atol=1e-4, rtol=0)

    # the policy: softmax(score / T) over the 4 endings; the KL: sum_a p(a) (log p(a) - log q(a))
    T = 0.7
    z = [math.exp(m / T) for m in means]
    p = [v / sum(z) for v in z]
    ref_means = [sum(hand_logp(ref_boost, w) for w in e) / len(e) for e in ENDINGS]
    zq = [math.exp(m / T) for m in ref_means]
    q = [v / sum(zq) for v in zq]
    torch.testing.assert_close(ht.choice_logprobs(got_mean, T)[0], torch.tensor(p).log(), atol=1e-5, rtol=0)
    kl = sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    assert ht.choice_kl(got_mean, ref_mean, T)[0].item() == pytest.approx(kl, abs=1e-5)
    assert ht.choice_kl(got_mean, got_mean, T)[0].item() == pytest.approx(0.0, abs=1e-7)


def test_choice_scores_equal_hellaswag_scorer_and_value_is_the_context_state(synthetic_dir):
    """On real-schema rows of varied lengths (padding), a random model: choice_scores == hellaswag.py's
    score_endings (sum, and sum / tokens), and the value is the value model's at the last context token."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    rows = hellaswag.load_rows(synthetic_dir / "hellaswag" / "hellaswag_train.jsonl", limit=6)
    examples = [hellaswag.encode_row(r, "completion") for r in rows]
    assert len({len(ex.context) for ex in examples}) > 1
    sums, counts = hellaswag.score_endings(model, examples, batch_size=2)
    batch = ht.choice_batch(examples, model.config.block_size)
    with torch.no_grad():
        got = ht.choice_scores(model, batch.idx, batch.attention_mask, batch.targets, "sum")
        got_mean = ht.choice_scores(model, batch.idx, batch.attention_mask, batch.targets, "mean")
    torch.testing.assert_close(got.double(), sums, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_mean.double(), sums / counts, atol=1e-4, rtol=0)

    value = ScoreModel.from_lm_state(model.config, model.state_dict()).eval()
    pv = ht.ChoicePolicyAndValue(model, value, "mean")
    with torch.no_grad():
        scores, values = pv(batch.idx, batch.attention_mask, batch.targets, batch.value_at)
        torch.testing.assert_close(scores, got_mean)
        for i, ex in enumerate(examples):  # the context alone, cut as the sequences are
            ctx = ex.context[-(model.config.block_size + 1 - len(ex.endings[0])):]
            alone = value.values(torch.tensor([ctx]))[0, -1]
            assert values[i, 0].item() == pytest.approx(alone.item(), abs=1e-5)


def test_label_rewards_hand_values():
    actions, labels = torch.tensor([2, 0, 1, 3]), torch.tensor([2, 1, 1, 0])
    scores = torch.tensor([[0.0, 0.0, 1.0, 0.0], [-1.0, -1.5, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [-0.2, 0.0, 0.0, -5.0]])
    assert ht.label_rewards(actions, labels, scores, "hit").tolist() == [1.0, 0.0, 1.0, 0.0]
    # margin: the label outscored by the wrong choice by 0.5 → -0.5; a wrong choice below the label → 0
    torch.testing.assert_close(ht.label_rewards(actions, labels, scores, "margin"), torch.tensor([1.0, -0.5, 1.0, 0.0]))
    scores[1, 0] = 3.0  # outscored by 4.5: the cost stops at 1
    assert ht.label_rewards(actions, labels, scores, "margin")[1].item() == -1.0


# -----------------------------------------------------------------------------
# the choice rollout inside ppo.py's loop

@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory):
    return random_pretrain_ckpt(tmp_path_factory, "hs_tiny", GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32))


def _cfg(tiny_init, synthetic_dir, tmp_path, **overrides):
    values = dict(task="hellaswag", reward="label", init=str(tiny_init), hellaswag_dir=str(synthetic_dir / "hellaswag"),
                  ckpt_dir=str(tmp_path), run_name=str(tmp_path / "run"), eval_prompts=8, eval_every=0,
                  sample_every=1, save_every=0)
    return config_from(ppo.Config, ppo.PRESETS, "tiny", **{**values, **overrides})


def update_at_lr0(pv, ro, cfg, rt) -> dict:
    """ppo.py's steps 3-5 (KL rewards, GAE, whitening, the clipped update) on a rollout, at learning rate 0:
    the update's stats."""
    rewards, _ = ppo.kl_rewards(ro.logprobs, ro.ref_logprobs, ro.scores, ro.mask, 0.05)
    advantages, returns = ppo.gae(rewards, ro.values, ro.mask)
    opt = GPT.configure_optimizers(pv, 0.0, 0.0, device_type="cpu")
    return ppo.ppo_update(pv.train(), opt, rt.grad_scaler(), ro, ppo.masked_whiten(advantages, ro.mask), returns,
                          cfg, rt, 0, torch.Generator().manual_seed(0))


def test_choice_rollout_logprobs_equal_hellaswag_scores_and_the_update_forward(tiny_init, synthetic_dir, tmp_path):
    cfg = _cfg(tiny_init, synthetic_dir, tmp_path, micro_batch=3, lr=0.0, temperature=0.8)
    rt = compute_init(0, "cpu", "float32")
    policy, ref, info = ppo.TASKS["hellaswag"].load_policy(cfg, None)
    task = ppo.TASKS["hellaswag"].build(cfg, info, rt)
    assert isinstance(task, ht.HellaswagChoiceTask)
    pv = task.policy_and_value(policy, task.reward.value_model()).eval()
    items = task.train_prompts(list(range(8)))
    ro, _ = task.rollout(items, policy, pv, ref, cfg, rt, torch.Generator().manual_seed(3))

    # log-probs of the sampled endings: softmax(mean log-likelihood / T) from hellaswag.py's scorer
    sums, counts = hellaswag.score_endings(policy, [enc for _, enc in items], batch_size=4)
    expected = F.log_softmax((sums / counts).float() / cfg.temperature, dim=-1)
    torch.testing.assert_close(ro.logprobs[:, 0], expected.gather(1, ro.actions).squeeze(1), atol=1e-4, rtol=0)
    torch.testing.assert_close(ro.ref_logprobs, ro.logprobs)  # the policy starts as the reference
    labels = torch.tensor([row["label"] for row, _ in items])
    assert torch.equal(ro.scores, (ro.actions[:, 0] == labels).float()) and ro.mask.shape == (8, 1)
    # the value model starts at 0 in every context (a random head's values would be noise in r - V)
    assert torch.equal(ro.values, torch.zeros(8, 1))
    again, _ = task.rollout(items, policy, pv, ref, cfg, rt, torch.Generator().manual_seed(3))
    assert torch.equal(again.actions, ro.actions)
    assert "->" in ro.show(task, 0) and items[0][0]["endings"][int(ro.actions[0])] in ro.show(task, 0)

    # ppo.py's update on this rollout: the first forward reproduces the rollout exactly (ratio 1)
    stats = update_at_lr0(pv, ro, cfg, rt)
    assert stats["ratio"] == pytest.approx(1.0, abs=1e-5)
    assert stats["approx_kl"] < 1e-9 and stats["clipfrac"] == 0.0


def test_several_samples_per_context_share_its_forward(tiny_init, synthetic_dir, tmp_path):
    """--samples-per-prompt K: K rows per context, consecutive, with that context's distribution, value and
    label; the update keeps a context's rows in one micro-batch and scores each context once per epoch."""
    K = 3
    cfg = _cfg(tiny_init, synthetic_dir, tmp_path, micro_batch=2, lr=0.0, samples_per_prompt=K)
    rt = compute_init(0, "cpu", "float32")
    policy, ref, info = ppo.TASKS["hellaswag"].load_policy(cfg, None)
    task = ppo.TASKS["hellaswag"].build(cfg, info, rt)
    pv = task.policy_and_value(policy, task.reward.value_model()).eval()
    items = task.train_prompts(list(range(8)))
    ro, timing = task.rollout(items, policy, pv, ref, cfg, rt, torch.Generator().manual_seed(3))
    assert ro.mask.shape == ro.actions.shape == (8 * K, 1) and timing["gen_tokens"] == 8 * K
    single, _ = task.rollout(items, policy, pv, ref, replace(cfg, samples_per_prompt=1), rt, torch.Generator())
    context = torch.arange(8 * K) // K
    torch.testing.assert_close(ro.probs, single.probs[context])
    assert torch.equal(ro.labels, single.labels[context]) and torch.equal(ro.values, single.values[context])
    torch.testing.assert_close(ro.logprobs[:, 0], single.probs[context].log().gather(1, ro.actions).squeeze(1))
    assert torch.equal(ro.scores, (ro.actions[:, 0] == ro.labels).float())
    assert len(set(ro.actions[:, 0].tolist())) > 1  # sampled, not one ending repeated
    assert items[1][0]["ctx"][-50:] in ro.show(task, K)  # row K belongs to the second context

    contexts_scored = []
    forward = pv.forward
    pv.forward = lambda *args: (contexts_scored.append(args[0].size(0)), forward(*args))[1]
    stats = update_at_lr0(pv, ro, cfg, rt)
    assert stats["ratio"] == pytest.approx(1.0, abs=1e-5)
    # 2 epochs x 2 minibatches of 4 contexts, 2 contexts (6 rows) per micro-batch: each context once per epoch
    assert contexts_scored == [2] * 8
    with pytest.raises(UserError, match="--samples-per-prompt above 1 needs"):
        ppo.main(replace(cfg, reward="judge", judge="x", lr=1e-4))
    with pytest.raises(UserError, match="needs --samples-per-prompt 2 or more"):
        ppo.main(replace(cfg, samples_per_prompt=1, baseline="group", lr=1e-4))


def _train_records(run_dir, kind="train"):
    return [json.loads(line) for line in open(run_dir / "log.jsonl") if f'"kind": "{kind}"' in line]


def test_label_run_resumes_exactly_and_evaluates_on_val(tiny_init, synthetic_dir, tmp_path):
    keys = ("score", "kl", "pg_loss", "vf_loss", "approx_kl", "entropy")
    small = dict(max_steps=2, eval_every=0, save_every=0)
    straight = ppo.main(_cfg(tiny_init, synthetic_dir, tmp_path / "a", **small))
    for k in ("eval_acc_norm", "eval_harness_acc_norm", "start_acc_norm", "start_harness_acc_norm", "eval_choice_kl"):
        assert k in straight and math.isfinite(straight[k]), k
    ppo.main(_cfg(tiny_init, synthetic_dir, tmp_path / "b", stop_at=1, **small))
    ppo.main(_cfg(tiny_init, synthetic_dir, tmp_path / "b", resume=True, **small))
    a, b = _train_records(tmp_path / "a" / "run"), _train_records(tmp_path / "b" / "run")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1]
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in keys} == {k: rb[k] for k in keys}
    ck_a = load_checkpoint(tmp_path / "a" / "ppo_latest.pt", "ppo")
    ck_b = load_checkpoint(tmp_path / "b" / "ppo_latest.pt", "ppo")
    assert ck_a["task"] == "hellaswag" and ck_a["hellaswag"]["init"] == str(tiny_init)
    for k, v in ck_a["model"].items():
        assert torch.equal(v, ck_b["model"][k]), k
    # what hellaswag.py evaluates from the checkpoint is what the run reported
    policy = build_model(ck_a, GPT, dropout=0.0)
    rows = hellaswag.load_rows(synthetic_dir / "hellaswag" / "hellaswag_val.jsonl", limit=8)
    res = hellaswag.evaluate(policy, rows, style="completion", progress=False)
    assert res["completion"]["acc_norm"] == straight["eval_acc_norm"]


@pytest.mark.slow
def test_label_ppo_raises_val_acc_norm_of_a_small_pretrained_model(small_pretrain_ckpt, synthetic_dir, tmp_path):
    """`make test-slow`: --reward label PPO, 8 sampled endings per context, from the small pretrained
    model, lifts acc_norm on the first 300 generated val rows clearly above the start model's, without
    losing the zero-shot rows."""
    cfg = config_from(ppo.Config, ppo.PRESETS, "small", task="hellaswag", reward="label",
                      init=str(small_pretrain_ckpt), hellaswag_dir=str(synthetic_dir / "hellaswag"),
                      temperature=1.0, lr=3e-4, kl_coef=0.3, rollout_batch=32, samples_per_prompt=8, ppo_epochs=2,
                      num_minibatches=2, micro_batch=32, max_steps=40, eval_every=0, eval_prompts=300,
                      sample_every=0, save_every=0, ckpt_dir=str(tmp_path), run_name=str(tmp_path / "run"))
    t0 = time.time()
    m = ppo.main(cfg)
    print(f"label PPO, {cfg.max_steps} steps x {cfg.rollout_batch} contexts x {cfg.samples_per_prompt} samples, "
          f"{time.time() - t0:.0f} s: val acc_norm {m['start_acc_norm']:.3f} -> {m['eval_acc_norm']:.3f} (in-domain "
          f"{m['start_indomain_acc_norm']:.3f} -> {m['eval_indomain_acc_norm']:.3f}, zero-shot "
          f"{m['start_zeroshot_acc_norm']:.3f} -> {m['eval_zeroshot_acc_norm']:.3f}), choice KL {m['eval_choice_kl']:.3f}",
          file=sys.stderr)
    # 0.10 is 2.5 standard errors of the difference of two 300-row accuracies near 0.45 (0.040)
    assert m["eval_acc_norm"] > m["start_acc_norm"] + 0.10, m
    assert m["eval_indomain_acc_norm"] > m["start_indomain_acc_norm"] + 0.10, m
    # the KL penalty keeps the 72 held-out-activity rows from collapsing (--kl-coef 0.05 measured 0.444 -> 0.194)
    assert m["eval_zeroshot_acc_norm"] > m["start_zeroshot_acc_norm"] - 0.15, m


def test_user_errors(tiny_init, synthetic_dir, tmp_path):
    with pytest.raises(UserError, match="--reward label or judge"):
        ppo.main(_cfg(tiny_init, synthetic_dir, tmp_path, reward="rm"))
    with pytest.raises(UserError, match="needs --judge"):
        ppo.main(_cfg(tiny_init, synthetic_dir, tmp_path, reward="judge"))
    with pytest.raises(UserError, match="--choice-norm"):
        ppo.main(_cfg(tiny_init, synthetic_dir, tmp_path, choice_norm="max"))
    with pytest.raises(UserError, match="HellaSwag file not found|cannot be downloaded"):
        ppo.main(_cfg(tiny_init, synthetic_dir, tmp_path, hellaswag_dir=str(tmp_path / "nowhere"),
                      eval_prompts=8))


# -----------------------------------------------------------------------------
# the judge bridge, against an offline judge with its own tokenizer

def build_hf_judge(out, texts, classifier=False):
    """A byte-level BPE trained on `texts`, wrapped as a Hugging Face fast tokenizer that adds a BOS (as
    Llama's does), and a tiny random Llama (causal LM or one-label classifier), saved as a user's
    `--judge` directory would be."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 0)])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2, num_labels=1)
    (LlamaForSequenceClassification if classifier else LlamaForCausalLM)(config).save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_judges(synthetic_dir, tmp_path_factory):
    texts = [json.loads(line)["text"] for line in open(synthetic_dir / "pretrain.jsonl")][:300] + [UNICODE]
    out = tmp_path_factory.mktemp("judges")
    return build_hf_judge(out / "lm", texts), build_hf_judge(out / "classifier", texts, classifier=True)


PAIRS = [
    ("The dog waited by the door.", " It ran to the park."),   # clean word boundary
    ("Emma's sister kept refusing", "  to pay back  the money."),  # leading and inner double spaces
    ("She bought a cup at the", f" {UNICODE}."),               # multi-byte characters
    ("The cat", "s sleep all day"),                             # a merge across the boundary
    ("", "Nothing came before this."),                          # empty context: scored after the BOS
    ("A context with no continuation.", ""),                    # empty continuation
]


def direct_lm_score(model, tokenizer, context, continuation):
    """Mean log-prob of the continuation computed without offsets: tokenize the whole text once; the
    context's tokens are the longest prefix whose decoded text lies within the context."""
    ids = tokenizer(context + continuation)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    n_ctx = 1
    while n_ctx < len(ids) and len(tokenizer.decode(ids[1:n_ctx + 1])) <= len(context) \
            and context.startswith(tokenizer.decode(ids[1:n_ctx + 1])):
        n_ctx += 1
    if n_ctx == len(ids):
        return None
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return sum(logp[t - 1, ids[t]].item() for t in range(n_ctx, len(ids))) / (len(ids) - n_ctx)


def test_judge_bridge_equals_scoring_the_text_directly(hf_judges):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    lm_dir, _ = hf_judges
    judge = Judge(str(lm_dir), "cpu", "float32", batch_size=4)  # the path a user's --judge takes
    assert judge.kind == "lm"
    tokenizer, model = AutoTokenizer.from_pretrained(lm_dir), AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    assert tokenizer("The cat")["input_ids"] != get_tokenizer().encode_ordinary("The cat")  # another tokenizer
    scores, scored = judge.score([c for c, _ in PAIRS], [x for _, x in PAIRS])  # batched: padding inside
    for (context, continuation), s, ok in zip(PAIRS, scores.tolist(), scored.tolist()):
        expected = direct_lm_score(model, tokenizer, context, continuation)
        if expected is None:
            assert not ok and continuation == ""
        else:
            assert ok and s == pytest.approx(expected, abs=1e-4), (context, continuation)
    # the boundary token of "The cat" + "s sleep": the merged token holds continuation text, so it is scored
    ids, start, end = judge_pair_tokens(tokenizer, "The cat", "s sleep all day")
    assert "s" in tokenizer.decode(ids[start:start + 1]) and tokenizer.decode(ids[1:start]) in "The cat"
    assert tokenizer.decode(ids[start:end]).endswith("sleep all day")
    one, _ = judge.score(["The dog waited by the door."], [" It ran to the park."])  # one by one == batched
    assert one.item() == pytest.approx(scores[0].item(), abs=1e-5)


def test_gpt2_tokens_reach_the_judge_as_text(hf_judges, tiny_init, synthetic_dir, tmp_path):
    """HellaswagTask decodes our GPT-2 tokens (unicode included) into the texts the judge scores, cuts
    continuations after their first sentence end, and scores an empty one --judge-empty-score."""
    enc = get_tokenizer()
    cfg = _cfg(tiny_init, synthetic_dir, tmp_path, reward="judge", judge=str(hf_judges[0]), judge_empty_score=-7.0)
    rt = compute_init(0, "cpu", "float32")
    _, _, info = ppo.TASKS["hellaswag"].load_policy(cfg, None)
    task = ppo.TASKS["hellaswag"].build(cfg, info, rt)
    context, cont = "She bought a cup at the", f" {UNICODE}. And then more"
    ctx_ids, cont_ids = enc.encode_ordinary(context), enc.encode_ordinary(cont)
    query, qmask = (torch.tensor([[PAD_ID] + ctx_ids, [PAD_ID] + ctx_ids]), torch.tensor([[0] + [1] * len(ctx_ids)] * 2))
    response = torch.tensor([cont_ids, [enc.eot_token] + [PAD_ID] * (len(cont_ids) - 1)])
    rmask = torch.tensor([[1] * len(cont_ids), [1] + [0] * (len(cont_ids) - 1)])
    cut, cut_mask = ht.cut_at_sentence_end(response, rmask)
    n = len(enc.encode_ordinary(f" {UNICODE}."))
    assert cut_mask[0].tolist() == [1] * n + [0] * (len(cont_ids) - n) and (cut[0, n:] == PAD_ID).all()
    contexts, texts = task.texts(query, qmask, cut, cut_mask)
    assert contexts == [context, context] and texts == [f" {UNICODE}.", ""]
    scores, raw = task.score(query, qmask, cut, cut_mask)
    expected, _ = task.reward.judge.score([context], [f" {UNICODE}."])
    assert scores[0].item() == pytest.approx(expected.item(), abs=1e-6) and scores[1].item() == -7.0


def test_classifier_and_our_reward_model_as_judges(hf_judges, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    _, clf_dir = hf_judges
    judge = Judge(str(clf_dir), "cpu", "float32", batch_size=2)
    assert judge.kind == "classifier"
    tokenizer, model = AutoTokenizer.from_pretrained(clf_dir), AutoModelForSequenceClassification.from_pretrained(clf_dir)
    pairs = PAIRS[:3]
    scores, scored = judge.score([c for c, _ in pairs], [x for _, x in pairs])
    assert scored.all()
    with torch.no_grad():
        for (c, x), s in zip(pairs, scores.tolist()):
            assert s == pytest.approx(model(**tokenizer(c, x, return_tensors="pt")).logits[0, 0].item(), abs=1e-4)

    torch.manual_seed(0)
    rm = ScoreModel(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
    save_checkpoint(tmp_path / "rm.pt", stage="reward_model", model=rm, reward_norm={"bias_shift": 0.0, "std": 1.0})
    judge = Judge(str(tmp_path / "rm.pt"), "cpu", "float32")
    assert judge.kind == "rm"
    scores, _ = judge.score([pairs[2][0]], [pairs[2][1]])
    tokens = torch.tensor([get_tokenizer().encode_ordinary(pairs[2][0] + pairs[2][1])])
    assert scores[0].item() == pytest.approx(rm.reward(tokens).item(), abs=1e-5)


def test_judge_path_end_to_end_from_the_command_line(hf_judges, tiny_init, synthetic_dir, tmp_path):
    flags = ["--task", "hellaswag", "--reward", "judge", "--judge", hf_judges[0], "--preset", "tiny",
             "--init", tiny_init, "--hellaswag-dir", synthetic_dir / "hellaswag", "--max-steps", "2",
             "--eval-prompts", "8", "--eval-every", "0", "--ckpt-dir", tmp_path, "--run-name", tmp_path / "run",
             "--judge-dtype", "float32"]
    r = run_script([ROOT / "ppo.py", *flags])
    assert r.returncode == 0, r.stderr[-3000:]
    train = _train_records(tmp_path / "run")
    assert [rec["step"] for rec in train] == [0, 1]
    assert all(math.isfinite(rec["score"]) and rec["score"] < 0 for rec in train)  # mean log-probs
    evals = _train_records(tmp_path / "run", "eval")
    assert {"eval_judge_score", "start_judge_score", "eval_acc_norm", "start_harness_acc_norm"} <= set(evals[-1])
    assert load_checkpoint(tmp_path / "ppo_latest.pt", "ppo")["hellaswag"]["reward"] == "judge"
    r = run_script([ROOT / "ppo.py", *flags[:4], "--preset", "tiny", "--init", tiny_init, "--judge", tmp_path / "none",
                    "--hellaswag-dir", synthetic_dir / "hellaswag"])
    assert r.returncode == 2 and "cannot load judge" in r.stderr and "Traceback" not in r.stderr
