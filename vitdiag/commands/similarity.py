"""`vitdiag similarity`: patch-wise absolute cosine similarity per layer (over-smoothing)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vitdiag import options as o
from vitdiag.commands.common import Shared, shared

if TYPE_CHECKING:
    from vitdiag.model import LoadedModel
    from vitdiag.results import Result

_RANDOM = object()  # marks the --random-baseline entry in the list of checkpoints


@shared("model", "size", "images", "interpolation", "crop_pct", "runtime", "similarity")
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
    opts: Shared = None,
) -> None:
    """Patch-wise cosine similarity per layer: how far tokens collapse onto each other."""
    from vitdiag.plots import plot_similarity
    from vitdiag.report import emit, side_by_side
    from vitdiag.runner import require, run_all
    from vitdiag.validation import Output, check_outputs, check_ranges

    opts.validate()
    check_ranges(size=opts.size, native_size=opts.native_size)
    check_outputs([Output("--json", opts.json_out), Output("--plot", plot)], [*(ckpts or []), data])
    source = opts.open()
    # Similarity never reads labels, so any data will do, whatever its classes.
    settings = opts.settings(label_check=False, label="similarity")
    labelled, models, data_desc = [], [], None
    for ckpt in [*(ckpts or [None]), *([_RANDOM] if random_baseline else [])]:
        loaded = (
            _random_like(models[0], opts.size) if ckpt is _RANDOM else opts.load(ckpt, opts.size)[0]
        )
        require(loaded, ["similarity"])
        found = run_all(loaded, source, probes={"similarity"}, settings=settings)
        label = f"{loaded.arch} (random)" if ckpt in (None, _RANDOM) else Path(ckpt).name
        labelled.append((label, _labelled(found[0], label, loaded)))
        models.append(loaded)
        data_desc = found.data["data"]
    results = [r for _, r in labelled]
    if len(results) > 1:
        results.append(side_by_side(labelled))
    if plot is not None:
        plot_similarity(labelled, plot)
    first = models[0] if len(models) == 1 else None
    emit("similarity", results, loaded=first, data=data_desc, json_path=opts.json_out)


def _random_like(first: LoadedModel, size: int | None) -> LoadedModel:
    """Same architecture and build arguments, untrained: how much smoothing training adds."""
    from vitdiag.model import at_size, load

    loaded = load(
        None,
        arch=first.arch,
        model_args=dict(first.build_kwargs),
        img_size=first.native_size,
        native_size=first.native_size,
    )
    return at_size(loaded, size) if size is not None else loaded


def _labelled(result: Result, label: str, loaded: LoadedModel) -> Result:
    """The result with its checkpoint's label and model, and the label in its tables' titles."""
    from vitdiag.model import describe

    result.extra["label"] = label
    result.extra["model"] = describe(loaded)
    for t in result.tables:
        t.title = f"{t.title} — {label}"
    return result
