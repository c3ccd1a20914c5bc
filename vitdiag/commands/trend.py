"""`vitdiag trend`: the diagnostics of every checkpoint of a run, against epoch.

The study (finding, ordering, one model with its weights swapped, the probes) is
`vitdiag.studies.trend`; the folder (trend.json, trend.md, the PNGs) is written by
`vitdiag.report` with the figures from `vitdiag.plots`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitdiag import options as o
from vitdiag.commands.common import Shared, shared
from vitdiag.errors import VitdiagError

Checkpoints = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="CKPT...",
        help="The checkpoints of one run: files, a folder holding them (timm train.py's "
        "checkpoint-*.pth.tar, DeiT's per-epoch files) or globs. With --from-log: Tracker log "
        "folders (or their vitdiag_tracker.csv).",
        show_default=False,
    ),
]


@shared("model", "images", "interpolation", "crop_pct", "runtime")
def trend(
    ckpts: Checkpoints = None,
    data: o.TrainData = None,
    val: o.Val = None,
    run: Annotated[
        list[str] | None,
        typer.Option(
            "--run",
            help="NAME=GLOB: one run's checkpoints (or, with --from-log, its log folder); "
            "repeat for several runs side by side, one line each in every plot.",
        ),
    ] = None,
    from_log: Annotated[
        bool,
        typer.Option(
            "--from-log",
            help="Draw from Tracker logs (DIR/vitdiag_tracker.csv) instead of checkpoints; "
            "no images needed.",
        ),
    ] = False,
    sizes: o.Sizes = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Folder for trend.md, trend.json and the PNGs (default vitdiag-trend, or "
            "none when only --json is given).",
            rich_help_panel=o.OUTPUT,
        ),
    ] = None,
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
    """Run the probes on every checkpoint of a run (or read a Tracker's log) and plot them
    against epoch."""
    from vitdiag import __version__
    from vitdiag.engine import init_distributed, is_main_process
    from vitdiag.report import console, prepare_out, write_trend
    from vitdiag.results import dumps, json_to_stdout, write_json_text
    from vitdiag.runner import open_source
    from vitdiag.studies import trend as study
    from vitdiag.validation import Output, check_outputs, parse_model_args

    named = _runs(ckpts, run)
    out = out if out is not None or c.json_out is not None else Path("vitdiag-trend")
    outputs = [Output("--out", out, folder=True, replace="empty"), Output("--json", c.json_out)]
    if from_log:
        # Several log folders as arguments are several runs, named by their folders.
        logs = [
            (n or (Path(i).name if len(items) > 1 else ""), i) for n, items in named for i in items
        ]
        runs = [study.read_log(Path(where), name) for name, where in logs]
        check_outputs(outputs, [str(study.log_file(Path(w))) for _, w in logs], force=force)
    else:
        wanted, size_list, settings = c.probe_run(
            "trend",
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
        found = [(name, study.find_checkpoints(items, name)) for name, items in named]
        inputs = [str(p) for _, paths in found for p in paths]
        check_outputs(outputs, [*inputs, data, val], force=force)
        if out is not None:
            prepare_out(out, force)
        model = study.ModelOptions(
            c.arch, c.ema, c.unsafe_pickle, parse_model_args(c.model_arg), c.native_size
        )
        init_distributed()
        source, val_source = open_source(data, settings), open_source(val, settings)
        runs = [
            study.trend_run(
                name,
                paths,
                source,
                val_source=val_source,
                probes=wanted,
                sizes=size_list,
                settings=settings,
                model=model,
            )
            for name, paths in found
        ]

    if not is_main_process():
        return
    text = dumps(study.trend_document(runs))
    if out is not None:
        write_trend(out, runs, text, version=__version__, plots=plots, force=force)
    con = console(stderr=json_to_stdout(c.json_out))
    for r in runs:
        con.print(f"{r.name or 'run'}: {len(r.rows)} point(s), ordered by {r.order_by}")
        for note in r.notes:
            con.print(f"note: {note}")
    if out is not None:
        con.print(f"trend written to {out / 'trend.md'}")
    if c.json_out is not None:
        write_json_text(text, c.json_out)


def _runs(ckpts: list[str] | None, run: list[str] | None) -> list[tuple[str, list[str]]]:
    """(name, items) of each run: the arguments as one unnamed run, or each --run NAME=GLOB."""
    if ckpts and run:
        raise VitdiagError(
            "give one run's checkpoints as arguments or several runs with --run NAME=GLOB, "
            "not both."
        )
    if ckpts:
        return [("", list(ckpts))]
    if not run:
        raise VitdiagError(
            "give the run's checkpoints (files, a folder or a glob), or --run NAME=GLOB."
        )
    named: list[tuple[str, list[str]]] = []
    for item in run:
        name, sep, where = item.partition("=")
        if not sep or not name.strip() or not where.strip():
            raise VitdiagError(
                f"--run {item!r} must look like NAME=GLOB, e.g. mixup=out/*.pth.tar."
            )
        if any(name.strip() == n for n, _ in named):
            raise VitdiagError(
                f"--run {name.strip()!r} is given twice; give each run its own name."
            )
        named.append((name.strip(), [where.strip()]))
    return named
