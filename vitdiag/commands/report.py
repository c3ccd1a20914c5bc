"""`vitdiag report`: every probe that applies, one pass per dataset, one folder readable on GitHub.

The folder itself (report.json, report.md, the PNGs) is written by `vitdiag.report`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitdiag import options as o
from vitdiag.commands.common import Shared, shared

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
    data: o.TrainData = None,
    val: o.Val = None,
    sizes: o.Sizes = None,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Folder for report.md, report.json and the PNGs.",
            rich_help_panel=o.OUTPUT,
        ),
    ] = Path("vitdiag-report"),
    force: o.Force = False,
    plots: o.Plots = True,
    probes: o.Probes = "all",
    per_class: o.PerClass = None,
    layers: o.Layers = None,
    erank_every: o.ErankEvery = 16,
    aug: o.Aug = "all",
    views: o.Views = 4,
    embedding: o.Embedding = "prelogits",
    pairs: o.Pairs = 64,
    budget: o.Nc4Budget = 10000,
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
    from vitdiag.runner import open_source, run_all
    from vitdiag.validation import Output, check_outputs

    wanted, size_list, settings = c.probe_run(
        "report",
        probes=probes,
        sizes=sizes,
        data=data,
        val=val,
        per_class=per_class,
        layers=layers,
        erank_every=erank_every,
        aug=aug,
        views=views,
        embedding=embedding,
        pairs=pairs,
        budget=budget,
    )
    targets: list[str | None] = list(ckpts) if ckpts else [None]
    check_outputs(
        [Output("--out", out, folder=True, replace="empty"), Output("--json", c.json_out)],
        [*targets, data, val],
        force=force,
    )
    prepare_out(out, force)
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
