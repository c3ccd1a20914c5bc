"""`vitdiag variance`: variance shift between patch and position embeddings across test sizes."""

from __future__ import annotations

from typing import Annotated

import typer

from vitdiag import options as o
from vitdiag.commands.common import Shared, shared

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
Reduction = Annotated[
    str,
    typer.Option(
        "--reduction",
        help="Which variance defines the empirical c: per-token (what LayerNorm sees) or global.",
    ),
]


@shared("model", "images", "image_interpolation", "crop_pct", "runtime")
def variance(
    ckpt: o.Checkpoint = None,
    sizes: Sizes = None,
    data: o.Data = None,
    interpolation: TableInterpolation = None,
    reduction: Reduction = "per-token",
    opts: Shared = None,
) -> None:
    """Var[patch embedding] / Var[position table] at each size, the rescale that restores it,
    and (with labelled --data) accuracy under each rescale. Without --data: the table part."""
    from vitdiag.errors import VitdiagError
    from vitdiag.posembed import REDUCTIONS, parse_interpolations
    from vitdiag.report import emit
    from vitdiag.size_sweep import variance_study
    from vitdiag.studies.variance import data_notes
    from vitdiag.validation import Output, check_outputs, check_ranges, parse_sizes

    if sizes is None:
        raise VitdiagError("give the test sizes to compare, e.g. --sizes 224,288,384.")
    size_list = parse_sizes(sizes)
    interps = parse_interpolations(interpolation)
    if reduction not in REDUCTIONS:
        raise VitdiagError(f"--reduction {reduction!r} is not one of {', '.join(REDUCTIONS)}.")
    opts.validate()
    check_ranges(native_size=opts.native_size)
    check_outputs([Output("--json", opts.json_out)], [ckpt, data])
    loaded, _ = opts.load(ckpt)
    source, notes, inputs = opts.study_inputs(loaded)
    study = variance_study(loaded, size_list, interpolations=interps, reduction=reduction, **inputs)
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
        json_path=opts.json_out,
        run={"seconds": study.seconds},
    )
