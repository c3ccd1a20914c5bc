"""Option types shared by the commands, so every command spells an option the same way.

Each sits in a help panel (Model, Data, Runtime, Output, Probes) so `vitdiag CMD --help` reads by
topic. The run settings (--batch-size, --limit, the probes' options, ...) are declared on their
`vitdiag.settings.Settings` field; `setting(name)` makes the Typer option from that declaration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from vitdiag.settings import DATA, MODEL, OUTPUT, PROBES, RUNTIME, options

__all__ = ["DATA", "MODEL", "OUTPUT", "PROBES", "RUNTIME", "setting"]


def setting(name: str) -> Any:
    """The Typer option of the `Settings` field `name`, from its declaration."""
    opt = options()[name]
    flags = (opt.flag, opt.short) if opt.short else (opt.flag,)
    return Annotated[opt.type, typer.Option(*flags, help=opt.help, rich_help_panel=opt.panel)]


Checkpoint = Annotated[
    str | None,
    typer.Argument(
        help="Checkpoint: a .safetensors/.pt/.pth/.bin file, a folder (timm or transformers), "
        "an hf-hub:ORG/NAME or a timm pretrained tag. Leave out and give --arch for random "
        "weights.",
        show_default=False,
    ),
]
Arch = Annotated[
    str | None,
    typer.Option(
        "--arch",
        help="timm architecture name; overrides config.json and matching.",
        rich_help_panel=MODEL,
    ),
]
Ema = Annotated[
    bool,
    typer.Option(
        "--ema", help="Use the EMA weights when the file has them.", rich_help_panel=MODEL
    ),
]
UnsafePickle = Annotated[
    bool,
    typer.Option(
        "--unsafe-pickle",
        help="Allow a full pickle (can run code!). Only for files you trust.",
        rich_help_panel=MODEL,
    ),
]
ModelArg = Annotated[
    list[str] | None,
    typer.Option(
        "--model-arg",
        help="KEY=VALUE passed to timm.create_model (e.g. num_heads=6); repeatable.",
        rich_help_panel=MODEL,
    ),
]
NativeSize = Annotated[
    int | None,
    typer.Option(
        "--native-size",
        help="Size the weights were trained at, when nothing records it.",
        rich_help_panel=MODEL,
    ),
]

Data = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="Dataset: an ImageFolder directory, a flat folder of images, a .tar, a timm "
        "dataset string, or 'synthetic[:N]'.",
        rich_help_panel=DATA,
    ),
]
Size = Annotated[
    int | None,
    typer.Option(
        "--size",
        help="Test image size in pixels (default: the model's native size).",
        rich_help_panel=DATA,
    ),
]

JsonOut = Annotated[
    Path | None,
    typer.Option(
        "--json",
        help="Write the results as JSON to this path ('-' for stdout).",
        rich_help_panel=OUTPUT,
    ),
]

# -- the options of the commands that run every probe (report, trend) -------------------------

TrainData = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="Images: collapse, mixup geometry, similarity and invariance run here (the "
        "training split), and everything else too when --val is not given.",
        rich_help_panel=DATA,
    ),
]
Val = Annotated[
    str | None,
    typer.Option(
        "--val", help="Validation images: eval, calibration and variance.", rich_help_panel=DATA
    ),
]
Sizes = Annotated[
    str | None,
    typer.Option(
        "--sizes",
        help="Extra test sizes for the variance probe, e.g. 288,384.",
        rich_help_panel=PROBES,
    ),
]
Force = Annotated[
    bool,
    typer.Option(
        "--force", help="Replace an existing non-empty --out folder.", rich_help_panel=OUTPUT
    ),
]
Plots = Annotated[
    bool,
    typer.Option(
        "--plots/--no-plots", help="Draw the PNG figures (matplotlib).", rich_help_panel=OUTPUT
    ),
]
Probes = Annotated[
    str,
    typer.Option(
        "--probes",
        help="Comma list of probes (classifier, eval, calibration, variance, collapse, "
        "mixup_geometry, similarity, invariance) or all: every one that applies.",
        rich_help_panel=PROBES,
    ),
]
