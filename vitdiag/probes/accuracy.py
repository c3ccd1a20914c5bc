"""Top-1 accuracy, NLL and mean confidence: the simplest probe, the engine's end-to-end check.

With each number its 95 % interval (docs/FINDINGS.md): Wilson's for top-1, a Poisson bootstrap
for the means (B replicate sums per statistic, weights keyed by each image's global index, so
batching and processes cannot move them), and the reference top-1 is compared with: the
majority-class rate of the evaluated labels, from per-class label counts.
"""

from __future__ import annotations

from typing import Any

import torch

from vitdiag.intervals import (
    BOOTSTRAP,
    REPLICATES,
    WILSON,
    bootstrap_sums,
    interval_record,
    ratio_interval,
    reference_record,
    row_indices,
    wilson_interval,
)
from vitdiag.probes.base import EVAL, LOGITS, Probe, Taps
from vitdiag.results import Result, Table

# Columns of the replicate sums over labelled images: Σw, Σw·nll, Σw·conf, Σw·(conf − correct).
_LABELLED = ("w", "nll", "mean_confidence_labelled", "confidence_minus_accuracy")


class AccuracyProbe(Probe):
    name = "eval"
    title = "Evaluation"
    order = 1
    split = EVAL
    needs = frozenset({LOGITS})
    headlines = ("top1", "nll")
    headline_rank = 0
    check_metrics = (
        "top1",
        "nll",
        "mean_confidence",
        "n_images",
        "n_labelled",
        "majority_rate",
        "confidence_minus_accuracy",
    )

    @classmethod
    def build(cls, loaded: Any, settings: Any, transform: Any) -> AccuracyProbe:
        return cls(seed=settings.seed)

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = int(seed)
        self.add_sum_state("n")  # all images
        self.add_sum_state("conf_sum")  # Σ max softmax over all images
        self.add_sum_state("n_labelled")
        self.add_sum_state("correct")
        self.add_sum_state("nll_sum")
        self.add_sum_state("conf_labelled")  # Σ max softmax over labelled images
        # Replicate sums: (Σw, Σw·conf) over all images; _LABELLED's columns over labelled ones.
        self.add_sum_state("boot_all", (REPLICATES, 2))
        self.add_sum_state("boot_labelled", (REPLICATES, len(_LABELLED)))
        self._seen = 0  # images seen: the next position, for batches without the engine's
        # `label_counts` (C,) is created at the first batch, when C = logits.shape[1] is known.

    def update(self, taps: Taps) -> None:
        logits = taps.logits.double()
        logp = torch.log_softmax(logits, dim=1)
        index = row_indices(taps, self._seen)
        self._seen += int(index.numel())
        self.n += logits.shape[0]
        conf = logp.max(dim=1).values.exp()
        self.conf_sum += conf.sum().cpu()
        self.boot_all += bootstrap_sums(self.seed, index, conf)
        if not hasattr(self, "label_counts"):
            self.add_sum_state("label_counts", (logits.shape[1],))
        mask = taps.labelled
        if mask.any():
            y = taps.targets[mask]
            if int(y.max()) >= logits.shape[1]:
                from vitdiag.errors import VitdiagError

                raise VitdiagError(
                    f"the data has class index {int(y.max())} but the model has "
                    f"{logits.shape[1]} outputs; point --data at a dataset with the "
                    "model's classes."
                )
            lp = logp[mask]
            self.n_labelled += y.numel()
            hit = lp.argmax(dim=1) == y
            self.correct += hit.sum().double().cpu()
            nll = -lp.gather(1, y[:, None])
            self.nll_sum += nll.sum().cpu()
            # Per image, for the bootstrap: one device-to-host copy per batch.
            per_image = torch.stack([nll[:, 0], conf[mask], conf[mask] - hit.double()], 1).cpu()
            self.conf_labelled += per_image[:, 1].sum()
            self.boot_labelled += bootstrap_sums(self.seed, index, per_image, mask)
            counts = torch.bincount(y.cpu().to(torch.int64), minlength=logits.shape[1])
            self.label_counts += counts.to(torch.float64)

    def compute(self) -> Result:
        n, nl = float(self.n), float(self.n_labelled)
        metrics = {
            "n_images": n,
            "mean_confidence": float(self.conf_sum) / n if n else float("nan"),
        }
        notes = []
        if nl:
            metrics.update(
                top1=float(self.correct) / nl, nll=float(self.nll_sum) / nl, n_labelled=nl
            )
        else:
            notes.append("the data has no labels, so only the mean confidence is reported.")
        rows = [[k, v] for k, v in metrics.items()]
        intervals = {
            "mean_confidence": interval_record(
                *ratio_interval(self.boot_all[:, 1], self.boot_all[:, 0]), BOOTSTRAP
            )
        }
        references = {}
        if nl:
            # After the table's rows: the new numbers live in metrics and extra only.
            majority = float(self.label_counts.max()) / nl
            metrics["majority_rate"] = majority
            gap = (float(self.conf_labelled) - float(self.correct)) / nl
            metrics["confidence_minus_accuracy"] = gap
            intervals |= self._labelled_intervals(nl)
            references["chance"] = reference_record(
                "top1",
                majority,
                [majority, majority],
                "the top-1 of always predicting the most frequent of the evaluated labels: "
                "its count over the labelled images, exact for these labels",
            )
        extra = {"intervals": intervals, "references": references}
        return Result(
            probe="eval",
            definition="top1-nll-v1",
            metrics=metrics,
            tables=[Table("Evaluation", ["metric", "value"], rows)],
            notes=notes,
            extra=extra,
        )

    def _labelled_intervals(self, nl: float) -> dict[str, dict]:
        boot = self.boot_labelled
        out = {"top1": interval_record(*wilson_interval(float(self.correct), nl), WILSON)}
        for key in ("nll", "confidence_minus_accuracy"):
            col = _LABELLED.index(key)
            out[key] = interval_record(*ratio_interval(boot[:, col], boot[:, 0]), BOOTSTRAP)
        return out
