"""Calibration: ECE and MCE over equal-width bins of top-label confidence, NLL, accuracy.

Bins are (lower, upper] (Guo et al. 2017 and most ECE code); a confidence of exactly 1/C or
below cannot occur for a softmax top label, so the open lower end of bin 0 loses nothing.
Every state is a float64 sum, so the probe streams and reduces across processes by addition.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from vitdiag.errors import VitdiagError
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


def bin_edges(n_bins: int = DEFAULT_BINS) -> torch.Tensor:
    return torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)


def calibration_bins(
    logits: torch.Tensor, labels: torch.Tensor, n_bins: int = DEFAULT_BINS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-bin (count, Σ confidence, Σ correct) for one batch of labelled logits."""
    logp = torch.log_softmax(logits.detach().to("cpu", torch.float64), dim=1)
    labels = labels.to("cpu", torch.int64)
    top_logp, pred = logp.max(dim=1)
    conf = top_logp.exp()
    # bucketize(right=False) gives i with edges[i-1] < conf <= edges[i]: the (lower, upper] bins.
    idx = (torch.bucketize(conf, bin_edges(n_bins), right=False) - 1).clamp_(0, n_bins - 1)
    correct = (pred == labels).to(torch.float64)
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
    check_metrics = ("ece", "mce", "nll", "accuracy", "n")

    @classmethod
    def build(cls, loaded: Any, settings: Any, transform: Any) -> CalibrationProbe:
        return cls(settings.bins)

    def __init__(self, n_bins: int = DEFAULT_BINS) -> None:
        super().__init__()
        if n_bins < 1:
            raise VitdiagError(f"--bins must be at least 1, not {n_bins}.")
        self.n_bins = int(n_bins)
        self.add_sum_state("bin_count", (n_bins,))
        self.add_sum_state("bin_conf", (n_bins,))
        self.add_sum_state("bin_correct", (n_bins,))
        self.add_sum_state("nll_sum")

    def update(self, taps: Taps) -> None:
        mask = taps.labelled
        if not bool(mask.any()):
            return
        logits = taps.logits[mask.to(taps.logits.device)]
        labels = taps.targets[mask].to("cpu", torch.int64)
        if int(labels.max()) >= logits.shape[1]:
            raise VitdiagError(
                f"the data has class index {int(labels.max())} but the model has "
                f"{logits.shape[1]} outputs; point --data at a dataset with the model's classes."
            )
        counts, conf, correct = calibration_bins(logits, labels, self.n_bins)
        self.bin_count.add_(counts)
        self.bin_conf.add_(conf)
        self.bin_correct.add_(correct)
        logp = torch.log_softmax(logits.detach().to("cpu", torch.float64), dim=1)
        self.nll_sum.add_(-logp.gather(1, labels[:, None]).sum())

    def compute(self) -> Result:
        counts, conf, correct = self.bin_count, self.bin_conf, self.bin_correct
        n = float(counts.sum())
        metrics = {
            "n": n,
            "accuracy": float(correct.sum()) / n if n else float("nan"),
            "nll": float(self.nll_sum) / n if n else float("nan"),
            "ece": ece_from_bins(counts, conf, correct),
            "mce": mce_from_bins(counts, conf, correct),
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
            {"n_bins": self.n_bins, "bins": bins},
        )
