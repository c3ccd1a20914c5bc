"""Every family through the CLI with random weights: similarity, classifier geometry, variance."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from vitdiag.cli import app

runner = CliRunner()

# (arch, --model-arg values, has an absolute position table)
FAMILIES = [
    ("vit_tiny_patch16_224", ["img_size=32", "patch_size=8", "depth=2"], True),
    ("deit_tiny_distilled_patch16_224", ["img_size=32", "patch_size=8", "depth=2"], True),
    ("deit3_small_patch16_224", ["img_size=32", "patch_size=8", "depth=2"], True),
    ("eva02_tiny_patch14_224", ["img_size=28", "depth=2"], True),
    ("flexivit_small", ["img_size=32", "patch_size=8", "depth=2"], True),
    ("cait_xxs24_224", ["img_size=32", "patch_size=8", "depth=2"], True),
    ("pit_ti_224", ["img_size=64"], True),
    (
        "beit_base_patch16_224",
        ["img_size=32", "patch_size=8", "depth=2", "embed_dim=64", "num_heads=2"],
        False,
    ),
    ("swin_tiny_patch4_window7_224", ["img_size=64", "window_size=2", "depths=[1,1,1,1]"], False),
    ("xcit_nano_12_p16_224", ["img_size=32", "depth=2"], False),
    ("resnet18", ["num_classes=5"], False),
]


# Sizes each grid can take: the native size and one larger.
VARIANCE_SIZES = {"pit_ti_224": "64", "eva02_tiny_patch14_224": "28,42"}


def _args(model_args):
    out = []
    for a in model_args:
        out += ["--model-arg", a]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch,model_args,abs_pos", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_every_family_runs_similarity_collapse_and_variance(arch, model_args, abs_pos, tmp_path):
    common = ["--arch", arch, *_args(model_args)]
    out = tmp_path / "sim.json"
    res = runner.invoke(
        app, ["similarity", *common, "--data", "synthetic:2", "--json", str(out), "-q"]
    )
    assert res.exit_code == 0, res.output
    sim = json.loads(out.read_text())["results"][0]
    assert len(sim["extra"]["layers"]) >= 3
    finite = [v for v in sim["extra"]["mean"] if v is not None and math.isfinite(v)]
    assert finite and all(0.0 <= v <= 1.0 + 1e-9 for v in finite)

    out = tmp_path / "cls.json"
    res = runner.invoke(app, ["collapse", *common, "--json", str(out)])
    assert res.exit_code == 0, res.output
    geo = json.loads(out.read_text())["results"][0]["metrics"]
    assert math.isfinite(geo["w_norm_cov"]) and -1.0 <= geo["w_cos_mean"] <= 1.0

    res = runner.invoke(app, ["variance", *common, "--sizes", VARIANCE_SIZES.get(arch, "32,48")])
    if abs_pos:
        assert res.exit_code == 0, res.output
    else:
        assert res.exit_code == 2, res.output
        assert len(res.stderr.strip().splitlines()) == 1
