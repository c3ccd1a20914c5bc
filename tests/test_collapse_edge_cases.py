"""Collapse and mixup geometry at the edges: train-mode side effects, one class, degenerate
geometry (coinciding class means, a zero classifier, zero variance) and large offsets."""

from __future__ import annotations

import math

import torch

from vitdiag.engine import RunContext, run_probes
from vitdiag.probes.base import Taps
from vitdiag.probes.collapse import CollapseProbe
from vitdiag.probes.mixup_geometry import MixupGeometryProbe

# -- train-mode mixup geometry leaves the model as it found it ------------------------------


def _resnet():
    from vitdiag.model import load

    torch.manual_seed(0)
    return load(None, arch="resnet10t", model_args={"num_classes": 4}).model.eval()


def _batches(n=32, size=64, batch=8, classes=4):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, size, size, generator=g)
    labels = torch.arange(n) % classes
    return [(images[s : s + batch], labels[s : s + batch]) for s in range(0, n, batch)]


def test_train_mode_mixup_forward_restores_buffers_and_every_training_flag():
    model = _resnet()
    model.fc.train()  # a submodule left in train mode on purpose: its flag must survive too
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    flags = {k: m.training for k, m in model.named_modules()}
    probe = MixupGeometryProbe.for_model(model, pairs=2, plot_pairs=1, seed=0, train_mode=True)
    ctx = RunContext(model, torch.device("cpu"))
    images, labels = _batches()[0]
    probe.update(Taps(images=images, targets=labels, context=ctx))
    assert probe.compute().metrics["pairs_diff"] == 2  # the train-mode forwards did run
    for name, before in buffers.items():
        assert torch.equal(dict(model.named_buffers())[name], before), name
    assert {k: m.training for k, m in model.named_modules()} == flags


def test_train_mode_mixup_geometry_does_not_change_collapse_in_the_same_pass():
    model = _resnet()
    plain = run_probes(model, _batches(), [CollapseProbe.for_model(model, seed=0)])
    both = run_probes(
        model,
        _batches(),
        [
            CollapseProbe.for_model(model, seed=0),
            MixupGeometryProbe.for_model(model, pairs=4, plot_pairs=1, seed=0, train_mode=True),
        ],
    )
    want, got = plain.results[0].metrics, both.results[0].metrics
    assert math.isfinite(want["nc1"])
    assert got["nc1"] == want["nc1"]
    assert got["nc4"] == want["nc4"]
