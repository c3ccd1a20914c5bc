"""`vitdiag invariance`: Linv and Ldiv of augmented views (SPEC §3), one or more checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitdiag import options as o
from vitdiag.commands.common import (
    DataOptions,
    ModelOptions,
    Output,
    check_invariance_options,
    check_outputs,
    check_ranges,
    console,
    json_to_stdout,
    load_at,
    open_data,
    write_json_text,
)

Checkpoints = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="CKPT",
        help="One or more checkpoints (files or directories with config.json); several share "
        "one table and one plot. Leave out and give --arch for random weights.",
        show_default=False,
    ),
]
Aug = Annotated[
    str,
    typer.Option(
        "--aug",
        help="Comma-separated augmentations: mixup, cutmix, erasing-pixel, erasing-const, "
        "erasing-rand, cutout, randaugment, autoaugment, trivialaugment, colorjitter, rrc "
        "(or all).",
    ),
]
Views = Annotated[int, typer.Option("--views", help="Augmented views per image (at least 2).")]
Embedding = Annotated[
    str,
    typer.Option(
        "--embedding",
        help="f(x): prelogits (classifier input), cls (final-norm class token) or gap "
        "(mean of final-norm grid tokens).",
    ),
]
Alpha = Annotated[
    str | None,
    typer.Option(
        "--alpha",
        help="Beta(α, α) of mixup/cutmix: one number for both, or mixup=0.8,cutmix=1.0 "
        "(the defaults).",
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


def invariance(
    ckpts: Checkpoints = None,
    data: o.Data = None,
    aug: Aug = "all",
    views: Views = 4,
    embedding: Embedding = "prelogits",
    alpha: Alpha = None,
    plot: Plot = None,
    arch: o.Arch = None,
    ema: o.Ema = False,
    unsafe_pickle: o.UnsafePickle = False,
    model_arg: o.ModelArg = None,
    native_size: o.NativeSize = None,
    size: o.Size = None,
    limit: o.Limit = None,
    batch_size: o.BatchSize = 64,
    workers: o.Workers = 0,
    seed: o.Seed = 0,
    strict: o.Strict = False,
    mean: o.Mean = None,
    std: o.Std = None,
    interpolation: o.Interpolation = None,
    crop_pct: o.CropPct = None,
    device: o.Device = "auto",
    amp: o.Amp = "off",
    channels_last: o.ChannelsLast = False,
    json_out: o.JsonOut = None,
    quiet: o.Quiet = False,
) -> None:
    """Invariance (Linv) and diversity (Ldiv) of augmented views, definition vitdiag-v1."""
    import dataclasses

    from vitdiag.engine import is_main_process
    from vitdiag.model import describe
    from vitdiag.plots import plot_invariance
    from vitdiag.report import render
    from vitdiag.results import Result, Table, document, dumps
    from vitdiag.runner import run_all

    # Validate everything cheap before loading a single model.
    check_invariance_options(aug, views, embedding, alpha)
    targets: list[str | None] = list(ckpts) if ckpts else [None]
    labels = _labels(targets, arch)
    opts = DataOptions(
        data, limit, batch_size, workers, seed, strict, mean, std, interpolation, crop_pct
    )
    opts.validate()
    check_ranges(size=size, native_size=native_size)
    check_outputs([Output("--json", json_out), Output("--plot", plot)], [*targets, data])
    source = open_data(opts)
    # Invariance never reads labels, so any data will do, whatever its classes.
    settings = opts.settings(
        aug=aug,
        views=views,
        embedding=embedding,
        alpha=alpha,
        label_check=False,
        device=device,
        amp=amp,
        channels_last=channels_last,
        quiet=quiet,
    )
    model = ModelOptions(arch, ema, unsafe_pickle, model_arg, native_size)

    results: list[Result] = []
    runs = []
    first_loaded = None
    for ckpt, label in zip(targets, labels, strict=True):
        loaded, _ = load_at(ckpt, model, size)
        each = dataclasses.replace(settings, label=f"invariance {label}")
        found = run_all(loaded, source, probes={"invariance"}, settings=each)
        result = found[0]
        result.extra["checkpoint"] = label
        result.extra["model"] = describe(loaded)
        results.append(result)
        runs.append(found)
        if len(targets) == 1:
            first_loaded = loaded
        # Free the model before loading the next one: checkpoints can be large.
        del loaded

    if not is_main_process():
        return
    data_desc = runs[0].data["data"]
    shown = results
    if len(results) > 1:
        rows = [
            [label, *row]
            for label, res in zip(labels, results, strict=True)
            for row in res.tables[0].rows
        ]
        notes = list(dict.fromkeys(n for res in results for n in res.notes))
        shown = [
            Result(
                probe="invariance",
                definition=results[0].definition,
                tables=[
                    Table(
                        results[0].tables[0].title,
                        ["checkpoint", *results[0].tables[0].columns],
                        rows,
                    )
                ],
                notes=notes,
            )
        ]
    out = console(stderr=json_to_stdout(json_out))
    render(shown, out, loaded=first_loaded, data=data_desc)
    if plot is not None:
        written = plot_invariance(list(zip(labels, results, strict=True)), plot)
        out.print(f"plot written to {written}")
    if json_out is None:
        return
    # With several checkpoints the top-level model is null: each result's extra carries its
    # own checkpoint label and model provenance.
    single = results[0].extra["model"] if len(results) == 1 else None
    doc = document("invariance", results, single, data_desc)
    doc["run"] = {
        "seconds": sum(r.seconds for r in runs),
        "world_size": runs[0].world_size,
    }
    write_json_text(dumps(doc), json_out)
