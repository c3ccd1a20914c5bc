"""`vitdiag report`: every probe that applies, one pass per dataset, one folder readable on GitHub.

The folder itself (report.json, report.md, the PNGs) is written by `vitdiag.report`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitdiag import options as o
from vitdiag.errors import VitdiagError

Checkpoints = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="CKPT...",
        help="One or more checkpoints; several are reported side by side with a comparison "
        "table. Leave out and give --arch for random weights.",
        show_default=False,
    ),
]


def report(
    ckpts: Checkpoints = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Images: collapse, mixup geometry, similarity and invariance run here (the "
            "training split), and everything else too when --val is not given.",
        ),
    ] = None,
    val: Annotated[
        str | None,
        typer.Option("--val", help="Validation images: eval, calibration and variance."),
    ] = None,
    sizes: Annotated[
        str | None,
        typer.Option("--sizes", help="Extra test sizes for the variance probe, e.g. 288,384."),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Folder for report.md, report.json and the PNGs.")
    ] = Path("vitdiag-report"),
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing non-empty --out folder.")
    ] = False,
    plots: Annotated[
        bool, typer.Option("--plots/--no-plots", help="Draw the PNG figures (matplotlib).")
    ] = True,
    probes: Annotated[
        str,
        typer.Option(
            "--probes",
            help="Comma list of probes (classifier, eval, calibration, variance, collapse, "
            "mixup_geometry, similarity, invariance) or all: every one that applies.",
        ),
    ] = "all",
    per_class: Annotated[
        int | None, typer.Option("--per-class", help="At most N --data images per class.")
    ] = None,
    layers: Annotated[
        str | None, typer.Option("--layers", help="Similarity: comma-separated layer names.")
    ] = None,
    aug: Annotated[
        str,
        typer.Option(
            "--aug",
            help="Invariance augmentations (comma list or all); each costs --views extra "
            "forwards per image.",
        ),
    ] = "all",
    views: Annotated[int, typer.Option("--views", help="Invariance: views per image.")] = 4,
    embedding: Annotated[
        str, typer.Option("--embedding", help="Invariance: prelogits, cls or gap.")
    ] = "prelogits",
    pairs: Annotated[int, typer.Option("--pairs", help="Mixup geometry: pairs of each kind.")] = 64,
    budget: Annotated[
        int, typer.Option("--nc4-budget", help="Images kept for NC4 (exact up to this many).")
    ] = 10000,
    arch: o.Arch = None,
    ema: o.Ema = False,
    unsafe_pickle: o.UnsafePickle = False,
    model_arg: o.ModelArg = None,
    native_size: o.NativeSize = None,
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
    """Run every probe that applies in one pass per dataset and write a report folder."""
    from vitdiag import __version__
    from vitdiag.commands.common import (
        DataOptions,
        Output,
        check_invariance_options,
        check_outputs,
        check_ranges,
        console,
        json_to_stdout,
        load_model,
        parse_norm,
        parse_sizes,
        write_json_text,
    )
    from vitdiag.engine import init_distributed, is_main_process
    from vitdiag.model import describe
    from vitdiag.report import (
        Entry,
        checkpoint_labels,
        prepare_out,
        print_summary,
        report_document,
        write_report,
    )
    from vitdiag.results import dumps
    from vitdiag.runner import Settings, open_source, parse_probes, run_all

    wanted = parse_probes(probes)
    size_list = parse_sizes(sizes) if sizes else None
    if data is None and val is None and wanted != {"classifier"}:
        raise VitdiagError("report needs images: give --data DIR (and --val DIR for held-out).")
    DataOptions(
        data, limit, batch_size, workers, seed, strict, mean, std, interpolation, crop_pct
    ).validate()
    check_ranges(pairs=pairs, nc4_budget=budget, per_class=per_class, native_size=native_size)
    check_invariance_options(aug, views, embedding)
    targets: list[str | None] = list(ckpts) if ckpts else [None]
    check_outputs(
        [Output("--out", out, folder=True, replace="empty"), Output("--json", json_out)],
        [*targets, data, val],
        force=force,
    )
    prepare_out(out, force)
    mean_t, std_t = parse_norm(mean, std)
    settings = Settings(
        batch_size=batch_size,
        workers=workers,
        limit=limit,
        seed=seed,
        strict=strict,
        per_class=per_class,
        mean=mean_t,
        std=std_t,
        interpolation=interpolation,
        crop_pct=crop_pct,
        device=device,
        amp=amp,
        channels_last=channels_last,
        quiet=quiet,
        layers=[v.strip() for v in layers.split(",")] if layers else None,
        aug=aug,
        views=views,
        embedding=embedding,
        pairs=pairs,
        nc4_budget=budget,
    )
    init_distributed()
    source = open_source(data, settings)
    val_source = open_source(val, settings)
    entries: list[Entry] = []
    seconds = 0.0
    world = 1
    data_desc: dict = {}
    for ckpt, label in zip(targets, checkpoint_labels(targets, arch), strict=True):
        loaded = load_model(
            ckpt,
            arch,
            ema=ema,
            unsafe_pickle=unsafe_pickle,
            model_arg=model_arg,
            native_size=native_size,
        )
        results = run_all(
            loaded,
            source,
            probes=wanted,
            val_source=val_source,
            sizes=size_list,
            settings=settings,
        )
        entries.append(Entry(label, describe(loaded), results))
        seconds += results.seconds
        world = results.world_size
        data_desc = data_desc or dict(results.data)
        del loaded  # checkpoints can be large: one in memory at a time

    if not is_main_process():
        return
    text = dumps(report_document(entries, data_desc, seconds, world))
    write_report(out, entries, data_desc, text, version=__version__, plots=plots, force=force)
    con = console(stderr=json_to_stdout(json_out))
    print_summary(con, entries, data_desc)
    con.print(f"report written to {out / 'report.md'}")
    if json_out is not None:
        write_json_text(text, json_out)
