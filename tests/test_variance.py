"""The variance-shift probe (SPEC §1): streamed sums, r/shift/k̂/c, rescaled accuracy, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_posembed import save_tiny
from typer.testing import CliRunner

from vitdiag.cli import app
from vitdiag.posembed import grid_tokens, table_of, table_variance
from vitdiag.probes.variance import (
    patch_tokens,
    variance_sums,
    variances_from_sums,
)
from vitdiag.size_sweep import build_at_size, variance_study

runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("variance_models")
    return {k: save_tiny(root / k, k) for k in ("vit_reg", "pit")}


def _batches(n: int = 12, size: int = 32, seed: int = 0, batch: int = 5):
    """Labelled N(0, 1) batches at `size`, the same images (per seed) at every size."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 3, 8, 8, generator=gen)
    images = torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear")
    targets = torch.arange(n) % 3
    return [(images[i : i + batch], targets[i : i + batch]) for i in range(0, n, batch)]


def test_streamed_sums_equal_direct_variances_and_add_across_shards():
    torch.manual_seed(0)
    x = torch.randn(7, 5, 6) * 2 + 1
    direct = {
        "global": float(x.double().var(unbiased=False)),
        "per_token": float(x.double().var(dim=-1, unbiased=False).mean()),
    }
    whole = variances_from_sums(variance_sums(x))
    shards = variances_from_sums(variance_sums(x[:3]) + variance_sums(x[3:]))
    for key, value in direct.items():
        assert whole[key] == pytest.approx(value, rel=1e-12)
        assert shards[key] == pytest.approx(value, rel=1e-12)


def test_patch_tokens_of_channels_first_pit_are_grid_tokens():
    import timm
    from test_posembed import TINY

    arch, args = TINY["pit"]
    m = timm.create_model(arch, pretrained=False, num_classes=3, **args).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        tokens = patch_tokens(m, x)
        raw = m.patch_embed(x)  # (B, D, H, W)
    assert tokens.shape == (2, raw.shape[2] * raw.shape[3], raw.shape[1])
    assert torch.equal(tokens, raw.flatten(2).transpose(1, 2))


def test_study_numbers_agree_with_direct_computation(models):
    from vitdiag.model import load

    loaded = load(str(models["vit_reg"]))
    study = variance_study(
        loaded,
        [48],
        batches_at=lambda at, size: _batches(size=size[0]),
        rescales=("none", "sqrt-axis", "sqrt-area", "empirical"),
    )
    assert study.n_images == 12 and study.labelled
    # Var X at 48 by hand: patch_embed of every image, grid tokens only
    at48 = build_at_size(loaded, 48)
    with torch.inference_mode():
        x = torch.cat([patch_tokens(at48.model, im) for im, _ in _batches(size=48)])
    for key, value in variances_from_sums(variance_sums(x)).items():
        assert study.readings[(48, 48)].var_x[key] == pytest.approx(value, rel=1e-9)
    vp = table_variance(grid_tokens(table_of(at48.model), layout="nlc", prefix_rows=3))
    assert study.readings[(48, 48)].var_p["bicubic"] == pytest.approx(vp, rel=1e-12)

    res = study.result()
    m = res.metrics
    assert m["shift@32"] == 1.0 and m["khat@32"] == 1.0
    r, r0 = m["r@48"], m["r0"]
    assert r == pytest.approx(study.readings[(48, 48)].var_x["per_token"] / vp["per_token"])
    assert m["shift@48"] == pytest.approx(r / r0)
    assert m["khat@48"] == pytest.approx(r0 / r)
    assert m["c@48"] == pytest.approx(1 / math.sqrt(r0 / r))
    assert m["c@48/sqrt-axis"] == pytest.approx(1 / math.sqrt(1.5))
    assert m["c@48/sqrt-area"] == pytest.approx(32 / 48)
    assert m["c@48/empirical"] == pytest.approx(m["c@48"])

    # Accuracy under each rescale equals a model built with that factor and run directly.
    for name in ("none", "sqrt-area", "empirical"):
        model = build_at_size(loaded, 48, c=m[f"c@48/{name}"]).model.eval()
        correct = nll = 0.0
        with torch.inference_mode():
            for im, y in _batches(size=48):
                logp = torch.log_softmax(model(im).double(), 1)
                correct += float((logp.argmax(1) == y).sum())
                nll -= float(logp.gather(1, y[:, None]).sum())
        assert m[f"top1@48/{name}"] == pytest.approx(correct / 12)
        assert m[f"nll@48/{name}"] == pytest.approx(nll / 12, rel=1e-6)
    # the study leaves the caller's model alone
    assert torch.equal(table_of(loaded.model), table_of(load(str(models["vit_reg"])).model))


def test_data_free_study_of_channels_first_table(models):
    from vitdiag.model import load

    study = variance_study(
        load(str(models["pit"])), [48, 64], interpolations=("bicubic", "nearest")
    )
    res = study.result()
    assert not study.has_data
    assert res.metrics["var_p@32/bicubic"] == res.metrics["var_p@32/nearest"]
    # a N(0, 1) table: bicubic lowers its variance, nearest keeps it
    assert res.metrics["var_p@64/bicubic"] < 0.9 * res.metrics["var_p@32/bicubic"]
    assert res.metrics["var_p@64/nearest"] == pytest.approx(res.metrics["var_p@32/nearest"], 0.1)
    assert not any(k.startswith(("shift", "top1")) for k in res.metrics)


def test_cli_variance_end_to_end(models, image_folder, tmp_path):
    out = tmp_path / "v.json"
    res = runner.invoke(
        app,
        [
            "variance", str(models["vit_reg"]), "--sizes", "48,64", "--data", str(image_folder),
            "--interpolation", "bicubic,bilinear", "--json", str(out), "-q",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    m = doc["results"][0]["metrics"]
    for s in (48, 64):
        for key in (f"shift@{s}", f"khat@{s}", f"c@{s}", f"shift_global@{s}", f"r@{s}"):
            assert math.isfinite(m[key]), key
        for name in ("none", "sqrt-axis", "sqrt-area", "empirical"):
            assert 0 <= m[f"top1@{s}/{name}"] <= 1
        assert f"shift@{s}/bilinear" in m
    assert doc["data"]["n_images"] == 12
    for table in doc["results"][0]["tables"]:
        assert all(len(row) == len(table["columns"]) for row in table["rows"]), table["title"]
    assert "Variance shift" in res.output


def test_cli_variance_without_data_says_what_needs_data(models):
    res = runner.invoke(app, ["variance", str(models["vit_reg"]), "--sizes", "64", "-q"])
    assert res.exit_code == 0, res.output
    assert "--data" in res.output and "Position table variance" in res.output


def _one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_cli_variance_bad_size_names_valid_sizes(models):
    err = _one_line_error(runner.invoke(app, ["variance", str(models["vit_reg"]), "--sizes", "50"]))
    assert "48" in err and "56" in err


def test_cli_variance_family_without_table_exits_2_with_one_sentence():
    res = runner.invoke(app, ["variance", "--arch", "resnet18", "--sizes", "256"])
    err = _one_line_error(res)
    assert "does not apply" in err and "CNN" in err


def test_relative_bias_family_is_refused_plainly():
    import timm

    from vitdiag.errors import VitdiagError
    from vitdiag.posembed import require_abs_pos

    beit = timm.create_model(
        "beit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
        depth=1, num_heads=2,
    )  # fmt: skip
    with pytest.raises(VitdiagError, match="relative biases"):
        require_abs_pos(beit)
