"""run_all: every pass of one variance study reads the same images as the shared native pass."""

from __future__ import annotations

import pytest
from conftest import FIXTURES

import vitdiag
from vitdiag.data import eval_transform, make_loader, open_dataset
from vitdiag.runner import run_all
from vitdiag.size_sweep import variance_study


def test_per_class_subsample_gives_the_same_shift_as_the_study_on_those_images():
    loaded = vitdiag.load(FIXTURES / "models" / "vit_nomix")
    train = str(FIXTURES / "data" / "train")
    # collapse puts the per-class subsample on the shared pass, which also gives variance r0
    found = run_all(
        loaded, train, probes="variance,collapse", sizes=[48], per_class=3, batch_size=16
    )
    variance = next(r for r in found if r.probe == "variance")
    assert found.data["data"]["n_images"] == 30

    source = open_dataset(train, seed=0)

    def batches_at(at, size):
        transform = eval_transform(at.data_config, size)
        return make_loader(source, transform, batch_size=16, per_class=3, seed=0)

    direct = variance_study(
        vitdiag.load(FIXTURES / "models" / "vit_nomix"), [32, 48], batches_at=batches_at
    )
    assert direct.n_images == 30
    assert variance.metrics["shift@48"] == pytest.approx(direct.shift((48, 48)), rel=1e-5)
