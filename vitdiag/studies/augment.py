"""The augmentation audit as a workflow: the recipe's batches against clean ones, in one pass.

The network is not run: the probe reads the batches (and, with a checkpoint, its patch
embedding) itself, so the pass goes through the runner with a stand-in model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def train_args_beside(ckpt: str | None) -> Path | None:
    """timm's train.py writes args.yaml beside its checkpoints: the recipe travels with them."""
    if ckpt is None:
        return None
    p = Path(ckpt).expanduser()
    beside = (p if p.is_dir() else p.parent) / "args.yaml"
    return beside if beside.is_file() else None


def audit(
    loaded: Any,
    source: Any,
    cfg: Any,
    settings: Any,
    *,
    size: int | None,
    recipe: Path | None,
    beside: Path | None,
) -> tuple[Any, Any]:
    """(the audit's Result, the runner's Pass) for `cfg` (a probes.augment.AugmentConfig) on
    `source`; `loaded` (or None) adds the patch embedding X to what is measured."""
    from vitdiag.engine import resolve_device
    from vitdiag.model import at_size
    from vitdiag.probes.augment import (
        AugmentAuditProbe,
        NoNetwork,
        audit_result,
        patch_size_of,
        specs_for,
    )
    from vitdiag.runner import run_pass, transform_at

    data_config = dict(loaded.data_config) if loaded is not None else {}
    img_size = size or (tuple(loaded.img_size) if loaded is not None else 224)
    transform = transform_at(data_config, settings, img_size)
    dev = resolve_device(settings.device)
    patch_model = None
    if loaded is not None:
        if loaded.img_size != transform.size:
            loaded = at_size(loaded, transform.size)
        if getattr(loaded.model, "patch_embed", None) is not None:
            patch_model = loaded.model.to(dev).eval()
    specs, reference = specs_for(cfg)
    probe = AugmentAuditProbe(
        specs,
        device=dev,
        patch_model=patch_model,
        patch=patch_size_of(loaded.model) if loaded is not None else 16,
        seed=settings.seed,
    )
    done = run_pass(
        None,
        source,
        [probe],
        settings,
        transform=transform,
        description="augment",
        model=NoNetwork(),
    )
    normalisation = (transform.config["mean"], transform.config["std"])
    result = audit_result(probe, cfg, reference=reference, normalisation=normalisation)
    if loaded is not None and patch_model is None:
        result.notes.append(
            f"{loaded.family.label} has no patch embedding to measure; only images are audited."
        )
    if recipe is not None:
        result.extra["train_args"] = str(recipe)
        if beside is not None:
            result.notes.append(
                f"the training recipe was read from {recipe} (beside the checkpoint); "
                "--train-args or --mixup/--cutmix/--reprob/--remode override it."
            )
    result.extra["normalisation"] = {
        "mean": list(transform.config["mean"]),
        "std": list(transform.config["std"]),
        "from": cfg.sources.get("mean", "the checkpoint" if loaded is not None else "ImageNet"),
    }
    result.notes.extend(done.notes)
    return result, done
