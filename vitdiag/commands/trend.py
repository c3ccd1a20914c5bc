"""`vitdiag trend`: the diagnostics of every checkpoint of a run, against epoch.

The study (finding, ordering, one model with its weights swapped, the probes) is
`vitdiag.studies.trend`; the folder (trend.json, trend.md, the PNGs) is written by
`vitdiag.report` with the figures from `vitdiag.plots`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vitdiag import options as o
from vitdiag.commands.common import Shared, shared
from vitdiag.errors import VitdiagError

if TYPE_CHECKING:
    from vitdiag.data import ImageSource
    from vitdiag.settings import Settings
    from vitdiag.studies.trend import ModelOptions, Row, TrendRun, WatchOptions
    from vitdiag.validation import Output

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


MlflowUri = Annotated[
    str | None,
    typer.Option(
        "--mlflow",
        metavar="URI",
        help="Also log every row to MLflow at this tracking URI (file:./mlruns, "
        "http://host:5000), one run per trend run in experiment vitdiag-trend.",
        rich_help_panel=o.OUTPUT,
    ),
]
WandbProject = Annotated[
    str | None,
    typer.Option(
        "--wandb",
        metavar="PROJECT",
        help="Also log every row to this W&B project, one run per trend run.",
        rich_help_panel=o.OUTPUT,
    ),
]
WandbMode = Annotated[
    str | None,
    typer.Option(
        "--wandb-mode",
        help="W&B's mode: online, offline or disabled (default: W&B's own, WANDB_MODE).",
        rich_help_panel=o.OUTPUT,
    ),
]


WatchDir = Annotated[
    Path | None,
    typer.Option(
        "--watch",
        metavar="DIR",
        help="Follow a running timm train.py output folder: measure each checkpoint-N file "
        "once it is complete (size and mtime unchanged over two polls, and readable; those "
        "already there first; last/model_best copies are left out) and rewrite the outputs "
        "after each. Ends after --max-checkpoints or at Ctrl-C, which exits 0 with everything "
        "measured written (130 when nothing was measured yet).",
        show_default=False,
    ),
]
Poll = Annotated[
    float,
    typer.Option(
        "--poll", metavar="SECONDS", help="With --watch: seconds between looks.", min=0.01
    ),
]
MaxCheckpoints = Annotated[
    int | None,
    typer.Option(
        "--max-checkpoints",
        metavar="N",
        help="With --watch: stop after N checkpoints are measured (default: at Ctrl-C).",
        min=1,
    ),
]


@shared("model", "images", "interpolation", "crop_pct", "runtime", "probes")
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
    mlflow: MlflowUri = None,
    wandb: WandbProject = None,
    wandb_mode: WandbMode = None,
    watch: WatchDir = None,
    poll: Poll = 10.0,
    max_checkpoints: MaxCheckpoints = None,
    opts: Shared = None,
) -> None:
    """Run the probes on every checkpoint of a run (or read a Tracker's log) and plot them
    against epoch."""
    from vitdiag.distributed import is_main_process
    from vitdiag.validation import Output

    watching = _watch_options(watch, poll, max_checkpoints, ckpts or run, from_log, opts.json_out)
    named = [("", [str(watch)])] if watching else _runs(ckpts, run)
    if wandb_mode not in (None, "online", "offline", "disabled"):
        raise VitdiagError(
            f"--wandb-mode {wandb_mode!r} is not a W&B mode; give online, offline or disabled."
        )
    out = out if out is not None or opts.json_out is not None else Path("vitdiag-trend")
    outputs = [Output("--out", out, folder=True, replace="empty"), Output("--json", opts.json_out)]
    if from_log:
        runs = _from_logs(named, outputs, force=force)
    else:
        wanted, size_list, settings = opts.probe_run(
            "trend", probes=probes, sizes=sizes, data=data, val=val
        )
        if watching:
            _check_watched(watch, outputs, [data, val], out=out, force=force)
        else:
            found = _checkpoints(named, outputs, [data, val], out=out, force=force)
        model = _model_options(opts)
        sources = _open(data, val, settings)
        if watching:
            written = {"out": out, "plots": plots, "json_out": opts.json_out}
            runs = _watch(watch, watching, model, sources, wanted, size_list, settings, written)
        else:
            runs = _from_checkpoints(model, found, sources, wanted, size_list, settings)
    if is_main_process():
        if not watching:
            _write(runs, out, plots=plots, force=force, json_out=opts.json_out)
        _say(runs, out, opts.json_out)
        _log(runs, mlflow, wandb, wandb_mode)


def _log(runs: list[TrendRun], mlflow: str | None, wandb: str | None, mode: str | None) -> None:
    """The rows to MLflow and W&B, named as in trend.json (`<probe>.<metric>`)."""
    from vitdiag.studies import trend as study

    if mlflow is not None:
        from vitdiag.integrations.mlflow import MlflowWriter

        study.log_runs(
            runs,
            lambda name: MlflowWriter(
                tracking_uri=mlflow, experiment="vitdiag-trend", run_name=name or None
            ),
        )
    if wandb is not None:
        from vitdiag.integrations.wandb import WandbWriter

        study.log_runs(runs, lambda name: WandbWriter(project=wandb, mode=mode, name=name or None))


def _from_logs(
    named: list[tuple[str, list[str]]], outputs: list[Output], *, force: bool
) -> list[TrendRun]:
    """Each run read from its Tracker log; several log folders as arguments are several runs,
    named by their folders."""
    from vitdiag.studies import trend as study
    from vitdiag.validation import check_outputs

    logs = [(n or (Path(i).name if len(items) > 1 else ""), i) for n, items in named for i in items]
    runs = [study.read_log(Path(where), name) for name, where in logs]
    check_outputs(outputs, [str(study.log_file(Path(w))) for _, w in logs], force=force)
    return runs


def _checkpoints(
    named: list[tuple[str, list[str]]],
    outputs: list[Output],
    data_paths: list[str | None],
    *,
    out: Path | None,
    force: bool,
) -> list[tuple[str, list[Path]]]:
    """Each run's checkpoint files, the outputs checked against them and the data, and the
    --out folder prepared."""
    from vitdiag.report import prepare_out
    from vitdiag.studies import trend as study
    from vitdiag.validation import check_outputs

    found = [(name, study.find_checkpoints(items, name)) for name, items in named]
    inputs = [str(p) for _, paths in found for p in paths]
    check_outputs(outputs, [*inputs, *data_paths], force=force)
    if out is not None:
        prepare_out(out, force)
    return found


def _open(
    data: str | None, val: str | None, settings: Settings
) -> tuple[ImageSource | None, ImageSource | None]:
    from vitdiag.distributed import init_distributed
    from vitdiag.runner import open_source

    init_distributed()
    return open_source(data, settings), open_source(val, settings)


def _model_options(opts: Shared) -> ModelOptions:
    from vitdiag.studies import trend as study
    from vitdiag.validation import parse_model_args

    return study.ModelOptions(
        opts.arch, opts.ema, opts.unsafe_pickle, parse_model_args(opts.model_arg), opts.native_size
    )


def _from_checkpoints(
    model: ModelOptions,
    found: list[tuple[str, list[Path]]],
    sources: tuple[ImageSource | None, ImageSource | None],
    wanted: set[str] | None,
    sizes: list[int] | None,
    settings: Settings,
) -> list[TrendRun]:
    """The probes on every checkpoint of each run, the model options as given."""
    from vitdiag.studies import trend as study

    source, val_source = sources
    return [
        study.trend_run(
            name,
            paths,
            source,
            val_source=val_source,
            probes=wanted,
            sizes=sizes,
            settings=settings,
            model=model,
        )
        for name, paths in found
    ]


def _write(
    runs: list[TrendRun], out: Path | None, *, plots: bool, force: bool, json_out: Path | None
) -> None:
    """trend.json, trend.md and the PNGs (with --out), and --json."""
    from vitdiag import __version__
    from vitdiag.report import write_trend
    from vitdiag.results import dumps, write_json_text
    from vitdiag.studies import trend as study

    text = dumps(study.trend_document(runs))
    if out is not None:
        write_trend(out, runs, text, version=__version__, plots=plots, force=force)
    if json_out is not None:
        write_json_text(text, json_out)


def _say(runs: list[TrendRun], out: Path | None, json_out: Path | None) -> None:
    """A line per run and its notes, and where the trend is."""
    from vitdiag.report import console
    from vitdiag.results import json_to_stdout

    con = console(stderr=json_to_stdout(json_out))
    for r in runs:
        con.print(f"{r.name or 'run'}: {len(r.rows)} point(s), ordered by {r.order_by}")
        for note in r.notes:
            con.print(f"note: {note}")
    if out is not None:
        con.print(f"trend written to {out / 'trend.md'}")


def _watch_options(
    watch: Path | None,
    poll: float,
    max_checkpoints: int | None,
    given: list[str] | None,
    from_log: bool,
    json_out: Path | None,
) -> WatchOptions | None:
    """The --watch options, None without --watch; what --watch cannot go with is refused."""
    from vitdiag.studies.trend import WatchOptions

    if watch is None:
        if max_checkpoints is not None or poll != 10.0:
            raise VitdiagError("--poll and --max-checkpoints go with --watch DIR; add it.")
        return None
    if given or from_log:
        raise VitdiagError(
            "--watch DIR follows one training folder; give no checkpoints, --run or --from-log "
            "with it."
        )
    if json_out is not None and str(json_out) == "-":
        raise VitdiagError(
            "--watch rewrites its outputs, so --json - cannot go with it; give a file."
        )
    if not watch.is_dir():
        raise VitdiagError(
            f"--watch {watch} is not a folder; give train.py's output folder (it creates it "
            "when training starts)."
        )
    return WatchOptions(poll=poll, max_checkpoints=max_checkpoints)


def _check_watched(
    watch: Path,
    outputs: list[Output],
    data_paths: list[str | None],
    *,
    out: Path | None,
    force: bool,
) -> None:
    """The outputs checked against the watched folder and the data, and --out prepared."""
    from vitdiag.distributed import is_distributed
    from vitdiag.report import prepare_out
    from vitdiag.validation import check_outputs

    if is_distributed():
        raise VitdiagError("--watch runs in one process; start it without torchrun.")
    check_outputs(outputs, [str(watch), *data_paths], force=force)
    if out is not None:
        prepare_out(out, force)


def _watch(
    watch: Path,
    options: WatchOptions,
    model: ModelOptions,
    sources: tuple[ImageSource | None, ImageSource | None],
    wanted: set[str] | None,
    sizes: list[int] | None,
    settings: Settings,
    written: dict,
) -> list[TrendRun]:
    """Each complete checkpoint measured, and the outputs rewritten whole after each (the
    folder is this command's own by then, so it is replaced); Ctrl-C ends the watch."""
    from vitdiag.report import console
    from vitdiag.studies import trend as study

    con = console()

    def update(run: TrendRun, row: Row) -> None:
        _write([run], force=True, **written)
        con.print(f"measured {row.label} (epoch {row.epoch}): {len(run.rows)} checkpoint(s)")

    source, val_source = sources
    run = study.watch_run(
        watch,
        source,
        val_source=val_source,
        probes=wanted,
        sizes=sizes,
        settings=settings,
        model=model,
        watch=options,
        on_update=update,
    )
    if run.interrupted and not run.rows:
        raise KeyboardInterrupt  # nothing measured: the CLI's "interrupted", exit 130
    if run.interrupted:
        typer.echo(
            f"interrupted: stopped watching {watch} after {len(run.rows)} checkpoint(s), "
            "all written",
            err=True,
        )
    return [run]


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
