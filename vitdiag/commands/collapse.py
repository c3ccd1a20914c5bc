"""`vitdiag collapse`: neural collapse, classifier geometry, mixup geometry, calibration."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitdiag import options as o
from vitdiag.commands.common import Shared, shared
from vitdiag.errors import VitdiagError


@shared("model", "images", "interpolation", "crop_pct", "runtime", "collapse")
def collapse(
    ckpt: o.Checkpoint = None,
    data: Annotated[
        str | None, typer.Option("--data", help="Training split: NC1-NC4 and mixup geometry.")
    ] = None,
    val: Annotated[
        str | None, typer.Option("--val", help="Validation split: ECE, MCE, NLL, accuracy.")
    ] = None,
    mixup_geometry: Annotated[
        bool, typer.Option("--mixup-geometry", help="Also measure mixup geometry on --data.")
    ] = False,
    plots: Annotated[
        Path | None, typer.Option("--plots", help="Folder for reliability/mixup PNGs.")
    ] = None,
    opts: Shared = None,
) -> None:
    """Neural collapse (NC1-NC4), classifier ETF geometry, mixup geometry and calibration."""
    from vitdiag.plots import plot_mixup_geometry, plot_reliability
    from vitdiag.report import emit
    from vitdiag.runner import require, run_all
    from vitdiag.validation import Output, check_outputs, check_ranges

    if mixup_geometry and data is None:
        raise VitdiagError("--mixup-geometry needs training images: add --data TRAIN_DIR.")
    check_ranges(native_size=opts.native_size)
    opts.validate()
    check_outputs(
        [Output("--json", opts.json_out), Output("--plots", plots, folder=True)],
        [ckpt, data, val],
    )
    loaded, _ = opts.load(ckpt)
    require(loaded, ["classifier"])  # every probe here reads the classifier head
    train_probes = ["collapse", "mixup_geometry"] if mixup_geometry else ["collapse"]
    wanted, sources = ["classifier"], {}
    for path, names in ((data, train_probes), (val, ["calibration"])):
        if path is not None:
            source = opts.open(path)
            if not source.labelled:
                raise VitdiagError(f"{path} has no labels; {names[0]} needs class sub-folders.")
            sources[names[0]] = source
            wanted += names
    results = run_all(
        loaded,
        sources.get("collapse"),
        probes=wanted,
        val_source=sources.get("calibration"),
        settings=opts.settings(),
    )
    # This command's own order and names: the classifier, the training split, then --val.
    results.sort(key=lambda r: wanted.index(r.probe))
    roles = {"data": "train", "val": "val"}
    data_desc = {roles[k]: v for k, v in results.data.items()}
    if plots is not None:
        plots.mkdir(parents=True, exist_ok=True)
        for r in results:
            if r.probe == "calibration":
                plot_reliability(r, plots / "reliability.png")
            elif r.probe == "mixup_geometry":
                plot_mixup_geometry(r, plots / "mixup_geometry.png")
    emit("collapse", results, loaded=loaded, data=data_desc or None, json_path=opts.json_out)
