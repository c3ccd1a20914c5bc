"""`vitdiag report`: every probe that applies, one pass per dataset, one folder readable on GitHub.

The folder itself (report.json, report.md, the PNGs) is written by `vitdiag.report`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vitdiag import options as o
from vitdiag.commands.common import Shared, shared

if TYPE_CHECKING:
    from vitdiag.data import ImageSource
    from vitdiag.report import Entry
    from vitdiag.settings import Settings

Checkpoints = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="CKPT...",
        help="One or more checkpoints; several are reported side by side with a comparison "
        "table. Leave out and give --arch for random weights.",
        show_default=False,
    ),
]


@shared("model", "images", "interpolation", "crop_pct", "runtime", "probes")
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
    opts: Shared = None,
) -> None:
    """Run every probe that applies in one pass per dataset and write a report folder."""
    from vitdiag.distributed import init_distributed, is_main_process
    from vitdiag.report import prepare_out
    from vitdiag.runner import open_source
    from vitdiag.validation import Output, check_outputs

    wanted, size_list, settings = opts.probe_run(
        "report", probes=probes, sizes=sizes, data=data, val=val
    )
    targets: list[str | None] = list(ckpts) if ckpts else [None]
    check_outputs(
        [Output("--out", out, folder=True, replace="empty"), Output("--json", opts.json_out)],
        [*targets, data, val],
        force=force,
    )
    prepare_out(out, force)
    init_distributed()
    source = open_source(data, settings)
    val_source = open_source(val, settings)
    entries = _entries(opts, targets, source, val_source, wanted, size_list, settings)
    if is_main_process():
        _write(entries, out, plots=plots, force=force, json_out=opts.json_out)


def _entries(
    opts: Shared,
    targets: list[str | None],
    source: ImageSource | None,
    val_source: ImageSource | None,
    wanted: set[str] | None,
    sizes: list[int] | None,
    settings: Settings,
) -> list[Entry]:
    """Every probe that applies run on each checkpoint in turn (one in memory at a time)."""
    from vitdiag.model import describe
    from vitdiag.report import Entry, checkpoint_labels
    from vitdiag.runner import run_all

    entries: list[Entry] = []
    labels = checkpoint_labels(targets, opts.arch)
    for loaded, label in zip(opts.each(targets), labels, strict=True):
        run = run_all(
            loaded, source, probes=wanted, val_source=val_source, sizes=sizes, settings=settings
        )
        entries.append(Entry(label, describe(loaded), run))
        del loaded  # checkpoints can be large: one in memory at a time
    return entries


def _write(
    entries: list[Entry], out: Path, *, plots: bool, force: bool, json_out: Path | None
) -> None:
    """The report folder (report.json, report.md, the PNGs), the summary, and --json."""
    from vitdiag import __version__
    from vitdiag.report import console, print_summary, report_document, write_report
    from vitdiag.results import dumps, json_to_stdout, write_json_text

    data_desc = next((dict(e.results.data) for e in entries if e.results.data), {})
    seconds = sum(e.results.seconds for e in entries)
    doc = report_document(entries, data_desc, seconds, entries[-1].results.world_size)
    text = dumps(doc)
    write_report(out, entries, data_desc, text, version=__version__, plots=plots, force=force)
    con = console(stderr=json_to_stdout(json_out))
    print_summary(con, entries, data_desc, doc["findings"]["items"])
    con.print(f"report written to {out / 'report.md'}")
    if json_out is not None:
        write_json_text(text, json_out)
