"""Calibration: ECE and MCE over equal-width bins of top-label confidence, NLL, accuracy.

Bins are (lower, upper] (Guo et al. 2017 and most ECE code); a confidence of exactly 1/C or
below cannot occur for a softmax top label, so the open lower end of bin 0 loses nothing.
Every state is a float64 sum, so the probe streams and reduces across processes by addition.

Intervals (docs/FINDINGS.md): a Poisson bootstrap of the bins (B × bins replicate sums, weights
keyed by global image index). The reference ECE is that of a perfectly calibrated model on the
same images, drawn from per-bin Σp, Σp² and n: ECE is biased upward at finite N, so a bare
threshold would flag a calibrated model evaluated on few images.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from vitdiag.errors import VitdiagError
from vitdiag.intervals import (
    BOOTSTRAP,
    REPLICATES,
    bootstrap_sums,
    interval_record,
    percentile_interval,
    reference_record,
    row_indices,
)
from vitdiag.probes.base import EVAL, LABELS, LOGITS, Probe, Taps
from vitdiag.results import Result, Table

__all__ = [
    "CalibrationProbe",
    "bin_edges",
    "calibration_bins",
    "ece_from_bins",
    "mce_from_bins",
]

DEFAULT_BINS = 15
NULL_DRAWS = 200  # R: draws of the perfectly calibrated model's ECE (SPEC §8)
_NULL_STREAM = 0xCA11B  # names the null's random stream, apart from other uses of the seed


def bin_edges(n_bins: int = DEFAULT_BINS) -> torch.Tensor:
    return torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)


def per_image_bins(
    logits: torch.Tensor, labels: torch.Tensor, n_bins: int = DEFAULT_BINS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: (bin index, top-label confidence, correct as 0/1), float64 on the CPU."""
    logp = torch.log_softmax(logits.detach().to("cpu", torch.float64), dim=1)
    labels = labels.to("cpu", torch.int64)
    top_logp, pred = logp.max(dim=1)
    conf = top_logp.exp()
    # bucketize(right=False) gives i with edges[i-1] < conf <= edges[i]: the (lower, upper] bins.
    idx = (torch.bucketize(conf, bin_edges(n_bins), right=False) - 1).clamp_(0, n_bins - 1)
    correct = (pred == labels).to(torch.float64)
    return idx, conf, correct


def calibration_bins(
    logits: torch.Tensor, labels: torch.Tensor, n_bins: int = DEFAULT_BINS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-bin (count, Σ confidence, Σ correct) for one batch of labelled logits."""
    return _bin_sums(*per_image_bins(logits, labels, n_bins), n_bins)


def _bin_sums(
    idx: torch.Tensor, conf: torch.Tensor, correct: torch.Tensor, n_bins: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.bincount(idx, minlength=n_bins).to(torch.float64),
        torch.bincount(idx, weights=conf, minlength=n_bins),
        torch.bincount(idx, weights=correct, minlength=n_bins),
    )


def ece_from_bins(
    counts: torch.Tensor, conf_sums: torch.Tensor, correct_sums: torch.Tensor
) -> float:
    """ECE = Σ_b (n_b/N) |acc_b − conf_b| = Σ_b |Σ correct − Σ conf| / N."""
    n = float(counts.sum())
    if n == 0:
        return float("nan")
    return float((correct_sums - conf_sums).abs().sum()) / n


def mce_from_bins(
    counts: torch.Tensor, conf_sums: torch.Tensor, correct_sums: torch.Tensor
) -> float:
    """MCE = max over non-empty bins of |acc_b − conf_b|."""
    used = counts > 0
    if not bool(used.any()):
        return float("nan")
    gap = (correct_sums[used] - conf_sums[used]).abs() / counts[used]
    return float(gap.max())


class CalibrationProbe(Probe):
    name = "calibration"
    title = "Calibration"
    order = 2
    split = EVAL
    needs_labels = True
    needs = frozenset({LOGITS, LABELS})
    headlines = ("ece",)
    headline_rank = 1
    check_metrics = ("ece", "mce", "nll", "accuracy", "n", "confidence_minus_accuracy")

    @classmethod
    def build(cls, loaded: Any, settings: Any, transform: Any) -> CalibrationProbe:
        return cls(settings.bins, seed=settings.seed)

    def __init__(self, n_bins: int = DEFAULT_BINS, seed: int = 0) -> None:
        super().__init__()
        if n_bins < 1:
            raise VitdiagError(f"--bins must be at least 1, not {n_bins}.")
        self.n_bins = int(n_bins)
        self.seed = int(seed)
        self.add_sum_state("bin_count", (n_bins,))
        self.add_sum_state("bin_conf", (n_bins,))
        self.add_sum_state("bin_correct", (n_bins,))
        self.add_sum_state("nll_sum")
        self.add_sum_state("bin_conf_sq", (n_bins,))  # Σp² per bin: the null's variance
        # Per replicate and bin: Σw, Σw·conf, Σw·correct (the bootstrap's bins, B × 3 × bins).
        self.add_sum_state("boot_bins", (REPLICATES, 3, n_bins))
        self._seen = 0  # rows seen: the next position, for batches without the engine's

    def update(self, taps: Taps) -> None:
        mask = taps.labelled
        index = row_indices(taps, self._seen)
        self._seen += int(index.numel())
        if not bool(mask.any()):
            return
        logits = taps.logits[mask.to(taps.logits.device)]
        labels = taps.targets[mask].to("cpu", torch.int64)
        if int(labels.max()) >= logits.shape[1]:
            raise VitdiagError(
                f"the data has class index {int(labels.max())} but the model has "
                f"{logits.shape[1]} outputs; point --data at a dataset with the model's classes."
            )
        idx, p, hit = per_image_bins(logits, labels, self.n_bins)
        counts, conf, correct = _bin_sums(idx, p, hit, self.n_bins)
        self.bin_count.add_(counts)
        self.bin_conf.add_(conf)
        self.bin_correct.add_(correct)
        logp = torch.log_softmax(logits.detach().to("cpu", torch.float64), dim=1)
        self.nll_sum.add_(-logp.gather(1, labels[:, None]).sum())
        self.bin_conf_sq.add_(torch.bincount(idx, weights=p * p, minlength=self.n_bins))
        one_hot = torch.zeros(len(idx), self.n_bins, dtype=torch.float64)
        one_hot.scatter_(1, idx[:, None], 1.0)
        columns = torch.cat([one_hot, one_hot * p[:, None], one_hot * hit[:, None]], dim=1)
        sums = bootstrap_sums(self.seed, index, columns, mask)[:, 1:]
        self.boot_bins.add_(sums.reshape(REPLICATES, 3, self.n_bins))

    def compute(self) -> Result:
        counts, conf, correct = self.bin_count, self.bin_conf, self.bin_correct
        n = float(counts.sum())
        metrics = {
            "n": n,
            "accuracy": float(correct.sum()) / n if n else float("nan"),
            "nll": float(self.nll_sum) / n if n else float("nan"),
            "ece": ece_from_bins(counts, conf, correct),
            "mce": mce_from_bins(counts, conf, correct),
            "confidence_minus_accuracy": (
                float(conf.sum() - correct.sum()) / n if n else float("nan")
            ),
        }
        notes = [] if n else ["the data has no labels, so calibration cannot be measured."]
        edges = bin_edges(self.n_bins).tolist()
        rows, bins = [], []
        for b in range(self.n_bins):
            c = float(counts[b])
            mean_conf = float(conf[b]) / c if c else math.nan
            acc = float(correct[b]) / c if c else math.nan
            bins.append(
                {
                    "lower": edges[b],
                    "upper": edges[b + 1],
                    "count": c,
                    "confidence": mean_conf,
                    "accuracy": acc,
                }
            )
            rows.append([f"({edges[b]:.3f}, {edges[b + 1]:.3f}]", int(c), mean_conf, acc])
        table = Table("Reliability", ["confidence bin", "n", "mean confidence", "accuracy"], rows)
        return Result(
            self.name,
            f"top-label-ece-{self.n_bins}-equal-width-v1",
            metrics,
            [table],
            notes,
            {
                "n_bins": self.n_bins,
                "bins": bins,
                "intervals": self._intervals(),
                "references": {"perfect_calibration": self._perfect_calibration()} if n else {},
            },
        )

    def _intervals(self) -> dict[str, dict]:
        """ECE and confidence − accuracy of each replicate's weighted bins, 2.5–97.5 %."""
        boot = self.boot_bins
        weight, conf, correct = boot[:, 0].sum(1), boot[:, 1], boot[:, 2]
        ok = weight > 0
        safe = torch.where(ok, weight, torch.ones_like(weight))
        ece = torch.where(ok, (correct - conf).abs().sum(1) / safe, math.nan)
        gap = torch.where(ok, (conf.sum(1) - correct.sum(1)) / safe, math.nan)
        return {
            "ece": interval_record(*percentile_interval(ece), BOOTSTRAP),
            "confidence_minus_accuracy": interval_record(*percentile_interval(gap), BOOTSTRAP),
        }

    def _perfect_calibration(self) -> dict:
        """ECE of a perfectly calibrated model on the same images: image i is right with
        probability p_i, so bin b's number right is Poisson-binomial with mean Σp and variance
        Σp − Σp², drawn NULL_DRAWS times from its normal approximation clipped to [0, n_b]."""
        n_b = self.bin_count.numpy()
        mean = self.bin_conf.numpy()
        sd = np.sqrt(np.clip(mean - self.bin_conf_sq.numpy(), 0.0, None))
        rng = np.random.default_rng([self.seed, _NULL_STREAM])
        right = np.clip(mean + sd * rng.standard_normal((NULL_DRAWS, self.n_bins)), 0.0, n_b)
        null = np.abs(right - mean).sum(axis=1) / n_b.sum()
        lo, q95, hi = np.percentile(null, [2.5, 95.0, 97.5])
        record = reference_record(
            "ece",
            float(null.mean()),
            [lo, hi],
            f"ECE of a perfectly calibrated model on the same {int(n_b.sum())} images and "
            f"bins: {NULL_DRAWS} draws of each bin's number right, normal approximation of "
            "its Poisson-binomial (mean Σp, variance Σp − Σp² of the top-label confidences)",
        )
        return record | {"q95": float(q95)}
