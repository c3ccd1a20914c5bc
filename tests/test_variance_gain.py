"""The paired gain of a position-table rescale over none (FINDINGS.md, `gain@SIZE/RESCALE`):
replicate-wise Poisson bootstrap against a brute-force computation, batch-size invariance, a
planted positive and the negatives that are 0 by construction."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vitdiag.intervals import REPLICATES, poisson_weights
from vitdiag.model import load
from vitdiag.size_sweep import build_at_size, variance_study

N, SEED = 60, 5
RESCALES = ("none", "sqrt-axis", "sqrt-area", "empirical")


def _images(size: int) -> torch.Tensor:
    """The same N(0, 1) images (smooth, so resizing keeps them alike) at every size."""
    base = torch.randn(N, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear")


def _predict(loaded, size: int, c: float) -> torch.Tensor:
    model = build_at_size(loaded, size, c=c).model.eval()
    with torch.inference_mode():
        return model(_images(size)).argmax(1)


def _save_tiny(out):
    """A random tiny ViT whose predictions depend on the table's scale: an N(0, 1) table, two
    blocks and average pooling (with one block, or the class token, every image of these gets
    the same class whatever the table), and an N(0, 1) head so that classes differ at all."""
    import timm
    from safetensors.torch import save_file

    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, global_pool="avg")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, **args)
    with torch.no_grad():
        model.pos_embed.normal_()
        model.head.weight.normal_()
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    cfg = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 1.0}
    config = {"architecture": "vit_tiny_patch16_224", "num_classes": 3, "model_args": args}
    config["pretrained_cfg"] = {**cfg, "interpolation": "bicubic", "num_classes": 3}
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The tiny ViT and labels planted so that sqrt-area at 48 is right on every labelled
    image: they are its own predictions, which differ from no rescale's on several images. Every
    fifth image has no label, so the bootstrap must weight the labelled ones only."""
    path = _save_tiny(tmp_path_factory.mktemp("gain") / "vit")
    targets = _predict(load(str(path)), 48, 32 / 48).clone()
    targets[::5] = -1
    return path, targets


def _study(planted, batch: int):
    path, targets = planted

    def batches_at(at, size):
        images = _images(size[0])
        return [(images[i : i + batch], targets[i : i + batch]) for i in range(0, N, batch)]

    return variance_study(
        load(str(path)), [48], batches_at=batches_at, rescales=RESCALES, seed=SEED
    )


@pytest.fixture(scope="module")
def studies(planted):
    return {batch: _study(planted, batch) for batch in (3, 7)}


def test_replicate_sums_equal_brute_force(planted, studies):
    path, targets = planted
    study = studies[3]
    m = study.result().metrics
    labelled = targets >= 0
    y = targets[labelled]
    # global index = stream position (the batches carry no source indices)
    w = poisson_weights(SEED, torch.arange(N)[labelled]).numpy()
    assert w.shape == (int(labelled.sum()), REPLICATES)
    loaded = load(str(path))
    right = {
        name: (_predict(loaded, 48, m[f"c@48/{name}"])[labelled] == y).numpy().astype(float)
        for name in RESCALES
    }
    boot = study.readings[(48, 48)].bootstrap
    ratio = {}
    for name in RESCALES:
        num = np.array([(w[:, r] * right[name]).sum() for r in range(REPLICATES)])
        den = np.array([w[:, r].sum() for r in range(REPLICATES)])
        np.testing.assert_allclose(boot[name]["correct"].numpy(), num, rtol=0, atol=1e-12)
        np.testing.assert_allclose(boot[name]["weight"].numpy(), den, rtol=0, atol=1e-12)
        ratio[name] = num / den
    res = study.result()
    for name in ("sqrt-axis", "sqrt-area", "empirical"):
        key = f"gain@48/{name}"
        gain = np.array([ratio[name][r] - ratio["none"][r] for r in range(REPLICATES)])
        lo, hi = np.percentile(gain, [2.5, 97.5])
        record = res.extra["intervals"][key]
        assert record["lo"] == pytest.approx(lo, abs=1e-12)
        assert record["hi"] == pytest.approx(hi, abs=1e-12)
        assert record["method"] == "poisson-bootstrap-200 (paired)" and record["level"] == 0.95
        point = right[name].mean() - right["none"].mean()
        assert res.metrics[key] == pytest.approx(point, abs=1e-12)
    # McNemar's discordant counts, streamed where both forwards see the same batch
    for name in ("sqrt-axis", "sqrt-area"):
        r, n = right[name].astype(bool), right["none"].astype(bool)
        assert res.extra["mcnemar"][f"gain@48/{name}"] == {
            "right_with_rescale_only": int((r & ~n).sum()),
            "right_without_only": int((~r & n).sum()),
        }
    assert "gain@48/empirical" not in res.extra["mcnemar"]  # pass B has no partner forward
    ref = res.extra["references"]["none@48"]
    none_lo, none_hi = np.percentile(ratio["none"], [2.5, 97.5])
    assert ref["metric"] == "top1@48/none" and ref["value"] == res.metrics["top1@48/none"]
    assert ref["interval"] == pytest.approx([none_lo, none_hi], abs=1e-12)


def test_interval_does_not_depend_on_the_batch_size(studies):
    a, b = (studies[k].result() for k in (3, 7))
    # counts of the same images, weighted by integers: equal, not just close
    assert a.extra["intervals"] == b.extra["intervals"]
    assert a.extra["references"] == b.extra["references"]
    assert {k: v for k, v in a.metrics.items() if k.startswith("gain@")} == {
        k: v for k, v in b.metrics.items() if k.startswith("gain@")
    }


def test_planted_gain_excludes_zero_and_negatives_are_exactly_zero(studies):
    study = studies[7]
    res = study.result()
    m = res.metrics
    assert m["top1@48/sqrt-area"] == 1.0
    assert m["top1@48/none"] <= 1.0 - 5 / 48  # the plant differs on several images
    assert res.extra["intervals"]["gain@48/sqrt-area"]["lo"] > 0
    # no rescale against itself, and every rescale at the native size (c = 1, one forward)
    for size, name in [((48, 48), "none"), *(((32, 32), n) for n in RESCALES)]:
        point, lo, hi, replicates = study.gain(size, name)
        assert (point, lo, hi) == (0.0, 0.0, 0.0) and not replicates.any()
    # the native size gets no gain metrics, and `none` is the reference, not a gain
    assert not [k for k in m if k.startswith(("gain@32", "gain@48/none"))]
    assert set(res.extra["intervals"]) == {f"gain@48/{n}" for n in RESCALES[1:]}
