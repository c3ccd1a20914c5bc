"""`vitdiag fix-posembed`: write a checkpoint with the position table resampled and rescaled."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitdiag import options as o
from vitdiag.commands.common import Shared, shared
from vitdiag.commands.variance import Reduction

TargetSize = Annotated[
    int | None, typer.Option("--size", help="The new image size in pixels (square).")
]
Out = Annotated[
    Path | None,
    typer.Option("--out", help="Folder to write (config.json + weights); must not exist."),
]
Rescale = Annotated[
    str | None,
    typer.Option(
        "--rescale",
        help="Factor c for the grid rows: empirical (measured on --data; the default), "
        "sqrt-axis (1/√(s/s0)), sqrt-area (s0/s), none, or a number.",
    ),
]
ResizeOnly = Annotated[
    bool,
    typer.Option(
        "--resize-only",
        help="Write the model at --size with nothing rescaled (--rescale none); also for Swin "
        "and BEiT (relative tables resized as timm does) and other families with no table.",
    ),
]
TableInterpolation = Annotated[
    str,
    typer.Option(
        "--interpolation", help="How the table is resampled: bicubic (timm's), bilinear, nearest."
    ),
]
Format = Annotated[
    str,
    typer.Option("--format", help="safetensors (model.safetensors) or pth (plain state dict)."),
]
Force = Annotated[
    bool,
    typer.Option("--force", help="Replace an existing --out (never the input checkpoint)."),
]


@shared("model", "images", "image_interpolation", "crop_pct", "runtime")
def fix_posembed(
    ckpt: o.Checkpoint = None,
    size: TargetSize = None,
    out: Out = None,
    rescale: Rescale = None,
    resize_only: ResizeOnly = False,
    data: o.Data = None,
    interpolation: TableInterpolation = "bicubic",
    reduction: Reduction = "per-token",
    fmt: Format = "safetensors",
    force: Force = False,
    opts: Shared = None,
) -> None:
    """Resample the position table to --size, multiply its grid rows by c, and write a folder
    plain timm loads: timm.create_model("local-dir:OUT", pretrained=True). With --resize-only
    nothing is rescaled, and Swin, BEiT and XCiT models are written at --size too."""
    from vitdiag.errors import VitdiagError
    from vitdiag.posembed import parse_rescale, require_rescalable, resize_only_rescale
    from vitdiag.report import emit
    from vitdiag.studies.fix_posembed import fix_posembed
    from vitdiag.studies.timm_folder import check_output_path
    from vitdiag.validation import Output, check_outputs, check_ranges

    if size is None:
        raise VitdiagError("give the new image size, e.g. --size 384.")
    check_ranges(size=size, native_size=opts.native_size)
    if out is None:
        raise VitdiagError("give the folder to write with --out DIR.")
    opts.validate()
    check_outputs(
        [Output("--json", opts.json_out), Output("--out", out, folder=True, replace="new")],
        [ckpt, data],
        force=force,
    )
    # --rescale defaults to empirical, except that --resize-only means none
    method = resize_only_rescale(rescale) if resize_only else parse_rescale(rescale or "empirical")
    if method == "empirical" and data is None:
        raise VitdiagError(
            "--rescale empirical measures c on images: give --data DIR, or choose sqrt-axis, "
            "sqrt-area, none or a number."
        )
    if ckpt is not None:  # refuse before the (possibly slow) load
        check_output_path(out, Path(ckpt), force)
    loaded, _ = opts.load(ckpt)
    if not resize_only:
        require_rescalable(loaded.model)
    source, notes, inputs = opts.study_inputs(loaded)
    outcome = fix_posembed(
        loaded,
        size,
        out,
        rescale=method,
        resize_only=resize_only,
        interpolation=interpolation,
        reduction=reduction,
        fmt=fmt,
        force=force,
        **inputs,
    )
    outcome.result.notes.extend(notes)
    data_desc = dict(source.describe()) if source is not None else None
    emit("fix-posembed", [outcome.result], loaded=loaded, data=data_desc, json_path=opts.json_out)
