"""`VitdiagTrainerCallback`: vitdiag's probes at the end of every N-th epoch of a
`transformers.Trainer` fit of a ViT, DeiT, DINOv2, CLIP/SigLIP vision tower, BEiT or Swin.

    trainer = transformers.Trainer(model, args, train_dataset=train,
        callbacks=[VitdiagTrainerCallback(probes=["eval", "collapse"], data="data/train",
                                          val="data/val", limit=200)])

vitdiag's probes run on timm modules, so the callback measures a timm copy: at train begin it
converts the transformers module's config and state dict with the converter `vitdiag load`
uses for a saved transformers checkpoint (`vitdiag.loading.convert`), builds the timm model
once, and at each measured epoch end loads the current weights into it again (a copy: the
transformers module is only read, never run, so measuring changes nothing about training; the
global random states are guarded as well). The numbers are those `vitdiag report` gives on
the checkpoint `save_pretrained` would write at that point.

The finite metrics go into `state.log_history` as one entry `{"<probe>.<metric>": ...,
"epoch": state.epoch, "step": state.global_step}` on the main process, which is where
`trainer.state.log_history` and the `trainer_state.json` of every later checkpoint show them.
A callback cannot call `Trainer.log`, so reporting integrations (TensorBoard, W&B, ... via
`report_to`) do not receive them; pass `writer=` (e.g. `vitdiag.integrations.wandb.WandbWriter`)
or `log_dir=` for those. Under DDP every rank measures its shard and the sums are all-reduced.

transformers itself is never imported here: the Trainer hands the callback its objects
(extra `vitdiag[hf]`).
"""

from __future__ import annotations

from typing import Any

import torch

from vitdiag.engine import unchanged
from vitdiag.errors import VitdiagError
from vitdiag.loading.build import build
from vitdiag.loading.convert import convert, detect
from vitdiag.tracker import DEFAULT_PROBES, Tracker, finite_metrics

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - exercised only where the extra is absent
    raise VitdiagError(
        "vitdiag.integrations.transformers needs transformers; install vitdiag[hf]."
    ) from None


class VitdiagTrainerCallback(TrainerCallback):
    """Run vitdiag's probes on a timm copy of the model every `every_n_epochs` epochs.

    probes, data, val, limit and `**options` (data_config, device, batch_size, per_class, seed,
    log_dir, writer, ... : every keyword of `vitdiag.Tracker`) are the Tracker's. Without
    data_config the preprocessing is the Trainer's `processing_class` (an image processor)
    when it has one, else the transformers family default, as `vitdiag load` reads it.
    After each measurement `history` holds the row on every rank.
    """

    def __init__(
        self,
        probes: Any = DEFAULT_PROBES,
        every_n_epochs: int = 1,
        data: Any = None,
        val: Any = None,
        limit: int | None = None,
        **options: Any,
    ) -> None:
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int):
            every_n_epochs = 0
        if every_n_epochs < 1:
            raise VitdiagError(
                "VitdiagTrainerCallback every_n_epochs= must be a positive whole number."
            )
        if data is None:
            raise VitdiagError("VitdiagTrainerCallback needs data= (the images the probes read).")
        self.probes = probes
        self.every_n_epochs = every_n_epochs
        self.data, self.val, self.limit = data, val, limit
        self.options = options
        self.tracker: Tracker | None = None
        self.copy: torch.nn.Module | None = None
        self.kind: str | None = None
        self.history: list[dict[str, Any]] = []
        self._epochs = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Here, not at the first epoch end: a model vitdiag cannot convert or a bad probe name
        # fails before any training time is spent.
        model = _unwrap(kwargs.get("model"))
        preprocessor = _preprocessor(kwargs.get("processing_class"))
        with unchanged(model):  # building the copy must not draw from the caller's RNG
            self.copy, data_config, self.kind = timm_copy(model, preprocessor)
            options = {"data_config": data_config, **self.options}
            self.tracker = Tracker(
                self.copy, self.data, self.probes, 1, self.limit, val=self.val, **options
            )

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # on_epoch_end fires on every rank (the all-reduce needs them all), once per epoch,
        # also for the last, partial epoch that max_steps ends.
        self._epochs += 1
        if self._epochs % self.every_n_epochs:
            return
        if self.tracker is None:
            self.on_train_begin(args, state, control, **kwargs)
        model = _unwrap(kwargs.get("model"))
        with torch.no_grad():
            self.copy.load_state_dict(_converted(model, self.kind).state_dict, strict=True)
        step = int(state.global_step)
        self.tracker.step(step)
        metrics = {k: v for k, v in self.tracker.history[-1].items() if k != "step"}
        self.history.append({"epoch": state.epoch, "step": step, **metrics})
        if state.is_world_process_zero:
            state.log_history.append(
                {**finite_metrics(metrics), "epoch": state.epoch, "step": step}
            )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.tracker is not None:
            self.tracker.close()


def timm_copy(
    model: torch.nn.Module, preprocessor: dict | None = None
) -> tuple[torch.nn.Module, dict[str, Any], str]:
    """(a timm model holding `model`'s current weights, its data config, the source kind)
    for a live transformers module, built as `vitdiag load` builds a saved one."""
    kind = _kind(model)
    out = _converted(model, kind, preprocessor)
    device = next(model.parameters()).device
    copy, _ = build(
        out.arch, out.model_args, None, overlay={}, state_dict=out.state_dict, where=kind
    )
    return copy.to(device), dict(out.data_config), kind


def _kind(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    kind = detect(to_dict(), []) if callable(to_dict) else None
    if kind is None or not kind.startswith("transformers:"):
        raise VitdiagError(
            f"VitdiagTrainerCallback needs a transformers vision model with a config; got "
            f"{type(model).__name__}; give the Trainer a ViT, DeiT, DINOv2, CLIP, SigLIP, BEiT "
            "or Swin model."
        )
    return kind


def _converted(model: torch.nn.Module, kind: str, preprocessor: dict | None = None) -> Any:
    # Detached references: the converter renames and fuses (new tensors for q/k/v), and
    # load_state_dict copies into the timm model, so the transformers weights are only read.
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    return convert(kind, model.config.to_dict(), sd, preprocessor)


def _preprocessor(processing_class: Any) -> dict | None:
    to_dict = getattr(processing_class, "to_dict", None)
    if not callable(to_dict):
        return None
    found = to_dict()
    return found if isinstance(found, dict) and "image_mean" in found else None


def _unwrap(model: Any) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise VitdiagError(
            "VitdiagTrainerCallback got no model from the Trainer; use it as "
            "Trainer(..., callbacks=[VitdiagTrainerCallback(...)])."
        )
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model
