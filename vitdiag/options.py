"""Option types shared by the commands, so every command spells an option the same way.

Each sits in a help panel (Model, Data, Runtime, Output) so `vitdiag CMD --help` reads by topic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

# --workers' default: half the usable CPUs, at most 8 (see vitdiag.hardware).
from vitdiag.hardware import DEFAULT_WORKERS as DEFAULT_WORKERS

MODEL, DATA, RUNTIME, OUTPUT, PROBES = "Model", "Data", "Runtime", "Output", "Probes"

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
Limit = Annotated[
    int | None, typer.Option("--limit", help="Use at most this many images.", rich_help_panel=DATA)
]
BatchSize = Annotated[
    int, typer.Option("--batch-size", help="Images per forward pass.", rich_help_panel=DATA)
]
Workers = Annotated[
    int,
    typer.Option(
        "--workers",
        help="Processes that decode and augment images while the model runs (0: in this "
        "process). Default: half the CPUs, at most 8.",
        rich_help_panel=DATA,
    ),
]
Seed = Annotated[
    int,
    typer.Option(
        "--seed", help="Seed for sampling, augmentation and --limit.", rich_help_panel=DATA
    ),
]
Strict = Annotated[
    bool,
    typer.Option(
        "--strict",
        help="Fail on the first unreadable image instead of skipping it.",
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
Mean = Annotated[
    str | None,
    typer.Option(
        "--mean", help="Normalisation mean, e.g. 0.485,0.456,0.406.", rich_help_panel=DATA
    ),
]
Std = Annotated[
    str | None,
    typer.Option("--std", help="Normalisation std, e.g. 0.229,0.224,0.225.", rich_help_panel=DATA),
]
Interpolation = Annotated[
    str | None,
    typer.Option(
        "--interpolation",
        help="Resize interpolation (bicubic, bilinear, ...).",
        rich_help_panel=DATA,
    ),
]
CropPct = Annotated[
    float | None, typer.Option("--crop-pct", help="Centre-crop fraction.", rich_help_panel=DATA)
]

Device = Annotated[
    str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.", rich_help_panel=RUNTIME)
]
Amp = Annotated[
    str, typer.Option("--amp", help="Mixed precision: off, bf16 or fp16.", rich_help_panel=RUNTIME)
]
ChannelsLast = Annotated[
    bool,
    typer.Option(
        "--channels-last", help="Run in channels-last memory format.", rich_help_panel=RUNTIME
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
Quiet = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bar.", rich_help_panel=RUNTIME)
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
PerClass = Annotated[
    int | None,
    typer.Option("--per-class", help="At most N --data images per class.", rich_help_panel=PROBES),
]
Layers = Annotated[
    str | None,
    typer.Option(
        "--layers", help="Similarity: comma-separated layer names.", rich_help_panel=PROBES
    ),
]
ErankEvery = Annotated[
    int,
    typer.Option(
        "--erank-every",
        help="Similarity: effective rank on the images whose index is a multiple of N "
        "(1: every image).",
        rich_help_panel=PROBES,
    ),
]
Aug = Annotated[
    str,
    typer.Option(
        "--aug",
        help="Invariance augmentations (comma list or all); each costs --views extra "
        "forwards per image.",
        rich_help_panel=PROBES,
    ),
]
Views = Annotated[
    int, typer.Option("--views", help="Invariance: views per image.", rich_help_panel=PROBES)
]
Embedding = Annotated[
    str,
    typer.Option("--embedding", help="Invariance: prelogits, cls or gap.", rich_help_panel=PROBES),
]
Pairs = Annotated[
    int,
    typer.Option("--pairs", help="Mixup geometry: pairs of each kind.", rich_help_panel=PROBES),
]
Nc4Budget = Annotated[
    int,
    typer.Option(
        "--nc4-budget",
        help="Images kept for NC4 (exact up to this many).",
        rich_help_panel=PROBES,
    ),
]
