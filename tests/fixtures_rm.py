"""Session fixture of the reward-model stage: a `small` reward model trained from the small SFT model on
the generated comparisons (10% label noise) - what the reward-model tests check and PPO's tests load."""
import pytest

SMALL_RM_STEPS = 120  # x 16 pairs: about half an epoch of the 4,000 generated train pairs


@pytest.fixture(scope="session")
def small_rm_ckpt(small_sft_ckpt, synthetic_dir, tmp_path_factory):
    """Path of a stage-"reward_model" checkpoint: reward_model.py --preset small for SMALL_RM_STEPS steps,
    validated on all 500 valid pairs at the end, normalised on the 400 valid reference summaries."""
    import reward_model
    from common import config_from
    out = tmp_path_factory.mktemp("small_rm")
    cfg = config_from(reward_model.Config, reward_model.PRESETS, "small", init=str(small_sft_ckpt),
                      data=str(synthetic_dir / "comparisons"), sft_data=str(synthetic_dir / "tldr"),
                      max_steps=SMALL_RM_STEPS, eval_every=0, save_every=0, ckpt_dir=str(out),
                      run_name=str(out / "run"))
    reward_model.main(cfg)
    return out / "reward_model.pt"
