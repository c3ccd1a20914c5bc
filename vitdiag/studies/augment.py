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


def suggested_configs(cfg: Any, result: Any) -> list[tuple[str, str, Any, str, str]]:
    """(flag, the train.py change, the configuration with it, the augmentation whose variance
    ratio shows the flag, the one that replaces it) for each guideline flag the audit raised
    (arXiv 2405.14115)."""
    import dataclasses

    metrics = result.metrics
    norm = result.extra.get("normalisation") or {}
    out = []
    if metrics.get("flag/mixup") == 1.0:
        fixed = dataclasses.replace(cfg, mixup=0.0, cutmix=cfg.cutmix or 1.0)
        change = f"--mixup 0 --cutmix {fixed.cutmix:g}"
        out.append(("mixup", change, fixed, "mixup", "cutmix"))
    data_mean = [metrics.get(f"data_mean/{c}") for c in range(3)]
    data_std = [metrics.get(f"data_std/{c}") for c in range(3)]
    own = None
    if norm.get("mean") and None not in data_mean + data_std:
        # The data's own raw statistics, from its statistics after the normalisation used.
        own_mean = [m * s + n for m, s, n in zip(data_mean, norm["std"], norm["mean"], strict=True)]
        own_std = [d * s for d, s in zip(data_std, norm["std"], strict=True)]
        own = (tuple(round(v, 4) for v in own_mean), tuple(round(v, 4) for v in own_std))
    for flag in ("erasing-mode", "pixel-normalisation"):
        if metrics.get(f"flag/{flag}") != 1.0:
            continue
        fixed = dataclasses.replace(cfg, remode="pixel")
        change = "--remode pixel"
        if own is not None:
            fixed = dataclasses.replace(fixed, mean=own[0], std=own[1])
            change += f" --mean {' '.join(map(str, own[0]))} --std {' '.join(map(str, own[1]))}"
        out.append((flag, change, fixed, f"erasing-{cfg.remode}", "erasing-pixel"))
    return out


def measured_suggestions(
    loaded: Any, source: Any, cfg: Any, settings: Any, result: Any, *, size: int | None
) -> list[dict[str, Any]]:
    """Each suggested train.py change, audited again: the variance ratio of the augmentation it
    concerns before and after (1 is variance kept), measured on the same images."""
    import dataclasses

    rows = []
    for flag, change, fixed, was, becomes in suggested_configs(cfg, result):
        run_settings = dataclasses.replace(settings, mean=fixed.mean, std=fixed.std)
        after, _ = audit(loaded, source, fixed, run_settings, size=size, recipe=None, beside=None)
        # X (the patch embedding) when a checkpoint was given, else the image itself.
        kind = "x_global" if f"ratio_x_global/{was}" in result.metrics else "image_global"
        rows.append(
            {
                "flag": flag,
                "change": change,
                "ratio": f"{kind}: {was} -> {becomes}",
                "before": result.metrics.get(f"ratio_{kind}/{was}"),
                "after": after.metrics.get(f"ratio_{kind}/{becomes}"),
                "flag_after": after.metrics.get(f"flag/{flag}"),
            }
        )
    return rows
