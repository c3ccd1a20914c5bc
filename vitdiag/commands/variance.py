"""`vitdiag variance`: variance shift between patch and position embeddings across test sizes."""

from __future__ import annotations

from typing import Annotated

import typer

from vitdiag import options as o
from vitdiag.commands.common import (
    DataOptions,
    Output,
    check_outputs,
    check_ranges,
    emit,
    label_check,
    load_model,
    loader_for,
    open_data,
    parse_sizes,
    transform_for,
)

Sizes = Annotated[
    str | None,
    typer.Option("--sizes", help="Test sizes in pixels, e.g. 224,288,384 (s0 is always added)."),
]
TableInterpolation = Annotated[
    str | None,
    typer.Option(
        "--interpolation",
        help="How the position table is resampled: bicubic (timm's), bilinear, nearest; a "
        "comma list reports each, the first is the one the model runs with.",
    ),
]
ImageInterpolation = Annotated[
    str | None,
    typer.Option("--image-interpolation", help="Image resize interpolation (default: model's)."),
]
Reduction = Annotated[
    str,
    typer.Option(
        "--reduction",
        help="Which variance defines the empirical c: per-token (what LayerNorm sees) or global.",
    ),
]


def variance(
    ckpt: o.Checkpoint = None,
    sizes: Sizes = None,
    data: o.Data = None,
    interpolation: TableInterpolation = None,
    reduction: Reduction = "per-token",
    arch: o.Arch = None,
    ema: o.Ema = False,
    unsafe_pickle: o.UnsafePickle = False,
    model_arg: o.ModelArg = None,
    native_size: o.NativeSize = None,
    limit: o.Limit = None,
    batch_size: o.BatchSize = 64,
    workers: o.Workers = 0,
    seed: o.Seed = 0,
    strict: o.Strict = False,
    mean: o.Mean = None,
    std: o.Std = None,
    image_interpolation: ImageInterpolation = None,
    crop_pct: o.CropPct = None,
    device: o.Device = "auto",
    amp: o.Amp = "off",
    channels_last: o.ChannelsLast = False,
    json_out: o.JsonOut = None,
    quiet: o.Quiet = False,
) -> None:
    """Var[patch embedding] / Var[position table] at each size, the rescale that restores it,
    and (with labelled --data) accuracy under each rescale. Without --data: the table part."""
    from vitdiag.errors import VitdiagError
    from vitdiag.posembed import REDUCTIONS, parse_interpolations
    from vitdiag.studies.variance import data_notes, variance_study

    if sizes is None:
        raise VitdiagError("give the test sizes to compare, e.g. --sizes 224,288,384.")
    size_list = parse_sizes(sizes)
    interps = parse_interpolations(interpolation)
    if reduction not in REDUCTIONS:
        raise VitdiagError(f"--reduction {reduction!r} is not one of {', '.join(REDUCTIONS)}.")
    opts = DataOptions(
        data, limit, batch_size, workers, seed, strict, mean, std, image_interpolation, crop_pct
    )
    opts.validate()
    check_ranges(native_size=native_size)
    check_outputs([Output("--json", json_out)], [ckpt, data])
    loaded = load_model(
        ckpt,
        arch,
        ema=ema,
        unsafe_pickle=unsafe_pickle,
        model_arg=model_arg,
        native_size=native_size,
    )
    source = open_data(opts) if data is not None else None
    notes = label_check(loaded, source) if source is not None else []

    def batches_at(at, size):
        return loader_for(source, transform_for(at, opts, size), opts)

    study = variance_study(
        loaded,
        size_list,
        batches_at=batches_at if source is not None else None,
        interpolations=interps,
        reduction=reduction,
        accuracy=source is not None and source.labelled,
        device=device,
        amp=amp,
        channels_last=channels_last,
        seed=seed,
        quiet=quiet,
        total_images=min(len(source), limit or len(source)) if source is not None else None,
    )
    result = study.result()
    result.notes += notes + data_notes(study, source)
    data_desc = None
    if source is not None:
        data_desc = dict(
            source.describe(), n_images=study.n_images, n_unreadable=study.n_unreadable
        )
    emit(
        "variance",
        [result],
        loaded=study.native_loaded,
        data=data_desc,
        json_path=json_out,
        run={"seconds": study.seconds},
    )
