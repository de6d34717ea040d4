"""ppo.py: GAE, whitening, the clipped losses, the KL reward and the KL controller against hand-computed
values; rollout log-probs against generate() and against the update's own forward (ratio exactly 1,
left padding included); whitening statistics over 2 real gloo processes; a tiny run end to end with an
exact resume and a 2-process torchrun; and, on the generated world with `small` models, that PPO raises
the reward-model score and the gold score within a KL bound."""
import json
import math
import os

import pytest
import torch

import ppo
import rollouts
import tldr
from checkpoints import load_checkpoint, save_checkpoint
from common import UserError, compute_init, config_from
from conftest import ROOT, run_script, run_torchrun
from model import EOS_ID, GPT, GPTConfig, PAD_ID, ScoreModel, build_model, left_pad
from summaries import generate_summaries, gold_scores

TINY_INFO = tldr.template_info(max_prompt_tokens=80, max_summary_tokens=12)


# -----------------------------------------------------------------------------
# the PPO math against hand-computed values

def test_gae_hand_computed():
    # row 0: three real tokens; row 1: one real token; padding carries garbage that must not leak in
    rewards = torch.tensor([[0.1, -0.2, 1.0, 5.0], [0.5, 3.0, 3.0, 3.0]])
    values = torch.tensor([[0.5, 0.3, 0.2, 9.0], [0.25, 7.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # deltas: 1.0 - 0.2 = 0.8; -0.2 + 0.2 - 0.3 = -0.3; 0.1 + 0.3 - 0.5 = -0.1
    # A2 = 0.8; A1 = -0.3 + 0.95 * 0.8 = 0.46; A0 = -0.1 + 0.95 * 0.46 = 0.337; row 1: 0.5 - 0.25
    torch.testing.assert_close(adv, torch.tensor([[0.337, 0.46, 0.8, 0.0], [0.25, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.837, 0.76, 1.0, 0.0], [0.5, 0.0, 0.0, 0.0]]))
    # gamma 0.5, lambda 1: deltas 0.8; -0.2 + 0.1 - 0.3 = -0.4; 0.1 + 0.15 - 0.5 = -0.25
    # A1 = -0.4 + 0.5 * 0.8 = 0.0; A0 = -0.25 + 0.5 * 0.0 = -0.25
    adv, _ = ppo.gae(rewards[:1], values[:1], mask[:1], gamma=0.5, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[-0.25, 0.0, 0.8, 0.0]]))


def test_group_advantages_hand_computed():
    # two prompts x 3 samples; per-token rewards summed over real tokens (padding 9.0 must not count)
    rewards = torch.tensor([[1.0, 0.0], [0.0, 9.0], [0.5, 0.5], [0.2, 9.0], [0.2, 9.0], [0.8, 9.0]])
    mask = torch.tensor([[1.0, 1], [1, 0], [1, 1], [1, 0], [1, 0], [1, 0]])
    adv = ppo.group_advantages(rewards, mask, group=3)
    # prompt 0 totals 1, 0, 1: 1 - (0 + 1) / 2 = 0.5; 0 - (1 + 1) / 2 = -1; 1 - 0.5 = 0.5
    # prompt 1 totals 0.2, 0.2, 0.8: 0.2 - 0.5 = -0.3 (twice); 0.8 - 0.2 = 0.6
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.5], [-1.0, 0.0], [0.5, 0.5], [-0.3, 0.0], [-0.3, 0.0], [0.6, 0.0]]))


def test_masked_whiten_hand_computed():
    x = torch.tensor([[1.0, 3.0, 5.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # mean 3, unbiased variance (4 + 0 + 4) / 2 = 4: (x - 3) / 2
    torch.testing.assert_close(ppo.masked_whiten(x, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(ppo.masked_whiten(x, mask, shift_mean=False), torch.tensor([[2.0, 3.0, 4.0, 0.0]]),
                               atol=1e-6, rtol=0)


def test_kl_rewards_hand_computed():
    logp = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-0.3, -4.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -7.0], [-0.1, -3.0, -2.0, -2.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    rewards, kl = ppo.kl_rewards(logp, ref, torch.tensor([2.0, -1.0]), mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0], [-0.2, -1.0, 0.0, 0.0]]))
    # -0.1 * kl, and the score at the last real token (index 2 and index 1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 2.0, 0.0], [0.02, 0.1 - 1.0, 0.0, 0.0]]))


def test_policy_loss_hand_computed():
    ratios = torch.tensor([[1.5, 0.9, 0.7, 1.1, 50.0]])  # the last is padding: ignored however large
    logp, old = ratios.log(), torch.zeros(1, 5)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0]])
    mask = torch.tensor([[1.0, 1, 1, 1, 0]])
    loss, stats = ppo.policy_loss(logp, old, adv, mask, cliprange=0.2)
    # per token max(-A r, -A clip(r)): max(-1.5, -1.2) = -1.2 (clipped); -0.9; max(0.7, 0.8) = 0.8 (clipped); 1.1
    assert loss.item() == pytest.approx((-1.2 - 0.9 + 0.8 + 1.1) / 4, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    expected_kl = 0.5 * sum(math.log(r) ** 2 for r in (1.5, 0.9, 0.7, 1.1)) / 4
    assert stats["approx_kl"].item() == pytest.approx(expected_kl, rel=1e-5)
    # a minibatch cut into micro-batches: sums over the pieces with the minibatch's token count add up
    parts = [ppo.policy_loss(logp[:, s], old[:, s], adv[:, s], mask[:, s], 0.2, denom=mask.sum())[0]
             for s in (slice(0, 2), slice(2, 5))]
    assert sum(parts).item() == pytest.approx(loss.item(), abs=1e-6)
    # the gradient flows only through the unclipped tokens: d/dlogp of -A r = -A r at tokens 1 and 3
    logp = logp.clone().requires_grad_(True)
    ppo.policy_loss(logp, old, adv, mask, 0.2)[0].backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.9 / 4, 0.0, 1.1 / 4, 0.0]]))


def test_value_loss_hand_computed():
    old = torch.tensor([[0.0, 0.0, 0.0]])
    new = torch.tensor([[0.5, -0.1, 3.0]])
    returns = torch.tensor([[1.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = ppo.value_loss(new, old, returns, mask, cliprange_value=0.2)
    # token 0: clipped 0.2, max((0.5-1)^2, (0.2-1)^2) = 0.64; token 1: both 0.81
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2, abs=1e-6)
    assert stats["vf_clipfrac"].item() == pytest.approx(0.5)


def test_kl_controller_and_explained_variance():
    fixed = ppo.KLController(0.05)
    fixed.update(100.0, 512)
    assert fixed.value == 0.05
    ctl = ppo.KLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, 512)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 512 / 10000))
    ctl.update(5.7, 1000)  # error -0.05
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 512 / 10000) * (1 - 0.05 * 0.1))

    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    returns = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    assert ppo.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    # residuals (0, 1, 0): variance 2/9, over the returns' 2/3 (population variances)
    assert ppo.explained_variance(torch.tensor([[1.0, 1.0, 3.0, 9.0]]), returns, mask) == pytest.approx(2 / 3)


def _whiten_worker(rank, port, out):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    x = torch.tensor([[1.0, 2.0, 7.0], [4.0, 0.0, 0.0]]) if rank == 0 else torch.tensor([[10.0, -3.0, 5.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]]) if rank == 0 else torch.tensor([[1.0, 1, 0]])
    torch.save(ppo.masked_whiten(x, mask), f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_whitening_statistics_are_global_over_two_gloo_processes(tmp_path):
    """Two real processes whiten their own rows; the result equals whitening all rows in one process."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_whiten_worker, args=(port, str(tmp_path)), nprocs=2)
    values = torch.tensor([1.0, 2.0, 7.0, 4.0, 10.0, -3.0])  # the real tokens of both ranks
    expected = (values - values.mean()) / values.std()
    got0, got1 = (torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in (0, 1))
    torch.testing.assert_close(torch.cat([got0[0], got0[1, :1], got1[0, :2]]), expected, atol=1e-5, rtol=0)
    assert got0[1, 1:].abs().sum() == 0 and got1[0, 2] == 0


# -----------------------------------------------------------------------------
# tiny checkpoints: a random tiny LM that ends its responses at random lengths, and a reward model from it

def _tiny_lm(seed=0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():  # peaked logits, and EOS's raised so that sampled responses end at varied lengths
        model.transformer.wte.weight.mul_(25)
        e = model.transformer.wte.weight[EOS_ID]
        model.transformer.ln_f.bias += 13 * e / e.norm() ** 2
    return model


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo_tiny")
    lm = _tiny_lm()
    save_checkpoint(out / "sft.pt", stage="sft", model=lm, tldr=TINY_INFO)
    torch.manual_seed(1)
    rm = ScoreModel.from_lm_state(lm.config, lm.state_dict())
    save_checkpoint(out / "rm.pt", stage="reward_model", model=rm, tldr=TINY_INFO,
                    reward_norm={"bias_shift": 0.0, "std": 1.0})
    return out


def _tiny_cfg(tiny_ckpts, synthetic_dir, tmp_path, **overrides):
    values = dict(sft=str(tiny_ckpts / "sft.pt"), rm=str(tiny_ckpts / "rm.pt"), data=str(synthetic_dir / "tldr"),
                  ckpt_dir=str(tmp_path), run_name=str(tmp_path / "run"))
    return config_from(ppo.Config, ppo.PRESETS, "tiny", **{**values, **overrides})


def test_rollout_logprobs_equal_generate_and_the_first_update_forward(tiny_ckpts, synthetic_dir, tmp_path):
    cfg = _tiny_cfg(tiny_ckpts, synthetic_dir, tmp_path, micro_batch=3, lr=0.0)
    rt = compute_init(0, "cpu", "float32")
    policy, ref, info = ppo.load_policy(cfg, None)
    task = ppo.TldrTask(cfg, info, rt)
    pv = rollouts.PolicyAndValue(policy, task.reward.value_model())
    prompts = task.train_prompts(list(range(8)))
    assert len({len(p) for p in prompts}) > 1  # left padding really happens
    ro, _ = rollouts.token_rollout(task, prompts, policy, pv, ref, cfg, rt, torch.Generator().manual_seed(3))
    lengths = ro.mask.sum(1)
    assert lengths.min() < ro.mask.size(1) and (ro.response == EOS_ID).any()  # some responses end early

    # the log-probs generate() reported while sampling the same tokens (KV cache, incremental)
    query, qmask = left_pad(prompts, PAD_ID)
    tokens, gen_logp, gen_mask = policy.generate(query, qmask, max_new_tokens=cfg.response_length,
                                                 temperature=cfg.temperature, generator=torch.Generator().manual_seed(3))
    assert torch.equal(tokens, ro.response[:, :tokens.size(1)]) and torch.equal(gen_mask.float(), ro.mask[:, :tokens.size(1)])
    torch.testing.assert_close(ro.logprobs[:, :tokens.size(1)], gen_logp, atol=1e-4, rtol=0)

    # each row alone, unpadded, through the plain policy: same log-probs (left padding changes nothing)
    for i in (0, 5):
        n = int(lengths[i])
        row = torch.tensor([prompts[i] + ro.response[i, :n].tolist()])
        logits, _ = policy(row, logits_at=slice(len(prompts[i]) - 1, -1))
        alone, _ = rollouts.token_logprobs(logits, ro.response[i:i + 1, :n], cfg.temperature)
        torch.testing.assert_close(alone[0], ro.logprobs[i, :n], atol=1e-5, rtol=0)

    # the update's forward on a shuffled minibatch: ratio 1, so nothing is clipped and approx KL is 0
    rows = torch.tensor([6, 1, 4, 3])
    logits, values = pv(ro.idx[rows], ro.attention_mask[rows], ro.start)  # logits at real response tokens only
    real = ro.mask[rows].bool()
    assert logits.size(0) == real.sum() < real.numel()
    logp = rollouts.unflatten(rollouts.token_logprobs(logits, ro.response[rows][real], cfg.temperature)[0], real)
    torch.testing.assert_close(logp, ro.logprobs[rows], atol=1e-5, rtol=0)
    torch.testing.assert_close(values * ro.mask[rows], ro.values[rows], atol=1e-5, rtol=0)
    rewards, _ = ppo.kl_rewards(ro.logprobs, ro.ref_logprobs, ro.scores, ro.mask, 0.05)
    advantages, returns = ppo.gae(rewards, ro.values, ro.mask)
    opt = GPT.configure_optimizers(pv, 0.0, 0.0, device_type="cpu")  # lr 0: every minibatch sees the rollout policy
    stats = ppo.ppo_update(pv, opt, rt.grad_scaler(), ro, ppo.masked_whiten(advantages, ro.mask), returns, cfg, rt, 0,
                           torch.Generator().manual_seed(0))
    assert stats["ratio"] == pytest.approx(1.0, abs=1e-5)
    assert stats["approx_kl"] < 1e-9 and stats["clipfrac"] == 0.0
    # the missing-EOS rule: a response that never ended scores exactly --missing-eos-score
    ended = ((ro.response == EOS_ID) & ro.mask.bool()).any(1)
    assert torch.equal(ro.scores[~ended], torch.full_like(ro.scores[~ended], -1.0))
    assert torch.equal(ro.scores[ended], ro.raw_scores[ended])


def _train_records(run_dir):
    return [json.loads(line) for line in open(run_dir / "log.jsonl") if '"kind": "train"' in line]


def test_tiny_run_end_to_end_exact_resume_and_summarize(tiny_ckpts, synthetic_dir, tmp_path):
    keys = ("score", "kl", "pg_loss", "vf_loss", "approx_kl", "clipfrac", "entropy", "resp_len")
    small = dict(max_steps=2, eval_every=0, eval_prompts=4, save_every=0)
    straight = ppo.main(_tiny_cfg(tiny_ckpts, synthetic_dir, tmp_path / "a", **small))
    a = _train_records(tmp_path / "a" / "run")
    assert [r["step"] for r in a] == [0, 1] and all(math.isfinite(r["pg_loss"]) for r in a)
    assert "eval_win_rate" in straight and "eval_gold" in straight and "sft_gold" in straight  # generated data: gold on

    ppo.main(_tiny_cfg(tiny_ckpts, synthetic_dir, tmp_path / "b", stop_at=1, **small))
    ppo.main(_tiny_cfg(tiny_ckpts, synthetic_dir, tmp_path / "b", resume=True, **small))
    b = _train_records(tmp_path / "b" / "run")
    assert [r["step"] for r in b] == [0, 1]
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in keys} == {k: rb[k] for k in keys}  # bit-exact on CPU
    ck_a = load_checkpoint(tmp_path / "a" / "ppo_latest.pt", "ppo")
    ck_b = load_checkpoint(tmp_path / "b" / "ppo_latest.pt", "ppo")
    assert ck_a["step"] == 2 and ck_a["tldr"] == TINY_INFO and ck_a["data_state"] == ck_b["data_state"]
    for k, v in ck_a["model"].items():
        assert torch.equal(v, ck_b["model"][k]), k

    post = tldr.load_sft(str(synthetic_dir / "tldr"), "test")[0].post
    r = run_script([ROOT / "summarize.py", "--ckpt", tmp_path / "a" / "ppo_latest.pt", "--subreddit", post.subreddit,
                    "--title", post.title, post.post])
    assert r.returncode == 0, r.stderr
    policy = build_model(ck_a, GPT, dropout=0.0).eval()
    assert r.stdout.strip() == generate_summaries(policy, [post], max_new_tokens=TINY_INFO["max_summary_tokens"],
                                                       max_prompt_tokens=TINY_INFO["max_prompt_tokens"])[0]


def test_two_process_torchrun(tiny_ckpts, synthetic_dir, tmp_path):
    flags = ["--preset", "tiny", "--sft", tiny_ckpts / "sft.pt", "--rm", tiny_ckpts / "rm.pt", "--data",
             synthetic_dir / "tldr", "--ckpt-dir", tmp_path, "--run-name", tmp_path / "run", "--max-steps", "2",
             "--eval-prompts", "4", "--eval-every", "0", "--sample-every", "0"]
    r = run_torchrun("ppo.py", flags)
    assert "2 process(es)" in r.stdout
    records = _train_records(tmp_path / "run")
    assert [rec["step"] for rec in records] == [0, 1]
    assert load_checkpoint(tmp_path / "ppo_latest.pt", "ppo")["step"] == 2


def test_user_errors(tiny_ckpts, synthetic_dir, tmp_path):
    with pytest.raises(UserError, match="expected sft"):
        ppo.main(_tiny_cfg(tiny_ckpts, synthetic_dir, tmp_path, sft=str(tiny_ckpts / "rm.pt")))
    with pytest.raises(UserError, match="split evenly"):
        ppo.main(_tiny_cfg(tiny_ckpts, synthetic_dir, tmp_path, rollout_batch=6, num_minibatches=4))
    with pytest.raises(UserError, match="block size"):
        ppo.main(_tiny_cfg(tiny_ckpts, synthetic_dir, tmp_path, response_length=100))
    with pytest.raises(UserError, match="--reward rm"):
        ppo.main(_tiny_cfg(tiny_ckpts, synthetic_dir, tmp_path, reward="judge"))
    with pytest.raises(UserError, match="not found"):
        ppo.main(_tiny_cfg(tiny_ckpts, synthetic_dir, tmp_path, resume=True))


def test_divergence_stops_with_the_step_and_what_was_large():
    at = {"pg_loss": 0, "vf_loss": 1, "approx_kl": 2}
    cfg = ppo.Config(max_approx_kl=1.0)
    with pytest.raises(UserError, match=r"value loss is nan at step 7 \(epoch 1, minibatch 0\)"):
        ppo.check_update(torch.tensor([0.1, float("nan"), 0.0]), at, cfg, 7, 1, 0)
    with pytest.raises(UserError, match=r"approx KL .* is 3.5 at step 2 .* above --max-approx-kl 1.0"):
        ppo.check_update(torch.tensor([0.1, 0.2, 3.5]), at, cfg, 2, 0, 3)
    ppo.check_update(torch.tensor([0.1, 0.2, 0.5]), at, cfg, 2, 0, 3)  # healthy: no error


# -----------------------------------------------------------------------------
# learning: the small models of the generated world

def test_small_ppo_raises_the_reward_model_score_within_a_kl_bound(small_ppo_run):
    # 2 PPO epochs instead of the preset's 4 and 8 steps instead of 12, to fit the suite's time (the
    # small_ppo_run fixture): measured RM score 0.008 -> 0.195, win rate 0.70, KL 0.9 (12 steps: 0.361, 0.83, 1.5)
    out, metrics, cfg = small_ppo_run
    evals = [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    first, last = evals[0], evals[-1]
    print(f"small PPO, {cfg.max_steps} steps x {cfg.rollout_batch} rollouts, {cfg.eval_prompts} held-out posts, greedy: "
          f"RM score {first['eval_rm_score']:.3f} -> {last['eval_rm_score']:.3f}, win rate over SFT "
          f"{last['eval_win_rate']:.3f}, KL {last['eval_kl']:.3f}, gold {last['sft_gold']:.3f} -> {last['eval_gold']:.3f}")
    assert first["step"] == 0 and last["step"] == cfg.max_steps and metrics["eval_kl"] == last["eval_kl"]
    assert first["eval_kl"] == 0.0 and first["eval_win_rate"] == 0.5  # the policy starts as the SFT model
    assert last["eval_rm_score"] > first["eval_rm_score"] + 0.1
    assert last["eval_win_rate"] > 0.6
    # the KL penalty (beta 0.05) keeps the policy near the SFT model: a few nats per summary (measured
    # 0.9 here; 1.7 to 4.6 with 4 epochs and 12 steps, depending on the thread count's rounding), not tens
    assert 0.0 < last["eval_kl"] < 8.0


@pytest.mark.slow
def test_ppo_on_comparisons_of_its_own_samples_raises_the_gold_score(small_pretrain_ckpt, synthetic_dir, tmp_path):
    # the chain a user runs on the generated world, at the `small` size: SFT long enough that its summaries
    # vary in quality (250 steps, gold about 0.5), comparisons of its own samples labelled by the world's
    # rater (10% of labels flipped), a reward model on them, then PPO (2 epochs per batch, as the test above)
    import time

    import eval_summaries
    import reward_model
    import sample_comparisons
    import sft
    start = time.time()
    tldr_dir = str(synthetic_dir / "tldr")
    sft.main(config_from(sft.Config, sft.PRESETS, "small", init=str(small_pretrain_ckpt), data=tldr_dir, max_steps=250,
                         eval_every=0, val_examples=64, num_samples=0, ckpt_dir=str(tmp_path), run_name=str(tmp_path / "sft")))
    sft_ckpt = tmp_path / "best_sft.pt"
    sample_comparisons.main(config_from(sample_comparisons.Config, None, None, policy=str(sft_ckpt), data=tldr_dir,
                                        out=str(tmp_path / "sampled"), train_posts=800, valid_posts=200, batch_size=128))
    reward_model.main(config_from(reward_model.Config, reward_model.PRESETS, "small", init=str(sft_ckpt),
                                  data=str(tmp_path / "sampled"), sft_data=tldr_dir, max_steps=300, eval_every=0,
                                  save_every=0, ckpt_dir=str(tmp_path), run_name=str(tmp_path / "rm")))
    cfg = config_from(ppo.Config, ppo.PRESETS, "small", sft=str(sft_ckpt), rm=str(tmp_path / "reward_model.pt"),
                      data=tldr_dir, ppo_epochs=2, eval_every=0, sample_every=0, save_every=0, ckpt_dir=str(tmp_path),
                      run_name=str(tmp_path / "ppo"))
    ppo.main(cfg)
    evals = [json.loads(line) for line in (tmp_path / "ppo" / "log.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    first, last = evals[0], evals[-1]

    # the gold score of greedy summaries of all 400 test posts (no stage selects on them), paired by post
    rt = compute_init(0, "cpu", "float32")
    posts = [e.post for e in tldr.load_sft(tldr_dir, "test")]
    gold = {name: gold_scores(posts, eval_summaries.summarize_with(tmp_path / ckpt, ("sft", "ppo"), posts, rt, 64)[0])
            for name, ckpt in (("sft", "best_sft.pt"), ("ppo", "ppo_latest.pt"))}
    diff, se = eval_summaries.paired_difference(gold["sft"], gold["ppo"])
    mean = {name: sum(g) / len(g) for name, g in gold.items()}
    print(f"SFT 250 steps -> comparisons of its samples -> RM 300 steps -> PPO {cfg.max_steps} steps, "
          f"{time.time() - start:.0f} s in all: RM score {first['eval_rm_score']:.3f} -> {last['eval_rm_score']:.3f}, "
          f"KL {last['eval_kl']:.3f}, gold on {len(posts)} test posts {mean['sft']:.3f} -> {mean['ppo']:.3f} "
          f"({diff:+.3f} +- {se:.3f})")
    assert last["eval_rm_score"] > first["eval_rm_score"] + 0.1
    assert 0.0 < last["eval_kl"] < 8.0
    # measured +0.14 +- 0.02 here (+0.09 in a run by hand); a reward model on the variant comparisons moves it by -0.13
    assert diff > 3 * se and diff > 0.03
