"""`vitdiag check`: thresholds from vitdiag.toml / [tool.vitdiag] → pass/fail table, exit code.

Exit 0 when every threshold holds, 1 when any fails, 2 when the config is wrong (before any
model is loaded where possible). Only the probes the thresholds name are run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitdiag import options as o
from vitdiag.commands.common import Shared, shared


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
    c: Shared = None,
) -> None:
    """Check a checkpoint against thresholds such as "collapse.nc1 < 0.5" (exit 1 on failure)."""
    from vitdiag.check import find_config, judge, load_config, render_outcomes
    from vitdiag.errors import CheckFailed, VitdiagError
    from vitdiag.validation import Output, check_invariance_options, check_outputs, check_ranges

    cfg = load_config(config if config is not None else find_config())
    data = data or cfg.data
    train = train or cfg.train
    check_ranges(limit=limit, native_size=c.native_size)
    if "invariance" in cfg.probes:
        try:
            check_invariance_options(cfg.aug, cfg.views, cfg.embedding)
        except VitdiagError as e:
            raise VitdiagError(f"{cfg.path}: {e}") from None
    check_outputs(
        [Output("--json", c.json_out), Output("--junit", junit)], [ckpt, cfg.path, data, train]
    )
    needs_data = cfg.probes - {"classifier"}
    if needs_data and data is None and train is None:
        raise VitdiagError(
            f"{cfg.path}: the checks on {', '.join(sorted(needs_data))} need images; add "
            'data = "path/to/val" (and optionally train = "path/to/train") or pass --data.'
        )

    from vitdiag.check import check_document, check_junit, run_settings
    from vitdiag.engine import is_main_process
    from vitdiag.model import describe
    from vitdiag.report import console
    from vitdiag.results import dumps, json_to_stdout, write_atomic, write_json_text
    from vitdiag.runner import run_all

    settings = run_settings(cfg, limit=limit, runtime=c)
    loaded, _ = c.load(ckpt)
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
    outcomes = judge(cfg.checks, results)
    failed = [x for x in outcomes if not x.passed]
    if is_main_process():
        label = Path(ckpt).name if ckpt else f"{c.arch} (random)"
        con = console(stderr=json_to_stdout(c.json_out))
        render_outcomes(outcomes, con, title=f"vitdiag check — {label}")
        model = describe(loaded)
        if junit is not None:
            write_atomic(junit, check_junit(outcomes, label, results.seconds, model, cfg.path))
        if c.json_out is not None:
            write_json_text(dumps(check_document(outcomes, results, model)), c.json_out)
    if failed:
        raise CheckFailed(f"{len(failed)} of {len(outcomes)} checks failed")
