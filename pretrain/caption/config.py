"""Typed configuration of a captioning fine-tuning run (same schema rules as ``pretrain.config``).

Precedence: ``key=value`` overrides > YAML file > defaults here. Unknown keys and wrong types stop the
run before any work; the resolved config is saved as ``config.yaml`` in the run directory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from ..config import (ConfigError, ModelConfig, check_allowed, check_non_negative, check_positive,
                      check_unit_interval, load_config)

DEFAULT_BAD_ENDINGS = ["a", "an", "the", "and", "of", "to", "with", "on", "in", "at", "for", "next", "some", "its",
                      "their", "his", "her", "is", "are", "from", "by", "as"]


@dataclass
class CaptionDataConfig:
    karpathy_json: str = ""
    """Karpathy-split JSON (``images[].filename, filepath, split, sentences[].raw, sentences[].tokens``)."""
    images_root: str = ""
    """Directory that ``filepath/filename`` of every image is relative to."""
    vocab: str = "word"
    """``word``: word-level vocabulary from the training references' ``tokens``; ``tokenizer``: the text tower's
    tokenizer (sub-words; handles Chinese)."""
    min_word_freq: int = 5
    """Words seen fewer times in the training references become ``<unk>`` (``word`` vocabulary)."""
    max_length: int = 16
    """Tokens per training caption (without BOS/EOS); longer references are truncated for cross-entropy."""
    seq_per_img: int = 5
    """References per image in a cross-entropy batch (the image is encoded once)."""
    use_restval: bool = True
    """Train on ``restval`` images too (the Karpathy convention)."""
    condition_field: str = ""
    """Key of each sentence holding a condition text (e.g. ``answer`` for answer-conditioned question generation,
    IVQA). Sentences of one image are grouped by their condition; empty: no condition."""
    random_shift: int = 0
    """Training augmentation: shift each image by up to this many pixels (edges replicated); no flips, which would
    swap left and right in the captions. 0: off."""
    cache_images: bool = False
    """Keep decoded image tensors in memory after the first read (small data sets)."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    max_val_images: int = 0
    """At most this many validation units in the per-epoch evaluation (0: all)."""


@dataclass
class EncoderConfig:
    export: Optional[str] = None
    """Export directory of a pretraining run (``tools/export.py``); none: build the towers from ``model``."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Tower architecture (the ``model`` section of a pretraining config) used when no export is given."""
    finetune_from_epoch: int = -1
    """Cross-entropy epoch (0-based) from which the image tower is fine-tuned at ``encoder.lr``; -1: frozen."""
    lr: float = 1.0e-5
    """Learning rate of the image tower while it is fine-tuned (smaller than the decoder's)."""
    finetune_in_scst: bool = False
    """Also fine-tune the image tower during SCST (at ``encoder.lr`` scaled like the decoder's)."""


@dataclass
class DecoderConfig:
    kind: str = "sat"
    """``sat`` (Show-Attend-Tell: soft attention, gated context, LSTM) or ``aoa`` (AoA refiner + AoA decoder)."""
    embed_dim: int = 256
    """Word embedding width."""
    hidden_dim: int = 512
    """LSTM width (and the refined feature width of ``aoa``)."""
    feature_dim: int = 512
    """Image features are embedded to this width before attention (``sat``; ``aoa`` uses ``hidden_dim``)."""
    att_dim: int = 256
    """Hidden width of the additive attentions (``sat`` image attention; condition attention of both)."""
    num_heads: int = 8
    """Attention heads of ``aoa`` (refiner and decoder)."""
    refiner_layers: int = 2
    """Self-attention refiner layers of ``aoa``."""
    dropout: float = 0.3
    """Dropout on embedded features and before the word classifier."""
    doubly_stochastic: float = 1.0
    """Weight of the ``sat`` doubly stochastic attention regulariser: mean over regions of (1 - sum_t alpha_t)^2."""
    condition_max_length: int = 16
    """Tokens of the condition text given to the text tower."""


@dataclass
class XEConfig:
    epochs: int = 20
    """Cross-entropy epochs."""
    batch_size: int = 16
    """Images per rank per step (each with ``data.seq_per_img`` references)."""
    lr: float = 5.0e-4
    """Peak learning rate of the decoder."""
    weight_decay: float = 0.0
    """AdamW weight decay (matrices only)."""
    warmup_steps: int = 100
    """Linear warm-up steps; then cosine to ``min_lr_ratio``."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0: off)."""
    label_smoothing: float = 0.1
    """Label smoothing epsilon (uniform over the vocabulary)."""
    ss_start_epoch: int = -1
    """Scheduled sampling starts at this epoch (-1: never)."""
    ss_increase_every: int = 5
    """Scheduled sampling probability grows every this many epochs ..."""
    ss_increase_prob: float = 0.05
    """... by this much ..."""
    ss_max_prob: float = 0.25
    """... up to this."""


@dataclass
class SCSTConfig:
    epochs: int = 10
    """Self-critical epochs after cross-entropy (0: skip), starting from the best cross-entropy model."""
    batch_size: int = 16
    """Images per rank per step."""
    lr: float = 5.0e-5
    """Peak learning rate of the decoder."""
    warmup_steps: int = 0
    """Linear warm-up steps; then cosine to ``xe.min_lr_ratio``."""
    num_samples: int = 5
    """Captions sampled per image."""
    baseline: str = "greedy"
    """``greedy``: reward of the greedy caption (Rennie et al.); ``mean``: mean reward of the other samples of the
    same image (leave-one-out)."""
    temperature: float = 1.0
    """Sampling temperature."""
    max_length: int = 16
    """Longest sampled caption (tokens before EOS)."""
    init_from: str = ""
    """A model directory (e.g. an earlier run's ``xe_best``) to start SCST from when ``xe.epochs`` is 0; it must
    have been trained with the same data and vocabulary settings."""


@dataclass
class DecodeConfig:
    strategy: str = "beam"
    """Test-time decoding: ``greedy``, ``beam`` or ``sample``."""
    beam_size: int = 3
    """Beams per image."""
    length_penalty: float = 0.0
    """GNMT length penalty alpha: beams are ranked by logprob / ((5 + length) / 6) ** alpha (0: raw logprob)."""
    max_length: int = 16
    """Longest caption (tokens before EOS)."""
    min_length: int = 1
    """Shortest caption (EOS is banned before)."""
    temperature: float = 1.0
    """Temperature of ``sample``."""
    bad_endings: List[str] = field(default_factory=lambda: list(DEFAULT_BAD_ENDINGS))
    """A caption may not end on these words (EOS is banned right after them)."""
    allow_unk: bool = False
    """Allow ``<unk>`` in generated captions."""


@dataclass
class EvalConfig:
    tokenize: str = "ptb"
    """How captions are tokenised for metrics and rewards: ``ptb`` (COCO: Stanford PTB tokenizer, Java; a Python
    approximation with a warning without Java) or ``cjk`` (PTB after splitting CJK characters)."""
    test_metrics: List[str] = field(default_factory=lambda: ["BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE"])
    """Metrics of the final test table (``CIDEr`` is COCO's CIDEr-D). Validation each epoch uses CIDEr-D."""
    constant_topk: int = 20
    """The constant baseline is the best (on test CIDEr-D) of the k most frequent training captions."""
    test_greedy: bool = True
    """Also report greedy decoding in the final table (beside ``decode.strategy``)."""
    batch_size: int = 50
    """Images per rank per decoding batch in evaluation."""


@dataclass
class CaptionTrainConfig:
    output_dir: str = "runs/caption"
    """Run directory: config.yaml, metrics.jsonl, xe_best/ and scst_best/ model directories, results.json."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3."""
    precision: str = "fp32"
    """``fp32``, ``bf16`` or ``fp16`` (CPU: fp32)."""
    seed: int = 42
    """Seed of initialisation, data order and sampling."""
    log_every: int = 20
    """Log training metrics every N steps."""
    device: str = "auto"
    """``auto`` (cuda if available), ``cpu`` or ``cuda``."""


@dataclass
class CaptionRunConfig:
    data: CaptionDataConfig = field(default_factory=CaptionDataConfig)
    """Karpathy-split data and vocabulary."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """Pretrained towers (export or config) and their fine-tuning."""
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    """Caption decoder."""
    xe: XEConfig = field(default_factory=XEConfig)
    """Cross-entropy phase."""
    scst: SCSTConfig = field(default_factory=SCSTConfig)
    """Self-critical phase."""
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    """Test-time decoding."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    train: CaptionTrainConfig = field(default_factory=CaptionTrainConfig)
    """Run directory, DeepSpeed, seed."""


ALLOWED = {
    "data.vocab": ("word", "tokenizer"),
    "decoder.kind": ("sat", "aoa"),
    "scst.baseline": ("greedy", "mean"),
    "decode.strategy": ("greedy", "beam", "sample"),
    "eval.tokenize": ("ptb", "cjk"),
    "train.zero_stage": (0, 1, 2, 3),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
}
METRIC_NAMES = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


def validate(cfg: CaptionRunConfig) -> CaptionRunConfig:
    """Check allowed values and ranges; raise ConfigError naming the key."""
    check_allowed(cfg, ALLOWED)
    check_positive(cfg, ("data.max_length", "data.seq_per_img", "decoder.embed_dim", "decoder.hidden_dim",
                         "decoder.feature_dim", "decoder.att_dim", "decoder.num_heads", "xe.batch_size",
                         "scst.batch_size", "scst.num_samples", "scst.max_length", "decode.beam_size",
                         "decode.max_length", "data.min_word_freq", "train.log_every", "eval.constant_topk",
                         "eval.batch_size", "decoder.condition_max_length"))
    check_non_negative(cfg, ("xe.epochs", "scst.epochs", "decoder.refiner_layers", "xe.warmup_steps",
                             "scst.warmup_steps", "data.num_workers", "data.max_val_images", "data.random_shift",
                             "decode.min_length"))
    check_unit_interval(cfg, ("decoder.dropout", "xe.label_smoothing", "xe.ss_max_prob", "xe.min_lr_ratio"))
    if cfg.decoder.kind == "aoa" and cfg.decoder.hidden_dim % cfg.decoder.num_heads:
        raise ConfigError(f"config key 'decoder.hidden_dim' ({cfg.decoder.hidden_dim}) must be divisible by "
                          f"'decoder.num_heads' ({cfg.decoder.num_heads}) for the aoa decoder")
    if cfg.scst.baseline == "mean" and cfg.scst.num_samples < 2:
        raise ConfigError("config key 'scst.num_samples' must be >= 2 with scst.baseline=mean "
                          "(the baseline is the mean reward of the other samples)")
    if cfg.scst.temperature <= 0 or cfg.decode.temperature <= 0:
        raise ConfigError("config keys 'scst.temperature' and 'decode.temperature' must be > 0")
    if cfg.xe.epochs == 0 and cfg.scst.epochs > 0 and not cfg.scst.init_from:
        raise ConfigError("config key 'scst.epochs' > 0 needs 'xe.epochs' > 0 or 'scst.init_from' (SCST starts from "
                          "the best XE model)")
    for m in cfg.eval.test_metrics:
        if m not in METRIC_NAMES:
            raise ConfigError(f"config key 'eval.test_metrics' has '{m}'; choose from {list(METRIC_NAMES)}")
    if not cfg.data.karpathy_json:
        raise ConfigError("config key 'data.karpathy_json' is empty: give a Karpathy-split JSON "
                          "(e.g. data/caption_demo/dataset.json from tools/make_caption_demo.py)")
    return cfg


def load_caption_config(path: Optional[str] = None, overrides: Optional[List[str]] = None,
                        check: bool = True) -> CaptionRunConfig:
    """Defaults, then the YAML file, then ``key=value`` overrides; validated unless ``check`` is false."""
    cfg = load_config(path, overrides, cls=CaptionRunConfig)
    return validate(cfg) if check else cfg
