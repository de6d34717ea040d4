"""Session fixture of the SFT stage: the `small` pretrained model fine-tuned on the generated TL;DR
posts (what test_sft checks against the gold score and the reward-model tests start from)."""
import pytest

SFT_STEPS = 100  # `small` steps (x 16 examples, half an epoch): greedy summaries clearly beat the pretrained model's


@pytest.fixture(scope="session")
def small_sft_ckpt(small_pretrain_ckpt, synthetic_dir, tmp_path_factory):
    """Path of a stage-"sft" checkpoint (best_sft.pt): sft.py --preset small for SFT_STEPS steps."""
    import sft
    from common import config_from
    out = tmp_path_factory.mktemp("small_sft")
    cfg = config_from(sft.Config, sft.PRESETS, "small", init=str(small_pretrain_ckpt), data=str(synthetic_dir / "tldr"),
                      max_steps=SFT_STEPS, eval_every=0, val_examples=64, num_samples=0, ckpt_dir=str(out),
                      run_name=str(out / "run"))
    sft.main(cfg)
    return out / "best_sft.pt"
