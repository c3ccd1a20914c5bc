"""The bundled fixtures are what fixtures/manifest.json says they are.

The manifest's accuracies are the reference numbers for ``vitdiag eval``; if the committed
weights, images or timm's eval pipeline drift from them, these tests say so first.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import timm.data
import torch
import torchvision
import yaml
from PIL import Image

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
VARIANTS = sorted(MANIFEST["models"])
MAX_BYTES = 15 * 1024 * 1024


def class_folders(split: str) -> list[str]:
    return sorted(p.name for p in (FIXTURES / "data" / split).iterdir() if p.is_dir())


def test_manifest_lists_three_variants():
    assert VARIANTS == ["vit_cutmix", "vit_mixup", "vit_nomix"]
    assert MANIFEST["classes"] == class_folders("train") == class_folders("val")


@pytest.mark.parametrize("split", ["train", "val"])
def test_class_folders_hold_expected_rgb_jpegs(split):
    expected = MANIFEST["dataset"]["counts"][split]
    size = MANIFEST["dataset"]["image_size"]
    assert sorted(expected) == class_folders(split)
    for cls, n in expected.items():
        files = sorted((FIXTURES / "data" / split / cls).iterdir())
        assert len(files) == n, (split, cls)
        for f in files:
            assert f.suffix == ".jpg"
            with Image.open(f) as im:
                assert im.format == "JPEG"
                assert im.mode == "RGB"
                assert im.size == (size, size)
                im.load()


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_dir_has_config_weights_and_args(variant):
    mdir = FIXTURES / "models" / variant
    cfg = json.loads((mdir / "config.json").read_text())
    n = len(MANIFEST["classes"])
    assert cfg["architecture"] == "vit_tiny_patch16_224"
    assert cfg["num_classes"] == n
    assert cfg["label_names"] == MANIFEST["classes"]
    for key in ("img_size", "patch_size", "embed_dim", "depth", "num_heads"):
        assert key in cfg["model_args"]
    pcfg = cfg["pretrained_cfg"]
    assert pcfg["input_size"] == [3, 32, 32]
    assert pcfg["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert pcfg["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert pcfg["interpolation"] == "bicubic"
    assert pcfg["crop_pct"] == 1.0
    assert pcfg["crop_mode"] == "center"
    assert pcfg["num_classes"] == n
    assert (mdir / "model.safetensors").is_file()

    args = yaml.safe_load((mdir / "args.yaml").read_text())
    train_cfg = MANIFEST["models"][variant]["train_config"]
    for key in ("mixup", "cutmix", "reprob", "remode", "epochs", "lr", "seed"):
        assert args[key] == train_cfg[key], key
    assert args["mean"] == train_cfg["mean"] and args["std"] == train_cfg["std"]
    assert args["model"] == cfg["architecture"]
    assert args["img_size"] == 32


@pytest.mark.parametrize("variant", VARIANTS)
def test_local_dir_model_reproduces_manifest_accuracy(variant):
    entry = MANIFEST["models"][variant]
    model = timm.create_model(f"local-dir:{FIXTURES / 'models' / variant}", pretrained=True)
    assert model.get_classifier().out_features == len(class_folders("val"))

    cfg = timm.data.resolve_data_config(model=model)
    assert cfg["input_size"] == (3, 32, 32)
    ds = torchvision.datasets.ImageFolder(
        str(FIXTURES / "data" / "val"), transform=timm.data.create_transform(**cfg)
    )
    loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=False)
    model.eval()
    correct, nll = 0, 0.0
    with torch.inference_mode():
        for x, y in loader:
            logits = model(x).double()
            correct += int((logits.argmax(1) == y).sum())
            nll += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
    assert len(ds) == entry["n_val"]
    # Within one image: a float tie can flip on another CPU or BLAS.
    assert abs(correct - entry["val_correct"]) <= 1
    assert abs(correct / len(ds) - entry["val_top1"]) <= 1 / len(ds) + 1e-12
    assert nll / len(ds) == pytest.approx(entry["val_nll"], rel=1e-3, abs=1e-4)


def test_at_least_one_model_reaches_85_percent():
    assert max(m["val_top1"] for m in MANIFEST["models"].values()) >= 0.85


def test_fixtures_folder_under_15_mb():
    total = sum(
        p.stat().st_size
        for p in FIXTURES.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert total < MAX_BYTES, total
