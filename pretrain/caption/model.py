"""The captioning model: pretrained image tower tokens (+ optional condition text) -> decoder.

A trained model is a directory that needs no DeepSpeed, no export and no network::

    caption.yaml        the resolved caption run config (decoder, decoding rules)
    towers.yaml         the tower architecture (``model`` section of a pretraining config)
    model.safetensors   image tower + decoder (+ text tower when the decoder attends to a condition)
    vocab.json          the vocabulary (``tokenizer/`` beside it for ``data.vocab=tokenizer``)
    text/               the text tower's Hugging Face config and tokenizer (condition models only)

    model, vocab, transform, cfg = load_model_dir("runs/caption_demo/scst_best")
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import yaml

from ..config import ModelConfig, _build, save_config
from ..models import ImageTower, TextTower, build_tokenizer, image_transform
from .config import CaptionRunConfig, EncoderConfig, load_caption_config
from .decoders import CaptionDecoder, Memory, build_decoder

log = logging.getLogger(__name__)


class CaptionModel(nn.Module):
    """Image tower (frozen unless ``train_image_tower``), optional frozen text tower for the condition, decoder."""

    def __init__(self, image_tower: ImageTower, decoder: CaptionDecoder, text_tower: Optional[TextTower] = None,
                 cond_tokenizer=None, cond_max_length: int = 16):
        super().__init__()
        self.image_tower, self.decoder, self.text_tower = image_tower, decoder, text_tower
        self.cond_tokenizer, self.cond_max_length = cond_tokenizer, cond_max_length
        self.train_image_tower = False
        # pooling and projection heads of the towers are not used by captioning
        for head in (image_tower.pool, image_tower.proj) + ((text_tower.pool, text_tower.proj) if text_tower else ()):
            head.requires_grad_(False)
        if text_tower is not None:
            text_tower.requires_grad_(False)

    def set_image_tower_trainable(self, trainable: bool) -> None:
        """Frozen: features under no_grad, BatchNorm statistics fixed (eval mode). Parameters keep
        ``requires_grad`` (the optimizer holds them; their learning rate is 0 while frozen)."""
        self.train_image_tower = trainable
        self.train(self.training)

    def train(self, mode: bool = True) -> "CaptionModel":
        super().train(mode)
        if not self.train_image_tower:
            self.image_tower.eval()
        if self.text_tower is not None:
            self.text_tower.eval()
        return self

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_image_tower):
            return self.image_tower.forward_tokens(images)  # B x N x C

    @torch.no_grad()
    def condition_tokens(self, conditions: List[str], device) -> Tuple[torch.Tensor, torch.Tensor]:
        enc = self.cond_tokenizer(list(conditions), padding=True, truncation=True, max_length=self.cond_max_length,
                                  return_tensors="pt")
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        return self.text_tower.forward_tokens(ids, mask), mask.bool()

    def encoder_outputs(self, images: torch.Tensor, conditions: Optional[List[str]] = None):
        """(image tokens B x N x C, condition tokens B x L x Ct or None, condition mask or None)."""
        feats = self.image_tokens(images)
        cond = cond_mask = None
        if self.decoder.cond_dim:
            if conditions is None:
                raise ValueError("this model generates from an image and a condition text: give the condition")
            cond, cond_mask = self.condition_tokens(conditions, images.device)
        return feats, cond, cond_mask

    def encode(self, images: torch.Tensor, conditions: Optional[List[str]] = None) -> Memory:
        """The decoder's memory for these images (and conditions)."""
        return self.decoder.prepare(*self.encoder_outputs(images, conditions))

    def attention_grid(self, num_tokens: int) -> Tuple[int, int, int]:
        """(prefix tokens, rows, columns) of the spatial token grid, for attention maps."""
        prefix = int(self.image_tower.num_prefix_tokens)
        n = num_tokens - prefix
        grid = getattr(getattr(self.image_tower.backbone, "patch_embed", None), "grid_size", None)
        if grid is not None and int(grid[0]) * int(grid[1]) == n:
            return prefix, int(grid[0]), int(grid[1])
        side = math.isqrt(n)
        return (prefix, side, side) if side * side == n else (prefix, 1, n)


def load_towers(enc: EncoderConfig, need_text: bool):
    """(towers ModelConfig, image tower, text tower or None, tokenizer or None) from an export or a config."""
    if enc.export:
        from ..export import load_export

        with open(os.path.join(enc.export, "model.yaml")) as f:
            data = yaml.safe_load(f)
        data["text"]["name_or_path"] = os.path.join(enc.export, data["text"]["name_or_path"])
        model_cfg: ModelConfig = _build(ModelConfig, data, "model.")
        towers, tokenizer, _ = load_export(enc.export)
        log.info("image tower from export %s (%s)", enc.export, model_cfg.image.name)
        return model_cfg, towers.image, (towers.text if need_text else None), (tokenizer if need_text else None)
    m = enc.model
    image = ImageTower(m.image, m.embed_dim, m.projection_hidden, m.attention_pool_layers)
    log.info("image tower built from config: %s (%s)", m.image.name,
             f"weights {m.image.weights}" if m.image.weights else "no pretrained weights")
    if not need_text:
        return m, image, None, None
    text = TextTower(m.text, m.embed_dim, m.projection_hidden, m.attention_pool_layers)
    return m, image, text, build_tokenizer(m.text)


def build_model(cfg: CaptionRunConfig, vocab_size: int, image_tower: ImageTower, text_tower: Optional[TextTower],
                tokenizer) -> CaptionModel:
    cond = bool(cfg.data.condition_field)
    decoder = build_decoder(cfg.decoder, vocab_size, image_tower.num_features,
                            text_tower.num_features if cond else 0)
    return CaptionModel(image_tower, decoder, text_tower if cond else None, tokenizer if cond else None,
                        cfg.decoder.condition_max_length)


def save_model_dir(directory: str, model: CaptionModel, vocab, cfg: CaptionRunConfig, towers_cfg: ModelConfig,
                   state_dict: Optional[dict] = None) -> str:
    """Write a model directory (``state_dict``: full weights, when the live ones are partitioned)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    state = state_dict if state_dict is not None else model.state_dict()
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()},
              os.path.join(directory, "model.safetensors.tmp"))
    os.replace(os.path.join(directory, "model.safetensors.tmp"), os.path.join(directory, "model.safetensors"))
    vocab.save(directory)
    towers = dataclasses.asdict(towers_cfg)
    towers["image"]["weights"] = None
    if model.text_tower is not None:
        model.text_tower.encoder.config.save_pretrained(os.path.join(directory, "text"))
        model.cond_tokenizer.save_pretrained(os.path.join(directory, "text"))
        towers["text"].update({"name_or_path": "text", "tokenizer": None, "pretrained": False, "config_overrides": {}})
    with open(os.path.join(directory, "towers.yaml"), "w") as f:
        yaml.safe_dump(towers, f, sort_keys=False, allow_unicode=True)
    save_config(cfg, os.path.join(directory, "caption.yaml"))
    return directory


def load_model_dir(directory: str, device: str = "cpu"):
    """(CaptionModel in eval mode, vocabulary, image transform, CaptionRunConfig) from a model directory."""
    from safetensors.torch import load_file

    from .vocab import load_vocab

    cfg = load_caption_config(os.path.join(directory, "caption.yaml"), check=False)
    with open(os.path.join(directory, "towers.yaml")) as f:
        data = yaml.safe_load(f)
    cond = bool(cfg.data.condition_field)
    if cond:
        data["text"]["name_or_path"] = os.path.join(directory, data["text"]["name_or_path"])
    towers_cfg: ModelConfig = _build(ModelConfig, data, "model.")
    vocab = load_vocab(directory)
    image = ImageTower(towers_cfg.image, towers_cfg.embed_dim, towers_cfg.projection_hidden,
                       towers_cfg.attention_pool_layers)
    text = tokenizer = None
    if cond:
        text = TextTower(towers_cfg.text, towers_cfg.embed_dim, towers_cfg.projection_hidden,
                         towers_cfg.attention_pool_layers)
        tokenizer = build_tokenizer(towers_cfg.text)
    model = build_model(cfg, vocab.size, image, text, tokenizer)
    model.load_state_dict(load_file(os.path.join(directory, "model.safetensors")))
    model.to(device).eval()
    return model, vocab, image_transform(image, towers_cfg.image.image_size), cfg
