"""`VitdiagCallback`: vitdiag's probes at the end of every N-th training epoch of a Lightning fit.

    trainer = lightning.pytorch.Trainer(
        max_epochs=10, logger=CSVLogger("runs"),
        callbacks=[VitdiagCallback(probes=["eval", "collapse"], data="data/train", val="data/val",
                                   limit=200)],
    )

It is a thin shell over `vitdiag.Tracker`, so the numbers are the ones `vitdiag report` gives
on a checkpoint saved at that point, and measuring changes nothing about training (the weights
and every global random state after the fit are bit-identical to a fit without it). Under DDP
every rank measures its shard, the sums are all-reduced and rank 0 logs through every logger
of the trainer as `<probe>.<metric>` at `trainer.global_step`.

Lightning is imported when this module is, never by `import vitdiag` (extra
`vitdiag[lightning]`).
"""

from __future__ import annotations

from typing import Any

import torch

from vitdiag.engine import unchanged
from vitdiag.errors import VitdiagError
from vitdiag.families import family_of
from vitdiag.tracker import DEFAULT_PROBES, Tracker, finite_metrics

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - exercised only where the extra is absent
    raise VitdiagError(
        "vitdiag.integrations.lightning needs Lightning; install vitdiag[lightning]."
    ) from None


class VitdiagCallback(Callback):
    """Run vitdiag's probes on the model being fitted every `every_n_epochs` training epochs.

    probes, data, val, limit and `**options` (data_config, device, batch_size, per_class, seed,
    log_dir, writer, ... : every keyword of `vitdiag.Tracker`) are the Tracker's.
    model_attr: the attribute of the LightningModule holding the network to measure; by
        default the LightningModule itself when vitdiag knows its class, else its one child
        module that vitdiag knows (e.g. a timm ViT stored as `self.model`).
    After each measurement `history` holds `{"step", "epoch", "<probe>.<metric>": ...}` rows
    (on every rank) and rank 0 has sent the finite metrics to each of `trainer.loggers`.
    """

    def __init__(
        self,
        probes: Any = DEFAULT_PROBES,
        every_n_epochs: int = 1,
        data: Any = None,
        val: Any = None,
        limit: int | None = None,
        model_attr: str | None = None,
        **options: Any,
    ) -> None:
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int):
            every_n_epochs = 0
        if every_n_epochs < 1:
            raise VitdiagError("VitdiagCallback every_n_epochs= must be a positive whole number.")
        if data is None:
            raise VitdiagError("VitdiagCallback needs data= (the images the probes read).")
        self.probes = probes
        self.every_n_epochs = every_n_epochs
        self.data, self.val, self.limit = data, val, limit
        self.model_attr = model_attr
        self.options = options
        self.tracker: Tracker | None = None
        self.history: list[dict[str, Any]] = []

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # on_fit_start comes after the strategy has moved the module to its device and set up
        # the process group, so the Tracker measures where training runs and shards under DDP.
        # Opening the data and planning the probes here makes a bad probe name fail before
        # epoch one, not after it.
        model = measured_module(pl_module, self.model_attr)
        with unchanged(model):
            self.tracker = Tracker(
                model, self.data, self.probes, 1, self.limit, val=self.val, **self.options
            )

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        # on_train_epoch_end runs on every rank (the all-reduce needs them all), once per
        # epoch, after the optimizer steps and the epoch's validation loop, whether or not
        # there is a validation loop; `on_validation_epoch_end` would also fire on sanity
        # checks and on every val_check_interval, and never without val data.
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if self.tracker is None:
            self.on_fit_start(trainer, pl_module)
        step = int(trainer.global_step)
        self.tracker.step(step)
        row = {"epoch": int(trainer.current_epoch), **self.tracker.history[-1]}
        self.history.append(row)
        if trainer.is_global_zero:
            metrics = finite_metrics({k: v for k, v in row.items() if "." in k})
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.tracker is not None:
            self.tracker.close()


def measured_module(pl_module: torch.nn.Module, model_attr: str | None) -> torch.nn.Module:
    """The network inside a LightningModule that the probes measure (see VitdiagCallback)."""
    if model_attr is not None:
        model = getattr(pl_module, model_attr, None)
        if not isinstance(model, torch.nn.Module):
            raise VitdiagError(
                f"{type(pl_module).__name__}.{model_attr} is not a torch.nn.Module; "
                "give VitdiagCallback(model_attr=...) the attribute that holds the network."
            )
        return model
    if _known(pl_module):
        return pl_module
    known = [child for child in pl_module.children() if _known(child)]
    if len(known) == 1:
        return known[0]
    raise VitdiagError(
        f"VitdiagCallback cannot tell which module of {type(pl_module).__name__} to measure "
        f"({len(known)} children of a family vitdiag knows); pass model_attr='<attribute>'."
    )


def _known(module: torch.nn.Module) -> bool:
    try:
        family_of(module)
    except VitdiagError:
        return False
    return True
