"""`vitdiag calibrate`: fit a temperature on one split, fold it into the head, report on another."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitdiag import options as o
from vitdiag.commands.common import Shared, shared

# --fit and --val are declared here, once: they are this command's two datasets, not run
# settings (report's --val means "eval, calibration and variance run here", another meaning)
FitData = Annotated[
    str | None,
    typer.Option(
        "--fit",
        help="Labelled images the temperature is fit on (held-out images, not the training "
        "data: the model must get at least 10 of them wrong). Their N×C logits are held in "
        "memory as float64 (8·N·C bytes).",
        rich_help_panel=o.DATA,
    ),
]
ValData = Annotated[
    str | None,
    typer.Option(
        "--val",
        help="Other labelled images, where ECE, MCE and NLL are reported before and after "
        "(never the --fit images).",
        rich_help_panel=o.DATA,
    ),
]
Out = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="Folder to write (config.json + weights + calibration.json); must not exist.",
        rich_help_panel=o.OUTPUT,
    ),
]
Format = Annotated[
    str,
    typer.Option(
        "--format",
        help="safetensors (model.safetensors) or pth (plain state dict).",
        rich_help_panel=o.OUTPUT,
    ),
]
Force = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Replace an existing --out (never the input checkpoint or data).",
        rich_help_panel=o.OUTPUT,
    ),
]


@shared("model", "images", "interpolation", "crop_pct", "runtime")
def calibrate(
    ckpt: o.Checkpoint = None,
    fit: FitData = None,
    val: ValData = None,
    out: Out = None,
    fmt: Format = "safetensors",
    force: Force = False,
    opts: Shared = None,
) -> None:
    """Temperature scaling: fit one T on --fit by Newton's method on 1/T (the NLL is convex in
    it; T kept in [0.001, 1000]), fold it into the classifier head(s) (W/T, b/T; argmax and
    accuracy unchanged), and write a folder plain timm loads, with ECE, MCE and NLL before and
    after on --val (95 % Poisson-bootstrap intervals) in OUT/calibration.json."""
    from vitdiag.errors import VitdiagError
    from vitdiag.report import emit
    from vitdiag.studies.calibrate import calibrate, check_distinct_splits
    from vitdiag.studies.timm_folder import FORMATS, check_output_path
    from vitdiag.validation import Output, check_outputs, check_ranges

    for value, option, what in ((fit, "--fit", "fit the temperature on"), (val, "--val", "")):
        if value is None:
            what = what or "measure calibration on (other than --fit)"
            raise VitdiagError(f"give the labelled images to {what} with {option} DIR.")
    if out is None:
        raise VitdiagError("give the folder to write with --out DIR.")
    opts.validate()
    check_ranges(native_size=opts.native_size)
    check_distinct_splits(fit, val)
    if fmt not in FORMATS:
        raise VitdiagError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}.")
    check_outputs(
        [Output("--json", opts.json_out), Output("--out", out, folder=True, replace="new")],
        [ckpt, fit, val],
        force=force,
    )
    if ckpt is not None:  # refuse before the (possibly slow) load
        check_output_path(out, Path(ckpt), force)
    loaded, _ = opts.load(ckpt)
    fit_source, val_source = opts.open(fit), opts.open(val)
    outcome = calibrate(
        loaded, fit_source, val_source, out, settings=opts.settings(), fmt=fmt, force=force
    )
    data = outcome.document["val"]["data"]
    emit("calibrate", [outcome.result], loaded=loaded, data=data, json_path=opts.json_out)
