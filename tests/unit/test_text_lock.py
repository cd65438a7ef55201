"""model.text.lock (LiT-style): the pretrained text encoder is frozen, its pooling and projection still train."""
import pytest
import torch

from pretrain.config import ConfigError, TextTowerConfig, load_config
from pretrain.models import TextTower


def _batch():
    ids = torch.tensor([[101, 1037, 3899, 2652, 1999, 1996, 5568, 102, 0, 0],
                        [101, 1037, 2611, 2006, 1037, 7997, 102, 0, 0, 0]])
    return ids, (ids != 0).long()


def test_locked_encoder_gets_no_gradient_and_no_dropout():
    torch.manual_seed(0)
    locked = TextTower(TextTowerConfig(lock=True), 16, 0).train()
    free = TextTower(TextTowerConfig(lock=False), 16, 0).train()
    ids, mask = _batch()
    assert not locked.encoder.training and locked.proj.training  # train() keeps the frozen encoder in eval mode
    # reference: the frozen features are the encoder's eval-mode output, computed here without the tower's forward
    with torch.no_grad():
        ref_tokens = free.encoder.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
    free.train()
    locked.encoder.load_state_dict(free.encoder.state_dict())
    a, b = locked(ids, mask), locked(ids, mask)
    assert torch.equal(a, b)                                   # deterministic in train mode: no dropout
    assert not torch.allclose(free(ids, mask), free(ids, mask))  # the free tower does drop out (MiniLM: 0.1)
    m = mask[:, :8].unsqueeze(-1).float()
    pooled = (ref_tokens[:, :8] * m).sum(1) / m.sum(1)
    assert torch.allclose(a, torch.nn.functional.normalize(locked.proj(pooled), dim=-1), atol=1e-5)
    a.sum().backward()
    assert all(p.grad is None for p in locked.encoder.parameters())
    assert all(not p.requires_grad for p in locked.encoder.parameters())
    assert locked.proj.weight.grad is not None and locked.proj.weight.grad.abs().sum() > 0


def test_optimizer_holds_no_locked_parameter():
    from pretrain.trainer import param_groups
    from pretrain.wenlan import WenLanModel

    cfg = load_config(None, ["model.text.lock=true", "model.image.name=resnet18", "model.image.image_size=32",
                             "model.projection_hidden=0", "data.train_shards=unused"])
    model = WenLanModel(cfg.model, cfg.wenlan)
    in_groups = {id(p) for g in param_groups(model, cfg) for p in g["params"]}
    encoder = {id(p) for p in model.query.text.encoder.parameters()}
    assert encoder and not (encoder & in_groups)
    expected = {id(p) for n, p in model.named_parameters() if ".text.encoder." not in n}
    assert in_groups == expected


def test_lock_needs_pretrained_weights():
    with pytest.raises(ConfigError, match="model.text.lock"):
        load_config(None, ["model.text.lock=true", "model.text.pretrained=false", "data.train_shards=unused"])


def test_text_bank_is_projected_by_the_current_head_with_gradient():
    """The feature queue is scored through the query text head in the same call as the batch: the bank's
    embeddings equal normalize(W f + b) computed here, and a loss on them alone reaches W."""
    torch.manual_seed(0)
    tower = TextTower(TextTowerConfig(lock=True), 8, 0).train()
    ids, mask = _batch()
    bank = torch.randn(5, tower.num_features)
    emb, bank_emb, pooled = tower(ids, mask, bank=bank)
    w, b = tower.proj.weight.detach(), tower.proj.bias.detach()
    assert torch.allclose(bank_emb, torch.nn.functional.normalize(bank @ w.t() + b, dim=-1), atol=1e-6)
    assert torch.allclose(emb, tower(ids, mask), atol=1e-6)
    assert torch.allclose(emb, torch.nn.functional.normalize(pooled @ w.t() + b, dim=-1), atol=1e-6)
    assert not pooled.requires_grad  # what the queue stores carries no graph
    bank_emb.sum().backward()
    assert tower.proj.weight.grad is not None and tower.proj.weight.grad.abs().sum() > 0
