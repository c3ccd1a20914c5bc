"""Invariants every probe must keep, checked on random inputs through update()/compute().

- How the images are split into batches does not matter (the engine's batch size is a knob,
  not part of any definition), nor does their order.
- P(h) and every cosine statistic are unchanged when the features are scaled by c > 0.
- Neural-collapse statistics do not depend on which integer names which class, as long as the
  targets, the rows of W and b, and the logits' columns are renamed together.

Tolerances: 1e-9 relative where the probe works in float64 throughout (accuracy, calibration,
collapse, variance, and similarity on float64 tokens); float32 tokens go through a float32 Gram
on some devices, so there P(h) and the cosines get 1e-6 absolute and the effective rank 1e-5
relative.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vitdiag.engine import RunContext
from vitdiag.probes.accuracy import AccuracyProbe
from vitdiag.probes.base import Probe, Taps
from vitdiag.probes.calibration import CalibrationProbe
from vitdiag.probes.classifier import Head, classifier_stats
from vitdiag.probes.collapse import CollapseProbe
from vitdiag.probes.similarity import SimilarityProbe
from vitdiag.probes.variance import RescaleGroup, VarianceShiftProbe

FAST = settings(max_examples=25, deadline=None)
REL64 = 1e-9

seeds = st.integers(0, 2**31 - 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@st.composite
def sizes_and_cuts(draw: Any, low: int = 2, high: int = 24) -> tuple[int, list[int]]:
    """An image count and the batch boundaries of one arbitrary split of it."""
    n = draw(st.integers(low, high))
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=n - 1)))
    return n, [0, *cuts, n]


def _batches(tensors: dict[str, torch.Tensor], bounds: list[int]) -> list[dict[str, Any]]:
    out = []
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        out.append({k: v[s:e] for k, v in tensors.items()})
    return out


def _run(probe: Probe, batches: list[dict[str, Any]], **common: Any) -> Any:
    for fields in batches:
        fields = dict(fields)
        images = fields.pop("images", torch.zeros(len(fields["targets"]), 1))
        probe.update(Taps(images=images, **fields, **common))
    return probe.compute()


def assert_close(a: dict[str, float], b: dict[str, float], rel: float, abs_: float = 0.0) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k in a:
        x, y = float(a[k]), float(b[k])
        if math.isnan(x) or math.isnan(y):
            assert math.isnan(x) and math.isnan(y), (k, x, y)
            continue
        assert math.isclose(x, y, rel_tol=rel, abs_tol=abs_), (k, x, y, abs(x - y))


def _targets(g: torch.Generator, n: int, classes: int, unlabelled: bool = True) -> torch.Tensor:
    y = torch.randint(0, classes, (n,), generator=g)
    if unlabelled:
        y = torch.where(torch.rand(n, generator=g) < 0.15, -1, y)
    return y


# -- accuracy and calibration ----------------------------------------------------------------


def _logit_data(seed: int, n: int, classes: int = 4) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    return {
        "logits": torch.randn(n, classes, generator=g) * 3,
        "targets": _targets(g, n, classes),
    }


def _classification_metrics(data: dict[str, torch.Tensor], bounds: list[int]) -> dict:
    acc = _run(AccuracyProbe(), _batches(data, bounds))
    cal = _run(CalibrationProbe(7), _batches(data, bounds))  # it skips unlabelled images
    bins = {f"bin{i}.{k}": b[k] for i, b in enumerate(cal.extra["bins"]) for k in b}
    return acc.metrics | {f"cal.{k}": v for k, v in cal.metrics.items()} | bins


@FAST
@given(seed=seeds, split=sizes_and_cuts())
def test_accuracy_and_calibration_ignore_batching_and_order(seed: int, split: tuple) -> None:
    n, bounds = split
    data = _logit_data(seed, n)
    whole = _classification_metrics(data, [0, n])
    assert_close(_classification_metrics(data, bounds), whole, REL64, 1e-15)
    perm = torch.randperm(n, generator=_gen(seed + 1))
    permuted = {k: v[perm] for k, v in data.items()}
    assert_close(_classification_metrics(permuted, bounds), whole, REL64, 1e-15)


# -- neural collapse and the classifier ------------------------------------------------------


def _collapse_data(seed: int, n: int, classes: int, dim: int) -> dict[str, torch.Tensor]:
    """Class means well apart (scale 3) around an offset, unit noise, a random classifier whose
    bias undoes the offset so that predictions vary."""
    g = _gen(seed)
    y = _targets(g, n, classes)
    means = torch.randn(classes, dim, generator=g, dtype=torch.float64) * 3 + 5
    h = means[y.clamp_min(0)] + torch.randn(n, dim, generator=g, dtype=torch.float64)
    W = torch.randn(classes, dim, generator=g, dtype=torch.float64)
    b = torch.randn(classes, generator=g, dtype=torch.float64) - W @ means.mean(0)
    return {"prelogits": h, "targets": y, "logits": h @ W.T + b, "W": W, "b": b}


def _collapse_metrics(data: dict[str, torch.Tensor], bounds: list[int]) -> dict[str, float]:
    head = Head("head", data["W"], data["b"])
    per_image = {k: data[k] for k in ("prelogits", "targets", "logits")}
    probe = CollapseProbe([head], seed=0)  # budget 10 000 > n: NC4 is exact, not sampled
    return _run(probe, _batches(per_image, bounds)).metrics


collapse_shapes = st.tuples(st.integers(2, 5), st.integers(2, 7))  # classes, dim


@FAST
@given(seed=seeds, split=sizes_and_cuts(low=6, high=30), shape=collapse_shapes)
def test_collapse_ignores_batching_and_order(seed: int, split: tuple, shape: tuple) -> None:
    n, bounds = split
    data = _collapse_data(seed, n, *shape)
    whole = _collapse_metrics(data, [0, n])
    assert_close(_collapse_metrics(data, bounds), whole, REL64, 1e-12)
    perm = torch.randperm(n, generator=_gen(seed + 1))
    permuted = dict(data) | {k: data[k][perm] for k in ("prelogits", "targets", "logits")}
    assert_close(_collapse_metrics(permuted, bounds), whole, REL64, 1e-12)


def _relabel(data: dict[str, torch.Tensor], perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """Class c becomes class perm[c]: targets mapped, W/b rows and logit columns moved there."""
    inverse = torch.argsort(perm)
    y = data["targets"]
    return dict(data) | {
        "targets": torch.where(y >= 0, perm[y.clamp_min(0)], y),
        "W": data["W"][inverse],
        "b": data["b"][inverse],
        "logits": data["logits"][:, inverse],
    }


@FAST
@given(seed=seeds, n=st.integers(6, 30), shape=collapse_shapes)
def test_collapse_and_classifier_stats_ignore_class_names(seed: int, n: int, shape: tuple) -> None:
    data = _collapse_data(seed, n, *shape)
    perm = torch.randperm(shape[0], generator=_gen(seed + 1))
    renamed = _relabel(data, perm)
    # The renaming is consistent: the classifier's decision for every image moves with it.
    assert torch.equal(renamed["logits"].argmax(1), perm[data["logits"].argmax(1)]), (
        "test setup: logits were not relabelled consistently"
    )
    assert_close(_collapse_metrics(renamed, [0, n]), _collapse_metrics(data, [0, n]), REL64, 1e-12)
    assert_close(
        classifier_stats(renamed["W"], renamed["b"]),
        classifier_stats(data["W"], data["b"]),
        REL64,
        1e-12,
    )


# -- similarity ------------------------------------------------------------------------------


def _layers(seed: int, n_images: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Three layers of different shapes: n < D, n > D (the blocked path), and an offset that
    makes the cosines large and one-signed."""
    g = _gen(seed)
    return {
        "embed": torch.randn(n_images, 5, 9, generator=g, dtype=dtype),
        "block": torch.randn(n_images, 11, 4, generator=g, dtype=dtype) + 0.7,
        "norm": torch.randn(n_images, 7, 7, generator=g, dtype=dtype) * 2 - 1.5,
    }


_SIM_KEYS = ("mean", "std", "signed", "erank", "erank_std")


def _similarity(
    layers: dict[str, torch.Tensor], bounds: list[int], indices: torch.Tensor | None = None
) -> dict[str, float]:
    """The effective rank is measured on the images whose global index is even (erank_every=2,
    so the sample spans batches); a reordered stream must carry its images' indices along."""
    n = len(next(iter(layers.values())))
    batches = [
        {"layers": b, "targets": torch.full((len(next(iter(b.values()))),), -1)}
        for b in _batches(layers, bounds)
    ]
    if indices is not None:
        for batch, cut in zip(batches, _batches({"i": indices}, bounds), strict=True):
            batch["indices"] = cut["i"]
    res = _run(SimilarityProbe(erank_every=2), batches)
    assert res.extra["n_images"] == n
    return {f"{k}.{i}": v for k in _SIM_KEYS for i, v in enumerate(res.extra[k])}


def _check_similarity(a: dict, b: dict, dtype: torch.dtype) -> None:
    if dtype == torch.float64:
        # The streamed std is √(E[x²] − E[x]²): for an effective rank of ~4 whose std over a
        # sample of two images is ~1e-3, cancellation leaves ~eps·mean²/std ≈ 3e-12 absolute.
        std = {k for k in a if k.startswith("erank_std")}
        assert_close(
            {k: a[k] for k in a.keys() - std}, {k: b[k] for k in b.keys() - std}, REL64, 1e-12
        )
        assert_close({k: a[k] for k in std}, {k: b[k] for k in std}, REL64, 1e-10)
        return
    for k in a:
        if k.startswith("erank"):
            assert_close({k: a[k]}, {k: b[k]}, 1e-5, 1e-6)
        else:
            assert_close({k: a[k]}, {k: b[k]}, 0.0, 1e-6)


dtypes = st.sampled_from([torch.float32, torch.float64])


@FAST
@given(seed=seeds, split=sizes_and_cuts(high=12), dtype=dtypes)
def test_similarity_ignores_batching_and_order(seed: int, split: tuple, dtype: torch.dtype) -> None:
    n, bounds = split
    layers = _layers(seed, n, dtype)
    whole = _similarity(layers, [0, n])
    _check_similarity(_similarity(layers, bounds), whole, dtype)
    perm = torch.randperm(n, generator=_gen(seed + 1))
    permuted = {k: v[perm] for k, v in layers.items()}
    _check_similarity(_similarity(permuted, bounds, indices=perm), whole, dtype)


@FAST
@given(seed=seeds, n=st.integers(1, 6), log_c=st.floats(-6.0, 6.0), dtype=dtypes)
def test_similarity_is_unchanged_by_positive_scaling(
    seed: int, n: int, log_c: float, dtype: torch.dtype
) -> None:
    layers = _layers(seed, n, dtype)
    scaled = {k: v * math.exp(log_c) for k, v in layers.items()}
    # Effective rank is scale-free too: it normalises the singular values.
    _check_similarity(_similarity(scaled, [0, n]), _similarity(layers, [0, n]), dtype)


# -- variance at the native size --------------------------------------------------------------


@cache
def _tiny_context() -> RunContext:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=16, patch_size=8
    ).eval()
    return RunContext(model=model, device=torch.device("cpu"))


def _variance(data: dict[str, torch.Tensor], bounds: list[int]) -> dict[str, float]:
    probe = VarianceShiftProbe([RescaleGroup(["none"], 1.0)])
    return _run(probe, _batches(data, bounds), context=_tiny_context()).metrics


@FAST
@given(seed=seeds, split=sizes_and_cuts(high=10))
def test_variance_ignores_batching_and_order(seed: int, split: tuple) -> None:
    n, bounds = split
    g = _gen(seed)
    data = {
        "images": torch.randn(n, 3, 16, 16, generator=g),
        "logits": torch.randn(n, 3, generator=g),
        "targets": _targets(g, n, 3),
    }
    whole = _variance(data, [0, n])
    assert_close(_variance(data, bounds), whole, REL64, 1e-15)
    perm = torch.randperm(n, generator=_gen(seed + 1))
    assert_close(_variance({k: v[perm] for k, v in data.items()}, bounds), whole, REL64, 1e-15)


def test_assert_close_fails_on_a_real_difference() -> None:
    # The helper every property above relies on must not pass everything.
    try:
        assert_close({"x": 1.0}, {"x": 1.0 + 1e-6}, REL64)
    except AssertionError:
        return
    raise AssertionError("assert_close accepted a 1e-6 relative difference")
