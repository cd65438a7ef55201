"""VSE run config: the shipped configs load, bad keys and values are named; the learning-rate schedule."""
import os
from types import SimpleNamespace

import pytest

from pretrain.config import ConfigError
from pretrain.vse.config import load_vse_config
from pretrain.vse.train import VSETrainer, param_groups, role_lr

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "configs", "finetune")


@pytest.mark.parametrize("name", ["vse_coco.yaml", "vse_f30k.yaml", "vse_demo.yaml"])
def test_shipped_configs_load(name):
    cfg = load_vse_config(os.path.join(CONFIGS, name), ["model.export=exports/x"])
    if name != "vse_demo.yaml":  # the VSE++ settings (the demo uses InfoNCE: its config says why)
        assert cfg.loss.margin == 0.2 and cfg.loss.max_violation and cfg.loss.kind == "hinge"
        assert (cfg.optim.lr, cfg.train.epochs, cfg.optim.lr_decay_epochs, cfg.train.batch_size) == (2e-4, 30, [15], 128)


@pytest.mark.parametrize("overrides,message", [
    (["train.epochz=3"], "Did you mean 'train.epochs'"),
    (["loss.kind=triplet"], "'loss.kind' = 'triplet' is not allowed"),
    (["train.zero_stage=3"], "'train.zero_stage'"),
    (["model.export="], "'model.export' is empty"),
    (["optim.freeze_epochs=-1"], "'optim.freeze_epochs' must be >= 0"),
    (["data.source=shards"], "'data.train_shards' and 'data.val_shards'"),
    (["model.text_encoder=gru", "data.source=shards", "data.train_shards=a", "data.val_shards=b"], "needs data.source=karpathy"),
])
def test_bad_config_is_named(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", "\\(")):
        load_vse_config(os.path.join(CONFIGS, "vse_demo.yaml"), ["model.export=exports/x"] + overrides)


def test_learning_rates_freeze_decay_and_warmup():
    cfg = load_vse_config(os.path.join(CONFIGS, "vse_coco.yaml"),
                          ["model.export=x", "optim.freeze_epochs=2", "optim.warmup_steps=4", "optim.lr_decay_epochs=[3, 5]",
                           "optim.image_lr_factor=0.5", "optim.text_lr_factor=0"])
    assert role_lr(cfg, "image_backbone") == pytest.approx(1e-4) and role_lr(cfg, "head") == pytest.approx(2e-4)
    t = SimpleNamespace(cfg=cfg, epoch=0, step=0)
    f = lambda role: VSETrainer.lr_factor(t, role)  # noqa: E731
    assert (f("head"), f("image_backbone")) == (pytest.approx(0.25), 0.0)      # warm-up step 1 of 4; frozen
    t.step, t.epoch = 10, 2
    assert (f("head"), f("image_backbone")) == (1.0, 1.0)                     # unfrozen at epoch 2
    t.epoch = 3
    assert f("head") == pytest.approx(0.1)
    t.epoch = 6
    assert f("text_backbone") == pytest.approx(0.01)


def test_param_groups_by_role(tiny_cfg):
    import torch

    from pretrain.models import DualEncoder
    from pretrain.vse.model import VSEModel

    towers = DualEncoder(tiny_cfg)
    model = VSEModel(towers.image, towers.text)
    cfg = load_vse_config(os.path.join(CONFIGS, "vse_coco.yaml"), ["model.export=x", "optim.text_lr_factor=0"])
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert set(groups) == {"image_backbone_decay", "image_backbone_nodecay", "head_decay", "head_nodecay"}
    assert groups["image_backbone_decay"]["lr"] == pytest.approx(2e-5) and groups["head_decay"]["lr"] == 2e-4
    grouped = {id(p) for g in groups.values() for p in g["params"]}
    assert grouped == {id(p) for n, p in model.named_parameters() if not n.startswith("text.encoder.")}
    assert not any(p.requires_grad for p in model.text.encoder.parameters())   # factor 0: frozen for good
    assert {id(p) for p in model.image.proj.parameters()} <= {id(p) for g in ("head_decay", "head_nodecay")
                                                              for p in groups[g]["params"]}
    assert all(isinstance(p, torch.nn.Parameter) for g in groups.values() for p in g["params"])
