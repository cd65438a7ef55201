"""Shared test fixtures: a tiny randomly initialised architecture and an export of it (no pretraining run
needed). The plain functions are importable (``from conftest import tiny_model_config``) for code that runs
in spawned worker processes, where pytest fixtures do not reach."""
from __future__ import annotations

import pytest
import torch

from pretrain.config import ImageTowerConfig, ModelConfig, TextTowerConfig


def tiny_model_config(image_name: str = "test_resnet", image_size: int = 32, embed_dim: int = 16) -> ModelConfig:
    """timm's ``test_resnet`` and a 1-layer MiniLM-shaped text encoder, randomly initialised."""
    return ModelConfig(
        image=ImageTowerConfig(name=image_name, image_size=image_size),
        text=TextTowerConfig(name_or_path="minilm", pretrained=False, max_length=16, config_overrides=dict(
            num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64)),
        embed_dim=embed_dim, projection_hidden=32)


def export_random_model(model_cfg: ModelConfig, out_dir: str, seed: int = 0) -> str:
    """An export of an untrained DualEncoder built from ``model_cfg``."""
    from pretrain.models import DualEncoder, build_tokenizer
    from pretrain.export import write_export

    torch.manual_seed(seed)
    towers = DualEncoder(model_cfg)
    return write_export(towers, model_cfg, build_tokenizer(model_cfg.text), out_dir,
                        provenance={"source": "export_random_model", "seed": seed})


class Payload:
    """Unpickling this calls exec(...) with code that creates ``marker``: a planted payload."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def plant_payload(path, marker) -> None:
    """A checkpoint-shaped file at ``path`` whose unpickling would create the file ``marker``."""
    torch.save({"module": {"w": torch.zeros(2)}, "payload": Payload(str(marker))}, path)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return tiny_model_config()


@pytest.fixture(scope="session")
def random_export(tmp_path_factory) -> str:
    """Path of an export of an untrained tiny model (built once per test session)."""
    return export_random_model(tiny_model_config(), str(tmp_path_factory.mktemp("export") / "export"))
