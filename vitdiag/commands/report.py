"""`vitdiag report`: every probe that applies, one pass per dataset, one folder readable on GitHub.

The folder itself (report.json, report.md, the PNGs) is written by `vitdiag.report`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitdiag.commands.common import Shared, shared
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


@shared("model", "images", "interpolation", "crop_pct", "runtime")
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
    erank_every: Annotated[
        int,
        typer.Option(
            "--erank-every",
            help="Similarity: effective rank on the images whose index is a multiple of N "
            "(1: every image).",
        ),
    ] = 16,
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
    c: Shared = None,
) -> None:
    """Run every probe that applies in one pass per dataset and write a report folder."""
    from vitdiag import __version__
    from vitdiag.engine import init_distributed, is_main_process
    from vitdiag.model import describe
    from vitdiag.report import (
        Entry,
        checkpoint_labels,
        console,
        prepare_out,
        print_summary,
        report_document,
        write_report,
    )
    from vitdiag.results import dumps, json_to_stdout, write_json_text
    from vitdiag.runner import open_source, parse_probes, run_all
    from vitdiag.validation import (
        Output,
        check_invariance_options,
        check_outputs,
        check_ranges,
        parse_sizes,
    )

    wanted = parse_probes(probes)
    size_list = parse_sizes(sizes) if sizes else None
    if data is None and val is None and wanted != {"classifier"}:
        raise VitdiagError("report needs images: give --data DIR (and --val DIR for held-out).")
    c.validate()
    check_ranges(
        pairs=pairs,
        nc4_budget=budget,
        per_class=per_class,
        native_size=c.native_size,
        erank_every=erank_every,
    )
    check_invariance_options(aug, views, embedding)
    targets: list[str | None] = list(ckpts) if ckpts else [None]
    check_outputs(
        [Output("--out", out, folder=True, replace="empty"), Output("--json", c.json_out)],
        [*targets, data, val],
        force=force,
    )
    prepare_out(out, force)
    settings = c.settings(
        per_class=per_class,
        layers=[v.strip() for v in layers.split(",")] if layers else None,
        erank_every=erank_every,
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
    for loaded, label in zip(c.each(targets), checkpoint_labels(targets, c.arch), strict=True):
        run = run_all(
            loaded, source, probes=wanted, val_source=val_source, sizes=size_list, settings=settings
        )
        entries.append(Entry(label, describe(loaded), run))
        del loaded  # checkpoints can be large: one in memory at a time

    if not is_main_process():
        return
    data_desc = next((dict(e.results.data) for e in entries if e.results.data), {})
    seconds = sum(e.results.seconds for e in entries)
    text = dumps(report_document(entries, data_desc, seconds, entries[-1].results.world_size))
    write_report(out, entries, data_desc, text, version=__version__, plots=plots, force=force)
    con = console(stderr=json_to_stdout(c.json_out))
    print_summary(con, entries, data_desc)
    con.print(f"report written to {out / 'report.md'}")
    if c.json_out is not None:
        write_json_text(text, c.json_out)
