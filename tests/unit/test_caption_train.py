"""Pieces of the training loop: learning-rate schedules, the frozen encoder, the XE step, the final table."""
import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.caption.config import load_caption_config
from pretrain.caption.decoders import expand_memory
from pretrain.caption.decoding import DecodeRules
from pretrain.caption.model import build_model, load_towers
from pretrain.caption.train import TrainStep, format_table, schedule


def test_schedule_warmup_cosine_and_late_start():
    f = schedule(warmup=4, total=20, floor=0.1)
    assert [round(f(s), 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(19) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))
    g = schedule(warmup=2, total=20, floor=0.0, start=10)  # the encoder starts at step 10
    assert [g(s) for s in range(10)] == [0.0] * 10
    assert g(10) == 0.5 and g(11) == 1.0


def tiny_model(kind="sat"):
    cfg = load_caption_config(None, [
        "data.karpathy_json=unused.json", "encoder.model.image.name=test_resnet", "encoder.model.image.image_size=64",
        "encoder.model.embed_dim=8", "encoder.model.projection_hidden=0", f"decoder.kind={kind}",
        "decoder.embed_dim=8", "decoder.hidden_dim=16", "decoder.feature_dim=12", "decoder.att_dim=8",
        "decoder.num_heads=2", "decoder.refiner_layers=1", "decoder.dropout=0.0", "decoder.doubly_stochastic=0.5",
        "xe.label_smoothing=0.2"])
    torch.manual_seed(0)
    _, image, _, _ = load_towers(cfg.encoder, need_text=False)
    return cfg, build_model(cfg, 12, image, None, None)


def test_frozen_image_tower_has_no_gradient_and_fixed_batchnorm():
    cfg, model = tiny_model()
    model.train()
    bn = next(m for m in model.image_tower.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not bn.training and model.decoder.training
    before = bn.running_mean.clone()
    feats = model.image_tokens(torch.randn(3, 3, 64, 64))
    assert not feats.requires_grad and torch.equal(bn.running_mean, before)
    model.set_image_tower_trainable(True)
    assert bn.training
    feats = model.image_tokens(torch.randn(3, 3, 64, 64))
    assert feats.requires_grad and not torch.equal(bn.running_mean, before)


@pytest.mark.parametrize("kind", ["sat", "aoa"])
def test_xe_step_equals_reference(kind):
    cfg, model = tiny_model(kind)
    model.eval()
    rules = DecodeRules(bos=1, eos=2, pad=0, unk=3)
    labels = torch.tensor([[[1, 4, 5, 2, 0, 0], [1, 6, 7, 8, 2, 0]],
                           [[1, 9, 2, 0, 0, 0], [1, 4, 4, 4, 4, 2]]])  # B=2 x S=2 x T=6
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = TrainStep(model, cfg, rules)(images, labels, [0, 1], None, "xe")
    # reference: teacher forcing on every reference separately, torch's label-smoothed cross-entropy
    flat = labels.view(4, 6)
    with torch.no_grad():
        logits, alphas = model.decoder(expand_memory(model.encode(images), 2), flat[:, :-1])
    xe = F.cross_entropy(logits.reshape(-1, 12), flat[:, 1:].reshape(-1), ignore_index=0, label_smoothing=0.2)
    assert float(out["xe"]) == pytest.approx(float(xe), rel=1e-5)
    if kind == "sat":
        mask = (flat[:, 1:] != 0).float()
        cover = (alphas * mask[..., None]).sum(1)
        assert float(out["loss"]) == pytest.approx(float(xe + 0.5 * ((1 - cover) ** 2).mean()), rel=1e-5)
    else:
        assert float(out["loss"]) == pytest.approx(float(xe), rel=1e-6)


def test_final_table_lists_every_row():
    results = {"test": [{"model": "constant", "decoding": "-", "metrics": {"CIDEr-D": 0.9, "SPICE": None}},
                        {"model": "XE", "decoding": "greedy", "metrics": {"CIDEr-D": 5.5, "SPICE": None}},
                        {"model": "SCST", "decoding": "beam3", "metrics": {"CIDEr-D": 6.2, "SPICE": None}}],
               "constant": {"caption": "a red circle"}, "unavailable": {"SPICE": "offline"}}
    table = format_table(results)
    lines = table.splitlines()
    assert "CIDEr-D" in lines[0] and "SPICE" in lines[0]
    assert "0.900" in lines[2] and "5.500" in lines[3] and "6.200" in lines[4] and "n/a" in lines[4]
    assert "a red circle" in table and "SPICE: unavailable (offline)" in table
