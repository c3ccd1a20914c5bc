"""`vitdiag check`: thresholds from vitdiag.toml / [tool.vitdiag] → pass/fail table, exit code.

Exit 0 when every threshold holds, 1 when any fails, 2 when the config is wrong (before any
model is loaded where possible). Only the probes the thresholds name are run.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vitdiag import options as o
from vitdiag.commands.common import Shared, shared
from vitdiag.errors import VitdiagError
from vitdiag.validation import Output, check_outputs, check_ranges

if TYPE_CHECKING:
    from vitdiag.check import Outcome
    from vitdiag.model import LoadedModel
    from vitdiag.runner import Results


@shared("model", "runtime")
def check(
    ckpt: o.Checkpoint = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="vitdiag.toml, or a pyproject.toml with [tool.vitdiag] (default: look for "
            "either in the current folder).",
        ),
    ] = None,
    junit: Annotated[
        Path | None,
        typer.Option("--junit", help="Also write the outcome as JUnit XML (one testcase each)."),
    ] = None,
    data: Annotated[
        str | None, typer.Option("--data", help="Override the config's data (evaluation images).")
    ] = None,
    train: Annotated[
        str | None, typer.Option("--train", help="Override the config's train (training images).")
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", help="Override the config's limit.")
    ] = None,
    opts: Shared = None,
) -> None:
    """Check a checkpoint against thresholds such as "collapse.nc1 < 0.5" (exit 1 on failure)."""
    from vitdiag.check import find_config, findings_of, judge, load_config, run_settings
    from vitdiag.errors import CheckFailed
    from vitdiag.model import describe
    from vitdiag.runner import run_all

    cfg = load_config(config if config is not None else find_config())
    data, train = data or cfg.data, train or cfg.train
    opts.validate()  # the command line's own values, before the config's
    check_ranges(native_size=opts.native_size)
    settings = run_settings(cfg, opts.given)
    check_outputs(
        [Output("--json", opts.json_out), Output("--junit", junit)], [ckpt, cfg.path, data, train]
    )
    needs_data = {"every probe"} if cfg.probes is None else cfg.probes - {"classifier"}
    if needs_data and data is None and train is None:
        raise VitdiagError(
            f"{cfg.path}: the checks on {', '.join(sorted(needs_data))} need images; add "
            'data = "path/to/val" (and optionally train = "path/to/train") or pass --data.'
        )
    loaded, _ = opts.load(ckpt)
    # `train` feeds the training-split probes; `data` is then the held-out split.
    source, val_source = (train, data) if train is not None else (data, None)
    results = run_all(
        loaded,
        source,
        probes=cfg.probes,
        val_source=val_source,
        sizes=cfg.all_sizes,
        settings=settings,
    )
    findings = findings_of(results, describe(loaded), cfg.practical)
    outcomes = judge(cfg.checks, results, findings["items"])
    _emit(
        outcomes, results, loaded, opts, ckpt=ckpt, junit=junit, config=cfg.path, findings=findings
    )
    failed = [x for x in outcomes if not x.passed]
    if failed:
        raise CheckFailed(f"{len(failed)} of {len(outcomes)} checks failed")


def _emit(
    outcomes: list[Outcome],
    results: Results,
    loaded: LoadedModel,
    opts: Shared,
    *,
    ckpt: str | None,
    junit: Path | None,
    config: Path,
    findings: dict,
) -> None:
    """The pass/fail table, and the JUnit XML and --json document when asked (main process)."""
    from vitdiag.check import check_document, check_junit, render_outcomes
    from vitdiag.distributed import is_main_process
    from vitdiag.model import describe
    from vitdiag.report import console
    from vitdiag.results import dumps, json_to_stdout, write_atomic, write_json_text

    if not is_main_process():
        return
    label = Path(ckpt).name if ckpt else f"{opts.arch} (random)"
    con = console(stderr=json_to_stdout(opts.json_out))
    render_outcomes(outcomes, con, title=f"vitdiag check — {label}")
    model = describe(loaded)
    if junit is not None:
        write_atomic(junit, check_junit(outcomes, label, results.seconds, model, config))
    if opts.json_out is not None:
        doc = check_document(outcomes, results, model, findings)
        write_json_text(dumps(doc), opts.json_out)
