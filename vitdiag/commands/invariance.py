"""`vitdiag invariance`: Linv and Ldiv of augmented views (SPEC §3), one or more checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitdiag import options as o
from vitdiag.commands.common import Shared, shared

Checkpoints = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="CKPT",
        help="One or more checkpoints (files or directories with config.json); several share "
        "one table and one plot. Leave out and give --arch for random weights.",
        show_default=False,
    ),
]
Plot = Annotated[
    Path | None,
    typer.Option("--plot", help="Write a PNG of Ldiv against Linv (one point per augmentation)."),
]


def _labels(ckpts: list[str | None], arch: str | None) -> list[str]:
    """Short names for the table and legend: the file or folder name, or the path when two
    checkpoints share a name."""
    names = [Path(c).name if c else (arch or "random") for c in ckpts]
    if len(set(names)) < len(names):
        names = [c if c else (arch or "random") for c in ckpts]
    return names


@shared("model", "size", "images", "interpolation", "crop_pct", "runtime", "invariance")
def invariance(
    ckpts: Checkpoints = None,
    data: o.Data = None,
    plot: Plot = None,
    opts: Shared = None,
) -> None:
    """Invariance (Linv) and diversity (Ldiv) of augmented views, definition vitdiag-v1."""
    import dataclasses

    from vitdiag.model import describe
    from vitdiag.plots import plot_invariance
    from vitdiag.report import emit, stacked
    from vitdiag.runner import run_all
    from vitdiag.validation import Output, check_invariance_options, check_outputs, check_ranges

    # Validate everything cheap before loading a single model.
    check_invariance_options(opts.aug, opts.views, opts.embedding, opts.alpha)
    targets: list[str | None] = list(ckpts) if ckpts else [None]
    labels = _labels(targets, opts.arch)
    opts.validate()
    check_ranges(size=opts.size, native_size=opts.native_size)
    check_outputs([Output("--json", opts.json_out), Output("--plot", plot)], [*targets, data])
    source = opts.open()
    # Invariance never reads labels, so any data will do, whatever its classes.
    settings = opts.settings(label_check=False)
    results, runs, first_loaded = [], [], None
    for loaded, label in zip(opts.each(targets, opts.size), labels, strict=True):
        each = dataclasses.replace(settings, label=f"invariance {label}")
        found = run_all(loaded, source, probes={"invariance"}, settings=each)
        found[0].extra["checkpoint"] = label
        found[0].extra["model"] = describe(loaded)
        results.append(found[0])
        runs.append(found)
        first_loaded = loaded if len(targets) == 1 else None
        del loaded  # checkpoints can be large: one in memory at a time

    def then(out) -> None:
        if plot is not None:
            written = plot_invariance(list(zip(labels, results, strict=True)), plot)
            out.print(f"plot written to {written}")

    # With several checkpoints the top-level model is null: each result's extra carries its
    # own checkpoint label and model provenance.
    emit(
        "invariance",
        results,
        loaded=first_loaded,
        data=runs[0].data["data"],
        json_path=opts.json_out,
        run={"seconds": sum(r.seconds for r in runs), "world_size": runs[0].world_size},
        shown=stacked(results, labels) if len(results) > 1 else results,
        then=then,
    )
