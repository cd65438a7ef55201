"""A model directory loads back to the same captions; attention maps cover the token grid; the PNG is a grid."""
import numpy as np
import pytest
import torch

from pretrain.caption.config import load_caption_config
from pretrain.caption.decoding import DecodeRules
from pretrain.caption.model import build_model, load_model_dir, load_towers, save_model_dir
from pretrain.models import image_transform as eval_transform
from pretrain.caption.visualize import caption_image, save_attention_grid
from pretrain.vocab import WordVocab


def tiny_cfg(kind):
    return load_caption_config(None, [
        "data.karpathy_json=unused.json", "encoder.model.image.name=test_resnet", "encoder.model.image.image_size=64",
        "encoder.model.embed_dim=8", "encoder.model.projection_hidden=0", f"decoder.kind={kind}",
        "decoder.embed_dim=8", "decoder.hidden_dim=16", "decoder.feature_dim=12", "decoder.att_dim=8",
        "decoder.num_heads=2", "decoder.refiner_layers=1", "decoder.dropout=0.0", "decode.max_length=6"])


@pytest.mark.parametrize("kind", ["sat", "aoa"])
def test_save_and_load_model_dir(kind, tmp_path):
    from PIL import Image

    torch.manual_seed(0)
    cfg = tiny_cfg(kind)
    towers_cfg, image, _, _ = load_towers(cfg.encoder, need_text=False)
    vocab = WordVocab.from_words(["a", "red", "blue", "circle", "square", "and"])
    model = build_model(cfg, vocab.size, image, None, None).eval()
    with torch.no_grad():
        model.decoder.classifier.weight.mul_(5.0)
    save_model_dir(str(tmp_path / "m"), model, vocab, cfg, towers_cfg)
    loaded, vocab2, transform, cfg2 = load_model_dir(str(tmp_path / "m"))
    assert vocab2.itos == vocab.itos and cfg2.decoder.kind == kind
    photo = Image.fromarray((np.random.RandomState(0).rand(40, 48, 3) * 255).astype(np.uint8))
    rules = DecodeRules.from_vocab(vocab, 6, 1, ["a", "and"])
    a = caption_image(model, vocab, eval_transform(image, 64), photo, rules, "beam", 3)
    b = caption_image(loaded, vocab2, transform, photo, rules, "beam", 3)
    assert a[0] == b[0] and a[1] == b[1]
    np.testing.assert_allclose(a[2], b[2], atol=1e-6)
    caption, words, maps = b
    # test_resnet at 64 px: a 2 x 2 map (stride 32); each word's map is a distribution over the grid
    assert loaded.attention_grid(4) == (0, 2, 2)
    assert maps.shape == (len(words), 2, 2)
    np.testing.assert_allclose(maps.reshape(len(words), -1).sum(1), 1.0, atol=1e-5)


def test_attention_grid_png(tmp_path):
    from PIL import Image

    photo = Image.new("RGB", (64, 48), (100, 100, 100))
    maps = np.zeros((7, 4, 4), dtype=np.float32)
    for i in range(7):
        maps[i, i % 4, (i * 3) % 4] = 1.0
    path = save_attention_grid(photo, ["a", "red", "circle", "and", "a", "blue", "square"], maps,
                               str(tmp_path / "att.png"), panel=100, columns=4)
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    pad, header, title = 6, 34, 26
    assert img.shape[1] == 4 * (100 + pad) + pad and img.shape[0] == header + 2 * (100 + title + pad) + pad
    # panel 0 attends to cell (0, 0): its top-left corner is hotter (redder) than its bottom-right corner
    y0, x0 = header + title, pad
    tl, br = img[y0 + 5, x0 + 5], img[y0 + 95, x0 + 95]
    assert tl[0] - tl[2] > br[0] - br[2] + 30 and tl.sum() > br.sum() + 100  # redder and brighter


def test_condition_model_trains_saves_and_loads(tmp_path):
    """Answer-conditioned generation (IVQA style): the text tower encodes the condition, the decoder attends to it."""
    from PIL import Image

    from pretrain.caption.scst import CiderReward, scst_step
    from pretrain.caption.train import TrainStep

    torch.manual_seed(0)
    cfg = load_caption_config(None, [
        "data.karpathy_json=unused.json", "data.condition_field=answer", "encoder.model.image.name=test_resnet",
        "encoder.model.image.image_size=64", "encoder.model.embed_dim=8", "encoder.model.projection_hidden=0",
        "encoder.model.text.pretrained=false",
        "encoder.model.text.config_overrides={num_hidden_layers: 1, hidden_size: 32, num_attention_heads: 2, "
        "intermediate_size: 64}",
        "decoder.embed_dim=8", "decoder.hidden_dim=16", "decoder.feature_dim=12", "decoder.att_dim=8",
        "decoder.dropout=0.0", "xe.label_smoothing=0.1", "decode.max_length=5"])
    towers_cfg, image, text, tokenizer = load_towers(cfg.encoder, need_text=True)
    vocab = WordVocab.from_words(["what", "colour", "is", "the", "circle", "square", "how", "many"])
    model = build_model(cfg, vocab.size, image, text, tokenizer)
    assert model.decoder.cond_dim == 32 and not any(p.requires_grad for p in model.text_tower.parameters())
    rules = DecodeRules.from_vocab(vocab, 5, 1, [])
    images = torch.randn(2, 3, 64, 64)
    labels = torch.tensor([[[1, 4, 5, 6, 7, 8, 2]] * 2, [[1, 10, 11, 6, 7, 9, 2]] * 2])  # B x S x T
    step = TrainStep(model, cfg, rules).train()
    out = step(images, labels, [0, 1], ["red", "two"], "xe")
    out["loss"].backward()
    assert model.decoder.cond_att.query_proj.weight.grad.abs().sum() > 0
    reward = CiderReward([[[4, 5, 6, 7, 8]], [[10, 11, 6, 7, 9]]])
    assert torch.isfinite(scst_step(model, images, [0, 1], reward, rules, 3, "mean", conditions=["red", "two"])["loss"])

    model.eval()
    save_model_dir(str(tmp_path / "m"), model, vocab, cfg, towers_cfg)
    assert (tmp_path / "m" / "text" / "config.json").is_file()
    loaded, vocab2, transform, _ = load_model_dir(str(tmp_path / "m"))
    photo = Image.fromarray((np.random.RandomState(1).rand(64, 64, 3) * 255).astype(np.uint8))
    for answer in ("red", "two"):
        a = caption_image(model, vocab, eval_transform(image, 64), photo, rules, "beam", 2, condition=answer)
        b = caption_image(loaded, vocab2, transform, photo, rules, "beam", 2, condition=answer)
        assert a[0] == b[0]
    with torch.no_grad():  # the condition reaches the decoder's memory
        x = transform(photo).unsqueeze(0)
        m1, m2 = loaded.encode(x, ["red"]), loaded.encode(x, ["two"])
    assert not torch.allclose(m1["cond"], m2["cond"])
