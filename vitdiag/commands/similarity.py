"""`vitdiag similarity`: patch-wise absolute cosine similarity per layer (over-smoothing)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitdiag import options as o
from vitdiag.commands.common import Shared, shared

_RANDOM = object()  # marks the --random-baseline entry in the list of checkpoints


@shared("model", "size", "images", "interpolation", "crop_pct", "runtime")
def similarity(
    ckpts: Annotated[
        list[str] | None,
        typer.Argument(
            help="One or more checkpoints (compared in one table and one plot). Leave out and "
            "give --arch for random weights.",
            show_default=False,
        ),
    ] = None,
    data: o.Data = None,
    layers: Annotated[
        str | None, typer.Option("--layers", help="Comma-separated layer names to measure.")
    ] = None,
    erank_every: Annotated[
        int,
        typer.Option(
            "--erank-every",
            help="Similarity: effective rank on the images whose index is a multiple of N "
            "(1: every image).",
        ),
    ] = 16,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write similarity against depth to this PNG.")
    ] = None,
    random_baseline: Annotated[
        bool,
        typer.Option(
            "--random-baseline",
            help="Add the first checkpoint's architecture with random weights as another curve.",
        ),
    ] = False,
    c: Shared = None,
) -> None:
    """Patch-wise cosine similarity per layer: how far tokens collapse onto each other."""
    from vitdiag.model import at_size, describe, load
    from vitdiag.plots import plot_similarity
    from vitdiag.report import emit, side_by_side
    from vitdiag.runner import require, run_all
    from vitdiag.validation import Output, check_outputs, check_ranges

    names = [s.strip() for s in layers.split(",")] if layers else None
    c.validate()
    check_ranges(size=c.size, native_size=c.native_size, erank_every=erank_every)
    check_outputs([Output("--json", c.json_out), Output("--plot", plot)], [*(ckpts or []), data])
    source = c.open()
    # Similarity never reads labels, so any data will do, whatever its classes.
    settings = c.settings(
        layers=names, erank_every=erank_every, label_check=False, label="similarity"
    )
    labelled, models, data_desc = [], [], None
    for ckpt in [*(ckpts or [None]), *([_RANDOM] if random_baseline else [])]:
        if ckpt is _RANDOM:
            # Same architecture and build arguments, untrained: how much smoothing training adds.
            first = models[0]
            loaded = load(
                None,
                arch=first.arch,
                model_args=dict(first.build_kwargs),
                img_size=first.native_size,
                native_size=first.native_size,
            )
            loaded = at_size(loaded, c.size) if c.size is not None else loaded
        else:
            loaded, _ = c.load(ckpt, c.size)
        require(loaded, ["similarity"])
        found = run_all(loaded, source, probes={"similarity"}, settings=settings)
        result = found[0]
        label = f"{loaded.arch} (random)" if ckpt in (None, _RANDOM) else Path(ckpt).name
        result.extra["label"] = label
        result.extra["model"] = describe(loaded)
        for t in result.tables:
            t.title = f"{t.title} — {label}"
        labelled.append((label, result))
        models.append(loaded)
        data_desc = found.data["data"]
    results = [r for _, r in labelled]
    if len(results) > 1:
        results.append(side_by_side(labelled))
    if plot is not None:
        plot_similarity(labelled, plot)
    first = models[0] if len(models) == 1 else None
    emit("similarity", results, loaded=first, data=data_desc, json_path=c.json_out)
