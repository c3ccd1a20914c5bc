"""Calibration: ECE/MCE/NLL against closed forms and a brute force written from the definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vitdiag.probes.base import Taps
from vitdiag.probes.calibration import (
    CalibrationProbe,
    calibration_bins,
    ece_from_bins,
    mce_from_bins,
)


def run(logits, labels, batch=None, n_bins=15):
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)
    probe = CalibrationProbe(n_bins)
    batch = batch or len(labels)
    for s in range(0, len(labels), batch):
        e = s + batch
        probe.update(
            Taps(images=torch.zeros(len(labels[s:e]), 1), targets=labels[s:e], logits=logits[s:e])
        )
    return probe.compute()


def two_class_logits(conf: np.ndarray) -> np.ndarray:
    """Logits whose softmax puts `conf` (> 0.5) on class 1."""
    return np.stack([np.zeros_like(conf), np.log(conf / (1 - conf))], axis=1)


def brute_force(logits, labels, n_bins=15):
    """From the definition, one sample at a time, in plain numpy float64."""
    n = len(labels)
    counts, conf_sum, acc_sum = np.zeros(n_bins), np.zeros(n_bins), np.zeros(n_bins)
    nll = 0.0
    for i in range(n):
        z = logits[i] - logits[i].max()
        p = np.exp(z) / np.exp(z).sum()
        nll -= math.log(p[labels[i]])
        conf = p.max()
        b = min(max(math.ceil(conf * n_bins) - 1, 0), n_bins - 1)  # (lower, upper]
        counts[b] += 1
        conf_sum[b] += conf
        acc_sum[b] += float(np.argmax(p) == labels[i])
    used = counts > 0
    gaps = np.abs(acc_sum[used] / counts[used] - conf_sum[used] / counts[used])
    return {
        "ece": float((counts[used] / n * gaps).sum()),
        "mce": float(gaps.max()),
        "nll": nll / n,
        "accuracy": acc_sum.sum() / n,
    }


def test_ece_of_a_perfectly_calibrated_model_is_within_sampling_error():
    rng = np.random.default_rng(0)
    n = 200_000
    conf = rng.uniform(0.5, 1.0, size=n)
    labels = (rng.uniform(size=n) < conf).astype(np.int64)  # class 1 is right with prob. conf
    res = run(two_class_logits(conf), labels)
    counts = np.array([b["count"] for b in res.extra["bins"]])
    # Each bin's accuracy is a mean of Bernoullis with variance <= 1/4, so |acc_b − conf_b| has
    # standard deviation <= 1/(2√n_b). Four of those in every bin bound the ECE by
    # Σ_b (n_b/N)·4/(2√n_b) = (2/N)·Σ_b √n_b ≈ 0.013 here; the expected value is ≈ 0.002.
    tol = 2 * np.sqrt(counts).sum() / n
    assert res.metrics["ece"] < tol
    assert res.metrics["ece"] < 0.01


def test_ece_of_a_known_miscalibration_is_its_closed_form():
    n = 1000
    conf = np.full(n, 0.9)
    labels = np.zeros(n, dtype=np.int64)
    labels[:600] = 1  # predicted class 1 every time; right 60% of the time
    res = run(two_class_logits(conf), labels, batch=128)
    m = res.metrics
    assert m["accuracy"] == pytest.approx(0.6, abs=1e-15)
    assert m["ece"] == pytest.approx(0.3, abs=1e-12)
    assert m["mce"] == pytest.approx(0.3, abs=1e-12)
    assert m["nll"] == pytest.approx(-(0.6 * math.log(0.9) + 0.4 * math.log(0.1)), rel=1e-12)


def test_metrics_match_a_brute_force_on_random_logits():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2000, 10)) * 3
    labels = rng.integers(0, 10, size=2000)
    res = run(logits, labels, batch=333)
    want = brute_force(logits, labels)
    for key, value in want.items():
        assert res.metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_streaming_and_unlabelled_rows():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(500, 7))
    labels = rng.integers(0, 7, size=500)
    one = run(logits, labels).metrics
    logits2 = np.concatenate([logits, rng.normal(size=(50, 7))])
    labels2 = np.concatenate([labels, -np.ones(50, dtype=np.int64)])
    many = run(logits2, labels2, batch=17).metrics
    for key in one:
        assert many[key] == pytest.approx(one[key], rel=1e-12), key


def test_confidence_one_falls_in_the_last_bin():
    counts, _, _ = calibration_bins(torch.tensor([[0.0, 100.0]]), torch.tensor([1]), 15)
    assert counts[-1] == 1 and counts.sum() == 1


def test_bins_are_sum_states_that_add_across_processes():
    rng = np.random.default_rng(3)
    logits, labels = (
        torch.from_numpy(rng.normal(size=(300, 4))),
        torch.from_numpy(rng.integers(0, 4, 300)),
    )
    halves = [CalibrationProbe(), CalibrationProbe()]
    for p, sl in zip(halves, (slice(0, 120), slice(120, 300)), strict=True):
        p.update(Taps(images=torch.zeros(1), targets=labels[sl], logits=logits[sl]))
    for k in halves[0].sum_states():
        halves[0].set_state(k, halves[0].sum_states()[k] + halves[1].sum_states()[k])
    merged, one = halves[0].compute().metrics, run(logits, labels).metrics
    for key in one:
        assert merged[key] == pytest.approx(one[key], rel=1e-12), key


def test_ece_and_mce_from_bins_closed_form():
    counts = torch.tensor([0.0, 10.0, 30.0], dtype=torch.float64)
    conf = torch.tensor([0.0, 5.0, 27.0], dtype=torch.float64)  # mean conf 0.5, 0.9
    correct = torch.tensor([0.0, 7.0, 18.0], dtype=torch.float64)  # acc 0.7, 0.6
    assert ece_from_bins(counts, conf, correct) == pytest.approx((10 * 0.2 + 30 * 0.3) / 40)
    assert mce_from_bins(counts, conf, correct) == pytest.approx(0.3)
    assert math.isnan(ece_from_bins(torch.zeros(3), torch.zeros(3), torch.zeros(3)))


def test_reliability_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from vitdiag.plots import plot_reliability

    rng = np.random.default_rng(4)
    res = run(rng.normal(size=(200, 5)) * 2, rng.integers(0, 5, 200))
    out = plot_reliability(res, tmp_path / "rel.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
