"""launch/caption.py: the model's saved decode settings by default, --greedy / --beam-size / --sample overrides."""
import argparse
import importlib.util
import os
import sys

import numpy as np
import pytest
import torch

from pretrain.caption.config import DecodeConfig, load_caption_config
from pretrain.caption.model import build_model, load_towers, save_model_dir
from pretrain.vocab import WordVocab

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_cli():
    name = "_script_launch_caption"
    if name not in sys.modules:  # by path: launch/ on sys.path would shadow the `pretrain` package
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "launch", "caption.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def args(beam_size=None, greedy=False, sample=False, temperature=None, length_penalty=None):
    return argparse.Namespace(beam_size=beam_size, greedy=greedy, sample=sample, temperature=temperature,
                              length_penalty=length_penalty)


@pytest.mark.parametrize("saved,kw,want", [
    (dict(strategy="beam", beam_size=4, length_penalty=0.5), {}, ("beam", 4, 0.5, 1.0)),
    (dict(strategy="greedy", beam_size=4), {}, ("greedy", 4, 0.0, 1.0)),
    (dict(strategy="sample", temperature=0.7), {}, ("sample", 3, 0.0, 0.7)),
    (dict(strategy="sample", temperature=0.7), dict(temperature=1.3), ("sample", 3, 0.0, 1.3)),
    (dict(strategy="sample"), dict(beam_size=5), ("beam", 5, 0.0, 1.0)),
    (dict(strategy="sample"), dict(greedy=True), ("greedy", 3, 0.0, 1.0)),
    (dict(strategy="beam", temperature=0.5), dict(sample=True), ("sample", 3, 0.0, 0.5)),
    (dict(strategy="beam"), dict(sample=True, temperature=2.0), ("sample", 3, 0.0, 2.0)),
    (dict(strategy="greedy"), dict(beam_size=2, length_penalty=1.0), ("beam", 2, 1.0, 1.0)),
    (dict(strategy="beam", beam_size=1, length_penalty=0.8), {}, ("greedy", 1, 0.8, 1.0)),
    (dict(strategy="beam", beam_size=5), dict(beam_size=1), ("greedy", 1, 0.0, 1.0)),
])
def test_decoding_defaults_to_the_saved_settings(saved, kw, want):
    cli = load_cli()
    assert tuple(cli.resolve_decoding(args(**kw), DecodeConfig(**saved))) == want


@pytest.mark.parametrize("saved,kw", [
    (dict(strategy="beam"), dict(temperature=0.5)),               # temperature without sampling
    (dict(strategy="sample"), dict(greedy=True, temperature=0.5)),
    (dict(strategy="beam"), dict(sample=True, beam_size=3)),     # contradictory
    (dict(strategy="beam"), dict(greedy=True, beam_size=3)),
    (dict(strategy="sample"), dict(length_penalty=1.0)),          # length penalty without beam search
    (dict(strategy="beam"), dict(sample=True, temperature=0.0)),
    (dict(strategy="beam"), dict(beam_size=0)),
])
def test_contradictory_options_are_errors(saved, kw):
    cli = load_cli()
    with pytest.raises(ValueError):
        cli.resolve_decoding(args(**kw), DecodeConfig(**saved))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny SAT model saved with decode.strategy=sample, and a photo."""
    from PIL import Image

    torch.manual_seed(0)
    cfg = load_caption_config(None, [
        "data.karpathy_json=unused.json", "encoder.model.image.name=test_resnet",
        "encoder.model.image.image_size=64", "encoder.model.embed_dim=8", "encoder.model.projection_hidden=0",
        "decoder.kind=sat", "decoder.embed_dim=8", "decoder.hidden_dim=16", "decoder.feature_dim=12",
        "decoder.att_dim=8", "decoder.dropout=0.0", "decode.max_length=6", "decode.strategy=sample",
        "decode.temperature=3.0"])
    towers_cfg, image, _, _ = load_towers(cfg.encoder, need_text=False)
    vocab = WordVocab.from_words(["a", "red", "blue", "circle", "square", "and", "left", "right", "of", "the"])
    model = build_model(cfg, vocab.size, image, None, None).eval()
    root = tmp_path_factory.mktemp("cli")
    save_model_dir(str(root / "m"), model, vocab, cfg, towers_cfg)
    photo = root / "photo.png"
    Image.fromarray((np.random.RandomState(0).rand(40, 48, 3) * 255).astype(np.uint8)).save(photo)
    return str(root / "m"), str(photo)


def run(capsys, model, photo, *extra):
    assert load_cli().main(["--model", model, "--image", photo, *extra]) == 0
    return capsys.readouterr().out.strip()


def test_cli_samples_as_saved_and_overrides(model_dir, capsys):
    model, photo = model_dir
    # the saved strategy is sampling at temperature 3: seeded runs repeat, different seeds differ
    seeded = [run(capsys, model, photo, "--seed", "1") for _ in range(2)]
    assert seeded[0] == seeded[1]
    others = {run(capsys, model, photo, "--seed", str(s)) for s in range(2, 8)}
    assert len(others | {seeded[0]}) > 1
    # --greedy and --beam-size 1 are deterministic and agree; --sample at a tiny temperature is greedy too
    greedy = run(capsys, model, photo, "--greedy")
    assert run(capsys, model, photo, "--beam-size", "1") == greedy
    assert run(capsys, model, photo, "--sample", "--temperature", "1e-4", "--seed", "0") == greedy
    assert run(capsys, model, photo, "--beam-size", "3")


def test_cli_rejects_contradictory_options(model_dir, capsys):
    model, photo = model_dir
    assert load_cli().main(["--model", model, "--image", photo, "--greedy", "--temperature", "0.5"]) == 2
    assert "--temperature" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --greedy and --sample are mutually exclusive
        load_cli().main(["--model", model, "--image", photo, "--greedy", "--sample"])
