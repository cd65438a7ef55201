"""Export pretrained towers from a DeepSpeed checkpoint (any ZeRO stage) and load them back.

An export directory holds::

    model.yaml                  the ``model`` section of the run config (architecture)
    image_tower.safetensors     ImageTower state (timm backbone + pooling + projection)
    text_tower.safetensors      TextTower state (HF encoder + pooling + projection)
    text/                       the text encoder's Hugging Face config and tokenizer
    export.json                 provenance: checkpoint, step, which encoders (query or momentum)

Loading needs no DeepSpeed and no network::

    from pretrain.export import load_export
    towers, tokenizer, transform = load_export("exports/demo")
    img = towers.image(transform(pil_image)[None])                     # 1 x D, L2-normalised
    txt = towers.text(**tokenizer(["红色圆形"], return_tensors="pt", padding=True)[...])
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Dict, Optional, Tuple

import torch
import yaml

from .checkpoint import forced_weights_only, safe_load, scan_checkpoint  # noqa: F401 (re-exported)
from .config import ModelConfig, RunConfig, _build, load_config
from .models import DualEncoder, build_tokenizer, image_transform

log = logging.getLogger(__name__)


def read_checkpoint_weights(ckpt_dir: str, tag: str, zero_stage: int, which: str = "query") -> Dict[str, torch.Tensor]:
    """State dict of the DualEncoder (``query``: the trained f; ``momentum``: the key encoders g)."""
    path = os.path.join(ckpt_dir, tag)
    if which == "momentum":
        shared = safe_load(os.path.join(path, "wenlan.pt"))
        return {k: v.float() for k, v in shared["keys"]["key"].items()}
    if zero_stage == 0:
        module = safe_load(os.path.join(path, "mp_rank_00_model_states.pt"))["module"]
    else:  # ZeRO 1-3: fp32 master weights reassembled from the optimizer partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        scan_checkpoint(path)  # one line naming a file that holds anything but data ...
        with forced_weights_only():  # ... and DeepSpeed's reader, which asks for weights_only=False, gets True
            module = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    prefix = "query."
    out = {k[len(prefix):]: v.float() for k, v in module.items() if k.startswith(prefix)}
    if not out:
        raise RuntimeError(f"no 'query.*' weights in {path}: is it a pretraining checkpoint?")
    return out


def _fill_buffers(weights: Dict[str, torch.Tensor], ckpt_path: str) -> Dict[str, torch.Tensor]:
    """ZeRO reassembly returns parameters only: take buffers (BatchNorm statistics) from the model states."""
    import glob

    files = sorted(glob.glob(os.path.join(ckpt_path, "*mp_rank_00_model_states.pt")))
    if not files:
        return weights
    states = safe_load(files[0])
    buffers = states.get("buffer_names") or []
    for name in buffers:
        if name.startswith("query.") and name[len("query."):] not in weights and name in states["module"]:
            weights[name[len("query."):]] = states["module"][name]
    return weights


def export_checkpoint(run_dir: str, out_dir: str, tag: Optional[str] = None, which: str = "query") -> str:
    """Write an export from ``run_dir/checkpoints/<tag>`` (default: the newest complete one)."""
    from .checkpoint import complete_tags

    cfg: RunConfig = load_config(os.path.join(run_dir, "config.yaml"))
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    tags = complete_tags(ckpt_dir)
    if tag is None:
        if not tags:
            raise FileNotFoundError(f"no complete checkpoint in {ckpt_dir}")
        tag = tags[-1]
    elif tag not in tags:
        raise FileNotFoundError(f"checkpoint {tag} is not a complete checkpoint of {ckpt_dir}; complete: {tags}")
    if which == "momentum":
        from .wenlan import key_towers_are_query

        if cfg.wenlan.mode == "in_batch" or key_towers_are_query(cfg.wenlan):
            why = "wenlan.mode=in_batch" if cfg.wenlan.mode == "in_batch" else "wenlan.momentum=0"
            raise ValueError(f"run {run_dir} was trained with {why}: it has no momentum towers to export; "
                             f"use --encoders query")
    weights = read_checkpoint_weights(ckpt_dir, tag, cfg.train.zero_stage, which)
    if which == "query":
        weights = _fill_buffers(weights, os.path.join(ckpt_dir, tag))
    model_cfg = dataclasses.replace(cfg.model, activation_checkpointing=False)
    towers = DualEncoder(model_cfg)
    missing, unexpected = towers.load_state_dict(weights, strict=False)
    missing = [m for m in missing if "num_batches_tracked" not in m]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint weights do not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    step = int(tag.split("_")[-1])
    write_export(towers, model_cfg, build_tokenizer(cfg.model.text), out_dir,
                 provenance={"run_dir": os.path.abspath(run_dir), "checkpoint": tag, "step": step,
                             "encoders": which, "zero_stage": cfg.train.zero_stage})
    return out_dir


def write_image_side(image: torch.nn.Module, model_cfg: ModelConfig, out_dir: str) -> Dict[str, Any]:
    """``image_tower.safetensors`` and ``model.yaml`` (the text side described as the ``text/`` folder of
    the export); returns the ``model.yaml`` data."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in image.state_dict().items()},
              os.path.join(out_dir, "image_tower.safetensors"))
    data = dataclasses.asdict(model_cfg)
    data["text"].update({"name_or_path": "text", "tokenizer": None, "pretrained": False, "config_overrides": {}})
    data["image"]["weights"] = None
    data["activation_checkpointing"] = False
    with open(os.path.join(out_dir, "model.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=False, allow_unicode=True)
    return data


def write_export(towers: torch.nn.Module, model_cfg: ModelConfig, tokenizer, out_dir: str,
                 provenance: Optional[Dict[str, Any]] = None) -> str:
    """The one export writer: ``towers`` (``.image`` ImageTower, ``.text`` TextTower) as an export directory
    that ``load_export`` reads back; ``model_cfg`` describes the towers; ``provenance`` goes to export.json."""
    from safetensors.torch import save_file

    from .models import TextTower

    if not isinstance(towers.text, TextTower):
        raise TypeError("write_export writes transformer text towers; GRU models are saved by save_vse_export")
    write_image_side(towers.image, model_cfg, out_dir)
    os.makedirs(os.path.join(out_dir, "text"), exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in towers.text.state_dict().items()},
              os.path.join(out_dir, "text_tower.safetensors"))
    towers.text.encoder.config.save_pretrained(os.path.join(out_dir, "text"))
    tokenizer.save_pretrained(os.path.join(out_dir, "text"))
    with open(os.path.join(out_dir, "export.json"), "w", encoding="utf-8") as f:
        json.dump(dict(provenance or {"source": "write_export"}), f, indent=1)
    return out_dir


def load_export(export_dir: str, device: str = "cpu") -> Tuple[DualEncoder, object, object]:
    """(towers in eval mode, tokenizer, eval image transform) from an export directory."""
    from safetensors.torch import load_file

    with open(os.path.join(export_dir, "model.yaml")) as f:
        data = yaml.safe_load(f)
    data["text"]["name_or_path"] = os.path.join(export_dir, data["text"]["name_or_path"])
    model_cfg: ModelConfig = _build(ModelConfig, data, "model.")
    towers = DualEncoder(model_cfg)
    towers.image.load_state_dict(load_file(os.path.join(export_dir, "image_tower.safetensors")))
    towers.text.load_state_dict(load_file(os.path.join(export_dir, "text_tower.safetensors")))
    towers.to(device).eval()
    tokenizer = build_tokenizer(model_cfg.text)
    transform = image_transform(towers.image, model_cfg.image.image_size)
    return towers, tokenizer, transform
