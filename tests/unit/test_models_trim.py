"""Trailing padding is trimmed before the text tower: the embedding equals the untrimmed computation."""
import torch
import torch.nn.functional as F

from pretrain.config import TextTowerConfig
from pretrain.models import TextTower, trim_padding


def test_trim_padding_keeps_every_used_column():
    ids = torch.tensor([[5, 6, 7, 0, 0, 0], [5, 6, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    t_ids, t_mask = trim_padding(ids, mask)
    assert t_ids.tolist() == [[5, 6, 7], [5, 6, 0]] and t_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])  # left padding: nothing trailing to trim
    assert trim_padding(left, left)[1].shape == (2, 4)
    assert trim_padding(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))[1].shape == (2, 1)


def test_trimmed_text_embedding_equals_full_length():
    torch.manual_seed(0)
    cfg = TextTowerConfig(pretrained=False, config_overrides={"num_hidden_layers": 2, "hidden_size": 64,
                                                              "num_attention_heads": 2, "intermediate_size": 128})
    tower = TextTower(cfg, 32, 0).eval()
    ids = torch.randint(1000, 2000, (3, 16))
    mask = torch.zeros(3, 16, dtype=torch.long)
    for i, n in enumerate((4, 9, 6)):
        mask[i, :n] = 1
    ids = ids * mask
    with torch.no_grad():
        got = tower(ids, mask)
        full = F.normalize(tower.proj(tower.pool(tower.forward_tokens(ids, mask), mask)), dim=-1)  # 16 columns
    assert torch.allclose(got, full, atol=1e-5)
