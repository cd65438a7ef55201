"""Typed configuration of a VSE (retrieval) fine-tuning run (same schema rules as ``pretrain.config``).

Precedence: ``key=value`` overrides > YAML file > defaults here. Unknown keys and wrong types stop the
run before any work with a message naming the key; the resolved config is saved as ``config.yaml``.
Defaults follow VSE++ (Faghri et al. 2018): margin 0.2, hardest negatives, lr 2e-4 decayed x0.1 at
epoch 15 of 30, batch 128, gradient clip 2.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from ..config import ConfigError, check_allowed, check_non_negative, check_positive, load_config


@dataclass
class VSEDataConfig:
    source: str = "karpathy"
    """``karpathy``: a Karpathy-split JSON with an images folder; ``shards``: WebDataset click-log shards."""
    karpathy_json: str = ""
    """Karpathy-split JSON (``images[].filename``, optional ``filepath``, ``split``, ``sentences[].raw``/``tokens``)."""
    images_root: str = ""
    """Directory that ``filepath/filename`` of every image is relative to."""
    use_restval: bool = True
    """Train on the ``restval`` images too (the usual COCO setting: 113,287 training images)."""
    train_split: str = "train"
    """Split name of the training images."""
    val_split: str = "val"
    """Split evaluated after every epoch (model selection, early stopping)."""
    test_split: str = "test"
    """Split evaluated once at the end with the best model."""
    captions_per_image: int = 5
    """Keep the first N captions of every image (COCO has a few images with 6-7; 0: all)."""
    max_val_images: int = 0
    """Evaluate on the first N validation images only (VSE++ uses 1000 on COCO; 0: all)."""
    train_shards: str = ""
    """``source: shards``: training shards (brace patterns, fsspec URLs, ``::``-joined sources)."""
    val_shards: str = ""
    """``source: shards``: held-out shards, evaluated with the search protocol (distinct queries, click gains)."""
    test_shards: str = ""
    """``source: shards``: shards evaluated once at the end (empty: none)."""
    epoch_samples: int = 10000
    """``source: shards``: pairs (all ranks) that make one epoch of the endless shard stream."""
    val_max_samples: int = 5000
    """``source: shards``: at most this many held-out pairs are evaluated."""
    shuffle_buffer: int = 1000
    """``source: shards``: samples held in the shuffle buffer per worker."""
    augment: bool = True
    """Random-resized crop and horizontal flip for training images (evaluation: resize only)."""
    crop_scale_min: float = 0.5
    """Smallest area fraction of the random-resized crop."""
    hflip: float = 0.5
    """Horizontal-flip probability (0 when captions say left/right)."""
    cache_images: bool = False
    """Keep decoded images in memory after the first read (small data sets)."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    seed: int = 0
    """Seed of the caption order (with the epoch) and of the shard stream."""


@dataclass
class VSEModelConfig:
    export: str = ""
    """Export directory of a pretraining run (``tools/export.py``): both towers start from it."""
    embed_dim: int = 0
    """Joint embedding size; 0 keeps the export's. A different size gets new (randomly initialised) projection heads."""
    image_pooling: str = ""
    """Image token pooling: ``mean``, ``cls``, ``attention``; empty keeps the export's (a change gets a new pooling
    module; the projection is kept unless ``embed_dim`` changes)."""
    text_pooling: str = ""
    """Text token pooling of the transformer: ``mean``, ``cls``, ``attention``; empty keeps the export's."""
    new_heads: bool = False
    """Re-initialise both pooling + projection heads even when sizes and pooling match."""
    text_encoder: str = "transformer"
    """``transformer``: the pretrained text tower; ``gru``: the VSE++ baseline (word embeddings + GRU, own vocabulary)."""
    max_length: int = 0
    """Tokens per caption (0: the export's ``model.text.max_length``; GRU: 32)."""
    word_dim: int = 300
    """GRU: word embedding width."""
    gru_hidden: int = 0
    """GRU: hidden width (0: ``embed_dim``, as VSE++; else a linear map to ``embed_dim`` follows)."""
    gru_layers: int = 1
    """GRU: stacked layers."""
    bidirectional: bool = False
    """GRU: bidirectional (the caption vector is the mean of both directions' final states)."""
    min_word_freq: int = 4
    """GRU: words seen fewer times in the training captions become ``<unk>`` (VSE++: 4)."""


@dataclass
class VSELossConfig:
    kind: str = "hinge"
    """``hinge`` (VSE++ triplet ranking loss, summed over the batch) or ``infonce`` (symmetric cross-entropy)."""
    margin: float = 0.2
    """Hinge margin alpha."""
    max_violation: bool = True
    """Hinge: only the hardest negative of every positive (VSE++ "MH"); false: sum over all negatives ("SH")."""
    warmup_epochs: int = 0
    """Hinge: the first N epochs sum over all negatives before switching to ``max_violation`` (helps from scratch)."""
    temperature: float = 0.05
    """InfoNCE softmax temperature."""
    mask_false_negatives: bool = True
    """In a batch, pairs sharing the image (two captions of one image) or the caption text (a repeated query; shards:
    the query id) are not negatives. VSE++ does not mask them; click logs repeat queries over many images."""
    global_negatives: bool = True
    """Score against the embeddings of every rank's batch (all-gather; gradients flow into the local part)."""


@dataclass
class VSEOptimConfig:
    lr: float = 2.0e-4
    """Learning rate of the heads (pooling, projections, GRU text encoder)."""
    image_lr_factor: float = 0.1
    """Image backbone learning rate = ``lr`` x this (0 keeps it frozen for the whole run)."""
    text_lr_factor: float = 0.1
    """Transformer text backbone learning rate = ``lr`` x this (0 keeps it frozen)."""
    freeze_epochs: int = 0
    """Both backbones are frozen for the first N epochs (heads only), then fine-tuned with fresh optimizer state."""
    lr_decay_epochs: List[int] = field(default_factory=lambda: [15])
    """Epochs at which every learning rate is multiplied by ``lr_decay_factor`` (VSE++: 15)."""
    lr_decay_factor: float = 0.1
    """Step-decay factor."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up optimizer steps at the start of the run."""
    weight_decay: float = 0.0
    """AdamW weight decay of matrices (VSE++: none)."""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    grad_clip: float = 2.0
    """Global gradient-norm clip (VSE++: 2; 0: off)."""


@dataclass
class VSETrainConfig:
    output_dir: str = "runs/vse"
    """Run directory: config.yaml, metrics.jsonl, best/ (export format), results.json."""
    epochs: int = 30
    """Training epochs."""
    batch_size: int = 128
    """Captions per rank per step (each with its image)."""
    patience: int = 0
    """Stop after this many epochs without a better validation rsum (0: never)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-2 (the VSE towers fit one device; ZeRO-3 is not supported here)."""
    precision: str = "fp32"
    """``fp32``, ``bf16`` or ``fp16`` (CPU: fp32)."""
    eval_batch_size: int = 128
    """Images / captions per forward in evaluation."""
    eval_zero_shot: bool = True
    """Evaluate the export as it is before training (the zero-shot rsum)."""
    coco_1k: bool = True
    """At the test: also report the COCO 1K protocol (5 folds of 1000) when the split has exactly 5000 images."""
    seed: int = 42
    """Seed of new heads, GRU initialisation and data order."""
    log_every: int = 20
    """Log training metrics every N optimizer steps."""
    device: str = "auto"
    """``auto`` (cuda if available), ``cpu`` or ``cuda``."""


@dataclass
class VSERunConfig:
    data: VSEDataConfig = field(default_factory=VSEDataConfig)
    """Karpathy-split data or shards."""
    model: VSEModelConfig = field(default_factory=VSEModelConfig)
    """Towers (from an export), heads, text encoder."""
    loss: VSELossConfig = field(default_factory=VSELossConfig)
    """Ranking loss."""
    optim: VSEOptimConfig = field(default_factory=VSEOptimConfig)
    """Optimizer, learning rates, freezing."""
    train: VSETrainConfig = field(default_factory=VSETrainConfig)
    """Loop, evaluation, early stopping, DeepSpeed."""


ALLOWED = {
    "data.source": ("karpathy", "shards"),
    "model.image_pooling": ("", "mean", "cls", "attention"),
    "model.text_pooling": ("", "mean", "cls", "attention"),
    "model.text_encoder": ("transformer", "gru"),
    "loss.kind": ("hinge", "infonce"),
    "train.zero_stage": (0, 1, 2),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
}


def validate(cfg: VSERunConfig) -> VSERunConfig:
    """Check allowed values and ranges; raise ConfigError naming the key."""
    check_allowed(cfg, ALLOWED)
    check_positive(cfg, ("train.epochs", "train.batch_size", "train.eval_batch_size", "train.log_every",
                         "model.word_dim", "model.gru_layers", "model.min_word_freq", "data.epoch_samples",
                         "data.shuffle_buffer"))
    check_non_negative(cfg, ("model.embed_dim", "model.gru_hidden", "model.max_length", "train.patience",
                             "optim.freeze_epochs", "optim.warmup_steps", "loss.warmup_epochs",
                             "data.captions_per_image", "data.max_val_images", "data.num_workers",
                             "optim.image_lr_factor", "optim.text_lr_factor", "optim.weight_decay",
                             "optim.grad_clip", "loss.margin", "data.val_max_samples"))
    if cfg.optim.lr <= 0 or cfg.loss.temperature <= 0:
        raise ConfigError("config keys 'optim.lr' and 'loss.temperature' must be > 0")
    if not 0.0 < cfg.optim.lr_decay_factor <= 1.0:
        raise ConfigError(f"config key 'optim.lr_decay_factor' must be in (0, 1], got {cfg.optim.lr_decay_factor}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"config key 'optim.betas' must be two numbers, got {cfg.optim.betas}")
    if not 0.0 < cfg.data.crop_scale_min <= 1.0:
        raise ConfigError(f"config key 'data.crop_scale_min' must be in (0, 1], got {cfg.data.crop_scale_min}")
    if not cfg.model.export:
        raise ConfigError("config key 'model.export' is empty: give an export directory of a pretraining run "
                          "(tools/export.py --run RUN --out DIR)")
    d = cfg.data
    if d.source == "karpathy" and not (d.karpathy_json and d.images_root):
        raise ConfigError("config keys 'data.karpathy_json' and 'data.images_root' are needed with data.source=karpathy "
                          "(e.g. data/vse_demo/dataset.json and data/vse_demo/images from tools/make_vse_demo.py)")
    if d.source == "shards" and not (d.train_shards and d.val_shards):
        raise ConfigError("config keys 'data.train_shards' and 'data.val_shards' are needed with data.source=shards")
    if d.source == "shards" and cfg.model.text_encoder == "gru":
        raise ConfigError("config key 'model.text_encoder' = 'gru' needs data.source=karpathy "
                          "(its vocabulary is built from the training captions)")
    return cfg


def load_vse_config(path: Optional[str] = None, overrides: Optional[List[str]] = None,
                    check: bool = True) -> VSERunConfig:
    """Defaults, then the YAML file, then ``key=value`` overrides; validated unless ``check`` is false."""
    cfg = load_config(path, overrides, cls=VSERunConfig)
    return validate(cfg) if check else cfg
