import os

import pytest
import yaml

from pretrain.config import ConfigError, RunConfig, load_config, save_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_defaults_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"steps": 7, "zero_stage": 1}, "wenlan": {"queue_size": 33}}))
    cfg = load_config(str(path), ["train.steps=11", "model.image.timm_kwargs={img_size: 64}", "wenlan.mask_unfilled=false"])
    assert cfg.train.steps == 11           # CLI beats file
    assert cfg.train.zero_stage == 1       # file beats default
    assert cfg.wenlan.queue_size == 33
    assert cfg.train.micro_batch_size == RunConfig().train.micro_batch_size  # default
    assert cfg.model.image.timm_kwargs == {"img_size": 64}
    assert cfg.wenlan.mask_unfilled is False


@pytest.mark.parametrize("override,needle", [
    ("train.stepz=3", "train.stepz"),
    ("train.steps=abc", "train.steps"),
    ("train.zero_stage=4", "train.zero_stage"),
    ("wenlan.momentum=1.5", "wenlan.momentum"),
    ("nosuch.key=1", "nosuch"),
    ("train.precision=fp8", "train.precision"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.steps=5", "data.train_shards=a::b"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(str(tmp_path / "c.yaml"))
    assert again == cfg


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(ROOT, "configs", "pretrain"))))
def test_shipped_configs_load(name):
    load_config(os.path.join(ROOT, "configs", "pretrain", name))
    # the in-batch reference trains from the same file (tools/bench.py learn: --setting in_batch:wenlan.mode=in_batch)
    assert load_config(os.path.join(ROOT, "configs", "pretrain", name), ["wenlan.mode=in_batch"]).wenlan.mode == "in_batch"


@pytest.mark.parametrize("overrides,needle", [
    (["wenlan.image_ssl_weight=1", "wenlan.momentum=0"], "wenlan.image_ssl_weight"),
    (["wenlan.text_queue_features=true"], "model.text.lock=true"),
    (["wenlan.text_queue_features=true", "model.text.lock=true", "model.text.pooling=attention"], "pooling"),
    (["wenlan.queue_directions=up"], "wenlan.queue_directions"),
    (["wenlan.queue_negatives=false"], "wenlan.queue_positives=true"),
    (["wenlan.queue_positives=true", "wenlan.queue_positives_loss=any", "wenlan.distill_alpha=0.4"],
     "wenlan.distill_alpha=0"),
    (["wenlan.queue_positives_loss=all"], "wenlan.queue_positives_loss"),
])
def test_wenlan_switch_combinations_are_checked(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert needle in str(e.value)


def test_large_config_derives_the_deepspeed_config():
    from pretrain.trainer import derive_deepspeed_config

    cfg = load_config(os.path.join(ROOT, "configs", "pretrain", "large.yaml"))
    cwd = os.getcwd()
    os.chdir(ROOT)  # the config names its JSON fragment relative to the repository
    try:
        ds = derive_deepspeed_config(cfg, world_size=64)
    finally:
        os.chdir(cwd)
    assert ds["train_batch_size"] == 64 * 2 * 64 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == 64
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["overlap_comm"] is True
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["gradient_clipping"] == 1.0
    assert cfg.model.activation_checkpointing is True


@pytest.mark.parametrize("fragment, needle", [
    ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage"),
    ({"fp16": {"enabled": True}}, "fp16.enabled"),
    ({"train_batch_size": 8}, "train_batch_size"),
])
def test_contradicting_deepspeed_fragment_is_refused(tmp_path, fragment, needle):
    import json

    from pretrain.trainer import derive_deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(fragment))
    cfg = load_config(os.path.join(ROOT, "configs", "pretrain", "demo.yaml"),
                      ["train.zero_stage=3", f"train.deepspeed_config={path}"])
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        derive_deepspeed_config(cfg, world_size=2)
