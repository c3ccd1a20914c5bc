"""The augmentation audit (SPEC §1): Mixup's factor, random erasing's modes, flags, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from vitdiag.cli import app
from vitdiag.probes.augment import (
    AugmentAuditProbe,
    AugSpec,
    audit_result,
    mixup_expected,
    patch_view,
    read_train_args,
    resolve_config,
    specs_for,
)
from vitdiag.probes.base import Taps

runner = CliRunner()


def _feed(probe: AugmentAuditProbe, images: torch.Tensor, batch: int = 64) -> None:
    for i in range(0, images.shape[0], batch):
        x = images[i : i + batch]
        probe.update(Taps(images=x, targets=torch.full((x.shape[0],), -1)))


def _noise(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _beta_g_sd(alpha: float) -> float:
    """Standard deviation of g(λ) = λ² + (1−λ)² = 1 − 2λ(1−λ) for λ ~ Beta(α, α)."""
    a = alpha
    m1 = a / (2 * (2 * a + 1))  # E[λ(1−λ)]
    m2 = (a * (a + 1)) ** 2 / ((2 * a) * (2 * a + 1) * (2 * a + 2) * (2 * a + 3))
    return 2 * math.sqrt(m2 - m1 * m1)


@pytest.mark.parametrize("alpha", [0.8, 1.0])
def test_mixup_factor_matches_beta_expectation_on_independent_images(alpha):
    n = 512
    probe = AugmentAuditProbe([AugSpec("mixup", alpha=alpha)], seed=1)
    _feed(probe, _noise(n))
    r = probe.ratios(0)
    expected = mixup_expected(alpha)
    assert expected == pytest.approx({0.8: 0.6923, 1.0: 2 / 3}[alpha], abs=1e-4)
    # per image the factor is g(λ) (plus a little pixel noise); images are independent
    se = _beta_g_sd(alpha) / math.sqrt(n)
    assert abs(r["image_global"] - expected) < 4 * se + 0.01, (r, expected, se)
    assert abs(r["image_patch"] - expected) < 4 * se + 0.01, (r, expected, se)


def test_cutmix_keeps_variance_of_independent_images():
    probe = AugmentAuditProbe([AugSpec("cutmix", alpha=1.0)], seed=2)
    _feed(probe, _noise(256))
    assert probe.ratios(0)["image_global"] == pytest.approx(1.0, abs=0.02)


def test_erasing_modes_on_unit_normal_inputs():
    specs = [AugSpec("erasing", prob=1.0, mode=m) for m in ("const", "rand", "pixel")]
    probe = AugmentAuditProbe(specs, patch=4, seed=3)
    _feed(probe, _noise(192, size=32))
    const, rand, pixel = (probe.ratios(i) for i in range(3))
    # const: zeros in ~18% of the image remove that share of the variance
    assert const["image_global"] < 0.9 and const["image_patch"] < 0.9
    # rand: one value per channel per box; inside a patch only 3 distinct values remain
    assert rand["image_patch"] < 0.95
    # pixel: fresh N(0, 1) where the data is N(0, 1): nothing changes
    assert pixel["image_global"] == pytest.approx(1.0, abs=0.02)
    assert pixel["image_patch"] == pytest.approx(1.0, abs=0.02)


def test_patch_embedding_ratio_is_measured_with_a_model():
    import timm

    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=16,
        depth=1, num_heads=2,
    ).eval()  # fmt: skip
    probe = AugmentAuditProbe([AugSpec("mixup", alpha=1.0)], patch_model=model, patch=4)
    _feed(probe, _noise(128))
    r = probe.ratios(0)
    assert 0.55 < r["x_global"] < 0.85 and 0.55 < r["x_token"] < 0.85


def test_patch_view_splits_into_non_overlapping_patches():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    p = patch_view(x, 2)
    assert p.shape == (2, 4, 12)
    assert torch.equal(p[0, 0], x[0, :, :2, :2].reshape(-1))


def test_flags_follow_the_papers_guidelines(tmp_path):
    args = tmp_path / "args.yaml"
    args.write_text("mixup: 0.8\ncutmix: 0.0\nreprob: 0.25\nremode: pixel\nmean: null\nlr: 0.1\n")
    cfg = resolve_config(read_train_args(args), remode="rand")
    assert (cfg.mixup, cfg.reprob, cfg.remode) == (0.8, 0.25, "rand")
    assert cfg.sources["reprob"] == "args.yaml" and cfg.sources["remode"] == "command line"
    assert "mean" not in cfg.sources  # null in args.yaml: the checkpoint's own is used
    specs, reference = specs_for(cfg)
    assert not reference
    assert [s.name for s in specs] == ["mixup", "erasing-rand", "erasing-const", "erasing-pixel"]

    probe = AugmentAuditProbe(specs[:1], seed=0)
    _feed(probe, _noise(16) * 0.45)  # data normalised with a mean/std that does not fit
    res = audit_result(probe, cfg, reference=False)
    assert res.metrics["flag/mixup"] == 1 and res.metrics["flag/erasing-mode"] == 1
    assert res.metrics["flag/pixel-normalisation"] == 0  # the mode is rand, not pixel

    pixel = resolve_config(reprob=0.25, remode="pixel")
    res = audit_result(probe, pixel, reference=False)
    assert res.metrics["flag/pixel-normalisation"] == 1
    assert res.metrics["flag/mixup"] == 0 and res.metrics["flag/erasing-mode"] == 0


def test_bad_train_args_are_clean_errors(tmp_path):
    from vitdiag.errors import VitdiagError

    with pytest.raises(VitdiagError, match="args.yaml"):
        read_train_args(tmp_path / "missing.yaml")
    with pytest.raises(VitdiagError, match="remode"):
        resolve_config(remode="blur")
    with pytest.raises(VitdiagError, match="probability"):
        resolve_config(reprob=2)


def test_cli_augment_end_to_end(tiny_ckpt, image_folder, tmp_path):
    args = tmp_path / "args.yaml"
    args.write_text("mixup: 0.8\ncutmix: 1.0\nreprob: 0.25\nremode: const\n")
    out = tmp_path / "a.json"
    res = runner.invoke(
        app,
        [
            "augment", "--data", str(image_folder), "--ckpt", str(tiny_ckpt),
            "--train-args", str(args), "--json", str(out), "-q",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())["results"][0]
    for table in result["tables"]:
        assert all(len(row) == len(table["columns"]) for row in table["rows"]), table["title"]
    m = result["metrics"]
    for name in ("mixup", "cutmix", "erasing-const", "erasing-rand", "erasing-pixel"):
        assert math.isfinite(m[f"ratio_image_global/{name}"])
        assert math.isfinite(m[f"ratio_x_token/{name}"])
    assert m["flag/mixup"] == 1 and m["flag/erasing-mode"] == 1
    assert all(math.isfinite(m[f"data_std/{c}"]) for c in range(3))
    assert "Guideline flags" in res.output


def test_cli_augment_without_config_measures_a_reference_set(image_folder):
    res = runner.invoke(app, ["augment", "--data", str(image_folder), "--size", "32", "-q"])
    assert res.exit_code == 0, res.output
    assert "reference set" in res.output


def test_cli_augment_reads_args_yaml_beside_the_checkpoint(image_folder, tmp_path):
    from conftest import save_tiny_vit

    ckpt = save_tiny_vit(tmp_path / "trained")
    (ckpt / "args.yaml").write_text("mixup: 0.0\ncutmix: 1.0\nreprob: 0.0\n")
    out = tmp_path / "a.json"
    res = runner.invoke(
        app,
        ["augment", "--data", str(image_folder), "--ckpt", str(ckpt), "--json", str(out), "-q"],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())["results"][0]
    assert [a["name"] for a in doc["extra"]["augmentations"]] == ["cutmix"]
    assert doc["metrics"]["flag/mixup"] == 0
    assert doc["extra"]["train_args"].endswith("args.yaml")
