"""`--embedding cls` reads the class token, never a register token standing in its place."""

from __future__ import annotations

import pytest
import timm
from conftest import FIXTURES
from typer.testing import CliRunner

from vitdiag.cli import app

runner = CliRunner()
TRAIN = str(FIXTURES / "data" / "train")
TINY = ["img_size=32", "patch_size=8", "embed_dim=32", "depth=1", "num_heads=2"]
# timm's vit_base_patch16_reg4_gap_256 in small: register tokens, no class token
REGISTERS_ONLY = ["class_token=False", "reg_tokens=2", "global_pool=avg", *TINY]


@pytest.mark.parametrize(
    ("arch", "kwargs", "row"),
    [
        ("vit_tiny_patch16_224", {}, 0),
        ("vit_tiny_patch16_224", {"reg_tokens": 2}, 0),
        ("vit_tiny_patch16_224", {"reg_tokens": 2, "class_token": False, "global_pool": "avg"},
         None),
        ("deit_tiny_distilled_patch16_224", {}, 0),
        ("swin_tiny_patch4_window7_224", {"window_size": 2, "depths": [1, 1, 1, 1]}, None),
        ("resnet10t", {}, None),
    ],
)  # fmt: skip
def test_class_token_row_is_none_without_a_class_token(arch, kwargs, row):
    from vitdiag.families import class_token_row

    size = {"img_size": 64} if arch.startswith("swin") else {}
    if arch.startswith(("vit", "deit")):
        size = {"img_size": 32, "patch_size": 8, "depth": 1}
    model = timm.create_model(arch, pretrained=False, num_classes=3, **size, **kwargs)
    assert class_token_row(model) == row


@pytest.mark.parametrize("command", ["invariance", "report"])
def test_embedding_cls_without_a_class_token_is_a_one_line_error(command, tmp_path):
    args = [command, "--arch", "vit_tiny_patch16_224"]
    args += [a for kv in REGISTERS_ONLY for a in ("--model-arg", kv)]
    args += ["--data", TRAIN, "--embedding", "cls", "--limit", "4", "--batch-size", "4"]
    args += ["--views", "2", "--aug", "cutout", "--device", "cpu", "-q"]
    if command == "report":
        args += ["--probes", "invariance", "--out", str(tmp_path / "rep")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "--embedding cls" in lines[0] and "register" in lines[0]
    assert "--embedding gap" in lines[0] and "prelogits" in lines[0]


def test_embedding_cls_with_class_and_register_tokens_still_runs():
    args = ["invariance", "--arch", "vit_tiny_patch16_224", "--model-arg", "reg_tokens=2"]
    args += [a for kv in TINY for a in ("--model-arg", kv)]
    args += ["--data", TRAIN, "--embedding", "cls", "--limit", "4", "--batch-size", "4"]
    args += ["--views", "2", "--aug", "cutout", "--device", "cpu", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
