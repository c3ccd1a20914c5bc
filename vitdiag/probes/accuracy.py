"""Top-1 accuracy, NLL and mean confidence: the simplest probe, the engine's end-to-end check."""

from __future__ import annotations

import torch

from vitdiag.probes.base import EVAL, LOGITS, Probe, Taps
from vitdiag.results import Result, Table


class AccuracyProbe(Probe):
    name = "eval"
    title = "Evaluation"
    order = 1
    split = EVAL
    needs = frozenset({LOGITS})
    headlines = ("top1", "nll")
    headline_rank = 0
    check_metrics = ("top1", "nll", "mean_confidence", "n_images", "n_labelled")

    def __init__(self) -> None:
        super().__init__()
        self.add_sum_state("n")  # all images
        self.add_sum_state("conf_sum")  # Σ max softmax over all images
        self.add_sum_state("n_labelled")
        self.add_sum_state("correct")
        self.add_sum_state("nll_sum")

    def update(self, taps: Taps) -> None:
        logits = taps.logits.double()
        logp = torch.log_softmax(logits, dim=1)
        self.n += logits.shape[0]
        self.conf_sum += logp.max(dim=1).values.exp().sum().cpu()
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
            self.correct += (lp.argmax(dim=1) == y).sum().double().cpu()
            self.nll_sum += -lp.gather(1, y[:, None]).sum().cpu()

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
        return Result(
            probe="eval",
            definition="top1-nll-v1",
            metrics=metrics,
            tables=[Table("Evaluation", ["metric", "value"], rows)],
            notes=notes,
        )
