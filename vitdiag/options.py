"""Option types shared by the commands, so every command spells an option the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Checkpoint = Annotated[
    str | None,
    typer.Argument(
        help="Checkpoint: a .safetensors/.pt/.pth/.bin file or a directory with config.json. "
        "Leave out and give --arch for random weights.",
        show_default=False,
    ),
]
Arch = Annotated[
    str | None,
    typer.Option("--arch", help="timm architecture name; overrides config.json and matching."),
]
Ema = Annotated[bool, typer.Option("--ema", help="Use the EMA weights when the file has them.")]
UnsafePickle = Annotated[
    bool,
    typer.Option(
        "--unsafe-pickle",
        help="Allow a full pickle (can run code!). Only for files you trust.",
    ),
]
ModelArg = Annotated[
    list[str] | None,
    typer.Option(
        "--model-arg",
        help="KEY=VALUE passed to timm.create_model (e.g. num_heads=6); repeatable.",
    ),
]
NativeSize = Annotated[
    int | None,
    typer.Option(
        "--native-size", help="Size the weights were trained at, when nothing records it."
    ),
]

Data = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="Dataset: an ImageFolder directory, a flat folder of images, a .tar, a timm "
        "dataset string, or 'synthetic[:N]'.",
    ),
]
Limit = Annotated[int | None, typer.Option("--limit", help="Use at most this many images.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")]
Workers = Annotated[int, typer.Option("--workers", help="Data-loading worker processes.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for sampling, augmentation and --limit.")]
Strict = Annotated[
    bool,
    typer.Option("--strict", help="Fail on the first unreadable image instead of skipping it."),
]
Size = Annotated[
    int | None,
    typer.Option("--size", help="Test image size in pixels (default: the model's native size)."),
]
Mean = Annotated[
    str | None, typer.Option("--mean", help="Normalisation mean, e.g. 0.485,0.456,0.406.")
]
Std = Annotated[
    str | None, typer.Option("--std", help="Normalisation std, e.g. 0.229,0.224,0.225.")
]
Interpolation = Annotated[
    str | None,
    typer.Option("--interpolation", help="Resize interpolation (bicubic, bilinear, ...)."),
]
CropPct = Annotated[float | None, typer.Option("--crop-pct", help="Centre-crop fraction.")]

Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
Amp = Annotated[str, typer.Option("--amp", help="Mixed precision: off, bf16 or fp16.")]
ChannelsLast = Annotated[
    bool, typer.Option("--channels-last", help="Run in channels-last memory format.")
]
JsonOut = Annotated[
    Path | None,
    typer.Option("--json", help="Write the results as JSON to this path ('-' for stdout)."),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
