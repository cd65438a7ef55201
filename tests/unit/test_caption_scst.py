"""SCST baselines and loss against plain-Python references; one SCST step on a tiny model."""
import pytest
import torch

from pretrain.caption.scst import advantages, policy_loss


def test_greedy_baseline():
    r = torch.tensor([[0.5, 1.0, 2.0], [0.0, 0.3, 0.1]])
    g = torch.tensor([1.0, 0.2])
    want = [[r[i, j].item() - g[i].item() for j in range(3)] for i in range(2)]
    torch.testing.assert_close(advantages(r, "greedy", g), torch.tensor(want))


def test_mean_of_the_other_samples_baseline():
    torch.manual_seed(0)
    r = torch.rand(4, 5)
    want = torch.zeros(4, 5)
    for i in range(4):
        for j in range(5):
            others = [r[i, k].item() for k in range(5) if k != j]
            want[i, j] = r[i, j].item() - sum(others) / len(others)
    got = advantages(r, "mean")
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got.sum(1), torch.zeros(4), atol=1e-6, rtol=0)  # leave-one-out sums to zero
    with pytest.raises(ValueError):
        advantages(r[:, :1], "mean")
    with pytest.raises(ValueError):
        advantages(r, "greedy")


def test_policy_loss_reference():
    torch.manual_seed(1)
    logp = -torch.rand(3, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float32)
    adv = torch.tensor([0.5, -1.0, 2.0])
    num, den = 0.0, 0.0
    for i in range(3):
        for t in range(4):
            num += -adv[i].item() * logp[i, t].item() * mask[i, t].item()
            den += mask[i, t].item()
    assert float(policy_loss(logp, mask, adv)) == pytest.approx(num / den, rel=1e-6)


@pytest.mark.parametrize("baseline", ["greedy", "mean"])
def test_scst_step_on_a_tiny_model(baseline):
    from pretrain.caption.config import DecoderConfig
    from pretrain.caption.decoders import build_decoder
    from pretrain.caption.decoding import DecodeRules
    from pretrain.caption.scst import CiderReward, scst_step

    torch.manual_seed(0)
    dec = build_decoder(DecoderConfig(kind="sat", embed_dim=8, hidden_dim=16, feature_dim=12, att_dim=8,
                                      dropout=0.5), 10, 6)

    class Tiny(torch.nn.Module):  # the part of CaptionModel that scst_step uses
        def __init__(self):
            super().__init__()
            self.decoder = dec

        def encoder_outputs(self, images, conditions=None):
            return images, None, None

    model = Tiny().train()
    refs = [[[4, 5, 6], [4, 5, 7]], [[8, 9], [8, 9, 6]]]
    reward = CiderReward(refs)
    rules = DecodeRules(bos=1, eos=2, pad=0, unk=3, max_length=5)
    out = scst_step(model, torch.randn(2, 3, 6), [0, 1], reward, rules, num_samples=4, baseline=baseline)
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    out["loss"].backward()
    assert dec.classifier.weight.grad.abs().sum() > 0
    assert model.training  # the greedy baseline ran in eval mode and the mode was restored
    assert ("greedy_reward" in out) == (baseline == "greedy")
