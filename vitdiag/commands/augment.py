"""`vitdiag augment`: does a training recipe's augmentation shift the input variance?"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitdiag import options as o
from vitdiag.commands.common import Shared, shared

Ckpt = Annotated[
    str | None,
    typer.Option("--ckpt", help="Checkpoint whose patch embedding X is measured as well."),
]
TrainArgs = Annotated[
    Path | None,
    typer.Option(
        "--train-args",
        help="timm train.py args.yaml to read mixup, cutmix, reprob, remode, mean, std from "
        "(default: an args.yaml beside --ckpt).",
    ),
]
Mixup = Annotated[float | None, typer.Option("--mixup", help="Mixup α (overrides args.yaml).")]
Cutmix = Annotated[float | None, typer.Option("--cutmix", help="CutMix α (overrides args.yaml).")]
Reprob = Annotated[
    float | None, typer.Option("--reprob", help="Random-erasing probability (overrides args.yaml).")
]
Remode = Annotated[
    str | None,
    typer.Option("--remode", help="Random-erasing mode: const, rand or pixel."),
]
AuditSize = Annotated[
    int | None,
    typer.Option("--size", help="Image size without --ckpt (default 224; with it: the model's)."),
]


OPTIONS = ("model", "limit", "batch_size", "workers", "seed", "strict", "interpolation")


@shared(*OPTIONS, "crop_pct", "device", "json_out", "quiet")
def augment(
    data: o.Data = None,
    ckpt: Ckpt = None,
    train_args: TrainArgs = None,
    mixup: Mixup = None,
    cutmix: Cutmix = None,
    reprob: Reprob = None,
    remode: Remode = None,
    mean: o.Mean = None,
    std: o.Std = None,
    size: AuditSize = None,
    c: Shared = None,
) -> None:
    """Variance of Mixup / CutMix / random-erasing batches against clean ones, the data's
    mean/std after normalisation, and the paper's guideline flags (arXiv 2405.14115)."""
    from vitdiag.engine import resolve_device
    from vitdiag.probes.augment import (
        AugmentAuditProbe,
        NoNetwork,
        audit_result,
        patch_size_of,
        read_train_args,
        resolve_config,
        specs_for,
    )
    from vitdiag.report import emit
    from vitdiag.runner import run_pass, transform_at
    from vitdiag.validation import Output, check_outputs, check_ranges, parse_floats

    check_ranges(mixup=mixup, cutmix=cutmix, reprob=reprob, size=size, native_size=c.native_size)
    c.validate()
    check_outputs([Output("--json", c.json_out)], [ckpt, data, train_args])
    found_beside = False
    if train_args is None and ckpt is not None:
        # timm's train.py writes args.yaml beside its checkpoints: the recipe travels with them
        p = Path(ckpt).expanduser()
        beside = (p if p.is_dir() else p.parent) / "args.yaml"
        if beside.is_file():
            train_args, found_beside = beside, True
    cfg = resolve_config(
        read_train_args(train_args) if train_args is not None else None,
        mixup=mixup,
        cutmix=cutmix,
        reprob=reprob,
        remode=remode,
        mean=parse_floats(mean, "--mean"),
        std=parse_floats(std, "--std"),
    )
    loaded = c.load(ckpt)[0] if ckpt is not None or c.arch is not None else None
    source = c.open()
    data_config = dict(loaded.data_config) if loaded is not None else {}
    img_size = size or (tuple(loaded.img_size) if loaded is not None else 224)
    # The recipe's normalisation (args.yaml, --mean/--std), not the checkpoint's.
    settings = c.settings(mean=cfg.mean, std=cfg.std)
    transform = transform_at(data_config, settings, img_size)
    dev = resolve_device(c.device)
    patch_model = None
    if loaded is not None:
        if loaded.img_size != transform.size:
            from vitdiag.model import at_size

            loaded = at_size(loaded, transform.size)
        if getattr(loaded.model, "patch_embed", None) is not None:
            patch_model = loaded.model.to(dev).eval()
    specs, reference = specs_for(cfg)
    probe = AugmentAuditProbe(
        specs,
        device=dev,
        patch_model=patch_model,
        patch=patch_size_of(loaded.model) if loaded is not None else 16,
        seed=c.seed,
    )
    # The network is not run: the probe reads the batches (and the patch embedding) itself.
    done = run_pass(
        None,
        source,
        [probe],
        settings,
        transform=transform,
        description="augment",
        model=NoNetwork(),
    )
    result = audit_result(
        probe,
        cfg,
        reference=reference,
        normalisation=(transform.config["mean"], transform.config["std"]),
    )
    if loaded is not None and patch_model is None:
        result.notes.append(
            f"{loaded.family.label} has no patch embedding to measure; only images are audited."
        )
    if train_args is not None:
        result.extra["train_args"] = str(train_args)
        if found_beside:
            result.notes.append(
                f"the training recipe was read from {train_args} (beside the checkpoint); "
                "--train-args or --mixup/--cutmix/--reprob/--remode override it."
            )
    result.extra["normalisation"] = {
        "mean": list(transform.config["mean"]),
        "std": list(transform.config["std"]),
        "from": cfg.sources.get("mean", "the checkpoint" if loaded is not None else "ImageNet"),
    }
    result.notes.extend(done.notes)
    run = {"seconds": done.summary.seconds}
    emit("augment", [result], loaded=loaded, data=done.data, json_path=c.json_out, run=run)
