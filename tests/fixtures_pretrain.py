"""Session fixtures of the pretraining stage: fineweb.py shards of the generated world, and a `small`
model pretrained on them (what the HellaSwag tests evaluate and the SFT tests fine-tune)."""
import pytest

SMALL_STEPS = 300  # `small` steps (x 512 tokens, under two minutes): the model knows the world's facts and actions


@pytest.fixture(scope="session")
def pretrain_shards(synthetic_dir, tmp_path_factory):
    """fineweb.py --preset small on the generated pretrain.jsonl: val_000000.npy + train shards."""
    import fineweb
    from common import config_from
    out = tmp_path_factory.mktemp("pretrain_shards")
    cfg = config_from(fineweb.Config, fineweb.PRESETS, "small", input=[str(synthetic_dir / "pretrain.jsonl")],
                      out_dir=str(out), workers=1)
    fineweb.main(cfg)
    return out


@pytest.fixture(scope="session")
def small_pretrain_ckpt(pretrain_shards, tmp_path_factory):
    """Path of a stage-"pretrain" checkpoint: pretrain.py --preset small for SMALL_STEPS steps."""
    import pretrain
    from common import config_from
    out = tmp_path_factory.mktemp("small_pretrain")
    cfg = config_from(pretrain.Config, pretrain.PRESETS, "small", data_dir=str(pretrain_shards),
                      max_steps=SMALL_STEPS, eval_every=0, save_every=0, hellaswag_path="", num_samples=0,
                      ckpt=str(out / "pretrain.pt"), run_name=str(out / "run"))
    pretrain.main(cfg)
    return out / "pretrain.pt"
