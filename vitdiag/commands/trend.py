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
    from vitdiag.studies.trend import ModelOptions, TrendRun
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
    opts: Shared = None,
) -> None:
    """Run the probes on every checkpoint of a run (or read a Tracker's log) and plot them
    against epoch."""
    from vitdiag.distributed import is_main_process
    from vitdiag.validation import Output

    named = _runs(ckpts, run)
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
        found = _checkpoints(named, outputs, [data, val], out=out, force=force)
        model = _model_options(opts)
        sources = _open(data, val, settings)
        runs = _from_checkpoints(model, found, sources, wanted, size_list, settings)
    if is_main_process():
        _write(runs, out, plots=plots, force=force, json_out=opts.json_out)
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
    """trend.json, trend.md and the PNGs (with --out), a line per run, and --json."""
    from vitdiag import __version__
    from vitdiag.report import console, write_trend
    from vitdiag.results import dumps, json_to_stdout, write_json_text
    from vitdiag.studies import trend as study

    text = dumps(study.trend_document(runs))
    if out is not None:
        write_trend(out, runs, text, version=__version__, plots=plots, force=force)
    con = console(stderr=json_to_stdout(json_out))
    for r in runs:
        con.print(f"{r.name or 'run'}: {len(r.rows)} point(s), ordered by {r.order_by}")
        for note in r.notes:
            con.print(f"note: {note}")
    if out is not None:
        con.print(f"trend written to {out / 'trend.md'}")
    if json_out is not None:
        write_json_text(text, json_out)


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
