"""Session fixture of the PPO stage: the `small` PPO run of the generated world's test chain (SFT
fixture -> reward-model fixture -> PPO), what test_ppo checks learning on and the evaluation stage's
oracle-judge test compares with the SFT model."""
import pytest

SMALL_PPO = dict(ppo_epochs=2, max_steps=8)  # the preset's 4 epochs and 12 steps would not fit the suite's time


@pytest.fixture(scope="session")
def small_ppo_run(small_sft_ckpt, small_rm_ckpt, synthetic_dir, tmp_path_factory):
    """(folder holding ppo_latest.pt and the run's log in run/, ppo.main's metrics, its Config)."""
    import ppo
    from common import config_from
    out = tmp_path_factory.mktemp("small_ppo")
    cfg = config_from(ppo.Config, ppo.PRESETS, "small", sft=str(small_sft_ckpt), rm=str(small_rm_ckpt),
                      data=str(synthetic_dir / "tldr"), eval_every=0, sample_every=0, save_every=0, ckpt_dir=str(out),
                      run_name=str(out / "run"), **SMALL_PPO)
    return out, ppo.main(cfg), cfg
