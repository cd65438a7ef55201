"""The VSE model: the pretrained image tower and a text encoder (the pretrained transformer tower or the
GRU baseline) mapping into one joint space; saved and loaded in the export format of ``pretrain.export``.

Heads: a different ``embed_dim`` than the export's gives new projection heads (randomly initialised,
the same 2-layer MLP shape, so the result is still described by a ``model.yaml``); a different pooling
gives a new pooling module (``attention`` has parameters). The backbones (timm model, Hugging Face
encoder) are what ``optim.*_lr_factor`` and ``optim.freeze_epochs`` act on.

A saved model is an export directory (``model.yaml``, ``image_tower.safetensors``,
``text_tower.safetensors``, ``text/``, ``export.json``) that ``pretrain.export.load_export`` reads. With
the GRU text encoder, ``text_gru.safetensors`` and ``vocab.json`` replace the transformer files; read
those with ``load_vse_export`` (which reads both kinds).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn
import yaml

from ..config import ModelConfig, _build
from ..export import write_export, write_image_side
from ..models import ImageTower, Pooling, TextTower, image_transform, projection
from .config import VSEModelConfig
from ..vocab import WordVocab
from .text_gru import GRUTextEncoder

log = logging.getLogger(__name__)

VSE_META = "vse.json"


class VSEModel(nn.Module):
    """``image``: ImageTower (B x 3 x H x W -> B x D); ``text``: TextTower or GRUTextEncoder (ids, mask -> B x D)."""

    def __init__(self, image: ImageTower, text: nn.Module):
        super().__init__()
        self.image = image
        self.text = text

    @property
    def text_kind(self) -> str:
        return "gru" if isinstance(self.text, GRUTextEncoder) else "transformer"

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.image(images), self.text(input_ids, attention_mask)

    def backbones(self) -> Dict[str, nn.Module]:
        """The pretrained feature extractors (frozen / slower learning rate); the GRU is a head."""
        out: Dict[str, nn.Module] = {"image": self.image.backbone}
        if isinstance(self.text, TextTower):
            out["text"] = self.text.encoder
        return out

    def named_parameter_roles(self) -> Iterator[Tuple[str, str, nn.Parameter]]:
        """(role, name, parameter) with role ``image_backbone``, ``text_backbone`` or ``head``."""
        owner = {id(p): f"{k}_backbone" for k, m in self.backbones().items() for p in m.parameters()}
        for name, p in self.named_parameters():
            yield owner.get(id(p), "head"), name, p


def build_vse_model(cfg: VSEModelConfig, towers: nn.Module, export_cfg: ModelConfig,
                    vocab: Optional[WordVocab] = None) -> Tuple[VSEModel, ModelConfig]:
    """The VSE model around the export's towers (modified in place), and the ``ModelConfig`` describing it."""
    embed_dim = cfg.embed_dim or export_cfg.embed_dim
    image_pooling = cfg.image_pooling or export_cfg.image.pooling
    text_pooling = cfg.text_pooling or export_cfg.text.pooling
    resolved = dataclasses.replace(
        export_cfg, embed_dim=embed_dim, image=dataclasses.replace(export_cfg.image, pooling=image_pooling),
        text=dataclasses.replace(export_cfg.text, pooling=text_pooling,
                                 max_length=cfg.max_length or export_cfg.text.max_length))
    hidden, layers = export_cfg.projection_hidden, export_cfg.attention_pool_layers
    new_proj = cfg.new_heads or embed_dim != export_cfg.embed_dim
    image: ImageTower = towers.image
    if cfg.new_heads or image_pooling != export_cfg.image.pooling:
        image.pool = Pooling(image_pooling, image.num_features, has_cls=image.num_prefix_tokens > 0, layers=layers)
    if new_proj:
        image.proj = projection(image.num_features, hidden, embed_dim)
    if cfg.text_encoder == "gru":
        if vocab is None:
            raise ValueError("the GRU text encoder needs a vocabulary (WordVocab.build over the training captions)")
        text: nn.Module = GRUTextEncoder(len(vocab), cfg.word_dim, embed_dim, cfg.gru_hidden, cfg.gru_layers,
                                         cfg.bidirectional)
    else:
        text = towers.text
        if cfg.new_heads or text_pooling != export_cfg.text.pooling:
            text.pool = Pooling(text_pooling, text.num_features, has_cls=True, layers=layers)
        if new_proj:
            text.proj = projection(text.num_features, hidden, embed_dim)
    if new_proj or cfg.new_heads:
        log.info("new projection heads: embed_dim %d (export: %d)", embed_dim, export_cfg.embed_dim)
    return VSEModel(image, text), resolved


def read_model_yaml(export_dir: str) -> ModelConfig:
    path = os.path.join(export_dir, "model.yaml")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"'{export_dir}' is not an export directory: {path} does not exist "
                                f"(write one with tools/export.py --run RUN --out DIR)")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    return _build(ModelConfig, data, "model.")


def save_vse_export(model: VSEModel, model_cfg: ModelConfig, tokenizer, out_dir: str, max_length: int,
                    meta: Optional[Dict[str, Any]] = None) -> str:
    """Save a VSE model as an export directory (+ ``vse.json``: text encoder kind, max_length, ``meta``).

    Written to ``out_dir.tmp`` first and renamed, so a crash never leaves a half-written best model.
    """
    import shutil

    from safetensors.torch import save_file

    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    info: Dict[str, Any] = {"text_encoder": model.text_kind, "max_length": max_length, **(meta or {})}
    if model.text_kind == "transformer":
        write_export(model, model_cfg, tokenizer, tmp, provenance={"source": "vse", **(meta or {})})
    else:
        write_image_side(model.image, model_cfg, tmp)
        save_file({k: v.detach().contiguous().cpu() for k, v in model.text.state_dict().items()},
                  os.path.join(tmp, "text_gru.safetensors"))
        tokenizer.save(os.path.join(tmp, "vocab.json"))
        info["gru"] = model.text.hparams
        with open(os.path.join(tmp, "export.json"), "w", encoding="utf-8") as f:
            json.dump({"source": "vse", **(meta or {})}, f, indent=1)
    with open(os.path.join(tmp, VSE_META), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def load_vse_export(export_dir: str, device: str = "cpu"):
    """``(model, tokenizer, eval transform, max_length, model_cfg)`` of any export directory: a pretraining
    export, or a VSE model saved by ``save_vse_export`` (transformer or GRU text encoder). Eval mode."""
    from safetensors.torch import load_file

    from ..export import load_export

    model_cfg = read_model_yaml(export_dir)
    meta: Dict[str, Any] = {}
    if os.path.isfile(os.path.join(export_dir, VSE_META)):
        with open(os.path.join(export_dir, VSE_META), encoding="utf-8") as f:
            meta = json.load(f)
    if meta.get("text_encoder", "transformer") == "transformer":
        towers, tokenizer, transform = load_export(export_dir, device)
        model = VSEModel(towers.image, towers.text)
        max_length = int(meta.get("max_length", model_cfg.text.max_length))
    else:
        image = ImageTower(model_cfg.image, model_cfg.embed_dim, model_cfg.projection_hidden,
                           model_cfg.attention_pool_layers)
        image.load_state_dict(load_file(os.path.join(export_dir, "image_tower.safetensors")))
        tokenizer = WordVocab.load(os.path.join(export_dir, "vocab.json"))
        text = GRUTextEncoder(**meta["gru"])
        text.load_state_dict(load_file(os.path.join(export_dir, "text_gru.safetensors")))
        model = VSEModel(image, text)
        transform = image_transform(image, model_cfg.image.image_size)
        max_length = int(meta["max_length"])
    return model.to(device).eval(), tokenizer, transform, max_length, model_cfg
