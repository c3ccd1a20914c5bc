"""Shared test helpers: tiny real timm checkpoints and image folders made on the fly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"

TINY_ARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
# The same tiny ViT in transformers' config terms, for models built with other libraries.
HF_TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
)


def perturb(model, seed: int = 0):
    """Move every parameter off its init (LayerNorm 1/0, layer scale 1, zero biases), so that a
    swapped or dropped tensor changes the output; returns the model in eval mode."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def save_tiny_vit(out: Path, num_classes: int = 3, seed: int = 0) -> Path:
    """A random-weight ViT saved as timm's local-dir format (config.json + model.safetensors)."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **TINY_ARGS
    )
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    config = {
        "architecture": "vit_tiny_patch16_224",
        "num_classes": num_classes,
        "model_args": dict(TINY_ARGS),
        "pretrained_cfg": {
            "input_size": [3, 32, 32],
            "mean": [0.5, 0.5, 0.5],
            "std": [0.25, 0.25, 0.25],
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "num_classes": num_classes,
        },
    }
    (out / "config.json").write_text(json.dumps(config))
    return out


def make_image_folder(root: Path, classes: int = 3, per_class: int = 4, size: int = 40) -> Path:
    """An ImageFolder of real PNG files (smooth random colour fields)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = rng.integers(0, 255, size=(4, 4, 3)).astype(np.uint8)
            img = Image.fromarray(base).resize((size, size), Image.BICUBIC)
            img.save(d / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return save_tiny_vit(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "imgs")
