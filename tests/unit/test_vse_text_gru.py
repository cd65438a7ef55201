"""The GRU text baseline: vocabulary, packed sequences equal to one-by-one runs, and it learns a toy retrieval."""
import pytest
import torch
import torch.nn.functional as F

from pretrain.eval.retrieval import vse_metrics
from pretrain.vse.losses import hinge_loss
from pretrain.vocab import WordVocab
from pretrain.vse.text_gru import GRUTextEncoder


@pytest.mark.parametrize("bidirectional,layers,hidden", [(False, 1, 0), (True, 1, 0), (True, 2, 12)])
def test_packed_batch_equals_one_sequence_at_a_time(bidirectional, layers, hidden):
    torch.manual_seed(0)
    enc = GRUTextEncoder(20, 6, 8, hidden_dim=hidden, num_layers=layers, bidirectional=bidirectional).eval()
    lengths = [3, 7, 1, 5]
    ids = torch.zeros(4, 7, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(2, 20, (n,))
    mask = (ids != 0).long()
    with torch.no_grad():
        batch = enc(ids, mask)
        for i, n in enumerate(lengths):  # the reference: the unpadded sequence alone, no packing
            _, h = enc.gru(enc.embed(ids[i:i + 1, :n]))
            dirs = 2 if bidirectional else 1
            ref = F.normalize(enc.proj(h[-dirs:].mean(0)), dim=-1)[0]
            assert torch.allclose(batch[i], ref, atol=1e-6)
        # padding beyond the length changes nothing
        longer = torch.cat([ids, torch.zeros(4, 3, dtype=torch.long)], 1)
        assert torch.allclose(enc(longer, (longer != 0).long()), batch, atol=1e-6)
    assert batch.shape == (4, 8) and torch.allclose(batch.norm(dim=1), torch.ones(4))


def test_gru_trains_and_evaluates():
    """Captions name one of 6 'images' (random feature vectors) by colour + shape words; the GRU learns to match."""
    torch.manual_seed(0)
    colours, shapes = ["red", "blue", "green"], ["circle", "square"]
    concepts = [(c, s) for c in colours for s in shapes]
    feats = torch.randn(len(concepts), 10)
    captions = [f"a {c} {s}" for c, s in concepts] + [f"{s} in {c}" for c, s in concepts]
    owner = torch.tensor(list(range(6)) * 2)
    vocab = WordVocab.build(captions, 1)
    tok = vocab(captions, max_length=5)
    text = GRUTextEncoder(len(vocab), 8, 16, bidirectional=True)
    image = torch.nn.Linear(10, 16)
    opt = torch.optim.Adam(list(text.parameters()) + list(image.parameters()), lr=1e-2)

    def rsum():
        with torch.no_grad():
            return vse_metrics(F.normalize(image(feats), dim=-1), text(tok["input_ids"], tok["attention_mask"]),
                               owner)["rsum"]

    before = rsum()
    losses = []
    for step in range(80):
        loss = hinge_loss(F.normalize(image(feats[owner]), dim=-1), text(tok["input_ids"], tok["attention_mask"]),
                          0.2, max_violation=step >= 20, image_ids=owner)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.2 * losses[0]
    assert rsum() == pytest.approx(600.0) and before < 600.0
