"""`WandbWriter`: a Tracker or `vitdiag trend` writer that logs to Weights & Biases.

    tracker = Tracker(model, "data/train", writer=WandbWriter(project="vit", mode="offline"))

Metric names are vitdiag's own (`tracker.finite_metrics`: ``<probe>.<metric>``; W&B keeps the
dot in the key); None and non-finite values are not logged (not measured).
"""

from __future__ import annotations

import os
from typing import Any

from vitdiag.errors import VitdiagError
from vitdiag.tracker import finite_metrics

DEFAULT_PROJECT = "vitdiag"


class WandbWriter:
    """`writer(step, metrics)` logging to a W&B run.

    run: a run from `wandb.init()` to log into, left open on close(); None starts one of its
        own (`project`, `mode` "online"/"offline"/"disabled" or None for W&B's default and
        WANDB_MODE, `dir`, `name`), finished by close(). W&B wants steps that only grow.
    """

    def __init__(
        self,
        run: Any = None,
        *,
        project: str = DEFAULT_PROJECT,
        mode: str | None = None,
        dir: str | None = None,
        name: str | None = None,
    ) -> None:
        self._own = run is None
        if run is None:
            try:
                import wandb
            except ImportError:
                raise VitdiagError(
                    "WandbWriter needs the wandb package; install vitdiag[wandb]."
                ) from None
            # W&B reads WANDB_DIR once per process; read it per run so each run goes where asked
            where = dir if dir is not None else os.environ.get("WANDB_DIR")
            run = wandb.init(project=project, mode=mode, dir=where, name=name, reinit="create_new")
        self.run = run

    def __call__(self, step: int, metrics: dict[str, Any]) -> None:
        values = finite_metrics(metrics)
        if values:
            self.run.log(values, step=int(step))

    def close(self) -> None:
        """Finish the run when this writer started it."""
        if self._own:
            self.run.finish()
            self._own = False
