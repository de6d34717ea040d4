"""dpo.py: the DPO, cDPO and IPO losses against hand-computed values and the log-sigmoid formula; summed
summary log-probs against a naive loop over unpadded sequences, the vocabulary projected at summary positions
only; a tiny run that resumes exactly and whose checkpoint every summarizer command takes; and, on the generated
world from the small SFT model, validation implicit-reward accuracy rising above chance with a growing margin."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import dpo
import serve
import summaries
import tldr
from checkpoints import load_checkpoint, save_checkpoint
from common import UserError, compute_init, config_from
from conftest import first_rows
from model import GPT, GPTConfig

TINY_INFO = tldr.template_info(max_prompt_tokens=80, max_summary_tokens=12)


# -----------------------------------------------------------------------------
# the loss

def test_losses_against_hand_values():
    # log-ratios: chosen -10 - (-11) = 1, rejected -12 - (-11) = -1, so h = 2
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.0))
    losses, chosen, rejected = dpo.dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.2)))       # -log sigmoid(0.2) = 0.598139
    assert losses.item() == pytest.approx(0.598139, abs=1e-6)
    assert (chosen.item(), rejected.item()) == pytest.approx((0.1, -0.1))
    smoothed, _, _ = dpo.dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.9 * 0.598139 + 0.1 * 0.798139, abs=1e-6)  # + 0.1 * -log sigmoid(-0.2)
    ipo, _, _ = dpo.dpo_loss(pc, pr, rc, rr, beta=0.5, loss="ipo")
    assert ipo.item() == pytest.approx((2 - 1 / (2 * 0.5)) ** 2)               # (h - 1/(2 tau))^2 = 1
    ipo_wider, _, _ = dpo.dpo_loss(pc, pr - 1.0, rc, rr, beta=0.25, loss="ipo")  # h = 1 - (-2) = 3, target 1/(2 tau) = 2
    assert ipo_wider.item() == pytest.approx((3 - 2) ** 2)
    # a policy equal to its reference: every reward 0, the loss log 2 (DPO) and 1/(4 beta^2) (IPO)
    zero, c0, r0 = dpo.dpo_loss(rc, rr, rc, rr, beta=0.1)
    assert zero.item() == pytest.approx(math.log(2)) and c0.item() == r0.item() == 0.0
    assert dpo.dpo_loss(rc, rr, rc, rr, beta=0.1, loss="ipo")[0].item() == pytest.approx(25.0)


def test_losses_match_the_formulas_on_random_log_probs():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-30 * torch.rand(64, generator=g) for _ in range(4))
    beta = 0.3
    h = (pc - rc) - (pr - rr)
    losses, chosen, rejected = dpo.dpo_loss(pc, pr, rc, rr, beta)
    torch.testing.assert_close(losses, -torch.log(torch.sigmoid(beta * h)))
    torch.testing.assert_close(chosen - rejected, beta * h)
    smoothed, _, _ = dpo.dpo_loss(pc, pr, rc, rr, beta, label_smoothing=0.2)
    torch.testing.assert_close(smoothed, -0.8 * torch.log(torch.sigmoid(beta * h)) - 0.2 * torch.log(torch.sigmoid(-beta * h)))
    torch.testing.assert_close(dpo.dpo_loss(pc, pr, rc, rr, beta, "ipo")[0], (h - 1 / (2 * beta)) ** 2)
    # the gradient pushes chosen up and rejected down, weighted by how wrong the implicit reward is (DPO eq. 8)
    pc.requires_grad_(True)
    dpo.dpo_loss(pc, pr, rc, rr, beta)[0].sum().backward()
    torch.testing.assert_close(pc.grad, -beta * torch.sigmoid(-beta * h.detach()))


# -----------------------------------------------------------------------------
# summed log-probs of summaries: only the summary tokens count

def _tiny_lm(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32))


def _triples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: torch.randint(0, 50257, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()  # noqa: E731
    return [(rand(3, 20), rand(1, 9), rand(1, 9)) for _ in range(n)]


def test_packed_pair_log_probs_equal_a_naive_loop_and_project_summary_positions_only():
    model = _tiny_lm().eval()
    triples = _triples(6)
    assert len({len(p) + len(c) for p, c, _ in triples}) > 1  # right padding really happens
    projected, project = [], model.logits
    model.logits = lambda x: projected.append(x.shape[0]) or project(x)  # count the rows the head projects
    chosen, rejected = dpo.pair_logprobs(dpo.PairLogprobs(model), triples, "cpu")  # packed: prompt | chosen | rejected
    del model.logits
    # the vocabulary projection ran at the positions that predict summary tokens and nowhere else: no prompt or
    # padding logit exists that could count
    assert projected == [sum(len(c) + len(r) for _, c, r in triples)]
    with torch.no_grad():
        for i, (prompt, c, r) in enumerate(triples):
            for got, summary in ((chosen[i], c), (rejected[i], r)):
                logits, _ = model(torch.tensor([prompt + summary]))         # (1, T, V): every position, unpadded
                logp = F.log_softmax(logits[0, len(prompt) - 1:-1], -1)     # the positions that predict the summary
                expected = logp.gather(-1, torch.tensor(summary)[:, None]).sum()
                assert got.item() == pytest.approx(expected.item(), abs=1e-4)
    # more padding (a longer pair in the batch) changes nothing
    longest = ([7] * 60, [8] * 30, [9] * 25)
    again_c, again_r = dpo.pair_logprobs(dpo.PairLogprobs(model), triples + [longest], "cpu")
    torch.testing.assert_close(again_c[:6], chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(again_r[:6], rejected, atol=1e-5, rtol=0)


# -----------------------------------------------------------------------------
# a tiny run: exact resume, the checkpoint's uses, user errors

@pytest.fixture(scope="module")
def tiny_setup(synthetic_dir, tmp_path_factory):
    """A tiny SFT checkpoint and a folder of the first 48 train and 12 valid generated comparisons."""
    out = tmp_path_factory.mktemp("dpo_tiny")
    save_checkpoint(out / "sft.pt", stage="sft", model=_tiny_lm(), tldr=TINY_INFO)
    save_checkpoint(out / "pretrain.pt", stage="pretrain", model=_tiny_lm())
    first_rows(synthetic_dir / "comparisons", out / "comparisons", {"train": 48, "valid": 12})
    return out


def _tiny_cfg(setup, tmp_path, name="run", **overrides):
    values = dict(sft=str(setup / "sft.pt"), comparisons=str(setup / "comparisons"), ckpt_dir=str(tmp_path / name),
                  run_name=str(tmp_path / name / "run"), gold="on")
    return config_from(dpo.Config, dpo.PRESETS, "tiny", **{**values, **overrides})


def _records(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_reference_log_probs_cover_exactly_the_pairs_the_run_trains_on():
    # 2 ranks x 3 micro-batches of 4 = 24 pairs a step: what the samplers of the two ranks hand out over 5 steps
    n, seed, steps, micro, accum, world = 200, 7, 5, 4, 3, 2
    samplers = [tldr.EpochSampler(n, seed, rank, world) for rank in range(world)]
    seen = {i for _ in range(steps * accum) for sampler in samplers for i in sampler.next_indices(micro)}
    assert dpo.trained_pairs(n, seed, steps, micro * accum * world) == sorted(seen) and len(seen) == 120
    assert dpo.trained_pairs(n, seed, 9, 24) == list(range(n))  # more than an epoch: every pair
    torch.manual_seed(0)
    ref = GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=16)).eval()
    info = tldr.template_info(max_prompt_tokens=24, max_summary_tokens=8)
    triples = tldr.encode_comparisons([tldr.Comparison(tldr.Post(f"post {i}", "t", "s"), f"good {i}", f"bad {i}")
                                       for i in range(6)], info)
    rt = compute_init(0, "cpu", "float32")
    every = dpo.reference_logprobs(ref, triples, rt, batch_size=4)
    some = dpo.reference_logprobs(ref, triples, rt, batch_size=4, indices=[1, 4])
    assert torch.allclose(some[[1, 4]], every[[1, 4]], atol=1e-5) and torch.isnan(some[[0, 2, 3, 5]]).all()
    assert torch.isfinite(every).all()


def test_tiny_run_resumes_exactly_and_its_checkpoint_is_a_summarizer(tiny_setup, tmp_path):
    straight = dpo.main(_tiny_cfg(tiny_setup, tmp_path, "straight"))
    dpo.main(_tiny_cfg(tiny_setup, tmp_path, "split", stop_at=4))
    assert load_checkpoint(tmp_path / "split" / "dpo_latest.pt", "dpo")["step"] == 4
    resumed = dpo.main(_tiny_cfg(tiny_setup, tmp_path, "split", resume=True))
    a, b = _records(tmp_path / "straight" / "run", "train"), _records(tmp_path / "split" / "run", "train")
    assert [r["step"] for r in b] == list(range(6))
    assert [(r["loss"], r["accuracy"], r["margin"]) for r in a] == [(r["loss"], r["accuracy"], r["margin"]) for r in b]
    assert straight["val_loss"] == resumed["val_loss"]
    sa, sb = (load_checkpoint(tmp_path / n / "dpo_latest.pt", "dpo") for n in ("straight", "split"))
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])

    evals = _records(tmp_path / "straight" / "run", "eval")
    assert [r["step"] for r in evals] == [0, 3, 6]
    first = evals[0]  # the policy is its reference at step 0: every implicit reward is 0
    assert first["val_loss"] == pytest.approx(math.log(2), abs=1e-5) and first["val_accuracy"] == 0.5
    assert first["kl_to_ref"] == pytest.approx(0.0, abs=1e-6) and "gold_score" in first
    assert evals[-1]["kl_to_ref"] > 0
    for r in a:
        assert {"loss", "accuracy", "chosen_reward", "rejected_reward", "margin", "lr", "grad_norm"} <= set(r)
        assert r["margin"] == pytest.approx(r["chosen_reward"] - r["rejected_reward"])

    # the policy is a summarizer wherever a PPO policy is one
    ckpt_dir = tmp_path / "straight"
    assert (ckpt_dir / "best_dpo.pt").is_file()
    summarizer = summaries.Summarizer.load(ckpt_dir / "dpo_latest.pt")
    assert summarizer.stage == "dpo" and summarizer.info == TINY_INFO
    assert all(torch.equal(summarizer.model.state_dict()[k], sa["model"][k]) for k in sa["model"])  # the DPO policy
    texts, ended = summarizer.summarize([tldr.Post("My roommate keeps eating my food.")], max_new_tokens=4)
    assert len(texts) == len(ended) == 1 and isinstance(texts[0], str)
    save_checkpoint(ckpt_dir / "best_sft.pt", stage="sft", model=_tiny_lm(), tldr=TINY_INFO)
    served = serve.checkpoint_paths(config_from(serve.Config, None, None, ckpt_dir=str(ckpt_dir)))
    assert [p.name for p in served] == ["dpo_latest.pt", "best_sft.pt"]


def test_user_errors(tiny_setup, tmp_path):
    with pytest.raises(UserError, match="is a 'pretrain' checkpoint; expected sft"):
        dpo.main(_tiny_cfg(tiny_setup, tmp_path, sft=str(tiny_setup / "pretrain.pt")))
    with pytest.raises(UserError, match="unknown --loss 'kto'"):
        dpo.main(_tiny_cfg(tiny_setup, tmp_path, loss="kto"))
    with pytest.raises(UserError, match="--label-smoothing applies to --loss sigmoid only"):
        dpo.main(_tiny_cfg(tiny_setup, tmp_path, loss="ipo", label_smoothing=0.1))
    with pytest.raises(UserError, match="--label-smoothing must be in"):
        dpo.main(_tiny_cfg(tiny_setup, tmp_path, label_smoothing=0.5))
    with pytest.raises(UserError, match="checkpoint not found"):
        dpo.main(_tiny_cfg(tiny_setup, tmp_path, resume=True))


# -----------------------------------------------------------------------------
# learning on the generated world: the small SFT model on its variant comparisons

def test_dpo_learns_the_preferences_of_the_generated_world(small_sft_ckpt, synthetic_dir, tmp_path):
    comparisons = first_rows(synthetic_dir / "comparisons", tmp_path / "comparisons", {"train": 320, "valid": 128})
    cfg = config_from(dpo.Config, dpo.PRESETS, "small", sft=str(small_sft_ckpt), comparisons=str(comparisons),
                      max_steps=10, warmup_steps=2, eval_every=5, kl_prompts=4, ckpt_dir=str(tmp_path),
                      run_name=str(tmp_path / "run"))
    dpo.main(cfg)
    evals = _records(tmp_path / "run", "eval")
    assert [r["step"] for r in evals] == [0, 5, 10]
    assert evals[0]["val_accuracy"] == 0.5 and evals[0]["val_margin"] == pytest.approx(0.0, abs=1e-5)
    # 128 pairs with 10% flipped labels: 0.65 is far above what chance gives (sd of an accuracy ~0.045)
    assert evals[-1]["val_accuracy"] > 0.65, evals
    assert evals[-1]["val_margin"] > evals[1]["val_margin"] > 0, evals
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
